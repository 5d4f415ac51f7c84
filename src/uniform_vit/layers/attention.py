"""Reuse Attention (UniForm) and the attention kinds it is compared with inside the same network.

Shapes: x is (B, C, H, W) with H, W <= the window size (``WindowAttention`` partitions larger maps); N = H*W.

Reuse Attention, as in the official code (seulkiyeom/mixtransform, ``CascadedGroupAttention`` in ``MixViT``)::

    q, k  = split(Conv1x1+BN(C -> C/2)(x))        # two (B, C/4, H, W) tensors, shared by all heads
    q     = DWConv7x7+BN(q)
    A     = softmax(q^T k * 16^-0.5 + bias)       # ONE (B, N, N) map per window: the shared map
    v_i   = DWConv_{k_i}(x_i), k_i = (1,3,5,7)[i] # x split into h channel groups, no value projection
    out   = Conv1x1+BN(ReLU(concat_i(v_i A^T)))   # all heads in one (B, C, N) @ (B, N, N)^T matmul

The relative position bias is one table indexed by (|dy|, |dx|) inside the window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv import ConvNorm, in_aten_only, make_conv

ATTENTION_KINDS: dict[str, type[nn.Module]] = {}


def register_attention(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register an attention kind usable as ``create_model(..., attn_type=name)``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        ATTENTION_KINDS[name] = cls
        return cls

    return deco


def create_attention(kind: str, dim: int, num_heads: int, **kwargs) -> nn.Module:
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attn_type {kind!r}; choose one of {sorted(ATTENTION_KINDS)}")
    return ATTENTION_KINDS[kind](dim, num_heads, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# the shared-map core


# The 'tiled' impl keeps one (T, N) slice of the map, sized to TILE_BYTES: small enough to stay in L2 next to the
# values and to make the call's peak memory no higher than fused SDPA's (at N = 3136, C = 64..256 on this CPU:
# T = 40), large enough to keep the matmuls efficient (T = 16..32 measured 5-15% slower, 64..128 at most 5% faster).
# Below TILED_MIN_N tokens the whole (B, N, N) map is small and one batched matmul beats the ATen tile loop (the C++
# core, where it is built, beats both at every N).
TILE_BYTES = 1 << 19
TILED_MIN_N = 512
MKL_KEY_COPY = True  # A/B switch for benchmarks/scripts: contiguous keys for MKL's logits (see _reuse_tiled)
ONEDNN_LOGITS = True  # A/B switch for benchmarks/scripts: logits through oneDNN too (else MKL addmm into one buffer)
CPU_KERNEL = True  # A/B switch for benchmarks/scripts: the C++ core (cpu_kernels) where it is built
CHANNEL_OUT = None  # A/B switch for benchmarks/scripts: channel-major output for channel-major values on torch.mm
# (None: the rule in _reuse_tiled; True / False: always / never)


def query_tile(n: int, itemsize: int = 4) -> int:
    """Queries per tile for N = ``n`` keys: a multiple of 8 in [16, 128] whose (T, N) buffer fits TILE_BYTES."""
    return max(16, min(128, TILE_BYTES // (itemsize * n) // 8 * 8))


REUSE_IMPLS = ('auto', 'eager', 'tiled', 'sdpa')


def _token_major(v: torch.Tensor) -> bool:
    """True when (B, C, N) ``v`` is a transposed view of (B, N, C) memory (what channels-last maps flatten to); a
    single token (N = 1) is both layouts and counts as channel-major."""
    return v.stride(1) == 1 and v.shape[1] > 1 and v.shape[2] > 1


def _cpu_kernel_may_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Float32 CPU inputs outside :func:`~uniform_vit.layers.conv.aten_only`: the C++ core's conditions (it may still
    be unbuilt or switched off: ``cpu_kernels.reuse_core()`` is then None)."""
    return (CPU_KERNEL and v.device.type == 'cpu' and q.dtype == k.dtype == v.dtype == torch.float32
            and not in_aten_only())


