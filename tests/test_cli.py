"""The command line end to end on the tiny base."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from classdiffusion.cli import main
from classdiffusion.concept import load_concept


@pytest.mark.slow  # scores before and after on the toy base: about 1 min
def test_demo_writes_images_concept_plot_grid_and_scores(tmp_path, capsys):
    """The demo's files and its summary line (that it learns: tests/test_toy_base.py)."""
    assert main(["demo", "--out", str(tmp_path), "--steps", "4", "-q"]) == 0
    out = capsys.readouterr().out
    assert "toy base" in out and "identity (the checker's instance score)" in out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert {"identity_before", "identity_after", "composition_after", "composition_joint_after"} <= set(scores)
    assert "joint composition" in out
    assert len(list((tmp_path / "images").glob("*.png"))) == 5
    assert load_concept(tmp_path / "concept.safetensors").step == 4
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "grid.png").stat().st_size > 1000


def test_sdxl_demo_inspect_train_and_generate(tmp_path, capsys):
    """`demo --family sdxl` builds a tiny SDXL-shaped base and trains on it; inspect reports the
    family; the embedding beside the concept holds clip_l and clip_g; train on that base takes
    SDXL's 1024 px default unless --resolution is given; generate samples with the concept."""
    from safetensors.torch import load_file

    demo = tmp_path / "demo"
    assert main(["demo", "--family", "sdxl", "--out", str(demo), "--steps", "3", "-q"]) == 0
    assert "token 2048 wide" in capsys.readouterr().out
    assert main(["inspect", str(demo / "concept.safetensors")]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["family"] == "sdxl" and meta["family_label"] == "Stable Diffusion XL" and meta["text_dim"] == 2048
    embedding = load_file(str(demo / "concept_embedding.safetensors"))
    assert {k: tuple(v.shape) for k, v in embedding.items()} == {"clip_l": (1, 768), "clip_g": (1, 1280)}

    out = tmp_path / "sdxl.safetensors"
    assert main(["train", "--base", str(demo / "base"), "--images", str(demo / "images"), "--token", "<sks>",
                 "--class-word", "dog", "--out", str(out), "--steps", "1", "--resolution", "64", "-q"]) == 0
    concept = load_concept(out)
    assert concept.family == "sdxl" and concept.meta.config["resolution"] == 64
    from classdiffusion.config import TrainConfig
    from classdiffusion.model.families import SDXL

    assert TrainConfig().with_family_defaults(SDXL).resolution == 1024
    assert TrainConfig().with_family_defaults(SDXL, explicit={"resolution": 64}).resolution == 512
    capsys.readouterr()
    assert main(["generate", "--base", str(demo / "base"), "--concept", str(out), "--prompt", "a photo of a <sks> dog",
                 "--out", str(tmp_path / "samples"), "--steps", "2", "--size", "64"]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_train_inspect_resume_generate(tiny_base, image_dir, tmp_path, capsys):
    out = tmp_path / "dog.safetensors"
    args = ["train", "--base", str(tiny_base), "--images", str(image_dir), "--token", "<sks>",
            "--class-word", "dog", "--out", str(out), "--steps", "4", "--resolution", "64",
            "--save-every", "2", "--plot", str(tmp_path / "loss.png"), "-q"]
    assert main(args) == 0
    assert "saved" in capsys.readouterr().out
    checkpoint = tmp_path / "dog-step00002.safetensors"
    assert checkpoint.exists() and (tmp_path / "loss.png").exists()

    assert main(["inspect", str(out)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["tokens"] == ["<sks>"] and meta["class_words"] == ["dog"] and meta["history_steps"] == 4

    resumed = tmp_path / "resumed.safetensors"
    assert main(["train", "--base", str(tiny_base), "--resume", str(checkpoint), "--out", str(resumed), "-q"]) == 0
    a, b = load_concept(out), load_concept(resumed)
    assert a.history == b.history

    assert main(["generate", "--base", str(tiny_base), "--concept", str(out), "--prompt",
                 "a photo of a <sks> dog wearing headphones", "--out", str(tmp_path / "gen"),
                 "--steps", "2", "--size", "64", "--num-images", "2"]) == 0
    assert len(list((tmp_path / "gen").glob("*.png"))) == 2

    # Without --concept: the base model alone, to compare (the same seed gives another picture).
    assert main(["generate", "--base", str(tiny_base), "--prompt", "a photo of a dog wearing headphones",
                 "--out", str(tmp_path / "base_only"), "--steps", "2", "--size", "64"]) == 0
    base_only = np.asarray(Image.open(next((tmp_path / "base_only").glob("*.png"))), dtype=np.int16)
    tuned = np.asarray(Image.open(sorted((tmp_path / "gen").glob("*.png"))[0]), dtype=np.int16)
    assert base_only.shape == tuned.shape and np.abs(base_only - tuned).max() > 0


def test_default_output_shows_the_memory_plan_and_no_library_notices(tiny_base, image_dir, tmp_path):
    """A train run prints the plan as one line, and nothing of diffusers' accelerate advice or
    transformers' loading bars (a new process: logging is configured once per process)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "classdiffusion", "train", "--base", str(tiny_base),
                           "--images", str(image_dir), "--token", "<sks>", "--class-word", "dog",
                           "--out", str(tmp_path / "dog.safetensors"), "--steps", "1", "--resolution", "64",
                           "-q"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    plan_lines = [line for line in output.splitlines() if line.startswith("memory plan: ")]
    assert len(plan_lines) == 1 and "fits as set" in plan_lines[0], output
    for notice in ("accelerate", "Loading weights", "Writing model shards", "torchvision"):
        assert notice not in output, output


def test_multi_concept_json(tiny_base, image_dir, tmp_path):
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([
        {"token": "<a1>", "class_word": "dog", "images": str(image_dir)},
        {"modifier_token": "<b2>", "cls_token": "cat", "instance_data_dir": str(image_dir)},
    ]))
    out = tmp_path / "multi.safetensors"
    assert main(["train", "--base", str(tiny_base), "--concepts", str(concepts), "--out", str(out),
                 "--steps", "2", "--resolution", "64", "-q"]) == 0
    assert load_concept(out).tokens == ["<a1>", "<b2>"]


def test_errors_exit_with_a_message(tiny_base, image_dir, tmp_path, capsys):
    code = main(["train", "--base", str(tiny_base), "--images", str(image_dir), "--token", "dog",
                 "--class-word", "dog", "--out", str(tmp_path / "x.safetensors"), "--steps", "2", "-q"])
    assert code == 2
    assert "already a word" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x01\x02")
    assert main(["inspect", str(broken)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
