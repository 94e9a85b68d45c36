"""Picking the best step: checkpoints written along a run, listed with their losses and drift."""

from __future__ import annotations

import json

from classdiffusion.cli import main
from classdiffusion.concept import checkpoint_table, load_concept, run_files
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.run.plot import plot_history
from classdiffusion.run.train import train
from helpers import dog, make_images, small_config


def test_step_files_are_listed_with_loss_and_drift(tiny_base, tmp_path, capsys):
    out = tmp_path / "run" / "dog.safetensors"
    result = train(load_host(tiny_base, device="cpu"), [dog()],
                   small_config(steps=6, save_every=2, drift_every=2, checkpoint_optimizer=False),
                   images=[make_images(2)], out=out)
    final, steps = run_files(out)
    assert final == out and [s for s, _ in steps] == [2, 4] and result.checkpoints == [p for _, p in steps]
    light = load_concept(steps[0][1])
    assert not light.resumable and light.step == 2  # concept-only checkpoint
    assert run_files(steps[1][1]) == (final, steps)  # from a step file, the same run
    rows = checkpoint_table(out)
    assert [r["step"] for r in rows] == [2, 4, 6] and rows[-1]["final"] and not rows[0]["final"]
    history = result.concept.history
    assert rows[0]["loss"] == history[1]["loss"] and rows[1]["drift_rank"] == history[3]["drift_rank"]
    (out.parent / "dog-other-step00002.safetensors").write_bytes(b"")  # another run's name: not listed
    assert main(["inspect", str(out)]) == 0
    listed = json.loads(capsys.readouterr().out)["run_checkpoints"]
    assert [r["file"] for r in listed] == ["dog-step00002.safetensors", "dog-step00004.safetensors",
                                           "dog.safetensors"]
    plain = plot_history(history, tokens=["<sks>"])
    marked = plot_history(history, tokens=["<sks>"], checkpoints=[2, 4])
    assert plain.size == marked.size and plain.tobytes() != marked.tobytes()


def test_resumable_checkpoints_stay_the_default(tiny_base, tmp_path):
    out = tmp_path / "dog.safetensors"
    train(load_host(tiny_base, device="cpu"), [dog()], small_config(steps=3, save_every=2), images=[make_images(2)],
          out=out)
    assert load_concept(run_files(out)[1][0][1]).resumable
