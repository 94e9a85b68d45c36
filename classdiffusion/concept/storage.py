"""Writing files whole or not at all, and finding a run's files: what every file the pack writes
(concepts, checkpoints, embeddings, reports, plots) relies on so that a crash or a cancel never
leaves a partial file where a good one was."""

from __future__ import annotations

import glob
import os
import re
import stat
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ConceptFileError

_STEP_FILE = re.compile(r"(?P<stem>.+)-step(?P<step>\d{5,})")


def run_files(path: str | Path) -> tuple[Path, list[tuple[int, Path]]]:
    """A run's final file and its step checkpoints ``STEM-stepNNNNN.safetensors`` (sorted by step),
    given the final file or any of its checkpoints; the final file may not exist (a cancelled run)."""
    path = Path(path)
    match = _STEP_FILE.fullmatch(path.stem)
    final = path.with_name(f"{match['stem']}{path.suffix}") if match else path
    steps = []
    for candidate in final.parent.glob(f"{glob.escape(final.stem)}-step*{final.suffix}"):
        found = _STEP_FILE.fullmatch(candidate.stem)
        if found and found["stem"] == final.stem and candidate.is_file():
            steps.append((int(found["step"]), candidate))
    return final, sorted(steps)


#: A temporary file of ours older than this is a leftover of a killed save (SIGKILL, power loss).
STALE_TEMP_SECONDS = 60.0


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete leftovers ``.NAME.xxxxxxxx.tmp`` of earlier saves to ``path`` (only our own naming,
    only regular files not touched for STALE_TEMP_SECONDS); returns what was removed."""
    import time

    removed = []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    now = time.time()
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for candidate in candidates:
        try:
            info = candidate.lstat()
            if (pattern.fullmatch(candidate.name) and stat.S_ISREG(info.st_mode)
                    and now - info.st_mtime > STALE_TEMP_SECONDS):
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            continue
    return removed


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors save that never leaves a partial file at ``path`` (a crash keeps the old one;
    an interrupted save removes its temporary file, and a killed one's is removed next time)."""
    _write_whole(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (reports, plots), as concept files are written."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    _write_whole(Path(path), write)


def _write_whole(path: Path, write) -> None:
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_regular_file(path: Path, what: str = "file") -> None:
    """Only regular files are opened: a named pipe or device would block a read forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConceptFileError(f"The {what} {path} does not exist.") from None
    except OSError as exc:
        raise ConceptFileError(f"The {what} {path} cannot be read ({exc.strerror}).") from None
    if stat.S_ISDIR(mode):
        raise ConceptFileError(f"{path} is a folder, not a {what}.")
    if not stat.S_ISREG(mode):
        raise ConceptFileError(f"{path} is not a regular file (a pipe or device?); give a {what} on disk.")


