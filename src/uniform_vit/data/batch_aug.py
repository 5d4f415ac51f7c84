"""Training augmentation of whole batches of in-memory images, as two small matrix products per batch.

timm's per-image pipeline of the ``small`` recipe (random resized crop -> [shift] -> horizontal flip -> to tensor ->
normalise -> random erasing) costs about 0.33 ms an image in Pillow on one core. Fashion-MNIST at 96 px trains at
~1.6 ms an image on two cores, so with the loader in the main process a sixth of every step went to Pillow while the
second core idled. A GPU needs thousands of such images a second per loader process.

Here the same steps run on a whole batch. Pillow resizes separably: a horizontal pass, rounded to 8 bits, then a
vertical pass, rounded again, each a weighted sum whose weights depend only on the crop and output sizes. So a crop
``(i, j, h, w)`` of an image resized to ``S x S`` is ``round(Wy @ round(img @ Wx^T))``, where ``Wx`` (``S x W``) holds
Pillow's weights for ``w -> S`` in the crop's columns and zeros elsewhere (likewise ``Wy``). A flip reverses ``Wx``'s
rows; the zero-filled shift moves rows, leaving zero rows where the fill is. Pillow's filters and its coefficient rule
(``precompute_coeffs`` in libImaging/Resample.c) are followed, so the images match Pillow's to within one grey
level (its fixed-point weights round differently in rare ties). The random draws come from the same samplers
(timm's ``get_params``, ``RandomErasing``), so the augmentation's distribution is unchanged.

The plan is read off the per-image transform itself (``BatchAugment.from_transform``): a step it does not know
(RandAugment, colour jitter, ...) means no batched form, and the caller keeps the per-image loader. The evaluation
transform (resize the whole image, to tensor, normalise) has a batched form too, for square images: a "crop" of the
whole image with no random draw, so validation needs no Pillow either.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

# Pillow's resampling filters: (support, weight function of the distance in input pixels).


def _bicubic(x: float) -> float:
    a = -0.5  # Pillow's choice (torch's interpolate uses -0.75)
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _sinc(x: float) -> float:
    return 1.0 if x == 0.0 else math.sin(math.pi * x) / (math.pi * x)


_FILTERS: dict[str, tuple[float, Callable[[float], float]]] = {
    'box': (0.5, lambda x: 1.0 if -0.5 < x <= 0.5 else 0.0),
    'bilinear': (1.0, lambda x: max(0.0, 1.0 - abs(x))),
    'hamming': (1.0, lambda x: 1.0 if x == 0.0 else 0.0 if abs(x) >= 1.0 else
                math.sin(math.pi * x) / (math.pi * x) * (0.54 + 0.46 * math.cos(math.pi * x))),
    'bicubic': (2.0, _bicubic),
    'lanczos': (3.0, lambda x: _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0),
}


def resize_weights(in_size: int, out_size: int, interpolation: str = 'bicubic') -> np.ndarray:
    """Pillow's weights for resizing ``in_size`` pixels to ``out_size`` along one axis: ``(out_size, in_size)``, each
    row summing to 1 (``precompute_coeffs``: the filter is widened by the scale when shrinking, and taps beyond the
    edge are dropped, the rest renormalised)."""
    if interpolation not in _FILTERS:
        raise ValueError(f"no Pillow filter {interpolation!r}; one of {', '.join(_FILTERS)}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    support, fn = _FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    w = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C's truncation, as Pillow
        xmax = min(int(center + support + 0.5), in_size)
        k = np.array([fn((x - center + 0.5) / filterscale) for x in range(xmin, xmax)])
        total = k.sum()
        w[xx, xmin:xmax] = k / total if total != 0.0 else k
    return w


_PARAMS = ('i', 'j', 'h', 'w', 'filter', 'dy', 'dx', 'flip')  # one batch's draws, an int64 tensor of B each


def _pil_round(x: torch.Tensor) -> torch.Tensor:
    return torch.floor_(x.add_(0.5)).clamp_(0.0, 255.0)  # Pillow rounds half up, then clips to 8 bits


class BatchAugment:
    """The per-image training transform's steps, applied to a batch of uint8 images ``(B, C, H, W)`` at once.

    Returns ``(B, C, S, S)`` float32, normalised and erased, on the images' device.
    """

    def __init__(self, size: int, scale: tuple[float, float] | None, ratio: tuple[float, float] | None,
                 interpolation: str | tuple[str, ...], hflip: float, mean: tuple[float, ...], std: tuple[float, ...],
                 pad: int = 0, erasing: Callable | None = None):
        """``scale=None`` (with ``ratio=None``): no random crop, every image resized whole (the evaluation view)."""
        interps = (interpolation,) if isinstance(interpolation, str) else tuple(interpolation)
        for m in interps:
            if m not in _FILTERS:
                raise ValueError(f"no batched form of {m!r} interpolation; one of {', '.join(_FILTERS)}")
        self.scale = tuple(scale) if scale is not None else None
        self.ratio = tuple(ratio) if ratio is not None else None
        self.size, self.interps = size, interps
        self.hflip, self.pad, self.erasing = hflip, pad, erasing
        self.mean, self.std = tuple(mean), tuple(std)
        self._tables: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}  # per size / device

    @property
    def whole(self) -> bool:
        """True for the evaluation view: each image resized whole, nothing random."""
        return self.scale is None

    @classmethod
    def from_transform(cls, tf: Callable) -> BatchAugment | str:
        """The batched form of a timm training or evaluation transform (as ``build_transform`` makes them), or why
        there is none."""
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
        from torchvision import transforms as T

        steps = list(getattr(tf, 'transforms', [tf]))
        if steps and isinstance(steps[0], T.Resize):
            return cls._from_evaluation(steps)
        # the order build_transform makes: crop, [shift], [flip], to tensor, normalise, [erase]
        pattern = [(RandomResizedCropAndInterpolation, True), (T.RandomCrop, False), (T.RandomHorizontalFlip, False),
                   ((MaybeToTensor, T.ToTensor), True), (T.Normalize, True), (RandomErasing, False)]
        found: dict[int, Callable] = {}
        k = 0
        for s in steps:
            while k < len(pattern) and not isinstance(s, pattern[k][0]) and not pattern[k][1]:
                k += 1
            if k == len(pattern) or not isinstance(s, pattern[k][0]):
                return f"no batched form of {type(s).__name__} at this place in the transform"
            found[k] = s
            k += 1
        if any(required for _, required in pattern[k:]):
            return "the transform lacks a step every batched one has (crop, to tensor, normalise)"
        crop, shift, flip, norm, erasing = found[0], found.get(1), found.get(2), found[4], found.get(5)
        pad = 0
        if shift is not None:
            if shift.size != crop.size or not isinstance(shift.padding, int) or shift.fill != 0 or shift.pad_if_needed:
                return f"no batched form of {shift!r}"
            pad = shift.padding
        hflip = float(flip.p) if flip is not None else 0.0
        mean, std = tuple(float(v) for v in norm.mean), tuple(float(v) for v in norm.std)
        if crop.size[0] != crop.size[1]:
            return f"non-square output {crop.size}"
        interp = crop.interpolation
        names = tuple(getattr(m, 'value', str(m)) for m in (interp if isinstance(interp, (tuple, list)) else (interp,)))
        if any(n not in _FILTERS for n in names):
            return f"no batched form of {'/'.join(names)} interpolation"
        return cls(crop.size[0], crop.scale, crop.ratio, names if len(names) > 1 else names[0], hflip, mean, std,
                   pad, erasing)

    @classmethod
    def _from_evaluation(cls, steps: list[Callable]) -> BatchAugment | str:
        """timm's evaluation transform with crop_pct 1: resize to S, centre crop S x S, to tensor, normalise. For a
        square image the crop takes the whole resized image, so this is a resize of the whole image."""
        from timm.data.transforms import MaybeToTensor
        from torchvision import transforms as T

        kinds = (T.Resize, T.CenterCrop, (MaybeToTensor, T.ToTensor), T.Normalize)
        if len(steps) != len(kinds) or not all(isinstance(s, k) for s, k in zip(steps, kinds)):
            return "no batched form of this evaluation transform (only resize, centre crop, to tensor, normalise)"
        resize, crop, _, norm = steps
        size = resize.size if isinstance(resize.size, int) else tuple(resize.size)
        if isinstance(size, tuple) and len(size) == 1:
            size = size[0]
        if not isinstance(size, int) or tuple(crop.size) != (size, size) or resize.max_size is not None:
            return f"no batched form of {resize!r} then {crop!r}: the centre crop must take the whole resized image"
        name = getattr(resize.interpolation, 'value', str(resize.interpolation))
        if name not in _FILTERS:
            return f"no batched form of {name} interpolation"
        return cls(size, None, None, name, 0.0, tuple(float(v) for v in norm.mean), tuple(float(v) for v in norm.std))

    def _table(self, n: int, device: torch.device) -> torch.Tensor:
        """A view (filters, n + 1, S + 1, n + 2, n): ``[f, w, r, n - j]`` is output row r of filter f's weights for
        a crop of w pixels starting at pixel j, spread over all n input pixels (zeros outside the crop). Row S is
        all zeros: where a shift fills."""
        key = (n, device)
        if key not in self._tables:
            t = np.zeros((len(self.interps), n + 1, self.size + 1, 2 * n + 1))
            for f, m in enumerate(self.interps):
                for w in range(1, n + 1):
                    t[f, w, :self.size, n:n + w] = resize_weights(w, self.size, m)
            self._tables[key] = torch.from_numpy(t).float().to(device).unfold(3, n, 1)
        return self._tables[key]

    def _normalise(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 / (255 std), mean / std), each (1, C, 1, 1) on ``device``: made once, not in every batch."""
        key = ('normalise', device)
        if key not in self._tables:
            std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
            mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
            self._tables[key] = (1.0 / (255.0 * std), mean / std)
        return self._tables[key]

    def _weights(self, table: torch.Tensor, filt: torch.Tensor, start: torch.Tensor, length: torch.Tensor,
                 shift: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, n): each image's crop [start, start + length) resized to S, output rows read from resized row
        ``r + shift`` (zeros where that falls outside), then mirrored where ``flip``."""
        s = self.size
        r = torch.arange(s, device=table.device)[None].expand(len(start), s)
        if flip is not None:
            r = torch.where(flip.bool()[:, None], s - 1 - r, r)
        r = r + shift[:, None]
        r = torch.where((r >= 0) & (r < s), r, s)
        n = table.shape[-1]
        return table[filt[:, None], length[:, None], r, (n - start)[:, None]]

    def params(self, batch: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """One batch's random draws (Python's ``random``, like the per-image transform)."""
        from timm.data.transforms import RandomResizedCropAndInterpolation

        if self.whole:
            z = torch.zeros(batch, dtype=torch.int64)
            return dict(i=z, j=z, h=torch.full_like(z, height), w=torch.full_like(z, width), filter=z, dy=z, dx=z,
                        flip=z)
        probe = torch.empty(0, height, width)  # get_params only reads the size
        draws = []
        for _ in range(batch):
            i, j, h, w = RandomResizedCropAndInterpolation.get_params(probe, self.scale, self.ratio)
            f = random.randrange(len(self.interps)) if len(self.interps) > 1 else 0
            dy, dx = (random.randint(0, 2 * self.pad) - self.pad, random.randint(0, 2 * self.pad) - self.pad) \
                if self.pad else (0, 0)
            flip = self.hflip > 0 and random.random() < self.hflip
            draws.append((i, j, h, w, f, dy, dx, flip))
        t = torch.tensor(draws, dtype=torch.int64)
        return dict(zip(_PARAMS, t.unbind(1)))

    def __call__(self, images: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
        b, c, h, w = images.shape
        if self.whole and h != w:  # the evaluation resize keeps the aspect ratio, then crops the centre
            raise ValueError(f"the batched evaluation view takes square images, got {h}x{w}")
        p = params or self.params(b, h, w)
        p = dict(zip(_PARAMS, torch.stack([p[k] for k in _PARAMS]).to(images.device).unbind()))  # one copy to a GPU
        table = self._table(max(h, w), images.device)
        wy = self._weights(table, p['filter'], p['i'], p['h'], p['dy'])[..., :h]
        wx = self._weights(table, p['filter'], p['j'], p['w'], p['dx'], p['flip'])[..., :w]
        x = _pil_round(images.float() @ wx.transpose(1, 2)[:, None])  # horizontal pass first, as Pillow
        x = _pil_round(wy[:, None] @ x)
        scale, shift = self._normalise(images.device)
        x = x.mul_(scale).sub_(shift)  # to tensor (/255), then normalise
        if self.erasing is not None:
            x = self.erasing(x)
        return x


def as_uint8_batch(images: np.ndarray, in_chans: int) -> torch.Tensor:
    """An (N, H, W) or (N, H, W, 3) uint8 array as (N, in_chans, H, W), converted as Pillow's ``convert`` would:
    grey to RGB repeats the plane, RGB to grey is ITU-R 601 luma in Pillow's fixed point."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images (N, H, W[, 3]), got {a.dtype} {a.shape}")
    if a.ndim == 3:
        t = torch.from_numpy(a.copy())[:, None]  # the idx reader's arrays are read-only
        return t.expand(-1, in_chans, -1, -1).contiguous()
    if in_chans == 3:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    rgb = a.astype(np.int64)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return torch.from_numpy(luma.astype(np.uint8))[:, None]