def _reuse_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
                 tile: int | None = None, relu: bool = False) -> torch.Tensor:
    """Query-tiled shared map: per image and per tile of queries, logits (T, N) -> softmax -> ONE matmul with every
    head's values. Only one (T, N) slice of the map exists at a time, softmaxed in place (PyTorch's CPU softmax reads
    each row before writing it; the tests compare with 'eager'), instead of the (B, N, N) map. Same arithmetic per
    element as 'eager', so the same numbers up to float rounding.

    On CUDA tensors, where Triton is installed, the whole core is one fused Triton kernel instead
    (:mod:`uniform_vit.layers.gpu_kernels`: flash-attention blocking with one map for all heads).

    Where the C++ kernel of :mod:`uniform_vit.layers.cpu_kernels` is built (CPUs with AVX-512 or AVX2; float32
    inputs in any layout), it does all of this in one op: tiles of 32 (AVX2: 16) queries, register-blocked products
    fused with the softmax, nothing copied, instead of one BLAS call per tile and product, each repacking its whole
    operands; 1.0-1.9x the loop below and less peak memory (benchmarks/RESULTS.md, section 1, sessions 14 and 16).
    Its output layout
    follows ``v``, as eager's does. The rest of this docstring is the ATen path, used everywhere else.

    Output rows are written token-major, (T, C) at a time (``at @ v^T``), and returned as a (B, C, N) view of
    (B, N, C) memory, with one exception: channel-major values on ``torch.mm`` (MKL, the policy on Intel and AVX2
    CPUs) whose rows lie a multiple of 4 KiB apart, from N = 2048 (N = 2048, 4096, ...). There the token-major product's
    transposed read of the values hits cache-set aliasing (1.2-1.45x slower at N = 4096 on an Intel Xeon), so the
    output is channel-major instead, (C, T) column blocks ``v @ at^T`` written in place. Elsewhere that form lost
    (0.90-0.98x at C = 64, N = 1024-3136; benchmarks/RESULTS.md, session 13), so the rule is that narrow.

    In eager calls where the GEMM policy prefers oneDNN (AMD CPUs with AVX-512; :mod:`uniform_vit.layers.gemm`), the
    value product goes through oneDNN: 1.7-2x the rate of ``torch.mm`` there. On Intel CPUs and on every AVX2 CPU each
    product stays on ``torch.mm`` (MKL, the faster of the two there), and token-major keys are copied into contiguous
    (Cq, N) rows for its logits (below). oneDNN wants the values as a contiguous (C, N) weight: a channel-major ``v``
    already is one; a token-major ``v`` is copied into one (C, N) buffer per image, reused across images (C x N floats
    more memory, which the doubled matmul rate repays many times over). The logits go through oneDNN too when the keys
    are token-major (a channels-last map: (N, Cq) rows, copied once per image only when they are a slice of a wider
    map), 1.04-1.15x on the whole core at N = 3136; they then come as a fresh (T, N) tensor per tile (the op has no
    ``out=``). Channel-major keys keep MKL's ``addmm`` into the reused buffer: copying them would add N x Cq floats to
    the peak memory of the bare core, which stays below fused SDPA's."""
    from . import gpu_kernels
    from .cpu_kernels import reuse_core
    from .gemm import linear_nt, onednn_linear_available, onednn_preferred

    B, C, N = v.shape
    if tile is None and v.device.type != 'cpu' and gpu_kernels.usable(q, k, v, bias):
        out = gpu_kernels.reuse_core_or_none(q, k, v, bias, scale)  # CUDA: one fused Triton kernel
        if out is not None:
            return out.relu_() if relu else out
    if B == 0:  # nothing to attend; the buffers below are chosen from the first image
        return v.new_empty(B, N, C).transpose(1, 2)
    if tile is None and _cpu_kernel_may_run(q, k, v):
        kernel = reuse_core()  # None where it is not built; an explicit tile size asks for the ATen path
        if kernel is not None:
            out = kernel(q, k, v, bias, scale, relu)  # the ReLU applied as each row is stored
            return out.transpose(1, 2) if _token_major(v) else out
    tile = tile or query_tile(N, q.element_size())
    qt, vt = q.transpose(1, 2), v.transpose(1, 2)  # (B, N, Cq), (B, N, C): views, BLAS takes either layout
    softmax_out = torch.ops.aten._softmax.out
    onednn = onednn_preferred() and onednn_linear_available(q, k, v)
    # channel-major values whose rows are a multiple of 4 KiB apart, from N = 2048 (below, the other way round won)
    channel_out = not onednn and not _token_major(v) and (
        N >= 2048 and v.stride(1) % 1024 == 0 if CHANNEL_OUT is None else CHANNEL_OUT)
    out = v.new_empty(B, C, N) if channel_out else v.new_empty(B, N, C)
    vbuf = v.new_empty(C, N) if onednn and not v[0].is_contiguous() else None
    # oneDNN wants the keys as an (N, Cq) weight. Token-major keys (a channels-last map) already are one; copying
    # channel-major keys would cost N x Cq floats of peak memory, so those keep MKL's addmm into the reused buffer.
    # Token-major keys sliced from a wider map (q and k split from one conv) have a token stride > Cq: oneDNN would
    # repack such a weight on every call (measured over 200x slower), so they are copied once per image, which pays
    # off only from Cq = 32 (deploy layer at N = 3136: 0.98x at Cq = 16, 1.07-1.10x at Cq = 32-64)
    kcopy = k.stride(2) != k.shape[1]  # for token-major keys: each token's Cq values do not follow the previous
    logits_onednn = onednn and ONEDNN_LOGITS and _token_major(k) and (not kcopy or k.shape[1] >= 32)
    buf = None if logits_onednn else q.new_empty(min(tile, N), N)
    kbuf = k.new_empty(N, k.shape[1]) if logits_onednn and kcopy else None
    # Where MKL is the chosen library (Intel CPUs), its addmm reads token-major keys as a transposed (Cq, N) operand,
    # 1.45x slower than a contiguous one for the (T, Cq) @ (Cq, N) logits on a Xeon: they are copied once per image
    # (N x Cq floats more memory; deploy layer 1.06-1.10x, benchmarks/RESULTS.md)
    kbuf_mkl = k.new_empty(k.shape[1], N) if MKL_KEY_COPY and not onednn and _token_major(k) else None
    for b in range(B):
        vb = kw = None  # (C, N) and (N, Cq) contiguous: linear layers' (out, in) weights
        if onednn:
            vb = v[b] if vbuf is None else vbuf.copy_(v[b])
        if logits_onednn:
            kw = k[b].t() if kbuf is None else kbuf.copy_(k[b].t())
        kb = k[b] if kbuf_mkl is None else kbuf_mkl.copy_(k[b])
        for s in range(0, N, tile):
            e = min(s + tile, N)
            if logits_onednn:
                # (T, N) rows of the shared map, oneDNN (up to 2x MKL's rate for K = Cq); the scale goes on the
                # (T, Cq) queries, a small copy, instead of on the (T, N) logits
                at = linear_nt(qt[b, s:e] * scale, kw)
                if bias is not None:
                    at += bias[s:e]
            else:
                at = buf[:e - s]
                if bias is None:
                    torch.addmm(at, qt[b, s:e], kb, beta=0.0, alpha=scale, out=at)
                else:
                    torch.addmm(bias[s:e], qt[b, s:e], kb, alpha=scale, out=at)  # (T, N) rows of the shared map
            softmax_out(at, -1, False, out=at)
            if vb is not None:
                out[b, s:e] = linear_nt(at, vb)  # (T, C): every head in one matmul, oneDNN
            elif channel_out:
                torch.mm(v[b], at.t(), out=out[b, :, s:e])  # (C, T): every head in one matmul
            else:
                torch.mm(at, vt[b], out=out[b, s:e])  # (T, C): every head in one matmul
            del at  # free this tile's logits before the next tile allocates its own
    if relu:
        out.relu_()
    return out if channel_out else out.transpose(1, 2)


