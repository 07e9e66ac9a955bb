"""Timing (CUDA events on a GPU, ``perf_counter`` on a CPU): one call, each decode step of a ``generate`` call,
and the statistics of timed rounds: median / IQR, and the paired ratio to a reference with a bootstrap interval."""

from __future__ import annotations

import random
import statistics
import time

now = time.perf_counter  # the CPU clock; a module global so that tests can swap in a fake one
RESAMPLES = 1000
NOISY_WIDTH = 0.2  # an interval wider than ±10 % of its ratio says nothing about a speed-up


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
    start = now()
    out = fn()
    return now() - start, out


def step_clock(device):
    """A transformers stopping criterion that never stops generation but stamps every step, right after each new
    token; ``intervals()`` (after ``generate`` returns) are the seconds between consecutive stamps, one decode step
    each. Prefill ends at the first stamp, so it is in no interval."""
    import torch
    from transformers import StoppingCriteria

    cuda = device.type == "cuda"

    class StepClock(StoppingCriteria):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores, **kwargs):
            if cuda:  # an event in the stream: no synchronize inside the loop, so the steps keep their pace
                self.stamps.append(torch.cuda.Event(enable_timing=True))
                self.stamps[-1].record()
            else:
                self.stamps.append(now())
            return input_ids.new_zeros(input_ids.shape[0], dtype=torch.bool)

        def intervals(self) -> list[float]:
            pairs = list(zip(self.stamps, self.stamps[1:]))
            if cuda:
                torch.cuda.synchronize(device)
                return [a.elapsed_time(b) / 1000 for a, b in pairs]
            return [b - a for a, b in pairs]

    return StepClock()


def median_spread(values: list[float]) -> tuple[float, float]:
    """Median and interquartile range (0 for a single value): robust to the odd slow repeat."""
    if len(values) < 2:
        return values[0], 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q3 - q1


def paired_ratio(values: list[float], reference: list[float], seed) -> tuple[float, float, float]:
    """``(ratio, lo, hi)``: the median of the per-round ratios ``values[i] / reference[i]`` and a percentile
    bootstrap 95 % interval of that median (rounds resampled with replacement, ``RESAMPLES`` times, seeded).

    Pairing by round cancels the drift both saw in that round."""
    ratios = [v / r for v, r in zip(values, reference, strict=True)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(RESAMPLES))
    tail = RESAMPLES // 40  # 2.5 % of the resamples lie below lo and as many above hi
    return statistics.median(ratios), medians[tail], medians[-1 - tail]


def too_wide(ratio: float, lo: float, hi: float) -> bool:
    return hi - lo > NOISY_WIDTH * ratio
