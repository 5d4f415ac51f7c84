"""The whole-model benchmark: harness arithmetic and order (fake clock), JSON schema on tiny inputs, bad arguments."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio, spread
from uniform_vit.bench.machine import calibrate_matmul_peak, matmul_peak_fn, peak_memory_bytes
from uniform_vit.bench.models import (
    BenchSettings,
    combine_runs,
    nominal_flops,
    resolve_settings,
    run_bench,
    run_bench_repeated,
)
from uniform_vit.errors import UserError


class FakeClock:
    """Time advances only when a candidate runs, by that candidate's scripted duration for the current round."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interleaving_order_and_times_with_fake_clock():
    clock, calls = FakeClock(), []
    durations = {'a': [1.0, 2.0, 4.0], 'b': [2.0, 2.0, 2.0]}
    counters = {'a': 0, 'b': 0}

    def make(name):
        def fn():
            calls.append(name)
            i = counters[name] - 1  # warm-up calls are index -1: no time passes
            if i >= 0:
                clock.now += durations[name][i // 2]  # inner=2: two calls per round
            counters[name] += 1
        return fn

    times = interleaved_timing({'a': make('a'), 'b': make('b')}, rounds=3, warmup=1, inner=2, clock=clock)
    # warm-up once each, then every round runs a twice, then b twice
    assert calls == ['a', 'b'] + ['a', 'a', 'b', 'b'] * 3
    assert times == {'a': [1.0, 2.0, 4.0], 'b': [2.0, 2.0, 2.0]}  # seconds per call
    # round-by-round ratio time(b)/time(a): [2, 1, 0.5] -> median 1, though the ratio of medians is also 1 here
    assert paired_ratio(times['a'], times['b']) == 1.0
    assert median(times['a']) == 2.0


def test_rewarm_calls_are_untimed_and_precede_each_timed_call():
    clock, calls = FakeClock(), []

    def make(name, cold, warm):
        state = {'last': None}

        def fn():
            calls.append(name)
            # a call right after another candidate's is slow (cold caches), one right after its own is fast
            clock.now += warm if state['last'] == len(calls) - 2 else cold
            state['last'] = len(calls) - 1
        return fn

    fns = {'a': make('a', 3.0, 1.0), 'b': make('b', 5.0, 2.0)}
    cold = interleaved_timing(fns, rounds=2, warmup=0, clock=clock)
    assert cold == {'a': [3.0, 3.0], 'b': [5.0, 5.0]}
    calls.clear()
    warm = interleaved_timing(fns, rounds=2, warmup=0, rewarm=1, clock=clock)
    assert calls == ['a', 'a', 'b', 'b'] * 2
    assert warm == {'a': [1.0, 1.0], 'b': [2.0, 2.0]}  # only the second call of each pair is timed
    with pytest.raises(ValueError, match='rewarm'):
        interleaved_timing(fns, rounds=1, rewarm=-1)


def test_paired_ratio_differs_from_ratio_of_medians():
    a, b = [1.0, 10.0, 10.0, 1.0], [3.0, 20.0, 30.0, 2.0]  # b is 2-3x slower in every round, load varies a lot
    assert paired_ratio(a, b) == 2.5  # median of [3, 2, 3, 2]
    assert median(b) / median(a) == pytest.approx(11.5 / 5.5)  # the ratio of medians mixes rounds
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_spread():
    assert spread([1.0]) == 0.0
    assert spread([1.0, 1.0, 1.0]) == 0.0
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4.0 - 2.0) / 3.0)


def test_harness_rejects_bad_rounds():
    with pytest.raises(ValueError):
        interleaved_timing({'a': lambda: None}, rounds=0)


def test_peak_memory_counts_live_tensors():
    def fn():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a + 1  # 4 MiB, both alive
        return (a + b).sum()  # a third 4 MiB while a and b are alive

    peak = peak_memory_bytes(fn)
    assert 12 * 2**20 <= peak < 13 * 2**20


def test_matmul_peak_probe():
    fn, flops = matmul_peak_fn((8, 4, 2))
    assert flops == 2 * 8 * 4 * 2
    fn2, _ = matmul_peak_fn((8, 4, 2), op='conv1x1')
    assert fn2().shape == (1, 2, 8, 1)  # 8 rows: neither 7x7 nor 4x4 maps
    assert matmul_peak_fn((98, 4, 2), op='conv1x1')[0]().shape == (2, 2, 7, 7)
    a_fn, _ = matmul_peak_fn((8, 4, 2), op='onednn')
    assert a_fn().shape == (8, 2)
    op, shape, rate = calibrate_matmul_peak(seconds=0.001, tries=1, shapes=((16, 16, 16), (32, 32, 32)))
    assert op in ('mm', 'conv1x1', 'onednn') and shape in ((16, 16, 16), (32, 32, 32)) and rate > 0
    with pytest.raises(ValueError):
        matmul_peak_fn((2, 2, 2), op='fft')


