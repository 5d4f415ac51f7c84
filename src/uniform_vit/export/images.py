"""Real images for export checks and int8 calibration: a folder of images, or one of the built-in datasets.

Images get the model's evaluation preprocessing (resize to the export size, normalise with the checkpoint's mean/std),
because calibration must see exactly the activations the deployed model will see.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

BUILTIN = ('fashion-mnist', 'cifar10', 'cifar100')


class ImageList(torch.utils.data.Dataset):
    """Every image file under ``root`` (any depth, class folders or not), sorted by path; label is always -1."""

    def __init__(self, root: str | os.PathLike, in_chans: int, transform):
        from ..data.datasets import IMG_EXTENSIONS

        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder not found: {root} (or give a built-in set: {', '.join(BUILTIN)})")
        self.files = sorted(p for p in root.rglob('*') if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not self.files:
            raise UserError(f"{root} holds no images ({', '.join(IMG_EXTENSIONS)})")
        self.in_chans, self.transform = in_chans, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                img = im.convert('L' if self.in_chans == 1 else 'RGB')
        except Exception as e:  # any decoder error: the file is not a usable image
            raise UserError(f"cannot read image {self.files[i]}: {type(e).__name__}") from e
        return self.transform(img), -1


def eval_stats(meta: dict, model: torch.nn.Module, in_chans: int, source: str | None = None
               ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for the model's inputs: the checkpoint's, else the built-in dataset's, else the model config's."""
    from ..data.factory import dataset_stats

    if meta.get('mean') and meta.get('std'):
        mean, std = tuple(meta['mean']), tuple(meta['std'])
    elif meta.get('dataset') in BUILTIN or source in BUILTIN:
        mean, std = dataset_stats(meta.get('dataset') if meta.get('dataset') in BUILTIN else source, in_chans)
    else:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        mean, std = tuple(cfg.get('mean', (0.485, 0.456, 0.406))), tuple(cfg.get('std', (0.229, 0.224, 0.225)))
    if len(mean) != in_chans:  # grayscale model, RGB statistics (or the reverse)
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return mean, std


def image_dataset(source: str | os.PathLike, img_size: int, in_chans: int, mean: tuple[float, ...],
                  std: tuple[float, ...], split: str = 'train') -> torch.utils.data.Dataset:
    """``source``: a built-in dataset name (its ``split``) or a folder of images."""
    from ..data.factory import build_transform, create_dataset

    if str(source) in BUILTIN:
        # never download here: export must work offline, and a missing set is reported as a one-line error
        return create_dataset(str(source), split, img_size=img_size, in_chans=in_chans, mean=mean, std=std,
                              download=False)
    return ImageList(source, in_chans, build_transform(img_size, in_chans, False, mean, std))


def sample_batches(ds: torch.utils.data.Dataset, count: int, batch_size: int = 16, seed: int = 0
                   ) -> list[torch.Tensor]:
    """``count`` images drawn without replacement (fixed seed) from ``ds``, as float32 NCHW batches."""
    idx = np.random.default_rng(seed).permutation(len(ds))[:count]
    out = []
    for start in range(0, len(idx), batch_size):
        out.append(torch.stack([ds[int(i)][0] for i in idx[start:start + batch_size]]).float())
    return out
