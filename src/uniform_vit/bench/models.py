"""Whole-model benchmark: UniForm against its peers, in their deploy forms, interleaved round by round.

The paper's method is the default: BatchNorm-fused deploy form (``reparameterize``, timm's idiom for every model),
traced with ``torch.jit.trace`` and deployed as TorchScript deploys (frozen, and through its oneDNN pass where that
is faster for the model: :func:`best_script_form`); on CPU one thread and batch 16, on CUDA batch 2048 with AMP
(halved on OOM).
FLOPs are always the *nominal* count of the unfused network (``torch.utils.flop_counter``), so a deploy form that
does extra arithmetic (zero-padded kernels) earns nothing by it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..errors import UserError
from .harness import interleaved_timing, median, paired_ratio, spread
from .machine import calibrate_matmul_peak, environment, matmul_peak_fn, peak_memory_bytes

# The full comparison set. Each UniForm sits next to its size-matched peer, so the two run back to back in
# every round and their round-by-round ratio sees the same machine load.
FULL_MODELS = (
    'uniform_t', 'efficientvit_m0', 'uniform_s', 'efficientvit_m1', 'uniform_m', 'efficientvit_m3',
    'uniform_l', 'efficientvit_m5', 'shvit_s1', 'shvit_s2', 'shvit_s3', 'shvit_s4', 'swiftformer_xs', 'swiftformer_s',
    'mobilenetv3_small_100', 'mobilenetv3_large_075', 'edgenext_xx_small', 'mobilevit_xxs', 'deit_tiny_patch16_224',
)
# What a bare `uniform-vit bench` runs (about a minute on a 2-core CPU): the two small UniForms, their
# size-matched EfficientViTs and the two fastest other peers.
README_MODELS = ('uniform_t', 'efficientvit_m0', 'uniform_s', 'efficientvit_m1', 'shvit_s1', 'mobilenetv3_small_100')
QUICK_MODELS = ('uniform_t', 'efficientvit_m0', 'uniform_s', 'efficientvit_m1')
MODEL_SETS = {'readme': README_MODELS, 'quick': QUICK_MODELS, 'full': FULL_MODELS, 'default': FULL_MODELS}
# Each UniForm and its size-matched peer (the official UniForm archs m0/m1/m3/m5 are EfficientViT's).
PEERS = {'uniform_t': 'efficientvit_m0', 'uniform_s': 'efficientvit_m1', 'uniform_m': 'efficientvit_m3',
         'uniform_l': 'efficientvit_m5'}
BACKENDS = ('eager', 'jit', 'compile', 'onnxruntime')
PEAK_NAME = 'matmul peak'


@dataclass
class BenchSettings:
    models: list[str]
    device: str = 'cpu'
    backend: str = 'jit'
    threads: int = 1
    batch_size: int | None = None  # None: 16 on CPU, 2048 on CUDA
    img_size: int | None = None  # None: each model's default input size
    channels_last: bool = False
    fused: bool = True
    int8: bool = False
    amp: bool | None = None  # None: on for CUDA
    rounds: int = 10
    warmup: int = 2
    rewarm: int = 1  # untimed calls of a model right before its timed one in each round (steady state; harness doc)
    latency_rounds: int = 10  # batch-1 latency rounds; 0 skips them
    repeat: int = 1  # >1: the whole measurement again in that many fresh processes, medians across them
    profile: int = 0  # >0: after the timing, torch.profiler over the timed call; this many top operators per model
    model_set: str = 'custom'


def resolve_settings(s: BenchSettings) -> BenchSettings:
    """Fill defaults that depend on the device and reject impossible combinations with one-line errors."""
    if s.device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError("--device cuda requested but torch sees no CUDA device")
    if s.device not in ('cpu',) and not s.device.startswith('cuda'):
        raise UserError(f"unknown device {s.device!r}; use 'cpu' or 'cuda[:N]'")
    if s.backend not in BACKENDS:
        raise UserError(f"unknown backend {s.backend!r}; choose one of {', '.join(BACKENDS)}")
    if s.threads < 1:
        raise UserError(f"threads must be at least 1, got {s.threads}")
    if s.batch_size is not None and s.batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {s.batch_size}")
    if s.img_size is not None and s.img_size < 32:
        raise UserError(f"image size must be at least 32, got {s.img_size}")
    if s.rounds < 1 or s.warmup < 0 or s.latency_rounds < 0 or s.rewarm < 0 or s.repeat < 1:
        raise UserError("need rounds >= 1, warmup >= 0, rewarm >= 0, latency rounds >= 0, repeat >= 1")
    if s.int8 and s.backend != 'onnxruntime':
        raise UserError("--int8 needs --backend onnxruntime")
    if s.backend == 'onnxruntime' and s.device != 'cpu':
        raise UserError("--backend onnxruntime runs on the CPU only here; drop --device")
    if s.profile < 0:
        raise UserError(f"profile must be a number of operators >= 1 (or 0 for none), got {s.profile}")
    if s.profile and s.device != 'cpu':
        raise UserError("--profile reads CPU operator times; on a GPU use torch.profiler with CUDA activity or "
                        "Nsight Systems")
    if s.profile and s.backend == 'onnxruntime':
        raise UserError("--profile sees onnxruntime as one opaque call; use benchmarks/scripts/ort_profile.py "
                        "(onnxruntime's own profiler) instead")
    cuda = s.device.startswith('cuda')
    if s.batch_size is None:
        s.batch_size = 2048 if cuda else 16
    if s.amp is None:
        s.amp = cuda
    return s


# ---- one model ----------------------------------------------------------------------------------------------------

def create(name: str, img_size: int | None = None) -> tuple[nn.Module, tuple[int, int, int]]:
    """Unfused eval model (random weights, never downloaded) and its (C, H, W) input."""
    import timm

    import uniform_vit  # noqa: F401  (registers uniform_*)

    model = None
    if img_size is not None:
        try:  # models with a fixed token grid (ViT/DeiT, LeViT, ...) need the size at build time
            model = timm.create_model(name, pretrained=False, img_size=img_size)
        except TypeError:
            model = None  # this family takes any input size and no img_size argument
    if model is None:
        model = timm.create_model(name, pretrained=False)
    model.eval()
    cfg = model.pretrained_cfg or {}
    c, h, w = cfg.get('input_size', (3, 224, 224))
    if img_size is not None:
        h = w = img_size
    return model, (c, h, w)


@torch.no_grad()
def nominal_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """FLOPs of one image through the UNFUSED model (torch.utils.flop_counter: 2 per multiply-accumulate)."""
    from ..layers.flops import count_flops

    p = next(model.parameters(), torch.zeros(()))  # a parameter-free module runs on the CPU in fp32
    return count_flops(model, torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Python warnings and C++ chatter on stderr (tracer warnings, the profiler's start/stop lines)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, 'w') as devnull, warnings.catch_warnings():
            warnings.simplefilter('ignore')
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def make_runner(model: nn.Module, backend: str, example: torch.Tensor, settings: BenchSettings,
                workdir: str) -> Callable[[torch.Tensor], object]:
    """Wrap the (fused, eval) model in the chosen backend; the result is called as ``runner(x)``."""
    name = getattr(model, 'default_cfg', {}).get('architecture', 'model')
    if backend == 'eager':
        return model
    if backend == 'jit':
        with quiet(), torch.no_grad(), _autocast(settings):
            model(example)  # one eager call first: lets modules build their inference caches outside the tracer
            traced = torch.jit.trace(model, example, check_trace=False)
        return best_script_form(traced, example, settings)
    if backend == 'compile':
        try:
            compiled = torch.compile(model, dynamic=False)
        except Exception as e:  # inductor needs a C++ compiler on CPU
            raise UserError(f"torch.compile failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
        if settings.device != 'cpu':
            return compiled
        return functools.partial(_frozen_call, compiled)
    # onnxruntime
    try:
        from ..export.onnx import OrtRunner, export_onnx, ort_channel_block
    except ImportError as e:
        raise UserError(f"--backend onnxruntime needs uniform_vit.export.onnx and onnxruntime ({e})") from e
    path = os.path.join(workdir, f'{name}.onnx')
    with quiet():
        # every model's stem widened alike for this machine's blocked conv layout (a no-op where nothing to round)
        export_onnx(model, path, input_size=tuple(example.shape[1:]), dynamic_batch=True,
                    align_channels=ort_channel_block())
    if settings.int8:
        from ..export.quant import quantize_int8

        gen = torch.Generator().manual_seed(0)
        # random calibration data: fine for timing (the int8 graph is the same), not for accuracy
        calib = [torch.randn(example.shape, generator=gen).numpy() for _ in range(4)]
        qpath = os.path.join(workdir, f'{name}.int8.onnx')
        with quiet():
            quantize_int8(path, qpath, calib)
        path = qpath
    return OrtRunner(path, threads=settings.threads)


def _frozen_call(compiled: Callable[[torch.Tensor], object], x: torch.Tensor) -> object:
    """Call a ``torch.compile``d model in Inductor's CPU inference mode, as PyTorch recommends for inference: the
    weights frozen into constants, so convolutions get prepacked oneDNN weights with their bias, ReLU or residual add
    fused in. Compilation happens at the first call of each input shape, hence the patch around every call (a global
    setting would leak into the caller's process; ``torch.compile(options=...)`` does not reach this switch). Session 6:
    1.06-1.10x the plain compiled speed of uniform_t/m and efficientvit_m0/m3 (benchmarks/bench.md)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        return compiled(x)


def _autocast(settings: BenchSettings) -> contextlib.AbstractContextManager:
    if settings.amp and settings.device.startswith('cuda'):
        return torch.autocast('cuda', dtype=torch.float16)
    return contextlib.nullcontext()


@dataclass
class Prepared:
    name: str
    params: int
    flops: int
    input_size: tuple[int, int, int]
    batch_size: int
    call: Callable[[], object]
    call_b1: Callable[[], object] | None
    peak_mem: int | None
    form: str | None = None  # jit: the TorchScript form timed (best_script_form), batch run / batch-1 run
    form_b1: str | None = None


def prepare(name: str, s: BenchSettings, workdir: str) -> Prepared:
    """Build, count, fuse, wrap and warm one model, ready to be timed."""
    model, input_size = create(name, s.img_size)
    try:
        params, flops = count_params(model), nominal_flops(model, input_size)
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise
        raise UserError(f"{name}: out of memory counting the FLOPs of one {'x'.join(map(str, input_size))} image "
                        "on the CPU (try a smaller --img-size)") from None
    if s.fused:
        from ..layers.fuse import reparameterize

        model = reparameterize(model)
    device = torch.device(s.device)
    model = model.to(device)
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch = s.batch_size
    while True:
        try:
            x = torch.randn(batch, *input_size, device=device).contiguous(memory_format=fmt)
            runner = make_runner(model, s.backend, x, s, workdir)
            call = _bind(runner, x, s)
            call()  # first call compiles/allocates; running out of memory here halves the batch
            break
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not _out_of_memory(e):
                raise
            x = runner = call = None
            if device.type == 'cuda':
                torch.cuda.empty_cache()
            if batch == 1:
                raise UserError(f"{name}: out of memory even at batch 1 on {device}") from None
            batch = max(1, batch // 2)
    call_b1 = None
    runner_b1 = runner
    if s.latency_rounds:
        x1 = torch.randn(1, *input_size, device=device).contiguous(memory_format=fmt)
        if s.backend == 'jit':  # traced for its own shape, and its own fastest form
            runner_b1 = make_runner(model, s.backend, x1, s, workdir)
        call_b1 = _bind(runner_b1, x1, s)
        call_b1()
    with quiet():
        mem = peak_memory_bytes(call, device) if s.backend != 'onnxruntime' else None
    return Prepared(name, params, flops, input_size, batch, call, call_b1, mem, getattr(runner, 'deploy_form', None),
                    getattr(runner_b1, 'deploy_form', None) if call_b1 else None)


def best_script_form(traced: torch.jit.ScriptModule, example: torch.Tensor,
                     settings: BenchSettings) -> torch.jit.ScriptModule:
    """The traced model as TorchScript deploys it, in whichever of its inference forms runs faster here.

    ``torch.jit.freeze`` (weights and attributes become constants, the graph is simplified) and
    ``torch.jit.optimize_for_inference`` on top of it (convolutions and linears moved to oneDNN's blocked layouts,
    with their adds and activations fused) are TorchScript's own deploy steps. Frozen helps every model a little;
    the oneDNN pass speeds up conv-heavy models a lot (MobileNetV3 up to 2.3x, EfficientViT 1.06-1.13x, one thread,
    batch 16) and slows some others (EdgeNeXt 0.83x, DeiT 0.96x): each model gets both tried, a few interleaved
    calls each, and runs the faster, so no model is timed in a form that handicaps it. The form taken is in
    ``runner.deploy_form`` (the rows' ``form``); a model that cannot be frozen runs as traced."""
    forms: dict[str, torch.jit.ScriptModule] = {}
    with quiet():
        try:
            forms['frozen'] = torch.jit.freeze(traced.eval())
            # freeze() returns a new module each time; optimize_for_inference rewrites the one it is given
            forms['frozen+oneDNN'] = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        except Exception:  # noqa: BLE001  (TorchScript raises RuntimeError and others for graphs it cannot freeze)
            pass
    if not forms:
        traced.deploy_form = 'traced'
        return traced
    calls = {k: _bind(m, example, settings) for k, m in forms.items()}
    try:
        with quiet():
            times = interleaved_timing(calls, rounds=5, warmup=1, device=settings.device, rewarm=1)
    except RuntimeError as e:  # the oneDNN form may not run what the traced graph runs (or run out of memory)
        if _out_of_memory(e) or 'frozen' not in forms:
            raise
        times = {'frozen': [0.0]}
    name = min(times, key=lambda k: median(times[k]))
    forms[name].deploy_form = name
    return forms[name]


def _out_of_memory(e: BaseException) -> bool:
    """CUDA's allocator raises torch.OutOfMemoryError; the CPU allocator a plain RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


def _bind(runner: Callable[[torch.Tensor], object], x: torch.Tensor, s: BenchSettings) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode(), _autocast(s):
            return runner(x)

    return call


# ---- the whole run ------------------------------------------------------------------------------------------------

def run_bench(s: BenchSettings, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Benchmark ``s.models``; returns {'environment', 'settings', 'peak', 'rows', 'pairs'} (plain JSON types).

    ``progress(phase, done, total)`` is called as models are prepared and as rounds complete.
    """
    s = resolve_settings(s)
    prev_threads, prev_cudnn = torch.get_num_threads(), torch.backends.cudnn.benchmark
    torch.set_num_threads(s.threads)
    # CUDA: let cuDNN time its convolution algorithms for each shape at the first (untimed) call, as timm's
    # benchmark script does; every model gets the same chance, and the chosen kernels stay for the timed rounds
    torch.backends.cudnn.benchmark = s.device.startswith('cuda') or prev_cudnn
    try:
        return _run(s, progress or (lambda *_: None))
    finally:
        torch.set_num_threads(prev_threads)
        torch.backends.cudnn.benchmark = prev_cudnn


def run_bench_repeated(s: BenchSettings, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """:func:`run_bench`, ``s.repeat`` times, each in a fresh process (one after the other), combined by
    :func:`combine_runs`. A paired ratio moves by a few percent from one process to the next even on a quiet machine
    (memory placement, which of a kernel's code paths a process settles on), more than it moves between the rounds
    of one run; the median over processes is the figure to quote."""
    import concurrent.futures
    import multiprocessing

    s = resolve_settings(s)
    if s.repeat == 1:
        return run_bench(s, progress)
    progress = progress or (lambda *_: None)
    results = []
    ctx = multiprocessing.get_context('spawn')
    for i in range(s.repeat):
        progress(f'run {i + 1} of {s.repeat} (own process)', i, s.repeat)
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            results.append(pool.submit(_run_in_child, asdict(s)).result())
    progress('combining runs', s.repeat, s.repeat)
    return combine_runs(results)


def _run_in_child(settings: dict) -> dict:
    from ..utils.malloc import tune_allocator

    tune_allocator()  # as the parent CLI process did (the environment, hence any opt-out, is inherited)
    warnings.filterwarnings('ignore')
    return run_bench(BenchSettings(**{**settings, 'repeat': 1}))


def combine_runs(results: list[dict]) -> dict:
    """One result from several runs of the same settings: per model the median over runs of img/s, ms/batch,
    batch-1 latency, GFLOP/s and % of peak (the per-run values kept as ``runs_img_per_s``), per pair the median of
    the runs' paired ratios (kept as ``speedup_runs``; ``speedup_spread`` is then their spread across runs)."""
    if not results:
        raise ValueError("no runs to combine")
    first = results[0]
    models = [r['model'] for r in first['rows']]
    by_run = [{r['model']: r for r in res['rows']} for res in results]
    rows = []
    for m in models:
        per = [b[m] for b in by_run]
        row = dict(per[0])
        for key, nd in (('img_per_s', 1), ('ms_per_batch', 2), ('gflops', 2), ('frac_of_peak', 4), ('spread', 3)):
            row[key] = round(median([r[key] for r in per]), nd)
        lats = [r['latency_b1_ms'] for r in per if r.get('latency_b1_ms') is not None]
        row['latency_b1_ms'] = round(median(lats), 3) if lats else None
        row['runs_img_per_s'] = [r['img_per_s'] for r in per]
        for key in ('form', 'form_b1'):  # each process picks its own TorchScript form; name every one taken
            taken = sorted({r.get(key) for r in per if r.get(key)})
            row[key] = '/'.join(taken) if taken else None
        row['times_s'] = [t for r in per for t in r['times_s']]
        row['rounds'] = sum(r['rounds'] for r in per)
        rows.append(row)
    pairs = []
    for p in first['pairs']:
        runs = [next(q['speedup'] for q in res['pairs'] if q['model'] == p['model']) for res in results]
        pairs.append(dict(model=p['model'], peer=p['peer'], speedup=round(median(runs), 3),
                          speedup_spread=round(spread(runs), 3), speedup_runs=runs))
    for r in rows:
        pr = next((p for p in pairs if p['model'] == r['model']), None)
        r['speedup_vs_peer'] = pr['speedup'] if pr else None
    peak = dict(first['peak'], gflops=round(median([res['peak']['gflops'] for res in results]), 2))
    settings = dict(first['settings'], repeat=len(results))
    return dict(environment=first['environment'], settings=settings, peak=peak, rows=rows, pairs=pairs)


def _run(s: BenchSettings, progress: Callable[[str, int, int], None]) -> dict:
    env = environment(s.device, s.threads)
    if s.device == 'cpu':  # the C++ kernels (UniForm's deploy form uses them): built now, once per machine
        from ..layers.cpu_kernels import status

        progress('C++ CPU kernels', 0, len(s.models))
        env['cpu_kernels'] = status()
    prepared: list[Prepared] = []
    with tempfile.TemporaryDirectory(prefix='uniform-vit-bench-') as workdir:
        for i, name in enumerate(s.models):
            progress(f'preparing {name}', i, len(s.models))
            prepared.append(prepare(name, s, workdir))
        progress('calibrating matmul peak', len(s.models), len(s.models))
        peak_dtype = torch.float16 if s.amp and s.device.startswith('cuda') else torch.float32
        peak_op, shape, rate = calibrate_matmul_peak(s.device, peak_dtype)
        repeat = max(1, round(0.01 * rate / (2.0 * shape[0] * shape[1] * shape[2])))  # ~10 ms per probe call
        peak_fn, peak_flops = matmul_peak_fn(shape, s.device, peak_dtype, peak_op, repeat)
        fns: dict[str, Callable[[], object]] = {}
        for p in prepared:
            # the peak probe runs right before every model in every round, so each model's "% of peak" compares it
            # with the machine as it was a moment earlier (the machine may be shared and its load drifts)
            fns[PEAK_NAME + ' ' + p.name] = peak_fn
            fns[p.name] = p.call
        total = s.rounds + s.latency_rounds

        times = interleaved_timing(fns, s.rounds, s.warmup, device=s.device, rewarm=s.rewarm,
                                   on_round=lambda r: progress('timing', r + 1, total))
        lat: dict[str, list[float]] = {}
        if s.latency_rounds:
            lat = interleaved_timing({p.name: p.call_b1 for p in prepared}, s.latency_rounds, s.warmup,
                                     device=s.device, rewarm=s.rewarm,
                                     on_round=lambda r: progress('batch-1 latency', s.rounds + r + 1, total))
        profiles = {}
        if s.profile:
            from .profile import op_profile

            for i, p in enumerate(prepared):
                progress(f'profiling {p.name}', i, len(prepared))
                with quiet():  # the profiler's start/stop lines on stderr
                    profiles[p.name] = op_profile(p.call, top=s.profile)
    peak_by_model = {p.name: times.pop(PEAK_NAME + ' ' + p.name) for p in prepared}
    peak_times = [min(ts) for ts in zip(*peak_by_model.values())]  # per round: the probe at its least disturbed
    rows = [_row(p, times[p.name], peak_by_model[p.name], peak_flops, lat.get(p.name), s) for p in prepared]
    for r in rows:
        if r['model'] in profiles:
            r['profile'] = profiles[r['model']]
    pairs = peer_pairs(times, {p.name: p.batch_size for p in prepared})
    for r in rows:
        pr = next((p for p in pairs if p['model'] == r['model']), None)
        r['peer'], r['speedup_vs_peer'] = (pr['peer'], pr['speedup']) if pr else (None, None)
    peak = dict(op=peak_op, shape=list(shape), dtype=str(peak_dtype).replace('torch.', ''),
                gflops=round(peak_flops / median(peak_times) / 1e9, 2), spread=round(spread(peak_times), 3))
    settings = asdict(s)
    return dict(environment=env, settings=settings, peak=peak, rows=rows, pairs=pairs)


def peer_pairs(times: dict[str, list[float]], batches: dict[str, int]) -> list[dict]:
    """Each UniForm against its size-matched peer, round by round, per image: after an out-of-memory fallback
    two models may have run at different batch sizes, and seconds per batch would then compare unlike work."""
    pairs = []
    for a, b in PEERS.items():
        if a in times and b in times:
            ta, tb = [t / batches[a] for t in times[a]], [t / batches[b] for t in times[b]]
            pairs.append(dict(model=a, peer=b, speedup=round(paired_ratio(ta, tb), 3),
                              speedup_spread=round(spread([y / x for x, y in zip(ta, tb)]), 3)))
    return pairs


def form_notes(result: dict) -> list[str]:
    """For the jit backend, which TorchScript form each model ran in (:func:`best_script_form`), one line."""
    if result['settings']['backend'] != 'jit':
        return []
    parts = []
    for r in result['rows']:
        b1 = f" (batch 1: {r['form_b1']})" if r.get('form_b1') and r['form_b1'] != r.get('form') else ''
        parts.append(f"{r['model']} {r.get('form') or '?'}{b1}")
    return ["TorchScript form, per model the faster of frozen and frozen+oneDNN (optimize_for_inference): "
            + ', '.join(parts)]


def batch_notes(result: dict) -> list[str]:
    """One line per model that ran at a smaller batch than asked (out of memory at the requested size)."""
    asked = result['settings']['batch_size']
    return [f"{r['model']}: out of memory at batch {asked}, timed at batch {r['batch_size']} (img/s and the paired "
            "ratios are per image)" for r in result['rows'] if r['batch_size'] != asked]


def _row(p: Prepared, t: list[float], peak_t: list[float], peak_flops: float, lat: list[float] | None,
         s: BenchSettings) -> dict:
    from .published import published_top1

    sec = median(t)
    top1, source = published_top1(p.name)
    achieved = p.flops * p.batch_size / sec
    # fraction of peak round by round: both sides of the ratio saw the same load in that round
    frac = median([p.flops * p.batch_size / tm / (peak_flops / tp) for tm, tp in zip(t, peak_t)])
    return dict(
        model=p.name, params_m=round(p.params / 1e6, 3), gmacs=round(p.flops / 2e9, 4),
        img_size=p.input_size[1], batch_size=p.batch_size,
        img_per_s=round(p.batch_size / sec, 1), ms_per_batch=round(sec * 1e3, 2), spread=round(spread(t), 3),
        latency_b1_ms=round(median(lat) * 1e3, 3) if lat else None,
        peak_mem_mb=round(p.peak_mem / 2**20, 2) if p.peak_mem is not None else None,
        gflops=round(achieved / 1e9, 2), frac_of_peak=round(frac, 4),
        top1=top1, top1_source=source, fused=s.fused, backend=s.backend + ('-int8' if s.int8 else ''),
        form=p.form, form_b1=p.form_b1, rounds=len(t), times_s=[round(x, 6) for x in t],
    )


# ---- output -------------------------------------------------------------------------------------------------------

ROW_FIELDS = ('model', 'params_m', 'gmacs', 'img_size', 'batch_size', 'img_per_s', 'ms_per_batch', 'spread',
              'latency_b1_ms', 'peak_mem_mb', 'gflops', 'frac_of_peak', 'top1', 'top1_source', 'peer',
              'speedup_vs_peer', 'fused', 'backend', 'form', 'form_b1', 'rounds')


def banner(result: dict) -> str:
    e, s, pk = result['environment'], result['settings'], result['peak']
    dev = e['gpu'] or e['cpu']
    # int8: onnxruntime's QDQ graph; its GFLOP/s and % peak stay nominal FLOPs against the fp32 matmul probe
    prec = 'AMP fp16' if s['amp'] else 'int8 (% of the fp32 peak)' if s['int8'] else 'fp32'
    return (f"uniform-vit bench: {dev} ({e['cpu_capability']}), {s['threads']} thread(s) of {e['logical_cpus']}, "
            f"torch {e['torch']}, timm {e['timm']}, malloc {e.get('malloc', 'default')}"
            f"{', C++ kernels ' + e['cpu_kernels'] if 'cpu_kernels' in e else ''}\n"
            f"  set '{s['model_set']}' ({len(s['models'])} models), "
            f"backend {s['backend']}{'-int8' if s['int8'] else ''}"
            f", {'fused deploy form' if s['fused'] else 'UNFUSED'}, {prec}, batch {s['batch_size']}"
            f"{', channels-last' if s['channels_last'] else ''}, {s['rounds']} interleaved rounds"
            f"{', each timed warm (' + str(s['rewarm']) + ' untimed call first)' if s.get('rewarm') else ''}"
            f"{', medians of ' + str(s['repeat']) + ' processes' if s.get('repeat', 1) > 1 else ''}, "
            f"matmul peak {pk['gflops']} GFLOP/s ({pk['op']} {'x'.join(map(str, pk['shape']))} {pk['dtype']})")


def table_rows(result: dict) -> list[dict]:
    out = []
    for r in result['rows']:
        d = dict(r)
        d['frac_of_peak'] = f"{100 * r['frac_of_peak']:.0f}%"
        d['spread'] = f"{100 * r['spread']:.0f}%"
        d['speedup_vs_peer'] = f"{r['speedup_vs_peer']:.2f}x {r['peer'].replace('efficientvit_', 'EViT-')}" \
            if r['speedup_vs_peer'] else None
        out.append(d)
    return out


TABLE_COLUMNS = [('model', 'model'), ('params_m', 'params (M)'), ('gmacs', 'GMACs'), ('img_per_s', 'img/s'),
                 ('ms_per_batch', 'ms/batch'), ('spread', 'spread'), ('latency_b1_ms', 'b1 ms'),
                 ('peak_mem_mb', 'peak MB'), ('gflops', 'GFLOP/s'), ('frac_of_peak', '% peak'),
                 ('top1', 'top-1'), ('speedup_vs_peer', 'vs peer (paired)')]


def check_outputs(json_path: str | None = None, csv_path: str | None = None, plot_path: str | None = None) -> None:
    """Fail before a long run, not after it: output folders must exist, --plot needs matplotlib."""
    for path in (json_path, csv_path, plot_path):
        if path and path != '-':
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise UserError(f"cannot write {path}: folder {parent} does not exist")
    if plot_path:
        require_matplotlib()


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'uniform-vit[plot]'") from None
    matplotlib.use('Agg')
    return matplotlib


def write_csv(rows: list[dict], path: str, fields: tuple[str, ...]) -> None:
    import csv

    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)


def write_outputs(result: dict, json_path: str | None, csv_path: str | None, plot_path: str | None,
                  fields: tuple[str, ...], plot: Callable[[dict, str], None]) -> None:
    """The files a benchmark command was asked for (checked early by :func:`check_outputs`): ``--json`` (a path;
    '-' means stdout, which the command prints itself), ``--csv`` (``result['rows']``) and ``--plot``."""
    if json_path and json_path != '-':
        with open(json_path, 'w') as f:
            json.dump(result, f, indent=2)
    if csv_path:
        write_csv(result['rows'], csv_path, fields)
    if plot_path:
        plot(result, plot_path)


def plot_top1_vs_throughput(result: dict, path: str) -> None:
    """Published ImageNet top-1 against measured img/s, one labelled point per model, UniForm highlighted."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    rows = [r for r in result['rows'] if r['top1'] is not None]
    if not rows:
        raise UserError("nothing to plot: none of these models has a published top-1")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in rows:
        ours = r['model'].startswith('uniform_')
        ax.scatter(r['img_per_s'], r['top1'], s=40, color='tab:red' if ours else 'tab:blue', zorder=3)
    for a, b in PEERS.items():
        ra = next((r for r in rows if r['model'] == a), None)
        rb = next((r for r in rows if r['model'] == b), None)
        if ra and rb:
            ax.plot([rb['img_per_s'], ra['img_per_s']], [rb['top1'], ra['top1']], color='grey', lw=0.8, ls='--')
    e, s = result['environment'], result['settings']
    ax.set_xscale('log')
    # plain numbers on the log axis (matplotlib's own minor labels, 3x10^1 4x10^1 ..., run into each other)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f'{v:g}' if f'{v:e}'[0] in '25' else ''))
    ax.set_xlabel(f"measured throughput (img/s, batch {s['batch_size']}, {s['threads']} thread(s), {s['backend']})")
    ax.set_ylabel('published ImageNet-1K top-1 (%)')
    where = e['gpu'] or f"{e['cpu']} ({e.get('cpu_capability', '?')})"
    ax.set_title(f"{where}, torch {e['torch']}", fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    fig.tight_layout()
    place_labels(ax, [(r['model'], r['img_per_s'], r['top1']) for r in rows])
    fig.savefig(path)
    plt.close(fig)


def place_labels(ax, points: list[tuple[str, float, float]], fontsize: int = 7) -> list:
    """Label each (text, x, y) point beside it, trying the four corners around the point in turn and keeping the
    first whose box stays inside the axes and overlaps no label placed before and no other point (neighbouring
    models with close speed and accuracy otherwise print their names over each other); where every corner clashes,
    the one with the fewest clashes. Returns the matplotlib Text objects."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    offsets = ((4, 3, 'left', 'bottom'), (4, -3, 'left', 'top'), (-4, 3, 'right', 'bottom'), (-4, -3, 'right', 'top'))
    centres = ax.transData.transform([(x, y) for _, x, y in points])
    marks = [Bbox.from_bounds(px - 4, py - 4, 8, 8) for px, py in centres]
    placed, texts = [], []
    for i, (text, x, y) in enumerate(points):
        others = placed + marks[:i] + marks[i + 1:]  # earlier labels and every other point's marker
        choices = []
        for dx, dy, ha, va in offsets:
            t = ax.annotate(text, (x, y), fontsize=fontsize, xytext=(dx, dy), textcoords='offset points', ha=ha,
                            va=va)
            box = t.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            clashes = sum(box.overlaps(b) for b in others)
            choices.append((clashes + (0 if inside else 100), len(choices), t, box))
            t.remove()
        _, _, t, box = min(choices, key=lambda c: c[:2])  # no clash and inside the axes, else the least bad
        ax.add_artist(t)
        placed.append(box)
        texts.append(t)
    return texts