def test_matmul_peak_picks_the_best_median_not_one_lucky_burst():
    # bursts take turns (A, B, A, B, A, B); each burst is one call, its length set by the fake clock. A has one lucky
    # burst (10x B's rate) and two slow ones; B is steady. The median picks B and reports B's median rate.
    a, b = (8, 8, 8), (16, 16, 16)
    fa, fb = 2.0 * 8 ** 3, 2.0 * 16 ** 3
    lengths = [fa / (10 * fb), 1.0, 10.0, 1.0, 10.0, 1.0]  # seconds per burst: A's rates fb*10, fa/10, fa/10; B's fb
    times, now = [], 0.0
    for dt in lengths:
        times += [now, now + dt]
        now += dt
    ticks = iter(times)
    op, shape, rate = calibrate_matmul_peak(seconds=1e-9, tries=3, shapes=(a, b), ops=('mm',),
                                            clock=lambda: next(ticks))
    assert (op, shape) == ('mm', b) and rate == pytest.approx(fb)


def test_nominal_flops_count_fused_attention_on_every_torch_version():
    # some torch releases have no formula for the CPU flash-attention op and count zero (DeiT-Tiny 1.07 GMACs, not 1.25)
    class Attn(torch.nn.Module):
        def forward(self, x):  # (B, heads, N, d)
            return F.scaled_dot_product_attention(x, x, x)

    b, h, n, d = 1, 2, 5, 4
    assert nominal_flops(Attn(), (h, n, d)) == 2 * (2 * b * h * n * n * d)  # q kT and attn v, 2 FLOPs per MAC


def test_nominal_flops_is_the_unfused_count():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)).eval()
    assert nominal_flops(conv, (3, 5, 5)) == 2 * 8 * 3 * 9 * 25  # 2 per MAC; BatchNorm not counted


def test_bench_json_schema_on_tiny_inputs(tmp_path):
    s = BenchSettings(models=['uniform_t', 'efficientvit_m0'], img_size=64, batch_size=2, rounds=2, warmup=0,
                      latency_rounds=1)
    result = run_bench(s)
    assert set(result) == {'environment', 'settings', 'peak', 'rows', 'pairs'}
    assert {'cpu', 'threads', 'torch', 'timm', 'device', 'malloc', 'cpu_kernels'} <= set(result['environment'])
    assert result['settings']['fused'] and result['settings']['backend'] == 'jit' and result['settings']['rewarm'] == 1
    rows = {r['model']: r for r in result['rows']}
    assert set(rows) == {'uniform_t', 'efficientvit_m0'}
    for r in rows.values():
        assert r['rounds'] == 2 and len(r['times_s']) == 2 and r['batch_size'] == 2 and r['img_size'] == 64
        assert r['img_per_s'] > 0 and r['ms_per_batch'] > 0 and r['latency_b1_ms'] > 0
        assert r['gmacs'] > 0 and r['params_m'] > 0 and r['peak_mem_mb'] > 0 and 0 < r['frac_of_peak']
    assert rows['uniform_t']['top1'] == 66.0 and 'UniForm' in rows['uniform_t']['top1_source']
    (pair,) = result['pairs']
    assert (pair['model'], pair['peer']) == ('uniform_t', 'efficientvit_m0')
    # the ratio is computed round by round from the same per-round times the rows carry, and stored to 3 decimals
    # (an absolute rounding error up to 5e-4, more than 1e-3 relative for ratios below 0.5, as on a loaded machine)
    expect = paired_ratio(rows['uniform_t']['times_s'], rows['efficientvit_m0']['times_s'])
    assert pair['speedup'] == pytest.approx(expect, rel=1e-3, abs=6e-4)
    assert rows['uniform_t']['speedup_vs_peer'] == pair['speedup']
    json.dumps(result)  # plain JSON types only


