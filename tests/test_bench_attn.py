"""bench-attn: analytic FLOPs against hand-computed values and torch's own counter, the sweep's schema, errors."""

import json

import pytest
import torch

from uniform_vit.bench.attn import (
    MECHANISMS,
    grid,
    mha_core_flops,
    reuse_core_flops,
    reuse_module_flops,
    run_attn_bench,
)
from uniform_vit.errors import UserError
from uniform_vit.layers.flops import count_flops


def test_core_flops_hand_computed():
    # one 7x7 window, C = 64, h = 4: Reuse shares ONE map from 16-wide q/k; MHA builds 4 maps from 16-wide q/k
    N, C = 49, 64
    qk, av = 2 * N * N * 16, 2 * N * N * 64  # 76,832 and 307,328
    assert reuse_core_flops(1, N, C, 4) == qk + av == 384_160 == 2.5 * N * N * C
    assert mha_core_flops(1, N, C, 4) == 4 * (2 * N * N * 16) + av == 614_656  # 4 heads x 16-wide q/k
    assert reuse_core_flops(3, N, C, 4) == 3 * 384_160  # per image


def test_reuse_module_flops_hand_computed():
    # C = 32, h = 4, N = 49: qk 1x1 (32 -> 16), q dw 7x7 on 8 ch, v dw k=1,3,5,7 on 8 ch each, core, proj 32 -> 32
    N = 49
    expect = (2 * N * 32 * 16) + (2 * N * 8 * 49) + (2 * N * 8 * (1 + 9 + 25 + 49)) \
        + (2 * N * N * 8 + 2 * N * N * 32) + (2 * N * 32 * 32)
    assert reuse_module_flops(1, N, 32, 4) == expect == 446_880
    # the deploy form's merged 7x7 value conv does more arithmetic (zero taps), which nominal FLOPs ignore
    assert reuse_module_flops(1, N, 32, 4, deploy=True) > expect


@pytest.mark.parametrize('name', [n for n, m in MECHANISMS.items() if n not in ('reuse_deploy', 'reuse_fast')])
def test_analytic_flops_match_torch_flop_counter(name):
    C, h, (H, W), B = 32, 4, (7, 7), 2
    mech = MECHANISMS[name]
    mod = mech.build(C, h, H, W)
    mod.eval()
    x = torch.randn(B, C, H, W)
    with torch.no_grad():
        mod(x)  # core inputs are made on the first call, outside the count
    # the project's counter: flop_counter plus the CPU flash-attention formula some torch releases lack
    assert count_flops(mod, x) == mech.flops(B, H * W, C, h)


