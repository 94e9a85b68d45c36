"""What training may and may not change, and what it must achieve at small scale."""

from __future__ import annotations

import os

import pytest

import torch

from classdiffusion.config import ConceptSpec
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.model.losses import semantic_preservation_loss
from classdiffusion.run.train import TrainingRun, train

from helpers import dog, make_images, small_config


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def test_only_deltas_and_token_rows_change(host):
    before = {name: _snapshot(m) for name, m in (("unet", host.unet), ("text", host.text_encoder), ("vae", host.vae))}
    vocab_before = dict(host.tokenizer.get_vocab())
    result = train(host, [dog()], small_config(steps=3, learning_rate=1e-3, scale_lr=False), images=[make_images()])

    for name, module in (("unet", host.unet), ("text", host.text_encoder), ("vae", host.vae)):
        after = _snapshot(module)
        assert after.keys() == before[name].keys()
        for key, value in after.items():
            assert torch.equal(value, before[name][key]), f"{name}.{key} changed"
    # the tokenizer's existing words keep their ids; only the new token was added
    vocab_after = host.tokenizer.get_vocab()
    assert {k: vocab_after[k] for k in vocab_before} == vocab_before
    assert set(vocab_after) - set(vocab_before) == {"<sks>"}
    # and the trained things did move
    assert all(d.abs().sum() > 0 for d in result.concept.deltas.values())
    init = host.word_embedding("ktn")
    assert not torch.equal(result.concept.token_vectors[0], init)


def test_gradients_reach_only_trained_parameters(host):
    run = TrainingRun(host, [dog()], small_config(), [make_images()], None)
    detach = host.attach_deltas(run.method.deltas)
    try:
        frozen = [p for m in (host.unet, host.text_encoder, host.vae) for p in m.parameters()]
        assert not any(p.requires_grad for p in frozen)
        # one step's backward, without the optimizer step: inspect the gradients it leaves
        run.optimizer.step = lambda *a, **k: None
        run.optimizer.zero_grad = lambda *a, **k: None
        run.step(0)
        assert all(p.grad is None for p in frozen)
        assert run.method.token_vectors.grad is not None and run.method.token_vectors.grad.abs().sum() > 0
        assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in run.method.deltas.values())
    finally:
        detach()


def test_kv_mode_trains_exactly_the_attn2_to_k_to_v_weights(host):
    run = TrainingRun(host, [dog()], small_config(), [make_images()], None)
    names = sorted(run.method.deltas)
    assert names and all(n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for n in names)
    attn2_linears = [n for n, _ in host.unet.named_modules() if n.endswith((".attn2.to_k", ".attn2.to_v"))]
    assert len(names) == len(attn2_linears)


def test_crossattn_mode_trains_all_attn2_weights(host):
    run = TrainingRun(host, [dog()], small_config(train_mode="crossattn"), [make_images()], None)
    kinds = {n.split("attn2.")[1] for n in run.method.deltas}
    assert kinds == {"to_k.weight", "to_v.weight", "to_q.weight", "to_out.0.weight", "to_out.0.bias"}
    result = train(host, [dog()], small_config(steps=2, train_mode="crossattn"), images=[make_images()])
    assert result.concept.meta.train_mode == "crossattn"


def test_spl_weight_keeps_the_token_phrase_close_to_the_class_phrase(tiny_base):
    """The paper's claim at small scale: with λ=1 the EOS cosine between "a photo of a <sks> dog"
    and "a photo of a dog" ends measurably higher than with λ=0 (same seed, same steps)."""
    finals = {}
    for weight in (0.0, 1.0):
        host = load_host(tiny_base, device="cpu")
        config = small_config(steps=25, learning_rate=3e-3, scale_lr=False, spl_weight=weight, seed=3)
        result = train(host, [dog()], config, images=[make_images()])
        finals[weight] = result.concept.meta.eos_cosine_final[0]
        initial = result.concept.meta.eos_cosine_initial[0]
    assert finals[1.0] > finals[0.0] + 0.01, finals
    assert finals[1.0] > initial  # SPL pulls towards the class phrase
    assert finals[0.0] < initial  # without it, reconstruction alone drifts the token away


