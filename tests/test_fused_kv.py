"""One fused K/V linear per trained layer, and a training step that compiles whole (issue #27).

The fused layer computes ``x·(W + ΔW)ᵀ`` in one matmul where the forward hooks it replaces added
a second, sliced one; its custom backward keeps the official start-of-text detach. The tests hold
it to the formulation it replaced (separate base and delta matmuls, the delta's start position
detached), count its matmuls, and compile the UNet step with ``fullgraph=True``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.model.kv import attach_fused_deltas, delta_linear
from classdiffusion.run.train import TrainingRun

from helpers import dog, make_images, small_config

MATMULS = {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm"}


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.matmuls += 1
        return func(*args, **(kwargs or {}))


def _hooked_reference(x, weight, bias, delta_weight):
    """What the forward hooks computed: the base Linear plus ``F.linear(x, ΔW)`` with the start
    position's part detached (diffusers' CustomDiffusionAttnProcessor)."""
    extra = torch.cat([F.linear(x[:, :1], delta_weight.detach()), F.linear(x[:, 1:], delta_weight)], dim=1)
    return F.linear(x, weight, bias) + extra


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_equals_the_hooked_formulation_with_its_start_token_detach(with_bias):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 16, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64) if with_bias else None
    delta = (0.1 * torch.randn(8, 16, dtype=torch.float64)).requires_grad_(True)
    upstream = torch.randn(3, 7, 8, dtype=torch.float64)

    fused = delta_linear(x, weight, bias, delta, None, skip_start=True)
    grad_x, grad_delta = torch.autograd.grad(fused, (x, delta), upstream)
    reference = _hooked_reference(x, weight, bias, delta)
    ref_x, ref_delta = torch.autograd.grad(reference, (x, delta), upstream)

    assert torch.allclose(fused, reference, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad_x, ref_x, rtol=1e-12, atol=1e-12)  # every position passes its gradient on
    assert torch.allclose(grad_delta, ref_delta, rtol=1e-12, atol=1e-12)
    # the start position is exactly out of ΔW's gradient: changing its input changes nothing there
    moved = x.detach().clone()
    moved[:, 0] += 100.0
    moved_grad = torch.autograd.grad(delta_linear(moved, weight, bias, delta, None, skip_start=True), delta, upstream)[0]
    assert torch.allclose(moved_grad, grad_delta, rtol=1e-12, atol=1e-12)
    # and without the detach (to_q, to_out in crossattn mode) it is the plain gradient
    plain = torch.autograd.grad(delta_linear(x, weight, bias, delta, None, skip_start=False), delta, upstream)[0]
    assert torch.allclose(plain, torch.einsum("blo,bli->oi", upstream, x.detach()), rtol=1e-12, atol=1e-12)


def test_fused_linear_bias_delta_keeps_the_start_position_out_too():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 4)
    weight, bias = torch.randn(3, 4), torch.randn(3)
    delta_w, delta_b = torch.zeros(3, 4, requires_grad=True), torch.zeros(3, requires_grad=True)
    upstream = torch.randn(2, 5, 3)
    out = delta_linear(x, weight, bias, delta_w, delta_b, skip_start=True)
    grad_b = torch.autograd.grad(out, delta_b, upstream)[0]
    assert torch.allclose(out, F.linear(x, weight, bias))
    assert torch.allclose(grad_b, upstream[:, 1:].sum((0, 1)))


def test_one_matmul_forward_and_two_backward_per_fused_layer():
    layer = torch.nn.Linear(16, 8, bias=False).requires_grad_(False)
    delta = torch.zeros(8, 16, requires_grad=True)
    x = torch.randn(2, 77, 16, requires_grad=True)
    detach = attach_fused_deltas({"mid.attn2.to_k": layer}, {"mid.attn2.to_k.weight": delta})
    try:
        with _OpCounter() as forward:
            out = layer(x)
        with _OpCounter() as backward:
            out.sum().backward()
    finally:
        detach()
    assert forward.matmuls == 1  # the hooks it replaces ran three (base, start row, the rest)
    assert backward.matmuls == 2  # dL/dx and dL/dΔW
    assert "forward" not in layer.__dict__  # detached: the class's own forward again
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_mixed_precision_rounds_the_trained_weight_once_as_autocast_does():
    """bf16 autocast over an fp32 base: ``W + ΔW`` is summed in fp32 and rounded once to bf16 —
    what the official code's autocast does to its fp32 trained weight — and ΔW's gradient is fp32."""
    torch.manual_seed(2)
    layer = torch.nn.Linear(32, 16, bias=False).requires_grad_(False)
    delta = (1e-3 * torch.randn(16, 32)).requires_grad_(True)
    x = torch.randn(2, 9, 32)
    detach = attach_fused_deltas({"mid.attn2.to_v": layer}, {"mid.attn2.to_v.weight": delta})
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()
    finally:
        detach()
    official = F.linear(x.bfloat16(), (layer.weight + delta.detach()).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, official)
    assert delta.grad.dtype == torch.float32


def test_forward_hooks_still_run_on_a_fused_layer():
    """Infusion's residuals are forward hooks on the same projections."""
    layer = torch.nn.Linear(4, 4, bias=False).requires_grad_(False)
    handle = layer.register_forward_hook(lambda module, inputs, output: output + 1.0)
    detach = attach_fused_deltas({"mid.attn2.to_k": layer}, {"mid.attn2.to_k.weight": torch.zeros(4, 4, requires_grad=True)})
    try:
        x = torch.randn(1, 3, 4)
        assert torch.allclose(layer(x), F.linear(x, layer.weight) + 1.0)
    finally:
        detach()
        handle.remove()


