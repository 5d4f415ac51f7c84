"""Matrix products through oneDNN where PyTorch has it.

PyTorch sends fp32 ``torch.mm``/``addmm`` on x86 to MKL's sgemm, which on AMD CPUs runs its AVX2 kernels; oneDNN,
which PyTorch already uses for every convolution, runs AVX-512 there. Measured on this project's Zen 5 machine, one
thread: 1.7-2.2x the FLOP rate of ``torch.mm`` for the Reuse core's tile products (40 x 3136 @ 3136 x 64..256) and
246 vs 112 GFLOP/s for a 1024^3 product (``benchmarks/RESULTS.md``). The op is ``torch.ops.mkldnn._linear_pointwise``
(what Inductor emits for fused linears on CPU); it cannot be recorded by ``torch.jit.trace``, so traced, scripted
and compiled code keep ``torch.mm``.
"""

from __future__ import annotations

import contextlib

import torch


def onednn_linear_available(*tensors: torch.Tensor) -> bool:
    """True when :func:`linear_nt` may take the oneDNN path for these fp32 CPU tensors, in eager mode."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, '_linear_pointwise'):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    return all(t.device.type == 'cpu' and t.dtype == torch.float32 and not t.requires_grad for t in tensors)


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


__all__ = ['linear_nt', 'onednn_linear_available']
