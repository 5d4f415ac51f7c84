"""Training and evaluation on tiny synthetic sets: CLI outputs, determinism, SIGKILL + resume, NaN stop, YAML vs
flags, fine-tuning with a new head, and 2-process gloo DDP under torchrun."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from uniform_vit.errors import UserError
from uniform_vit.train.config import make_config
from uniform_vit.train.engine import CHECKPOINT, TrainingDiverged, train

TINY = dict(dataset='synthetic', img_size=32, batch_size=16, train_samples=64, val_samples=32, threads=1,
            progress=False, workers=0)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}


def cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'uniform_vit.cli.main', *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def tiny_flags(out: Path, **extra) -> list[str]:
    flags = ['train', '--dataset', 'synthetic', '--img-size', '32', '--batch-size', '16', '--train-samples', '64',
             '--val-samples', '32', '--threads', '1', '--no-progress', '--workers', '0', '--output', str(out)]
    for k, v in extra.items():
        flags += [f"--{k.replace('_', '-')}", *([str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)])]
    return flags


def torchrun_two(out: Path, **extra) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 uniform-vit train` on the tiny synthetic set (gloo on CPU)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           '-m', 'uniform_vit.cli.main', *tiny_flags(out, **extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# No augmentation (each rank draws its own random numbers); SGD, whose update is linear in the gradient. Rank r gets
# the r-th slice of every global batch, so 2 processes x batch 8 must equal 1 process x batch 8 x 2 accumulated
# micro-batches (same BatchNorm batches), up to float summation order.
DDP_EXACT = dict(recipe='small', seed=5, opt='sgd', lr=0.05, weight_decay=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                 hflip=0.0, reprob=0.0, smoothing=0.0, warmup_epochs=0.0, batch_size=8)


def max_param_diff(a: Path, b: Path) -> float:
    """Largest weight difference of two runs' ``model_last.safetensors`` (BatchNorm buffers left out), after
    checking that the weights are not all zero."""
    wa, wb = weights(a / 'model_last.safetensors'), weights(b / 'model_last.safetensors')
    params = [k for k in wa if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert any(float(wa[k].abs().max()) > 0 for k in params)
    return max(float((wa[k] - wb[k]).abs().max()) for k in params)


def test_cli_train_writes_metrics_summary_curves_and_val_reads_it(tmp_path, capsys):
    out = tmp_path / 'run'
    r = cli(*tiny_flags(out, epochs=2, recipe='small', lr=3e-3))
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'epoch   2/2' in r.stdout and 'img/s' in r.stdout
    from uniform_vit.utils.malloc import _preloaded, _skip_reason  # not glibc, turned off, or tcmalloc preloaded

    assert f"malloc {(_preloaded() or 'default') if _skip_reason() else 'tuned'}" in r.stdout  # before the model
    rows = list(csv.DictReader((out / 'metrics.csv').read_text().splitlines()))
    assert [int(r['epoch']) for r in rows] == [1, 2] and all(float(r['top1']) >= 0 for r in rows)
    s = json.loads((out / 'summary.json').read_text())
    for key in ('best_top1', 'best_epoch', 'epochs', 'train_seconds', 'model', 'params'):
        assert key in s
    assert s['epochs'] == 2 and s['model'] == 'uniform_t' and s['params'] > 1e6
    assert (out / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    from uniform_vit.cli.val import validate

    # the same weights on the same 32 validation images give the training run's best top-1 again
    res = validate(str(out / 'model_best.safetensors'), samples=32, plot=str(tmp_path / 'cm.png'), progress=False)
    assert res['dataset'] == 'synthetic' and res['n'] == 32 and res['img_size'] == 32
    assert res['top1'] == pytest.approx(s['best_top1'], abs=1e-3)
    assert res['labels'][:2] == ['class_0', 'class_1'] and len(res['confusion']) == 10
    assert sum(map(sum, res['confusion'])) == 32 and 0 <= res['top1'] <= res['top5'] <= 100
    assert (tmp_path / 'cm.png').read_bytes()[:4] == b'\x89PNG'

    from uniform_vit.cli.main import main

    assert main(['val', '--checkpoint', str(out / 'model_best.safetensors'), '--samples', '32', '--json',
                 '--plot', str(tmp_path / 'cm2.png')]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed['top1'] == res['top1'] and (tmp_path / 'cm2.png').is_file()
    assert main(['val', '--checkpoint', str(tmp_path / 'missing.safetensors')]) == 2


def test_same_seed_same_result_other_seed_differs(tmp_path):
    # paper recipe: Mixup/CutMix, RandAugment, random erasing and drop-path all draw random numbers
    kw = dict(TINY, recipe='paper', epochs=2, warmup_epochs=1, drop_path=0.1, model_ema=True, train_samples=32,
              val_samples=16)
    a = train(make_config(**kw, output=str(tmp_path / 'a'), seed=3))
    b = train(make_config(**kw, output=str(tmp_path / 'b'), seed=3))
    c = train(make_config(**kw, output=str(tmp_path / 'c'), seed=4))
    wa, wb, wc = (weights(tmp_path / n / 'model_last.safetensors') for n in 'abc')
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    ma, mb = (list(csv.DictReader((tmp_path / n / 'metrics.csv').read_text().splitlines())) for n in 'ab')
    for ra, rb in zip(ma, mb):
        assert (ra['train_loss'], ra['top1'], ra['top1_ema']) == (rb['train_loss'], rb['top1'], rb['top1_ema'])
    assert a['best_top1'] == b['best_top1'] and c['epochs'] == 2


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    kw = dict(epochs=3, recipe='small', seed=7, lr=2e-3)
    ref = train(make_config(**{**TINY, **kw}, output=str(tmp_path / 'ref')))
    out = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, '-m', 'uniform_vit.cli.main', *tiny_flags(out, **kw)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (out / CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-run: the first checkpoint has just appeared
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
    assert not (out / 'summary.json').exists()
    done = torch.load(out / CHECKPOINT, weights_only=True)['epoch'] + 1
    assert 1 <= done < 3
    r = cli('train', '--output', str(out), '--resume')  # the README's form: the rest comes from the checkpoint
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'resuming from {out / CHECKPOINT}: epoch {done} of 3' in r.stdout
    w_ref, w_res = weights(tmp_path / 'ref' / 'model_last.safetensors'), weights(out / 'model_last.safetensors')
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)
    rows_ref = list(csv.DictReader((tmp_path / 'ref' / 'metrics.csv').read_text().splitlines()))
    rows_res = list(csv.DictReader((out / 'metrics.csv').read_text().splitlines()))
    assert [(r['train_loss'], r['top1']) for r in rows_ref] == [(r['train_loss'], r['top1']) for r in rows_res]
    assert json.loads((out / 'summary.json').read_text())['best_top1'] == ref['best_top1']


def test_kept_checkpoints_fork_a_variant_from_an_earlier_epoch(tmp_path):
    kw = dict(**TINY, recipe='small', epochs=3, seed=3)
    train(make_config(**kw, keep_every=2, output=str(tmp_path / 'a')))
    assert sorted(p.name for p in (tmp_path / 'a').glob('checkpoint_epoch*.pth')) == ['checkpoint_epoch2.pth']
    kept = tmp_path / 'a' / 'checkpoint_epoch2.pth'
    assert torch.load(kept, weights_only=True)['epoch'] == 1  # 0-based: two epochs done
    # the same run resumed from the kept epoch ends where the whole run ended: a variant forked there shares its past
    train(make_config(**kw, resume=str(kept), output=str(tmp_path / 'b')))
    rows = [[(r['epoch'], r['train_loss'], r['top1']) for r in csv.DictReader((tmp_path / d / 'metrics.csv').open())]
            for d in 'ab']
    assert rows[0] == rows[1] and len(rows[0]) == 3
    with pytest.raises(UserError, match='keep_every'):
        make_config(**kw, keep_every=-1, output='u')


def test_ema_turned_on_at_a_resume_starts_from_the_resumed_weights(tmp_path):
    kw = dict(**TINY, recipe='small', seed=3)
    train(make_config(**kw, epochs=1, output=str(tmp_path / 'a')))
    st = torch.load(tmp_path / 'a' / CHECKPOINT, weights_only=False)
    assert st.get('model_ema') is None
    # mark the resumed weights: a head bias far from anything the fresh initialisation (zeros) or 4 steps could reach
    st['model']['head.linear.bias'] = st['model']['head.linear.bias'] + 1.0
    fork = tmp_path / 'fork.pth'
    torch.save(st, fork)
    train(make_config(**kw, epochs=2, resume=str(fork), model_ema=True, output=str(tmp_path / 'b')))
    end = torch.load(tmp_path / 'b' / CHECKPOINT, weights_only=True)
    gap = (end['model_ema']['head.linear.bias'] - end['model']['head.linear.bias']).abs().max().item()
    # started from the fresh model, the EMA would still hold about a quarter of its zero bias after 4 warm-up updates
    assert gap < 0.1, gap


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / 'run'
    train(make_config(**TINY, recipe='small', epochs=1, output=str(out)))
    good = hashlib.sha256((out / CHECKPOINT).read_bytes()).hexdigest()
    with pytest.raises(TrainingDiverged, match=r'loss is (nan|inf|-inf) at epoch 2.*last good checkpoint: .*epoch 1'):
        train(make_config(output=str(out), resume=True, epochs=3, lr=1e30, warmup_epochs=0.0, progress=False,
                          dataset='synthetic'))
    assert hashlib.sha256((out / CHECKPOINT).read_bytes()).hexdigest() == good
    assert torch.load(out / CHECKPOINT, weights_only=True)['epoch'] == 0


def test_yaml_config_and_typed_flags_win(tmp_path, capsys):
    y = tmp_path / 'c.yaml'
    y.write_text('recipe: small\nepochs: 7\nimg-size: 48\nlr: 0.01\nscale: [0.5, 1.0]\ndataset: synthetic\n')
    cfg = make_config(y, epochs=3)
    assert (cfg.epochs, cfg.img_size, cfg.lr, cfg.scale, cfg.recipe) == (3, 48, 0.01, (0.5, 1.0), 'small')
    assert cfg.mixup == 0.0 and cfg.aa is None  # the recipe's values under the file's
    assert make_config(dataset='synthetic').mixup == 0.8  # paper recipe by default

    from uniform_vit.cli.main import build_parser

    args = build_parser().parse_args(['train', '--config', str(y), '--epochs', '3', '--no-model-ema'])
    typed = {k for k in vars(args) if not k.startswith('_') and k != 'command'}
    assert typed == {'config', 'epochs', 'model_ema'}  # untyped flags must not shadow the file
    y.write_text('epohcs: 3\n')
    with pytest.raises(UserError, match='did you mean epochs'):
        make_config(y)
    from uniform_vit.cli.main import main

    assert main(['train', '--dataset', 'synthetic', '--img-size', '16', '--output', str(tmp_path / 'x')]) == 2
    err = capsys.readouterr().err
    assert err.strip().count('\n') == 0 and 'at least 32' in err
    assert main(['train', '--dataset', 'synthetic', '--translate', '0.6', '--output', str(tmp_path / 'x')]) == 2
    assert 'translate must be in [0, 0.5)' in capsys.readouterr().err
    assert make_config(dataset='synthetic', translate=0.1).translate == 0.1
    for bad in (-0.1, 1.0):
        with pytest.raises(UserError, match=r'drop_path must be in \[0, 1\)'):
            make_config(dataset='synthetic', drop_path=bad)
    assert make_config(dataset='synthetic', drop_path=0.1).drop_path == 0.1


def test_shipped_configs_load(tmp_path):
    """Every file in configs/ loads, and its values are what the run gets (a misspelt key fails here, not for users)."""
    from uniform_vit.train.config import _coerce, load_yaml

    files = sorted((Path(__file__).parents[1] / 'configs').glob('*.yaml'))
    assert {f.name for f in files} >= {'fashion_mnist.yaml', 'paper.yaml'}
    for f in files:
        values = load_yaml(f)
        # paper.yaml is run with --data-dir (its header says so)
        cfg = make_config(f, **({} if {'dataset', 'data_dir'} & set(values) else {'data_dir': str(tmp_path)}))
        for key, value in values.items():
            assert getattr(cfg, key) == _coerce(key, value), (f.name, key)


def test_finetune_with_other_class_count_reinitialises_head(tmp_path):
    train(make_config(**TINY, recipe='small', epochs=1, output=str(tmp_path / 'src')))
    src = weights(tmp_path / 'src' / 'model_best.safetensors')
    s = train(make_config(**TINY, recipe='small', epochs=1, num_classes=4, lr=1e-12, warmup_epochs=0.0, min_lr=0.0,
                          checkpoint=str(tmp_path / 'src' / 'model_best.safetensors'), output=str(tmp_path / 'ft')))
    ft = weights(tmp_path / 'ft' / 'model_last.safetensors')
    assert s['num_classes'] == 4 and ft['head.linear.weight'].shape == (4, src['head.linear.weight'].shape[1])
    body = [k for k in src if k.endswith('weight') and not k.startswith('head') and src[k].dim() > 1]
    assert body and all(torch.allclose(src[k], ft[k], atol=1e-6) for k in body)  # body loaded, barely moved
    with pytest.raises(UserError, match='does not fit'):
        train(make_config(**TINY, epochs=1, model='uniform_s', output=str(tmp_path / 'bad'),
                          checkpoint=str(tmp_path / 'src' / 'model_best.safetensors')))


def test_opt_picks_timm_optimiser_with_its_own_weight_decay(tmp_path):
    # --opt sgd: timm's SGD with Nesterov momentum (--momentum, not timm's 0.9 here), weight decay on the weights
    # only (none on norms and biases)
    train(make_config(**TINY, recipe='small', epochs=1, opt='sgd', lr=0.1, weight_decay=5e-4, momentum=0.8,
                      output=str(tmp_path / 'sgd')))
    groups = torch.load(tmp_path / 'sgd' / CHECKPOINT, weights_only=False)['optimizer']['param_groups']
    assert all(g['nesterov'] and g['momentum'] == 0.8 and 'betas' not in g for g in groups)
    assert sorted(g['weight_decay'] for g in groups) == [0.0, 5e-4]
    assert all(g['fused'] for g in groups)  # torch's fused step (one kernel over all parameters)
    train(make_config(**TINY, recipe='small', epochs=1, opt='lamb', output=str(tmp_path / 'lamb')))
    groups = torch.load(tmp_path / 'lamb' / CHECKPOINT, weights_only=False)['optimizer']['param_groups']
    assert all('fused' not in g for g in groups)  # timm's own optimisers have no fused form: not asked for one
    with pytest.raises(UserError, match=r'momentum must be in \[0, 1\), got 1.5'):
        make_config(**TINY, epochs=1, opt='sgd', momentum=1.5)
    with pytest.raises(UserError, match="unknown optimiser 'sgdd'.*did you mean sgd"):
        make_config(**TINY, epochs=1, opt='sgdd')
    assert make_config(**TINY, epochs=1, opt='Lookahead_AdamW').opt == 'Lookahead_AdamW'  # timm's wrapper form
    with pytest.raises(UserError, match="unknown optimiser 'lookahead_adamx'"):
        make_config(**TINY, epochs=1, opt='lookahead_adamx')


def test_opt_muon_routes_matrices_and_fallback_and_resumes_exactly(tmp_path):
    # --opt muon: timm's Muon (momentum orthogonalised by Newton-Schulz) on the 2-d and dense conv weights, its AdamW
    # fallback on norms, biases, depthwise kernels and the attention bias tables; both kinds of state checkpointed
    kw = dict(**TINY, recipe='small', epochs=2, seed=4, opt='muon', lr=4e-3)
    train(make_config(**kw, keep_every=1, output=str(tmp_path / 'a')))
    opt_state = torch.load(tmp_path / 'a' / CHECKPOINT, weights_only=False)['optimizer']
    state = opt_state['state']
    # the defaults reach timm
    assert all(g['momentum'] == 0.9 and g['betas'] == (0.9, 0.999) for g in opt_state['param_groups'])
    kinds = {s['use_muon'] for s in state.values()}
    assert kinds == {True, False}
    assert all(('momentum_buffer' in s) == s['use_muon'] and ('exp_avg_sq' in s) != s['use_muon']
               for s in state.values())
    train(make_config(**kw, resume=str(tmp_path / 'a' / 'checkpoint_epoch1.pth'), output=str(tmp_path / 'b')))
    assert max_param_diff(tmp_path / 'a', tmp_path / 'b') == 0


def test_ns_steps_reaches_timms_muon_and_is_refused_elsewhere(tmp_path):
    kw = dict(**TINY, recipe='small', epochs=1, seed=4, lr=4e-3)
    train(make_config(**kw, opt='muon', ns_steps=3, output=str(tmp_path / 'ns3')))
    groups = torch.load(tmp_path / 'ns3' / CHECKPOINT, weights_only=False)['optimizer']['param_groups']
    assert all(g['ns_steps'] == 3 for g in groups)
    train(make_config(**kw, opt='muon', output=str(tmp_path / 'ns5')))
    assert max_param_diff(tmp_path / 'ns3', tmp_path / 'ns5') > 0  # fewer iterations, other updates
    with pytest.raises(UserError, match=r"ns_steps \(Newton-Schulz iterations\) applies to --opt .*muon.* not 'adamw'"):
        make_config(**kw, opt='adamw', ns_steps=3)
    with pytest.raises(UserError, match='ns_steps must be at least 1, got 0'):
        make_config(**kw, opt='muon', ns_steps=0)


def test_a_fork_keeps_the_optimiser_settings_it_was_given(tmp_path, capsys):
    # --resume brings back the saved moments, not the saved settings: a fork's typed --momentum / --ns-steps hold
    kw = dict(**TINY, recipe='small', seed=4, opt='muon', lr=4e-3)
    train(make_config(**kw, epochs=1, output=str(tmp_path / 'a')))
    start = tmp_path / 'a' / CHECKPOINT
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    first: dict[str, float] = {}  # each run's first step's learning rate

    def record(name: str):
        def hook(opt, args, kwargs):
            first.setdefault(name, opt.param_groups[0]['lr'])
        return register_optimizer_step_pre_hook(hook)

    hook = record('same')
    train(make_config(**kw, epochs=2, resume=str(start), output=str(tmp_path / 'same')))
    hook.remove()
    train(make_config(**kw, epochs=2, resume=str(start), ns_steps=2, momentum=0.8, output=str(tmp_path / 'fork')))
    opt = torch.load(tmp_path / 'fork' / CHECKPOINT, weights_only=False)['optimizer']
    assert all(g['ns_steps'] == 2 and g['momentum'] == 0.8 for g in opt['param_groups'])
    assert any('momentum_buffer' in s for s in opt['state'].values())
    assert max_param_diff(tmp_path / 'same', tmp_path / 'fork') > 0
    # another optimiser at the fork: its own fresh state, not the other's moments
    capsys.readouterr()
    hook = record('adamw')
    train(make_config(**{**kw, 'opt': 'adamw'}, epochs=2, resume=str(start), output=str(tmp_path / 'adamw')))
    hook.remove()
    assert '--opt adamw at a resume of a muon run: its optimiser starts fresh' in capsys.readouterr().out
    opt = torch.load(tmp_path / 'adamw' / CHECKPOINT, weights_only=False)['optimizer']
    assert opt['state'] and all('exp_avg_sq' in s and 'momentum_buffer' not in s for s in opt['state'].values())
    # and it takes its first step at the schedule's rate, the one a plain resume restores, not at the warm-up rate
    assert first['adamw'] == pytest.approx(first['same'], rel=1e-9) and first['same'] > 1e-3


@pytest.mark.parametrize('channels_last', [True, False])
def test_channels_last_applies_on_cpu_and_checkpoints_load_either_way(tmp_path, channels_last):
    import timm

    model = timm.create_model('uniform_t', num_classes=10)
    s = train(make_config(**TINY, recipe='small', epochs=1, channels_last=channels_last,
                          output=str(tmp_path / 'run')), model=model)
    # dense k x k convs only: a depthwise (C, 1, k, k) or 1x1 weight is contiguous in both formats
    convs = [m.weight for m in model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in convs)
    from uniform_vit.cli.val import validate

    res = validate(str(tmp_path / 'run' / 'model_best.safetensors'), samples=32, progress=False)
    assert res['top1'] == pytest.approx(s['best_top1'], abs=1e-3)


def test_matmul_precision_holds_in_the_training_steps_only(tmp_path, capsys):
    """--matmul-precision medium: every training forward runs under torch's 'medium' fp32 products, every evaluation
    forward and whatever runs after train() under the caller's setting, which is restored."""
    import timm

    model = timm.create_model('uniform_t', num_classes=10)
    seen: list[tuple[bool, str]] = []
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.get_float32_matmul_precision())))
    before = torch.get_float32_matmul_precision()
    train(make_config(**TINY, recipe='small', epochs=2, matmul_precision='medium', output=str(tmp_path / 'run')),
          model=model)
    assert {p for training, p in seen if training} == {'medium'}
    assert {p for training, p in seen if not training} == {before} == {'highest'}
    assert sum(training for training, _ in seen) == 2 * 64 // 16 and len(seen) > 2 * 64 // 16  # both kinds ran
    assert torch.get_float32_matmul_precision() == before
    assert 'fp32 matmul precision medium' in capsys.readouterr().out  # the banner says so
    from uniform_vit.cli.main import main

    assert main(['train', '--dataset', 'synthetic', '--matmul-precision', 'low', '--output', str(tmp_path / 'x')]) == 2
    assert 'matmul_precision must be auto, highest, high or medium' in capsys.readouterr().err


