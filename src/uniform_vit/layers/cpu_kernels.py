"""Optional C++ kernel for x86 CPUs: the query-tiled Reuse Attention core in one op (``csrc/reuse_core.cpp``).

It is compiled on first use by ``torch.utils.cpp_extension`` (a C++ compiler and ninja: the tools ``torch.compile``
needs on CPU too; ninja comes with this package), for CPUs where PyTorch itself dispatches to AVX-512 or AVX2, in
about 15-30 s, and cached in torch's extension folder (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
Elsewhere, or where the build fails (a warning says why, once), :func:`reuse_core` returns None and the tiled core
keeps its ATen products. ``UNIFORM_VIT_CPU_KERNELS=0`` turns the kernel off (A/B runs, or to skip the build). Why a
kernel at all: benchmarks/RESULTS.md, section 1, session 14."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ENV = 'UNIFORM_VIT_CPU_KERNELS'
SOURCE = Path(__file__).with_name('csrc') / 'reuse_core.cpp'
# the vector ISA PyTorch reports -> ATen's build macro and the compiler flags (as inductor builds its CPU code). The
# kernel's register blocking follows the ISA (24 accumulators in AVX-512's 32 registers, 12 in AVX2's 16): built with
# the AVX-512 blocking for AVX2, it spilled and ran at 0.60-0.98x the ATen path (session 14); with its own blocking
# on an AVX2-only Zen 3 it runs 1.2-1.9x the ATen path (session 16).
_ISA_FLAGS = {
    'AVX512': ['-DCPU_CAPABILITY_AVX512', '-mavx512f', '-mavx512dq', '-mavx512vl', '-mavx512bw', '-mfma'],
    'AVX2': ['-DCPU_CAPABILITY_AVX2', '-mavx2', '-mfma', '-mf16c'],
}
_loaded: bool | None = None  # None: not tried yet in this process
_reason = ''


def switched_on(env: str) -> bool:
    """The kernels' off switches: False when the variable ``env`` is 0 / false / no / off (unset: on)."""
    return os.environ.get(env, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def enabled() -> bool:
    """False when ``UNIFORM_VIT_CPU_KERNELS`` is 0 / false / no / off."""
    return switched_on(ENV)


def status() -> str:
    """'on', or 'off (why)': for banners and result files. Builds the kernel if that has not been tried yet."""
    if not enabled():
        return f'off ({ENV}=0)'
    return 'on' if _load() else f'off ({_reason})'


def _load() -> bool:
    global _loaded, _reason
    if _loaded is not None:
        return _loaded
    _loaded = False
    isa = torch.backends.cpu.get_cpu_capability()
    if isa not in _ISA_FLAGS:
        _reason = f'no kernel for the {isa} vector ISA'
        return False
    try:
        # torch logs a CUDA_HOME notice when this module is first imported on a machine without a GPU runtime
        logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load

        # OpenMP as ATen's own parallel_for uses it (without it the tiles of at::parallel_for run on one thread);
        # the library links libgomp.so.1, the one torch has loaded already
        load(name=f'uniform_vit_reuse_core_{isa.lower()}', sources=[str(SOURCE)],
             extra_cflags=['-O3', '-fopenmp', *_ISA_FLAGS[isa]], extra_ldflags=['-fopenmp'], is_python_module=False,
             verbose=False)
        _loaded = hasattr(torch.ops.uniform_vit, 'reuse_core')
        _reason = '' if _loaded else 'the built library registered no reuse_core'
        if _loaded:
            _register_flop_formula()
    except Exception as e:  # no compiler, no ninja, a read-only cache: the ATen path still works
        lines = str(e).strip().splitlines()
        _reason = f'build failed: {type(e).__name__}' + (f': {lines[-1][:200]}' if lines else '')
        warnings.warn(f'uniform_vit: the C++ Reuse Attention kernel is not available ({_reason}); using ATen '
                      f'products (set {ENV}=0 to skip the build)', RuntimeWarning, stacklevel=3)
    return _loaded


def _register_flop_formula() -> None:
    """Teach ``torch.utils.flop_counter`` the op, or FLOP counts at large N would miss the attention core: the
    logits (2 N^2 Cq per image) and the value product (2 N^2 C)."""
    from torch.utils.flop_counter import register_flop_formula

    def flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        b, cq, n = q_shape
        return 2 * b * n * n * (cq + v_shape[1])

    with contextlib.suppress(RuntimeError, ValueError):  # registered already (a re-imported module)
        register_flop_formula(torch.ops.uniform_vit.reuse_core)(flops)


def reuse_core() -> Callable[..., torch.Tensor] | None:
    """``reuse_core(q, k, v, bias, scale)`` for float32 CPU tensors in any layout, q, k: (B, Cq, N), v: (B, C, N),
    bias (N, N) or None: ``softmax(scale q^T k + bias) v^T`` as (B, N, C) memory when ``v`` is token-major
    (``v.stride(1) == 1``), else as (B, C, N). None when the kernel is off or could not be built, and inside a
    trace, ``torch.compile`` or an ONNX export, which must not record an op of this library."""
    if not enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return None
    return torch.ops.uniform_vit.reuse_core if _load() else None
