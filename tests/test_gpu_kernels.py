"""The Triton Reuse core (uniform_vit.layers.gpu_kernels): the same numbers as the eager path in every layout, with
tails in queries, keys, q/k width and value channels, with and without bias, fp32 and fp16. CI has no GPU, so the
kernel runs in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, in a child process: the switch must be set
before Triton compiles anything). The same cases run on a CUDA device when there is one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from uniform_vit.layers import gpu_kernels
from uniform_vit.layers.attention import reuse_attention

HAS_TRITON = gpu_kernels._triton() is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason='triton is not installed (it comes with CUDA torch builds)')

# (layout, B, N, C, bias, dtype, config): N not a multiple of any block, C not a power of two (several value-channel
# chunks, a masked last one), Cq = 12 (a masked q/k width), small explicit blocks so that tiny N still walks many key
# blocks and query tiles
CASES = [
    ('channel-major', 2, 100, 64, False, 'float32', None),
    ('token-major', 2, 77, 48, True, 'float32', None),
    ('sliced', 1, 130, 144, True, 'float32', None),
    ('token-major', 2, 70, 64, False, 'float16', None),
    ('channel-major', 1, 90, 64, True, 'float16', None),
    ('sliced', 2, 61, 96, True, 'float32', dict(BLOCK_M=16, BLOCK_N=16, BLOCK_Q=32, BLOCK_C=32, num_warps=4)),
]

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from uniform_vit.layers import gpu_kernels
    from uniform_vit.layers.attention import reuse_attention

    def inputs(layout, b, n, c, g):
        cq = c // 4
        if layout == 'token-major':
            return tuple(torch.randn(b, n, w, generator=g).transpose(1, 2) for w in (cq, cq, c))
        if layout == 'channel-major':
            return tuple(torch.randn(b, w, n, generator=g) for w in (cq, cq, c))
        qk = torch.randn(b, n, 2 * cq, generator=g).transpose(1, 2)  # q, k split from one channels-last conv
        return qk[:, :cq], qk[:, cq:], torch.randn(b, c, n, generator=g)

    device = sys.argv[1]
    results = []
    for layout, b, n, c, with_bias, dtype, config in json.loads(sys.stdin.read()):
        g = torch.Generator().manual_seed(n + c)
        q, k, v = inputs(layout, b, n, c, g)
        bias = torch.randn(n, n, generator=g) if with_bias else None
        dt = getattr(torch, dtype)
        q, k, v = (t.to(dt) for t in (q, k, v))  # a view stays a view of the same layout
        ref = reuse_attention(*(t.double() for t in (q, k, v)), None if bias is None else bias.double(), 0.3,
                              'eager')
        q, k, v = (t.to(device) for t in (q, k, v))
        out = gpu_kernels.reuse_core(q, k, v, None if bias is None else bias.to(device), 0.3, config)
        results.append(dict(shape=list(out.shape), dtype=str(out.dtype), out_stride1=out.stride(1),
                            v_stride1=v.stride(1), finite=bool(torch.isfinite(out).all()),
                            err=float((out.double().cpu() - ref).abs().max()), scale=float(ref.abs().max())))
    print(json.dumps(results))
""")


def _run_child(device: str, cases: list) -> list[dict]:
    env = dict(os.environ)
    if device == 'cpu':
        env['TRITON_INTERPRET'] = '1'
    p = subprocess.run([sys.executable, '-c', CHILD, device], input=json.dumps(cases), capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def interpreted() -> list[dict]:
    return _run_child('cpu', CASES)


@needs_triton
@pytest.mark.parametrize('i', range(len(CASES)), ids=[f'{c[0]}-N{c[2]}-C{c[3]}-{c[5]}' for c in CASES])
def test_kernel_matches_eager_in_the_interpreter(i, interpreted):
    layout, b, n, c, _, dtype, _ = CASES[i]
    r = interpreted[i]
    assert r['shape'] == [b, c, n] and r['dtype'] == f'torch.{dtype}' and r['finite']
    # laid out like v, as the eager path is: token-major values give a (B, N, C) memory view
    assert (r['out_stride1'] == 1) == (layout == 'token-major') == (r['v_stride1'] == 1)
    tol = 1e-5 if dtype == 'float32' else 4e-3  # fp16: the map rounded to fp16 before the value product
    assert r['err'] <= tol * max(1.0, r['scale']), r


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason='needs a CUDA device')
def test_kernel_matches_eager_on_cuda():
    for (layout, *_), r in zip(CASES, _run_child('cuda', CASES)):
        tol = 1e-4 if r['dtype'] == 'torch.float32' else 4e-3
        assert r['finite'] and r['err'] <= tol * max(1.0, r['scale']), (layout, r)


