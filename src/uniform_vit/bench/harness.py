"""Timing on a noisy machine: warm-up, then interleaved rounds (every candidate once per round), medians.

Interleaving means a burst of load from elsewhere hits every candidate in the same round, so per-round ratios
between candidates stay meaningful even when absolute times drift.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def interleaved_timing(fns: dict[str, Callable[[], object]], rounds: int = 10, warmup: int = 2, inner: int = 1,
                       device: str | torch.device | None = None, clock: Callable[[], float] = time.perf_counter,
                       on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each fn, one entry per round. Each round runs every fn ``inner`` times, in turn.

    ``clock`` is injectable so tests can drive the harness with a fake clock.
    """
    if rounds < 1 or warmup < 0 or inner < 1:
        raise ValueError(f"need rounds >= 1, warmup >= 0, inner >= 1 (got {rounds}, {warmup}, {inner})")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((clock() - t0) / inner)
        if on_round is not None:
            on_round(r)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """Relative spread: (p75 - p25) / median, 0 for fewer than 2 samples."""
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method='inclusive')
    return (q[2] - q[0]) / statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of time(b)/time(a): how many times faster a is than b, round by round."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_ratio needs two equally long, non-empty series")
    return statistics.median(tb / ta for ta, tb in zip(a, b))
