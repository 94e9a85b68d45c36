"""Model families the trainer serves (SD1.x, SDXL), and how a base shows which one it is.

A family is read from the base's own shapes — the UNet's cross-attention width, its added
conditioning, the text encoders' widths — never from a file name. Everything a family changes
lives here or in its host: the text encoders and their widths, the default training resolution,
the ComfyUI embedding keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import BaseModelError


@dataclass(frozen=True)
class Family:
    """What differs between model families, as the rest of the pack needs it."""

    name: str  #: "sd15" / "sdxl": what concept files record
    label: str  #: for people
    #: Width of each text encoder's features, in the order their contexts are concatenated.
    text_widths: tuple[int, ...]
    #: The ComfyUI embedding-file key of each encoder (``comfy/sd1_clip.py::load_embed``).
    embedding_keys: tuple[str, ...]
    #: Settings whose defaults differ from SD1.5's (applied where the user did not set them).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: The UNet's input besides the text context: None (SD1.x) or "text_time" (SDXL: the pooled
    #: embedding of the last encoder plus the size and crop ids).
    added_conditioning: str | None = None
    #: The diffusers folders (tokenizer, text encoder) of each encoder, in ``text_widths``' order.
    text_folders: tuple[tuple[str, str], ...] = (("tokenizer", "text_encoder"),)
    #: Which hidden state of the text encoders is the UNet's context: -1 the last with the final
    #: layer norm (SD1.x), -2 the penultimate without it (SDXL, as it was trained).
    context_layer: int = -1
    #: The diffusers pipeline class that samples this family.
    pipeline: str = "StableDiffusionPipeline"

    @property
    def pooled(self) -> bool:
        """Whether the UNet takes the last encoder's pooled embedding (packed as the context's last row)."""
        return self.added_conditioning == "text_time"

    @property
    def extra_folders(self) -> tuple[str, ...]:
        """The diffusers folders beyond SD1.x's one tokenizer and text encoder (SDXL's bigG)."""
        return tuple(folder for pair in self.text_folders[1:] for folder in pair)

    def text_encoder(self, tokenizers: Sequence[Any], encoders: Sequence[Any], device):
        """The family's text side from transformers tokenizers and encoders (one per ``text_folders``):
        each encoder's context from ``context_layer``; several encoders side by side."""
        from .text import CombinedTextEncoder, TransformersTextEncoder

        if len(tokenizers) != len(self.text_folders) or any(t is None for t in (*tokenizers, *encoders)):
            raise BaseModelError(f"This {self.label} base lacks a tokenizer or text encoder; it needs "
                                 f"{', '.join(f for pair in self.text_folders for f in pair)}: give the whole folder.")
        if self.pooled and getattr(encoders[-1], "text_projection", None) is None:
            raise BaseModelError(f"This {self.label} base's last text encoder has no projection (its pooled "
                                 "embedding); give the whole folder.")
        options = {} if self.context_layer == -1 else {"context_layer": self.context_layer, "context_final_norm": False}
        parts = [TransformersTextEncoder(t, e, device, **options) for t, e in zip(tokenizers, encoders)]
        return parts[0] if len(parts) == 1 else CombinedTextEncoder(parts)

    def pack(self, context, pooled):
        """The conditioning as one tensor: the context [B, L, D] with the pooled embedding [B, P] as
        one more row (zero-padded to D). The loop and the methods slice, concatenate and expand a
        context along the batch without knowing the family; ``unet_inputs`` splits it again."""
        import torch

        pad = pooled.new_zeros(pooled.shape[0], context.shape[-1] - pooled.shape[-1])
        return torch.cat([context, torch.cat([pooled.to(context.dtype), pad.to(context.dtype)], -1)[:, None]], dim=1)

    def unet_inputs(self, conditioning, pooled_width: int | None = None) -> tuple[Any, Any]:
        """(context, the pooled embedding or None) from the loop's conditioning tensor: a family
        with a pooled input carries it as the last row (``pack``), ``pooled_width`` wide (default:
        the last encoder's width)."""
        if not self.pooled:
            return conditioning, None
        return conditioning[:, :-1], conditioning[:, -1, :pooled_width or self.text_widths[-1]]

    def time_ids(self, latents):
        """SDXL's size/crop conditioning for square training crops as SDXL training gives them (and
        Adobe's SDXL Custom Diffusion script): original size = target size = the picture's, crop at
        (0, 0). [B, 6] float32: (orig h, orig w, crop top, crop left, target h, target w)."""
        import torch

        height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
        row = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=latents.device)
        return row.expand(latents.shape[0], 6)

    @property
    def context_dim(self) -> int:
        """The UNet's cross-attention context width (the encoders' features side by side)."""
        return sum(self.text_widths)

    def split(self, vector):
        """One token's trained vector [..., context_dim] → one part per encoder."""
        return list(vector.split(list(self.text_widths), dim=-1))


SD15 = Family("sd15", "Stable Diffusion 1.x", (768,), ("clip_l",))
#: SDXL: CLIP-L (768) and OpenCLIP bigG (1280), both from the penultimate layer; Adobe's SDXL Custom
#: Diffusion script trains at 1024 px and otherwise uses its SD1.5 recipe, so do we.
SDXL = Family("sdxl", "Stable Diffusion XL", (768, 1280), ("clip_l", "clip_g"), {"resolution": 1024},
              added_conditioning="text_time", text_folders=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
              context_layer=-2, pipeline="StableDiffusionXLPipeline")
FAMILIES: dict[str, Family] = {f.name: f for f in (SD15, SDXL)}


def family_of_folders(folders) -> Family:
    """The family whose further encoder folders (``extra_folders``) are all among ``folders`` (the
    one with the most; SD1.x, with none, otherwise)."""
    return max((f for f in FAMILIES.values() if set(f.extra_folders) <= set(folders)),
               key=lambda f: len(f.extra_folders))


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise BaseModelError(f"Unknown model family {name!r}; this pack knows {sorted(FAMILIES)}. "
                             "Update the pack to use this concept.") from None


def detect_family(*, context_dim: int | None, in_channels: int | None, added_conditioning: str | None,
                  text_widths: tuple[int, ...], prediction: str = "epsilon", what: str = "This base model") -> Family:
    """The family of a base from its shapes; BaseModelError naming what it is when it is none we train.

    ``added_conditioning``: the UNet's extra input besides the text context (None for SD1.x,
    "text_time" for SDXL: pooled text embedding + size/crop ids)."""
    shape = (f"cross-attention context {context_dim} wide, text encoders {list(text_widths)}, "
             f"added conditioning {added_conditioning or 'none'}")
    family = next((f for f in FAMILIES.values() if f.context_dim == context_dim and f.text_widths == tuple(text_widths)
                   and added_conditioning == f.added_conditioning), None)
    if family is None:
        hint = {1024: "an SD2.x model", 1280: "an SDXL refiner (it has only the bigG encoder)"}.get(context_dim,
                                                                                                "another family")
        raise BaseModelError(
            f"{what} is not supported yet: {shape} — probably {hint}. ClassDiffusion here trains SD1.x "
            "(context 768, CLIP-L) and SDXL (context 2048, CLIP-L + bigG) base models and their fine-tunes.")
    if in_channels != 4:
        raise BaseModelError(
            f"{what} takes {in_channels} input channels, not 4: inpainting and other special UNets are not "
            f"supported; use a plain {family.label} checkpoint.")
    if prediction != "epsilon":
        raise BaseModelError(
            f"{what} predicts {prediction!r}, not noise (ε): ClassDiffusion trains ε-prediction models only.")
    return family