class BatchedLoader:
    """A training loader over an in-memory dataset: yields ``(images, labels)`` batches, augmented as a whole by
    :class:`BatchAugment`. The images live on ``device`` (Fashion-MNIST: 47 MB), so on a GPU the augmentation runs
    there too. Same batches as ``DataLoader(ds, batch_size, sampler=sampler)``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, augment: BatchAugment, sampler: Iterable[int],
                 batch_size: int):
        self.images, self.targets, self.augment = images, targets, augment
        self.sampler, self.batch_size = sampler, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        for k in range(0, len(order), self.batch_size):
            idx = order[k:k + self.batch_size].to(self.images.device)
            yield self.augment(self.images[idx]), self.targets[idx]


class BatchedSource:
    """What a :class:`BatchedLoader` needs from a dataset, prepared once: its images as one uint8 tensor on the
    device, labels, and the batched form of its training transform."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, augment: BatchAugment):
        self.images, self.targets, self.augment = images, targets, augment

    @classmethod
    def from_dataset(cls, ds: torch.utils.data.Dataset, device: torch.device | str = 'cpu') -> BatchedSource | str:
        """For an in-memory dataset (``ArrayDataset``, or a ``Subset`` of one) whose transform has a batched form;
        otherwise a string saying why not."""
        from .datasets import ArrayDataset

        base, index = ds, None
        if isinstance(ds, torch.utils.data.Subset):
            base, index = ds.dataset, list(ds.indices)
        if not isinstance(base, ArrayDataset):
            return f"{type(base).__name__} reads images one by one (only in-memory datasets are batched)"
        aug = cls._augment(base.transform, device)
        if isinstance(aug, str):
            return aug
        shape = np.shape(base.images)
        if aug.whole and shape[1] != shape[2]:
            return f"the evaluation view of {shape[2]}x{shape[1]} images keeps their aspect ratio (only square ones " \
                   "are batched)"
        images = base.images if index is None else base.images[index]
        targets = base.targets if index is None else [base.targets[i] for i in index]
        return cls(as_uint8_batch(images, base.in_chans).to(device),
                   torch.as_tensor(targets, dtype=torch.int64, device=device), aug)

    @staticmethod
    def _augment(tf: Callable | None, device: torch.device | str) -> BatchAugment | str:
        aug = BatchAugment.from_transform(tf) if tf is not None else "no transform"
        if isinstance(aug, BatchAugment) and aug.erasing is not None:  # it makes its fill tensors on its device
            aug.erasing = copy.copy(aug.erasing)
            aug.erasing.device = torch.device(device)
        return aug

    def set_transform(self, tf: Callable) -> None:
        """Follow a new per-image transform (progressive resizing changes the size between epochs)."""
        aug = self._augment(tf, self.images.device)
        if isinstance(aug, str):
            raise ValueError(f"the new transform has no batched form: {aug}")
        self.augment = aug

    def loader(self, sampler: Iterable[int], batch_size: int) -> BatchedLoader:
        return BatchedLoader(self.images, self.targets, self.augment, sampler, batch_size)
