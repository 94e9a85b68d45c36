"""Training images → latents, encoded once, and the per-step augmented batch.

The official code re-encodes every image every step after a random resize (1/3..1 of the
resolution on a gray canvas with p=0.66, else 1.2..1.4× and a random crop) and a random flip.
Here every image is VAE-encoded once per (scale bin, flip) variant, keeping the distribution's
mean and std, so each step can still draw a fresh latent sample. Placement happens in latent
space: a shrunk image's latent is pasted at a random whole-cell offset into the encoded gray
canvas, a zoomed one is cropped at a random offset. The loss mask keeps one latent cell of margin
inside the pasted region (as the official mask does), which is where pasting and encoding the
composite could differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import ConceptSpec, TrainConfig
from ..errors import InvalidInputError

logger = logging.getLogger("classdiffusion")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
SMALL_PREFIXES = ("a far away ", "very small ")
ZOOM_PREFIXES = ("zoomed in ", "close up ")
SHRINK_PROBABILITY = 0.66
LATENT_FACTOR = 8


def list_image_files(sources: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (non-recursively, sorted) in folders."""
    files: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.exists():
            files.append(source)
        else:
            raise InvalidInputError(f"The image path {source} does not exist.")
    return files


def load_images(sources: Sequence[str | Path], what: str = "training") -> list[Image.Image]:
    """RGB images from files/folders; unreadable files are a clear error, not a silent skip."""
    files = list_image_files(sources)
    if not files:
        where = ", ".join(str(s) for s in sources) or "(nothing given)"
        raise InvalidInputError(
            f"No {what} images found in {where}. Put 3–20 .png/.jpg images of the concept there."
        )
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                images.append(img.convert("RGB"))
        except Image.DecompressionBombError:
            raise InvalidInputError(
                f"The {what} image {path} claims more than {Image.MAX_IMAGE_PIXELS:,} pixels (a decompression "
                "bomb, or a huge scan); resize it to a few megapixels."
            ) from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidInputError(
                f"The {what} image {path} cannot be read ({exc}). Remove it or re-save it as PNG/JPEG."
            ) from None
        check_image_size(images[-1], what, path)
    return images


#: Smallest side an image may have, on every path (CLI files and ComfyUI IMAGE batches).
MIN_IMAGE_SIDE = 8


def check_image_size(image: Image.Image, what: str, source: str | Path | None = None) -> None:
    if min(image.size) < MIN_IMAGE_SIDE:
        name = f" {source}" if source is not None else ""
        raise InvalidInputError(
            f"The {what} image{name} is only {image.size[0]}×{image.size[1]} pixels; each side needs at "
            f"least {MIN_IMAGE_SIDE} (use real photos, ideally 512 px or more)."
        )


def as_pil_images(images: Sequence[Image.Image | torch.Tensor | np.ndarray], what: str = "training") -> list[Image.Image]:
    """Accepts PIL images, or [H, W, 3] / [B, H, W, 3] float tensors in 0..1 (ComfyUI's IMAGE)."""
    out: list[Image.Image] = []
    for item in images:
        if isinstance(item, Image.Image):
            out.append(item.convert("RGB"))
            continue
        array = item.detach().cpu().float().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
        batch = array if array.ndim == 4 else array[None]
        for frame in batch:
            if frame.ndim != 3 or frame.shape[-1] not in (3, 4):
                raise InvalidInputError(f"A {what} image has shape {frame.shape}; expected H×W×3.")
            out.append(Image.fromarray((np.clip(frame[..., :3], 0, 1) * 255).round().astype(np.uint8)))
    if not out:
        raise InvalidInputError(f"The {what} image batch is empty: give at least one image of the concept.")
    for img in out:
        check_image_size(img, what)
    return out


