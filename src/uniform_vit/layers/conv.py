"""Conv/BN building blocks with a train form and a deploy form.

Every block here exposes ``fuse()``, which returns a *new* module with all BatchNorms folded away (the train
form is left untouched). ``timm.utils.model.reparameterize_model`` calls ``fuse()`` on every child that has one,
so a whole network turns into its deploy form in one call; see :func:`uniform_vit.layers.fuse.reparameterize`.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from . import cpu_kernels
from .fuse import fuse_children
from .gemm import HAS_ONEDNN_LINEAR, linear_trainable  # the import also registers oneDNN linear's FLOP formula


def _fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm):
    """Fold an eval-mode BatchNorm that follows a linear op with ``weight`` (out first) and ``bias``."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std if bn.affine else 1.0 / std
    shift = bn.bias - bn.running_mean * scale if bn.affine else -bn.running_mean * scale
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias * scale + shift
    return w, b


class SameConv2d(nn.Conv2d):
    """Stride-1 conv with 'same' padding that skips the kernel taps which can only ever see zero padding.

    On a map smaller than the kernel (a 7x7 depthwise conv over UniForm's 2x2 or 1x1 late-stage maps at low
    resolution) only the central (2H-1) x (2W-1) taps touch the input, so cropping the kernel to them is exact. It
    also matters for speed: oneDNN took ~20 ms for one 7x7 depthwise conv over a 1x1 map at batch 128, a 1x1 tap
    takes microseconds. Training a depthwise conv on a CPU map still smaller than its (cropped) kernel runs
    :class:`_SmallMapDepthwise`, whose weight gradient is not oneDNN's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        H, W = x.shape[-2:]
        w, padding = self.weight, self.padding
        if kh > 2 * H - 1 or kw > 2 * W - 1:
            ch, cw = min(kh, 2 * H - 1), min(kw, 2 * W - 1)
            oh, ow = (kh - ch) // 2, (kw - cw) // 2
            w, padding = w[:, :, oh:oh + ch, ow:ow + cw], (ch // 2, cw // 2)
        if _small_map_training(x, w, self.groups, self.dilation, self.padding_mode):
            return _SmallMapDepthwise.apply(x, w, self.bias, padding)
        if w is self.weight:
            return super().forward(x)
        return F.conv2d(x, w, self.bias, 1, padding, self.dilation, self.groups)


SMALL_MAP_GRAD = True  # A/B switch (benchmarks/scripts): _SmallMapDepthwise's weight gradient on small maps


def _small_map_training(x: torch.Tensor, w: torch.Tensor, groups: int, dilation: tuple, padding_mode: str) -> bool:
    """A depthwise conv's training call on a CPU map smaller than its kernel: where oneDNN's weight gradient is slow."""
    return (SMALL_MAP_GRAD and torch.is_grad_enabled() and w.requires_grad and not torch.jit.is_tracing()
            and x.device.type == 'cpu' and x.dim() == 4 and groups == x.shape[1] == w.shape[0] > 1
            and dilation == (1, 1) and padding_mode == 'zeros' and (x.shape[2] < w.shape[2] or x.shape[3] < w.shape[3]))


class _SmallMapDepthwise(torch.autograd.Function):
    """Stride-1 depthwise conv with 'same' padding whose weight gradient is not oneDNN's.

    On maps smaller than the kernel (UniForm's 3x3 convs over 2x2 maps and its 5x5 / 7x7 value convs over 4x4 maps
    when small images are upsampled to 96-112 px) oneDNN's weight gradient ran 10-60x slower than its forward on an
    AVX2 Zen 3: 10 ms for 192 channels of 2x2 at batch 128 (benchmarks/RESULTS.md, section 3, session 19). Here it
    is this library's C++ op (:func:`~uniform_vit.layers.cpu_kernels.depthwise_grad_weight`, 0.1 ms there) or,
    without the kernels and inside ``torch.compile``, a sum per tap, sum(g * x shifted by the tap), which inductor
    fuses (0.6 ms eager). The input gradient and the forward stay ATen's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, padding: tuple) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.padding = padding
        return F.conv2d(x, w, bias, 1, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        (ph, pw), (kh, kw) = ctx.padding, w.shape[2:]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], list(ctx.padding), [1, 1], False, [0, 0],
                                                     x.shape[1], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            op = cpu_kernels.depthwise_grad_weight() if x.dtype == g.dtype == torch.float32 else None
            if op is not None:
                gw = op(x, g, kh, kw, ph, pw).to(w.dtype)
            else:
                H, W = x.shape[2:]
                xp = F.pad(x, (pw, kw - 1 - pw, ph, kh - 1 - ph))
                gw = torch.stack([(g * xp[:, :, i:i + H, j:j + W]).sum((0, 2, 3))
                                  for i in range(kh) for j in range(kw)], 1).view_as(w)
        if ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None


