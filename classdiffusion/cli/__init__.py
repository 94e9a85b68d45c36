"""`classdiffusion train | queue | generate | inspect | eval | pick | compress | import-diffusers |
export-diffusers | demo` — the trainer outside ComfyUI. One module per subcommand, each with its
argument table (``COMMAND``); this module builds the parser from them and runs one."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from ..errors import ClassDiffusionError, TrainingCancelled
from . import (compress, demo, evaluate, export_diffusers, generate, import_diffusers, inspect, pick, queue,
               train)
from .common import _DefaultsHelp, add_setting_arguments, configure_output, setting_overrides

#: Every subcommand, in the order ``--help`` lists them.
COMMANDS = [module.COMMAND for module in (train, queue, generate, inspect, evaluate, pick, compress, import_diffusers,
                                           export_diffusers, demo)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="classdiffusion", description="The ClassDiffusion trainer outside ComfyUI.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        child = sub.add_parser(command.name, formatter_class=_DefaultsHelp, help=command.help)
        for flags, options in command.arguments():
            child.add_argument(*flags, **options)
        child.set_defaults(func=command.run)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so that every cleanup (temporary files) runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_output(verbose=args.verbose)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except TrainingCancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return 130
    except ClassDiffusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated):  # while models load or files are written
        print("cancelled; nothing partial was written (files are written whole or not at all).", file=sys.stderr)
        return 130
    except OSError as exc:  # a disk filled up, a folder vanished, a permission changed mid-run
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["COMMANDS", "build_parser", "main", "add_setting_arguments", "setting_overrides", "configure_output"]