def _open_mask(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                return img.convert("RGBA").getchannel("A")
            return img.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(f"The mask {path} cannot be read ({exc}); save it as a grayscale PNG.") from None


def _alpha(image: Image.Image) -> Image.Image | None:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        return alpha if alpha.getextrema()[0] < 255 else None  # fully opaque: no mask
    return None


def load_masks_for(image_sources: Sequence[str | Path], mask_sources: Sequence[str | Path] = ()
                   ) -> list[Image.Image | None]:
    """One subject mask per training image (white = subject): from ``mask_sources`` matched by
    file name (stem), else ``<image folder>/mask/<same name>`` (Infusion's layout), else the
    image's alpha channel, else None (no mask: the whole image counts)."""
    files = list_image_files(image_sources)
    given: dict[str, Path] = {}
    if mask_sources:
        given = {p.stem: p for p in list_image_files(mask_sources)}
        missing = [f.name for f in files if f.stem not in given]
        if missing:
            raise InvalidInputError(f"No mask for {missing[:3]} among {len(given)} mask files; name each mask "
                                    "like its image (dog1.jpg → dog1.png).")
    masks: list[Image.Image | None] = []
    for path in files:
        if path.stem in given:
            masks.append(_open_mask(given[path.stem]))
            continue
        beside = [p for p in (path.parent / "mask").glob(f"{path.stem}.*") if p.suffix.lower() in IMAGE_SUFFIXES] \
            if (path.parent / "mask").is_dir() else []
        if beside:
            masks.append(_open_mask(sorted(beside)[0]))
            continue
        with Image.open(path) as img:
            masks.append(_alpha(ImageOps.exif_transpose(img)))
    return masks


def alpha_masks(images: Sequence) -> list[Image.Image | None]:
    """The alpha channel of each PIL image (None where opaque); tensors (ComfyUI IMAGE) have none."""
    out: list[Image.Image | None] = []
    for item in images:
        if isinstance(item, Image.Image):
            out.append(_alpha(item))
        else:
            shape = tuple(item.shape)
            out += [None] * (shape[0] if len(shape) == 4 else 1)
    return out


def as_pil_masks(masks) -> list[Image.Image]:
    """ComfyUI MASK ([B, H, W] or [H, W] floats in 0..1, 1 = subject) or PIL images → PIL "L"."""
    out: list[Image.Image] = []
    items = [masks] if isinstance(masks, torch.Tensor) else list(masks)
    for item in items:
        if isinstance(item, Image.Image):
            out.append(item.convert("L"))
            continue
        array = item.detach().cpu().float().numpy() if isinstance(item, torch.Tensor) else np.asarray(item, np.float32)
        batch = array if array.ndim == 3 else array[None]
        if batch.ndim != 3:
            raise InvalidInputError(f"A mask has shape {array.shape}; expected H×W or B×H×W.")
        for frame in batch:
            out.append(Image.fromarray((np.clip(frame, 0, 1) * 255).round().astype(np.uint8), mode="L"))
    return out


def mask_to_latent(mask: Image.Image, image_size: tuple[int, int], size: int, flip: bool) -> torch.Tensor:
    """A subject mask placed like its image (center square, resize, flip), normalised to max 1 as
    Infusion does, then bilinear to latent cells: [1, size/8, size/8]."""
    import torch.nn.functional as F

    if mask.size != image_size:
        mask = mask.resize(image_size, resample=Image.BILINEAR)
    mask = center_square(mask).resize((size, size), resample=Image.BILINEAR)
    if flip:
        mask = ImageOps.mirror(mask)
    array = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    peak = float(array.max())
    array = array / peak if peak > 0 else torch.ones_like(array)
    cells = size // LATENT_FACTOR
    return F.interpolate(array, size=(cells, cells), mode="bilinear")[0]


def center_square(image: Image.Image) -> Image.Image:
    """Center crop to a square (the official code squashes non-square images instead)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def to_pixels(image: Image.Image, size: int, flip: bool = False) -> torch.Tensor:
    """[3, size, size] in [-1, 1], bilinear like the official code."""
    image = center_square(image).resize((size, size), resample=Image.BILINEAR)
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def scale_bins(config: TrainConfig) -> tuple[list[int], list[int]]:
    """Shrink and zoom sizes in pixels, multiples of the latent factor, spanning the official ranges."""
    res = config.resolution
    if not config.augment:
        return [res], []

    def snap(values: np.ndarray) -> list[int]:
        snapped = sorted({max(LATENT_FACTOR * 3, int(round(v / LATENT_FACTOR)) * LATENT_FACTOR) for v in values})
        return snapped

    shrink = snap(np.linspace(res / 3, res, config.shrink_scales)) if config.shrink_scales > 1 else [res]
    zoom = snap(np.linspace(1.2 * res, 1.4 * res, config.zoom_scales)) if config.zoom_scales else []
    zoom = [z for z in zoom if z > res]
    return shrink, zoom


class LatentBank:
    """Latent mean/std for every (image, flip, size) variant, computed once on the host."""

    def __init__(self, host, images: Sequence[Image.Image], concept_of_image: Sequence[int],
                 config: TrainConfig, encode_pixels: int = 2 * 512 * 512,
                 subject_masks: Sequence[Image.Image | None] | None = None):
        """``encode_pixels`` bounds each VAE batch (images × side²): the encoder's activations take
        about 320 MiB per 512² image in bf16, so 8 zoomed 716² variants at once would need 5 GiB.
        ``subject_masks`` (one per image or None) multiply the loss mask of each placement."""
        self.resolution = config.resolution
        self.latent_size = config.resolution // LATENT_FACTOR
        self.shrink, self.zoom = scale_bins(config)
        self.flips = (False, True) if config.hflip else (False,)
        self.concept_of_image = list(concept_of_image)
        self.variants: dict[tuple[int, bool, int], tuple[torch.Tensor, torch.Tensor]] = {}
        sizes = self.shrink + self.zoom
        for size in sizes:
            jobs = [(i, flip) for i in range(len(images)) for flip in self.flips]
            per_batch = max(1, encode_pixels // (size * size))
            for start in range(0, len(jobs), per_batch):
                chunk = jobs[start:start + per_batch]
                pixels = torch.stack([to_pixels(images[i], size, flip) for i, flip in chunk])
                mean, std = host.encode_images(pixels)
                for (i, flip), m, s in zip(chunk, mean, std):
                    self.variants[(i, flip, size)] = (m, s)
        self.subject: dict[tuple[int, bool, int], torch.Tensor] = {}
        if subject_masks is not None:
            if len(subject_masks) != len(images):
                raise InvalidInputError(f"{len(subject_masks)} subject masks for {len(images)} images.")
            for i, mask in enumerate(subject_masks):
                if mask is None:
                    continue
                for size in sizes:
                    for flip in self.flips:
                        device = self.variants[(i, flip, size)][0].device
                        self.subject[(i, flip, size)] = mask_to_latent(mask, images[i].size, size, flip).to(device)
        canvas = torch.zeros(1, 3, self.resolution, self.resolution)  # the official gray canvas
        mean, std = host.encode_images(canvas)
        self.canvas = (mean[0], std[0])
        self.num_images = len(images)
        logger.info("Encoded %d image variants once (%d images × %d sizes × %d flips).",
                    len(self.variants) + 1, len(images), len(sizes), len(self.flips))

    def compose(self, image: int, flip: bool, size: int, top: int, left: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, mask) at training resolution for one placement; offsets in latent cells."""
        mean, std = self.variants[(image, flip, size)]
        subject = self.subject.get((image, flip, size))
        n = self.latent_size
        cells = size // LATENT_FACTOR
        if size > self.resolution:
            crop = (slice(None), slice(top, top + n), slice(left, left + n))
            mask = torch.ones(1, n, n, device=mean.device) if subject is None else subject[crop]
            return mean[crop], std[crop], mask
        if size == self.resolution:
            return mean, std, torch.ones(1, n, n, device=mean.device) if subject is None else subject
        canvas_mean, canvas_std = self.canvas[0].clone(), self.canvas[1].clone()
        canvas_mean[:, top:top + cells, left:left + cells] = mean
        canvas_std[:, top:top + cells, left:left + cells] = std
        mask = torch.zeros(1, n, n, device=mean.device)
        mask[:, top + 1:top + cells - 1, left + 1:left + cells - 1] = 1.0
        if subject is not None:
            mask[:, top:top + cells, left:left + cells] *= subject
        return canvas_mean, canvas_std, mask


@dataclass
class Placement:
    """One sample's augmentation draw."""

    image: int
    flip: bool
    size: int
    top: int
    left: int
    prefix: str


def draw_placement(bank: LatentBank, image: int, rng: torch.Generator) -> Placement:
    """The official augmentation distribution, on the bank's bins."""
    u = torch.rand(4, generator=rng).tolist()
    flip = len(bank.flips) == 2 and u[0] < 0.5
    if not bank.zoom or u[1] < SHRINK_PROBABILITY:
        size = bank.shrink[int(u[2] * len(bank.shrink))]
    else:
        size = bank.zoom[int(u[2] * len(bank.zoom))]
    cells, n = size // LATENT_FACTOR, bank.latent_size
    span = abs(cells - n)
    top, left = (torch.randint(0, span + 1, (2,), generator=rng).tolist() if span else (0, 0))
    prefix = ""
    if size < 0.6 * bank.resolution:
        prefix = SMALL_PREFIXES[int(u[3] * 2)]
    elif size > bank.resolution:
        prefix = ZOOM_PREFIXES[int(u[3] * 2)]
    return Placement(image, flip, size, top, left, prefix)


@dataclass
class ConceptData:
    """One concept to train: its spec and its images, given (PIL images or ComfyUI IMAGE
    tensors) or else loaded from the spec's paths. The ClassDiffusion Concept node outputs one."""

    spec: ConceptSpec
    images: Sequence[Any] | None = None
    class_images: Sequence[Any] | None = None
    #: Subject masks (Infusion's loss weights): ComfyUI MASK [B, H, W] / PIL "L" images, one per image.
    masks: Sequence[Any] | None = None

    def load_images(self) -> list:
        return as_pil_images(self.images) if self.images is not None else load_images(self.spec.images)

    def load_class_images(self) -> list:
        if self.class_images is not None and len(self.class_images):
            return as_pil_images(self.class_images, "class")
        return load_images(self.spec.class_images, "class") if self.spec.class_images else []

    def load_masks(self, images: Sequence[Any]) -> list:
        """One soft subject mask (PIL "L") or None per training image: given masks, else the spec's
        mask files, else the images' alpha channels."""
        if self.masks is not None and len(self.masks):
            masks = as_pil_masks(self.masks)
            if len(masks) == 1 and len(images) > 1:
                masks = masks * len(images)
            if len(masks) != len(images):
                raise InvalidInputError(f"{len(masks)} masks for {len(images)} images: give one mask per image.")
            return masks
        if self.spec.images:
            return load_masks_for(self.spec.images, self.spec.masks)
        return alpha_masks(self.images if self.images is not None else [])

    @property
    def has_class_images(self) -> bool:
        return bool(self.spec.class_images) or (self.class_images is not None and len(self.class_images) > 0)


def concept_data(concepts: Sequence[ConceptSpec | ConceptData], images=None, class_images=None) -> list[ConceptData]:
    """ConceptData for each concept; ``images[k]`` / ``class_images[k]`` override concept k's paths."""
    out = []
    for k, item in enumerate(concepts):
        if isinstance(item, ConceptData):
            out.append(item)
            continue
        given = images[k] if images is not None and k < len(images) else None
        given_class = class_images[k] if class_images is not None and k < len(class_images) else None
        out.append(ConceptData(item, given, given_class))
    return out
