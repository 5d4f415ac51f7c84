"""Dataset readers on tiny files the tests write: idx (Fashion-MNIST), CIFAR pickles, image folders, synthetic."""

from __future__ import annotations

import gzip
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from uniform_vit.data import FASHION_MNIST_CLASSES, create_dataset, read_idx
from uniform_vit.errors import UserError


def write_idx(path, arr: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f'>{arr.ndim}i', *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, 'wb') as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_fashion(root, n_train: int = 12, n_test: int = 6, bad_label: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    labels = np.arange(n_train) % 10
    if bad_label is not None:
        labels[3] = bad_label
    write_idx(root / 'train-images-idx3-ubyte.gz', train)
    write_idx(root / 'train-labels-idx1-ubyte.gz', labels)
    write_idx(root / 't10k-images-idx3-ubyte.gz', rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(root / 't10k-labels-idx1-ubyte.gz', np.arange(n_test) % 10)
    return train


def test_idx_reader_roundtrip_and_dataset(tmp_path):
    train = make_fashion(tmp_path)
    np.testing.assert_array_equal(read_idx(tmp_path / 'train-images-idx3-ubyte.gz'), train)
    ds = create_dataset('fashion-mnist', 'train', str(tmp_path), img_size=32, in_chans=1)
    assert len(ds) == 12 and ds.classes == FASHION_MNIST_CLASSES
    x, y = ds[3]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y == 3
    # normalised with the dataset's statistics: (v/255 - 0.286) / 0.353 for a constant image is exact
    test = create_dataset('fashion-mnist', 'test', str(tmp_path), img_size=32, in_chans=3)
    assert len(test) == 6 and test[0][0].shape == (3, 32, 32)


def test_idx_uncompressed_and_truncated(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / 'a-idx3-ubyte', arr, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / 'a-idx3-ubyte'), arr)
    raw = (tmp_path / 'a-idx3-ubyte').read_bytes()
    (tmp_path / 'b-idx3-ubyte').write_bytes(raw[:-10])
    with pytest.raises(UserError, match='truncated'):
        read_idx(tmp_path / 'b-idx3-ubyte')
    (tmp_path / 'c-idx3-ubyte').write_bytes(b'\x01\x02' + raw[2:])
    with pytest.raises(UserError, match='magic'):
        read_idx(tmp_path / 'c-idx3-ubyte')


def test_idx_label_out_of_range(tmp_path):
    make_fashion(tmp_path, bad_label=12)
    with pytest.raises(UserError, match=r'label 12 outside the 10 classes'):
        create_dataset('fashion-mnist', 'train', str(tmp_path), img_size=32, in_chans=1)


def test_fashion_mnist_missing_files_offline_message(tmp_path):
    with pytest.raises(UserError, match='Fashion-MNIST'):
        create_dataset('fashion-mnist', 'train', str(tmp_path), img_size=32, download=False)


def test_fashion_mnist_lookup_order_without_data_dir(tmp_path, monkeypatch):
    from uniform_vit.data import datasets

    monkeypatch.setattr(datasets, '_debian_fashion_mnist', lambda: None)  # a machine without the Debian package
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    with pytest.raises(UserError, match='dataset-fashion-mnist'):  # download=False never touches the network
        datasets.find_fashion_mnist(None, download=False)
    raw = tmp_path / 'uniform-vit' / 'fashion-mnist' / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    make_fashion(raw)  # an earlier download is found again, offline
    assert datasets.find_fashion_mnist(None, download=False) == raw


def _write_cifar10(root, n: int = 8, bad: bool = False):
    d = root / 'cifar-10-batches-py'
    d.mkdir()
    names = [f'c{i}' for i in range(10)]
    with open(d / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': names}, f)
    rng = np.random.default_rng(1)
    for fname in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        labels = [int(v) for v in rng.integers(0, 10, n)]
        if bad and fname == 'data_batch_2':
            labels[0] = 10
        with open(d / fname, 'wb') as f:
            pickle.dump({'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), 'labels': labels}, f)
    return names


def test_cifar10_pickles(tmp_path):
    names = _write_cifar10(tmp_path)
    ds = create_dataset('cifar10', 'train', str(tmp_path), img_size=32)
    assert len(ds) == 40 and ds.classes == names
    assert ds[0][0].shape == (3, 32, 32)
    assert len(create_dataset('cifar10', 'val', str(tmp_path), img_size=32)) == 8


def test_cifar10_bad_label(tmp_path):
    _write_cifar10(tmp_path, bad=True)
    with pytest.raises(UserError, match='label 10 outside'):
        create_dataset('cifar10', 'train', str(tmp_path), img_size=32)


def test_cifar100_pickles(tmp_path):
    d = tmp_path / 'cifar-100-python'
    d.mkdir()
    with open(d / 'meta', 'wb') as f:
        pickle.dump({'fine_label_names': [f'f{i}' for i in range(100)]}, f)
    for split in ('train', 'test'):
        with open(d / split, 'wb') as f:
            pickle.dump({'data': np.zeros((4, 3072), np.uint8), 'fine_labels': [0, 99, 5, 7]}, f)
    ds = create_dataset('cifar100', 'train', str(tmp_path), img_size=32, in_chans=1)
    assert len(ds.classes) == 100 and ds[1][1] == 99 and ds[1][0].shape == (1, 32, 32)


def _write_folder(root):
    for split in ('train', 'val'):
        for c, color in (('cat', 40), ('dog', 200)):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new('RGB', (20, 24), (color, i, 0)).save(root / split / c / f'{i}.png')
    (root / 'train' / 'dog' / 'broken.png').write_bytes(b'not a png at all')


def test_folder_with_corrupt_image_warns_names_file_and_counts(tmp_path):
    _write_folder(tmp_path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        ds = create_dataset('folder', 'train', str(tmp_path), img_size=32)
    msgs = [str(x.message) for x in w]
    assert any('broken.png' in m for m in msgs), msgs
    assert any(m.startswith('1 unreadable image') for m in msgs), msgs
    assert len(ds) == 6 and ds.classes == ['cat', 'dog'] and ds.bad_files[0].endswith('broken.png')
    xs = [ds[i] for i in range(len(ds))]
    assert {y for _, y in xs} == {0, 1} and xs[0][0].shape == (3, 32, 32)
    with pytest.raises(UserError, match='broken.png'):
        create_dataset('folder', 'train', str(tmp_path), img_size=32, strict=True)


def test_folder_val_keeps_training_label_order(tmp_path):
    _write_folder(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / 'val' / 'cat')
    val = create_dataset('folder', 'val', str(tmp_path), img_size=32, classes=['cat', 'dog'])
    assert set(val.targets) == {1}
    with pytest.raises(UserError, match='no class folders|not found'):
        create_dataset('folder', 'train', str(tmp_path / 'nowhere'), img_size=32)


def test_synthetic_is_learnable_and_unknown_name():
    ds = create_dataset('synthetic', 'train', img_size=32, num_samples=20, num_classes=4)
    assert len(ds) == 20 and len(ds.classes) == 4 and max(ds.targets) < 4
    # same class, same pattern: images of one class correlate far more than across classes
    a = [ds[i][0] for i in range(20)]
    same = [(a[i] * a[j]).mean() for i in range(20) for j in range(i + 1, 20) if ds.targets[i] == ds.targets[j]]
    diff = [(a[i] * a[j]).mean() for i in range(20) for j in range(i + 1, 20) if ds.targets[i] != ds.targets[j]]
    assert sum(same) / len(same) > sum(diff) / len(diff) + 0.1
    with pytest.raises(UserError, match="did you mean 'fashion-mnist'"):
        create_dataset('fashion_mnist', 'train')
    with pytest.raises(UserError, match='at least 32'):
        create_dataset('synthetic', 'train', img_size=16)


def test_colour_jitter_only_where_it_does_something():
    from torchvision.transforms import ColorJitter

    from uniform_vit.data.factory import build_transform

    def has_jitter(in_chans, aug):
        mean = (0.5,) * in_chans
        return any(isinstance(t, ColorJitter) for t in build_transform(32, in_chans, True, mean, mean, aug).transforms)

    assert has_jitter(3, dict(color_jitter=0.4)) and has_jitter(3, None)  # timm's default 0.4 stays
    assert not has_jitter(3, dict(color_jitter=0.0))  # a jitter of 0 is a costly no-op: left out
    assert not has_jitter(3, dict(color_jitter=(0.0, 0.0, 0.0)))
    assert not has_jitter(1, dict(color_jitter=0.4))  # hue/saturation mean nothing on one channel


def test_translate_shifts_the_image_by_up_to_the_padding():
    from uniform_vit.data.factory import build_transform

    img = Image.new('L', (32, 32))
    img.putpixel((16, 16), 255)
    aug = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, re_prob=0.0)
    plain = build_transform(32, 1, True, (0.0,), (1.0,), aug, interpolation='nearest')
    assert (plain(img)[0] > 0.5).nonzero().tolist() == [[16, 16]]  # no crop, no shift: the pixel stays put
    tf = build_transform(32, 1, True, (0.0,), (1.0,), dict(aug, translate=0.125), interpolation='nearest')
    torch.manual_seed(0)
    shifts = set()
    for _ in range(200):
        out = tf(img)[0]
        assert out.shape == (32, 32) and out.sum() == 1.0  # one pixel moved, zero fill, nothing lost
        y, x = (out > 0.5).nonzero()[0].tolist()
        shifts.add((y - 16, x - 16))
    assert max(max(abs(dy), abs(dx)) for dy, dx in shifts) == 4  # round(0.125 x 32) pixels each way, no more
    assert len(shifts) > 40  # shifts in both axes, not a fixed offset
