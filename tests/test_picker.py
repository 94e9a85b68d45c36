"""The step picker: its rule, its measures against their formulas, and `classdiffusion pick` end to end
(tiny random base with tiny CLIP and DINO folders; the toy base with its toy CLIP)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from classdiffusion.cli import main
from classdiffusion.concept import run_files
from classdiffusion.errors import InvalidInputError
from classdiffusion.evaluation.picker import (StepScore, context_agreement, default_prompts, mask_middle, pick,
                                              score_steps)
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.model.tiny import build_tiny_clip, build_tiny_dino
from classdiffusion.run.train import train
from helpers import dog, make_images, small_config


def scores(*rows: tuple[int, float, float]) -> list[StepScore]:
    return [StepScore(step=step, file=f"{step}", identity=identity, composition=composition)
            for step, identity, composition in rows]


def test_the_rule_takes_the_best_identity_among_steps_that_keep_composition():
    run = scores((100, 0.50, 0.90), (200, 0.70, 0.80), (300, 0.80, 0.60), (400, 0.95, 0.40))
    # range 0.40…0.90, tolerance 0.5: composition ≥ 0.65 → steps 100, 200; the better identity is 200
    index, reason = pick(run, 0.5)
    assert run[index].step == 200 and "step 200" in reason and "2 of 4" in reason
    assert run[pick(run, 0.0)[0]].step == 100  # keep all of the composition: the best composition step
    assert run[pick(run, 1.0)[0]].step == 400  # composition does not matter: the best identity
    assert run[pick(run, 0.6)[0]].step == 300  # floor 0.60 admits step 300
    tied = scores((100, 0.8, 0.5), (200, 0.8, 0.5))
    assert tied[pick(tied)[0]].step == 100  # a tie goes to the earlier step (less overfit)
    with pytest.raises(InvalidInputError, match="no step files"):
        pick([])
    with pytest.raises(InvalidInputError, match="0 to 1"):
        pick(run, 1.5)


def test_mask_middle_paints_the_centre_with_its_mean_and_keeps_the_border():
    picture = Image.new("RGB", (8, 8), (10, 20, 30))
    picture.paste((200, 0, 0), (3, 3, 5, 5))  # a 2×2 red subject inside the 4×4 middle
    picture.paste((110, 20, 30), (0, 0, 8, 1))  # the surroundings: one row of another colour (8 of 48 pixels)
    masked = mask_middle(picture, 0.5)
    middle = (round((8 * 110 + 40 * 10) / 48), 20, 30)  # the box (2..6) in the surroundings' mean colour
    assert masked.getpixel((2, 2)) == masked.getpixel((5, 5)) == middle
    assert masked.getpixel((7, 7)) == masked.getpixel((1, 4)) == (10, 20, 30) and masked.getpixel((0, 0)) == (110, 20, 30)
    assert mask_middle(picture, 0.0).tobytes() == picture.tobytes()


class PixelEncoder:
    """A stand-in encoder: the picture's pixels as a vector (and a text tower that counts words)."""

    def image_features(self, images):
        return torch.stack([torch.tensor(list(i.convert("RGB").tobytes()), dtype=torch.float32) for i in images])


class PixelTextEncoder(PixelEncoder):
    def text_features(self, prompts):
        size = 8 * 8 * 3
        return torch.stack([torch.full((size,), float(len(p.split()))) + torch.arange(size) for p in prompts])


def test_context_agreement_reads_the_surroundings_not_the_subject():
    base = Image.new("RGB", (8, 8), (40, 120, 40))
    new_subject = base.copy()
    new_subject.paste((255, 0, 255), (3, 3, 5, 5))  # another subject, same surroundings
    new_scene = Image.new("RGB", (8, 8), (200, 180, 120))  # the surroundings changed
    encoder = PixelEncoder()
    assert context_agreement(encoder, [new_subject], [base]) == pytest.approx(1.0, abs=1e-6)
    assert context_agreement(encoder, [new_scene], [base]) < 0.99
    assert context_agreement(encoder, [new_subject], [base], fraction=0.0) < 1.0 - 1e-4  # unmasked, it counts
    with pytest.raises(InvalidInputError):
        context_agreement(encoder, [base, base], [base])


def test_score_steps_samples_each_file_and_scores_by_the_formulas():
    colours = {None: (0, 200, 0), 100: (200, 10, 10), 200: (90, 90, 200)}
    calls = []

    def sample(path, prompts, seeds):
        calls.append((path, list(prompts), list(seeds)))
        step = None if path is None else int(Path(path).stem)
        return [[Image.new("RGB", (8, 8), tuple((c + 7 * s + 3 * k) % 256 for c in colours[step]))
                 for s in seeds] for k, _ in enumerate(prompts)]

    references = [Image.new("RGB", (8, 8), (200, 0, 0)), Image.new("RGB", (8, 8), (180, 30, 0))]
    encoder = PixelTextEncoder()
    prompts = ["a <sks> dog on the beach", "a <sks> dog wearing a red hat"]
    keep: dict = {}
    result = score_steps([(100, Path("100.st")), (200, Path("200.st"))], sample, encoder, references, token="<sks>",
                         class_word="dog", prompts=prompts, seeds=(0, 1), keep=keep)
    # the base once, on the composition prompts with the token removed; then each file on all prompts
    assert calls[0] == (None, ["a dog on the beach", "a dog wearing a red hat"], [0, 1])
    assert [c[0] for c in calls[1:]] == [Path("100.st"), Path("200.st")]
    assert calls[1][1] == ["a photo of a <sks> dog"] + prompts
    for score, (step, _) in zip(result, [(100, 0), (200, 0)]):
        rows = keep[step]
        own = encoder.image_features(rows[0])
        identity = (F.normalize(own.double(), dim=-1) @ F.normalize(encoder.image_features(references).double(),
                                                                  dim=-1).T).mean()
        assert score.identity == pytest.approx(float(identity), abs=1e-9)
        composed = [p for row in rows[1:] for p in row]
        texts = encoder.text_features(["a dog on the beach"] * 2 + ["a dog wearing a red hat"] * 2)
        clip_t = F.cosine_similarity(encoder.image_features(composed).double(), texts.double(), dim=-1).mean()
        assert score.clip_t == pytest.approx(float(clip_t), abs=1e-9) and score.composition == score.clip_t
        assert score.context == pytest.approx(
            context_agreement(encoder, composed, [p for row in keep["base"] for p in row]), abs=1e-9)
    vision_only = score_steps([(100, Path("100.st"))], sample, PixelEncoder(), references, token="<sks>",
                              class_word="dog", prompts=prompts, seeds=(0,))
    assert vision_only[0].clip_t is None and vision_only[0].composition == vision_only[0].context
    with pytest.raises(InvalidInputError, match="token"):
        score_steps([(100, Path("100.st"))], sample, encoder, references, token="<sks>", class_word="dog",
                    prompts=["a dog on the beach"])
    with pytest.raises(InvalidInputError, match="save-every"):
        score_steps([], sample, encoder, references, token="<sks>", class_word="dog")
    assert all("<sks> dog" in p for p in default_prompts("<sks>", "dog"))


