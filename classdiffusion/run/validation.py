"""Validation previews during training: a few prompts sampled with the current trained tensors at
fixed seeds, every N steps, collected into one grid (rows = prompts, columns = steps so far, the
drift rank under each column), as the official ClassDiffusion script validates every 50 steps."""

from __future__ import annotations

import logging
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..config import ConceptSpec

logger = logging.getLogger("classdiffusion")

#: The composition probe of the default prompts (the paper's running example).
COMPOSITION_SUFFIX = " wearing headphones"


def default_prompts(specs: Sequence[ConceptSpec], has_tokens: bool) -> list[str]:
    """Per concept: the training phrase and a compositional phrase, e.g. "a photo of a <sks> dog" and
    "a photo of a <sks> dog wearing headphones" (Infusion, which has no token: "a photo of a dog")."""
    prompts = []
    for spec in specs:
        phrase = spec.train_phrase() if has_tokens else spec.class_phrase()
        prompts += [phrase, phrase + COMPOSITION_SUFFIX]
    return prompts


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] → PIL images."""
    array = (pixels.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


@dataclass
class ValidationLog:
    """The previews so far: one column per validation step."""

    prompts: list[str]
    columns: list[tuple[int, list[Image.Image], str]] = field(default_factory=list)  # (step, images, caption)
    seconds: float = 0.0

    def add(self, step: int, images: list[Image.Image], caption: str) -> None:
        self.columns.append((step, images, caption))

    def grid(self, tile: int = 192) -> Image.Image:
        """Rows = prompts, columns = steps; the step on top, the caption (drift rank) below."""
        font = ImageFont.load_default()
        label_w, head, foot = 220, 16, 16
        width = label_w + tile * max(1, len(self.columns))
        height = head + tile * len(self.prompts) + foot
        grid = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        for row, prompt in enumerate(self.prompts):
            y = head + row * tile
            for i, line in enumerate(textwrap.wrap(prompt, 34)[: tile // 12]):  # the prompt, wrapped
                draw.text((4, y + 4 + 12 * i), line, fill=(0, 0, 0), font=font)
        for col, (step, images, caption) in enumerate(self.columns):
            x = label_w + col * tile
            draw.text((x + 4, 2), f"step {step}", fill=(0, 0, 0), font=font)
            for row, image in enumerate(images):
                grid.paste(image.resize((tile, tile)), (x, head + row * tile))
            draw.text((x + 4, height - foot + 2), caption, fill=(90, 90, 90), font=font)
        return grid


def validate(run, step: int, log: ValidationLog, *, should_stop=lambda: False) -> list[Image.Image]:
    """Sample every validation prompt with the run's current state (fixed seed per prompt, so the
    columns are comparable), add the column to ``log`` and return the images."""
    config = run.config
    start = time.perf_counter()
    with torch.no_grad():
        context, uncond = run.method.validation_contexts(log.prompts)
        try:
            pixels = run.host.sample_images(
                context, uncond, seeds=[config.validation_seed + k for k in range(len(log.prompts))],
                steps=config.validation_steps, guidance=config.validation_guidance, size=config.resolution,
                mixed_precision=config.mixed_precision, should_stop=should_stop)
        finally:
            run.method.end_validation()
    images = to_pil(pixels)
    drift = run.drift() if run.method.has_tokens else []
    caption = ("drift rank " + ", ".join(str(d["rank"]) for d in drift)) if drift else ""
    log.add(step, images, caption)
    log.seconds += time.perf_counter() - start
    return images


def save_column(folder: Path, stem: str, step: int, images: list[Image.Image], log: ValidationLog) -> Path:
    """``folder/STEM-step00100-00.png`` per prompt and ``folder/STEM-grid.png``; returns the grid's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        image.save(folder / f"{stem}-step{step:05d}-{k:02d}.png")
    path = folder / f"{stem}-grid.png"
    log.grid().save(path)
    return path


@dataclass
class ValidationRun:
    """A run's validation: its prompts' log, where the columns are saved, and one validation
    (``run`` is the loop's TrainingRun, ``callbacks`` its TrainCallbacks: handed in, not imported,
    since the loop imports this module)."""

    log: Any  # validation.ValidationLog
    folder: Path | None
    stem: str

    @classmethod
    def start(cls, run: Any, specs: Sequence[ConceptSpec], out: Path | None,
              validation_dir: str | Path | None) -> "ValidationRun":
        prompts = list(run.config.validation_prompts) or default_prompts(specs, run.method.has_tokens)
        folder = Path(validation_dir) if validation_dir is not None else (out.parent / "validation" if out else None)
        return cls(ValidationLog(prompts), folder, out.stem if out is not None else "concept")

    def summary(self, run_seconds: float) -> dict[str, Any]:
        share = self.log.seconds / max(run_seconds, 1e-9)
        logger.info("validation: %.0f %% of the run time (%.1f s of %.1f s)", 100 * share, self.log.seconds,
                    run_seconds)
        return {"prompts": self.log.prompts, "steps": [c[0] for c in self.log.columns],
                "seconds": round(self.log.seconds, 3), "share_of_run": round(share, 4)}

    def run(self, run: Any, step: int, callbacks: Any) -> None:
        images = validate(run, step, self.log, should_stop=callbacks.should_stop)
        path = save_column(self.folder, self.stem, step, images, self.log) if self.folder is not None else None
        callbacks.on_validation(step, images, self.log.grid(), path)
