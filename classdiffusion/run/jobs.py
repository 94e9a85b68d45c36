"""A queue of training jobs spread over devices (``classdiffusion queue JOBS.json``).

Each job trains one concept file: a ``--concepts`` entry (token, class word, images, …) plus
``out``, optional ``settings`` (TrainConfig fields; the method's recipe under them) and ``base``.
Worker processes (``concurrent.futures`` over spawned interpreters) hold one device each and take
one job at a time; a failing job is reported and the others go on. Jobs write step checkpoints,
so rerunning the same queue skips the finished ones (their file exists) and resumes the
interrupted ones from their latest checkpoint.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..concept import run_files
from ..config import ConceptSpec, TrainConfig
from ..errors import InvalidInputError
from .train import TrainCallbacks

#: Step checkpoints per job when its settings name none: what a rerun resumes from.
CHECKPOINTS_PER_JOB = 10
_JOB_KEYS = {"out", "settings", "base", "name"}


@dataclass
class Job:
    name: str
    out: Path
    concept: dict[str, Any]  #: a --concepts entry, paths absolute
    settings: dict[str, Any] = field(default_factory=dict)
    base: str | None = None


@dataclass
class JobResult:
    name: str
    status: str  #: done, skipped (already done), failed
    out: Path
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None
    message: str = ""

    @property
    def steps_per_second(self) -> float | None:
        return self.steps / self.seconds if self.steps and self.seconds > 0 else None


def load_jobs(path: str | Path) -> list[Job]:
    """The jobs of a JOBS.json (a list of objects; relative paths are relative to the file). Each
    concept and its settings are checked here, before any worker starts."""
    path = Path(path).resolve()
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise InvalidInputError(f"The jobs file {path} does not exist.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"The jobs file {path} is not valid JSON: {str(exc)[:120]}.") from None
    if not isinstance(raw, list) or not raw or not all(isinstance(item, dict) for item in raw):
        raise InvalidInputError(f"The jobs file {path} must hold a non-empty list of job objects.")
    jobs = []
    for k, item in enumerate(raw):
        if "out" not in item:
            raise InvalidInputError(f"Job {k + 1} of {path} has no \"out\" (the concept file to write).")
        concept = {key: value for key, value in item.items() if key not in _JOB_KEYS}
        spec = ConceptSpec.from_dict(concept, base_dir=path.parent)  # refuses bad concepts with their key
        settings = item.get("settings", {})
        job_config(settings)  # refuses bad settings
        out = Path(item["out"]) if Path(item["out"]).is_absolute() else path.parent / item["out"]
        base = item.get("base")
        if base is not None and not Path(base).is_absolute():
            base = str(path.parent / base)
        jobs.append(Job(name=str(item.get("name", out.stem)), out=out.resolve(), concept=spec.to_dict(),
                        settings=dict(settings), base=base))
    outs = [job.out for job in jobs]
    if len(set(outs)) != len(outs):
        raise InvalidInputError("Two jobs write the same file; give each job its own \"out\".")
    return jobs


_DEVICE: str | None = None


def _take_device(devices, workers: int) -> None:
    """Worker initializer: this process trains on one device for its whole life (CPU workers share
    the cores evenly)."""
    global _DEVICE
    import torch

    _DEVICE = devices.get()
    if _DEVICE == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def job_config(settings: dict[str, Any]):
    """A job's TrainConfig: its method's recipe under its settings."""
    rest = {key: value for key, value in settings.items() if key != "method"}
    return TrainConfig.for_method(settings.get("method", TrainConfig.method), **rest)


class _LatestCheckpointOnly(TrainCallbacks):
    """The queue's own checkpoints exist to resume from: each new one replaces the last."""

    def on_checkpoint(self, path: Path) -> None:
        for _, older in run_files(path)[1]:
            if older != path:
                older.unlink(missing_ok=True)


def run_job(job: Job, default_base: str | None) -> JobResult:
    """Train one job on this worker's device; skip it if its file exists, resume it from its latest
    resumable checkpoint if one exists. Never raises: a failure is a result."""
    started = time.perf_counter()
    try:
        from ..concept import load_concept, read_metadata
        from ..hosts.diffusers_host import load_host
        from ..model.precision import precision_dtype
        from .resume import resume_settings
        from .train import train

        final, steps = run_files(job.out)
        if final.is_file():
            return JobResult(job.name, "skipped (done)", final, steps=read_metadata(final).step)
        config = job_config(job.settings)
        own_checkpoints = "save_every" in job.settings  # else the queue's, for resuming only: the latest kept
        if not own_checkpoints:
            config = TrainConfig.from_dict({**config.to_dict(), "save_every": max(1, config.steps // CHECKPOINTS_PER_JOB)})
        specs = [ConceptSpec.from_dict(job.concept)]
        resume = None
        for _, checkpoint in reversed(steps):  # the latest resumable one: its settings, as planned then
            candidate = load_concept(checkpoint)
            if candidate.resumable:
                resume = candidate
                config, specs = resume_settings(candidate, {"steps": config.steps})
                break
        base = job.base or default_base
        if base is None:
            raise InvalidInputError("no base: give the job a \"base\" or the queue --base")
        host = load_host(base, device=_DEVICE or "cpu", dtype=precision_dtype(config.mixed_precision))
        if resume is None:  # e.g. an SDXL base trains at 1024 px unless the job's settings say otherwise
            config = config.with_family_defaults(host.family, explicit=job.settings)
        keep = TrainCallbacks() if own_checkpoints else _LatestCheckpointOnly()
        result = train(host, specs, config, out=job.out, resume=resume, callbacks=keep,
                       meta_extra={"base_name": Path(base).name, "queue_job": job.name})
        if not own_checkpoints:
            for _, checkpoint in run_files(job.out)[1]:
                checkpoint.unlink(missing_ok=True)
        done = config.steps - (resume.step if resume is not None else 0)
        return JobResult(job.name, "done", result.path, steps=done, seconds=time.perf_counter() - started,
                         resumed_from=resume.step if resume is not None else None)
    except Exception as exc:  # noqa: BLE001  (a job's failure is reported; the queue goes on)
        return JobResult(job.name, "failed", job.out, seconds=time.perf_counter() - started,
                         message=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")


def run_queue(jobs: Sequence[Job], devices: Sequence[str], *, base: str | None = None,
              on_result: Callable[[JobResult], None] = lambda result: None) -> list[JobResult]:
    """Run every job, one per device at a time, in worker processes; results in job order."""
    context = multiprocessing.get_context("spawn")
    slots = context.Manager().Queue()
    for device in devices:
        slots.put(device)
    results: dict[int, JobResult] = {}
    with ProcessPoolExecutor(max_workers=len(devices), mp_context=context, initializer=_take_device,
                             initargs=(slots, len(devices))) as pool:
        futures = {pool.submit(run_job, job, base): k for k, job in enumerate(jobs)}
        for future in as_completed(futures):
            results[futures[future]] = result = future.result()
            on_result(result)
    return [results[k] for k in range(len(jobs))]


def summary_table(results: Sequence[JobResult]) -> str:
    """job | status | steps/s | file, one line per job."""
    rows = [("job", "status", "steps/s", "file")]
    for r in results:
        rate = f"{r.steps_per_second:.2f}" if r.steps_per_second else "–"
        status = r.status + (f" (resumed from step {r.resumed_from})" if r.resumed_from else "")
        status += f": {r.message}" if r.message else ""
        rows.append((r.name, status, rate, str(r.out)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row)) for row in rows)
