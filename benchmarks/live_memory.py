"""Peak bytes of live tensors on the CPU: a stand-in for ``torch.cuda.max_memory_allocated``.

CPU RSS mixes in the Python heap, the allocator's cached pages and libraries, so it says little
about what a GPU would need. This counts what the CUDA caching allocator counts: the storages of
tensors while they are alive. Every storage an operator creates (forward, backward, optimizer)
is seen through a ``TorchDispatchMode`` and dropped from the count when Python's weak reference
to it dies; tensors alive when tracking starts (weights, cached latents) form the baseline.

Not counted, on a GPU as here: workspaces a kernel allocates and frees inside one operator, and
the caching allocator's rounding and fragmentation (a few per cent to ~20 % on top).
"""

from __future__ import annotations

import gc
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from classdiffusion.run.memory import LiveBytes  # noqa: E402


class LiveTensorMemory(LiveBytes):
    """``with LiveTensorMemory() as memory: ...`` then ``memory.peak_bytes``: the planner's byte
    counter (classdiffusion.run.memory.LiveBytes) restricted to one real device, with the tensors alive
    at the start (weights, cached latents) as the baseline."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.baseline_bytes = 0

    @property
    def peak_bytes(self) -> int:
        return self.peak

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device == self.device and not tensor.is_meta:
            super()._track(tensor)

    def __enter__(self):
        gc.collect()
        with warnings.catch_warnings():  # isinstance on deprecated module proxies warns
            warnings.simplefilter("ignore")
            tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
        for tensor in tensors:
            self._track(tensor)
        self.baseline_bytes = self.current
        return super().__enter__()

    def reset_peak(self) -> None:
        self.peak = self.current


class PeakMemory:
    """Peak device memory over a run and over its steady part (after ``split()``):
    ``torch.cuda.max_memory_allocated`` on a GPU, live tensor bytes elsewhere."""

    def __init__(self, device: torch.device, enabled: bool = True):
        """``enabled=False``: count nothing (on the CPU the counter intercepts every operator, which
        slows small-op code more than large-op code; speed comparisons turn it off)."""
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.tracker = None if self.cuda or not enabled else LiveTensorMemory(device.type)
        self.before_split = None
        self.resident = 0

    def _peak(self) -> int:
        if not self.enabled:
            return 0
        return torch.cuda.max_memory_allocated() if self.cuda else self.tracker.peak_bytes

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.tracker is not None:
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        self.end = self._peak()
        if self.tracker is not None:
            self.tracker.__exit__(*exc)

    def split(self) -> None:
        """Called after warm-up: what follows is the steady per-step peak."""
        self.before_split = self._peak()
        self.reserved_before_split = torch.cuda.max_memory_reserved() if self.cuda else 0
        self.resident = torch.cuda.memory_allocated() if self.cuda else (self.tracker.current if self.tracker else 0)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.tracker is not None:
            self.tracker.reset_peak()

    def result(self) -> dict[str, float]:
        """Peak over everything, over the steps after ``split()`` and what stayed allocated
        between steps (weights, trained tensors, optimizer state, caches), in MiB."""
        overall = max(self.end, self.before_split or 0)
        result = {"peak_memory_mib": overall / 2**20, "peak_step_memory_mib": self.end / 2**20,
                  "resident_memory_mib": self.resident / 2**20}
        if self.cuda:  # the most the caching allocator held from the driver
            reserved = max(torch.cuda.max_memory_reserved(), getattr(self, "reserved_before_split", 0))
            result["peak_reserved_mib"] = reserved / 2**20
        return result


class StepClock:
    """Times training steps: ``tick()`` after each calls ``after_warmup`` once the warm-up steps
    are done; ``result()`` gives steps/s over the timed steps, and with ``start`` the one-off setup
    and the extrapolated time of a 500-step run. CUDA is synchronised only at the ticks that
    bound the timed interval (the first, the end of warm-up, the last), so a loop that queues
    steps without reading back is timed as it runs, not with a sync per step."""

    def __init__(self, device, warmup: int, steps: int, after_warmup, start: float | None = None):
        self.device, self.warmup, self.steps, self.after_warmup = device, warmup, steps, after_warmup
        self.start = start
        self.times: list[float] = []

    def tick(self) -> None:
        import time

        if self.device.type == "cuda" and len(self.times) + 1 in (1, self.warmup, self.warmup + self.steps):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if len(self.times) == self.warmup:
            self.after_warmup()

    def result(self) -> dict[str, float]:
        steady = self.times[-1] - self.times[self.warmup - 1]
        out = {"steps_per_s": self.steps / steady}
        if self.start is not None:  # setup includes the one-off encoding of image variants and the first step
            prep = self.times[0] - self.start
            out.update(setup_and_first_step_s=prep, run_500_steps_s=prep + 499 * steady / self.steps)
        return out


class ClockCallbacks:
    """A mixin for training callbacks that ticks ``clock`` as each step is queued (asked before the
    next one starts) and after the last step's losses are read: the trainer reports steps only when
    it reads the losses back, every log_every steps, so ``on_step`` alone would tick in bursts."""

    clock: StepClock
    started = 0

    def should_stop(self) -> bool:
        if self.started:
            self.clock.tick()
        self.started += 1
        return super().should_stop()

    def on_step(self, record, total_steps: int) -> None:
        super().on_step(record, total_steps)
        if record.step == total_steps:
            self.clock.tick()


def add_run_arguments(parser, mixed_precision: str) -> None:
    """The settings both benchmark scripts share."""
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=mixed_precision)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-memory", action="store_true",
                        help="do not count CPU memory (its per-operator counter slows small models: use for speed ratios)")


#: The settings a result records.
RUN_SETTINGS = ("model", "resolution", "batch_size", "steps", "warmup", "mixed_precision", "gradient_checkpointing")