def test_matmul_precision_auto_takes_bf16_products_on_amx_cpus_only(tmp_path, capsys, monkeypatch):
    import uniform_vit.train.engine as engine

    assert isinstance(engine.cpu_has_amx(), bool)  # this machine's answer, whichever it is
    assert make_config(**TINY, output='u').matmul_precision == 'auto'  # the default
    cpu, gpu = torch.device('cpu'), torch.device('cuda')
    for amx in (True, False):
        monkeypatch.setattr(engine, 'cpu_has_amx', lambda amx=amx: amx)
        assert engine.resolve_matmul_precision('auto', cpu) == ('medium' if amx else 'highest')
        assert engine.resolve_matmul_precision('auto', gpu) == 'highest'  # GPUs: --amp is the switch there
        for typed in ('highest', 'high', 'medium'):  # a typed precision is kept as it is
            assert engine.resolve_matmul_precision(typed, cpu) == typed
    monkeypatch.setattr(engine, 'cpu_has_amx', lambda: True)
    seen: list[str] = []
    import timm

    model = timm.create_model('uniform_t', num_classes=10)
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_float32_matmul_precision()) if m.training
                                    else None)
    train(make_config(**TINY, recipe='small', epochs=1, matmul_precision='auto', output=str(tmp_path / 'run')),
          model=model)
    assert set(seen) == {'medium'} and torch.get_float32_matmul_precision() == 'highest'
    assert 'fp32 matmul precision medium (auto: AMX)' in capsys.readouterr().out
    monkeypatch.setattr(engine, 'cpu_has_amx', lambda: False)  # no AMX: exact fp32, and the banner says nothing
    seen.clear()
    train(make_config(**TINY, recipe='small', epochs=1, matmul_precision='auto', output=str(tmp_path / 'run2')),
          model=model)
    out = capsys.readouterr().out
    assert set(seen) == {'highest'} and 'matmul precision' not in out and 'AMX' not in out