class _Hungry(torch.nn.Module):
    """Needs about a terabyte per image above ``limit`` images when served (traced, or in inference mode), which the
    real allocator refuses; the FLOP count (one image, eager, no_grad) is spared so that ``limit=0`` reaches the
    timing loop's batch-1 case."""

    def __init__(self, limit: int, even_to_count: bool = False):
        super().__init__()
        self.limit, self.even_to_count, self.conv = limit, even_to_count, torch.nn.Conv2d(3, 4, 3)
        self.pretrained_cfg = {'input_size': (3, 32, 32)}

    def forward(self, x):
        served = torch.jit.is_tracing() or torch.is_inference_mode_enabled()
        if x.shape[0] > self.limit and (served or self.even_to_count):
            torch.empty(x.shape[0], 2 ** 38)
        return self.conv(x).mean((2, 3))


def _register_hungry():
    from timm.models import is_model, register_model

    if not is_model('hungry_above_batch_4'):
        def hungry_above_batch_4(pretrained=False, **kwargs):
            return _Hungry(4)

        def hungry_always(pretrained=False, **kwargs):
            return _Hungry(0)

        def hungry_to_count(pretrained=False, **kwargs):
            return _Hungry(0, even_to_count=True)

        register_model(hungry_above_batch_4)
        register_model(hungry_always)
        register_model(hungry_to_count)


def test_out_of_memory_halves_the_batch_and_pairs_compare_per_image():
    from uniform_vit.bench.models import batch_notes, peer_pairs, prepare

    _register_hungry()
    s = resolve_settings(BenchSettings(models=['hungry_above_batch_4'], batch_size=16, rounds=1, latency_rounds=0))
    p = prepare('hungry_above_batch_4', s, '.')
    assert p.batch_size == 4  # 16 and 8 ran out of memory
    assert p.call().shape == (4, 4)
    with pytest.raises(UserError, match='out of memory even at batch 1'):
        prepare('hungry_always', s, '.')
    with pytest.raises(UserError, match='out of memory counting the FLOPs of one 3x32x32 image'):
        prepare('hungry_to_count', s, '.')
    # a peer timed at half the batch in half the time is exactly as fast per image
    times = {'uniform_t': [2.0, 2.0, 2.0], 'efficientvit_m0': [1.0, 1.2, 0.8]}
    (pair,) = peer_pairs(times, {'uniform_t': 16, 'efficientvit_m0': 8})
    assert pair['speedup'] == 1.0 and pair['speedup_spread'] > 0
    (pair,) = peer_pairs(times, {'uniform_t': 16, 'efficientvit_m0': 16})
    assert pair['speedup'] == 0.5
    result = {'settings': {'batch_size': 16}, 'rows': [{'model': 'uniform_t', 'batch_size': 16},
                                                        {'model': 'efficientvit_m0', 'batch_size': 8}]}
    assert batch_notes(result) == ['efficientvit_m0: out of memory at batch 16, timed at batch 8 (img/s and the '
                                   'paired ratios are per image)']


def test_jit_backend_runs_the_faster_frozen_form(monkeypatch, tmp_path):
    # TorchScript's deploy steps: the traced model is frozen (no weight lookups left in the graph), tried with and
    # without optimize_for_inference's oneDNN pass, and the faster form runs; outputs stay those of the model
    import uniform_vit.bench.models as bm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expect = model(x)
    settings = BenchSettings(models=['probe'])
    real = bm.interleaved_timing
    for slower, chosen in (('frozen', 'frozen+oneDNN'), ('frozen+oneDNN', 'frozen')):
        seen = {}

        def scripted(fns, *args, slower=slower, seen=seen, **kwargs):
            times = real(fns, *args, **kwargs)  # every form really runs ...
            seen.update(times)
            return {k: [1.0 if k == slower else 0.5] * len(v) for k, v in times.items()}  # ... and one is slower

        monkeypatch.setattr(bm, 'interleaved_timing', scripted)
        runner = bm.make_runner(model, 'jit', x, settings, str(tmp_path))
        assert runner.deploy_form == chosen and set(seen) == {'frozen', 'frozen+oneDNN'}
        assert not [n for n in runner.graph.nodes() if n.kind() == 'prim::GetAttr']  # weights are constants now
        assert torch.allclose(bm._bind(runner, x, settings)(), expect, atol=1e-5)
    monkeypatch.setattr(bm, 'interleaved_timing', real)

    def cannot_freeze(*args, **kwargs):
        raise RuntimeError("freezing is not supported for this module")

    monkeypatch.setattr(torch.jit, 'freeze', cannot_freeze)  # a model TorchScript cannot freeze still runs, traced
    runner = bm.make_runner(model, 'jit', x, settings, str(tmp_path))
    assert runner.deploy_form == 'traced' and torch.allclose(bm._bind(runner, x, settings)(), expect, atol=1e-5)


