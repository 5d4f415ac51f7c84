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
                       on_round: Callable[[int], None] | None = None, rewarm: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each fn, one entry per round. Each round runs every fn ``inner`` times, in turn.

    ``rewarm``: untimed calls of each fn right before its timed ones in every round. Without them a candidate's
    timed call starts with the caches full of the previous candidate's weights and activations, so its time depends
    on which other candidates are in the rotation; with one, each is timed in the steady state of running it alone
    (as a deployed model runs), while load bursts still hit every candidate in the same round.
    ``clock`` is injectable so tests can drive the harness with a fake clock.
    """
    if rounds < 1 or warmup < 0 or inner < 1 or rewarm < 0:
        raise ValueError(f"need rounds >= 1, warmup >= 0, inner >= 1, rewarm >= 0 "
                         f"(got {rounds}, {warmup}, {inner}, {rewarm})")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            for _ in range(rewarm):
                fn()
            _sync(device)
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
