"""Test-time augmentation (``--tta flip``): the mirror average by hand, through evaluate, val and predict."""

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

from uniform_vit import save_checkpoint
from uniform_vit.errors import UserError
from uniform_vit.train.engine import evaluate
from uniform_vit.utils.tta import check_tta, log_probs


def _linear(num_classes=4, size=6):
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, num_classes)).eval()


def test_flip_is_the_mean_of_both_views_probabilities():
    model, x = _linear(), torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        want = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
        got = log_probs(model, x, 'flip').exp()
        single = log_probs(model, x, 'none').exp()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(single, model(x).softmax(-1).detach())
    assert not torch.allclose(got, single, atol=1e-3)  # the mirror really changes the scores of a linear map


def test_unknown_mode_is_a_clear_error():
    assert check_tta(None) == 'none'
    with pytest.raises(UserError, match="unknown test-time augmentation 'rotate'; choose one of: none, flip"):
        check_tta('rotate')


def test_evaluate_scores_the_averaged_prediction():
    model = _linear()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 1, 6, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    res = evaluate(model, loader, 4, torch.device('cpu'), tta='flip')
    with torch.no_grad():
        p = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
    assert res['top1'] == pytest.approx(100.0 * float((p.argmax(1) == y).float().mean()))
    assert res['loss'] == pytest.approx(float(nn.functional.nll_loss(p.log(), y)), rel=1e-5)
    plain = evaluate(model, loader, 4, torch.device('cpu'))
    assert plain['loss'] == pytest.approx(float(nn.functional.cross_entropy(model(x), y).detach()), rel=1e-5)
    assert plain['loss'] != pytest.approx(res['loss'], rel=1e-3)


def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'uniform_vit.cli.main', *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_predict_and_val_take_tta_and_reject_bad_modes(tmp_path):
    ckpt = save_checkpoint(timm.create_model('uniform_t', num_classes=3, in_chans=1), tmp_path / 'm.safetensors',
                           meta={'model': 'uniform_t', 'in_chans': 1, 'img_size': 64, 'labels': ['a', 'b', 'c']})
    img = tmp_path / 'x.png'
    Image.fromarray((np.random.rand(28, 28) * 255).astype('uint8')).save(img)
    r = _cli('predict', img, '--checkpoint', ckpt, '--tta', 'flip', '--json')
    assert r.returncode == 0, r.stderr
    top = json.loads(r.stdout)[0]['top']
    assert sum(t['prob'] for t in top) == pytest.approx(1.0, abs=1e-3)
    for cmd in (('predict', img, '--checkpoint', ckpt), ('val', '--checkpoint', ckpt, '--dataset', 'synthetic')):
        r = _cli(*cmd, '--tta', 'rotate')
        assert r.returncode == 2 and "unknown test-time augmentation 'rotate'" in r.stderr, r.stderr
        assert 'Traceback' not in r.stderr


def test_val_reports_the_mode(tmp_path):
    from uniform_vit.cli.val import validate

    m = timm.create_model('uniform_t', num_classes=4, in_chans=3)
    for p in m.get_classifier().parameters():  # the head starts at zero: every view would score 1/4 per class
        nn.init.normal_(p)
    ckpt = save_checkpoint(m, tmp_path / 'm.safetensors', meta={'model': 'uniform_t', 'img_size': 64,
                                                               'dataset': 'synthetic'})
    plain = validate(str(ckpt), samples=16, plot=None, progress=False, batch_size=8)
    flip = validate(str(ckpt), samples=16, plot=None, progress=False, batch_size=8, tta='flip')
    assert (plain['tta'], flip['tta'], flip['n']) == ('none', 'flip', 16)
    assert flip['loss'] != pytest.approx(plain['loss'], rel=1e-6)