def test_rows_and_notes_name_the_script_form():
    from uniform_vit.bench.models import form_notes

    s = BenchSettings(models=['uniform_t', 'efficientvit_m0'], img_size=32, batch_size=2, rounds=1, warmup=0,
                      latency_rounds=1)
    result = run_bench(s)
    forms = {r['model']: (r['form'], r['form_b1']) for r in result['rows']}
    assert all(f in ('frozen', 'frozen+oneDNN') and b in ('frozen', 'frozen+oneDNN') for f, b in forms.values())
    (note,) = form_notes(result)
    assert 'uniform_t' in note and 'efficientvit_m0' in note and forms['uniform_t'][0] in note
    result['settings']['backend'] = 'eager'
    assert form_notes(result) == []
    # several processes may pick differently: the combined row names every form taken
    a, b = copy.deepcopy(result), copy.deepcopy(result)
    for r in a['rows']:
        r['form'] = 'frozen'
    for r in b['rows']:
        r['form'] = 'frozen+oneDNN'
    assert {r['form'] for r in combine_runs([a, b, a])['rows']} == {'frozen/frozen+oneDNN'}


def test_compile_backend_freezes_weights_on_cpu(tmp_path):
    # Inductor's CPU inference mode (weights frozen, oneDNN convs with fused bias/ReLU) for every shape it compiles,
    # without leaking the switch into the caller's process
    import torch._inductor.config as inductor_config

    from uniform_vit.bench.models import _bind, make_runner

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 8, 1)

        def forward(self, x):
            seen.append(inductor_config.freezing)  # read while Dynamo traces: the setting compilation ran under
            return torch.relu(self.c(x))

    model = Probe().eval()
    settings = BenchSettings(models=['probe'], backend='compile')
    runner = make_runner(model, 'compile', torch.randn(2, 3, 8, 8), settings, str(tmp_path))
    for batch in (2, 1):  # a new shape recompiles, still frozen
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            expect = model(x)
        seen.clear()
        assert torch.allclose(_bind(runner, x, settings)(), expect, atol=1e-5)
        assert seen == [True]
    assert inductor_config.freezing is False


def test_onnxruntime_backend_fp32_and_int8(tmp_path):
    # `bench --backend onnxruntime [--int8]` (README): the exported deploy form runs in onnxruntime, matches PyTorch
    # in fp32, is really quantized with --int8, and both are timed and labelled as such
    pytest.importorskip('onnxruntime')
    import onnx

    from uniform_vit.bench.models import banner, create, make_runner
    from uniform_vit.layers.fuse import reparameterize

    model, _ = create('uniform_t', 64)
    model = reparameterize(model).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expect = model(x)
    for int8 in (False, True):
        s = BenchSettings(models=['uniform_t'], backend='onnxruntime', int8=int8, img_size=64, batch_size=2)
        runner = make_runner(model, 'onnxruntime', x, s, str(tmp_path))
        ops = {n.op_type for n in onnx.load(str(runner.path)).graph.node}
        assert ('QuantizeLinear' in ops) == int8 and runner.path.name.endswith('.int8.onnx') == int8
        if not int8:
            assert torch.allclose(runner(x), expect, atol=1e-4, rtol=1e-4)
        result = run_bench(BenchSettings(models=['uniform_t'], backend='onnxruntime', int8=int8, img_size=64,
                                         batch_size=2, rounds=1, warmup=0, latency_rounds=1))
        (row,) = result['rows']
        assert row['backend'] == ('onnxruntime-int8' if int8 else 'onnxruntime')
        assert row['img_per_s'] > 0 and row['latency_b1_ms'] > 0 and row['peak_mem_mb'] is None  # not torch memory
        assert ('int8 (% of the fp32 peak)' in banner(result)) == int8


def _fake_run(t_a: float, t_b: float, ratio: float, peak: float) -> dict:
    def row(name, sec):
        return dict(model=name, img_per_s=16 / sec, ms_per_batch=sec * 1e3, gflops=1.0 / sec, frac_of_peak=0.1 / sec,
                    spread=0.02, latency_b1_ms=sec * 100, times_s=[sec, sec], rounds=2, peer=None,
                    speedup_vs_peer=None)
    return dict(environment={'cpu': 'x'}, settings={'repeat': 1, 'batch_size': 16}, peak={'gflops': peak, 'op': 'mm'},
                rows=[row('uniform_t', t_a), row('efficientvit_m0', t_b)],
                pairs=[dict(model='uniform_t', peer='efficientvit_m0', speedup=ratio, speedup_spread=0.01)])


