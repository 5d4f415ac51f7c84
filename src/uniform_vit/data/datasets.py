"""Dataset readers: Fashion-MNIST (idx files), CIFAR-10/100 (python pickles), image folders, a synthetic set.

Every reader yields ``(image tensor C x H x W, normalised; int label)`` after its transform, and exposes ``classes``
(label names) and ``targets``. The array-backed readers keep the whole set in memory as uint8 (Fashion-MNIST is 47 MB)
so no worker ever touches the disk.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError

FASHION_MNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot']
DEBIAN_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')
IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


class ArrayDataset(torch.utils.data.Dataset):
    """Images held as one uint8 array (N, H, W) or (N, H, W, 3) with integer labels."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: list[str], in_chans: int = 3,
                 transform: Callable | None = None, source: str = ''):
        if len(images) != len(targets):
            raise UserError(f"{source}: {len(images)} images but {len(targets)} labels")
        check_labels(targets, len(classes), source)
        self.images, self.classes, self.in_chans, self.transform = images, list(classes), in_chans, transform
        self.targets = [int(t) for t in targets]
        self.source = source

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.images[i])
        img = img.convert('L' if self.in_chans == 1 else 'RGB')
        return (self.transform(img) if self.transform else img), self.targets[i]


class FolderDataset(torch.utils.data.Dataset):
    """``root/<class>/*`` images (ImageNet layout). Unreadable files are reported, then skipped, never a crash."""

    def __init__(self, root: str | os.PathLike, in_chans: int = 3, transform: Callable | None = None,
                 strict: bool = False, classes: list[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder not found: {root}")
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
        if not found:
            raise UserError(f"{root} holds no class folders (expected {root}/<class>/<image>)")
        if classes is not None and found != list(classes):
            extra = sorted(set(found) - set(classes))
            if extra:
                raise UserError(f"{root} has class folders the training split lacks: {', '.join(extra[:5])}")
        self.classes = list(classes) if classes is not None else found
        index = {c: i for i, c in enumerate(self.classes)}
        files = [(p, index[c]) for c in found for p in sorted((root / c).rglob('*'))
                 if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()]
        # Opening reads only the header: cheap, and it catches files that are not images at all up front.
        self.samples, self.bad_files = [], []
        for p, label in files:
            try:
                with Image.open(p) as im:
                    im.size  # noqa: B018
                self.samples.append((str(p), label))
            except Exception as e:  # any decoder error means the same thing to us: unreadable
                self._bad(p, e, strict)
        if self.bad_files:
            warnings.warn(f"{len(self.bad_files)} unreadable image(s) skipped in {root}", stacklevel=2)
        if not self.samples:
            raise UserError(f"{root} holds no readable images ({', '.join(IMG_EXTENSIONS)})")
        self.targets = [t for _, t in self.samples]
        self.in_chans, self.transform, self.strict, self.root = in_chans, transform, strict, root

    def _bad(self, path: Path | str, err: Exception, strict: bool) -> None:
        msg = f"unreadable image {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if strict:
            raise UserError(msg + " (drop --strict to skip such files)")
        self.bad_files.append(str(path))
        warnings.warn(msg, stacklevel=3)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # A file whose header was fine but whose data is broken: warn, then use the next readable one.
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                with Image.open(path) as im:
                    img = im.convert('L' if self.in_chans == 1 else 'RGB')
            except Exception as e:
                self._bad(path, e, self.strict)
                continue
            return (self.transform(img) if self.transform else img), label
        raise UserError(f"no readable image left in {self.root}")


class SyntheticDataset(ArrayDataset):
    """Learnable random data for smoke tests: each class is a fixed random 8x8 pattern, upsampled, plus noise."""

    def __init__(self, num_samples: int = 256, num_classes: int = 10, size: int = 32, in_chans: int = 3,
                 transform: Callable | None = None, seed: int = 0):
        g = np.random.default_rng(seed)
        protos = np.random.default_rng(12345).random((num_classes, 8, 8, 3))  # same classes in every split
        protos = protos.repeat(size // 8, 1).repeat(size // 8, 2)
        targets = g.integers(0, num_classes, num_samples)
        imgs = protos[targets] * 200 + g.random((num_samples, size, size, 3)) * 55
        super().__init__(imgs.astype(np.uint8), targets, [f'class_{i}' for i in range(num_classes)], in_chans,
                         transform, 'synthetic')


def check_labels(targets: np.ndarray | list[int], num_classes: int, source: str) -> None:
    """Labels outside 0..num_classes-1 would only fail later, deep in the loss: fail here, naming the file."""
    t = np.asarray(targets)
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        bad = int(t.min()) if t.min() < 0 else int(t.max())
        raise UserError(f"{source}: label {bad} outside the {num_classes} classes 0..{num_classes - 1}")


# ---- idx (MNIST / Fashion-MNIST) ---------------------------------------------------------------------------------

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally .gz): magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data."""
    path = Path(path)
    try:
        with (gzip.open(path, 'rb') if path.suffix == '.gz' else open(path, 'rb')) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an idx file of uint8 (bad magic number)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, '>i4', ndim, 4))
    need = int(np.prod(dims))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != need:
        raise UserError(f"{path} is truncated or padded: header says {dims} = {need} bytes, found {data.size}")
    return data.reshape(dims)


def _idx_file(root: Path, stem: str) -> Path | None:
    for sub in ('', 'fashion-mnist', 'FashionMNIST/raw', 'raw'):
        for suffix in ('.gz', ''):
            p = root / sub / f'{stem}{suffix}'
            if p.is_file():
                return p
    return None


def _debian_fashion_mnist() -> Path | None:
    if DEBIAN_FASHION_MNIST.is_dir():
        return DEBIAN_FASHION_MNIST
    if shutil.which('dpkg'):  # the package may install elsewhere on other releases
        try:
            out = subprocess.run(['dpkg', '-L', 'dataset-fashion-mnist'], capture_output=True, text=True,
                                 timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            if line.endswith('train-images-idx3-ubyte.gz'):
                return Path(line).parent
    return None


def find_fashion_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The folder holding the four idx files: ``data_dir``, the Debian package's folder, an earlier download, or a
    fresh download (torchvision) when ``download`` is true."""
    stems = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
    cache = Path(data_dir) if data_dir else Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / \
        'uniform-vit' / 'fashion-mnist'
    raw = cache / 'FashionMNIST' / 'raw'  # where torchvision's download puts the idx files
    candidates = [Path(data_dir), raw] if data_dir else [_debian_fashion_mnist(), raw]
    for root in candidates:
        if root is not None and all(_idx_file(root, s) for s in stems):
            return root
    where = data_dir or f"{DEBIAN_FASHION_MNIST} or {raw}"
    if not download:
        raise UserError(f"Fashion-MNIST idx files ({stems[0]}.gz, ...) not found in {where}; install the Debian "
                        f"package dataset-fashion-mnist or pass --data-dir")
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache), download=True)
    except Exception as e:
        raise UserError(f"Fashion-MNIST not found (looked in {where}) and the download failed "
                        f"({type(e).__name__}: are you offline?); install the Debian package dataset-fashion-mnist or "
                        f"pass --data-dir with the four idx .gz files") from e
    if not all(_idx_file(raw, s) for s in stems):
        raise UserError(f"Fashion-MNIST download finished but the idx files are not in {raw}")
    return raw


