"""Attention mechanisms side by side (paper Table 3 / Fig. 3): one interface, the same C and h, a sweep over N.

Two families, each behind :class:`Mechanism`:

* ``module``: a whole attention layer on a (B, C, H, W) map (projections included), e.g. timm's cascaded group
  attention, SHViT's single-head SHSA, SwiftFormer's additive attention, UniForm's Reuse Attention (train and deploy
  forms), standard multi-head attention (explicit per-head maps or PyTorch SDPA), linear, grouped- and multi-query.
* ``core``: only the attention arithmetic on ready q/k/v (what the issue's targets are about): multi-head SDPA (its
  flash kernel), explicit multi-head, and the Reuse core (eager, query-tiled, single-head SDPA).

Analytic FLOPs follow ``torch.utils.flop_counter``'s convention (2 per multiply-accumulate of matmuls and convs;
softmax, norms and activations are not counted). Analytic bytes are the implementation's compulsory traffic in the
run's dtype: inputs, weights and outputs once, plus every intermediate it materialises in memory written once and
read once (a query tile that lives in cache is not counted). Arithmetic intensity = FLOPs / bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

F32 = 4  # bytes


@dataclass(frozen=True)
class Mechanism:
    name: str
    family: str  # 'module' or 'core'
    label: str
    build: Callable[[int, int, int, int], nn.Module]  # (C, h, H, W) -> module taking the inputs below
    flops: Callable[[int, int, int, int], float]  # (B, N, C, h) -> FLOPs
    bytes: Callable[[int, int, int, int], float]  # (B, N, C, h) -> bytes
    needs_divisible: int = 1  # C must be divisible by h * this


# ---- modules written here (timm has none of these as a standalone layer on NCHW maps) -------------------------

class MultiHeadMap(nn.Module):
    """Standard multi-head attention on a map, laid out as timm's ViT attention (tokens, Linear projections, heads
    contiguous in d so SDPA can use its fused kernel): h heads of d = C/h, out projection. ``sdpa=False``
    materialises the (B, h, N, N) maps explicitly; ``kv_heads`` < h gives grouped-query (1: multi-query)."""

    def __init__(self, dim: int, num_heads: int, sdpa: bool = False, kv_heads: int | None = None):
        super().__init__()
        self.h, self.d = num_heads, dim // num_heads
        self.kv_heads = kv_heads or num_heads
        if num_heads % self.kv_heads:
            raise ValueError(f"{num_heads} heads cannot share {self.kv_heads} key/value heads")
        self.sdpa = sdpa
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.d)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N = H * W
        t = x.flatten(2).transpose(1, 2)  # (B, N, C) tokens
        q = self.q(t).view(B, N, self.h, self.d).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv(t).view(B, N, 2, self.kv_heads, self.d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, g, N, d)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv_heads != self.h)
        else:
            if self.kv_heads != self.h:
                k = k.repeat_interleave(self.h // self.kv_heads, 1)
                v = v.repeat_interleave(self.h // self.kv_heads, 1)
            attn = (q @ k.transpose(-2, -1) * self.d ** -0.5).softmax(-1)  # (B, h, N, N): one map per head
            out = attn @ v
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)
        return out.transpose(1, 2).reshape(B, C, H, W)


class LinearAttention(nn.Module):
    """ReLU-kernel linear attention as in EfficientViT (MIT): per head out = (v' k^T) q with v' = [v; 1], the last
    row giving the normaliser, so the cost is linear in N."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.h, self.d, self.eps = num_heads, dim // num_heads, eps
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, 3, self.h, self.d, H * W).unbind(1)  # (B, h, d, N)
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 0, 0, 1), value=1.0)  # (B, h, d+1, N)
        kv = v @ k.transpose(-2, -1)  # (B, h, d+1, d)
        out = kv @ q  # (B, h, d+1, N)
        out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        return self.proj(out.reshape(B, C, H, W))


class CoreInputs(nn.Module):
    """Wraps a core function so that a core takes the same (B, C, H, W) map as a module: q/k/v are fixed random
    tensors made once per shape (outside the timing), so only the attention arithmetic is timed."""

    def __init__(self, fn: Callable[..., torch.Tensor], make: Callable[[int, torch.Tensor], tuple]):
        super().__init__()
        self.fn, self.make = fn, make
        self._inputs: dict[tuple, tuple] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._inputs:
            self._inputs = {key: self.make(x)}
        return self.fn(*self._inputs[key])


