"""Infusion's value residuals: one vector per cross-attention projection, added to the projection's
output only at the token positions of the concept word.

``h = W·c`` everywhere, ``h[b, p] = W·c[b, p] + r`` where token ``p`` of row ``b`` belongs to the
concept word (Infusion's ``ROELinear``). A prompt without the word therefore gets exactly the
base model's output. Two ways to know the positions:

* training sets them per batch (:class:`ResidualPositions`), since the loop knows its prompts;
* at sampling time the UNet sees only the text features, so the positions are looked up in what
  the text encoder recorded (``model.prompt_record``): a row nobody registered (an empty negative
  prompt, a conditioning another node computed) gets no residual.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ...model.prompt_record import OutputPatch, RegistryPositions, patch_outputs

#: Name ending of the projections Infusion changes, per residual target.
RESIDUAL_SUFFIXES = {"v": (".attn2.to_v",), "kv": (".attn2.to_k", ".attn2.to_v")}


def residual_modules(weight_names: Sequence[str], target: str) -> list[str]:
    """Canonical module names (``…attn2.to_v``) of the projections a target trains, sorted."""
    suffixes = RESIDUAL_SUFFIXES[target]
    modules = {name.rsplit(".", 1)[0] for name in weight_names}
    return sorted(m for m in modules if m.endswith(suffixes))


def zero_residuals(base_weights: Mapping[str, torch.Tensor], target: str, device) -> dict[str, nn.Parameter]:
    """One fp32 zero vector of each projection's output width (as Infusion initialises them)."""
    return {module: nn.Parameter(torch.zeros(base_weights[f"{module}.weight"].shape[0], dtype=torch.float32,
                                             device=device))
            for module in residual_modules(list(base_weights), target)}


class ResidualPositions:
    """Where the residuals go in the next UNet call (training: set by the loop per batch)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None  #: bool [B, T], or None = nowhere
        #: while set (validation sampling), positions are looked up by content instead
        self.lookup: RegistryPositions | None = None

    def for_context(self, context: torch.Tensor) -> torch.Tensor | None:
        if self.lookup is not None:
            return self.lookup.for_context(context)
        return self.mask


def add_residual(output: torch.Tensor, mask: torch.Tensor | None, residual: torch.Tensor,
                 strength: float = 1.0) -> torch.Tensor:
    """``output`` with ``strength·residual`` added at ``mask``; rows/positions outside the mask are
    returned bit-identical (where, not a multiply-add), and gradients reach the residual."""
    if mask is None:
        return output
    if mask.shape != output.shape[:2]:
        raise ValueError(f"residual positions {tuple(mask.shape)} do not fit the output {tuple(output.shape)}")
    added = output + (strength * residual).to(output.dtype)
    return torch.where(mask[..., None].to(output.device), added, output)


def residual_patch(residual: torch.Tensor, positions, strength: float = 1.0) -> OutputPatch:
    """The output patch adding ``strength × residual`` where ``positions.for_context(context)``
    (bool [B, T] or None) says."""
    return lambda output, context: add_residual(output, positions.for_context(context), residual.to(output.device),
                                                strength)


def attach_residuals_with_hooks(modules: Mapping[str, nn.Module], residuals: Mapping[str, torch.Tensor],
                                positions, strength: float = 1.0) -> Callable[[], None]:
    """Forward hooks on the named projections adding their residual where ``positions`` says
    (``positions.for_context(context)`` → bool [B, T] or None). Returns the detach function."""
    return patch_outputs(modules, [(name, residual_patch(residual, positions, strength))
                                   for name, residual in residuals.items()])