def test_combine_runs_takes_medians_across_processes():
    runs = [_fake_run(0.02, 0.03, 1.5, 200.0), _fake_run(0.04, 0.05, 1.25, 240.0), _fake_run(0.025, 0.04, 1.6, 230.0)]
    out = combine_runs(runs)
    t, m0 = out['rows']
    assert t['img_per_s'] == pytest.approx(16 / 0.025, abs=0.1) and t['runs_img_per_s'] == [800.0, 400.0, 640.0]
    assert t['latency_b1_ms'] == pytest.approx(2.5) and t['rounds'] == 6 and len(t['times_s']) == 6
    (pair,) = out['pairs']
    assert pair['speedup'] == 1.5 and pair['speedup_runs'] == [1.5, 1.25, 1.6]  # median of the runs' own ratios
    assert t['speedup_vs_peer'] == 1.5 and m0['speedup_vs_peer'] is None
    assert out['peak']['gflops'] == 230.0 and out['settings']['repeat'] == 3
    with pytest.raises(ValueError):
        combine_runs([])


def test_repeat_runs_in_fresh_processes_and_combines(tmp_path):
    s = BenchSettings(models=['uniform_t', 'efficientvit_m0'], img_size=32, batch_size=2, rounds=2, warmup=0,
                      latency_rounds=0, repeat=2)
    phases = []
    out = run_bench_repeated(s, lambda phase, done, total: phases.append(phase))
    assert out['settings']['repeat'] == 2 and phases[:2] == ['run 1 of 2 (own process)', 'run 2 of 2 (own process)']
    (pair,) = out['pairs']
    assert len(pair['speedup_runs']) == 2 and pair['speedup'] == pytest.approx(median(pair['speedup_runs']), abs=1e-3)
    assert all(len(r['runs_img_per_s']) == 2 and r['rounds'] == 4 for r in out['rows'])
    json.dumps(out)


def test_op_profile_ranks_operators_by_self_time():
    from uniform_vit.bench.profile import OTHER, format_profile, op_profile

    a, small = torch.randn(384, 384), torch.randn(8)

    def call():
        for _ in range(3):
            a.mm(a)  # the heavy one, three times a call
        return small.relu().sum()

    prof = op_profile(call, calls=2, top=1)
    assert prof['calls'] == 2 and prof['ops'] >= 3 and prof['ms'] > 0
    (mm, rest) = prof['top']
    assert mm['op'] == 'aten::mm' and mm['count'] == 3 and mm['share'] > 0.5
    assert rest['op'] == OTHER and rest['share'] == pytest.approx(1 - mm['share'], abs=2e-4)
    assert mm['ms'] == pytest.approx(mm['share'] * prof['ms'], rel=0.02)
    assert len(op_profile(call, top=50)['top']) == prof['ops']  # everything listed: no rest entry
    lines = format_profile('m', prof, timed_ms=1.0)
    assert lines[0].startswith('m: ') and 'aten::mm x3' in lines[1] and OTHER in lines[2]
    with pytest.raises(UserError):
        op_profile(call, calls=0)


def test_settings_defaults_and_errors():
    s = resolve_settings(BenchSettings(models=['uniform_t']))
    assert s.batch_size == 16 and s.threads == 1 and not s.amp and s.rewarm == 1
    for bad in (dict(batch_size=0), dict(threads=0), dict(backend='tensorrt'), dict(int8=True),
                dict(device='tpu'), dict(img_size=8), dict(rewarm=-1), dict(repeat=0), dict(profile=-1),
                dict(profile=3, backend='onnxruntime')):
        with pytest.raises(UserError):
            resolve_settings(BenchSettings(models=['uniform_t'], **bad))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'uniform_vit.cli.main', 'bench', *args], capture_output=True,
                          text=True, timeout=300)


