"""Wall time of one call (CUDA events on a GPU, ``perf_counter`` on a CPU) and the median / IQR of repeats."""

from __future__ import annotations

import statistics
import time


def timed(fn, device):
    """``(seconds, fn())``. On CUDA the queue is drained before and after, so the time covers the kernels."""
    import torch

    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000, out
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median_spread(values: list[float]) -> tuple[float, float]:
    """Median and interquartile range (0 for a single value): robust to the odd slow repeat."""
    if len(values) < 2:
        return values[0], 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q3 - q1
