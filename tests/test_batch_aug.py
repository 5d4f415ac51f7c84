"""Batched training augmentation (data/batch_aug.py) against timm's per-image Pillow pipeline it replaces."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from uniform_vit.data import SyntheticDataset, build_transform
from uniform_vit.data.batch_aug import BatchAugment, BatchedSource, as_uint8_batch, resize_weights
from uniform_vit.errors import UserError
from uniform_vit.train.config import make_config
from uniform_vit.train.engine import GlobalBatchSampler, train

FLAT = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, re_prob=0.0, color_jitter=0.0)


def pillow_reference(img: np.ndarray, p: dict, b: int, size: int, pad: int, interp: str) -> np.ndarray:
    """What the per-image pipeline does with image b's draws: Pillow's resized crop, the zero-filled shift, the
    flip; as 8-bit values (H, W, C)."""
    i, j, h, w, dy, dx, flip = (int(p[k][b]) for k in ('i', 'j', 'h', 'w', 'dy', 'dx', 'flip'))
    out = TF.resized_crop(Image.fromarray(img), i, j, h, w, [size, size], InterpolationMode(interp))
    a = np.asarray(out, dtype=np.float64).reshape(size, size, -1)
    a = np.pad(a, ((pad, pad), (pad, pad), (0, 0)))[dy + pad:dy + pad + size, dx + pad:dx + pad + size]
    return a[:, ::-1] if flip else a


@pytest.mark.parametrize('interp', ['bicubic', 'bilinear', 'lanczos', 'box', 'hamming'])
@pytest.mark.parametrize('sizes', [(28, 96), (21, 112), (32, 32), (40, 24)])
def test_resize_weights_are_pillows(interp, sizes):
    n, m = sizes
    row = np.random.default_rng(n * m).integers(0, 256, (1, n), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(row).resize((m, 1), TF.pil_modes_mapping[InterpolationMode(interp)]), float)
    w = resize_weights(n, m, interp)
    assert w.shape == (m, n) and np.allclose(w.sum(1), 1.0)
    ours = np.clip(np.floor(w @ row[0] + 0.5), 0, 255)
    assert np.abs(ours - ref[0]).max() <= 1.0  # Pillow's fixed-point weights may round a tie the other way
    assert (ours == ref[0]).mean() > 0.9


@pytest.mark.parametrize('in_chans, interp, translate', [(1, 'bicubic', 0.125), (3, 'bilinear', 0.0),
                                                         (3, 'bicubic', 0.1)])
def test_batch_matches_per_image_pillow_for_the_same_draws(in_chans, interp, translate):
    ds = SyntheticDataset(24, 4, 32, 3, seed=1)
    mean, std = (0.4,) * in_chans, (0.3,) * in_chans
    tf = build_transform(48, in_chans, True, mean, std, dict(scale=(0.3, 1.0), ratio=(0.7, 1.4), hflip=0.5,
                                                             re_prob=0.0, color_jitter=0.0, translate=translate),
                         interp)
    aug = BatchAugment.from_transform(tf)
    assert isinstance(aug, BatchAugment), aug
    assert aug.pad == round(translate * 48) and aug.hflip == 0.5 and aug.erasing is None
    images = as_uint8_batch(ds.images, in_chans)
    random.seed(3)
    p = aug.params(len(images), 32, 32)
    assert p['flip'].any() and not p['flip'].all() and len(set(p['w'].tolist())) > 5  # varied draws
    if translate:
        assert p['dy'].abs().max() > 0
    out = aug(images, p)
    assert out.shape == (24, in_chans, 48, 48) and out.dtype == torch.float32
    levels = out * torch.tensor(std).view(1, -1, 1, 1) * 255 + torch.tensor(mean).view(1, -1, 1, 1) * 255
    mode = 'L' if in_chans == 1 else 'RGB'
    worst, exact = 0.0, []
    for b in range(len(images)):
        img = np.asarray(Image.fromarray(ds.images[b]).convert(mode))
        ref = pillow_reference(img, p, b, 48, aug.pad, interp)
        diff = np.abs(levels[b].permute(1, 2, 0).double().numpy() - ref)
        worst = max(worst, diff.max())
        exact.append((diff < 1e-3).mean())
    assert worst <= 1.0 + 1e-3, worst  # within one grey level everywhere
    assert np.mean(exact) > 0.99


def test_flip_and_shift_move_pixels_where_pillow_would():
    img = np.zeros((1, 16, 16), np.uint8)
    img[0, 4, 2] = 255
    tf = build_transform(32, 1, True, (0.0,), (1.0 / 255,), dict(FLAT, translate=0.125), 'box')  # 2x, no blur
    aug = BatchAugment.from_transform(tf)
    base = dict(i=[0], j=[0], h=[16], w=[16], filter=[0])
    for dy, dx, flip in [(0, 0, 0), (3, -2, 0), (0, 0, 1), (-4, 4, 1)]:
        p = {k: torch.tensor(v) for k, v in {**base, 'dy': [dy], 'dx': [dx], 'flip': [flip]}.items()}
        out = aug(torch.from_numpy(img)[:, None], p)[0, 0]
        ys, xs = (out > 128).nonzero(as_tuple=True)
        x0 = 4 - dx if not flip else 26 + dx  # the 2x2 block at x 4..5 shows at x - dx, then mirrored (31 - x)
        assert ys.tolist() == [8 - dy, 8 - dy, 9 - dy, 9 - dy] and sorted(set(xs.tolist())) == [x0, x0 + 1]
        assert out.sum() == 4 * 255  # zero fill, nothing else lit


def test_erasing_is_timms_after_normalising():
    tf = build_transform(32, 1, True, (0.5,), (0.25,), dict(FLAT, re_prob=1.0))
    aug = BatchAugment.from_transform(tf)
    assert aug.erasing is not None and aug.erasing.probability == 1.0
    images = torch.full((8, 1, 16, 16), 200, dtype=torch.uint8)
    random.seed(0)
    out = aug(images)
    plain = (200 / 255 - 0.5) / 0.25
    for x in out:  # each image: a rectangle of zeros (timm's 'const' fill), the rest untouched
        zero = x[0] == 0
        assert 0 < zero.sum() < zero.numel()
        assert torch.allclose(x[0][~zero], torch.tensor(plain))
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        assert zero.sum() == len(rows) * len(cols)


def test_steps_without_a_batched_form_say_so():
    mean = (0.5,) * 3
    ra = build_transform(32, 3, True, mean, mean, dict(auto_augment='rand-m9-mstd0.5', re_prob=0.0, color_jitter=0))
    assert 'RandAugment' in BatchAugment.from_transform(ra)
    jitter = build_transform(32, 3, True, mean, mean, dict(color_jitter=0.4, re_prob=0.0))
    assert 'ColorJitter' in BatchAugment.from_transform(jitter)
    nearest = build_transform(32, 3, True, mean, mean, dict(FLAT), 'nearest')
    assert 'nearest' in BatchAugment.from_transform(nearest)
    from torchvision import transforms as T

    ev = build_transform(32, 3, False, mean, mean)
    cropped = T.Compose([T.Resize(40), T.CenterCrop(32), *ev.transforms[2:]])  # crop_pct < 1: part of the image
    assert 'centre crop' in BatchAugment.from_transform(cropped)
    assert 'evaluation transform' in BatchAugment.from_transform(T.Compose([T.Resize(32), T.ToTensor()]))
    with pytest.raises(ValueError, match='uint8'):
        BatchAugment.from_transform(build_transform(32, 3, True, mean, mean, dict(FLAT)))(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize('in_chans, size, out', [(1, 24, 96), (3, 32, 48), (3, 32, 24)])
def test_evaluation_view_is_pillows_whole_image_resize(in_chans, size, out):
    ds = SyntheticDataset(12, 4, size, 3, seed=2)
    ds.in_chans = in_chans
    mean, std = (0.3,) * in_chans, (0.2,) * in_chans
    ds.transform = build_transform(out, in_chans, False, mean, std)
    aug = BatchAugment.from_transform(ds.transform)
    assert isinstance(aug, BatchAugment) and aug.whole and aug.size == out and aug.hflip == 0 and aug.erasing is None
    random.seed(0)
    state = random.getstate()
    x = aug(as_uint8_batch(ds.images, in_chans))
    assert random.getstate() == state  # nothing drawn: the view is the same in every epoch
    ref = torch.stack([ds[i][0] for i in range(len(ds))])  # torchvision's Resize + CenterCrop on Pillow images
    diff = (x - ref).abs() * torch.tensor(std).view(1, -1, 1, 1) * 255
    assert x.shape == ref.shape and diff.max() <= 1.0 + 1e-3 and (diff < 1e-3).float().mean() > 0.99
    with pytest.raises(ValueError, match='square'):
        aug(torch.zeros(2, in_chans, 8, 10, dtype=torch.uint8))


def test_evaluation_loader_is_batched_for_square_in_memory_sets():
    import timm

    from uniform_vit.data.batch_aug import BatchedLoader
    from uniform_vit.train.distributed import DistInfo
    from uniform_vit.train.engine import eval_loader, evaluate

    ds = SyntheticDataset(40, 5, 32, 3, build_transform(32, 3, False, (0.5,) * 3, (0.25,) * 3), seed=4)
    info = DistInfo()
    loader = eval_loader(ds, 16, info, workers=0)
    assert isinstance(loader, BatchedLoader)
    assert torch.cat([y for _, y in loader]).tolist() == ds.targets  # the dataset's order, nothing dropped
    per_image = torch.utils.data.DataLoader(ds, 16)
    torch.manual_seed(0)
    net = timm.create_model('uniform_t', num_classes=5, img_size=32).eval()
    a, b = evaluate(net, loader, 5, info.device), evaluate(net, per_image, 5, info.device)
    assert a['n'] == b['n'] == 40 and torch.equal(a['confusion'], b['confusion'])
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-3)
    assert isinstance(eval_loader(ds, 16, info, workers=0, batched=False), torch.utils.data.DataLoader)
    shard = eval_loader(ds, 16, DistInfo(rank=1, world_size=3), workers=0)  # DDP: every third image, no padding
    assert torch.cat([y for _, y in shard]).tolist() == ds.targets[1::3]
    wide = SyntheticDataset(8, 5, 32, 3, ds.transform)
    wide.images = np.concatenate([wide.images, wide.images[:, :, :8]], axis=2)  # 40 wide, 32 high
    kept = eval_loader(wide, 16, info, workers=0)
    assert isinstance(kept, torch.utils.data.DataLoader)  # aspect-preserving resize: Pillow, one image at a time
    assert 'aspect' in BatchedSource.from_dataset(wide)


def test_colour_conversions_are_pillows():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    grey = as_uint8_batch(rgb, 1)
    ref = np.stack([np.asarray(Image.fromarray(x).convert('L')) for x in rgb])
    assert grey.shape == (5, 1, 7, 9) and np.array_equal(grey[:, 0].numpy(), ref)
    assert torch.equal(as_uint8_batch(rgb, 3), torch.from_numpy(rgb).permute(0, 3, 1, 2))
    g3 = as_uint8_batch(ref, 3)
    assert g3.shape == (5, 3, 7, 9) and all(torch.equal(g3[:, c], torch.from_numpy(ref)) for c in range(3))


def test_loader_yields_the_samplers_batches_and_labels():
    ds = torch.utils.data.Subset(SyntheticDataset(50, 5, 32, 3, build_transform(
        32, 3, True, (0.5,) * 3, (0.5,) * 3, dict(FLAT))), range(40))
    src = BatchedSource.from_dataset(ds)
    assert isinstance(src, BatchedSource) and src.images.shape == (40, 3, 32, 32)
    sampler = GlobalBatchSampler(40, 16, 1, 0, seed=0, epoch=2, drop_last=False)
    loader = src.loader(sampler, 16)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [16, 16, 16]  # wrapped, as DDP's
    order = list(sampler)
    assert torch.cat([y for _, y in batches]).tolist() == [ds.dataset.targets[i] for i in order]
    ref = torch.stack([ds[i][0] for i in order[:16]])  # no crop, flip or erasing: Pillow's to-tensor + normalise
    assert torch.allclose(batches[0][0], ref, atol=1e-6)
    assert isinstance(BatchedSource.from_dataset(torch.utils.data.TensorDataset(torch.zeros(2))), str)


def test_training_uses_the_batched_loader_and_on_insists(tmp_path, capsys):
    tiny = dict(dataset='synthetic', img_size=32, batch_size=16, train_samples=64, val_samples=32, threads=1,
                progress=False, workers=0, recipe='small', epochs=1)
    s = train(make_config(**tiny, output=str(tmp_path / 'a')))
    assert 'augmentation batched' in capsys.readouterr().out
    s2 = train(make_config(**tiny, output=str(tmp_path / 'b')))
    assert s['best_top1'] == s2['best_top1']  # seeded per epoch: same run, same result
    train(make_config(**tiny, batch_aug='off', output=str(tmp_path / 'c')))
    assert 'augmentation per image: off' in capsys.readouterr().out
    with pytest.raises(UserError, match='RandAugment'):
        train(make_config(**tiny, aa='rand-m9-mstd0.5', batch_aug='on', output=str(tmp_path / 'd')))
    with pytest.raises(UserError, match='batch_aug'):
        make_config(**tiny, batch_aug='yes', output=str(tmp_path / 'e'))


def test_progressive_resizing_schedule():
    from uniform_vit.train.engine import epoch_img_size

    cfg = make_config(dataset='synthetic', img_size=112, min_img_size=64, epochs=36, output='unused')
    sizes = [epoch_img_size(cfg, e) for e in range(36)]
    assert sizes[0] == 64 and sizes[-1] == 112 and sizes == sorted(sizes)  # grows, never shrinks
    assert set(sizes) == {64, 80, 96, 112} and all(s % 16 == 0 for s in sizes)  # whole 16-px stem tokens
    assert sizes.index(112) == 26  # full size from 75 % of the run: the last 10 epochs
    assert [epoch_img_size(make_config(dataset='synthetic', img_size=96, epochs=5, output='u'), e)
            for e in range(5)] == [96] * 5  # off unless asked
    late = make_config(dataset='synthetic', img_size=100, min_img_size=70, epochs=4, resize_ramp_end=1.0, output='u')
    assert [epoch_img_size(late, e) for e in range(4)] == [70, 80, 80, 100]  # 16-px steps, not below the minimum
    for bad in (dict(min_img_size=16), dict(min_img_size=128), dict(resize_ramp_end=0.0)):
        with pytest.raises(UserError, match='min_img_size|resize_ramp_end'):
            make_config(dataset='synthetic', img_size=112, output='u', **bad)


@pytest.mark.parametrize('batch_aug', ['on', 'off'])
def test_progressive_training_changes_the_batches_size(tmp_path, batch_aug, monkeypatch, capsys):
    import uniform_vit.train.engine as engine

    seen = []
    real = engine.train_loader

    def spy(*a, **k):
        for x, y in real(*a, **k):
            seen.append(x.shape[-1])
            yield x, y

    monkeypatch.setattr(engine, 'train_loader', lambda *a, **k: _Sized(spy(*a, **k), real(*a, **k)))
    out = tmp_path / batch_aug
    train(make_config(dataset='synthetic', img_size=64, min_img_size=32, epochs=3, resize_ramp_end=1.0,
                      batch_size=16, train_samples=32, val_samples=16, threads=1, progress=False, workers=0,
                      recipe='small', batch_aug=batch_aug, output=str(out)))
    assert seen == [32, 32, 48, 48, 64, 64]  # two batches an epoch, at the epoch's size
    assert 'val at 64 px (training from 32 px, at 64 px from epoch 3)' in capsys.readouterr().out  # the banner
    rows = list(csv.DictReader((out / 'metrics.csv').open()))
    assert [(r['img_size'], r['plain']) for r in rows] == [('32', '0'), ('48', '0'), ('64', '0')]


class _Sized:
    """An iterator that also answers len() as the loader it wraps (the engine asks both)."""

    def __init__(self, it, loader):
        self.it, self.n = it, len(loader)

    def __iter__(self):
        return self.it

    def __len__(self):
        return self.n


def test_plain_epochs_schedule_and_view():
    from uniform_vit.data import create_dataset
    from uniform_vit.train.engine import plain_epoch, train_aug

    cfg = make_config(dataset='synthetic', img_size=48, epochs=5, no_aug_epochs=2, hflip=0.0, reprob=1.0,
                      translate=0.2, output='u')
    assert [plain_epoch(cfg, e) for e in range(5)] == [False, False, False, True, True]
    assert not any(plain_epoch(make_config(dataset='synthetic', epochs=5, output='u'), e) for e in range(5))
    for bad in (-1, 6):
        with pytest.raises(UserError, match='no_aug_epochs'):
            make_config(dataset='synthetic', epochs=5, no_aug_epochs=bad, output='u')
    # the plain view is the evaluation view, per image and batched (to one grey level); the usual one is not
    kw = dict(img_size=48, in_chans=3, num_samples=8)
    view = torch.stack([x for x, _ in create_dataset('synthetic', 'train', train=False, **kw)])
    plain = create_dataset('synthetic', 'train', train=True, aug=train_aug(cfg, plain=True), **kw)
    assert torch.allclose(torch.stack([x for x, _ in plain]), view, atol=1e-6)
    src = BatchedSource.from_dataset(plain)
    x, _ = next(iter(src.loader(GlobalBatchSampler(8, 8, 1, 0, 0, 0, False), 8)))
    assert _off_view(x, view).max() <= 1.01 / 255 / min(plain.std)  # the batch comes in the sampler's order
    usual = create_dataset('synthetic', 'train', train=True, aug=train_aug(cfg), **kw)
    assert _off_view(torch.stack([x for x, _ in usual]), view).min() > 0.5  # erased, shifted


def _off_view(batch: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """Each image's largest pixel difference to the nearest image of ``view``."""
    return (batch[:, None] - view[None]).abs().amax(dim=(2, 3, 4)).min(dim=1).values


def test_plain_epochs_train_on_the_evaluation_view_without_mixing(tmp_path):
    import timm

    from uniform_vit.data import create_dataset

    kw = dict(dataset='synthetic', img_size=32, batch_size=16, train_samples=32, val_samples=16, threads=1,
              progress=False, workers=0, recipe='small', hflip=0.0, reprob=1.0, mixup=0.8, cutmix=1.0, epochs=2,
              no_aug_epochs=1)
    model = timm.create_model('uniform_t', num_classes=10, img_size=32)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
    s = train(make_config(**kw, output=str(tmp_path / 'run')), model=model)
    assert s['epochs'] == 2 and len(seen) == 4  # two steps an epoch; the soft-target loss gave way to the hard one
    assert [r['plain'] for r in csv.DictReader((tmp_path / 'run' / 'metrics.csv').open())] == ['0', '1']
    view = torch.stack([x for x, _ in create_dataset('synthetic', 'train', img_size=32, in_chans=3, num_samples=32)])
    assert all(_off_view(b, view).min() > 0.5 for b in seen[:2])  # erased and mixed
    assert all(_off_view(b, view).max() <= 1.01 / 255 / 0.25 for b in seen[2:])  # last epoch: the images as they are