def test_compiled_training_step_matches_eager_and_saves_plain_keys(tmp_path):
    class Tiny(torch.nn.Module):  # compiles in seconds; the wiring, not inductor, is under test
        num_classes = 10

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)  # a bias before BN gets only
            # rounding-noise gradients, which AdamW turns into full steps: eager and compiled would drift apart
            self.bn = torch.nn.BatchNorm2d(8)
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    from torch._dynamo.utils import counters

    runs, graphs = {}, {}
    for compiled in (False, True):
        counters.clear()
        torch.manual_seed(0)
        out = tmp_path / f'c{int(compiled)}'
        s = train(make_config(**TINY, recipe='small', epochs=2, lr=1e-2, compile=compiled, output=str(out)),
                  model=Tiny())
        runs[compiled] = (s, weights(out / 'model_last.safetensors'))
        graphs[compiled] = counters['stats']['unique_graphs']
    assert graphs[False] == 0 and graphs[True] >= 1  # the compiled run really went through torch.compile
    (se, we), (sc, wc) = runs[False], runs[True]
    assert sc['config']['compile'] and not se['config']['compile']
    assert set(wc) == set(we) and not any('_orig_mod' in k for k in wc)
    assert all(torch.allclose(we[k].float(), wc[k].float(), atol=1e-4) for k in we)
    assert any(not torch.equal(we[k], Tiny().state_dict()[k]) for k in we if k.endswith('weight'))  # it trained


