"""Progressive self-distillation (``--self-distill``, PS-KD): the targets it mixes, the table it keeps, its place
in checkpoints and resumes, DDP, and its clear errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from test_train import DDP_EXACT, max_param_diff, torchrun_two, weights
from uniform_vit.errors import UserError
from uniform_vit.train.config import make_config
from uniform_vit.train.distributed import DistInfo
from uniform_vit.train.engine import CHECKPOINT, train
from uniform_vit.train.self_distill import SelfDistill

TINY = dict(dataset='synthetic', img_size=32, batch_size=16, train_samples=64, val_samples=32, threads=1,
            progress=False, workers=0, recipe='small')
ONE = DistInfo(device=torch.device('cpu'))


def _rows(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_targets_mix_the_smoothed_label_with_last_epochs_own_prediction():
    sd = SelfDistill(num_samples=4, num_classes=3, alpha=0.8, smoothing=0.3)
    y = torch.tensor([0, 2, 1, 1])
    smoothed = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    idx = torch.arange(4)
    # nothing recorded yet: the smoothed labels alone, whatever alpha
    assert torch.allclose(sd.targets(idx, y, 0.5), smoothed)
    # image 1 is seen twice this epoch (the sampler's padding): its table row is the mean of both predictions
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, -1.0]])
    sd.record(torch.tensor([0, 1, 1, 2]), logits)
    sd.end_epoch(ONE)
    p = logits.softmax(-1)
    expected_probs = torch.stack([p[0], (p[1] + p[2]) / 2, p[3]])
    assert torch.allclose(sd.probs[:3], expected_probs, atol=1e-6)
    assert sd.known.tolist() == [True, True, True, False]
    t = sd.targets(idx, y, 0.5)
    assert torch.allclose(t[:3], 0.5 * smoothed[:3] + 0.5 * expected_probs, atol=1e-6)
    assert torch.allclose(t[3], smoothed[3])  # image 3 has no prediction yet
    assert torch.allclose(t.sum(1), torch.ones(4))
    # a later epoch that does not see image 0 keeps its older prediction and replaces the others'
    sd.record(torch.tensor([1]), torch.tensor([[5.0, 0.0, 0.0]]))
    sd.end_epoch(ONE)
    assert torch.allclose(sd.probs[0], expected_probs[0]) and sd.probs[1].argmax() == 0
    # the teacher's weight rises linearly to alpha at the last epoch
    assert [round(sd.alpha_at(e, 4), 6) for e in range(4)] == [0.2, 0.4, 0.6, 0.8]


def test_table_round_trips_and_bad_values_are_refused():
    sd = SelfDistill(5, 2, 0.5)
    sd.record(torch.arange(5), torch.randn(5, 2))
    sd.end_epoch(ONE)
    other = SelfDistill(5, 2, 0.5)
    other.load_state_dict(sd.state_dict())
    assert torch.equal(other.probs, sd.probs) and torch.equal(other.known, sd.known)
    with pytest.raises(ValueError, match='does not fit'):
        SelfDistill(6, 2, 0.5).load_state_dict(sd.state_dict())
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match='alpha'):
            SelfDistill(5, 2, bad)
    with pytest.raises(UserError, match=r'self_distill must be in \[0, 1\]'):
        make_config(**TINY, self_distill=-0.1, output='u')
    with pytest.raises(UserError, match='does not combine with Mixup/CutMix'):
        make_config(**{**TINY, 'recipe': 'paper'}, self_distill=0.8, output='u')


def test_training_uses_the_table_from_the_second_epoch_and_a_resume_restores_it(tmp_path):
    kw = dict(**TINY, epochs=3, seed=4, matmul_precision='highest')  # exact products: the two losses' rounding
    # differs by ~1e-7, which bf16 products (the default on AMX CPUs) would carry past the 1e-5 compared below
    plain = train(make_config(**kw, output=str(tmp_path / 'plain')))
    sd = train(make_config(**kw, self_distill=0.8, keep_every=1, output=str(tmp_path / 'sd')))
    assert (plain['config']['self_distill'], sd['config']['self_distill']) == (0.0, 0.8)
    a, b = _rows(tmp_path / 'plain' / 'metrics.csv'), _rows(tmp_path / 'sd' / 'metrics.csv')
    assert [float(r['distill_alpha']) for r in b] == pytest.approx([0.8 / 3, 1.6 / 3, 0.8], abs=1e-6)
    assert [float(r['distill_alpha']) for r in a] == [0.0, 0.0, 0.0]
    # epoch 1 has no predictions yet: the same targets as label smoothing, so the same loss
    assert float(b[0]['train_loss']) == pytest.approx(float(a[0]['train_loss']), abs=1e-5)
    # from epoch 2 the targets include the model's own predictions
    assert abs(float(b[1]['train_loss']) - float(a[1]['train_loss'])) > 1e-3
    table = torch.load(tmp_path / 'sd' / CHECKPOINT, weights_only=True)['self_distill']
    assert table['known'].all() and torch.allclose(table['probs'].sum(1), torch.ones(64))
    assert torch.load(tmp_path / 'plain' / CHECKPOINT, weights_only=True)['self_distill'] is None
    # resumed from epoch 1's checkpoint, the run ends exactly where the whole run did: the table came back with it
    train(make_config(**kw, self_distill=0.8, resume=str(tmp_path / 'sd' / 'checkpoint_epoch1.pth'),
                      output=str(tmp_path / 'resumed')))
    c = _rows(tmp_path / 'resumed' / 'metrics.csv')
    assert [(r['train_loss'], r['top1']) for r in c] == [(r['train_loss'], r['top1']) for r in b]
    w_sd, w_res = weights(tmp_path / 'sd' / 'model_last.safetensors'), weights(tmp_path / 'resumed' /
                                                                               'model_last.safetensors')
    assert all(torch.equal(w_sd[k], w_res[k]) for k in w_sd)


def test_self_distillation_forked_into_a_run_without_it(tmp_path):
    kw = dict(**TINY, seed=2)
    train(make_config(**kw, epochs=1, output=str(tmp_path / 'a')))
    # typed at a resume, before the saved settings fill in the rest (the defaults' Mixup must not be held against it)
    cfg = make_config(resume=str(tmp_path / 'a' / CHECKPOINT), self_distill=0.5, epochs=3, progress=False,
                      output=str(tmp_path / 'fork'))
    s = train(cfg)
    assert s['config']['self_distill'] == 0.5 and s['config']['mixup'] == 0.0
    rows = _rows(tmp_path / 'fork' / 'metrics.csv')
    assert len(rows) == 3 and float(rows[-1]['distill_alpha']) == 0.5
    # a run whose saved recipe mixes images is refused once its settings are known
    train(make_config(**{**TINY, 'recipe': 'paper'}, epochs=1, seed=2, output=str(tmp_path / 'mixed')))
    with pytest.raises(UserError, match='does not combine with Mixup/CutMix'):
        train(make_config(resume=str(tmp_path / 'mixed' / CHECKPOINT), self_distill=0.5, epochs=2,
                          output=str(tmp_path / 'refused')))


def test_torchrun_two_gloo_processes_share_the_table(tmp_path):
    # As test_train's DDP check (DDP_EXACT), with self-distillation over three epochs: 2 processes must match 1
    # process with 2 accumulated micro-batches only if every rank's table holds the predictions for all images,
    # including those the other rank trained on.
    same = dict(DDP_EXACT, epochs=3, self_distill=1.0, matmul_precision='highest')
    out = tmp_path / 'ddp'
    r = torchrun_two(out, **same)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / 'summary.json').read_text())
    assert s['world_size'] == 2 and s['rank_weight_max_diff'] == 0.0
    single = tmp_path / 'single'
    train(make_config(**{**TINY, **same}, grad_accum=2, output=str(single)))
    assert max_param_diff(single, out) < 1e-4
    t_ddp = torch.load(out / CHECKPOINT, weights_only=True)['self_distill']
    t_one = torch.load(single / CHECKPOINT, weights_only=True)['self_distill']
    assert t_ddp['known'].all() and torch.allclose(t_ddp['probs'], t_one['probs'], atol=1e-4)
