"""Waiting for a device and timing work on it, shared by the runtime, the autotuner, the bench
and the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
from torch.profiler import record_function

# Whether a torch profiler is recording (private in torch; where it is missing, always label).
_profiler_enabled = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", lambda: True)


def synchronize(device: str | torch.device | None) -> None:
    """Wait for the kernels queued on ``device`` (a CUDA device); a no-op on the CPU and for
    None. Call it around a timed region so the clock covers the work, not its launch."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def profiled(label: str) -> ContextManager:
    """``torch.profiler.record_function(label)`` while a profiler records, else nothing:
    entering and leaving one costs microseconds even with no profiler on, a visible share of a
    llama.cpp decode step (``benchmarks/round_ops.py``)."""
    return record_function(label) if _profiler_enabled() else nullcontext()


def median_seconds(fn: Callable[[], object], repeats: int, device: str | torch.device | None = None) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after one warm-up call; on a GPU
    each sample waits for the queued kernels (:func:`synchronize`) before and after."""
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)
