"""``uniform-vit trex`` end to end on tiny settings, through a subprocess (real exit codes and messages)."""

import json
import subprocess
import sys

import pytest

FAST = ['--rounds', '3', '--verify-rounds', '3', '--calib-images', '8', '--quiet']


def trex(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'uniform_vit.cli.main', 'trex', *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_cli_searches_evaluates_and_finetunes_uniform(tmp_path):
    out = tmp_path / 'trex.json'
    p = trex('--model', 'uniform_t', '--img-size', '64', '--budget', '0.9', '--dataset', 'synthetic',
             '--json', str(out), '--finetune-epochs', '1', '--finetune-samples', '64', '--val-samples', '32',
             '--proxy', 'loss', '--output', str(tmp_path / 'ft'), *FAST)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert isinstance(res['reuse_layers'], list) and res['reuse_layers']  # uniform_t at 64 px cannot reach 0.9
    assert set(res['reuse_layers']) <= {2, 4}  # only the second layer of stages 1 and 2 can reuse
    assert res['proxy_kind'] == 'loss'
    assert res['latency_ratio'] > 0 and res['budget_met'] == (res['latency_ratio'] <= 0.9)
    assert all(res[k] is not None for k in ('top1_original', 'top1_reused', 'top1_finetuned'))
    assert res['flops_ratio'] < 1 and res['params_reused'] < res['params_original']
    assert 'ESTIMATE' in res['imc_estimate']['label'] and res['imc_estimate']['ratio']['edap'] < 1
    assert res['environment']['threads'] == 1 and res['environment']['fused'] is True
    assert (tmp_path / 'ft' / 'summary.json').is_file()


def test_cli_measures_a_given_vit_plan_without_data(tmp_path):
    out = tmp_path / 't.json'
    p = trex('--model', 'deit_tiny_patch16_224', '--img-size', '32', '--patch-size', '8', '--budget', '1',
             '--layers', '3,4', '--mode', 'output', '--json', str(out), *FAST)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res['reuse_layers'] == [3, 4] and res['sources'] == {'3': 2, '4': 2} and res['mode'] == 'output'
    assert res['top1_original'] is None and res['num_attention_layers'] == 12


def test_cli_cross_stage_plan_is_one_clear_line(tmp_path):
    p = trex('--model', 'uniform_t', '--img-size', '64', '--layers', '1', '--budget', '0.8', '--json',
             str(tmp_path / 'x.json'), *FAST)
    assert p.returncode == 2
    assert 'cannot reuse layer 0 (stage 0)' in p.stderr and 'Traceback' not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('args, message', [
    (['--model', 'uniform_t', '--img-size', '64', '--layers', '9'], 'out of range'),
    (['--model', 'deit_tiny_patch16_224', '--img-size', '32', '--patch-size', '8', '--layers', '0'],
     'layer 0 cannot reuse'),
    (['--model', 'uniform_tt'], "unknown model 'uniform_tt'; did you mean"),
    (['--model', 'uniform_t', '--img-size', '64', '--finetune-epochs', '1'], '--finetune-epochs needs data'),
    (['--model', 'uniform_t', '--budget', '1.5'], 'must be in (0, 1]'),
])
def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys, args, message):
    from uniform_vit.cli.main import main

    argv = ['trex', *args, '--json', str(tmp_path / 'x.json'), *FAST]
    if '--budget' not in args:
        argv += ['--budget', '0.8']
    try:
        code = main(argv)
    except SystemExit as e:  # argparse rejects bad option values itself
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