def fashion_mnist(split: str, data_dir: str | os.PathLike | None = None, in_chans: int = 1,
                  transform: Callable | None = None, download: bool = True) -> ArrayDataset:
    root = find_fashion_mnist(data_dir, download)
    prefix = 'train' if split == 'train' else 't10k'
    img_path = _idx_file(root, f'{prefix}-images-idx3-ubyte')
    lbl_path = _idx_file(root, f'{prefix}-labels-idx1-ubyte')
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise UserError(f"{img_path}: expected images (N, H, W) and labels (N,), got {images.shape} and {labels.shape}")
    return ArrayDataset(images, labels.astype(np.int64), FASHION_MNIST_CLASSES, in_chans, transform, str(lbl_path))


# ---- CIFAR python pickles ---------------------------------------------------------------------------------------

def _unpickle(path: Path) -> dict:
    try:
        with open(path, 'rb') as f:
            return pickle.load(f, encoding='latin1')
    except FileNotFoundError:
        raise UserError(f"CIFAR file not found: {path}") from None
    except Exception as e:
        raise UserError(f"cannot read CIFAR file {path}: {type(e).__name__}") from e


def cifar(name: str, split: str, data_dir: str | os.PathLike | None, in_chans: int = 3,
          transform: Callable | None = None) -> ArrayDataset:
    """CIFAR-10/100 in the python format (``cifar-10-batches-py/`` or ``cifar-100-python/`` under ``data_dir``)."""
    if not data_dir:
        raise UserError(f"{name} needs --data-dir (the folder holding the extracted python-format archive)")
    ten = name == 'cifar10'
    sub = 'cifar-10-batches-py' if ten else 'cifar-100-python'
    root = Path(data_dir) / sub if (Path(data_dir) / sub).is_dir() else Path(data_dir)
    if ten:
        files = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
        meta, names_key, label_key = 'batches.meta', 'label_names', 'labels'
    else:
        files = ['train' if split == 'train' else 'test']
        meta, names_key, label_key = 'meta', 'fine_label_names', 'fine_labels'
    classes = list(_unpickle(root / meta)[names_key])
    images, labels = [], []
    for fname in files:
        d = _unpickle(root / fname)
        if 'data' not in d or label_key not in d:
            raise UserError(f"{root / fname} lacks 'data' or '{label_key}': not a {name} python batch")
        images.append(np.asarray(d['data'], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(d[label_key], np.int64))
    return ArrayDataset(np.concatenate(images), np.concatenate(labels), classes, in_chans, transform,
                        str(root / files[0]))
