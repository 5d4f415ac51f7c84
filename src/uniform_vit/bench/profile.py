"""Where a model's time goes: ``torch.profiler`` over the same call the benchmark timed (``uniform-vit bench
--profile``).

Each operator's *self* time (its own work, not its children's) summed over a few calls, so the shares add up to the
whole call and nothing is counted twice: in the traced deploy form of a UniForm that names this library's C++ ops
(``uniform_vit::residual_ffn``, ``uniform_vit::stem_conv``, ...) next to oneDNN's convolutions and matrix products.
The profiler adds a few microseconds per operator, so the total reads a little above the timed milliseconds; the
shares are what to read. CPU only: on CUDA the self time of an operator is the launch, not the kernel.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import UserError

OTHER = '(other ops)'


def op_profile(call: Callable[[], object], calls: int = 3, top: int = 8) -> dict:
    """Profile ``calls`` calls of ``call`` (after one untimed call) on the CPU.

    Returns ``{'ms': total self milliseconds per call, 'ops': n distinct operators, 'calls': calls,
    'top': [{'op', 'ms', 'share', 'count'}, ...]}``: the ``top`` operators by self time (per call; ``count`` is how
    often the operator ran in one call), then one ``(other ops)`` entry for the rest when there is a rest."""
    if calls < 1 or top < 1:
        raise UserError(f"profile: need calls >= 1 and top >= 1 (got {calls}, {top})")
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    per_op = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    per_op.sort(key=lambda r: (-r[1], r[0]))
    total = sum(t for _, t, _ in per_op)
    if total <= 0:
        return dict(ms=0.0, ops=0, calls=calls, top=[])

    def entry(name: str, us: float, count: float) -> dict:
        return dict(op=name, ms=round(us / calls / 1e3, 4), share=round(us / total, 4), count=round(count / calls, 2))

    out = [entry(k, t, c) for k, t, c in per_op[:top]]
    rest = per_op[top:]
    if rest:
        out.append(entry(OTHER, sum(t for _, t, _ in rest), sum(c for _, _, c in rest)))
    return dict(ms=round(total / calls / 1e3, 4), ops=len(per_op), calls=calls, top=out)


def format_profile(model: str, prof: dict, timed_ms: float | None = None) -> list[str]:
    """Lines for people: a header per model, then one line per operator (share, milliseconds a call, count)."""
    timed = f", timed {timed_ms:.2f} ms" if timed_ms is not None else ''
    lines = [f"{model}: {prof['ms']:.2f} ms of operator self time a call under the profiler{timed}, "
             f"{prof['ops']} distinct ops (mean of {prof['calls']} calls)"]
    for e in prof['top']:
        count = f" x{e['count']:g}" if e['op'] != OTHER else f" ({e['count']:g} calls)"
        lines.append(f"  {100 * e['share']:5.1f}%  {e['ms']:8.3f} ms  {e['op']}{count}")
    return lines


__all__ = ['OTHER', 'format_profile', 'op_profile']
