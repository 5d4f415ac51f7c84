"""What CPU this is: the few /proc/cpuinfo fields that benchmarks report and that kernel choices depend on."""

from __future__ import annotations

import functools
import platform


@functools.cache
def _cpuinfo(path: str = '/proc/cpuinfo') -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (Linux); empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break  # end of the first processor's block
                key, _, value = line.partition(':')
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """CPU model name ('model name' in /proc/cpuinfo, as lscpu shows it), falling back to platform data."""
    return _cpuinfo().get('model name') or platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD', ... ('vendor_id'), else a guess from :mod:`platform`."""
    vendor = _cpuinfo().get('vendor_id')
    if vendor:
        return vendor
    return 'GenuineIntel' if 'intel' in platform.processor().lower() else platform.processor()


def cpu_flags() -> set[str] | None:
    """The instruction-set flags ('avx512f', 'avx512_vnni', 'amx_tile', ...), or None where unknown."""
    flags = _cpuinfo().get('flags')
    return set(flags.split()) if flags is not None else None


__all__ = ['cpu_flags', 'cpu_name', 'cpu_vendor']
