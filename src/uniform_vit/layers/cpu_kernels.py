"""Optional C++ kernels for x86 CPUs, one library (``csrc/``): the query-tiled Reuse Attention core in one op
(``reuse_core.cpp``), the stem's first conv + ReLU, read from NCHW and written channels-last (``stem_conv.cpp``),
depthwise convs on channels-last maps (``depthwise_conv.cpp``), the residual FFN (``residual_ffn.cpp``), 1x1 convs
(``pointwise_conv.cpp``), the stem's 3x3 stride-2 convs (``conv3x3_s2.cpp``) and patch merging's expansion +
depthwise conv (``expand_dw.cpp``); the last four of these share one register-blocked product (``tile_gemm.h``).
Two are for training: the weight gradient of depthwise convs on maps smaller than their kernel
(``depthwise_grad_weight.cpp``) and BatchNorm over channels-last maps (``batch_norm_train.cpp``).

It is compiled on first use by ``torch.utils.cpp_extension`` (a C++ compiler and ninja: the tools ``torch.compile``
needs on CPU too; ninja comes with this package), for CPUs where PyTorch itself dispatches to AVX-512 or AVX2, in
about 15-30 s, and cached in torch's extension folder (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
Elsewhere, or where the build fails (a warning says why, once), :func:`reuse_core`, :func:`stem_conv`,
:func:`depthwise_conv`, :func:`residual_ffn`, :func:`pointwise_conv`, :func:`conv3x3_s2`, :func:`expand_dw`,
:func:`depthwise_grad_weight` and :func:`batch_norm_train` return None and their callers keep ATen ops.
``UNIFORM_VIT_CPU_KERNELS=0`` turns the kernels off (A/B runs, or to skip the build). Why kernels at all:
benchmarks/RESULTS.md, section 1, sessions 14, 17 and 18, and section 3, session 19 (training)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ENV = 'UNIFORM_VIT_CPU_KERNELS'
OPS = ('reuse_core', 'stem_conv', 'depthwise_conv', 'residual_ffn', 'pointwise_conv', 'conv3x3_s2',
       'expand_dw', 'depthwise_grad_weight', 'batch_norm_train')  # one source file each
SOURCES = tuple(Path(__file__).with_name('csrc') / f'{op}.cpp' for op in OPS)
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
        name = f'uniform_vit_kernels_{isa.lower()}'
        _announce_build(name)
        load(name=name, sources=[str(f) for f in SOURCES],
             extra_cflags=['-O3', '-fopenmp', *_ISA_FLAGS[isa]], extra_ldflags=['-fopenmp'], is_python_module=False,
             verbose=False)
        missing = [op for op in OPS if not hasattr(torch.ops.uniform_vit, op)]
        _loaded = not missing
        _reason = f"the built library registered no {', '.join(missing)}" if missing else ''
        if _loaded:
            _register_flop_formulas()
    except Exception as e:  # no compiler, no ninja, a read-only cache: the ATen path still works
        lines = str(e).strip().splitlines()
        _reason = f'build failed: {type(e).__name__}' + (f': {lines[-1][:200]}' if lines else '')
        warnings.warn(f'uniform_vit: the C++ CPU kernels are not available ({_reason}); using ATen ops '
                      f'(set {ENV}=0 to skip the build)', RuntimeWarning, stacklevel=3)
    return _loaded


def _announce_build(name: str) -> None:
    """Say so on stderr before a first build: since UniForm's deploy form uses the kernels, the first CPU inference on
    a new machine (``predict``, the bench) would otherwise pause for 15-30 s without a word."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        built = (Path(_get_build_directory(name, False)) / f'{name}.so').exists()
    except Exception:  # a private helper of torch: without it, no message
        return
    if not built:
        print(f'uniform_vit: compiling the C++ CPU kernels once for this machine (15-30 s; {ENV}=0 skips it)',
              file=sys.stderr, flush=True)