def test_compile_without_a_cpu_compiler_is_a_clear_error(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, 'which', lambda name: None)
    with pytest.raises(UserError, match='needs a C\\+\\+ compiler'):
        train(make_config(**TINY, recipe='small', epochs=1, compile=True, output=str(tmp_path / 'run')))


def test_gpu_process_group_also_reduces_cpu_tensors(monkeypatch):
    # The trainer reduces CPU tensors on GPU runs too (the non-finite-loss flag every step, loss sums, evaluation
    # counts), which NCCL alone refuses; the group must carry gloo for them. No GPU here: the wiring is checked.
    from uniform_vit.train import distributed as d

    seen: list[str] = []
    monkeypatch.setattr(d.dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(d.dist, 'init_process_group', lambda backend: seen.append(backend))
    monkeypatch.setattr(d.torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(d.torch.cuda, 'set_device', lambda dev: None)
    for k, v in dict(WORLD_SIZE='2', RANK='1', LOCAL_RANK='1').items():
        monkeypatch.setenv(k, v)
    info = d.init_distributed('auto')
    assert info.device == torch.device('cuda', 1) and info.rank == 1 and info.enabled
    assert d.init_distributed('cpu').device.type == 'cpu'
    assert seen == ['cpu:gloo,cuda:nccl', 'gloo']


def test_torchrun_two_gloo_processes_match_single_process(tmp_path):
    same = dict(DDP_EXACT, epochs=2)
    out = tmp_path / 'ddp'
    r = torchrun_two(out, **same)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / 'summary.json').read_text())
    assert s['world_size'] == 2 and s['total_batch'] == 16
    assert s['rank_weight_max_diff'] == 0.0  # both ranks hold identical weights (and BN statistics)
    single = tmp_path / 'single'
    s1 = train(make_config(**{**TINY, **same}, grad_accum=2, output=str(single)))
    assert s1['total_batch'] == 16
    moved = max_param_diff(single, out)
    assert moved < 1e-4, moved