def _main(capsys, *args: str) -> tuple[int, str]:
    """The CLI entry point in-process (argparse errors exit via SystemExit): (exit code, stderr)."""
    from uniform_vit.cli.main import main

    try:
        code = main(['bench', *args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize('args,needle', [
    (['--models', 'uniform_tt'], "did you mean 'uniform_t'"),
    (['--batch-size', '0'], 'must be at least 1'),
    (['--threads', '0'], 'must be at least 1'),
    (['--rewarm', '-1'], 'must be at least 0'),
    (['--warmup', '-1'], 'must be at least 0'),
    (['--warmup', 'two'], 'expected a whole number'),
    (['--repeat', '0'], 'must be at least 1'),
    (['--int8'], '--int8 needs --backend onnxruntime'),
    (['--profile', '0'], 'must be at least 1'),
    (['--profile', '--backend', 'onnxruntime'], 'ort_profile.py'),
    (['--models', 'nonexistent_*'], 'matches no model'),
    (['--full', '--models', 'uniform_t'], 'name different model sets'),
    (['--quick', '--json', '/nonexistent/dir/b.json'], 'does not exist'),
])
def test_cli_bad_arguments(capsys, args, needle):
    code, err = _main(capsys, *args)
    assert code == 2
    assert needle in err
    assert 'Traceback' not in err
    assert [ln for ln in err.splitlines() if 'error:' in ln] == [err.strip().splitlines()[-1]]  # one error line


def test_cli_quick_run_writes_json_csv_plot(tmp_path):
    out = tmp_path / 'b.json'
    p = _cli('--models', 'uniform_t,efficientvit_m0', '--img-size', '64', '--batch-size', '2', '--rounds', '1',
             '--warmup', '0', '--no-latency', '--json', str(out), '--csv', str(tmp_path / 'b.csv'),
             '--plot', str(tmp_path / 'b.png'), '--profile', '3')
    assert p.returncode == 0, p.stderr
    assert 'uniform_t' in p.stdout and 'efficientvit_m0' in p.stdout
    data = json.loads(out.read_text())
    assert [r['model'] for r in data['rows']] == ['uniform_t', 'efficientvit_m0']
    # --profile: each model's three costliest operators and the rest, as JSON and as a section of the printout
    assert 'Where the time goes' in p.stdout
    for r in data['rows']:
        prof = r['profile']
        assert [e['op'] for e in prof['top']][-1] == '(other ops)' and len(prof['top']) == 4
        assert sum(e['share'] for e in prof['top']) == pytest.approx(1.0, abs=2e-3)
        assert prof['top'][0]['share'] >= prof['top'][1]['share'] >= prof['top'][2]['share']
        assert f"{r['model']}: " in p.stdout and prof['top'][0]['op'] in p.stdout
    assert (tmp_path / 'b.csv').read_text().splitlines()[0].startswith('model,params_m,gmacs')
    assert (tmp_path / 'b.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.parametrize('argv', [['--help'], ['bench', '--help'], ['bench-attn', '--help']])
def test_help_renders(capsys, argv):
    from uniform_vit.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert 'bench' in capsys.readouterr().out


def test_cpuinfo_fields_come_from_the_first_processor(tmp_path):
    from uniform_vit import hardware

    info = tmp_path / 'cpuinfo'
    info.write_text('processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n'
                    'flags\t\t: fpu avx2 avx512f avx512_vnni\n\nprocessor\t: 1\nvendor_id\t: Other\n')
    fields = hardware._cpuinfo(str(info))
    assert fields['vendor_id'] == 'GenuineIntel' and fields['model name'] == 'Intel(R) Xeon(R) Processor'
    assert set(fields['flags'].split()) == {'fpu', 'avx2', 'avx512f', 'avx512_vnni'}
    assert hardware._cpuinfo(str(tmp_path / 'missing')) == {}  # not Linux: the callers fall back to platform data
    assert hardware.cpu_name() and isinstance(hardware.cpu_vendor(), str)


def test_plot_labels_do_not_overlap_or_leave_the_axes():
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from uniform_vit.bench.models import place_labels

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)  # the bench plot's size
    # neighbours with close speed and accuracy (as efficientvit_m3 and mobilenetv3_large_075 were), one at the edge
    pts = [('efficientvit_m3', 68.0, 73.4), ('mobilenetv3_large_075', 58.6, 73.3), ('shvit_s1', 82.0, 72.8),
           ('uniform_t', 219.0, 66.0), ('efficientvit_m0', 150.0, 63.2)]
    ax.scatter([p[1] for p in pts], [p[2] for p in pts])
    ax.set_xscale('log')
    fig.tight_layout()
    texts = place_labels(ax, pts)
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in texts]
    frame = ax.get_window_extent(r)
    assert [t.get_text() for t in texts] == [p[0] for p in pts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)  # uniform_t's name does not run off the plot
    plt.close(fig)
