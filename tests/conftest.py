"""Shared fixtures: a tiny random SD1.5-shaped base on disk, fresh hosts, an image folder (the
plain helpers the tests import live in ``helpers.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, Path(__file__).resolve().parent / "comfyui"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

pytest_plugins = ["comfy_fixtures"]  # the ComfyUI host's fixtures and its CI rule (tests/comfyui)

from classdiffusion.hosts.diffusers_host import load_host  # noqa: E402
from classdiffusion.model.tiny import build_tiny_base  # noqa: E402
from helpers import make_images  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny", seed=0)


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """Same architecture, other random weights: a 'different checkpoint'."""
    return build_tiny_base(tmp_path_factory.mktemp("base") / "other", seed=1)


@pytest.fixture
def host(tiny_base):
    return load_host(tiny_base, device="cpu")


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(make_images(4)):
        img.save(folder / f"img{i}.png")
    return folder