def _untraced(fn: Callable[[], object]) -> object:
    """``fn()`` with ``torch.jit.trace``'s recorder paused (torch's private tracing-state switch, as torch.onnx uses
    it); plain ``fn()`` outside a trace or where torch lacks the switch."""
    get, set_ = getattr(torch._C, '_get_tracing_state', None), getattr(torch._C, '_set_tracing_state', None)
    state = get() if get is not None and set_ is not None else None
    if state is None:
        return fn()
    set_(None)
    try:
        return fn()
    finally:
        set_(state)


Derived = tuple[torch.Tensor | None, ...]


def kernel_layout(owner: nn.Module, weights: tuple[torch.Tensor, ...], make: Callable[[], Derived],
                  tag: object = None) -> Derived:
    """``make()``'s tensors derived from ``weights`` for a C++ op (copies in the layout it reads: transposed, (3, 3,
    Cin, Cout); or facts such as a depthwise kernel's tap radius), cached on ``owner`` and rebuilt when a weight's
    storage or version changes (``load_state_dict``, ``.to()``, in-place edits) or ``tag`` does, and after every
    ``train()`` / ``eval()`` switch of a :class:`KernelLayoutOwner` around it: PyTorch's fused optimisers
    (``AdamW(fused=True)``) and ``.data`` edits change weights without bumping their version, so an eval-mode
    forward after such a training step would otherwise read the old weights. Copies are a second copy of those
    weights in memory; the cache is not part of the state dict."""
    key = (tag, *((w.data_ptr(), w._version) for w in weights))  # tag: how the layout was made (packed or not)
    cached = owner.__dict__.get('_kernel_layout')
    if cached is None or cached[0] != key:
        def build() -> tuple:
            with torch.no_grad():
                return key, make()

        # hidden from torch.jit.trace, which would otherwise record the copies in the first trace only (its check
        # re-traces and finds the cache): a trace holds the cached copies as constants either way
        cached = _untraced(build)
        owner.__dict__['_kernel_layout'] = cached
    return cached[1]


def drop_kernel_layouts(module: nn.Module) -> None:
    """Forget every cached :func:`kernel_layout` in ``module`` and below (rebuilt at their next use)."""
    for m in module.modules():
        m.__dict__.pop('_kernel_layout', None)


class KernelLayoutOwner:
    """Mixin for modules that own (or hold children that own) :func:`kernel_layout` caches: ``train(mode)`` (and so
    ``eval()``) drops them. A training loop switches modes around its evaluations, so weights that a fused optimiser
    changed without a version bump are never read stale there."""

    def train(self, mode: bool = True):
        drop_kernel_layouts(self)
        return super().train(mode)


PACK_WEIGHTS = True  # A/B switch (benchmarks/scripts): the products' weights in cpu_kernels.pack_panels' order


def product_weight(owner: nn.Module) -> tuple[torch.Tensor, bool]:
    """``owner.weight`` (a 1x1 conv's or a linear layer's) as the C++ products read it, cached on ``owner``, and
    whether it is packed."""
    w, packed = owner.weight, PACK_WEIGHTS
    wt, = kernel_layout(owner, (w,), lambda: (kernel_matrix(w, packed),), tag=packed)
    return wt, packed


def kernel_matrix(w: torch.Tensor, packed: bool) -> torch.Tensor:
    """A 1x1 conv's (O, C, 1, 1) weight as the (C, O) matrix the C++ products read, in ``pack_panels``' order when
    ``packed`` (column panels stored one after another: the products ran 1.1-1.2x faster on it, most for wide
    outputs, whose rows are far apart in a plain matrix)."""
    wt = w.reshape(w.shape[0], -1).t().contiguous()
    return cpu_kernels.pack_panels(wt) if packed else wt


