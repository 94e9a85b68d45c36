"""The loss terms of ClassDiffusion: masked ε-MSE, semantic preservation loss, prior preservation."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official reconstruction loss: ``((l·m).sum([1,2,3]) / m.sum([1,2,3])).mean()`` with a
    ONE-channel mask [B, 1, h, w].

    So the squared error is summed over the 4 latent channels and divided by the number of mask
    *cells*: 4× the per-element mean. This is what the official ClassDiffusion code and diffusers'
    Custom Diffusion example compute, and what the paper's λ = 1 is balanced against.
    """
    if mask.shape[1] != 1:
        raise ValueError(f"the loss mask must have one channel, got shape {tuple(mask.shape)}")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    mask = mask.to(loss.dtype)
    return ((loss * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1.0)).mean()


def prior_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official prior-preservation loss on class images: a plain per-element mean (no mask,
    so the image term outweighs it 4:1 at equal weight, as in the official code)."""
    return F.mse_loss(pred.float(), target.float())


def output_preservation_mse(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Output preservation (kohya-ss/sd-scripts #1710's Differential Output Preservation): the
    plain per-element mean of (ε_tuned − ε_base)² on the class prompt, the frozen base's prediction
    as the target; kohya-ss replaces a regularization sample's target with it, so its reduction is
    that sample's MSE."""
    return F.mse_loss(tuned.float(), base.detach().float())


def eos_cosine(token_eos: torch.Tensor, class_eos: torch.Tensor) -> torch.Tensor:
    """cos(E(P_tp), E(P_cp)) per row, in float32."""
    return F.cosine_similarity(token_eos.float(), class_eos.float(), dim=-1)


def encoder_cosine(token_eos: torch.Tensor, class_eos: torch.Tensor, widths: Sequence[int] | None = None,
                   combine: str = "concat") -> torch.Tensor:
    """cos per row of features that may hold several text encoders' parts side by side (``widths``):
    ``combine="mean"`` averages each encoder's cosine, ``"concat"`` takes the cosine of the whole."""
    if not widths or len(widths) == 1 or combine == "concat":
        return eos_cosine(token_eos, class_eos)
    if combine != "mean":
        raise ValueError(f"combine must be 'mean' or 'concat', got {combine!r}")
    parts = zip(token_eos.split(list(widths), -1), class_eos.split(list(widths), -1))
    return torch.stack([eos_cosine(t, c) for t, c in parts]).mean(0)


def semantic_preservation_loss(
    token_eos: Sequence[torch.Tensor], class_eos: Sequence[torch.Tensor], *,
    widths: Sequence[int] | None = None, combine: str = "concat",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """L_spl = mean over concepts of mean over phrases of (1 − cos(E(P_tp), E(P_cp))).

    ``token_eos[k]`` / ``class_eos[k]`` are [P, D] EOS features of concept k's training phrases
    ("a photo of a <sks> dog") and class phrases ("a photo of a dog"). The paper writes sums;
    the official code averages over the batch and then over concepts, which is what this does.
    With two text encoders (SDXL; ``widths`` says where each one's features lie), ``combine``
    says how they join (:func:`encoder_cosine`): for "mean", 1 − mean(cos) = mean(1 − cos).
    Returns the loss and each concept's mean cosine (for logging).
    """
    if len(token_eos) != len(class_eos) or not token_eos:
        raise ValueError("SPL needs one (token, class) feature pair per concept")
    cosines = [encoder_cosine(t, c, widths, combine).mean() for t, c in zip(token_eos, class_eos)]
    loss = torch.stack([1.0 - cos for cos in cosines]).mean()
    return loss, cosines


def subject_masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Infusion's reconstruction loss (its ``p_losses``): prediction and target both multiplied
    by the soft subject mask [B, 1, h, w], then the plain mean over every element — so a cell of
    mask m weighs m², and the loss is not renormalised by the mask's area."""
    if mask.shape[1] != 1:
        raise ValueError(f"the loss mask must have one channel, got shape {tuple(mask.shape)}")
    mask = mask.float()
    return F.mse_loss(pred.float() * mask, target.float() * mask)
