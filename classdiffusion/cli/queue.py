"""`classdiffusion queue`: a list of runs, one job per device at a time; a rerun skips finished jobs."""

from __future__ import annotations

import argparse
import logging

from ..errors import InvalidInputError
from .common import Argument, Command, arg, check_device, _positive_int

logger = logging.getLogger("classdiffusion")


def cmd_queue(args: argparse.Namespace) -> int:
    """Every job of JOBS.json, one per device at a time; a summary table at the end. Exit 1 if a
    job failed (the others still ran)."""
    import torch

    from ..run.jobs import load_jobs, run_queue, summary_table

    jobs = load_jobs(args.jobs)
    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        for device in devices:
            check_device(device)
    elif torch.cuda.is_available():
        devices = [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    else:
        devices = ["cpu"]
    if args.workers:
        if devices != ["cpu"]:
            raise InvalidInputError("--workers is for the CPU; with GPUs give --devices (one job per device).")
        devices = ["cpu"] * args.workers
    print(f"{len(jobs)} job(s) on {len(devices)} worker(s): {', '.join(devices)}", flush=True)
    results = run_queue(jobs, devices, base=args.base,
                        on_result=lambda r: print(f"{r.name}: {r.status}{': ' + r.message if r.message else ''}",
                                                  flush=True))
    print(summary_table(results))
    return 1 if any(r.status == "failed" for r in results) else 0


def _queue_arguments() -> list[Argument]:
    return [
        arg("jobs", help="JOBS.json: a list of --concepts entries, each with \"out\" and optional "
            "\"settings\" and \"base\" (docs/cli.md)"),
        arg("--devices", help="comma-separated devices, e.g. cuda:0,cuda:1 (default: every GPU, else "
            "the CPU)"),
        arg("--workers", type=_positive_int, default=None,
            help="CPU worker processes (the CPU's cores are shared among them); default 1"),
        arg("--base", help="the base of jobs that name none"),
    ]


COMMAND = Command(
    'queue',
    "train a list of concepts, one job per device at a time; a rerun skips finished jobs and resumes "
             "interrupted ones",
    _queue_arguments,
    cmd_queue,
)