def test_reuse_forms_and_cores_agree():
    C, h, H, W = 32, 4, 7, 8
    train = MECHANISMS['reuse'].build(C, h, H, W)
    with torch.no_grad():
        for p in train.parameters():
            p.normal_(0, 0.2)  # zero-initialised projections would hide differences
        deploy = train.fuse().eval()
        x = torch.randn(2, C, H, W)
        ref = train(x)
        assert torch.allclose(deploy(x), ref, atol=1e-5)
        assert torch.allclose(deploy(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5)
        # the bench's cores run the same computation on the same q/k/v
        x = torch.randn(1, 64, 32, 20)  # N = 640: above the tiled threshold
        outs = [MECHANISMS[n].build(64, 4, 32, 20)(x) for n in ('core_reuse_eager', 'core_reuse_tiled',
                                                                 'core_reuse_sdpa')]
    assert torch.allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(outs[2], outs[0], atol=1e-5, rtol=1e-5)
    # the token-major core: (B, C, N) views of (B, N, C) memory, as a channels-last deploy layer passes them
    from uniform_vit.layers.attention import reuse_attention

    tm = MECHANISMS['core_reuse_tiled_tm'].build(64, 4, 32, 20)
    with torch.no_grad():
        out = tm(x)
        q, k, v = tm.make(x)
        ref = reuse_attention(q, k, v, None, 16 ** -0.5, 'eager')
    assert all(t.stride(1) == 1 for t in (q, k, v)) and (q.shape[1], v.shape[1], v.shape[2]) == (16, 64, 640)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_grid():
    assert grid(49) == (7, 7) and grid(4096) == (64, 64) and grid(3136) == (56, 56) and grid(200) == (10, 20)


def test_sweep_schema_and_pairs():
    names = ['core_reuse_tiled', 'core_mha_sdpa', 'shsa', 'reuse']
    result = run_attn_bench(names, tokens=[16, 49], channels=[32], heads=[4], batch=1, rounds=2, warmup=0)
    assert set(result) == {'environment', 'settings', 'peak', 'rows', 'skipped'}
    assert result['settings']['rewarm'] == 1  # each timed call after an untimed one of the same mechanism
    assert result['skipped'] == []
    rows = result['rows']
    assert sorted((r['mechanism'], r['N']) for r in rows) == sorted((n, t) for n in names for t in (16, 49))
    for r in rows:
        assert r['ms'] > 0 and r['flops'] > 0 and r['bytes'] > 0 and r['peak_mem_mb'] is not None
        assert r['intensity'] == pytest.approx(r['flops'] / r['bytes'], rel=1e-2)
        assert r['flops'] == MECHANISMS[r['mechanism']].flops(1, r['N'], 32, 4)
    tiled = [r for r in rows if r['mechanism'] == 'core_reuse_tiled']
    assert all(r['vs'] == 'core_mha_sdpa' and r['speedup'] > 0 for r in tiled)
    json.dumps(result)


@pytest.mark.parametrize('kwargs,needle', [
    (dict(names=['reus']), "did you mean 'reuse'"),
    (dict(channels=[30]), 'not divisible by heads'),
    (dict(heads=[8], channels=[64]), 'at most 4 heads'),
    (dict(batch=0), 'at least 1'),
    (dict(rewarm=-1), 'rewarm >= 0'),
])
def test_bad_configurations(kwargs, needle):
    args = dict(names=['reuse'], tokens=[49], channels=[32], heads=[4], batch=1)
    args.update(kwargs)
    with pytest.raises(UserError, match=needle):
        run_attn_bench(args.pop('names'), **args)


def test_cli_list_and_bad_mechanism(capsys):
    from uniform_vit.cli.main import main

    assert main(['bench-attn', '--list']) == 0
    assert 'core_reuse_tiled' in capsys.readouterr().out
    assert main(['bench-attn', '--mechanisms', 'flash']) == 2
    assert 'unknown mechanism' in capsys.readouterr().err
    for flag in ('--warmup', '--rewarm'):  # argparse rejects a negative count before anything runs
        with pytest.raises(SystemExit) as e:
            main(['bench-attn', flag, '-1'])
        assert e.value.code == 2
        assert f'argument {flag}: must be at least 0, got -1' in capsys.readouterr().err


def test_cli_writes_json_csv_plot(tmp_path, capsys, monkeypatch):
    from uniform_vit.cli.main import main

    monkeypatch.chdir(tmp_path)  # so a stray file named '-' would land here
    out = tmp_path / 'a.json'
    assert main(['bench-attn', '--mechanisms', 'core_reuse_tiled,core_mha_sdpa', '--tokens', '49,196',
                 '--channels', '32', '--rounds', '1', '--warmup', '0', '--json', str(out),
                 '--csv', str(tmp_path / 'a.csv'), '--plot', str(tmp_path / 'a.png')]) == 0
    assert 'core_reuse_tiled' in capsys.readouterr().out
    rows = json.loads(out.read_text())['rows']
    assert {(r['mechanism'], r['N']) for r in rows} == {(m, n) for m in ('core_reuse_tiled', 'core_mha_sdpa')
                                                         for n in (49, 196)}
    assert (tmp_path / 'a.csv').read_text().splitlines()[0].startswith('mechanism,')
    assert (tmp_path / 'a.png').read_bytes()[:4] == b'\x89PNG'
    assert main(['bench-attn', '--mechanisms', 'core_mha_sdpa', '--tokens', '49', '--channels', '32',
                 '--rounds', '1', '--warmup', '0', '--json', '-']) == 0
    assert json.loads(capsys.readouterr().out)['rows'][0]['mechanism'] == 'core_mha_sdpa'
    assert not (tmp_path / '-').exists()  # '-' is stdout, not a file


def test_dtype_is_recorded_and_scales_the_bytes():
    from uniform_vit.bench.attn import resolve_dtype

    assert resolve_dtype('auto', 'cuda') == 'fp16' and resolve_dtype('auto', 'cuda:1') == 'fp16'
    assert resolve_dtype('auto', 'cpu') == 'fp32' and resolve_dtype('bf16', 'cpu') == 'bf16'
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        resolve_dtype('fp8', 'cpu')
    names = ['core_reuse_tiled', 'core_mha_sdpa']
    result = run_attn_bench(names, tokens=[49], channels=[32], heads=[4], rounds=1, warmup=0, dtype='bf16')
    assert result['settings']['dtype'] == 'bf16' and result['peak']['dtype'] == 'bf16'
    for r in result['rows']:  # 2-byte elements: half the fp32 traffic (the analytic formulas count 4-byte ones)
        assert r['bytes'] == MECHANISMS[r['mechanism']].bytes(1, 49, 32, 4) / 2
        assert r['intensity'] == pytest.approx(2 * r['flops'] / MECHANISMS[r['mechanism']].bytes(1, 49, 32, 4),
                                               rel=1e-2)
