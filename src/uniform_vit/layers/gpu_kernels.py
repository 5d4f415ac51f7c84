"""Optional Triton kernel for CUDA GPUs: the Reuse Attention core in one fused pass, flash-attention style.

``softmax(scale q^T k + bias) v^T`` for q, k: (B, Cq, N) and v: (B, C, N) in any strides. Each program takes a
tile of queries and walks the keys in blocks: the logits of the narrow q/k (Cq = C/4 channels), an online softmax,
and ONE product with every head's values (C channels) per block, so the (N, N) map never reaches memory. The same
blocking PyTorch's flash attention uses for multi-head attention, but with one map instead of h: h times fewer
exponentials and logit products, and a value product as wide as all heads together, which keeps the matrix units
busier than flash attention's h narrow ones (d = C/h, 16-64 here).

Why it exists: ``reuse_attention``'s other paths cannot match a fused kernel on a GPU at large N. 'eager' writes and
reads the whole (B, N, N) map; 'sdpa' cannot use the flash kernel at all (the value is 4x wider than q/k, which flash
attention does not allow) and gets a slower SDPA kernel. Used by ``reuse_attention`` ('auto' from
``attention.TILED_MIN_N`` tokens, and 'tiled'; inference only) on CUDA tensors where Triton is installed (it comes
with the CUDA builds of PyTorch on Linux). Traces, ``torch.compile`` and ONNX exports never record it.
``UNIFORM_VIT_GPU_KERNELS=0`` turns it off. **Not yet timed on a GPU** (benchmarks/RESULTS.md, section 1, session 16):
``benchmarks/scripts/gpu_session.sh`` is the prepared run, against flash attention.

Numbers: fp16/bf16 inputs accumulate in fp32 (as flash attention does); fp32 inputs are multiplied in full fp32
(``input_precision='ieee'``), not tf32, so they match the eager path to float rounding. The tests run the kernel in
Triton's interpreter on the CPU (``TRITON_INTERPRET=1``), so CI checks the arithmetic without a GPU.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

ENV = 'UNIFORM_VIT_GPU_KERNELS'
_broken = ''  # why the kernel failed to compile or run in this process ('' while it works): then it stays off


def enabled() -> bool:
    """False when ``UNIFORM_VIT_GPU_KERNELS`` is 0 / false / no / off (the same switch as the C++ kernel's)."""
    from .cpu_kernels import switched_on

    return switched_on(ENV)


@functools.cache
def _triton():
    """The triton module, or None where it is not installed (CPU-only or Windows builds of PyTorch)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return None
    return triton


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels run on the CPU through Triton's interpreter (tests)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def status(device: str | torch.device = 'cuda') -> str:
    """'on', or 'off (why)': for banners and result files."""
    if not enabled():
        return f'off ({ENV}=0)'
    if _triton() is None:
        return 'off (triton is not installed)'
    if torch.device(device).type != 'cuda' and not interpreting():
        return 'off (not on a CUDA device)'
    return f'off (failed: {_broken})' if _broken else 'on'


@functools.cache
def _kernel():
    """Compile-on-first-launch Triton kernel (defined lazily, so importing this module never needs triton)."""
    triton = _triton()
    import triton.language as tl

    @triton.jit
    def reuse_fwd(Q, K, V, Bias, O, qk_scale, N, CQ, C,
                  sqb, sqc, sqn, skb, skc, skn, svb, svc, svn, sbm, sbn, sob, soc, son,
                  HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
        # one program: BLOCK_M queries x BLOCK_C value channels of one image. Logits in log2 units (exp2 is the
        # hardware's exponential): qk_scale = scale * log2(e), the bias is multiplied by log2(e) too.
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_q = tl.arange(0, BLOCK_Q)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_n = tl.arange(0, BLOCK_N)
        m_ok = offs_m < N
        q = tl.load(Q + b * sqb + offs_m[:, None] * sqn + offs_q[None, :] * sqc,
                    mask=m_ok[:, None] & (offs_q[None, :] < CQ), other=0.0)  # (BLOCK_M, BLOCK_Q)
        m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for start in range(0, N, BLOCK_N):
            kn = start + offs_n
            n_ok = kn < N
            kt = tl.load(K + b * skb + offs_q[:, None] * skc + kn[None, :] * skn,
                         mask=(offs_q[:, None] < CQ) & n_ok[None, :], other=0.0)  # (BLOCK_Q, BLOCK_N)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N): rows of the ONE map
            if HAS_BIAS:
                bias = tl.load(Bias + offs_m[:, None] * sbm + kn[None, :] * sbn,
                               mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                s += bias.to(tl.float32) * 1.4426950408889634
            s = tl.where(n_ok[None, :], s, float('-inf'))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + kn[:, None] * svn + offs_c[None, :] * svc,
                        mask=n_ok[:, None] & (offs_c[None, :] < C), other=0.0)  # (BLOCK_N, BLOCK_C)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)  # every head at once
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(O + b * sob + offs_m[:, None] * son + offs_c[None, :] * soc, acc.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_c[None, :] < C))

    return reuse_fwd


# Candidates timed once per (Cq, C, dtype) on the user's GPU by triton.autotune at the first call (a few seconds):
# tiles of 64-128 queries, 64-128 keys, 64-256 value channels, as flash attention's Triton kernels use on Hopper
# and Ampere. Pruned to what fits the call: no value chunk wider than C needs, fp32 only in the small tiles.
_TUNE = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_C=c, num_warps=w, num_stages=st) for m, n, c, w, st in (
    (128, 64, 128, 8, 3), (64, 64, 128, 4, 3), (128, 64, 64, 4, 3), (128, 128, 128, 8, 2), (64, 64, 256, 8, 2),
    (64, 64, 64, 4, 2), (64, 32, 64, 4, 2))]


def _prune(configs, named_args, **kwargs):
    c, half = named_args['C'], named_args['V'].dtype in (torch.float16, torch.bfloat16)
    widest = max(16, _next_pow2(c))
    keep = [cf for cf in configs if cf.kwargs['BLOCK_C'] <= widest
            and (half or cf.kwargs['BLOCK_M'] * cf.kwargs['BLOCK_C'] <= 64 * 64)]
    return keep or configs[-1:]


@functools.cache
def _tuned_kernel():
    triton = _triton()
    return triton.autotune([triton.Config(dict((k, v) for k, v in cf.items() if k.startswith('BLOCK')),
                                          num_warps=cf['num_warps'], num_stages=cf['num_stages']) for cf in _TUNE],
                           key=['CQ', 'C'], prune_configs_by={'early_config_prune': _prune})(_kernel())


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(cq: int, c: int, dtype: torch.dtype) -> dict:
    """Block sizes without tuning (the interpreter; a fixed starting point): the value channels in chunks of up to
    128 (fp32: 64), each chunk recomputing the narrow logits (Cq = C/4, so a second chunk adds a quarter of a chunk's
    work), tiles of 64-128 queries and 64 keys; at least 16 wide in the product dimensions (the matrix units'
    minimum)."""
    half = dtype in (torch.float16, torch.bfloat16)
    block_c = max(16, min(_next_pow2(c), 128 if half else 64))
    block_m = 128 if half and block_c <= 64 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_Q=max(16, _next_pow2(cq)), BLOCK_C=block_c,
                num_warps=4 if block_m * block_c <= 64 * 64 else 8, num_stages=2 if interpreting() else 3)


def reuse_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
               config: dict | None = None) -> torch.Tensor:
    """``softmax(scale q^T k + bias) v^T`` in one Triton kernel. q, k: (B, Cq, N); v: (B, C, N); bias: (N, N) or
    None; any strides. Returns (B, C, N), laid out like ``v`` (token-major ``v`` -> a view of (B, N, C) memory), as
    the eager path does. Block sizes are tuned on the GPU at the first call for each (Cq, C, dtype) (``triton.autotune``
    over a few candidates); ``config`` fixes them instead (keys of :func:`default_config`)."""
    B, C, N = v.shape
    cq = q.shape[1]
    if q.shape != (B, cq, N) or k.shape != (B, cq, N):
        raise ValueError(f"reuse core: q and k must be (B, Cq, N) = ({B}, Cq, {N}), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if bias is not None and bias.shape != (N, N):
        raise ValueError(f"reuse core: bias must be ({N}, {N}), got {tuple(bias.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or v.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"reuse core: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    token_major = v.stride(1) == 1 and C > 1 and N > 1
    out = v.new_empty(B, N, C).transpose(1, 2) if token_major else v.new_empty(B, C, N)
    if B == 0 or N == 0:
        return out
    bias_t = bias if bias is not None else q  # any tensor: never read without HAS_BIAS
    args = (q, k, v, bias_t, out, float(scale) * 1.4426950408889634, N, cq, C,
            *q.stride(), *k.stride(), *v.stride(), *(bias.stride() if bias is not None else (0, 0)), *out.stride())
    # fp32: full-precision products (not tf32); fp16/bf16: Triton's default (the matrix units, on any vendor's GPU)
    consts = dict(HAS_BIAS=bias is not None, PREC='ieee' if v.dtype == torch.float32 else None,
                  BLOCK_Q=max(16, _next_pow2(cq)))
    if config is None and not interpreting():  # timed once per (Cq, C, dtype) on this GPU, then cached
        _tuned_kernel()[lambda m: (-(-N // m['BLOCK_M']), -(-C // m['BLOCK_C']), B)](*args, **consts)
        return out
    cfg = dict(config or default_config(cq, C, v.dtype))
    cfg.pop('BLOCK_Q', None)
    grid = (-(-N // cfg['BLOCK_M']), -(-C // cfg['BLOCK_C']), B)
    _kernel()[grid](*args, **consts, **cfg)
    return out


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == 'cuda'


def usable(*tensors: torch.Tensor | None) -> bool:
    """True when :func:`reuse_core` should run for these tensors: CUDA tensors, Triton present, the kernel
    enabled, no gradient wanted, and not inside a trace, ``torch.compile`` or an ONNX export."""
    ts = [t for t in tensors if t is not None]
    if not ts or _broken or not enabled() or _triton() is None or not _on_cuda(ts[0]):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


def reuse_core_or_none(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                       scale: float) -> torch.Tensor | None:
    """:func:`reuse_core`, or None (with one warning per process, after which the kernel stays off) where Triton
    cannot compile or launch it here: a Triton release that rejects the kernel, a GPU it has no backend for. The
    caller then takes the ATen path. Running out of GPU memory is not such a failure and is raised: the ATen path
    needs more."""
    global _broken
    try:
        return reuse_core(q, k, v, bias, scale)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001  (any compile or launch error: the ATen path computes the same)
        lines = str(e).strip().splitlines()
        _broken = f'{type(e).__name__}' + (f': {lines[0][:200]}' if lines else '')
        warnings.warn(f'uniform_vit: the Triton Reuse Attention kernel failed ({_broken}); using ATen products '
                      f'from now on (set {ENV}=0 to skip it)', RuntimeWarning, stacklevel=3)
        return None


__all__ = ['ENV', 'default_config', 'enabled', 'reuse_core', 'reuse_core_or_none', 'status',
           'usable']