def test_multi_concept_trains_jointly(host):
    concepts = [dog(), ConceptSpec(token="<ktn2>", class_word="cat", initializer="class")]
    result = train(host, concepts, small_config(steps=3), images=[make_images(3, seed=1), make_images(3, seed=2)])
    concept = result.concept
    assert concept.tokens == ["<sks>", "<ktn2>"] and concept.class_words == ["dog", "cat"]
    assert concept.token_vectors.shape == (2, 768)
    record = concept.history[-1]
    assert len(record["cos"]) == 2
    # the SPL logged is the mean over concepts of (1 - cos)
    assert abs(record["spl"] - sum(1 - c for c in record["cos"]) / 2) < 1e-6


def test_prior_preservation_combines_with_spl(host):
    config = small_config(steps=2, spl_weight=1.0, prior_weight=0.5)
    result = train(host, [dog()], config, images=[make_images()], class_images=[make_images(2, seed=9)])
    record = result.concept.history[-1]
    assert "prior" in record and record["spl"] > 0
    expected = record["recon"] + 1.0 * record["spl"] + 0.5 * record["prior"]
    assert abs(record["loss"] - expected) < 1e-5
    # the official --scale_lr doubles the rate with prior preservation
    assert result.concept.meta.extra["effective_learning_rate"] == config.learning_rate * 2 * 2


@pytest.mark.parametrize("precision, frozen_dtype", [
    ("bf16", torch.float32),  # autocast over fp32 models
    ("bf16", torch.bfloat16), ("fp16", torch.float16),  # half-precision models, as the CLI loads them
])
def test_mixed_precision_keeps_fp32_master_weights(tiny_base, precision, frozen_dtype):
    host = load_host(tiny_base, device="cpu", dtype=frozen_dtype)
    before = {name: w.detach().clone() for name, w in host.cross_attention_weights("kv").items()}
    result = train(host, [dog()], small_config(steps=2, mixed_precision=precision), images=[make_images()])
    assert all(d.dtype == torch.float32 and d.abs().sum() > 0 for d in result.concept.deltas.values())
    assert result.concept.token_vectors.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.concept.history)
    after = host.cross_attention_weights("kv")
    assert all(after[name].dtype == frozen_dtype and torch.equal(after[name], w) for name, w in before.items())


def test_gradient_checkpointing_and_eager_attention_give_the_same_losses(tiny_base):
    losses = []
    for options in ({}, {"gradient_checkpointing": True, "attention": "eager"}, {"channels_last": True}):
        host = load_host(tiny_base, device="cpu")
        result = train(host, [dog()], small_config(steps=2, **options), images=[make_images()])
        losses.append([h["loss"] for h in result.concept.history])
    for other in losses[1:]:
        assert torch.allclose(torch.tensor(losses[0]), torch.tensor(other), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("CLASSDIFFUSION_SLOW"), reason="torch.compile takes minutes on CPU; set CLASSDIFFUSION_SLOW=1")
def test_compiled_unet_gives_the_same_losses(tiny_base):
    losses = []
    for options in ({}, {"compile": True}):
        host = load_host(tiny_base, device="cpu")
        result = train(host, [dog()], small_config(steps=2, **options), images=[make_images()])
        losses.append([h["loss"] for h in result.concept.history])
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    # Adam's first update is ~lr·sign(g): fused kernels' last-bit gradient differences flip a few
    # signs, so the second loss agrees to ~1e-3, not to the last bit.
    assert losses[0][1] == pytest.approx(losses[1][1], rel=1e-3)


def test_same_seed_same_result(tiny_base):
    results = []
    for _ in range(2):
        host = load_host(tiny_base, device="cpu")
        results.append(train(host, [dog()], small_config(steps=3), images=[make_images()]).concept)
    assert torch.equal(results[0].token_vectors, results[1].token_vectors)
    for name in results[0].deltas:
        assert torch.equal(results[0].deltas[name], results[1].deltas[name])


def test_spl_reduction_matches_the_official_code():
    torch.manual_seed(0)
    a = [torch.randn(3, 8), torch.randn(1, 8)]
    b = [torch.randn(3, 8), torch.randn(1, 8)]
    loss, cos = semantic_preservation_loss(a, b)
    per_concept = []
    for x, y in zip(a, b):
        rows = [1 - (x[i] @ y[i]) / (x[i].norm() * y[i].norm()) for i in range(len(x))]
        per_concept.append(sum(rows) / len(rows))
    assert torch.allclose(loss, sum(per_concept) / 2, atol=1e-6)
    assert torch.allclose(cos[0], 1 - per_concept[0], atol=1e-6)