def reuse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
                    impl: str = 'auto', relu: bool = False) -> torch.Tensor:
    """One softmax map from narrow q/k applied to every head's values at once.

    q, k: (B, Cq, N); v: (B, C, N); bias: (N, N) or None. Returns (B, C, N). 'eager' lays it out like ``v`` (a
    token-major view, i.e. a flattened channels-last map, gives a token-major result, so channels-last networks never
    transpose); 'tiled' returns a token-major view but in one case (see ``_reuse_tiled``). ``.view(B, C, H, W)``
    works on either.

    ``impl='eager'`` materialises the (B, N, N) map; ``'tiled'`` walks tiles of queries so only a (T, N) slice of
    the map exists at a time (same numbers, much faster and smaller at large N on CPU); ``'sdpa'`` hands the same
    computation to PyTorch's fused ``scaled_dot_product_attention`` as ONE head with a Cq-wide q/k and a C-wide value;
    ``'auto'`` (default) picks 'tiled' when no gradient is needed: on CPU at every N where the C++ core is built
    (UniForm's 7 x 7 windows, N = 49, ran 2.0-2.5x 'eager' with it; benchmarks/RESULTS.md, section 1, session 31) and
    from N = 512 without it; on CUDA from N = 512 where the Triton kernel can run, which 'tiled' then uses. Else
    'eager'.

    ``relu=True`` returns ``relu(out)`` (what UniForm's projection applies first): the C++ core applies it as it
    stores each row, instead of a pass over the output.
    """
    N = q.shape[-1]
    if impl == 'auto':
        impl = 'eager'  # training, and UniForm's own 7x7 windows where no C++ core is built, end here
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))):
            from . import gpu_kernels
            from .cpu_kernels import reuse_core

            if q.device.type == 'cpu':
                if N >= TILED_MIN_N or (_cpu_kernel_may_run(q, k, v) and reuse_core() is not None):
                    impl = 'tiled'
            elif N >= TILED_MIN_N and gpu_kernels.usable(q, k, v, bias):
                impl = 'tiled'
    if impl == 'tiled':
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
            raise ValueError("reuse attention impl 'tiled' is inference-only (it writes into buffers); use 'eager'")
        return _reuse_tiled(q, k, v, bias, scale, relu=relu)
    out = _reuse_untiled(q, k, v, bias, scale, impl)
    return torch.relu(out) if relu else out


