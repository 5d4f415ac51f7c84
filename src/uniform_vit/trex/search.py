"""Choosing the reuse layers: a cheap similarity proxy, then a greedy search checked by measured latency.

1. :func:`layer_similarity` runs calibration images through the model once and scores every (layer, earlier layer)
   pair of the same stage: for map reuse, how much the two softmax maps overlap (mean over rows, heads and images of
   sum(min(A, B)) = 1 - total-variation distance, 1 for equal maps); for output reuse, the share of the layer's
   attention-output variance that a per-channel affine map of the earlier output explains (variance-weighted
   corr^2), which is exactly what the 'channel' transform can fit.
   :func:`loss_score` is the costlier alternative: minus the calibration cross-entropy of each candidate plan.
2. :func:`greedy_search` starts from no reuse and adds, one layer at a time, the candidate whose plan keeps the
   highest total proxy score (sources are re-resolved each step, so chains are scored right), MEASURING the
   latency ratio of each plan against the original with the interleaved benchmark harness (BN-fused, traced, one
   thread), until the ratio meets the budget; the plan is then re-measured with more rounds to confirm it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bench.harness import interleaved_timing, median, paired_ratio, spread
from ..errors import UserError
from ..layers.fuse import reparameterize
from .reuse import MODES, AttentionBus, apply_reuse, attention_layers, resolve_plan

# ---------------------------------------------------------------------------------------------------------------
# proxy


def _capture_model(model: nn.Module) -> tuple[nn.Module, AttentionBus, int]:
    """A copy of ``model`` in which every attention layer publishes its map and output onto one bus."""
    from .reuse import TimmSourceAttention, UniformMHASourceAttention, UniformSourceAttention

    m = apply_reuse(model, [])  # deep copy, checks the model is supported
    layers = attention_layers(m)
    bus = AttentionBus()
    cls = {'timm': TimmSourceAttention, 'uniform': UniformSourceAttention, 'uniform_mha': UniformMHASourceAttention}
    for L in layers:
        setattr(L.parent, L.attr, cls[L.family](L.module, bus, L.index, frozenset({'map', 'output'})))
    return m.eval(), bus, len(layers)


@torch.no_grad()
def layer_similarity(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, dict[tuple[int, int], float]]:
    """Proxy scores in [0, 1] for every (layer i, earlier layer j) pair of one stage: {'attn': {...}, 'output': {...}}.

    ``batches``: calibration image tensors (B, C, H, W).
    """
    stages = [L.stage for L in attention_layers(model)]
    cap, bus, n = _capture_model(model)
    pairs = [(i, j) for i in range(n) for j in range(i) if stages[i] == stages[j]]
    overlap = dict.fromkeys(pairs, 0.0)
    rows = dict.fromkeys(pairs, 0)
    # per-channel sums between output j (x) and output i (y): sx, sy, sxx, syy, sxy, count
    mom: dict[tuple[int, int], list] = {p: [0.0] * 6 for p in pairs}
    seen = False
    for x in batches:
        seen = True
        bus.store.clear()
        cap(x)
        maps = {i: bus.store[(i, 'map')].float() for i in range(n)}
        outs = {i: _channels_last(bus.store[(i, 'output')].float()) for i in range(n)}
        bus.store.clear()
        for i, j in pairs:
            a, b = maps[i], maps[j]  # same stage: same (windows, heads, N, N) layout
            overlap[(i, j)] += torch.minimum(a, b).sum().item()
            rows[(i, j)] += a.numel() // a.shape[-1]
            xs, ys, s = outs[j], outs[i], mom[(i, j)]
            for k, v in enumerate((xs.sum(0), ys.sum(0), (xs * xs).sum(0), (ys * ys).sum(0), (xs * ys).sum(0))):
                s[k] = s[k] + v
            s[5] += xs.shape[0]
    if not seen:
        raise UserError('no calibration images were given')
    attn = {p: overlap[p] / rows[p] for p in pairs}
    output = {}
    for p, (sx, sy, sxx, syy, sxy, cnt) in mom.items():
        vx, vy = sxx / cnt - (sx / cnt) ** 2, syy / cnt - (sy / cnt) ** 2
        cov = sxy / cnt - (sx / cnt) * (sy / cnt)
        r2 = (cov * cov / (vx * vy).clamp_min(1e-12)).clamp(0, 1)
        output[p] = float((vy * r2).sum() / vy.sum().clamp_min(1e-12))
    return {'attn': attn, 'output': output}


def _channels_last(y: torch.Tensor) -> torch.Tensor:
    """Attention output as (samples, C): timm gives (B, N, C), UniForm (B, C, h, w)."""
    if y.dim() == 4:
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def plan_score(plan: Mapping[int, int], sim: Mapping[tuple[int, int], float]) -> float:
    """Sum of the proxy similarity of every reusing layer to its source (higher = the plan keeps more)."""
    return sum(sim[(i, s)] for i, s in plan.items())


def loss_score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str | Mapping[int, str] = 'attn',
               transform: str = 'channel', batch: int = 64) -> Callable[[Mapping[int, int]], float]:
    """The other proxy: minus the cross-entropy of the converted model (before any fine-tune) on labelled
    calibration images. Costs one calibration pass per candidate plan, but scores the plan as a whole."""

    @torch.no_grad()
    def score(plan: Mapping[int, int]) -> float:
        m = apply_reuse(model, dict(plan), mode if isinstance(mode, str) else {i: mode[i] for i in plan},
                        transform).eval()
        total = sum(F.cross_entropy(m(x), y, reduction='sum').item()
                    for x, y in zip(images.split(batch), labels.split(batch)))
        return -total / len(labels)

    return score


# ---------------------------------------------------------------------------------------------------------------
# measured latency


def deploy_callable(model: nn.Module, example: torch.Tensor, trace: bool = True) -> Callable[[], torch.Tensor]:
    """The deploy form (BN fused) of ``model``, traced, as a zero-argument call on ``example``."""
    fused = reparameterize(model)
    if trace:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # deprecation + tracer warnings about shape-dependent Python branches
            fused = torch.jit.trace(fused, example, check_trace=False)

    def call() -> torch.Tensor:
        with torch.no_grad():
            return fused(example)

    return call


@dataclass
class LatencyMeter:
    """Measures plans against the original model on this device: interleaved rounds, paired median ratio."""

    model: nn.Module
    example: torch.Tensor
    mode: str | Mapping[int, str] = 'attn'
    transform: str = 'channel'
    rounds: int = 15
    warmup: int = 5  # TorchScript's profiling executor re-optimises a traced graph during its first calls
    inner: int | None = None  # calls per round and fn; None: enough for ~20 ms per round (measured once)
    clock: Callable[[], float] = time.perf_counter
    trace: bool = True
    measurements: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._base = deploy_callable(self.model, self.example, self.trace)
        if self.inner is None:
            for _ in range(self.warmup):
                self._base()
            t0 = self.clock()
            self._base()
            dt = max(self.clock() - t0, 1e-6)
            self.inner = max(1, min(50, math.ceil(0.02 / dt)))

    def measure(self, reuse: Sequence[int] | Mapping[int, int], rounds: int | None = None) -> dict:
        cand = deploy_callable(apply_reuse(self.model, reuse, self.mode, self.transform), self.example, self.trace)
        t = interleaved_timing({'original': self._base, 'reuse': cand}, rounds=rounds or self.rounds,
                               warmup=self.warmup, inner=self.inner, clock=self.clock)
        res = dict(reuse_layers=sorted(reuse), latency_ratio=paired_ratio(t['original'], t['reuse']),
                   ratio_of_medians=median(t['reuse']) / median(t['original']),
                   original_ms=1e3 * median(t['original']), reuse_ms=1e3 * median(t['reuse']),
                   spread=max(spread(t['original']), spread(t['reuse'])), rounds=rounds or self.rounds,
                   inner=self.inner)
        self.measurements.append(res)
        return res


# ---------------------------------------------------------------------------------------------------------------
# search


@dataclass
class SearchResult:
    reuse_layers: list[int]
    sources: dict[int, int]
    latency_ratio: float  # measured (verification rounds), reused / original
    budget: float
    budget_met: bool
    original_ms: float
    reuse_ms: float
    ratio_of_medians: float  # cross-check of latency_ratio (median of per-round ratios)
    proxy_score: float
    steps: list[dict]  # one per greedy step: the plan tried, its proxy score and measured ratio


def greedy_search(model: nn.Module, budget: float,
                  score: Mapping[tuple[int, int], float] | Callable[[Mapping[int, int]], float], meter: LatencyMeter,
                  verify_rounds: int | None = None, max_layers: int | None = None,
                  log: Callable[[str], None] | None = None) -> SearchResult:
    """Add reuse layers greedily (best proxy score first) until the MEASURED latency ratio is <= ``budget``.

    ``score``: pairwise similarities (the plan's score is their sum, :func:`plan_score`) or a function of the whole
    plan ``{layer: source}`` such as :func:`loss_score`; higher is better.

    Each candidate plan is measured; when a plan meets the budget it is re-measured with ``verify_rounds`` (default
    2x the meter's rounds) and accepted only if it still meets it. If every allowed layer reuses and the budget is
    still missed, the fullest plan is re-measured the same way and returned with ``budget_met=False``.
    """
    if not 0 < budget <= 1:
        raise UserError(f"budget must be in (0, 1] (a fraction of the original latency), got {budget}")
    layers = attention_layers(model)
    n = len(layers)
    limit = n if max_layers is None else max_layers
    chosen: list[int] = []
    steps: list[dict] = []
    verify_rounds = verify_rounds or 2 * meter.rounds
    say = log or (lambda s: None)
    cache: dict[tuple, float] = {}

    def score_of(plan: Mapping[int, int]) -> float:
        key = tuple(sorted(plan.items()))
        if key not in cache:
            cache[key] = score(plan) if callable(score) else plan_score(plan, score)
        return cache[key]
    last: dict | None = None
    while True:
        if chosen:
            res = meter.measure(chosen)
            steps.append(dict(reuse_layers=sorted(chosen), proxy_score=score_of(resolve_plan(layers, chosen)),
                              latency_ratio=res['latency_ratio']))
            say(f"plan {sorted(chosen)}: measured latency ratio {res['latency_ratio']:.3f}")
            last = res
            if res['latency_ratio'] <= budget:
                res = meter.measure(chosen, rounds=verify_rounds)
                say(f"verify {sorted(chosen)}: {res['latency_ratio']:.3f} over {verify_rounds} rounds")
                last = res
                if res['latency_ratio'] <= budget:
                    break
        elif budget >= 1.0:
            break
        best, best_score = None, -math.inf
        for c in range(n):
            if c in chosen or len(chosen) >= limit:
                continue
            try:
                plan = resolve_plan(layers, chosen + [c])
            except UserError:
                continue  # first layer (of a stage), or it would leave a reuser without a source
            value = score_of(plan)
            if value > best_score + 1e-12:
                best, best_score = c, value
        if best is None:
            if chosen:  # budget missed with every allowed layer reusing: still report a verified measurement
                last = meter.measure(chosen, rounds=verify_rounds)
                say(f"verify {sorted(chosen)}: {last['latency_ratio']:.3f} over {verify_rounds} rounds")
            break
        chosen.append(best)
    plan = resolve_plan(layers, chosen)
    if last is None:  # budget 1.0 with no reuse: nothing to measure against
        last = dict(latency_ratio=1.0, original_ms=float('nan'), reuse_ms=float('nan'), ratio_of_medians=1.0)
    return SearchResult(sorted(chosen), plan, float(last['latency_ratio']), budget, last['latency_ratio'] <= budget,
                        float(last['original_ms']), float(last['reuse_ms']), float(last['ratio_of_medians']),
                        score_of(plan), steps)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"unknown reuse mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode
