"""Validation previews during training (tiny base): files, the grid, determinism, cost, cancel."""

from __future__ import annotations

import pytest
from PIL import Image

from classdiffusion.cli import main
from classdiffusion.errors import TrainingCancelled
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.run.train import TrainCallbacks, train
from classdiffusion.run.validation import COMPOSITION_SUFFIX, default_prompts
from helpers import dog, make_images, small_config


def test_cli_validation_writes_images_and_a_grid_with_its_cost(tiny_base, image_dir, tmp_path, capsys):
    out = tmp_path / "dog.safetensors"
    assert main(["train", "--base", str(tiny_base), "--images", str(image_dir), "--token", "<sks>", "--class-word",
                 "dog", "--steps", "4", "--resolution", "64", "--batch-size", "1", "--validation-every", "2",
                 "--validation-steps", "2", "--validation-prompt", "a photo of a <sks> dog",
                 "--validation-prompt", "a <sks> dog in the snow", "--validation-prompt", "a red <sks> dog",
                 "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "validation:" in printed and "% of the run time" in printed
    folder = tmp_path / "validation"
    names = sorted(p.name for p in folder.glob("dog-step*.png"))
    assert names == [f"dog-step{s:05d}-{k:02d}.png" for s in (0, 2, 4) for k in range(3)]
    with Image.open(folder / "dog-grid.png") as grid:
        assert grid.size == (220 + 3 * 192, 16 + 3 * 192 + 16)  # 3 prompts × steps 0, 2, 4
    from classdiffusion.concept import read_metadata

    meta = read_metadata(out).extra["validation"]
    assert meta["steps"] == [0, 2, 4] and 0 < meta["share_of_run"] < 1 and len(meta["prompts"]) == 3


def test_same_seed_same_previews_and_defaults(tiny_base, tmp_path):
    grids = []
    for name in ("a", "b"):
        result = train(load_host(tiny_base, device="cpu"), [dog()],
                       small_config(steps=2, validation_every=2, validation_steps=2), images=[make_images(2)],
                       out=tmp_path / name / "dog.safetensors")
        grids.append(result.validation_grid)
        assert result.concept.meta.extra["validation"]["prompts"] == [
            "a photo of a <sks> dog", "a photo of a <sks> dog" + COMPOSITION_SUFFIX]
    assert grids[0].tobytes() == grids[1].tobytes()
    a = Image.open(tmp_path / "a" / "validation" / "dog-step00002-01.png")
    b = Image.open(tmp_path / "b" / "validation" / "dog-step00002-01.png")
    assert a.tobytes() == b.tobytes()
    assert default_prompts([dog()], has_tokens=False) == ["a photo of a dog", "a photo of a dog" + COMPOSITION_SUFFIX]


def test_cancel_during_a_validation_writes_nothing(tiny_base, tmp_path):
    class CancelInValidation(TrainCallbacks):
        def __init__(self):
            self.steps_done = 0

        def on_step(self, record, total):
            self.steps_done = record.step

        def should_stop(self):
            return self.steps_done >= 2  # first asked between steps... and inside the step-2 validation

    out = tmp_path / "dog.safetensors"
    with pytest.raises(TrainingCancelled):
        train(load_host(tiny_base, device="cpu"), [dog()],
              small_config(steps=4, validation_every=2, validation_steps=3), images=[make_images(2)], out=out,
              callbacks=CancelInValidation())
    assert not out.exists()
    assert not list((tmp_path / "validation").glob("dog-step00002-*.png"))


def test_infusion_validation_runs_on_its_class_word_prompts(tiny_base, tmp_path):
    from classdiffusion.config import ConceptSpec, TrainConfig

    result = train(load_host(tiny_base, device="cpu"), [ConceptSpec(token="<unused>", class_word="dog")],
                   TrainConfig.for_method("infusion", steps=2, resolution=64, batch_size=1, gradient_accumulation=1,
                                          validation_every=1, validation_steps=2), images=[make_images(2)],
                   out=tmp_path / "inf.safetensors")
    assert result.validation_grid is not None
    assert result.concept.meta.extra["validation"]["steps"] == [0, 1, 2]
