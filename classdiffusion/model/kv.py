"""Cross-attention K/V deltas: creation, the base-model fingerprint, and baking into a UNet.

A concept stores *deltas* (trained weight − base weight) so that it can be applied at any
strength, stacked with other concepts, and removed again exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: Relative tolerance for comparing per-layer weight norms of two bases. Loading the same base in
#: fp16/bf16 instead of fp32 changes a norm by ~1e-5; a different fine-tune changes it by far more.
FINGERPRINT_RTOL = 1e-3


#: Name endings of the weights each train mode learns (canonical diffusers names).
TRAINED_SUFFIXES = {
    "kv": (".attn2.to_k.weight", ".attn2.to_v.weight"),
    "crossattn": (".attn2.to_k.weight", ".attn2.to_v.weight", ".attn2.to_q.weight",
                  ".attn2.to_out.0.weight", ".attn2.to_out.0.bias"),
}


def trained_names(names, train_mode: str) -> list[str]:
    """The canonical weight names a run in ``train_mode`` trains, sorted."""
    return sorted(n for n in names if n.endswith(TRAINED_SUFFIXES[train_mode]))


def cross_attention_weights(unet: nn.Module, train_mode: str, names: Mapping[str, str] | None = None
                            ) -> dict[str, torch.Tensor]:
    """Canonical name → base weight of every cross-attention (attn2) weight ``train_mode`` trains.
    ``names`` maps canonical names to the module's own parameter names (identity for diffusers)."""
    params = dict(unet.named_parameters())
    names = names if names is not None else {name: name for name in params}
    wanted = trained_names(names, train_mode)
    if not wanted:
        from ..errors import BaseModelError

        raise BaseModelError("The UNet has no cross-attention (attn2) layers it can map: it is not an SD1.5 UNet.")
    return {name: params[names[name]] for name in wanted}


def zero_deltas(base_weights: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, nn.Parameter]:
    """One trainable fp32 zero delta per base weight (fp32 master copies even for a half base)."""
    return {
        name: nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=device))
        for name, weight in base_weights.items()
    }


#: Fingerprints of base weights still alive, so applying concepts to the same loaded model again
#: does not hash its weights again: (weak references to the tensors, their versions, a sample of
#: their values, fingerprint). The sample catches changes through ``.data``, which no version counts.
_FINGERPRINTS: list[tuple[list, list[int], list, dict]] = []