def _register_flop_formulas() -> None:
    """Teach ``torch.utils.flop_counter`` the ops, or FLOP counts would miss them: the attention core's logits
    (2 N^2 Cq per image) and value product (2 N^2 C), the stem convs' 2 Cin 9 Cout and the depthwise conv's 2 C k^2
    per output pixel, the FFN's two products (4 C H per token), the 1x1 conv's 2 K N per token."""
    from torch.utils.flop_counter import register_flop_formula

    def core_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        b, cq, n = q_shape
        return 2 * b * n * n * (cq + v_shape[1])

    def conv3x3_s2_flops(x_shape, cout: int) -> int:  # a 3x3 stride-2 conv with padding 1
        b, cin, h, w = x_shape
        return 2 * b * ((h + 1) // 2) * ((w + 1) // 2) * cout * cin * 9

    def stem_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return conv3x3_s2_flops(x_shape, w_shape[0])  # w: (Cout, Cin, 3, 3)

    def depthwise_flops(x_shape, w_shape, b_shape, stride, *args, out_shape=None, **kwargs) -> int:
        b, c, h, w = x_shape  # every tap of every output, as the flop counter counts ATen's convolutions
        taps = w_shape[0] if len(w_shape) == 2 else w_shape[2] * w_shape[3]  # (k*k, C) or (C, 1, k, k)
        return 2 * b * c * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) * taps

    def rows(x_shape) -> int:  # token rows M of an (M, C) matrix or a (B, C, H, W) map
        return x_shape[0] * (x_shape[2] * x_shape[3] if len(x_shape) == 4 else 1)

    def ffn_flops(x_shape, w1t_shape, *args, out_shape=None, **kwargs) -> int:
        return 4 * rows(x_shape) * w1t_shape[0] * w1t_shape[1]  # two products of M x C x H

    def pointwise_flops(x_shape, wt_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * rows(x_shape) * wt_shape[0] * wt_shape[1]

    def conv3x3_flops(x_shape, wt_shape, *args, out_shape=None, **kwargs) -> int:
        return conv3x3_s2_flops(x_shape, wt_shape[3])  # wt: (3, 3, Cin, Cout)

    def expand_dw_flops(x_shape, w1t_shape, *args, out_shape=None, **kwargs) -> int:
        b, c, h, w = x_shape
        x = w1t_shape[1]
        return 2 * b * h * w * c * x + 2 * b * ((h + 1) // 2) * ((w + 1) // 2) * x * 9

    def dw_grad_flops(x_shape, g_shape, kh: int, kw: int, *args, out_shape=None, **kwargs) -> int:
        b, c, h, w = x_shape
        return 2 * b * c * h * w * kh * kw  # every tap of every pixel, as for ATen's convolution backward

    ops = torch.ops.uniform_vit
    for op, fn in ((ops.reuse_core, core_flops), (ops.stem_conv, stem_flops), (ops.depthwise_conv, depthwise_flops),
                   (ops.residual_ffn, ffn_flops), (ops.pointwise_conv, pointwise_flops),
                   (ops.conv3x3_s2, conv3x3_flops), (ops.expand_dw, expand_dw_flops),
                   (ops.depthwise_grad_weight, dw_grad_flops)):
        with contextlib.suppress(RuntimeError, ValueError):  # registered already (a re-imported module)
            register_flop_formula(op)(fn)


def reuse_core() -> Callable[..., torch.Tensor] | None:
    """``reuse_core(q, k, v, bias, scale)`` for float32 CPU tensors in any layout, q, k: (B, Cq, N), v: (B, C, N),
    bias (N, N) or None: ``softmax(scale q^T k + bias) v^T`` as (B, N, C) memory when ``v`` is token-major
    (``v.stride(1) == 1``), else as (B, C, N). None when the kernel is off or could not be built, and inside
    ``torch.compile`` or an ONNX export. A ``torch.jit.trace`` records it like the deploy form's other ops (the bench's
    in-process traces; graphs for other machines are traced under :func:`uniform_vit.layers.conv.aten_only`, which
    the caller checks)."""
    return _recordable_op('reuse_core')


STEM_CHANNELS = (8, 16, 24)  # the output widths stem_conv is built for (UniForm's E0 / 8 for E0 = 64, 128, 192)


def _recordable_op(name: str) -> Callable[..., torch.Tensor] | None:
    """An op that ``torch.jit.trace`` may record (the bench's traced models run it in the process that built it;
    graphs written to files are traced under :func:`uniform_vit.layers.conv.aten_only`, which the callers check).
    None when the kernels are off or could not be built, and inside ``torch.compile`` or an ONNX export."""
    if not enabled() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return None
    return getattr(torch.ops.uniform_vit, name) if _load() else None


def stem_conv() -> Callable[..., torch.Tensor] | None:
    """``stem_conv(x, w, b, relu)``: ``relu(conv2d(x, w, b, stride=2, padding=1))`` for a float32 CPU image batch
    ``x`` (B, Cin, H, W) in any layout and a (Cout, Cin, 3, 3) ``w`` with Cout in :data:`STEM_CHANNELS`, returned in
    channels-last memory; or None (see :func:`_recordable_op`)."""
    return _recordable_op('stem_conv')


def depthwise_conv() -> Callable[..., torch.Tensor] | None:
    """``depthwise_conv(x, w, b, stride, radius=None)``: ``conv2d(x, w, b, stride, padding=k // 2, groups=C)`` for a
    float32 CPU map ``x`` (B, C, H, W) (channels-last, or a channel slice of it, is read in place) and a (C, 1, k, k)
    ``w`` with odd k, ``b`` (C) or None, returned in channels-last memory; ``radius`` (C) says how far from the
    centre each channel's nonzero taps reach (the others are skipped); or None (see :func:`_recordable_op`)."""
    return _recordable_op('depthwise_conv')


def residual_ffn() -> Callable[..., torch.Tensor] | None:
    """``residual_ffn(x, w1t, b1, w2t, b2, packed=False)``: ``x + relu(x @ w1t + b1) @ w2t + b2`` for float32 CPU
    token rows ``x`` (M, C), or a (B, C, H, W) map (its channels-last memory's rows; returned as a channels-last map),
    ``w1t`` (C, H), ``w2t`` (H, C) (``packed``: both in :func:`pack_panels`' order); or None (see
    :func:`_recordable_op`)."""
    return _recordable_op('residual_ffn')


def pointwise_conv() -> Callable[..., torch.Tensor] | None:
    """``pointwise_conv(x, wt, b, relu, packed=False)``: ``x @ wt + b`` (then a ReLU when ``relu``) for float32 CPU
    token rows ``x`` (M, K), or a (B, K, H, W) map (its channels-last memory's rows; returned as a channels-last map),
    and ``wt`` (K, N) (``packed``: in :func:`pack_panels`' order), ``b`` (N) or None; or None (see
    :func:`_recordable_op`)."""
    return _recordable_op('pointwise_conv')


def conv3x3_s2() -> Callable[..., torch.Tensor] | None:
    """``conv3x3_s2(x, wt, b, relu)``: ``conv2d(x, w, b, stride=2, padding=1)`` (then a ReLU when ``relu``) for a
    float32 CPU map ``x`` (B, Cin, H, W) (channels-last is read in place) and the weight as ``wt`` (3, 3, Cin, Cout),
    ``b`` (Cout) or None, returned in channels-last memory; or None (see :func:`_recordable_op`)."""
    return _recordable_op('conv3x3_s2')


def expand_dw() -> Callable[..., torch.Tensor] | None:
    """``expand_dw(x, w1t, b1, wdw, bdw, packed=False)``: patch merging's ``relu(dwconv3x3_s2(relu(1x1(x))))`` for a
    float32 CPU map ``x`` (B, C, H, W) (channels-last is read in place), the expansion's weight as ``w1t`` (C, X)
    (``packed``: in :func:`pack_panels`' order), the depthwise weight as ``wdw`` (3, 3, X), returned in channels-last
    memory; or None (see :func:`_recordable_op`)."""
    return _recordable_op('expand_dw')


def depthwise_grad_weight() -> Callable[..., torch.Tensor] | None:
    """``depthwise_grad_weight(x, g, kh, kw, ph, pw)``: the (C, 1, kh, kw) weight gradient of a stride-1 depthwise
    conv with 'same' padding (ph, pw) = (kh // 2, kw // 2), from its float32 CPU input ``x`` and output gradient
    ``g`` (B, C, H, W) (channels-last is read in place); or None (see :func:`_recordable_op`)."""
    return _recordable_op('depthwise_grad_weight')


def batch_norm_train() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """``batch_norm_train(x, w, b, running_mean, running_var, factor, eps) -> (y, mean, invstd)``: training-mode
    BatchNorm of a float32 CPU map ``x`` (B, C, H, W) in channels-last memory with this batch's statistics (biased
    variance), ``w``, ``b`` (C), which also moves the running statistics (C) in place by ``factor`` as
    ``nn.BatchNorm2d`` does (the variance unbiased). Differentiable in ``x``, ``w``, ``b`` through its own C++
    autograd, whose backward is ``torch.ops.uniform_vit.batch_norm_train_backward(g, x, mean, invstd, w) -> (gx, gw,
    gb)``; or None (see :func:`_recordable_op`)."""
    return _recordable_op('batch_norm_train')


def pack_panels(wt: torch.Tensor) -> torch.Tensor:
    """A float32 (K, N) matrix in the order the C++ products read fastest (each column panel's K rows one after
    another; the panel widths follow the vector ISA), for the ``packed=True`` argument of :func:`pointwise_conv`,
    :func:`residual_ffn` and :func:`expand_dw`. Same shape, other memory order: only those ops can read it."""
    return torch.ops.uniform_vit.pack_panels(wt)
