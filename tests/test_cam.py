"""Grad-CAM command: right-sized, non-constant overlays for Reuse Attention and MHA, side by side, clear errors."""

import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import randomize_bn
from uniform_vit import save_checkpoint
from uniform_vit.errors import UserError

pytest.importorskip('pytorch_grad_cam')


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('cam')
    rng = np.random.default_rng(0)
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 9:19] = rng.integers(120, 255, (16, 10))  # a bright object on black, like Fashion-MNIST
    Image.fromarray(img).save(d / 'item.png')
    for attn in ('reuse', 'mha'):
        torch.manual_seed(0)
        model = randomize_bn(timm.create_model('uniform_t', num_classes=10, in_chans=1, attn_type=attn))
        save_checkpoint(model, d / f'{attn}.safetensors', {'model': 'uniform_t', 'img_size': 64, 'mean': [0.286],
                                                          'std': [0.353], 'labels': [f'c{i}' for i in range(10)]})
    return d


@pytest.mark.parametrize('attn', ['reuse', 'mha'])
def test_cam_overlay_size_and_content(tmp_path, files, attn):
    from uniform_vit.cli.cam import make_cam

    out = tmp_path / 'cam.png'
    rep = make_cam(str(files / 'item.png'), str(out), checkpoint=str(files / f'{attn}.safetensors'), target='c3')
    panel = rep['panels'][0]
    assert panel['attn_type'] == attn and panel['target'] == 3 and panel['input_size'] == 64
    assert panel['stage'] == 0  # 64 px: stage 0 is the deepest map with at least 4x4 cells
    arr = np.asarray(Image.open(out))
    assert arr.shape == (224, 224, 3)  # 28 px upscaled x8
    assert arr.std() > 5  # a heat map, not a flat colour


def test_cam_heat_map_is_not_constant(files):
    from uniform_vit.cli.cam import _load, grad_cam

    model, meta = _load(None, str(files / 'reuse.safetensors'), None)
    r = grad_cam(model, meta, str(files / 'item.png'), None, None, None)
    assert r['heat'].shape == (64, 64) and r['heat'].std() > 0.05
    last = grad_cam(model, meta, str(files / 'item.png'), None, 2, 224)  # explicit last stage at 224 px: 4x4 cells
    assert last['stage'] == 2 and last['heat'].shape == (224, 224) and last['heat'].std() > 0.01


def test_cam_compare_writes_both_panels(tmp_path, files):
    out = tmp_path / 'cmp.png'
    r = subprocess.run([sys.executable, '-m', 'uniform_vit.cli.main', 'cam', files / 'item.png', '--checkpoint',
                        files / 'reuse.safetensors', '--compare', '--compare-checkpoint', files / 'mha.safetensors',
                        '--output', out], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '(reuse)' in r.stdout and '(mha)' in r.stdout
    img = Image.open(out)
    assert img.size[0] > 2 * img.size[1]  # three panels side by side


@pytest.mark.parametrize('kwargs, message', [
    (dict(image='missing.png'), 'image not found'),
    (dict(output='x.jpg'), 'must be a .png'),
    (dict(target='c42'), "unknown class 'c42'"),
    (dict(target='11'), 'outside the model'),
    (dict(stage=5), '--stage must be 0..2'),
    (dict(compare=True, compare_ckpt='reuse'), 'holds a reuse model'),
    (dict(model_name='resnet18', checkpoint=None), 'cam supports UniForm models'),
])
def test_cam_bad_arguments(tmp_path, files, kwargs, message):
    from uniform_vit.cli.cam import make_cam

    image = str(files / kwargs.pop('image', 'item.png'))
    out = str(tmp_path / kwargs.pop('output', 'cam.png'))
    ck = kwargs.pop('compare_ckpt', None)
    if ck:
        kwargs['compare_checkpoint'] = str(files / f'{ck}.safetensors')
    kwargs.setdefault('checkpoint', str(files / 'reuse.safetensors'))
    with pytest.raises(UserError, match=message):
        make_cam(image, out, **kwargs)


def test_cam_default_weights_are_bundled_or_announced_random(tmp_path, files, capsys):
    from uniform_vit.cli.cam import make_cam
    from uniform_vit.cli.predict import bundled_checkpoint

    rep = make_cam(str(files / 'item.png'), str(tmp_path / 'cam.png'))
    err = capsys.readouterr().err
    panel = rep['panels'][0]
    if bundled_checkpoint('uniform_t') is None:
        assert 'RANDOM weights' in err and panel['checkpoint'] is None
    else:
        assert 'bundled Fashion-MNIST weights' in err and panel['checkpoint'].endswith('.safetensors')
    assert (tmp_path / 'cam.png').is_file()