def _version(tensor: torch.Tensor) -> int:
    """The in-place version counter; inference tensors (ComfyUI's weights) have none: the value
    sample alone then tells a change."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _probe(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 256)].clone()


def base_fingerprint(base_weights: Mapping[str, torch.Tensor]) -> dict:
    """Identifies the base a concept belongs to, robustly across the dtype it was loaded in.

    ``sha256`` hashes the weights rounded to fp16 (equal for an fp32 or fp16 load of one
    checkpoint); ``norms`` (per layer, float64) also match a bf16 load within FINGERPRINT_RTOL.
    Remembered for the very tensor objects at their current version (weak references: a freed
    and reallocated tensor is never mistaken for the old one; an in-place change bumps the version).
    """
    names = sorted(base_weights)
    tensors = [base_weights[name] for name in names]
    for refs, versions, probes, cached in _FINGERPRINTS:
        if (len(refs) == len(tensors) and all(ref() is t for ref, t in zip(refs, tensors))
                and versions == [_version(t) for t in tensors] and list(cached["norms"]) == names
                and all(torch.equal(probe, _probe(t)) for probe, t in zip(probes, tensors))):
            return {"sha256": cached["sha256"], "norms": dict(cached["norms"])}
    fingerprint = _compute_fingerprint(base_weights)
    try:
        refs = [weakref.ref(t) for t in tensors]
    except TypeError:  # not weak-referenceable: not cached
        return fingerprint
    _FINGERPRINTS[:] = [entry for entry in _FINGERPRINTS if all(ref() is not None for ref in entry[0])][-7:]
    _FINGERPRINTS.append((refs, [_version(t) for t in tensors], [_probe(t) for t in tensors], fingerprint))
    return {"sha256": fingerprint["sha256"], "norms": dict(fingerprint["norms"])}


def _compute_fingerprint(base_weights: Mapping[str, torch.Tensor]) -> dict:
    digest = hashlib.sha256()
    norms: dict[str, float] = {}
    for name in sorted(base_weights):
        weight = base_weights[name].detach()
        digest.update(name.encode())
        digest.update(weight.to("cpu", torch.float16).contiguous().numpy().tobytes())
        norms[name] = float(weight.to(torch.float64).norm())
    return {"sha256": digest.hexdigest(), "norms": norms}


def compare_fingerprints(expected: Mapping, actual: Mapping) -> str | None:
    """None when both describe the same base; else a sentence that says how they differ."""
    if expected.get("sha256") == actual.get("sha256"):
        return None
    exp_norms, act_norms = expected.get("norms", {}), actual.get("norms", {})
    if set(exp_norms) != set(act_norms):
        return (
            f"it has {len(exp_norms)} cross-attention weights, this base {len(act_norms)} "
            "(a different architecture)"
        )
    worst_name, worst = None, 0.0
    for name, value in exp_norms.items():
        rel = abs(value - act_norms[name]) / max(abs(value), 1e-12)
        if rel > worst:
            worst_name, worst = name, rel
    if worst <= FINGERPRINT_RTOL:
        return None
    return (
        f"its base weights differ from this model's (e.g. {worst_name}: norm differs by "
        f"{worst:.2%}); it was trained on another checkpoint"
    )


@dataclass
class BakedPatch:
    """Weights of a module changed in place, with their originals kept for an exact undo."""

    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    module: nn.Module | None = None

    def remove(self) -> None:
        if self.module is None:
            return
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, original in self.originals.items():
                params[name].data = original
        self.originals.clear()
        self.module = None


def bake_deltas(
    module: nn.Module, deltas: Mapping[str, torch.Tensor], strength: float = 1.0,
    exact: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> BakedPatch:
    """``weight ← weight + strength·delta`` (added in fp32, stored in the weight's dtype).

    ``exact`` (imported concepts): layer → (flat indices, trained values) where base + delta
    cannot reach the trained weight in float32; those elements become the trained value at
    strength 1 and ``w + strength·(value − w)`` (in float64) otherwise.
    The original tensors are kept (not copied back from arithmetic), so ``remove()`` restores
    the base bit-exactly.
    """
    params = dict(module.named_parameters())
    missing = [name for name in deltas if name not in params]
    if missing:
        raise KeyError(f"the model has no weights {missing[:3]}")
    patch = BakedPatch(module=module)
    with torch.no_grad():
        for name, delta in deltas.items():
            param = params[name]
            if tuple(param.shape) != tuple(delta.shape):
                raise ValueError(f"{name}: shape {tuple(delta.shape)} ≠ model {tuple(param.shape)}")
            patch.originals[name] = param.data
            patched = param.data.float() + strength * delta.to(param.device, torch.float32)
            if exact and name in exact:
                index, values = (t.to(param.device) for t in exact[name])
                if strength == 1.0:
                    target = values.float()
                else:
                    original = param.data.reshape(-1)[index].double()
                    target = (original + strength * (values.double() - original)).float()
                patched.view(-1)[index] = target
            param.data = patched.to(param.dtype)
    return patch


#: Layers whose start-of-text position gets no gradient (diffusers' Custom Diffusion processors,
#: which the official code trains through, detach the key and value of the first context token).
START_TOKEN_DETACHED = (".attn2.to_k", ".attn2.to_v")

#: How a host reads a Linear's weight and bias for an input: a context manager yielding
#: ``(weight, bias)`` in the input's dtype and on its device (ComfyUI: its own casting and
#: offloading, ``comfy.ops``). None: the module's own tensors, cast here.
WeightReader = Callable[[nn.Module, torch.Tensor], "contextlib.AbstractContextManager[tuple]"]


class StartDetachedLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose weight and bias gradients leave sequence position 0
    out, while the input's gradient takes every position: one matmul forward, two backward.

    This is the start-of-text detach of diffusers' ``CustomDiffusionAttnProcessor``
    (``key = m·key + (1−m)·key.detach()``, m = 0 at position 0) for a trained weight ``W + ΔW``:
    the frozen ``W`` gets no gradient anyway, so leaving position 0 out of the whole weight's
    gradient leaves it out of ΔW's, without a second, sliced matmul per layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        later = grad[:, 1:]
        if ctx.needs_input_grad[1]:
            grad_weight = later.reshape(-1, later.shape[-1]).T @ x[:, 1:].reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = later.sum((0, 1))
        return grad_x, grad_weight, grad_bias


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear computes in for input ``x``: autocast's where it is on, else x's."""
    device_type = x.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta: the memory planner
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 delta_weight: torch.Tensor | None, delta_bias: torch.Tensor | None, *,
                 skip_start: bool) -> torch.Tensor:
    """``x·(W + ΔW)ᵀ + (b + Δb)`` in one matmul, in the dtype the Linear computes in.

    ``W + ΔW`` is added in fp32 and rounded once to the compute dtype: with mixed precision this
    is what the official code's autocast does to its fp32 trained weight. ``skip_start``: no
    weight gradient from sequence position 0 (:class:`StartDetachedLinear`)."""
    dtype = compute_dtype(x)
    if delta_weight is not None:
        weight = (weight + delta_weight).to(dtype)  # promotes a half weight to fp32 for the sum
    else:
        weight = weight.to(dtype)
    if delta_bias is not None:
        bias = delta_bias.to(dtype) if bias is None else (bias + delta_bias).to(dtype)
    elif bias is not None:
        bias = bias.to(dtype)
    x = x.to(dtype)
    if skip_start and x.ndim == 3 and x.shape[1] > 1:
        return StartDetachedLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def attach_fused_deltas(
    modules: Mapping[str, nn.Module], deltas: Mapping[str, torch.Tensor], *,
    detach_start_token: bool = True, read_weights: WeightReader | None = None,
) -> Callable[[], None]:
    """Make each named Linear compute ``x·(W + ΔW)ᵀ (+ b + Δb)`` in one matmul
    (:func:`delta_linear`) by giving the module instance its own ``forward``. The frozen weight is
    untouched (no copy kept between steps), the deltas get gradients, and the returned function
    restores the module's own forward (forward hooks, e.g. Infusion's residuals, still run).

    ``detach_start_token``: for the cross-attention key/value projections, the first context
    position (the start-of-text token) contributes its value but no gradient, exactly as diffusers'
    ``CustomDiffusionAttnProcessor`` does. ``modules`` maps the canonical layer name (``…attn2.to_k``)
    to the host's module; ``read_weights``: how the host reads a module's weight for an input
    (ComfyUI's casting and offloading), default the module's own weight and bias.
    """
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, delta in deltas.items():
        module_name, _, kind = name.rpartition(".")
        if module_name not in modules:
            raise KeyError(f"the UNet has no layer {module_name!r}")
        per_module.setdefault(module_name, {})[kind] = delta
    restore = []
    for module_name, parts in per_module.items():
        module = modules[module_name]
        skip_start = detach_start_token and module_name.endswith(START_TOKEN_DETACHED)
        forward = _fused_forward(module, parts.get("weight"), parts.get("bias"), skip_start, read_weights)
        restore.append((module, module.__dict__.get("forward")))
        module.forward = forward
    return _restorer(restore)


