"""`classdiffusion eval` end to end on the tiny base, with tiny random CLIP and DINO models, and
drift logging in the trainer."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from classdiffusion.cli import main
from classdiffusion.concept import load_concept
from classdiffusion.evaluation.drift import DriftProbe
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.run.plot import plot_history
from classdiffusion.run.summary import drift_line, summary_line
from classdiffusion.model.tiny import build_tiny_clip, build_tiny_dino
from classdiffusion.run.train import train
from helpers import dog, small_config


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """A concept trained with drift logged every 2 steps, its images kept for CLIP-I/DINO-I."""
    from helpers import make_images

    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    images.mkdir()
    for i, img in enumerate(make_images(3)):
        img.save(images / f"{i}.png")
    host = load_host(tiny_base, device="cpu")
    result = train(host, [dog(images=[str(images)])], small_config(steps=4, drift_every=2),
                   out=root / "dog.safetensors")
    return result.path, images


def test_trainer_logs_drift_before_during_and_after(trained, tiny_base):
    concept = load_concept(trained[0])
    ranks = [h.get("drift_rank") for h in concept.history]
    assert ranks[0] is None and ranks[2] is None and ranks[1] and ranks[3]
    initial, final = concept.meta.drift_initial[0], concept.meta.drift_final[0]
    assert final["rank"] == concept.history[-1]["drift_rank"][0]
    assert initial["total"] == final["total"] == 72
    # The logged numbers are the probe's on the saved vector (independent recomputation).
    host = load_host(tiny_base, device="cpu")
    host.add_tokens(concept.tokens)
    again = DriftProbe(host.encode_text, "dog").measure("<sks>", concept.token_vectors[0])
    assert again.rank == final["rank"] and again.cosine == pytest.approx(final["cosine"], abs=1e-5)
    assert final["cosine"] == pytest.approx(concept.meta.eos_cosine_final[0], abs=1e-5)
    assert "drift rank" in drift_line(concept.meta.drift_initial, concept.meta.drift_final)
    assert "drift rank" in summary_line(concept.history)
    assert plot_history(concept.history, tokens=concept.tokens).size == (768, 768)  # third panel


def test_eval_cli_writes_report_and_summary(trained, tiny_base, tmp_path, capsys):
    concept_path, images = trained
    clip, dino = build_tiny_clip(tmp_path / "clip"), build_tiny_dino(tmp_path / "dino")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <sks> dog in the snow\na red <sks> dog\n")
    out = tmp_path / "report"
    assert main(["eval", "--base", str(tiny_base), "--concept", str(concept_path), "--out", str(out),
                 "--clip", str(clip), "--dino", str(dino), "--prompts", str(prompts), "--num-images", "2",
                 "--steps", "2", "--size", "64", "--fisher-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "rank" in printed and "Latent Fisher divergence" in printed
    report = json.loads((out / "report.json").read_text())
    drift = report["drift"][0]
    assert drift["token"] == "<sks>" and drift["after"]["total"] == 72 and (out / drift["map_image"]).exists()
    meta = load_concept(concept_path).meta
    assert drift["after"]["rank"] == meta.drift_final[0]["rank"]
    assert drift["before"]["rank"] == meta.drift_initial[0]["rank"]
    assert report["latent_fisher_divergence"]["value"] > 0
    metrics = report["images"]
    assert metrics["count"] == 4 and metrics["references"] == 3  # 2 prompts × 2 images; training images found
    for key in ("clip_t", "clip_t_base", "clip_i", "dino_i", "dino_i_base"):
        assert -1.0 <= metrics[key] <= 1.0
    assert report["wasserstein"]["features"] == "dino" and report["wasserstein"]["value"] >= 0
    assert len(list((out / "images_tuned").glob("*.png"))) == 4
    assert len(list((out / "images_base").glob("*.png"))) == 4
    with Image.open(out / "summary.png") as summary:
        assert summary.width == 1280


def test_eval_without_images_and_bad_inputs(trained, tiny_base, other_base, tmp_path, capsys):
    concept_path, _ = trained
    out = tmp_path / "fast"
    assert main(["eval", "--base", str(tiny_base), "--concept", str(concept_path), "--out", str(out),
                 "--no-images", "--fisher-steps", "2", "--size", "64"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "images" not in report and report["drift"]
    capsys.readouterr()
    assert main(["eval", "--base", str(other_base), "--concept", str(concept_path), "--out", str(tmp_path / "x"),
                 "--no-images"]) == 2
    assert "does not fit" in capsys.readouterr().err
    bad = tmp_path / "fisher.txt"
    bad.write_text("a <sks> dog\n")
    assert main(["eval", "--base", str(tiny_base), "--concept", str(concept_path), "--out", str(tmp_path / "y"),
                 "--no-images", "--fisher-prompts", str(bad)]) == 2
    assert "mentions the concept token" in capsys.readouterr().err


def test_eval_says_its_plan_and_shows_progress_per_phase(trained, tiny_base, tmp_path, capsys):
    """A new user's first eval: the plan with an estimate comes before the work, each phase has a
    bar, and the small demo base gets few sampling steps by default."""
    concept_path, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <sks> dog in the snow\n")
    out = tmp_path / "planned"
    assert main(["eval", "--base", str(tiny_base), "--concept", str(concept_path), "--out", str(out),
                 "--prompts", str(prompts), "--size", "64", "--fisher-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "eval plan" in err and "1 prompts × 1 image(s) × 10 steps" in err and "--no-images" in err
    assert "≈" in err
    for phase in ("Latent Fisher divergence", "images (base)", "images (tuned)"):
        assert phase in err, phase
    assert json.loads((out / "report.json").read_text())["settings"]["steps"] == 10
    assert main(["eval", "--base", str(tiny_base), "--concept", str(concept_path), "--out", str(tmp_path / "q"),
                 "--no-images", "--fisher-steps", "2", "--size", "64", "-q"]) == 0
    assert "eval plan" not in capsys.readouterr().err


def test_every_subcommand_shows_its_defaults_in_help(capsys):
    from classdiffusion.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subcommands.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            default = action.default
            if not action.option_strings or default is None or default is False or action.dest == "help":
                continue
            assert action.help, (name, action.option_strings)
            assert "default" in formatter._get_help_string(action), (name, action.option_strings)
