"""`classdiffusion inspect`: a concept file's metadata, and its run's step files."""

from __future__ import annotations

import argparse
import json
import sys

from ..model.families import FAMILIES
from .common import Argument, Command, arg


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..concept import checkpoint_table, read_metadata, run_files
    from ..methods import METHOD_CLASSES

    parsed = read_metadata(args.file)
    meta = {**parsed.to_dict(), "method_label": METHOD_CLASSES[parsed.method].label,
            "family_label": FAMILIES[parsed.family].label}
    if run_files(args.file)[1]:  # the run saved step checkpoints: list them to pick the best step
        meta["run_checkpoints"] = checkpoint_table(args.file)
    if not args.history:
        history = meta.pop("history", [])
        meta["history_steps"] = len(history)
        if history:
            meta["history_last"] = history[-1]
    json.dump(meta, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


def _inspect_arguments() -> list[Argument]:
    return [
        arg("file"),
        arg("--history", action="store_true", help="include the per-step loss history"),
    ]


COMMAND = Command(
    'inspect',
    "print a concept file's metadata as JSON (with its run's step checkpoints, if any)",
    _inspect_arguments,
    cmd_inspect,
)
