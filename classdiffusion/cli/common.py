"""What every subcommand shares: argument types and checks, the settings' flags, the help
format, the output configuration, and the tables a subcommand's parser is built from."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import InvalidInputError

logger = logging.getLogger("classdiffusion")

CONCEPT_SUFFIXES = (".safetensors", ".sft")  #: what the loader reads back
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

#: One option of a subcommand: (flags, keyword arguments of ``ArgumentParser.add_argument``).
Argument = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **options: Any) -> Argument:
    """A row of a subcommand's argument table."""
    return flags, options


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, its one-line help, its argument table (built when the parser is,
    so that the registries it lists are read then) and what runs it."""

    name: str
    help: str
    arguments: Callable[[], list[Argument]]
    run: Callable[[argparse.Namespace], int]


def setting_arguments() -> list[Argument]:
    """One option per TrainConfig setting that has a flag, with the help, type and choices
    written on the field (config.setting). Unset options stay None: the config's default or, when
    resuming, the checkpoint's value."""
    import dataclasses

    from ..config import TrainConfig

    rows = []
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("cli")
        if not flag:
            continue
        help_text = f.metadata["help"]
        if isinstance(f.default, bool):
            rows.append(arg(flag, dest=f.name, action="store_const", const=not f.default, default=None,
                            help=help_text + (" (on by default; this turns it off)" if f.default else "")))
            continue
        kind = {int: _positive_int if f.metadata.get("min") == 1 else _whole, float: _finite}.get(type(f.default))
        rows.append(arg(flag, dest=f.name, type=kind, choices=f.metadata.get("choices"), default=None,
                        help=f"{help_text} (default {f.default})"))
    return rows


def check_output_file(value: str, flag: str, suffixes: Sequence[str]) -> Path:
    """Refuse, before any model loads, an output the run could not write or the project could not
    read back: a wrong extension, an existing folder or special file, an unwritable place."""
    path = Path(value)
    if path.is_dir():
        raise InvalidInputError(f"{flag} {value} is a folder; give a file name such as {path / ('out' + suffixes[0])}.")
    if path.suffix.lower() not in suffixes:
        raise InvalidInputError(f"{flag} {value}: the file name must end in {' or '.join(suffixes)} "
                                "(other names are not read back).")
    if path.exists() and not path.is_file():
        raise InvalidInputError(f"{flag} {value} exists and is not a regular file.")
    _check_writable(path.parent, flag)
    return path


def check_output_folder(value: str, flag: str) -> Path:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{flag} {value} is an existing file; give a folder.")
    _check_writable(path, flag)
    return path


def _check_writable(folder: Path, flag: str) -> None:
    """The nearest existing folder on the way to ``folder`` accepts a new file (tried for real: root
    passes permission checks on read-only file systems)."""
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InvalidInputError(f"{flag}: {probe} is a file, so {folder} cannot be created.")
    try:
        fd, name = tempfile.mkstemp(prefix=".classdiffusion-write-test.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise InvalidInputError(f"{flag}: cannot write in {probe} ({exc.strerror}).") from None


def check_device(name: str | None) -> str | None:
    """A device PyTorch knows and this machine has."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidInputError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError("--device cuda: CUDA is not available here (no GPU, or a CPU-only "
                                    "PyTorch); use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s).")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidInputError("--device mps: Apple's MPS is not available here; use --device cpu.")
    elif device.type != "cpu":
        raise InvalidInputError(f"--device {name}: only cpu, cuda and mps are supported.")
    return name


class _DefaultsHelp(argparse.HelpFormatter):
    """Every option's default in its help, unless the help says it already or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: {action.default})".strip()


def _phase_bars(enabled: bool):
    """progress(phase, total) for evaluate(): one tqdm bar per phase on stderr."""

    def phase(name: str, total: int):
        if not enabled or total <= 0:
            return lambda: None
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=name, unit="step", leave=True)

        def advance() -> None:
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()

        return advance

    return phase


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """Add :func:`setting_arguments` to ``parser``."""
    for flags, options in setting_arguments():
        parser.add_argument(*flags, **options)


def setting_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig settings given on the command line."""
    import dataclasses

    from ..config import TrainConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.metadata.get("cli") and getattr(args, f.name, None) is not None}


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _image_size(text: str) -> int:
    value = _positive_int(text)
    if value < 64 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, at least 64 (got {value}); SD1.5: 512")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def _unit(text: str) -> float:
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (got {value})")
    return value


def _share(text: str) -> float:
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (got {value})")
    return value


def configure_output(*, verbose: bool) -> None:
    """What a run prints: our warnings, the memory plan as one plain line, progress bars.

    Without ``-v``, the libraries' own notices are left out: transformers' and diffusers' loading
    bars ("Loading weights", "Writing model shards"), diffusers' advice to install accelerate
    (loading is not slower without it here: docs/development.md) and transformers' note that
    torchvision is missing for image processors the trainer does not use. Their errors still show."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..run.memory import PLAN_LOGGER

    plan_logger = logging.getLogger(PLAN_LOGGER)
    if not verbose and not plan_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        plan_logger.addHandler(handler)
        plan_logger.setLevel(logging.INFO)
        plan_logger.propagate = False
    if not verbose:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for library in (diffusers_logging, transformers_logging):
            library.set_verbosity_error()
            library.disable_progress_bar()


def _read_prompts_file(path: str) -> list[str]:
    from ..evaluation.report import _read_prompts

    try:
        return _read_prompts(path)
    except OSError as exc:
        raise InvalidInputError(f"Cannot read the prompt file {path}: {exc.strerror or exc}.") from None


def _base_cross_attention(args: argparse.Namespace) -> dict:
    from ..hosts.diffusers_host import load_components
    from ..model.kv import cross_attention_weights

    unet = load_components(args.base, base_config=args.base_config)[2]
    return cross_attention_weights(unet, "crossattn")
