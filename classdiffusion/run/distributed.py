"""Data-parallel training under torchrun, on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

The frozen models are not wrapped: each rank holds them, draws its own micro-batches from (seed,
step, global micro-batch index) and back-propagates; the trained tensors' gradients — small: K/V
deltas, residuals, token rows — are summed across ranks in one flat bucket before the optimizer
step, which every rank then takes identically. So N ranks × batch b × accumulation a equals one
process with batch b and accumulation N·a. Rank 0 alone writes files, samples previews and logs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ClassDiffusionError

#: Seconds a collective waits for the other ranks before the run ends with an error (a rank that
#: died or hangs); ``CLASSDIFFUSION_DIST_TIMEOUT`` overrides it.
DEFAULT_TIMEOUT_S = 600


class RankFailedError(ClassDiffusionError):
    """Another rank of a data-parallel run failed or stopped answering."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_batches(self, accumulation: int) -> range:
        """The global micro-batch indices this rank computes in one optimizer step."""
        return range(self.rank * accumulation, (self.rank + 1) * accumulation)

    def _collective(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        import torch.distributed as dist

        try:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        except RuntimeError as exc:  # gloo/NCCL: a peer died, or the timeout passed
            raise RankFailedError(
                f"Rank {self.rank} of {self.world}: another training process failed or stopped answering "
                f"({str(exc).splitlines()[0][:160]}); the run ends on every rank. See that process's error above."
            ) from None
        return tensor

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Sum every trained tensor's gradient over the ranks, as one flat bucket."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self._collective(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset:offset + grad.numel()].view_as(param).clone()
            offset += grad.numel()

    def sum_values(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sums over the ranks of a tensor on the device (losses for the history; NaN
        propagates); no host read."""
        if self.world == 1:
            return values
        return self._collective(values.clone())

    def smallest(self, value: int, device: torch.device) -> int:
        """The smallest of the ranks' values (free memory: every rank plans for the tightest device,
        so all choose the same settings, or all refuse)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        return int(self._collective(torch.tensor([float(value)], dtype=torch.float64, device=device),
                                    dist.ReduceOp.MIN).item())

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is True on any (a stop request, a diverged loss)."""
        if self.world == 1:
            return flag
        return bool(self._collective(torch.tensor([float(flag)], device=device)).item() > 0)


SINGLE = Ranks()


def from_environment(device: str | None) -> tuple[Ranks, str | None]:
    """(the ranks, the device to train on): under torchrun (``WORLD_SIZE`` > 1) join its process
    group — gloo for the CPU, NCCL for CUDA with one GPU per local rank; otherwise a single run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = device.startswith("cuda")
    if on_cuda:
        if ":" in device:
            raise ClassDiffusionError(f"Under torchrun each process takes its own GPU (cuda:LOCAL_RANK); use "
                                      f"--device cuda instead of {device}.")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=float(os.environ.get("CLASSDIFFUSION_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timeout)
    return Ranks(rank, world), device


def finish(ranks: Ranks) -> None:
    """Leave the process group (torchrun runs)."""
    if ranks.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
