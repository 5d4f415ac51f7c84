"""What the numbers were measured on: environment banner, matmul peak probe, peak inference memory."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

from ..hardware import cpu_name, cpu_vendor
from ..layers.gemm import onednn_preferred
from ..utils.malloc import allocator_label


def environment(device: str = 'cpu', threads: int | None = None) -> dict:
    """Everything a number depends on, for the banner and the JSON."""
    import timm

    import uniform_vit

    env = dict(
        cpu=cpu_name(), cpu_vendor=cpu_vendor(), reuse_gemm='onednn' if onednn_preferred() else 'torch.mm',
        logical_cpus=_logical_cpus(),
        threads=torch.get_num_threads() if threads is None else threads,
        device=device,
        gpu=torch.cuda.get_device_name(0) if device.startswith('cuda') and torch.cuda.is_available() else None,
        torch=torch.__version__, timm=timm.__version__, uniform_vit=uniform_vit.__version__,
        python=platform.python_version(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
        malloc=allocator_label(),
        date=time.strftime('%Y-%m-%d %H:%M:%S %Z'),
    )
    return env


def _logical_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


# ---- matmul peak ------------------------------------------------------------------------------------------------

# (m, k, n) GEMMs: squares, and the shapes the models' 1x1 convs and attention produce (m = 784 = 16 x 7 x 7)
PEAK_SHAPES = ((512, 512, 512), (1024, 1024, 1024), (784, 128, 256), (784, 256, 128), (784, 288, 576),
               (256, 384, 768), (3136, 256, 256))
# torch.mm (BLAS: MKL/OpenBLAS), a channels-last 1x1 conv (oneDNN's GEMM) and oneDNN's matmul (uniform_vit.layers.gemm:
# on AMD CPUs MKL runs AVX2 kernels and oneDNN AVX-512, so the peak must include the faster library)
PEAK_OPS = ('mm', 'conv1x1', 'onednn')


def matmul_peak_fn(shape: tuple[int, int, int], device: str | torch.device = 'cpu',
                   dtype: torch.dtype = torch.float32, op: str = 'mm',
                   repeat: int = 1) -> tuple[Callable[[], object], float]:
    """(fn, flops): ``repeat`` (m, k) @ (k, n) products, as ``torch.mm`` into a preallocated output,
    (``op='conv1x1'``) as a 1x1 convolution of channels-last maps with m pixels in all, which is how the peers'
    pointwise convs reach oneDNN, or (``op='onednn'``) through oneDNN's matmul, which is how UniForm's deploy form
    runs its own (:class:`~uniform_vit.layers.conv.PointwiseConv2d`). ``repeat`` makes one call long enough
    (~10 ms) to time reliably inside the rounds."""
    m, k, n = shape
    if op == 'conv1x1':
        # m rows as a batch of 7x7 (or 4x4) maps, the models' own shapes: oneDNN blocks these best (measured up to
        # 1.5x the rate of a (1, k, m, 1) map on this CPU)
        bhw = (m // 49, 7, 7) if m % 49 == 0 else (m // 16, 4, 4) if m % 16 == 0 else (1, m, 1)
        x = torch.randn(bhw[0], k, *bhw[1:], device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(n, k, 1, 1, device=device, dtype=dtype)
        one = lambda: torch.nn.functional.conv2d(x, w)  # noqa: E731
    elif op == 'onednn':
        from ..layers.gemm import linear_nt, onednn_linear_available

        a = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        if not onednn_linear_available(a, w):
            one = lambda: torch.mm(a, w.t())  # noqa: E731  (no oneDNN here: same as 'mm')
        else:
            one = lambda: linear_nt(a, w)  # noqa: E731
    elif op == 'mm':
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        c = torch.empty(m, n, device=device, dtype=dtype)
        one = lambda: torch.mm(a, b, out=c)  # noqa: E731
    else:
        raise ValueError(f"unknown peak op {op!r}; choose one of {PEAK_OPS}")

    def fn() -> torch.Tensor:
        for _ in range(repeat - 1):
            one()
        return one()

    return fn, 2.0 * m * k * n * repeat


def calibrate_matmul_peak(device: str | torch.device = 'cpu', dtype: torch.dtype = torch.float32,
                          seconds: float = 0.03, tries: int = 5,
                          shapes: tuple[tuple[int, int, int], ...] = PEAK_SHAPES, ops: tuple[str, ...] = PEAK_OPS,
                          clock: Callable[[], float] = time.perf_counter) -> tuple[str, tuple[int, int, int], float]:
    """Find this machine's best matmul: every (op, shape) candidate runs ``tries`` bursts of ``seconds``, the
    candidates taking turns (one burst each per turn, as the benchmark's own rounds do), and the candidate with the
    highest median burst wins. Returns (op, shape, median FLOP/s) of that candidate, which is then timed inside the
    interleaved rounds so that peak and models see the same machine load. Medians, not best bursts: on a host whose
    clock drifts (a 2-vCPU Zen 3 EPYC of session 16 gave one GEMM 50-76 GFLOP/s from one call to the next), one lucky
    burst picked a candidate that then ran 20 % below the others in the rounds. On CUDA two big squares through
    ``torch.mm`` are tried instead (AMP's fp16 when that is the precision)."""
    if torch.device(device).type == 'cuda':
        shapes, ops = ((4096, 4096, 4096), (8192, 8192, 8192)), ('mm',)
    candidates = {}
    with torch.inference_mode():
        for op in ops:
            for shape in shapes:
                fn, flops = matmul_peak_fn(shape, device, dtype, op)
                fn()
                candidates[(op, shape)] = (fn, flops)
        _sync(device)
        rates: dict[tuple[str, tuple[int, int, int]], list[float]] = {key: [] for key in candidates}
        for _ in range(tries):
            for key, (fn, flops) in candidates.items():
                calls, t0 = 0, clock()
                while True:
                    fn()
                    calls += 1
                    _sync(device)
                    dt = clock() - t0
                    if dt >= seconds:
                        break
                rates[key].append(flops * calls / dt)
    (op, shape), rate = max(((key, statistics.median(r)) for key, r in rates.items()), key=lambda kv: kv[1])
    return op, shape, rate


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


# ---- peak memory of one inference call --------------------------------------------------------------------------

def peak_memory_bytes(fn: Callable[[], object], device: str | torch.device = 'cpu') -> int | None:
    """Peak bytes allocated by torch during one call of ``fn`` above what was live before it.

    CUDA: the caching allocator's own peak counter. CPU: the profiler's allocation events (alloc/free per operator,
    replayed in time order); None when the call allocates through something torch does not see (onnxruntime)."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # an operator's own allocations count from its start, the frees attributed to it (last reference dropped inside
    # it, e.g. by TorchScript) from its end, so a parent's free never lands before its child's allocation
    events = sorted((e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end, e.self_cpu_memory_usage)
                    for e in prof.events() if e.self_cpu_memory_usage)
    if not events:
        return None
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak
