"""Matrix products through oneDNN where PyTorch has it.

PyTorch sends fp32 ``torch.mm``/``addmm`` on x86 to MKL's sgemm, which on AMD CPUs runs its AVX2 kernels; oneDNN,
which PyTorch already uses for every convolution, runs AVX-512 there. Measured on this project's Zen 5 machine, one
thread: 1.7-2.2x the FLOP rate of ``torch.mm`` for the Reuse core's tile products (40 x 3136 @ 3136 x 64..256) and
246 vs 112 GFLOP/s for a 1024^3 product (``benchmarks/RESULTS.md``). The op is ``torch.ops.mkldnn._linear_pointwise``
(what Inductor emits for fused linears on CPU); it cannot be recorded by ``torch.jit.trace``, so traced, scripted
and compiled code keep ``torch.mm``.

On Intel CPUs MKL runs its AVX-512 kernels and is the faster of the two for these shapes (measured on a 2-core Xeon,
one thread: 147 vs 98 GFLOP/s for the value product, 102 vs 35 for the thin logits; ``benchmarks/RESULTS.md``). On
CPUs without AVX-512 both libraries run AVX2 code, and MKL's is the faster there too: on a Zen 3 EPYC the tiled
Reuse core ran 1.14-1.42x faster on ``torch.mm`` than through oneDNN (N = 3136, C = 64-256; session 16). So the
policy: oneDNN only on non-Intel CPUs with AVX-512 (AMD Zen 4 and 5). ``UNIFORM_VIT_GEMM=onednn|mkl`` (or
:func:`gemm_backend`) overrides it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ..errors import UserError
from ..hardware import cpu_vendor

GEMM_BACKENDS = ('auto', 'onednn', 'mkl')
_backend = os.environ.get('UNIFORM_VIT_GEMM', 'auto')


def onednn_preferred() -> bool:
    """The policy: True when eager fp32 products on this CPU should go to oneDNN rather than ``torch.mm``."""
    if _backend not in GEMM_BACKENDS:  # only the environment variable can get here
        raise UserError(f"UNIFORM_VIT_GEMM={_backend!r}: choose one of {', '.join(GEMM_BACKENDS)}")
    if _backend == 'auto':
        return cpu_vendor() != 'GenuineIntel' and torch.backends.cpu.get_cpu_capability() == 'AVX512'
    return _backend == 'onednn'


@contextlib.contextmanager
def gemm_backend(name: str) -> Iterator[None]:
    """Force 'onednn' or 'mkl' (``torch.mm``, whatever BLAS PyTorch was built with) for the block, or 'auto'."""
    global _backend
    if name not in GEMM_BACKENDS:
        raise ValueError(f"unknown GEMM backend {name!r}; choose one of {', '.join(GEMM_BACKENDS)}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


# this PyTorch build has oneDNN's linear op
HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')


def onednn_linear_available(*tensors: torch.Tensor, grad: bool = False) -> bool:
    """True when :func:`linear_nt` may take the oneDNN path for these fp32 CPU tensors, in eager mode (the op has no
    autograd formula: tensors that require gradients only with ``grad=True``, for :func:`linear_trainable`)."""
    if not HAS_ONEDNN_LINEAR:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    return all(t.device.type == 'cpu' and t.dtype == torch.float32 and (grad or not t.requires_grad) for t in tensors)


def _register_flop_formula() -> None:
    """Teach ``torch.utils.flop_counter`` the oneDNN op (2 FLOPs per multiply-add), or FLOP counts of the Reuse
    core would miss its value product."""
    if not hasattr(torch.ops.mkldnn, '_linear_pointwise'):
        return
    from torch.utils.flop_counter import register_flop_formula

    def flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * w_shape[0] * w_shape[1]

    # the packet (both overloads); only the plain one, (x, w, bias, ...), is ever called here. A re-imported
    # module finds it registered already.
    with contextlib.suppress(RuntimeError, ValueError):
        register_flop_formula(torch.ops.mkldnn._linear_pointwise)(flops)


_register_flop_formula()


def linear_nt(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` for a (M, K) and a contiguous (N, K) ``w``, through oneDNN (no bias, no activation)."""
    return torch.ops.mkldnn._linear_pointwise(a, w, None, 'none', [], '')


def weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g.T @ x`` (the weight gradient of ``x @ w.T``: g (M, N), x (M, K) -> (N, K)) through oneDNN, both read
    in place through their transposed strides. oneDNN runs the product faster with the smaller of N and K as its
    rows: an expanding layer (N > K) computes ``(x.T @ g).T`` instead and copies the small (N, K) result, 1.5-2.1x
    faster for the FFN's 64 -> 256 and 128 -> 256 products over 2048-6272 tokens on the Zen 5, 2 threads
    (benchmarks/RESULTS.md, section 3, session 33)."""
    if g.shape[1] > x.shape[1]:
        return linear_nt(x.t(), g.t()).t().contiguous()
    return linear_nt(g.t(), x.t())


class _OnednnLinear(torch.autograd.Function):
    """``F.linear`` whose forward and both backward products run in oneDNN (see :func:`linear_trainable`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return torch.ops.mkldnn._linear_pointwise(x, w, b, 'none', [], '')

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        g = g.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = linear_nt(g, w.t().contiguous())  # g @ w: the (N, K) weight transposed is small
        if ctx.needs_input_grad[1]:
            gw = weight_grad(g, x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def linear_trainable(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for (M, K) rows that trains: through oneDNN (forward and both gradient products) where
    :func:`onednn_preferred` says so and the op exists, in eager mode; elsewhere ``F.linear`` itself (BLAS).

    MKL runs its AVX2 sgemm on AMD CPUs, so a training step's 1x1 convs (``PointwiseConv2d`` on token rows) ran at
    half the FLOP rate oneDNN reaches there. On the Zen 5 EPYC, two threads, UniForm's training shapes: forward
    products 2.1-2.2x ``torch.addmm``, input gradients 1.8-2.0x, weight gradients 1.05-1.5x (read through their
    transposed strides; :func:`weight_grad` picks the faster orientation); uniform_t's training step at 112 px,
    batch 128, 1.21x (benchmarks/RESULTS.md, section 3, session 32)."""
    if (x.dim() == 2 and onednn_preferred() and not torch.is_autocast_enabled('cpu')
            and onednn_linear_available(x, w, *(() if b is None else (b,)), grad=True)):
        return _OnednnLinear.apply(x, w.contiguous(), b)
    return torch.nn.functional.linear(x, w, b)


__all__ = ['GEMM_BACKENDS', 'gemm_backend', 'linear_nt', 'linear_trainable', 'onednn_linear_available',
           'onednn_preferred', 'weight_grad']
