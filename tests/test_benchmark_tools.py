"""The CPU memory counter the benchmarks report must count what a GPU allocator would."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from live_memory import LiveTensorMemory  # noqa: E402

MIB = 2 ** 20


def test_counts_live_storages_once_and_forgets_freed_ones():
    weight = torch.nn.Parameter(torch.zeros(256, 1024))  # 1 MiB, alive before tracking
    with LiveTensorMemory() as memory:
        assert memory.baseline_bytes >= MIB
        start = memory.current
        a = torch.ones(1024, 1024)  # 4 MiB
        view = a.view(-1)[: 1024 * 512]  # a view allocates nothing
        b = a * 2  # 4 MiB more
        assert memory.current - start == 8 * MIB
        del a, view, b
        assert memory.current == start
        assert memory.peak_bytes - start == 8 * MIB

        memory.reset_peak()
        x = torch.ones(512, 256, requires_grad=True)  # 0.5 MiB
        (x @ weight).sum().backward()  # backward allocates weight.grad (1 MiB) and x.grad (0.5 MiB)
        assert weight.grad is not None and x.grad is not None
        # alive now: x, x.grad, weight.grad (2 MiB); at the peak: x and the 2 MiB product
        assert abs(memory.current - start - 2 * MIB) < 1024
        assert memory.peak_bytes - start >= 2.5 * MIB
