"""`classdiffusion demo`: the whole pipeline on a fresh machine with no weights.

Writes a tiny *random* SD1.5-like base, synthetic images of a made-up "toy", trains a concept
with SPL, and plots the losses. It proves the machinery works; the pictures mean nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger("classdiffusion")

DISCLAIMER = (
    "NOTE: the demo base model has RANDOM weights and the training images are synthetic shapes. "
    "The numbers show the trainer works end to end; the images mean nothing. "
    "For real results use an SD1.5 checkpoint and photos of your concept."
)


def synthetic_images(out_dir: Path, count: int = 6, size: int = 128, seed: int = 0) -> list[Path]:
    """A red-and-yellow 'toy' (disc on a box) on varied backgrounds, positions and scales."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        background = tuple(int(v) for v in rng.integers(40, 220, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        scale = rng.uniform(0.35, 0.6) * size
        cx, cy = rng.uniform(0.35, 0.65, 2) * size
        draw.rectangle((cx - scale / 2, cy, cx + scale / 2, cy + scale / 2), fill=(200, 30, 30))
        draw.ellipse((cx - scale / 3, cy - scale / 2, cx + scale / 3, cy + scale / 6), fill=(240, 200, 40))
        draw.ellipse((cx - scale / 10, cy - scale / 4, cx + scale / 10, cy - scale / 10), fill=(20, 20, 20))
        path = out_dir / f"toy_{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def run_demo(out: str | Path, *, steps: int = 60, spl_weight: float = 1.0, seed: int = 0,
             resolution: int = 128, generate_sample: bool = True, progress: bool = True) -> dict:
    """Build base + images, train, plot, sample. Returns a summary dict (also printed by the CLI)."""
    from .config import ConceptSpec, TrainConfig
    from .hosts.diffusers_host import load_host
    from .plot import plot_history
    from .summary import drift_line, summary_line
    from .tiny import build_tiny_base
    from .progress import TqdmCallbacks

    out = Path(out)
    started = time.perf_counter()
    base = build_tiny_base(out / "base", seed=seed)
    images = synthetic_images(out / "images", seed=seed)
    host = load_host(base, device="cpu")
    spec = ConceptSpec(token="<sks>", class_word="toy", images=[str(out / "images")])
    config = TrainConfig(steps=steps, resolution=resolution, spl_weight=spl_weight, seed=seed,
                         drift_every=max(1, steps // 10))
    from .train import train

    result = train(host, [spec], config, out=out / "concept.safetensors",
                   callbacks=TqdmCallbacks(enabled=progress), meta_extra={"base_name": "tiny random demo base"})
    plot_history(result.concept.history, tokens=result.concept.tokens).save(out / "loss.png")
    samples = []
    if generate_sample:
        from .generate import generate

        samples = generate(base, [result.path], "a photo of a <sks> toy wearing headphones",
                           out / "samples", steps=10, seed=seed, size=resolution)
    return {
        "base": str(base),
        "images": [str(p) for p in images],
        "concept": str(result.path),
        "loss_plot": str(out / "loss.png"),
        "samples": [str(p) for p in samples],
        "summary": summary_line(result.concept.history),
        "eos_cosine_initial": result.concept.meta.eos_cosine_initial,
        "eos_cosine_final": result.concept.meta.eos_cosine_final,
        "drift": drift_line(result.concept.meta.drift_initial, result.concept.meta.drift_final),
        "seconds": round(time.perf_counter() - started, 1),
    }