@pytest.fixture(scope="module")
def run_with_steps(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("pick")
    images = root / "images"
    images.mkdir()
    for i, img in enumerate(make_images(3)):
        img.save(images / f"{i}.png")
    train(load_host(tiny_base, device="cpu"), [dog(images=[str(images)])],
          small_config(steps=6, save_every=2, checkpoint_optimizer=False), out=root / "dog.safetensors")
    return root / "dog.safetensors", images


def test_pick_cli_scores_every_step_and_writes_the_choice(run_with_steps, tiny_base, tmp_path, capsys):
    final, _ = run_with_steps
    clip, dino = build_tiny_clip(tmp_path / "clip"), build_tiny_dino(tmp_path / "dino")
    out, report = tmp_path / "pick", tmp_path / "pick.json"
    step_file = run_files(final)[1][0][1]  # any file of the run names it
    assert main(["pick", str(step_file), "--base", str(tiny_base), "--clip", str(clip), "--dino", str(dino),
                 "--num-images", "1", "--steps", "2", "--out", str(out), "--json", str(report), "-q",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert [s["step"] for s in result["steps"]] == [2, 4, 6]  # step files 2, 4 and the final file
    assert result["chosen_step"] in (2, 4, 6) and f"chosen: {result['chosen_file']}" in printed
    assert result["composition_measure"] == "clip_t" and result["prompts"]["identity"] == "a photo of a <sks> dog"
    for step in result["steps"]:
        for key in ("identity", "composition", "clip_t", "context", "dino_i"):
            assert -1.0 <= step[key] <= 1.0
    assert json.loads((out / "pick.json").read_text()) == result
    for name in ("plot.png", "grid.png"):
        with Image.open(out / name) as image:
            assert image.width > 0


def test_pick_cli_says_what_is_missing(run_with_steps, tiny_base, tmp_path, capsys):
    final, images = run_with_steps
    assert main(["pick", str(final), "--base", str(tiny_base), "-q"]) == 2
    assert "Give --clip PATH" in capsys.readouterr().err
    alone = tmp_path / "alone.safetensors"
    shutil.copy(final, alone)  # a run without step files
    assert main(["pick", str(alone), "--base", str(tiny_base), "--clip", "x", "-q"]) == 2
    assert "--save-every" in capsys.readouterr().err
    assert main(["pick", str(tmp_path / "nothing.safetensors"), "--base", str(tiny_base), "-q"]) == 2
    assert "No file of the run" in capsys.readouterr().err
    assert main(["pick", str(final), "--base", str(tiny_base), "--clip", str(tmp_path / "no-clip"), "-q",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "CLIP model folder" in err and "does not exist" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog on the beach\n")
    clip = build_tiny_clip(tmp_path / "clip")
    assert main(["pick", str(final), "--base", str(tiny_base), "--clip", str(clip), "--prompts", str(prompts),
                 "--steps", "1", "--num-images", "1", "-q", "--device", "cpu"]) == 2
    assert "must contain the token" in capsys.readouterr().err


def test_pick_on_the_toy_base_uses_the_toy_clip_and_the_world_prompts(tmp_path, capsys):
    from classdiffusion.config import ConceptSpec, TrainConfig
    from classdiffusion.toyworld.demo import TOY_RECIPE
    from classdiffusion.toyworld.base import base_path
    from classdiffusion.toyworld.evaluate import instance_pictures

    images = tmp_path / "images"
    images.mkdir()
    for k, picture in enumerate(instance_pictures("yellow_purple_ball", count=2)):
        picture.save(images / f"{k}.png")
    out = tmp_path / "ball.safetensors"
    train(load_host(base_path(), device="cpu"), [ConceptSpec(token="<sks>", class_word="ball", images=[str(images)])],
          TrainConfig(steps=4, save_every=2, checkpoint_optimizer=False, batch_size=1, **TOY_RECIPE), out=out)
    report = tmp_path / "pick.json"
    assert main(["pick", str(out), "--base", str(base_path()), "--num-images", "1", "--steps", "2", "--json",
                 str(report), "-q", "--device", "cpu"]) == 0
    result = json.loads(report.read_text())
    assert result["composition_measure"] == "clip_t"  # the toy CLIP has a text tower
    assert "a photo of a <sks> ball on the beach" in result["prompts"]["composition"]  # the world's prompts
    assert [s["step"] for s in result["steps"]] == [2, 4]
