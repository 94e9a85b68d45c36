"""Model families the trainer serves (SD1.x, SDXL), and how a base shows which one it is.

A family is read from the base's own shapes — the UNet's cross-attention width, its added
conditioning, the text encoders' widths — never from a file name. Everything a family changes
lives here or in its host: the text encoders and their widths, the default training resolution,
the ComfyUI embedding keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import BaseModelError


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
SDXL = Family("sdxl", "Stable Diffusion XL", (768, 1280), ("clip_l", "clip_g"), {"resolution": 1024})
FAMILIES: dict[str, Family] = {f.name: f for f in (SD15, SDXL)}


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
                   and (added_conditioning == "text_time") == (f is SDXL)), None)
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