ONEDNN_POINTWISE = True  # A/B switch (benchmarks/scripts) and what :func:`aten_only` turns off
_ATEN_ONLY = False  # inside aten_only()


@contextlib.contextmanager
def aten_only() -> Iterator[None]:
    """Within the block, :class:`PointwiseConv2d` runs as a plain ``conv2d``, and :class:`DepthwiseConv2d` and the
    deploy stem keep ATen's convs instead of this library's C++ ops: for graphs recorded to run on other machines (a
    TorchScript file for LibTorch or PyTorch Mobile, whose builds lack this library's ops and may lack oneDNN's)."""
    global ONEDNN_POINTWISE, _ATEN_ONLY
    old = ONEDNN_POINTWISE, _ATEN_ONLY
    ONEDNN_POINTWISE, _ATEN_ONLY = False, True
    try:
        yield
    finally:
        ONEDNN_POINTWISE, _ATEN_ONLY = old


def in_aten_only() -> bool:
    """True inside :func:`aten_only` (for callers of this library's C++ ops outside this module)."""
    return _ATEN_ONLY


def _pointwise_onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """1x1 conv of a channels-last (B, C, H, W) ``x`` with an (O, C) ``w`` as ONE oneDNN matmul over its B*H*W tokens
    (channels-last memory is a (B*H*W, C) matrix); channels-last output."""
    B, C, H, W = x.shape
    y = torch.ops.mkldnn._linear_pointwise(x.permute(0, 2, 3, 1).reshape(B * H * W, C), w, b, 'none', [], '')
    return y.view(B, H, W, w.shape[0]).permute(0, 3, 1, 2)


@functools.cache
def _pointwise_traceable() -> Callable:
    """:func:`_pointwise_onednn` compiled by TorchScript (once): ``torch.jit.trace`` cannot record the op's
    ``Scalar?[]`` argument from Python, but records a call to a scripted function that builds it, so a traced
    model (the bench's paper method) keeps the oneDNN matmul."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script's deprecation notice
        return torch.jit.script(_pointwise_onednn)


def _on_token_rows(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` of a channels-last (B, C, H, W) map's (B*H*W, C) token rows (a view of its memory), its (B*H*W, O)
    result viewed back as a channels-last (B, O, H, W) map. (:func:`_pointwise_onednn` spells it out: TorchScript.)"""
    B, C, H, W = x.shape
    y = fn(x.permute(0, 2, 3, 1).reshape(B * H * W, C))
    return y.view(B, H, W, y.shape[1]).permute(0, 3, 1, 2)


POINTWISE_KERNEL = True  # A/B switch (benchmarks/scripts): PointwiseConv2d's C++ op where it is built
TRAIN_MATMUL = True  # A/B switch: PointwiseConv2d trains as a matrix product on channels-last CPU maps


