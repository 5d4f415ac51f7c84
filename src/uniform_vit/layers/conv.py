"""Conv/BN building blocks with a train form and a deploy form.

Every block here exposes ``fuse()``, which returns a *new* module with all BatchNorms folded away (the train
form is left untouched). ``timm.utils.model.reparameterize_model`` calls ``fuse()`` on every child that has one,
so a whole network turns into its deploy form in one call; see :func:`uniform_vit.layers.fuse.reparameterize`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from .fuse import fuse_children


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
    takes microseconds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        H, W = x.shape[-2:]
        if kh > 2 * H - 1 or kw > 2 * W - 1:
            ch, cw = min(kh, 2 * H - 1), min(kw, 2 * W - 1)
            oh, ow = (kh - ch) // 2, (kw - cw) // 2
            w = self.weight[:, :, oh:oh + ch, ow:ow + cw]
            return F.conv2d(x, w, self.bias, 1, (ch // 2, cw // 2), self.dilation, self.groups)
        return super().forward(x)


def make_conv(in_chs: int, out_chs: int, kernel_size: int | tuple, stride: int | tuple = 1, padding: int | tuple = 0,
              groups: int = 1, bias: bool = True, **kwargs) -> nn.Conv2d:
    """nn.Conv2d, or :class:`SameConv2d` for stride-1 odd kernels with 'same' padding (identical outputs)."""
    k = nn.modules.utils._pair(kernel_size)
    same = nn.modules.utils._pair(stride) == (1, 1) and nn.modules.utils._pair(padding) == (k[0] // 2, k[1] // 2) \
        and k[0] % 2 == 1 and k[1] % 2 == 1 and max(k) > 1
    cls = SameConv2d if same else nn.Conv2d
    return cls(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias, **kwargs)


class ConvNorm(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d; ``bn_weight_init=0`` makes a residual branch start as identity."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int | None = None,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.c = make_conv(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
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
        m = nn.Linear(lin.in_features, lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype)
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
        fused = Residual(m.fuse() if hasattr(m, 'fuse') else fuse_children(m))
        return fused
