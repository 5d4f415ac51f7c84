"""Keep glibc's malloc from handing big tensors back to the kernel after every step.

PyTorch's CPU allocator takes each tensor from ``malloc``. glibc serves large requests with fresh ``mmap`` pages
and gives free memory at the top of the heap back to the kernel (``M_TRIM_THRESHOLD``, 128 KiB at start, at most
64 MiB once it adapts). A training step frees tens of MB of activations at its end and allocates them again in the
next step, so every step faults the same pages in again: about 10,000-35,000 minor page faults per uniform_t step at
batch 128, 112 px; the ReLU on the stem's first 12.8 MB map took 14.9 ms instead of the 0.13 ms it takes on warm
memory (profiled in session 11; benchmarks/RESULTS.md, "Allocator").

:func:`tune_allocator` raises both thresholds with ``mallopt`` so that freed memory stays in the process: the
heap keeps up to ``trim_threshold`` bytes of free memory and requests below ``mmap_threshold`` (at most 32 MiB,
glibc's cap) come from the heap. The cost is memory the process keeps after a peak instead of returning it.
The ``uniform-vit`` commands call it once at start; ``UNIFORM_VIT_MALLOC=default`` turns it off, and glibc's own
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES``, when set, win. Elsewhere than glibc
(macOS, Windows, musl, or jemalloc/tcmalloc/mimalloc preloaded) it does nothing. Preloading tcmalloc measured a
few percent faster still (docs/training.md); a running process cannot switch to it, so it stays the user's choice.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's HEAP_MAX / 2 on 64-bit: mallopt refuses larger values
ENV_SWITCH = 'UNIFORM_VIT_MALLOC'
_GLIBC_ENV = ('MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_', 'GLIBC_TUNABLES')

_applied: dict[str, int] | None = None


def allocator_state() -> dict[str, int] | None:
    """The thresholds :func:`tune_allocator` set in this process, or None if it has not changed anything."""
    return None if _applied is None else dict(_applied)


_OTHER_ALLOCATORS = ('tcmalloc', 'jemalloc', 'mimalloc')


def _preloaded() -> str | None:
    """The allocator that LD_PRELOAD names ('tcmalloc', 'jemalloc', 'mimalloc'), if any."""
    preload = os.environ.get('LD_PRELOAD', '')
    return next((lib for lib in _OTHER_ALLOCATORS if lib in preload), None)


def allocator_label() -> str:
    """'tuned', 'default', or the preloaded allocator ('tcmalloc', ...), for banners and result files."""
    if _applied is not None:
        return 'tuned'
    return _preloaded() or 'default'


def on_glibc() -> bool:
    """True on Linux with glibc, the only C library whose mallopt this module sets."""
    return platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


def _skip_reason() -> str | None:
    if os.environ.get(ENV_SWITCH, '').strip().lower() in ('default', 'off', '0', 'no'):
        return f'{ENV_SWITCH}={os.environ[ENV_SWITCH]}'
    if not on_glibc():
        return 'not glibc'
    for var in _GLIBC_ENV:
        if var in os.environ:
            return f'{var} is set'
    if other := _preloaded():
        return f'{other} is preloaded'
    return None


def tune_allocator(trim_threshold: int = 1 << 30, mmap_threshold: int = MMAP_THRESHOLD_MAX) -> bool:
    """Raise glibc's trim and mmap thresholds for this process; True if set (now or by an earlier call).

    Call it before the first big allocations (building the model, the first batch); later calls are no-ops.
    """
    global _applied
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX:
        raise ValueError(f'mmap_threshold must be in (0, {MMAP_THRESHOLD_MAX}], got {mmap_threshold}')
    if trim_threshold <= 0:
        raise ValueError(f'trim_threshold must be positive, got {trim_threshold}')
    if _applied is not None:
        return True
    if _skip_reason() is not None:
        return False
    try:
        libc = ctypes.CDLL('libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting either threshold also ends glibc's adaptive thresholds
    if mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1 or mallopt(M_TRIM_THRESHOLD, trim_threshold) != 1:
        return False
    _applied = {'trim_threshold': trim_threshold, 'mmap_threshold': mmap_threshold}
    return True


__all__ = ['allocator_label', 'allocator_state', 'on_glibc', 'tune_allocator']
