"""Helpers the tests share (imported as ``from helpers import …``; fixtures stay in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from classdiffusion.config import ConceptSpec, TrainConfig

REPO = Path(__file__).resolve().parents[1]
#: The parity tests' tolerance: relative to the largest magnitude of the reference.
RTOL = 1e-5


def make_images(count: int = 4, seed: int = 0, size=(72, 88)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def small_config(**overrides) -> TrainConfig:
    settings = dict(steps=4, resolution=64, batch_size=2)
    settings.update(overrides)
    return TrainConfig(**settings)


def dog(**overrides) -> ConceptSpec:
    settings = dict(token="<sks>", class_word="dog")
    settings.update(overrides)
    return ConceptSpec(**settings)


def processor_kv_weights(procs) -> dict[str, torch.nn.Parameter]:
    """Custom Diffusion processors' trained K/V weights by canonical layer name."""
    kv = {}
    for name, proc in procs.items():
        if name.endswith("attn2.processor"):
            layer = name.removesuffix(".processor")
            kv[layer + ".to_k.weight"] = proc.to_k_custom_diffusion.weight
            kv[layer + ".to_v.weight"] = proc.to_v_custom_diffusion.weight
    return kv


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    scale = theirs.abs().max().clamp_min(1e-12)
    error = float((ours - theirs).abs().max() / scale)
    assert error < RTOL, f"{what}: relative difference {error:.2e}"