class PointwiseConv2d(KernelLayoutOwner, nn.Conv2d):
    """1x1 conv (stride 1, no padding, one group) that runs as one matrix product on channels-last CPU maps.

    On channels-last float32 CPU maps without gradients it is this library's C++ op (``pointwise_conv``,
    :mod:`uniform_vit.layers.cpu_kernels`) over the map's token rows; without the kernels, oneDNN's matmul
    (``torch.ops.mkldnn._linear_pointwise``). PyTorch's ``conv2d`` reaches oneDNN too, but each call pays for a
    convolution primitive and its weight reorder: oneDNN's matmul ran the same product in up to 20 % less time and the
    fused, traced uniform_t 1.09-1.10x faster (one thread, this project's Zen 5); on an AVX2 Zen 3 the C++ op ran 15
    of UniForm's 18 1x1 shapes 1.02-1.39x as fast as oneDNN's matmul (the widest 0.88-0.95x) and the fused, traced
    models 1-2 % faster (benchmarks/RESULTS.md, section 1, sessions 10 and 18). Training on channels-last CPU maps
    (compiled or not) runs ``F.linear`` over the token rows, whose backward is two BLAS products
    (:meth:`_train_matmul`). Anything else (NCHW maps, GPUs, inference under ``torch.compile``/``torch.export``/ONNX
    export, :func:`aten_only`) runs ``conv2d``, so exported graphs hold standard ops. Same weights, state-dict keys
    and outputs (up to float rounding) either way; the op reads a cached transposed, packed copy of the weight
    (:func:`kernel_matrix`)."""

    def __init__(self, in_chs: int, out_chs: int, bias: bool = True, **kwargs):
        super().__init__(in_chs, out_chs, 1, bias=bias, **kwargs)

    def _onednn_ok(self, x: torch.Tensor) -> bool:
        return (ONEDNN_POINTWISE and HAS_ONEDNN_LINEAR and x.device.type == 'cpu' and x.dim() == 4
                and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.is_contiguous(memory_format=torch.channels_last)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export()
                and not torch.is_autocast_enabled('cpu'))

    def _kernel_op(self, x: torch.Tensor):
        if not (POINTWISE_KERNEL and deploy_op_may_run(x, self.weight)):
            return None
        return cpu_kernels.pointwise_conv()  # None inside torch.compile / ONNX export, or without the kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``conv(x)``, plus ``residual`` (shaped like the output) when given: the C++ op adds it as it stores each
        row, instead of a separate pass over the map."""
        op = self._kernel_op(x)
        if op is not None and (residual is None or deploy_op_may_run(residual)):
            wt, packed = product_weight(self)
            # the channels-last map in, one out: no views to trace
            return op(x, wt, self.bias, False, packed, residual)
        y = self._forward(x)
        return y if residual is None else y + residual

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn_ok(x):
            fn = _pointwise_traceable() if torch.jit.is_tracing() else _pointwise_onednn
            return fn(x, self.weight.view(self.out_channels, self.in_channels), self.bias)
        if self._train_matmul(x):
            return _on_token_rows(x, lambda t: linear_trainable(t, self.weight.view(self.out_channels, -1), self.bias))
        return super().forward(x)

    def _train_matmul(self, x: torch.Tensor) -> bool:
        """Training on a channels-last CPU map: one matrix product over the tokens (``F.linear``), whose backward is
        two more (BLAS), instead of oneDNN's convolution and its backward: 1.2-2.3x faster per conv on UniForm's
        small late-stage maps, uniform_t's training step 1.09-1.14x (AVX2 Zen 3; benchmarks/RESULTS.md, section 3,
        session 19)."""
        return (TRAIN_MATMUL and x.device.type == 'cpu' and x.dim() == 4 and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad)
                and x.is_contiguous(memory_format=torch.channels_last) and not torch.jit.is_tracing())


DEPTHWISE_KERNEL = True  # A/B switch (benchmarks/scripts): DepthwiseConv2d's C++ op where it is built


def deploy_op_may_run(x: torch.Tensor, *weights: torch.Tensor, channels_last: bool = True, dim: int = 4) -> bool:
    """What the deploy form's C++ ops (:mod:`~uniform_vit.layers.cpu_kernels`) need from a call: a float32 CPU map
    (in channels-last memory unless ``channels_last=False``: the stem's op reads the NCHW image; ``dim=2``: (M, C)
    rows, as the classifier head's), float32 weights, no gradient, and neither :func:`aten_only` nor CPU autocast."""
    return (x.device.type == 'cpu' and x.dim() == dim and x.dtype == torch.float32
            and (not channels_last or dim != 4 or x.is_contiguous(memory_format=torch.channels_last))
            and all(w.dtype == torch.float32 for w in weights)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
            and not _ATEN_ONLY and not torch.is_autocast_enabled('cpu'))


def channels_innermost(x: torch.Tensor) -> bool:
    """A (B, C, H, W) map whose channels lie next to each other: channels-last memory, or a channel slice of it (the
    queries cut from one conv's output), which the depthwise ops read in place (their check:
    ``csrc/channels_innermost.h``)."""
    return (x.dim() == 4 and x.stride(1) == 1 and x.stride(3) >= x.shape[1]
            and x.stride(2) >= x.shape[3] * x.stride(3) and x.stride(0) >= x.shape[2] * x.stride(2))


class DepthwiseConv2d(KernelLayoutOwner, SameConv2d):
    """Depthwise conv (one group per channel) with an odd square kernel, 'same' padding k // 2 and stride 1 or 2.

    On channels-last float32 CPU maps (or channel slices of them) without gradients it runs as this library's C++ op
    (``depthwise_conv``, :mod:`uniform_vit.layers.cpu_kernels`): oneDNN ran UniForm's depthwise convs, a few MFLOP
    over maps of a few hundred KB each, at 3-8 GB/s on an AVX2 CPU; the op sums only the taps inside the map, 8
    channels per vector, 1.3-2.1x faster per conv, the fused, traced uniform_t about 1.05x (benchmarks/RESULTS.md,
    section 1, session 17). On AVX-512 builds, Reuse Attention's 7x7 windows go through a zero-bordered copy in
    512-bit register blocks instead, 1.4-2.6x the per-pixel code on uniform_t's window convs (session 31).
    Elsewhere (no kernel, NCHW maps, training, ``torch.compile``/``torch.export``/ONNX, :func:`aten_only`) it is
    :class:`SameConv2d` at stride 1 and a plain conv at stride 2. Same weights, keys and outputs (to rounding)."""

    def _kernel_op(self, x: torch.Tensor):
        if not (DEPTHWISE_KERNEL and self.dilation == (1, 1) and self.padding_mode == 'zeros'
                and deploy_op_may_run(x, self.weight, channels_last=False) and channels_innermost(x)):
            return None
        return cpu_kernels.depthwise_conv()  # None inside torch.compile / ONNX export, or without the kernels

    def _kernel_args(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the op reads besides the map, kept until the weight changes: the weight as a (k*k, C) taps-major
        matrix (made per call inside the op otherwise, a copy and a transpose that cost a traced uniform_t ~1 %), and
        per channel how far from the kernel's centre its nonzero taps reach (the op skips the rest), or None when
        every channel uses the whole kernel. Zero-padded kernels are what the deploy form of Reuse Attention makes of
        its heads' 1x1 / 3x3 / 5x5 / 7x7 value convs; skipping their zero taps gives the same sums."""
        w = self.weight

        def make() -> tuple:
            k = w.shape[-1]
            d = (torch.arange(k, device=w.device) - k // 2).abs()
            dist = torch.maximum(d[:, None], d[None, :])  # (k, k): each tap's ring around the centre
            r = torch.where(w[:, 0] != 0, dist, torch.zeros_like(dist)).flatten(1).amax(1)
            return w.reshape(w.shape[0], k * k).t().contiguous(), (r if bool((r < k // 2).any()) else None)

        return kernel_layout(self, (w,), make)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = self._kernel_op(x)
        if op is not None:
            wt, radius = self._kernel_args()
            return op(x, wt, self.bias, self.stride[0], radius)
        if self.stride == (1, 1):
            return super().forward(x)
        return nn.Conv2d.forward(self, x)


def make_conv(in_chs: int, out_chs: int, kernel_size: int | tuple, stride: int | tuple = 1, padding: int | tuple = 0,
              groups: int = 1, bias: bool = True, **kwargs) -> nn.Conv2d:
    """nn.Conv2d, or :class:`SameConv2d` for stride-1 odd kernels with 'same' padding, :class:`DepthwiseConv2d` for
    depthwise ones (stride 1 or 2), or :class:`PointwiseConv2d` for plain 1x1 convs (identical outputs)."""
    k = nn.modules.utils._pair(kernel_size)
    s = nn.modules.utils._pair(stride)
    unit = s == (1, 1)
    if k == (1, 1) and unit and nn.modules.utils._pair(padding) == (0, 0) and groups == 1:
        return PointwiseConv2d(in_chs, out_chs, bias=bias, **kwargs)
    odd_same = nn.modules.utils._pair(padding) == (k[0] // 2, k[1] // 2) and k[0] % 2 == 1 and k[1] % 2 == 1 \
        and max(k) > 1
    if odd_same and k[0] == k[1] and s in ((1, 1), (2, 2)) and groups == in_chs == out_chs > 1:
        return DepthwiseConv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias, **kwargs)
    cls = SameConv2d if odd_same and unit else nn.Conv2d
    return cls(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias, **kwargs)


# Which training BatchNorms take the C++ ops. On AVX2 those whose channel count is not a multiple of BN_ATEN_MULTIPLE:
# ATen's channels-last BatchNorm ran 1.2-8x slower there (8, 12, 20, 24, 40, 72, 120 channels) and as fast or faster
# at 16, 32, 48, 64, 96, 128 (AVX2 Zen 3, benchmarks/RESULTS.md, section 3, session 19, when the ops still carried
# 0.25 ms a call of Python overhead). On AVX-512 every channel count (BN_ALL_CHANNELS): with the overhead gone,
# uniform_t's whole step ran 1.03-1.07x faster than with ATen at the multiples of 16 (Intel Xeon with AMX, session 37).
BN_ATEN_MULTIPLE = 16
BN_ALL_CHANNELS = torch.backends.cpu.get_cpu_capability() == 'AVX512'
BN_KERNEL = True  # A/B switch (benchmarks/scripts)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers, state-dict keys and results) whose training-mode forward on a
    channels-last float32 CPU map runs this library's C++ ops (:func:`~uniform_vit.layers.cpu_kernels.
    batch_norm_train`): on AVX-512 CPUs always (:data:`BN_ALL_CHANNELS`), on AVX2 when its channel count is not a
    multiple of :data:`BN_ATEN_MULTIPLE`. ATen's channels-last BatchNorm ran 4-8x slower than the ops at 8-24
    channels, and uniform_t's first stem layer has 8: 26 ms of a 310 ms step at 112 px (benchmarks/RESULTS.md,
    section 3, session 19). Everywhere else (evaluation, channel counts ATen handles well on AVX2, NCHW, GPUs,
    ``torch.compile``, traces, no kernels) it is ``nn.BatchNorm2d``. One op call does the forward and moves the
    running statistics, by ``nn.BatchNorm2d``'s rule (momentum, or a cumulative average with ``momentum=None``;
    unbiased variance); its gradient is the op's own C++ autograd."""

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        return (BN_KERNEL and self.training and self.affine and self.track_running_stats
                and not torch.jit.is_tracing() and x.device.type == 'cpu' and x.dim() == 4
                and x.dtype == torch.float32 and (BN_ALL_CHANNELS or x.shape[1] % BN_ATEN_MULTIPLE != 0)
                and x.numel() > x.shape[1] and x.is_contiguous(memory_format=torch.channels_last)
                and self.running_mean.dtype == torch.float32
                and cpu_kernels.batch_norm_train() is not None)  # None inside torch.compile / ONNX, no kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kernel_ok(x):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # one op: normalise, move the running statistics in place; its autograd (the backward op) is in C++ too
        return torch.ops.uniform_vit.batch_norm_train(x, self.weight, self.bias, self.running_mean, self.running_var,
                                                      f, self.eps)[0]


class ConvNorm(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d; ``bn_weight_init=0`` makes a residual branch start as identity."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int | None = None,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.c = make_conv(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c = self.c
        w, b = _fold_bn(c.weight, c.bias, self.bn)
        m = make_conv(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups,
                      device=w.device, dtype=w.dtype)
        m.weight.copy_(w)
        m.bias.copy_(b)
        return m


class KernelLinear(KernelLayoutOwner, nn.Linear):
    """nn.Linear whose inference on float32 CPU rows (no gradient, outside :func:`aten_only`) runs as this library's
    C++ product (``pointwise_conv`` on its (M, in) rows; a cached transposed, packed weight): the fused classifier
    head, where MKL's ``addmm`` ran uniform_t's (16, 192) x (192, 1000) at ~50 GFLOP/s on a Zen 5 (session 31).
    Same weights, keys and outputs (to rounding) as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # from 8 rows: for one (batch-1 latency) the product is a single chain of FMAs per column block and lost
        # to addmm (18 vs 14 us); at 16 rows it ran 1.7-1.9x addmm
        if POINTWISE_KERNEL and deploy_op_may_run(x, self.weight, dim=2) and x.shape[0] >= 8:
            op = cpu_kernels.pointwise_conv()  # None inside torch.compile / ONNX export, or without the kernels
            if op is not None:
                wt, packed = product_weight(self)
                return op(x, wt, self.bias, False, packed)
        return super().forward(x)


class BNLinear(nn.Sequential):
    """BatchNorm1d -> Dropout -> Linear: the classifier head. Fuses into one Linear."""

    def __init__(self, in_features: int, out_features: int, drop: float = 0.0, std: float = 0.02):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features)
        nn.init.trunc_normal_(self.linear.weight, std=std)
        nn.init.zeros_(self.linear.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn, lin = self.bn, self.linear
        std = (bn.running_var + bn.eps).sqrt()
        scale = bn.weight / std
        shift = bn.bias - bn.running_mean * scale
        # linear(bn(x)) = W (x * scale + shift) + b
        m = KernelLinear(lin.in_features, lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype)
        m.weight.copy_(lin.weight * scale[None, :])
        m.bias.copy_(lin.bias + lin.weight @ shift)
        return m


class FFN(nn.Module):
    """Pointwise FFN: Conv1x1+BN (E -> hidden) -> ReLU -> Conv1x1+BN (hidden -> E, BN weight 0)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = ConvNorm(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))

    def fuse(self) -> nn.Module:
        fused = fuse_children(self)
        fused.act = nn.ReLU(inplace=True)  # deploy: pw1's output is fresh and read once, so skip an allocation
        return fused


class Residual(nn.Module):
    """x + DropPath(m(x)). A residual around a depthwise ConvNorm fuses into a single conv (identity folded in)."""

    def __init__(self, m: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.m = m
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.drop_path, nn.Identity) and getattr(self.m, 'adds_residual', False):
            return self.m(x, x)  # the module adds x in its last op's store (deploy-form Reuse Attention)
        return x + self.drop_path(self.m(x))

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        m = self.m
        if isinstance(m, ConvNorm) and m.c.groups == m.c.in_channels == m.c.out_channels and m.c.stride == (1, 1):
            conv = m.fuse()
            kh, kw = conv.kernel_size
            # a depthwise kernel with 1 added at its centre computes conv(x) + x
            conv.weight[:, 0, kh // 2, kw // 2] += 1.0
            return conv
        if isinstance(m, FFN):
            return ResidualFFN(m.fuse())
        fused = Residual(m.fuse() if hasattr(m, 'fuse') else fuse_children(m))
        return fused


FFN_KERNEL = True  # A/B switch (benchmarks/scripts): ResidualFFN's C++ op where it is built


class ResidualFFN(KernelLayoutOwner, Residual):
    """Deploy form of ``Residual(FFN)``: x + pw2(relu(pw1(x))) with both 1x1 convs fused with their BatchNorms.

    On channels-last float32 CPU maps without gradients it runs as this library's C++ op (``residual_ffn``,
    :mod:`uniform_vit.layers.cpu_kernels`) over the map's token rows: the hidden activations of a tile of tokens stay
    in cache instead of going out to memory as a (B*H*W, 2C) matrix and back, and the ReLU and the residual add ride
    in the products' epilogues. 1.01-1.14x oneDNN's two matmuls at UniForm's shapes, the fused, traced models
    1.01-1.035x (uniform_m the most; an AVX2 Zen 3, benchmarks/RESULTS.md, section 1, session 17). Elsewhere (no
    kernel, NCHW maps, training, ``torch.compile``/``torch.export``/ONNX, :func:`aten_only`) it is :class:`Residual`.
    Same keys: the transposed, packed weights the op reads (:func:`kernel_matrix`) are a cache (a second copy of the
    FFN's weights in memory), rebuilt when the weights change (``load_state_dict``, ``.to()``)."""

    def _weights(self, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w1, w2 = self.m.pw1.weight, self.m.pw2.weight
        return kernel_layout(self, (w1, w2), lambda: (kernel_matrix(w1, packed), kernel_matrix(w2, packed)),
                             tag=packed)

    def _kernel_op(self, x: torch.Tensor):
        pw1, pw2 = self.m.pw1, self.m.pw2
        if not (FFN_KERNEL and isinstance(self.drop_path, nn.Identity) and isinstance(self.m.act, nn.ReLU)
                and isinstance(pw1, PointwiseConv2d) and isinstance(pw2, PointwiseConv2d)
                and pw1.bias is not None and pw2.bias is not None and deploy_op_may_run(x, pw1.weight, pw2.weight)):
            return None
        return cpu_kernels.residual_ffn()  # None inside torch.compile / ONNX export, or without the kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = self._kernel_op(x)
        if op is None:
            return super().forward(x)
        packed = PACK_WEIGHTS
        w1t, w2t = self._weights(packed)
        return op(x, w1t, self.m.pw1.bias, w2t, self.m.pw2.bias, packed)  # map in, map out (channels-last)

    def fuse(self) -> nn.Module:
        return self  # already the deploy form
