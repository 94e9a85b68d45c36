"""What a training run hands around: a step's record, a batch, the step whose losses are still on
the device, the callbacks it calls, the result it returns, and the seeds and file names a run
derives."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..concept import Concept
from ..methods.base import LossLayout


@dataclass
class StepRecord:
    """What one optimisation step measured (also one entry of the saved loss history): the total,
    the method's named loss terms and diagnostics (ClassDiffusion: recon, spl, prior / cos)."""

    step: int
    loss: float
    terms: dict[str, float]
    lr: float
    diagnostics: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    #: Each concept's drift rank among the adjective phrases (steps where it was measured).
    drift_rank: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The history entry: ``{"step", "loss", <terms>, <diagnostics>, "lr"[, "drift_rank"]}``, the
        layout concept files have always had (e.g. recon, spl, cos)."""
        out = {"step": self.step, "loss": self.loss, **self.terms, **self.diagnostics, "lr": self.lr}
        if self.drift_rank is not None:
            out["drift_rank"] = self.drift_rank
        return out


@dataclass
class Batch:
    """One step's inputs; the first ``len(prompts)`` rows are concept images, any further rows
    class images (prior preservation), whose contexts are the class phrases of ``prior_owners``."""

    noisy: torch.Tensor  #: x_t [B(+P), 4, h, w]
    noise: torch.Tensor  #: ε, the target
    timesteps: torch.Tensor  #: t per row
    mask: torch.Tensor  #: [B, 1, h, w] valid latent cells of the concept rows
    prompts: list[str]  #: the concept rows' training phrases
    prior_owners: list[int] = field(default_factory=list)  #: concept index of each class row


@dataclass
class PendingStep:
    """A step whose loss values are still on the device (``TrainingRun.read_steps`` reads them)."""

    step: int
    values: torch.Tensor  #: Losses.stacked(), averaged over micro-batches (and ranks)
    layout: LossLayout
    lr: float
    seconds: float


class TrainCallbacks:
    """How a host (CLI, ComfyUI) follows and stops training without the loop importing it."""

    def on_step(self, record: StepRecord, total_steps: int) -> None:
        """Called for every step, in order, when the loop reads the losses back (every
        ``log_every`` steps or second, and before drift logs, previews and checkpoints): count
        steps in ``should_stop`` where the exact step matters."""

    def should_stop(self) -> bool:
        """Return True to cancel; checked before every step. Nothing partial is written."""
        return False

    def on_checkpoint(self, path: Path) -> None:
        """Called after an intermediate checkpoint was written."""

    def on_validation(self, step: int, images: list, grid, path: Path | None) -> None:
        """Called after each validation: the step's images (PIL), the grid so far, its file if saved."""


@dataclass
class TrainResult:
    concept: Concept
    path: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: the validation previews (rows = prompts, columns = steps), when validation was on
    validation_grid: Any = None
    validation_seconds: float = 0.0
    seconds: float = 0.0


def derive_seed(seed: int, *parts: Any) -> int:
    """A stable 63-bit seed for (seed, parts...): per-step randomness without carried RNG state."""
    digest = hashlib.sha256(repr((int(seed),) + parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def checkpoint_path(out: Path, step: int) -> Path:
    return out.with_name(f"{out.stem}-step{step:05d}{out.suffix or '.safetensors'}")
