"""The foundation commands through a real subprocess: help, typos, models, predict and its bad inputs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
from PIL import Image

from uniform_vit import save_checkpoint


def cli(*args, check=False):
    r = subprocess.run([sys.executable, '-m', 'uniform_vit.cli.main', *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_bare_command_prints_help_with_examples():
    r = cli(check=True)
    assert 'examples:' in r.stdout and 'uniform-vit bench' in r.stdout


def test_typo_gets_suggestion():
    r = cli('modles')
    assert r.returncode == 2 and "did you mean 'models'" in r.stderr


def test_models_json():
    rows = json.loads(cli('models', '--json', check=True).stdout)
    by = {r['model']: r for r in rows}
    assert set(by) == {'uniform_t', 'uniform_s', 'uniform_m', 'uniform_l'}
    assert by['uniform_t']['params_m'] == pytest.approx(2.01, abs=0.01)
    assert by['uniform_t']['gmacs'] == pytest.approx(0.073, abs=0.001)
    assert by['uniform_t']['tokens_per_stage'] == [196, 49, 16]
    assert by['uniform_l']['top1'] == 76.7 and 'arXiv 2412.02344' in by['uniform_l']['top1_source']


def test_models_table_and_bad_pattern():
    assert 'uniform_s' in cli('models', 'uniform_s', check=True).stdout
    r = cli('models', 'resnet*')
    assert r.returncode == 2 and 'matches no variant' in r.stderr and 'Traceback' not in r.stderr


@pytest.fixture()
def gray_ckpt(tmp_path):
    m = timm.create_model('uniform_t', num_classes=3, in_chans=1)
    return save_checkpoint(m, tmp_path / 'fm.safetensors',
                           meta={'model': 'uniform_t', 'in_chans': 1, 'img_size': 64, 'labels': ['a', 'b', 'c']})


def test_predict_top_k_with_checkpoint_labels(tmp_path, gray_ckpt):
    img = tmp_path / 'x.png'
    Image.fromarray((np.random.rand(28, 28, 3) * 255).astype('uint8')).save(img)  # RGB into a 1-channel model
    out = json.loads(cli('predict', img, '--checkpoint', gray_ckpt, '--json', check=True).stdout)
    top = out[0]['top']
    assert len(top) == 3 and {t['label'] for t in top} == {'a', 'b', 'c'}
    assert sum(t['prob'] for t in top) == pytest.approx(1.0, abs=1e-3)


def test_predict_bad_inputs_are_one_line(tmp_path, gray_ckpt):
    bad = tmp_path / 'bad.png'
    bad.write_text('not an image')
    good = tmp_path / 'ok.png'
    Image.fromarray((np.random.rand(32, 32, 3) * 255).astype('uint8')).save(good)
    wrong = save_checkpoint(timm.create_model('uniform_s', num_classes=3), tmp_path / 's.safetensors',
                            meta={'model': 'uniform_s'})
    four = save_checkpoint(timm.create_model('uniform_t', num_classes=3, in_chans=4), tmp_path / 'c4.safetensors',
                           meta={'model': 'uniform_t', 'in_chans': 4})
    cases = [
        (('predict', bad, '--checkpoint', gray_ckpt), 'cannot read image'),
        (('predict', tmp_path / 'nope.png', '--checkpoint', gray_ckpt), 'image not found'),
        (('predict', good, '--model', 'uniform_t', '--checkpoint', wrong), 'does not fit uniform_t'),
        (('predict', good, '--checkpoint', four), 'has 3 channel(s) (RGB) but the model expects 4'),
        (('predict', good, '--model', 'unifrom_t'), "did you mean 'uniform_t'"),
        (('predict', good, '--checkpoint', gray_ckpt, '--labels', tmp_path / 'none.txt'), 'labels file not found'),
    ]
    for args, msg in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr, (msg, r.stderr)
        assert 'Traceback' not in r.stderr
        assert len([ln for ln in r.stderr.splitlines() if 'error' in ln]) == 1


def test_predict_out_of_the_box_on_real_fashion_mnist(tmp_path):
    """No --model, no --checkpoint: the bundled uniform_t Fashion-MNIST weights classify real test images."""
    from uniform_vit.data import FASHION_MNIST_CLASSES, read_idx
    from uniform_vit.data.datasets import find_fashion_mnist
    from uniform_vit.errors import UserError

    try:
        root = find_fashion_mnist(None, download=False)
    except UserError as e:
        pytest.skip(f'Fashion-MNIST not installed: {e}')
    images = read_idx(next(root.glob('t10k-images-idx3-ubyte*')))[:10]
    labels = read_idx(next(root.glob('t10k-labels-idx1-ubyte*')))[:10]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f'{i}.png')
        Image.fromarray(img).save(paths[-1])
    out = json.loads(cli('predict', *paths, '--json', check=True).stdout)
    # label names come from the checkpoint's metadata
    assert out[0]['top'][0]['label'] == FASHION_MNIST_CLASSES[labels[0]]
    correct = sum(r['top'][0]['class'] == int(y) for r, y in zip(out, labels))
    assert correct >= 8, correct  # a 91.8 % model