def _fused_forward(module: nn.Module, delta_weight, delta_bias, skip_start: bool,
                   read_weights: WeightReader | None) -> Callable:
    if read_weights is None:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return delta_linear(x, module.weight, module.bias, delta_weight, delta_bias, skip_start=skip_start)
    else:
        def forward(x: torch.Tensor) -> torch.Tensor:
            with read_weights(module, x) as (weight, bias):
                return delta_linear(x, weight, bias, delta_weight, delta_bias, skip_start=skip_start)
    return forward


def _restorer(restore: list) -> Callable[[], None]:
    """Puts back each module's own forward (an instance attribute it had, or the class's)."""

    def detach() -> None:
        for module, previous in restore:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        restore.clear()

    return detach


def remover(handles: list) -> Callable[[], None]:
    """The detach function of a set of forward hooks: removes them all."""

    def detach() -> None:
        for handle in handles:
            handle.remove()

    return detach


def low_rank_factors(delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a weight delta, as Custom Diffusion compresses its updates (its §3,
    "compression"): ``delta ≈ up @ down`` with ``up = U_r·S_r`` [out, r] and ``down = V_rᵀ`` [r, in].

    ``rank`` keeps a fixed number of singular values; ``energy`` (0–1] keeps the fewest whose
    squared sum reaches that share of the total (1.0 = exact up to float error).
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    if delta.ndim != 2:
        raise ValueError("only 2-D weights are factorised")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if rank is not None:
        if rank < 1:
            raise ValueError("rank must be at least 1")
        r = min(int(rank), s.numel())
    else:
        if not 0 < energy <= 1:
            raise ValueError("energy must be in (0, 1]")
        total = float((s ** 2).sum())
        if total == 0.0:
            r = 1
        else:
            share = torch.cumsum(s ** 2, 0) / total
            r = min(int((share < energy - 1e-12).sum()) + 1, s.numel())
    return (u[:, :r] * s[:r]).float().contiguous(), vh[:r].float().contiguous()


def compress_deltas(deltas: Mapping[str, torch.Tensor], *, rank: int | None = None,
                    energy: float | None = None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict]]:
    """Factorise every 2-D delta; returns (factors, per-layer {"rank", "relative_error"}) where the
    relative error is ‖delta − up·down‖_F / ‖delta‖_F. 1-D deltas (biases) stay dense, and so does
    a layer whose factors would not be smaller than the delta itself."""
    factors, stats = {}, {}
    for name, delta in deltas.items():
        if delta.ndim != 2:
            continue
        up, down = low_rank_factors(delta, rank=rank, energy=energy)
        if up.numel() + down.numel() >= delta.numel():
            stats[name] = {"rank": min(delta.shape), "relative_error": 0.0, "dense": True}
            continue
        norm = float(delta.double().norm())
        error = float((delta.double() - up.double() @ down.double()).norm())
        factors[name] = (up, down)
        stats[name] = {"rank": int(up.shape[1]), "relative_error": error / norm if norm > 0 else 0.0}
    return factors, stats