def test_torchrun_two_gloo_processes_with_sam_stay_in_step(tmp_path):
    # SAM under DDP: each step runs forward/backward twice (the second at w + rho g / |g| from the all-reduced
    # gradient), restores the weights and BN statistics, then steps. Both ranks must end with identical weights, and
    # every epoch must have taken SAM steps.
    out = tmp_path / 'ddp_sam'
    r = torchrun_two(out, recipe='small', epochs=2, seed=3, sam_rho=0.05)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / 'summary.json').read_text())
    assert s['world_size'] == 2 and s['config']['sam_rho'] == 0.05
    assert s['rank_weight_max_diff'] == 0.0
    with (out / 'metrics.csv').open() as fh:
        assert [row['sam'] for row in csv.DictReader(fh)] == ['1', '1']


def test_epochs_in_budget_fits_caps_and_keeps_the_runs_shape():
    from uniform_vit.train.engine import epochs_in_budget

    def n(first_s: float, **kw) -> tuple[int, int]:
        return epochs_in_budget(make_config(**TINY, **{'epochs': 53, 'time_budget': 60.0, **kw}), first_s)

    assert n(121.0) == (29, 29)  # 3600 s // 121 s
    assert n(60.0) == (53, 60)  # at most --epochs
    assert n(4000.0) == (1, 0)  # over budget already: the one epoch trained
    assert n(4000.0, no_aug_epochs=7) == (8, 0)  # an augmented first epoch, then the 7 plain ones
    assert n(4000.0, no_aug_epochs=53) == (53, 0)  # all plain: the count stays
    assert n(4000.0, sam_rho=0.05, sam_epochs=5) == (5, 0)
    with pytest.raises(UserError, match='time_budget must be a positive number of minutes'):
        make_config(**TINY, time_budget=0)
    import argparse

    from uniform_vit.cli.train import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(['--time-budget', '45.5']).time_budget == 45.5


