"""Data-parallel training under torchrun on the CPU (gloo), on the committed toy base."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from classdiffusion.concept import load_concept
from classdiffusion.run.distributed import Ranks
from classdiffusion.toyworld.base import base_path
from classdiffusion.toyworld.evaluate import instance_pictures

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def _env(**extra) -> dict:
    # one thread per process on both sides, so both runs add in the same order (bit-identical)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _torchrun(args, timeout=300, **env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(**env), cwd=REPO)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("star")
    for k, picture in enumerate(instance_pictures("red_blue_star", count=3)):
        picture.save(folder / f"{k}.png")
    return folder


def _train_args(pictures: Path, out: Path, *more: str) -> list[str]:
    return ["-m", "classdiffusion", "train", "--base", str(base_path()), "--images", str(pictures), "--token",
            "<sks>", "--class-word", "star", "--out", str(out), "--steps", "3", "--resolution", "64", "--device",
            "cpu", "--no-augment", "--quiet", *more]


def test_micro_batches_of_each_rank_tile_the_step():
    assert [list(Ranks(r, 3).micro_batches(2)) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert list(Ranks().micro_batches(4)) == [0, 1, 2, 3]


@pytest.mark.slow  # two torchrun processes on the toy base
def test_two_ranks_equal_one_process_with_accumulation_two(pictures, tmp_path):
    ddp = _torchrun(_train_args(pictures, tmp_path / "ddp" / "c.safetensors", "--save-every", "2"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, *_train_args(pictures, tmp_path / "one" / "c.safetensors",
                                                          "--gradient-accumulation", "2")],
                            capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert single.returncode == 0, single.stderr[-3000:]
    # rank 0 alone writes: the concept and its one step checkpoint, nothing twice
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["c-step00002.safetensors", "c.safetensors"]
    assert ddp.stdout.count("saved ") == 1
    a, b = load_concept(tmp_path / "one" / "c.safetensors"), load_concept(tmp_path / "ddp" / "c.safetensors")
    for name, delta in a.deltas.items():
        assert torch.allclose(b.deltas[name], delta, rtol=1e-5, atol=1e-12), name
    assert torch.allclose(b.token_vectors, a.token_vectors, rtol=1e-5, atol=1e-12)
    assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-5)
    assert b.meta.extra["ranks"] == 2 and "ranks" not in a.meta.extra

    # the 2-rank checkpoint resumes in one process
    resumed = subprocess.run([sys.executable, *_train_args(pictures, tmp_path / "resumed.safetensors")[:2], "train",
                              "--base", str(base_path()), "--resume", str(tmp_path / "ddp" / "c-step00002.safetensors"),
                              "--steps", "4", "--out", str(tmp_path / "resumed.safetensors"), "--device", "cpu",
                              "--quiet"], capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_concept(tmp_path / "resumed.safetensors").step == 4


@pytest.mark.slow  # four two-rank runs, one waiting out a timeout (~50 s)
@pytest.mark.parametrize("mode,says", [
    ("stop", "cancelled"),  # one rank asks to stop: every rank stops at the same step
    ("die", "exitcode  : 3"),  # a rank exits: torchrun ends the others and names it, no concept
    ("hang", "stopped answering"),  # a rank hangs: the others end after the timeout with a clear error
    ("plan", "Not enough memory"),  # one rank's device is too small: every rank refuses, none waits
])
def test_a_rank_that_stops_dies_or_hangs_ends_the_run_everywhere(tmp_path, mode, says):
    started = time.perf_counter()
    result = _torchrun([str(WORKER), mode, str(tmp_path)], timeout=240, CLASSDIFFUSION_DIST_TIMEOUT="10")
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert seconds < 200, seconds
    assert not (tmp_path / "concept.safetensors").exists()
    assert says in output, output[-3000:]
    if mode == "stop":
        assert output.count("cancelled: Training was cancelled at step 2") == 2, output[-3000:]
    if mode == "plan":
        assert output.count("refused: Not enough memory") == 2 and seconds < 60, output[-3000:]
