"""Pure helpers of the node pack that need neither ComfyUI nor a model (unit-tested in CI)."""

from __future__ import annotations

import re
from typing import Mapping

import torch

#: ComfyUI's model_management names for the UNet weights inside a MODEL.
UNET_PREFIX = "diffusion_model."
#: Marker that stands for a concept token in a rewritten prompt ("embedding:<marker><i>").
TOKEN_MARKER = "classdiffusion_token_"


def token_pattern(token: str) -> re.Pattern:
    """Matches the token as a whole word ("<sks>" in "a <sks> dog", not in "x<sks>y")."""
    return re.compile(r"(?<![\w<>-])" + re.escape(token) + r"(?![\w<>-])")


def rewrite_prompt(text: str, tokens: list[str], marker_offset: int = 0) -> str:
    """Replace each concept token by ComfyUI's embedding syntax with a private marker name, so
    the tokenizer inserts the learned vector where the token stands (weights syntax still works)."""
    for i, token in enumerate(tokens):
        text = token_pattern(token).sub(f" embedding:{TOKEN_MARKER}{marker_offset + i} ", text)
    return text


def diff_file_tensors(deltas: Mapping[str, torch.Tensor], diffusers_to_comfy: Mapping[str, str],
                      strength: float = 1.0) -> dict[str, torch.Tensor]:
    """K/V deltas as a ComfyUI LoRA-style file: ``diffusion_model.<layer>.diff`` tensors, which the
    stock LoraLoader / LoraLoaderModelOnly load as weight differences."""
    out = {}
    for name, delta in deltas.items():
        comfy_key = diffusers_to_comfy[name]
        if not comfy_key.endswith((".weight", ".bias")):
            raise KeyError(f"unexpected UNet key {comfy_key}")
        stem, kind = comfy_key.rsplit(".", 1)
        suffix = "diff" if kind == "weight" else "diff_b"
        out[f"{UNET_PREFIX}{stem}.{suffix}"] = (strength * delta.float()).contiguous()
    return out


def sanitize_name(name: str) -> str:
    """A safe file stem for models/classdiffusion and models/embeddings."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    if not stem:
        raise ValueError("The save name is empty: give a name such as 'my_dog'.")
    return stem[:100]


def training_precision(choice: str, device_type: str, unet_dtype: torch.dtype, bf16_supported: bool) -> str:
    """The Train node's mixed precision. "auto" computes in the dtype ComfyUI loaded the UNet in
    (fp16 on most GPUs): autocasting an fp16 UNet to bf16 would convert every weight each step and
    keep the bf16 copies for the backward pass, about 1.6 GB more for SD1.5."""
    if choice != "auto":
        return choice
    if device_type != "cuda":
        return "no"
    if unet_dtype == torch.float16:
        return "fp16"
    if unet_dtype == torch.bfloat16:
        return "bf16"
    return "bf16" if bf16_supported else "fp16"