def _reuse_untiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
                   impl: str) -> torch.Tensor:
    """reuse_attention's 'sdpa' and 'eager' forms."""
    if impl == 'sdpa':
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).unsqueeze(1), k.transpose(1, 2).unsqueeze(1), v.transpose(1, 2).unsqueeze(1),
            attn_mask=bias, scale=scale)  # (B, 1, N, C)
        return out.squeeze(1).transpose(1, 2)
    if impl != 'eager':
        raise ValueError(f"unknown reuse attention impl {impl!r}; choose one of {REUSE_IMPLS}")
    return apply_map(reuse_map(q, k, bias, scale), v)


def reuse_map(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The ONE (B, N, N) softmax map of a window from narrow q, k (B, Cq, N) and the (N, N) bias, materialised
    (eager Reuse Attention, and TReX sources that share their map)."""
    B, N = q.shape[0], q.shape[-1]
    qt = q.transpose(1, 2)  # (B, N, Cq)
    if bias is None:
        attn = torch.bmm(qt, k).mul_(scale)
    else:
        attn = torch.baddbmm(bias.expand(B, N, N), qt, k, alpha=scale)
    return attn.softmax(dim=-1)


def apply_map(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A (B, N, N) attention map applied to every head's values v (B, C, N) in one matmul, laid out like ``v``: a
    token-major view (a flattened channels-last map) gives a token-major result, so channels-last networks never
    transpose (TReX's map reuse applies its borrowed maps with it too)."""
    if _token_major(v):
        return torch.bmm(attn, v.transpose(1, 2)).transpose(1, 2)  # (B, N, C) memory
    return torch.bmm(v, attn.transpose(1, 2))  # (B, C, N)


# ----------------------------------------------------------------------------------------------------------------
# relative position bias, one table (or one per head) indexed by (|dy|, |dx|) inside a window


class RelPosBias(nn.Module):
    """Learned bias table of shape (tables, window*window), gathered into (tables, N, N) for an h x w window."""

    def __init__(self, window_size: int, tables: int = 1):
        super().__init__()
        self.window_size = window_size
        self.attention_biases = nn.Parameter(torch.zeros(tables, window_size * window_size))
        self._cache: dict[tuple, torch.Tensor] = {}

    def index(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing='ij')
        ys, xs = ys.flatten(), xs.flatten()
        return (ys[:, None] - ys[None, :]).abs() * self.window_size + (xs[:, None] - xs[None, :]).abs()  # (N, N)

    def forward(self, h: int, w: int) -> torch.Tensor:
        table = self.attention_biases
        if self.training or torch.jit.is_scripting():
            return table[:, self.index(h, w, table.device)]
        key = (int(h), int(w), table.device, table.dtype)
        cached = self._cache.get(key)
        if cached is not None:
            # also a constant for tracers (jit.trace, export): in eval mode the table only changes through
            # load_state_dict() or train(), which clear the cache; the gather it saves cost ~5% of a traced UniForm
            return cached
        bias = table[:, self.index(h, w, table.device)]
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self._cache[key] = bias.detach()
        return bias

    def train(self, mode: bool = True):
        self._cache.clear()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Reuse Attention


def _head_splits(dim: int, num_heads: int, kernels: Sequence[int]) -> list[int]:
    if dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    if num_heads > len(kernels):
        raise ValueError(f"num_heads {num_heads} needs {num_heads} value kernels, got {tuple(kernels)}")
    return [dim // num_heads] * num_heads


@register_attention('reuse')
class ReuseAttention(nn.Module):
    """UniForm's Reuse Attention for one window (train form). ``fuse()`` returns :class:`ReuseAttentionDeploy`."""

    def __init__(self, dim: int, num_heads: int = 4, key_dim: int = 16, window_size: int = 7,
                 kernels: Sequence[int] = (1, 3, 5, 7), q_kernel: int = 7, impl: str = 'auto'):
        super().__init__()
        self.dim, self.num_heads, self.impl = dim, num_heads, impl
        self.qk_dim = dim // 4
        self.scale = key_dim ** -0.5
        self.kernels = tuple(kernels[:num_heads])
        self.splits = _head_splits(dim, num_heads, kernels)
        self.qk = ConvNorm(dim, 2 * self.qk_dim)
        self.q_dw = ConvNorm(self.qk_dim, self.qk_dim, q_kernel, groups=self.qk_dim)
        # per-head value: depthwise conv of its own channel slice, kernel k_i, with bias, no BN, no projection
        self.v_convs = nn.ModuleList(
            make_conv(c, c, k, padding=k // 2, groups=c) for c, k in zip(self.splits, self.kernels))
        self.proj = nn.Sequential(nn.ReLU(), ConvNorm(dim, dim, bn_weight_init=0.0))
        self.rel_bias = RelPosBias(window_size, tables=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k = self.qk(x).split([self.qk_dim, self.qk_dim], dim=1)  # (B, C/4, H, W) x 2
        q = self.q_dw(q)
        v = torch.cat([conv(xi) for conv, xi in zip(self.v_convs, x.split(self.splits, dim=1))], dim=1)  # (B, C, H, W)
        out = reuse_attention(q.flatten(2), k.flatten(2), v.flatten(2), self.rel_bias(H, W)[0], self.scale, self.impl)
        return self.proj(out.view(B, C, H, W))

    @torch.no_grad()
    def fuse(self) -> ReuseAttentionDeploy:
        return ReuseAttentionDeploy.from_train(self)


@torch.no_grad()
def merge_value_convs(convs: Sequence[nn.Conv2d]) -> nn.Conv2d:
    """The h per-head depthwise value convs (kernels k_i, consecutive channel slices) as ONE depthwise conv, the
    smaller kernels zero-padded to the largest (``make_conv``: this library's depthwise op, which skips the taps
    that only see padding on small maps): the deploy form's ``v_conv``, and TReX's converted layers'."""
    kmax = max(c.kernel_size[0] for c in convs)
    dim = sum(c.in_channels for c in convs)
    w0 = convs[0].weight
    merged = make_conv(dim, dim, kmax, padding=kmax // 2, groups=dim).to(device=w0.device, dtype=w0.dtype)
    merged.weight.zero_()
    start = 0
    for c in convs:
        k, n, off = c.kernel_size[0], c.in_channels, (kmax - c.kernel_size[0]) // 2
        merged.weight[start:start + n, :, off:off + k, off:off + k] = c.weight
        merged.bias[start:start + n] = c.bias
        start += n
    return merged


class ReuseAttentionDeploy(nn.Module):
    """Deploy form: BN folded into the convs and the h value convs merged into ONE depthwise conv (smaller kernels
    zero-padded to the largest), so values cost one conv call instead of h."""

    def __init__(self, dim: int, qk_dim: int, v_kernel: int, q_kernel: int, window_size: int, scale: float,
                 impl: str = 'auto'):
        super().__init__()
        self.dim, self.qk_dim, self.scale, self.impl = dim, qk_dim, scale, impl
        self.qk = make_conv(dim, 2 * qk_dim, 1)
        self.q_dw = make_conv(qk_dim, qk_dim, q_kernel, padding=q_kernel // 2, groups=qk_dim)
        self.v_conv = make_conv(dim, dim, v_kernel, padding=v_kernel // 2, groups=dim)
        # the train form's (ReLU, conv) without BN; forward applies the ReLU in the core's store (relu=True)
        self.proj = nn.Sequential(nn.ReLU(inplace=True), make_conv(dim, dim, 1))
        self.rel_bias = RelPosBias(window_size, tables=1)

    @classmethod
    @torch.no_grad()
    def from_train(cls, m: ReuseAttention) -> ReuseAttentionDeploy:
        kmax = max(m.kernels)
        q_conv = m.q_dw.fuse()
        p = next(m.parameters())
        d = cls(m.dim, m.qk_dim, kmax, q_conv.kernel_size[0], m.rel_bias.window_size, m.scale, m.impl)
        d = d.to(device=p.device, dtype=p.dtype)
        d.qk.load_state_dict(m.qk.fuse().state_dict())
        d.q_dw.load_state_dict(q_conv.state_dict())
        d.proj[1].load_state_dict(m.proj[1].fuse().state_dict())
        d.rel_bias.attention_biases.copy_(m.rel_bias.attention_biases)
        d.v_conv.load_state_dict(merge_value_convs(m.v_convs).state_dict())
        return d.train(m.training)

    adds_residual = True  # forward(x, residual) returns residual + attention(x): see Residual

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        q, k = self.qk(x).split([self.qk_dim, self.qk_dim], dim=1)
        q = self.q_dw(q)
        v = self.v_conv(x)
        bias = self.rel_bias(x.shape[2], x.shape[3])[0]
        # proj is (ReLU, 1x1 conv): the ReLU goes into the core's store and the block's residual into the conv's
        # (C++ ops; the ATen paths apply them as separate ops): 0.5-1 % of a traced uniform_t, near the noise
        # (session 31)
        out = reuse_attention(q.flatten(2), k.flatten(2), v.flatten(2), bias, self.scale, self.impl, relu=True)
        # view_as: a trace records no size arithmetic for it; v, not x, whose last use it would become (the
        # windowed stage's partitioned copy of x would then stay alive through the core: +0.8 MB peak in uniform_t)
        return self.proj[1](out.view_as(v), residual)


# ----------------------------------------------------------------------------------------------------------------
# the paper's ablation: the same network with standard multi-head attention


@register_attention('mha')
class MultiHeadAttention(nn.Module):
    """Standard multi-head attention ("UniForm without Reuse Attention"): each head has its own Q/K/V projection
    (key dim ``key_dim``, value dim C/h) and its own (N, N) softmax map and bias table."""

    def __init__(self, dim: int, num_heads: int = 4, key_dim: int = 16, window_size: int = 7,
                 kernels: Sequence[int] = (1, 3, 5, 7), impl: str = 'eager', **_: object):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.key_dim, self.impl = dim, num_heads, key_dim, impl
        self.v_dim = dim // num_heads
        self.scale = key_dim ** -0.5
        self.qkv = ConvNorm(dim, num_heads * (2 * key_dim + self.v_dim))
        self.proj = nn.Sequential(nn.ReLU(), ConvNorm(dim, dim, bn_weight_init=0.0))
        self.rel_bias = RelPosBias(window_size, tables=num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N, h = H * W, self.num_heads
        q, k, v = self.qkv(x).view(B, h, -1, N).split([self.key_dim, self.key_dim, self.v_dim], dim=2)
        bias = self.rel_bias(H, W)  # (h, N, N)
        if self.impl == 'sdpa':
            out = F.scaled_dot_product_attention(q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1),
                                                 attn_mask=bias, scale=self.scale).transpose(-2, -1)
        else:
            attn = (q.transpose(-2, -1) @ k) * self.scale + bias  # (B, h, N, N): one map per head
            out = v @ attn.softmax(dim=-1).transpose(-2, -1)  # (B, h, C/h, N)
        return self.proj(out.reshape(B, C, H, W))

    def fuse(self) -> nn.Module:
        from .fuse import fuse_children

        return fuse_children(self)


# ----------------------------------------------------------------------------------------------------------------


def _channels_last(x: torch.Tensor) -> bool:
    """A 4-d map stored as (B, H, W, C) (and not trivially both layouts)."""
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous()


class WindowAttention(nn.Module):
    """Runs ``attn`` on non-overlapping ``window_size`` windows. Maps not a multiple of the window are zero-padded
    at the bottom/right and cropped back; maps that fit in one window are attended as a whole (official code)."""

    def __init__(self, attn: nn.Module, window_size: int = 7):
        super().__init__()
        self.attn = attn
        self.window_size = window_size

    @property
    def adds_residual(self) -> bool:
        """Whether ``forward(x, residual)`` is supported (``attn`` adds the residual itself)."""
        return getattr(self.attn, 'adds_residual', False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``attn`` on the windows of ``x``, plus ``residual`` when given (only where ``adds_residual``)."""
        B, C, H, W = x.shape
        ws = self.window_size
        if ws >= H and ws >= W:
            return self.attn(x) if residual is None else self.attn(x, residual)
        cl = _channels_last(x)
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        nh, nw = (H + pad_b) // ws, (W + pad_r) // ws
        x = x.view(B, C, nh, ws, nw, ws)
        if cl:  # keep channels-last: windows as (B*nh*nw, ws, ws, C) memory, seen as NCHW-shaped views
            x = x.permute(0, 2, 4, 3, 5, 1).reshape(B * nh * nw, ws, ws, C).permute(0, 3, 1, 2)
            x = self.attn(x).permute(0, 2, 3, 1).reshape(B, nh, nw, ws, ws, C)
            x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, nh * ws, nw * ws, C).permute(0, 3, 1, 2)
        else:
            # (B, C, nh*ws, nw*ws) -> (B*nh*nw, C, ws, ws)
            x = x.permute(0, 2, 4, 1, 3, 5).reshape(B * nh * nw, C, ws, ws)
            x = self.attn(x)
            # (B*nh*nw, C, ws, ws) -> (B, C, nh*ws, nw*ws)
            x = x.view(B, nh, nw, C, ws, ws).permute(0, 3, 1, 4, 2, 5).reshape(B, C, nh * ws, nw * ws)
        if pad_b or pad_r:
            x = x[:, :, :H, :W].contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        return x if residual is None else x + residual

    def fuse(self) -> WindowAttention:
        attn = self.attn.fuse() if hasattr(self.attn, 'fuse') else self.attn
        return WindowAttention(attn, self.window_size)
