"""``create_dataset``: one call for every supported source, with timm's transforms attached."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from .datasets import FolderDataset, SyntheticDataset, cifar, fashion_mnist

DATASETS = ('fashion-mnist', 'cifar10', 'cifar100', 'synthetic', 'folder')

# Per-dataset pixel statistics (RGB; grayscale sets have one value). Folders use ImageNet's.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    'fashion-mnist': ((0.2860,), (0.3530,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'synthetic': ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    'folder': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def dataset_stats(name: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) with ``in_chans`` entries: grayscale stats are repeated for RGB models and RGB ones averaged."""
    mean, std = _STATS.get(name, _STATS['folder'])
    if len(mean) != in_chans:
        m, s = sum(mean) / len(mean), sum(std) / len(std)
        mean, std = (m,) * in_chans, (s,) * in_chans
    return tuple(mean), tuple(std)


def build_transform(img_size: int, in_chans: int, train: bool, mean: tuple[float, ...], std: tuple[float, ...],
                    aug: dict | None = None, interpolation: str = 'bicubic') -> Callable:
    """timm's ``create_transform``. ``aug`` (train only) passes through: scale, ratio, hflip, auto_augment, re_prob,
    color_jitter; plus ``translate``, a fraction of the image size: right after timm's crop, a random shift of up to
    that many pixels each way, zero-filled (torchvision's padded ``RandomCrop``: the classic CIFAR/Fashion-MNIST
    augmentation). Evaluation resizes the whole image (crop_pct 1.0): small datasets are already tightly framed."""
    from timm.data import create_transform

    size = (in_chans, img_size, img_size)
    if not train:
        return create_transform(size, is_training=False, crop_pct=1.0, interpolation=interpolation, mean=mean, std=std)
    aug = dict(aug or {})
    translate = aug.pop('translate', 0.0) or 0.0
    jitter = aug.get('color_jitter', 0.4)  # timm's default when the caller does not say
    if in_chans == 1 or not jitter or (isinstance(jitter, (list, tuple)) and not any(jitter)):
        # None, not 0: timm turns 0 into ColorJitter(0, 0, 0), which changes nothing yet costs ~50 us an image (a
        # fifth of the 28 px Fashion-MNIST pipeline). Saturation/hue are undefined on one channel anyway.
        aug['color_jitter'] = None
    tf = create_transform(size, is_training=True, interpolation=interpolation, mean=mean, std=std, **aug)
    pad = round(translate * img_size)
    if pad > 0:
        from torchvision import transforms

        tf.transforms.insert(1, transforms.RandomCrop(img_size, padding=pad, fill=0))  # after the resized crop
    return tf


def create_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None, img_size: int = 224,
                   in_chans: int = 3, train: bool = False, *, aug: dict | None = None,
                   mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                   interpolation: str = 'bicubic', transform: Callable | None = None, strict: bool = False,
                   download: bool = True, num_samples: int | None = None, num_classes: int = 10, seed: int = 0,
                   classes: list[str] | None = None) -> torch.utils.data.Dataset:
    """A dataset of ``(C x H x W float tensor, normalised; int label)`` with a ``classes`` list.

    ``name``: 'fashion-mnist' | 'cifar10' | 'cifar100' | 'synthetic' | 'folder' (``data_dir/<split>/<class>/*``).
    ``split``: 'train', or 'val'/'test' (the built-in sets have one held-out split, used for both).
    ``train=True`` attaches the training augmentation (``aug``: kwargs for timm's create_transform); otherwise a plain
    resize. ``transform`` replaces the built transform. ``classes`` (folder only) pins the label order to the
    training split's so a validation folder missing a class still maps labels right.
    """
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, DATASETS, n=1)
        raise UserError(f"unknown dataset {name!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                        f"; choose one of {', '.join(DATASETS)}"))
    if split not in ('train', 'val', 'test'):
        raise UserError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if img_size < 32:
        raise UserError(f"image size must be at least 32 px for UniForm's 64x downsampling, got {img_size}")
    if in_chans not in (1, 3):
        raise UserError(f"in_chans must be 1 or 3, got {in_chans}")
    if mean is None or std is None:
        dm, ds = dataset_stats(name, in_chans)
        mean, std = mean or dm, std or ds
    tf = transform or build_transform(img_size, in_chans, train, tuple(mean), tuple(std), aug, interpolation)
    if name == 'fashion-mnist':
        ds = fashion_mnist(split, data_dir, in_chans, tf, download)
    elif name in ('cifar10', 'cifar100'):
        ds = cifar(name, split, data_dir, in_chans, tf)
    elif name == 'synthetic':
        n = num_samples or (256 if split == 'train' else 64)
        ds = SyntheticDataset(n, num_classes, 32, in_chans, tf, seed=seed + (0 if split == 'train' else 1))
    else:
        if not data_dir:
            raise UserError("an image folder dataset needs --data-dir (DIR/train/<class>/*, DIR/val/<class>/*)")
        root = Path(data_dir) / split
        if split != 'train' and not root.is_dir():
            alt = Path(data_dir) / ('test' if split == 'val' else 'val')
            root = alt if alt.is_dir() else root
        ds = FolderDataset(root, in_chans, tf, strict, classes)
    ds.mean, ds.std, ds.img_size, ds.name = tuple(mean), tuple(std), img_size, name
    return ds