@pytest.mark.slow  # torch.compile of a training step (~17 s)
def test_the_training_step_compiles_whole_without_recompiles(tiny_base):
    """The UNet forward and backward with the trained tensors attached, as ``config.compile`` runs
    it, compile with fullgraph=True (an error at any graph break), once for 3 steps × 2 micro-batches
    while AdamW changes the deltas between them; the compiled step's losses equal the eager ones."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    config = small_config(steps=3, gradient_accumulation=2)
    losses = {}
    for compiled in (False, True):
        host = load_host(tiny_base, device="cpu")
        run = TrainingRun(host, [dog()], config, images=[make_images()])
        assert host.compile_fullgraph
        if compiled:
            torch._dynamo.reset()
            counter = CompileCounterWithBackend("aot_eager")  # dynamo + AOTAutograd's forward/backward trace
            host._forward = torch.compile(host.unet, backend=counter, fullgraph=True)
        detach = run.method.attach()
        try:
            if compiled:
                batch = run.sample_batch(0)
                context = host.encode_text(batch.prompts, run.method.token_dict()).context
                explanation = torch._dynamo.explain(host.unet)(batch.noisy, batch.timesteps,
                                                                encoder_hidden_states=context)
                assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
            records = run.read_steps([run.step(step) for step in range(3)])
        finally:
            detach()
        losses[compiled] = [r.loss for r in records]
        if compiled:
            assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
            assert counter.op_count > 0
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.slow
def test_the_compile_option_compiles_the_unet_whole_with_a_persistent_cache(tiny_base, monkeypatch, tmp_path):
    """``config.compile`` as the trainer runs it (Inductor swapped for AOTAutograd's eager backend,
    which traces the same graphs in seconds): fullgraph=True, the mode passed through, the kernel
    cache in the user's cache folder, and the same losses as without compile."""
    from classdiffusion.run.train import train

    real_compile, calls = torch.compile, []

    def compile_with_eager_backend(model, **options):
        calls.append(options)
        return real_compile(model, **{**options, "backend": "aot_eager", "mode": None})

    monkeypatch.setattr(torch, "compile", compile_with_eager_backend)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored after the test")  # records the original
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    losses = []
    for options in ({}, {"compile": True, "compile_mode": "max-autotune-no-cudagraphs"}):
        torch._dynamo.reset()
        host = load_host(tiny_base, device="cpu")
        result = train(host, [dog()], small_config(steps=2, **options), images=[make_images()])
        losses.append([h["loss"] for h in result.concept.history])
    assert calls == [{"mode": "max-autotune-no-cudagraphs", "fullgraph": True}]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "classdiffusion" / "torch-compile")
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
