"""`classdiffusion queue`: jobs over worker processes, failures reported, reruns skip or resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from classdiffusion.concept import load_concept, run_files
from classdiffusion.config import ConceptSpec, TrainConfig
from classdiffusion.errors import InvalidInputError, TrainingCancelled
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.run.jobs import load_jobs
from classdiffusion.toyworld.base import base_path
from classdiffusion.toyworld.evaluate import instance_pictures
from classdiffusion.run.train import TrainCallbacks, train

REPO = Path(__file__).resolve().parents[1]
STAR = {"steps": 6, "resolution": 64, "augment": False, "batch_size": 1}


@pytest.fixture
def jobs_file(tmp_path) -> Path:
    for name in ("red_blue_star", "yellow_purple_ball"):
        (tmp_path / name).mkdir()
        for k, picture in enumerate(instance_pictures(name, count=2)):
            picture.save(tmp_path / name / f"{k}.png")
    jobs = [
        {"token": "<star>", "class_word": "star", "images": "red_blue_star", "out": "out/star.safetensors",
         "settings": STAR},
        {"name": "ball", "token": "<ball>", "class_word": "ball", "images": "yellow_purple_ball",
         "out": "out/ball.safetensors", "settings": {"steps": 4, "resolution": 64, "method": "textual-inversion",
                                                     "gradient_accumulation": 1}},
        {"token": "<cup>", "class_word": "cup", "images": "no_such_folder", "out": "out/bad.safetensors",
         "settings": {"steps": 4, "resolution": 64}},
    ]
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    return path


def _queue(jobs_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "classdiffusion", "queue", str(jobs_file), "--workers", "2",
                           "--base", str(base_path())], capture_output=True, text=True, timeout=600, cwd=REPO)


class _StopAfter(TrainCallbacks):
    """Stops after ``step`` steps; asked before every step, so it counts them itself (records
    arrive only when the loop reads the losses back, every log_every steps)."""

    def __init__(self, step: int):
        self.step, self.done = step, -1

    def should_stop(self) -> bool:
        self.done += 1
        return self.done >= self.step


@pytest.mark.slow  # three queued trainings, one of them rerun
def test_queue_reports_a_failing_job_and_a_rerun_skips_or_resumes(jobs_file, tmp_path):
    first = _queue(jobs_file)
    assert first.returncode == 1, first.stderr[-3000:]  # one job failed; the others ran
    table = first.stdout[first.stdout.index("job "):]
    assert "star" in table and "ball" in table and "failed: InvalidInputError" in table
    assert "no_such_folder does not exist" in table
    out = tmp_path / "out"
    star_first = load_concept(out / "star.safetensors")
    assert load_concept(out / "ball.safetensors").method == "textual-inversion"
    assert sorted(p.name for p in out.iterdir()) == ["ball.safetensors", "star.safetensors"]  # its checkpoints gone

    # star interrupted at step 4, leaving a resumable checkpoint at step 3 (one thread, as in a queue worker)
    (out / "star.safetensors").unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(TrainingCancelled):
            train(load_host(base_path(), device="cpu"),
                  [ConceptSpec(token="<star>", class_word="star", images=[str(tmp_path / "red_blue_star")])],
                  TrainConfig(**STAR, save_every=3), out=out / "star.safetensors", callbacks=_StopAfter(4))
    finally:
        torch.set_num_threads(threads)
    assert [step for step, _ in run_files(out / "star.safetensors")[1]] == [3]

    rerun = _queue(jobs_file)
    assert rerun.returncode == 1
    table = rerun.stdout[rerun.stdout.index("job "):]
    assert "skipped (done)" in table.splitlines()[2]  # ball: no training
    assert "done (resumed from step 3)" in table.splitlines()[1]
    star = load_concept(out / "star.safetensors")
    assert star.step == 6
    for name, delta in star_first.deltas.items():
        assert torch.allclose(star.deltas[name], delta, rtol=1e-5, atol=1e-10), name


def test_jobs_file_is_checked_before_any_worker_starts(tmp_path):
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([{"token": "<a>", "class_word": "dog", "images": "x"}]))
    with pytest.raises(InvalidInputError, match="no \"out\""):
        load_jobs(path)
    path.write_text(json.dumps([{"token": "<a>", "class_word": "dog", "images": "x", "out": "a.safetensors",
                                 "settings": {"steps": 0}}]))
    with pytest.raises(InvalidInputError, match="steps must be at least 1"):
        load_jobs(path)
    path.write_text(json.dumps([{"token": "<a>", "class_word": "dog", "out": "a.safetensors"},
                                {"token": "<b>", "class_word": "dog", "out": "a.safetensors"}]))
    with pytest.raises(InvalidInputError, match="same file"):
        load_jobs(path)
