"""Sharpness-aware minimisation (``--sam-rho``, ``--sam-epochs``): the step's gradient, the restored weights and
BatchNorm statistics, the trainer's late-phase switch and its clear errors."""

from __future__ import annotations

import copy
import csv
import hashlib

import pytest
import torch
import torch.nn as nn

from uniform_vit.errors import UserError
from uniform_vit.train.config import make_config
from uniform_vit.train.engine import CHECKPOINT, TrainingDiverged, train
from uniform_vit.train.sam import SharpnessAware

TINY = dict(dataset='synthetic', img_size=32, batch_size=16, train_samples=64, val_samples=32, threads=1,
            progress=False, workers=0, recipe='small')


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def _grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    net.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(x), y).backward()
    return [p.grad.clone() for p in net.parameters()]


def test_sam_gradient_is_taken_at_the_ascended_point_and_weights_and_bn_stats_come_back():
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    net, rho = _net().train(), 0.3
    w0 = [p.detach().clone() for p in net.parameters()]
    g = _grads(net, x, y)  # first pass: moves the BN running stats once
    stats = [b.clone() for b in net[1].buffers()]
    # what SAM's gradient should be: the plain gradient at w + rho g / |g|, from a copy moved there by hand
    norm = torch.linalg.vector_norm(torch.stack([gi.norm() for gi in g]))
    moved = copy.deepcopy(net)
    with torch.no_grad():
        for p, gi in zip(moved.parameters(), g):
            p.add_(rho * gi / norm)
    expected = _grads(moved, x, y)

    with SharpnessAware(net, rho).ascended():
        assert all(p.grad is None for p in net.parameters())  # cleared for the second pass
        assert not torch.equal(next(net.parameters()), w0[0])  # really moved
        nn.functional.cross_entropy(net(x), y).backward()
        assert not torch.equal(net[1].running_mean, stats[0])  # the second pass moved the stats too ...
    for p, w, e in zip(net.parameters(), w0, expected):
        assert torch.equal(p, w)  # ... the weights are the old ones bit for bit
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)  # holding the gradient from the moved point
    for b, s in zip(net[1].buffers(), stats):
        assert torch.equal(b, s)  # ... and the running stats are as the first pass left them
    # the SAM gradient is not the plain one (else the test above could not tell them apart)
    assert max((p.grad - gi).abs().max().item() for p, gi in zip(net.parameters(), g)) > 1e-4


def test_sam_rho_must_be_positive():
    with pytest.raises(ValueError, match='rho'):
        SharpnessAware(_net(), 0.0)


def test_late_phase_sam_changes_only_its_epochs_and_is_recorded(tmp_path, capsys):
    kw = dict(**TINY, epochs=2, seed=1)
    train(make_config(**kw, output=str(tmp_path / 'plain')))
    train(make_config(**kw, sam_rho=0.05, sam_epochs=1, output=str(tmp_path / 'sam')))
    assert 'SAM rho 0.05 in the last 1' in capsys.readouterr().out
    rows = {d: list(csv.DictReader((tmp_path / d / 'metrics.csv').open())) for d in ('plain', 'sam')}
    assert [r['sam'] for r in rows['sam']] == ['0', '1'] and [r['sam'] for r in rows['plain']] == ['0', '0']
    # epoch 1 is the same run to the last digit; epoch 2's steps took the sharpness-aware gradient
    assert rows['sam'][0]['train_loss'] == rows['plain'][0]['train_loss']
    assert rows['sam'][0]['top1'] == rows['plain'][0]['top1']
    last = {d: torch.load(tmp_path / d / 'checkpoint.pth', weights_only=True)['model'] for d in ('plain', 'sam')}
    assert any(not torch.equal(last['plain'][k], v) for k, v in last['sam'].items() if v.is_floating_point())
    # every epoch when --sam-epochs is not given
    train(make_config(**kw, sam_rho=0.05, output=str(tmp_path / 'all')))
    assert [r['sam'] for r in csv.DictReader((tmp_path / 'all' / 'metrics.csv').open())] == ['1', '1']


def test_a_non_finite_loss_at_the_ascended_point_stops_the_run_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / 'run'
    train(make_config(**TINY, epochs=1, output=str(out)))
    good = hashlib.sha256((out / CHECKPOINT).read_bytes()).hexdigest()
    # the weights as they are give a finite loss; moved 1e30 along the gradient they cannot: the second pass's check
    with pytest.raises(TrainingDiverged, match=r'loss is (nan|inf|-inf) at epoch 2, step 1:'):
        train(make_config(output=str(out), resume=True, epochs=2, sam_rho=1e30, progress=False, dataset='synthetic'))
    assert hashlib.sha256((out / CHECKPOINT).read_bytes()).hexdigest() == good


@pytest.mark.parametrize('bad, match', [
    (dict(sam_rho=-0.1), 'sam_rho must be'),
    (dict(sam_rho=0.05, sam_epochs=0), 'sam_epochs must be'),
    (dict(sam_rho=0.05, sam_epochs=5), 'sam_epochs must be'),
    (dict(sam_rho=0.05, grad_accum=2), 'grad-accum'),
    (dict(sam_rho=0.05, amp='fp16'), 'fp16'),
])
def test_sam_settings_that_cannot_work_are_clear_errors(bad, match):
    with pytest.raises(UserError, match=match):
        make_config(**TINY, epochs=3, output='unused', **bad)