def test_default_config_blocks():
    cfg = gpu_kernels.default_config(32, 128, torch.float16)
    assert (cfg['BLOCK_Q'], cfg['BLOCK_C'], cfg['BLOCK_N']) == (32, 128, 64)
    assert gpu_kernels.default_config(16, 64, torch.float16)['BLOCK_M'] == 128
    f32 = gpu_kernels.default_config(36, 144, torch.float32)
    assert f32['BLOCK_Q'] == 64 and f32['BLOCK_C'] == 64  # powers of two, masked to 36 and 144
    assert gpu_kernels.default_config(3, 12, torch.float16)['BLOCK_Q'] == 16  # the matrix units' minimum width


def test_not_used_off_cuda_under_grad_or_when_switched_off(monkeypatch):
    q = torch.randn(1, 8, 600)
    assert not gpu_kernels.usable(q, q, q)  # CPU tensors take the C++ / ATen path
    if HAS_TRITON:
        monkeypatch.setattr(gpu_kernels, '_on_cuda', lambda t: True)  # as if these were CUDA tensors
        assert gpu_kernels.usable(q, q, q)
        w = torch.randn(1, 8, 600, requires_grad=True)
        assert not gpu_kernels.usable(q, w, q)  # training keeps the eager path (the kernel has no backward)
        with torch.no_grad():
            assert gpu_kernels.usable(q, w, q)
        monkeypatch.setenv(gpu_kernels.ENV, '0')
        assert not gpu_kernels.usable(q, q, q)
        monkeypatch.undo()
    assert gpu_kernels.status('cpu').startswith('off (')


@needs_triton
def test_bad_inputs_are_named():
    q = torch.randn(1, 8, 50)
    with pytest.raises(ValueError, match=r'q and k must be \(B, Cq, N\)'):
        gpu_kernels.reuse_core(q, torch.randn(1, 8, 49), torch.randn(1, 32, 50), None, 0.3)
    with pytest.raises(ValueError, match=r'bias must be \(50, 50\)'):
        gpu_kernels.reuse_core(q, q, torch.randn(1, 32, 50), torch.randn(50, 3), 0.3)
    with pytest.raises(ValueError, match='share one float dtype'):
        gpu_kernels.reuse_core(q, q, torch.randn(1, 32, 50).double(), None, 0.3)


def test_cpu_paths_unchanged_by_the_gpu_kernel():
    # 'auto' on CPU tensors still picks the tiled CPU core at large N and eager below; same numbers either way
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, w, 600, generator=g) for w in (8, 8, 32))
    with torch.no_grad():
        assert torch.allclose(reuse_attention(q, k, v, None, 0.3, 'auto'), reuse_attention(q, k, v, None, 0.3, 'eager'),
                              atol=1e-5)


def test_a_kernel_that_fails_warns_once_and_stays_off(monkeypatch):
    import warnings

    def broken(*args, **kwargs):
        raise RuntimeError('PassManager::run failed\nmore detail')

    monkeypatch.setattr(gpu_kernels, '_broken', '')
    monkeypatch.setattr(gpu_kernels, 'reuse_core', broken)
    monkeypatch.setattr(gpu_kernels, '_on_cuda', lambda t: True)
    q = torch.randn(1, 8, 600)
    with pytest.warns(RuntimeWarning, match='Triton Reuse Attention kernel failed .RuntimeError: PassManager'):
        assert gpu_kernels.reuse_core_or_none(q, q, torch.randn(1, 32, 600), None, 0.3) is None
    assert not gpu_kernels.usable(q, q, q)  # off for the rest of the process: no second compile, no second warning
    if HAS_TRITON:
        assert gpu_kernels.status('cuda') == 'off (failed: RuntimeError: PassManager::run failed)'

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory')

    monkeypatch.setattr(gpu_kernels, 'reuse_core', oom)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(torch.OutOfMemoryError):  # not a kernel failure: the ATen path would need more memory
            gpu_kernels.reuse_core_or_none(q, q, torch.randn(1, 32, 600), None, 0.3)
