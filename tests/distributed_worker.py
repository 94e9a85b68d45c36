"""A torchrun worker for tests/test_distributed.py: trains on the toy base with one rank made to
misbehave at step 2 (``die``: exits; ``hang``: stops answering; ``stop``: asks to cancel) or
see too little memory (``plan``), and prints what happened on each rank.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py MODE OUT_DIR
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classdiffusion.config import ConceptSpec, TrainConfig  # noqa: E402
from classdiffusion.run.distributed import RankFailedError, finish, from_environment  # noqa: E402
from classdiffusion.errors import InvalidInputError, TrainingCancelled  # noqa: E402
from classdiffusion.hosts.diffusers_host import load_host  # noqa: E402
from classdiffusion.toyworld.base import base_path  # noqa: E402
from classdiffusion.toyworld.evaluate import instance_pictures  # noqa: E402
from classdiffusion.run.train import TrainCallbacks, train  # noqa: E402


class Misbehave(TrainCallbacks):
    """Asked before every step (``should_stop``), so it counts the steps done itself: the loop reports
    records (``on_step``) only when it reads the losses back, every log_every steps."""

    def __init__(self, mode: str, rank: int):
        self.mode, self.rank, self.step = mode, rank, 0

    def should_stop(self) -> bool:
        step, self.step = self.step, self.step + 1
        if self.rank == 1 and step == 2:
            if self.mode == "die":
                os._exit(3)
            if self.mode == "hang":
                time.sleep(3600)
            return self.mode == "stop"
        return False


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    ranks, device = from_environment("cpu")
    host = load_host(base_path(), device=device)
    # "plan": the ranks see different free memory (rank 1: 1 MiB, too little for anything)
    memory = dict(memory="auto", memory_limit_mib=100_000 if ranks.rank == 0 else 1) if mode == "plan" else {}
    config = TrainConfig(**{"steps": 5, "resolution": 64, "batch_size": 1, "augment": False, "memory": "off",
                            **memory})
    try:
        train(host, [ConceptSpec(token="<sks>", class_word="star")], config,
              images=[instance_pictures("red_blue_star", count=2)], out=out / "concept.safetensors",
              callbacks=Misbehave(mode, ranks.rank), ranks=ranks)
        print(f"rank {ranks.rank}: finished", flush=True)
    except TrainingCancelled as exc:
        print(f"rank {ranks.rank}: cancelled: {exc}", flush=True)
        sys.exit(130)
    except InvalidInputError as exc:
        print(f"rank {ranks.rank}: refused: {exc}", flush=True)
        sys.exit(2)
    except RankFailedError as exc:
        print(f"rank {ranks.rank}: {exc}", flush=True)
        sys.exit(1)
    finally:
        finish(ranks)


if __name__ == "__main__":
    main()
