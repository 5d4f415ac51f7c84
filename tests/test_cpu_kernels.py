"""The C++ tiled Reuse core (uniform_vit.layers.cpu_kernels): built where a compiler is, same numbers as eager in
every layout, used by 'tiled' / 'auto', never recorded by a tracer, and a clean fallback when it cannot be built."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import uniform_vit.layers.attention as attention
from conftest import OpLog
from uniform_vit.layers import cpu_kernels
from uniform_vit.layers.attention import reuse_attention

HAS_TOOLS = bool(shutil.which('c++') or shutil.which('g++')) and bool(shutil.which('ninja'))
ISA_OK = torch.backends.cpu.get_cpu_capability() in ('AVX512', 'AVX2')
needs_kernel = pytest.mark.skipif(not (HAS_TOOLS and ISA_OK and cpu_kernels.enabled()),
                                  reason='needs a C++ compiler, ninja and an AVX-512 or AVX2 CPU')


def _inputs(layout: str, b: int, n: int, c: int, g: torch.Generator):
    cq = max(c // 4, 1)
    if layout == 'token-major':  # flattened channels-last maps: what the deploy layer passes
        return tuple(torch.randn(b, n, w, generator=g).transpose(1, 2) for w in (cq, cq, c))
    if layout == 'channel-major':
        return tuple(torch.randn(b, w, n, generator=g) for w in (cq, cq, c))
    qk = torch.randn(b, n, 2 * cq, generator=g).transpose(1, 2)  # q and k split from one channels-last conv output
    return qk[:, :cq], qk[:, cq:], torch.randn(b, c, n, generator=g)


@pytest.fixture
def kernel():
    op = cpu_kernels.reuse_core()  # builds it on first use in this process
    assert op is not None, cpu_kernels.status()
    return op


@needs_kernel
def test_kernel_builds_here():
    # CI has the tools: a failed build must fail a test, not silently fall back
    assert cpu_kernels.status() == 'on'
    assert cpu_kernels.reuse_core() is torch.ops.uniform_vit.reuse_core


@needs_kernel
@pytest.mark.parametrize('layout', ['token-major', 'channel-major', 'sliced'])
@pytest.mark.parametrize('n,c', [(600, 64), (517, 20), (1000, 48), (513, 256)])  # tails of keys, queries, channels
@pytest.mark.parametrize('with_bias', [False, True])
def test_kernel_matches_eager(layout, n, c, with_bias, kernel):
    g = torch.Generator().manual_seed(n + c)
    q, k, v = _inputs(layout, 2, n, c, g)
    bias = torch.randn(n, n, generator=g) if with_bias else None
    ref = reuse_attention(q, k, v, bias, 0.3, 'eager')
    out = kernel(q, k, v, bias, 0.3)
    if layout == 'token-major':
        assert out.shape == (2, n, c)  # (N, C) rows: the caller's (B, C, N) view is token-major, as eager's is
        out = out.transpose(1, 2)
    else:
        assert out.shape == (2, c, n) and out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    tiled = reuse_attention(q, k, v, bias, 0.3, 'tiled')  # the public path takes the kernel and keeps the layout
    assert tiled.stride(1) == ref.stride(1) == (1 if layout == 'token-major' else n)
    assert torch.equal(tiled, out)


@needs_kernel
def test_kernel_threads_give_the_same_numbers(kernel):
    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs('token-major', 1, 700, 64, g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(q, k, v, None, 0.25)
        torch.set_num_threads(2)
        two = kernel(q, k, v, None, 0.25)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # tiles are independent: each thread owns its slice of the map


@needs_kernel
def test_kernel_runs_tiles_on_every_thread(kernel):
    # built without OpenMP, at::parallel_for would run every tile on the calling thread
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.uniform_vit.parallel_width(64) == 2
        torch.set_num_threads(1)
        assert torch.ops.uniform_vit.parallel_width(64) == 1
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_kernel_masked_rows_give_nan_like_softmax(kernel):
    # a query whose bias is -inf for every key has no distribution: ATen's softmax gives NaN, so must the kernel
    g = torch.Generator().manual_seed(1)
    q, k, v = _inputs('channel-major', 1, 520, 32, g)
    bias = torch.randn(520, 520, generator=g)
    bias[3] = float('-inf')
    ref = reuse_attention(q, k, v, bias, 0.3, 'eager')
    out = kernel(q, k, v, bias, 0.3)
    assert torch.isnan(ref[0, :, 3]).all() and torch.isnan(out[0, :, 3]).all()
    keep = torch.ones(520, dtype=torch.bool)
    keep[3] = False
    assert torch.allclose(out[..., keep], ref[..., keep], atol=1e-5)


@needs_kernel
def test_kernel_rejects_bad_inputs(kernel):
    q = torch.randn(1, 8, 600)
    with pytest.raises(RuntimeError, match='float32'):
        kernel(q.double(), q.double(), torch.randn(1, 32, 600).double(), None, 0.3)
    with pytest.raises(RuntimeError, match='shapes do not match'):
        kernel(q, torch.randn(1, 8, 599), torch.randn(1, 32, 600), None, 0.3)
    with pytest.raises(RuntimeError, match=r'bias must be \(N, N\)'):
        kernel(q, q, torch.randn(1, 32, 600), torch.randn(600, 5), 0.3)


@needs_kernel
def test_tiled_core_uses_the_kernel_and_the_switch_turns_it_off(monkeypatch, kernel):
    q, k, v = _inputs('token-major', 1, 600, 32, torch.Generator().manual_seed(2))
    with torch.no_grad(), OpLog() as log:
        reuse_attention(q, k, v, None, 0.3, 'auto')
    assert 'uniform_vit.reuse_core' in log.ops
    monkeypatch.setattr(attention, 'CPU_KERNEL', False)  # the A/B switch of benchmarks/scripts
    with torch.no_grad(), OpLog() as log:
        out = reuse_attention(q, k, v, None, 0.3, 'auto')
    assert 'uniform_vit.reuse_core' not in log.ops and torch.allclose(out, reuse_attention(q, k, v, None, 0.3, 'eager'),
                                                                     atol=1e-5)
    monkeypatch.setattr(attention, 'CPU_KERNEL', True)
    monkeypatch.setenv(cpu_kernels.ENV, '0')  # the user's switch
    assert cpu_kernels.reuse_core() is None and cpu_kernels.status() == f'off ({cpu_kernels.ENV}=0)'


@needs_kernel
def test_traced_code_does_not_record_the_kernel(kernel):
    # a jit trace (and torch.export / ONNX) must stay loadable without this library: the trace takes the ATen path
    q, k, v = _inputs('token-major', 1, 600, 32, torch.Generator().manual_seed(3))
    fn = torch.jit.trace(lambda a, b, c: reuse_attention(a, b, c, None, 0.3, 'tiled'), (q, k, v), check_trace=False)
    assert 'uniform_vit::reuse_core' not in str(fn.inlined_graph)
    assert torch.allclose(fn(q, k, v), reuse_attention(q, k, v, None, 0.3, 'eager'), atol=1e-5)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(**kwargs):
        raise RuntimeError('Ninja is required to load C++ extensions')

    monkeypatch.setattr(cpu_kernels, '_loaded', None)
    monkeypatch.setattr(ext, 'load', broken)
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512')  # so the build is attempted
    with pytest.warns(RuntimeWarning, match='not available.*Ninja is required'):
        assert cpu_kernels.reuse_core() is None
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once: later calls neither rebuild nor warn again
        assert cpu_kernels.reuse_core() is None
    assert cpu_kernels.status().startswith('off (build failed: RuntimeError')
    q, k, v = _inputs('token-major', 1, 600, 32, torch.Generator().manual_seed(4))
    out = reuse_attention(q, k, v, None, 0.3, 'tiled')  # the ATen path
    assert torch.allclose(out, reuse_attention(q, k, v, None, 0.3, 'eager'), atol=1e-5)


def test_no_kernel_for_other_isas(monkeypatch):
    for isa in ('DEFAULT', 'ZVECTOR'):  # no x86 vector unit: PyTorch's scalar or s390x code
        monkeypatch.setattr(cpu_kernels, '_loaded', None)
        monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda isa=isa: isa)
        assert cpu_kernels.reuse_core() is None
        assert cpu_kernels.status() == f'off (no kernel for the {isa} vector ISA)'