def test_time_budget_sets_the_epochs_and_schedule_after_the_first(tmp_path, capsys):
    # a budget nothing fits in: the fewest epochs the run's shape allows (one augmented, one plain), said so; the
    # first epoch is validated whatever --val-every says (its time is what the budget is divided by)
    kw = dict(**{**TINY, 'train_samples': 128}, recipe='small', seed=3, lr=3e-3, no_aug_epochs=1)  # 8 steps: 3 warm
    s = train(make_config(**kw, epochs=5, val_every=4, time_budget=1e-6, keep_every=1, output=str(tmp_path / 'b')))
    out = capsys.readouterr().out
    assert 'up to 5 epochs, as many as fit 1e-06 min (the last 1 plain)' in out
    assert 'time budget 1e-06 min: an epoch takes' in out
    assert 'so the run holds 2 epochs; 2 is the fewest this run' in out and 'epoch   2/2' in out
    assert s['epochs'] == 2 and s['config']['epochs'] == 2 and s['config']['time_budget'] == 1e-6
    rows = list(csv.DictReader((tmp_path / 'b' / 'metrics.csv').read_text().splitlines()))
    assert [r['plain'] for r in rows] == ['0', '1'] and all(r['top1'] for r in rows)
    # from the second epoch on, the schedule is a 2-epoch run's
    ref = train(make_config(**kw, epochs=2, output=str(tmp_path / 'ref')))
    ref_rows = list(csv.DictReader((tmp_path / 'ref' / 'metrics.csv').read_text().splitlines()))
    assert float(rows[1]['lr']) == pytest.approx(float(ref_rows[1]['lr']), rel=1e-9)
    assert float(rows[0]['lr']) != pytest.approx(float(ref_rows[0]['lr']), rel=1e-6)  # epoch 1: 5 epochs' cosine
    assert ref['epochs'] == 2
    # a resume keeps the count the budget set, and continues as the run itself did
    capsys.readouterr()
    train(make_config(**{k: v for k, v in kw.items() if k != 'no_aug_epochs'}, time_budget=60,
                      resume=str(tmp_path / 'b' / 'checkpoint_epoch1.pth'), output=str(tmp_path / 'r')))
    out = capsys.readouterr().out
    assert 'epoch 1 of 2' in out and 'this resume keeps 2' in out and 'time budget' not in out
    assert max_param_diff(tmp_path / 'b', tmp_path / 'r') == 0
    # a budget with room to spare: --epochs caps it
    s = train(make_config(**kw, epochs=2, time_budget=1e4, output=str(tmp_path / 'big')))
    assert 'so the run holds 2 epochs (at most --epochs 2)' in capsys.readouterr().out and s['epochs'] == 2