def _mha_qkv(h: int) -> Callable[[torch.Tensor], tuple]:
    def make(x: torch.Tensor) -> tuple:
        B, C, H, W = x.shape
        g = torch.Generator(device=x.device).manual_seed(0)
        return tuple(torch.randn(B, h, H * W, C // h, generator=g, device=x.device, dtype=x.dtype) for _ in range(3))

    return make


def _reuse_qkv(x: torch.Tensor) -> tuple:
    B, C, H, W = x.shape
    g = torch.Generator(device=x.device).manual_seed(0)
    q, k = (torch.randn(B, C // 4, H * W, generator=g, device=x.device, dtype=x.dtype) for _ in range(2))
    v = torch.randn(B, C, H * W, generator=g, device=x.device, dtype=x.dtype)
    return q, k, v


def _reuse_qkv_token_major(x: torch.Tensor) -> tuple:
    """The same shapes as (B, C, N) views of (B, N, C) memory: what a channels-last deploy layer hands the core."""
    B, C, H, W = x.shape
    g = torch.Generator(device=x.device).manual_seed(0)
    return tuple(torch.randn(B, H * W, c, generator=g, device=x.device, dtype=x.dtype).transpose(1, 2)
                 for c in (C // 4, C // 4, C))


def _explicit_mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v


def _reuse_core(impl: str) -> Callable[..., torch.Tensor]:
    from ..layers.attention import reuse_attention

    return lambda q, k, v: reuse_attention(q, k, v, None, 16 ** -0.5, impl)


# ---- builders -----------------------------------------------------------------------------------------------------

def _reuse(C: int, h: int, H: int, W: int, deploy: bool = False, impl: str = 'eager') -> nn.Module:
    from ..layers.attention import ReuseAttention

    m = ReuseAttention(C, h, window_size=max(H, W), impl=impl).eval()  # one window = the whole map
    return m.fuse().eval() if deploy else m


def _reuse_fast(C: int, h: int, H: int, W: int) -> nn.Module:
    """The deploy form as the fast path runs it: channels-last map in, query-tiled core ('auto') at large N."""
    inner = _reuse(C, h, H, W, deploy=True, impl='auto')

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x.contiguous(memory_format=torch.channels_last))

    return ChannelsLast()


def _cga(C: int, h: int, H: int, W: int) -> nn.Module:
    from timm.models.efficientvit_msra import CascadedGroupAttention

    if H != W:
        raise UserError("cascaded group attention (timm) needs a square map")
    return CascadedGroupAttention(C, key_dim=16, num_heads=h, attn_ratio=(C / h) / 16, resolution=H,
                                  kernels=(5,) * h)


def _shsa(C: int, h: int, H: int, W: int) -> nn.Module:
    from timm.models.shvit import SHSA

    return SHSA(C, qk_dim=16, pdim=C // 4)  # single head over a quarter of the channels, as in SHViT


def _additive(C: int, h: int, H: int, W: int) -> nn.Module:
    from timm.models.swiftformer import EfficientAdditiveAttention

    return EfficientAdditiveAttention(in_dims=C, token_dim=C, num_heads=1)


# ---- analytic counts ------------------------------------------------------------------------------------------------

def _proj(B: int, N: int, cin: int, cout: int) -> float:
    return 2.0 * B * N * cin * cout


def reuse_core_flops(B: int, N: int, C: int, h: int) -> float:
    """q k^T with Cq = C/4, then the ONE map times all C value channels: 2.5 N^2 C per image."""
    return 2.0 * B * N * N * (C // 4) + 2.0 * B * N * N * C


def mha_core_flops(B: int, N: int, C: int, h: int) -> float:
    """h maps from d = C/h wide q/k, each applied to its d value channels: 4 N^2 C per image."""
    return 4.0 * B * N * N * C


def reuse_module_flops(B: int, N: int, C: int, h: int, kernels: tuple[int, ...] = (1, 3, 5, 7),
                       deploy: bool = False) -> float:
    cq = C // 4
    v_taps = h * max(kernels[:h]) ** 2 if deploy else sum(k * k for k in kernels[:h])  # merged kernel is zero-padded
    return (_proj(B, N, C, 2 * cq) + 2.0 * B * N * cq * 49 + 2.0 * B * N * (C // h) * v_taps
            + reuse_core_flops(B, N, C, h) + _proj(B, N, C, C))


def mha_module_flops(B: int, N: int, C: int, h: int, kv_heads: int | None = None) -> float:
    kvd = 2 * (kv_heads or h) * (C // h)
    return _proj(B, N, C, C) + _proj(B, N, C, kvd) + mha_core_flops(B, N, C, h) + _proj(B, N, C, C)


def linear_flops(B: int, N: int, C: int, h: int) -> float:
    d = C // h
    return _proj(B, N, C, 3 * C) + 4.0 * B * N * h * d * (d + 1) + _proj(B, N, C, C)


def cga_flops(B: int, N: int, C: int, h: int) -> float:
    d, kd = C // h, 16
    per_head = _proj(B, N, d, 2 * kd + d) + 2.0 * B * N * kd * 25 + 2.0 * B * N * N * kd + 2.0 * B * N * N * d
    return h * per_head + _proj(B, N, C, C)


def shsa_flops(B: int, N: int, C: int, h: int) -> float:
    p, kd = C // 4, 16
    return _proj(B, N, p, 2 * kd + p) + 2.0 * B * N * N * kd + 2.0 * B * N * N * p + _proj(B, N, C, C)


def additive_flops(B: int, N: int, C: int, h: int) -> float:
    return 4 * _proj(B, N, C, C) + 2.0 * B * N * C


def _bytes(inputs: float, weights: float, outputs: float, intermediates: float) -> float:
    return F32 * (inputs + weights + outputs + 2 * intermediates)


MECHANISMS: dict[str, Mechanism] = {m.name: m for m in [
    Mechanism('mha', 'module', 'multi-head, explicit per-head maps', lambda C, h, H, W: MultiHeadMap(C, h),
              mha_module_flops,
              lambda B, N, C, h: _bytes(B * N * C, 4 * C * C, B * N * C, 4 * B * N * C + 2 * B * h * N * N)),
    Mechanism('mha_sdpa', 'module', 'multi-head, PyTorch SDPA', lambda C, h, H, W: MultiHeadMap(C, h, sdpa=True),
              mha_module_flops, lambda B, N, C, h: _bytes(B * N * C, 4 * C * C, B * N * C, 4 * B * N * C)),
    Mechanism('gqa', 'module', 'grouped-query (h/2 kv heads), SDPA',
              lambda C, h, H, W: MultiHeadMap(C, h, sdpa=True, kv_heads=max(1, h // 2)),
              lambda B, N, C, h: mha_module_flops(B, N, C, h, max(1, h // 2)),
              lambda B, N, C, h: _bytes(B * N * C, 3 * C * C, B * N * C, 3 * B * N * C)),
    Mechanism('mqa', 'module', 'multi-query (1 kv head), SDPA',
              lambda C, h, H, W: MultiHeadMap(C, h, sdpa=True, kv_heads=1),
              lambda B, N, C, h: mha_module_flops(B, N, C, h, 1),
              lambda B, N, C, h: _bytes(B * N * C, 2 * C * C + 2 * C * C // h, B * N * C,
                                        2 * B * N * C + 2 * B * N * C // h)),
    Mechanism('linear', 'module', 'linear attention, ReLU kernel (EfficientViT-MIT)',
              lambda C, h, H, W: LinearAttention(C, h), linear_flops,
              lambda B, N, C, h: _bytes(B * N * C, 4 * C * C, B * N * C, 4 * B * N * C)),
    Mechanism('cga', 'module', 'cascaded group attention (timm efficientvit_msra)', _cga, cga_flops,
              lambda B, N, C, h: _bytes(B * N * C, C * C + 2 * C * C, B * N * C,
                                        B * N * (C + 2 * 16 * h) + B * h * N * N), needs_divisible=16),
    Mechanism('shsa', 'module', 'single-head SHSA (timm shvit)', _shsa, shsa_flops,
              lambda B, N, C, h: _bytes(B * N * C, C * C, B * N * C, B * N * (C // 4 + 32) + B * N * N),
              needs_divisible=4),
    Mechanism('additive', 'module', 'efficient additive attention (timm swiftformer)', _additive, additive_flops,
              lambda B, N, C, h: _bytes(B * N * C, 4 * C * C, B * N * C, 5 * B * N * C)),
    Mechanism('reuse', 'module', 'Reuse Attention, train form (eager)', _reuse, reuse_module_flops,
              lambda B, N, C, h: _bytes(B * N * C, 1.5 * C * C, B * N * C, B * N * (C // 2 + 2 * C) + B * N * N),
              needs_divisible=4),
    Mechanism('reuse_deploy', 'module', 'Reuse Attention, deploy form (eager core)',
              lambda C, h, H, W: _reuse(C, h, H, W, deploy=True),
              lambda B, N, C, h: reuse_module_flops(B, N, C, h),  # nominal: the unfused count
              lambda B, N, C, h: _bytes(B * N * C, 1.5 * C * C, B * N * C, B * N * (C // 2 + 2 * C) + B * N * N),
              needs_divisible=4),
    Mechanism('reuse_fast', 'module', 'Reuse Attention, deploy form, channels-last + query-tiled', _reuse_fast,
              lambda B, N, C, h: reuse_module_flops(B, N, C, h),
              lambda B, N, C, h: _bytes(B * N * C, 1.5 * C * C, B * N * C, B * N * (C // 2 + 2 * C)),
              needs_divisible=4),
    Mechanism('core_mha_sdpa', 'core', 'core: multi-head SDPA (flash)',
              lambda C, h, H, W: CoreInputs(F.scaled_dot_product_attention, _mha_qkv(h)), mha_core_flops,
              lambda B, N, C, h: _bytes(3 * B * N * C, 0, B * N * C, 0)),
    Mechanism('core_mha_explicit', 'core', 'core: multi-head, explicit maps',
              lambda C, h, H, W: CoreInputs(_explicit_mha, _mha_qkv(h)), mha_core_flops,
              lambda B, N, C, h: _bytes(3 * B * N * C, 0, B * N * C, 2 * B * h * N * N)),
    Mechanism('core_reuse_eager', 'core', 'core: Reuse, eager (B, N, N) map',
              lambda C, h, H, W: CoreInputs(_reuse_core('eager'), _reuse_qkv), reuse_core_flops,
              lambda B, N, C, h: _bytes(1.5 * B * N * C, 0, B * N * C, 2 * B * N * N), needs_divisible=4),
    Mechanism('core_reuse_sdpa', 'core', 'core: Reuse as single-head SDPA (C-wide value)',
              lambda C, h, H, W: CoreInputs(_reuse_core('sdpa'), _reuse_qkv), reuse_core_flops,
              lambda B, N, C, h: _bytes(1.5 * B * N * C, 0, B * N * C, 0), needs_divisible=4),
    Mechanism('core_reuse_tiled', 'core', 'core: Reuse, query-tiled (fast path: C++ on AVX-512, Triton on CUDA)',
              lambda C, h, H, W: CoreInputs(_reuse_core('tiled'), _reuse_qkv), reuse_core_flops,
              lambda B, N, C, h: _bytes(1.5 * B * N * C, 0, B * N * C, 0), needs_divisible=4),
    Mechanism('core_reuse_tiled_tm', 'core', "core: Reuse, query-tiled, token-major q/k/v (the deploy layer's)",
              lambda C, h, H, W: CoreInputs(_reuse_core('tiled'), _reuse_qkv_token_major), reuse_core_flops,
              lambda B, N, C, h: _bytes(1.5 * B * N * C, 0, B * N * C, 0), needs_divisible=4),
]}
DEFAULT_TOKENS = (49, 196, 784, 3136, 4096)
# pairs whose speed ratio the targets name: (fast, baseline)
TARGET_PAIRS = (('core_reuse_tiled', 'core_mha_sdpa'), ('core_reuse_tiled_tm', 'core_mha_sdpa'),
                ('core_reuse_eager', 'core_mha_sdpa'),
                ('reuse_fast', 'mha_sdpa'), ('reuse_deploy', 'mha_sdpa'))


def grid(n: int) -> tuple[int, int]:
    """A near-square H x W with H * W = n exactly (49 -> 7x7, 4096 -> 64x64, 200 -> 10x20)."""
    h = int(math.isqrt(n))
    while n % h:
        h -= 1
    return h, n // h


def check_config(names: list[str], tokens: list[int], channels: list[int], heads: list[int], batch: int) -> None:
    """One-line errors for impossible sweeps, before anything is built."""
    unknown = [n for n in names if n not in MECHANISMS]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(MECHANISMS), n=2)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ''
        raise UserError(f"unknown mechanism {unknown[0]!r}{hint} (choose from {', '.join(MECHANISMS)})")
    if batch < 1 or any(n < 1 for n in tokens) or any(c < 1 for c in channels) or any(h < 1 for h in heads):
        raise UserError("batch, tokens, channels and heads must all be at least 1")
    for c in channels:
        for h in heads:
            if c % h:
                raise UserError(f"channels {c} are not divisible by heads {h}")
            for name in names:
                m = MECHANISMS[name]
                if c % (h * m.needs_divisible) and c % m.needs_divisible:
                    raise UserError(f"{name} needs channels divisible by {m.needs_divisible} (got {c})")
                if name in ('reuse', 'reuse_deploy', 'reuse_fast') and h > 4:
                    raise UserError(f"{name}: Reuse Attention has value kernels (1, 3, 5, 7), so at most 4 heads")


# ---- the sweep ----------------------------------------------------------------------------------------------------

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> fp16 on CUDA (the paper's GPU precision, and the only one PyTorch's flash attention runs in), fp32
    elsewhere; anything else must be a key of DTYPES."""
    if dtype == 'auto':
        return 'fp16' if device.startswith('cuda') else 'fp32'
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return dtype


def run_attn_bench(names: list[str], tokens: list[int], channels: list[int], heads: list[int], batch: int = 1,
                   rounds: int = 5, warmup: int = 1, threads: int = 1, device: str = 'cpu',
                   progress: Callable[[str, int, int], None] | None = None, rewarm: int = 1,
                   dtype: str = 'fp32') -> dict:
    """Time every mechanism at every (C, h, N); mechanisms of one configuration are interleaved round by round,
    with the matmul-peak probe as one more candidate; each timed call follows ``rewarm`` untimed calls of the same
    mechanism (harness.interleaved_timing). Inputs and modules in ``dtype`` ('fp32', 'fp16', 'bf16' or 'auto'), the
    peak probe too; analytic bytes count that dtype's element size. Returns {'environment', 'settings', 'peak',
    'rows', 'skipped'}."""
    from .harness import interleaved_timing, median, paired_ratio, spread
    from .machine import calibrate_matmul_peak, environment, matmul_peak_fn, peak_memory_bytes
    from .models import quiet

    check_config(names, tokens, channels, heads, batch)
    if rounds < 1 or warmup < 0 or rewarm < 0:
        raise UserError("need rounds >= 1, warmup >= 0 and rewarm >= 0")
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError("--device cuda requested but torch sees no CUDA device")
    dtype = resolve_dtype(dtype, device)
    dt = DTYPES[dtype]
    scale_bytes = dt.itemsize / F32  # the analytic byte counts are in 4-byte elements
    progress = progress or (lambda *_: None)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        env = environment(device, threads)
        if device == 'cpu':  # the tiled Reuse core's C++ kernel: built here (once per machine), before any timing
            from ..layers.cpu_kernels import status

            progress('C++ Reuse core kernel', 0, 1)
            env['reuse_kernel'] = status()
        else:  # CUDA: the Triton kernel of the fused Reuse core
            from ..layers.gpu_kernels import status as gpu_status

            env['reuse_kernel'] = gpu_status(device)
        progress('calibrating matmul peak', 0, 1)
        peak_op, peak_shape, rate = calibrate_matmul_peak(device, dt)
        repeat = max(1, round(0.01 * rate / (2.0 * math.prod(peak_shape))))  # ~10 ms per probe call
        peak_fn, peak_flops = matmul_peak_fn(peak_shape, device, dt, peak_op, repeat)
        configs = [(c, h, n) for c in channels for h in heads for n in tokens]
        rows, skipped = [], []
        for i, (C, h, N) in enumerate(configs):
            progress(f'C={C} h={h} N={N}', i, len(configs))
            H, W = grid(N)
            x = torch.randn(batch, C, H, W, device=device, dtype=dt)
            fns: dict[str, Callable[[], object]] = {}
            mems: dict[str, int | None] = {}
            for name in names:
                mech = MECHANISMS[name]
                try:
                    mod = mech.build(C, h, H, W)
                    mod.to(device=device, dtype=dt)
                    mod.eval()  # not chained: some timm modules' train() returns None
                    call = _bind(mod, x)
                    with quiet():
                        call()  # build caches (bias tables, core inputs) before timing
                        mems[name] = peak_memory_bytes(call, device)
                except (RuntimeError, ValueError, UserError) as e:
                    skipped.append(dict(mechanism=name, C=C, h=h, N=N, reason=str(e).splitlines()[0]))
                    continue
                fns[name] = call
            fns['__peak__'] = peak_fn
            times = interleaved_timing(fns, rounds, warmup, device=device, rewarm=rewarm)
            peak_t = times.pop('__peak__')
            for name, t in times.items():
                mech = MECHANISMS[name]
                sec = median(t)
                fl, by = mech.flops(batch, N, C, h), mech.bytes(batch, N, C, h) * scale_bytes
                row = dict(mechanism=name, family=mech.family, label=mech.label, C=C, h=h, N=N, H=H, W=W,
                           batch=batch, ms=round(sec * 1e3, 4), spread=round(spread(t), 3), flops=fl,
                           gflops=round(fl / sec / 1e9, 3), bytes=by, intensity=round(fl / by, 2),
                           frac_of_peak=round(median([fl / tm / (peak_flops / tp) for tm, tp in zip(t, peak_t)]), 4),
                           peak_mem_mb=round(mems[name] / 2**20, 3) if mems.get(name) is not None else None,
                           times_s=[round(v, 7) for v in t])
                for fast, base in TARGET_PAIRS:
                    if name == fast and base in times:
                        row['vs'] = base
                        row['speedup'] = round(paired_ratio(t, times[base]), 3)
                rows.append(row)
        peak = dict(op=peak_op, shape=list(peak_shape), dtype=dtype,
                    gflops=round(peak_flops / median(peak_t) / 1e9, 2))
        settings = dict(mechanisms=names, tokens=tokens, channels=channels, heads=heads, batch=batch, rounds=rounds,
                        warmup=warmup, rewarm=rewarm, threads=threads, device=device, dtype=dtype)
        return dict(environment=env, settings=settings, peak=peak, rows=rows, skipped=skipped)
    finally:
        torch.set_num_threads(prev)


def _bind(mod: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return mod(x)

    return call


ROW_FIELDS = ('mechanism', 'family', 'C', 'h', 'N', 'H', 'W', 'batch', 'ms', 'spread', 'flops', 'gflops', 'bytes',
              'intensity', 'frac_of_peak', 'peak_mem_mb', 'vs', 'speedup', 'label')


def plot_sweep(result: dict, path: str) -> None:
    """Latency and peak memory against N (log-log), one line per mechanism, one column pair per (C, h)."""
    from .models import require_matplotlib

    require_matplotlib()
    import matplotlib.pyplot as plt

    rows = result['rows']
    if not rows:
        raise UserError("nothing to plot: no mechanism ran")
    combos = sorted({(r['C'], r['h']) for r in rows})
    fig, axes = plt.subplots(len(combos), 2, figsize=(12, 4.2 * len(combos)), dpi=110, squeeze=False)
    names = list(dict.fromkeys(r['mechanism'] for r in rows))
    ours = [n for n in names if 'reuse' in n]
    warm = ['#d62728', '#ff7f0e', '#8c564b', '#e377c2', '#bcbd22', '#9467bd']  # Reuse variants stand out
    cool = ['#1f77b4', '#17becf', '#2ca02c', '#7f7f7f', '#aec7e8', '#98df8a', '#9edae5', '#393b79', '#637939',
            '#5254a3', '#6b6ecf']
    colors = {n: (warm[ours.index(n) % len(warm)] if n in ours else cool[[m for m in names if m not in ours].index(n)
                                                                        % len(cool)]) for n in names}
    for (C, h), (ax_t, ax_m) in zip(combos, axes):
        for name in names:
            rs = sorted((r for r in rows if r['mechanism'] == name and (r['C'], r['h']) == (C, h)),
                        key=lambda r: r['N'])
            if not rs:
                continue
            style = dict(color=colors[name], marker='o', ms=3, lw=2.0 if name in ours else 1.0,
                         ls='-' if rs[0]['family'] == 'module' else '--', label=name)
            ax_t.plot([r['N'] for r in rs], [r['ms'] for r in rs], **style)
            if all(r['peak_mem_mb'] is not None for r in rs):
                ax_m.plot([r['N'] for r in rs], [max(r['peak_mem_mb'], 1e-3) for r in rs], **style)
        for ax, ylabel in ((ax_t, 'latency (ms, median)'), (ax_m, 'peak memory of one call (MB)')):
            ax.set_xscale('log')
            ax.set_yscale('log')
            ax.set_xlabel('tokens N')
            ax.set_ylabel(ylabel)
            ax.set_title(f"C={C}, h={h}, batch {rows[0]['batch']}", fontsize=9)
            ax.grid(True, which='both', alpha=0.3)
        ax_t.legend(fontsize=6, ncol=2)
    e = result['environment']
    fig.suptitle(f"{e['gpu'] or e['cpu']}, {result['settings']['threads']} thread(s), torch {e['torch']}; "
                 "solid: whole layers, dashed: attention cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
