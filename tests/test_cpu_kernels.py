"""The C++ CPU kernels (uniform_vit.layers.cpu_kernels): built where a compiler is, a clean fallback when they cannot
be. The tiled Reuse core: same numbers as eager in every layout, used by 'tiled' / 'auto', never recorded by a
tracer. The stem conv and the depthwise conv: same numbers as ATen's convs at every size, used by the deploy form,
recorded by the bench's traces but not by graphs written for other machines. The same for the residual FFN, the 1x1
convs, the stem's later 3x3 stride-2 convs and patch merging's expansion + depthwise conv, which share one
register-blocked product."""

from __future__ import annotations

import shutil
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import uniform_vit.layers.attention as attention
import uniform_vit.layers.conv as conv_mod
from conftest import OpLog
from uniform_vit.layers import cpu_kernels
from uniform_vit.layers.attention import reuse_attention
from uniform_vit.layers.conv import FFN, DepthwiseConv2d, Residual, ResidualFFN, SameConv2d, aten_only, make_conv
from uniform_vit.layers.fuse import reparameterize
from uniform_vit.models.uniform import DeployPatchMerging, _avx512

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


def _one_and_two_threads(fn):
    """fn() with 1 thread, then with 2 (the ops spread their work over torch's threads: the numbers must not move)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(2)
        two = fn()
    finally:
        torch.set_num_threads(before)
    return one, two


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
    assert cpu_kernels.stem_conv() is torch.ops.uniform_vit.stem_conv
    assert cpu_kernels.depthwise_conv() is torch.ops.uniform_vit.depthwise_conv
    assert cpu_kernels.residual_ffn() is torch.ops.uniform_vit.residual_ffn


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
    one, two = _one_and_two_threads(lambda: kernel(q, k, v, None, 0.25))
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
def test_bench_traces_record_the_kernel_and_portable_ones_do_not(kernel):
    # the bench's in-process trace records the op, as it does the deploy form's other ops; a graph for other machines
    # (traced under aten_only(), as export does) must stay loadable without this library: it takes the ATen path
    q, k, v = _inputs('token-major', 1, 600, 32, torch.Generator().manual_seed(3))
    fn = lambda a, b, c: reuse_attention(a, b, c, None, 0.3, 'tiled')  # noqa: E731
    traced = torch.jit.trace(fn, (q, k, v), check_trace=False)
    assert 'uniform_vit::reuse_core' in str(traced.inlined_graph)
    with aten_only():
        portable = torch.jit.trace(fn, (q, k, v), check_trace=False)
    assert 'uniform_vit::reuse_core' not in str(portable.inlined_graph)
    for f in (traced, portable):
        assert torch.allclose(f(q, k, v), reuse_attention(q, k, v, None, 0.3, 'eager'), atol=1e-5)


@needs_kernel
@pytest.mark.parametrize('layout', ['token-major', 'channel-major', 'sliced'])
@pytest.mark.parametrize('n, c, bias', [(49, 64, True), (49, 20, False), (16, 48, True), (1, 16, True),
                                        (100, 32, True), (181, 32, True)])  # 181: past the transposed bias copy
def test_small_maps_take_the_kernel_in_inference(kernel, layout, n, c, bias):
    # UniForm's windows (N = 49, and 16 in its last stage) go through the C++ core when no gradient is needed: many
    # small images in one call (one loop over every image's tiles), the bias read transposed; same numbers as eager,
    # on 1 and 2 threads
    g = torch.Generator().manual_seed(n + c)
    q, k, v = _inputs(layout, 37, n, c, g)
    b = torch.randn(n, n, generator=g) if bias else None
    if b is not None and n > 3:
        b[3] = float('-inf')  # a query with no distribution: NaN, as ATen's softmax gives it
    ref = reuse_attention(q, k, v, b, 0.3, 'eager')
    with torch.no_grad(), OpLog() as log:
        one, two = _one_and_two_threads(lambda: reuse_attention(q, k, v, b, 0.3, 'auto'))
    assert 'uniform_vit.reuse_core' in log.ops and torch.allclose(one, two, rtol=0, atol=0, equal_nan=True)
    assert torch.allclose(one, ref, atol=1e-5, rtol=1e-4, equal_nan=True)
    assert one.stride(1) == ref.stride(1)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))  # training keeps eager (the kernel has no backward)
    with OpLog() as log:
        reuse_attention(qr, kr, vr, b, 0.3, 'auto').sum().backward()
    assert 'uniform_vit.reuse_core' not in log.ops and qr.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# the stem's first conv + ReLU


@pytest.fixture
def stem_op():
    op = cpu_kernels.stem_conv()  # builds the library on first use in this process
    assert op is not None, cpu_kernels.status()
    return op


@needs_kernel
@pytest.mark.parametrize('cout', cpu_kernels.STEM_CHANNELS)
# odd/even, tiny, and rows wide enough for whole runs of every register blocking (AVX2: up to 10 pixels; the
# AVX-512 code's runs of 8 groups of 4 pixels, then shorter runs, and a last group of 1-3 pixels)
@pytest.mark.parametrize('cin,h,w', [(3, 40, 38), (1, 29, 33), (3, 1, 1), (2, 2, 35), (3, 7, 2), (3, 5, 71),
                                     (1, 4, 64)])
@pytest.mark.parametrize('relu', [True, False])
def test_stem_conv_matches_aten(cout, cin, h, w, relu, stem_op):
    g = torch.Generator().manual_seed(cout * 100 + h + w)
    x = torch.randn(3, cin, h, w, generator=g)
    wt = torch.randn(cout, cin, 3, 3, generator=g)
    b = torch.randn(cout, generator=g)
    ref = F.conv2d(x, wt, b, stride=2, padding=1)
    ref = ref.relu() if relu else ref
    out = stem_op(x, wt, b, relu)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    # any input layout: a channels-last image and a batch slice give the same numbers
    assert torch.equal(stem_op(x.contiguous(memory_format=torch.channels_last), wt, b, relu),
                       out)
    assert torch.equal(stem_op(x[1:], wt, b, relu), out[1:])


@needs_kernel
def test_stem_conv_threads_give_the_same_numbers(stem_op):
    g = torch.Generator().manual_seed(5)
    x, wt, b = torch.randn(2, 3, 64, 64, generator=g), torch.randn(16, 3, 3, 3, generator=g), torch.randn(16)
    one, two = _one_and_two_threads(lambda: stem_op(x, wt, b, True))
    assert torch.equal(one, two)


@needs_kernel
def test_stem_conv_rejects_bad_inputs(stem_op):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(RuntimeError, match='8, 16 or 24 output channels'):
        stem_op(x, torch.randn(12, 3, 3, 3), torch.randn(12), True)
    with pytest.raises(RuntimeError, match='do not fit an input of 3 channels'):
        stem_op(x, torch.randn(8, 1, 3, 3), torch.randn(8), True)
    with pytest.raises(RuntimeError, match='float32'):
        stem_op(x.double(), torch.randn(8, 3, 3, 3).double(), torch.randn(8).double(), True)


@needs_kernel
def test_stem_conv_flops_are_counted(stem_op):
    from torch.utils.flop_counter import FlopCounterMode

    x, wt, b = torch.randn(2, 3, 33, 40), torch.randn(8, 3, 3, 3), torch.randn(8)
    with FlopCounterMode(display=False) as fc:
        stem_op(x, wt, b, True)
    assert fc.get_total_flops() == 2 * 2 * 17 * 20 * 8 * 3 * 9


@needs_kernel
@pytest.mark.parametrize('name,in_chans', [('uniform_t', 3), ('uniform_s', 1)])
def test_deploy_stem_uses_the_kernel_where_it_may(name, in_chans, stem_op):
    model = _trained_looking(timm.create_model(name, in_chans=in_chans, num_classes=10).eval())
    deploy = reparameterize(model)
    stem = deploy.patch_embed
    x = torch.randn(4, in_chans, 64, 72)
    with torch.no_grad():
        ref = model(x)
        with OpLog() as log:
            out = deploy(x)
        assert log.ops.count('uniform_vit.stem_conv') == stem.batch_chunks()  # once per batch chunk (2, or 4)
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
        stem.stem_kernel = False
        with OpLog() as log:
            aten = deploy(x)
        assert 'uniform_vit.stem_conv' not in log.ops and torch.allclose(out, aten, atol=1e-5, rtol=1e-5)
        stem.stem_kernel = True
        # the bench's trace runs it; a trace for other machines (TorchScript export) holds ATen ops only
        traced, portable = _recorded_by_bench_traces_only(deploy, x, 'stem_conv')
        assert torch.equal(traced(x), out) and torch.allclose(portable(x), out, atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)  # a gradient is needed: the op has no backward, so ATen's conv runs
    with OpLog() as log:
        deploy(x).sum().backward()
    assert 'uniform_vit.stem_conv' not in log.ops and x.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# depthwise convs


@pytest.fixture
def dw_op():
    op = cpu_kernels.depthwise_conv()
    assert op is not None, cpu_kernels.status()
    return op


@needs_kernel
@pytest.mark.parametrize('c', [1, 5, 8, 16, 24, 60, 64, 72, 130])  # every channel block (64/32/16/8) and masked tails
@pytest.mark.parametrize('k,stride', [(3, 1), (5, 1), (7, 1), (3, 2)])
def test_depthwise_conv_matches_aten(c, k, stride, dw_op):
    g = torch.Generator().manual_seed(c * 10 + k + stride)
    w, b = torch.randn(c, 1, k, k, generator=g), torch.randn(c, generator=g)
    # maps smaller than the kernel too; 5-8 pixels a side take the AVX-512 build's zero-bordered path (runs of 5-8)
    for h, wd in [(7, 7), (14, 9), (2, 3), (1, 1), (4, 4), (5, 8), (8, 6)]:
        x = torch.randn(2, c, h, wd, generator=g).contiguous(memory_format=torch.channels_last)
        ref = F.conv2d(x, w, b, stride, k // 2, 1, c)
        out = dw_op(x, w, b, stride)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (h, wd)
    assert torch.allclose(dw_op(x, w, None, stride), F.conv2d(x, w, None, stride, k // 2, 1, c), atol=1e-5)
    assert torch.equal(dw_op(x.contiguous(), w, b, stride), out)  # an NCHW input is read through a copy
    taps = w.reshape(c, k * k).t().contiguous()  # the (k*k, C) weight the module keeps
    assert torch.equal(dw_op(x, taps, b, stride), out)
    # a channel slice of a wider channels-last map (attention's queries) is read in place
    wide = torch.randn(2, c + 7, x.shape[2], x.shape[3], generator=g).contiguous(memory_format=torch.channels_last)
    wide[:, 3:3 + c] = x
    part = wide[:, 3:3 + c]
    assert conv_mod.channels_innermost(part) and not part.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(dw_op(part, w, b, stride), out)


@needs_kernel
@pytest.mark.parametrize('size', [14, 7])
def test_depthwise_conv_threads_give_the_same_numbers(dw_op, size):
    x = torch.randn(5, 72, size, size).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(72, 1, 7, 7), torch.randn(72)
    one, two = _one_and_two_threads(lambda: dw_op(x, w, b, 1))
    assert torch.equal(one, two)


@needs_kernel
def test_depthwise_conv_rejects_bad_inputs(dw_op):
    x = torch.randn(1, 8, 7, 7)
    with pytest.raises(RuntimeError, match='odd k'):
        dw_op(x, torch.randn(8, 1, 4, 4), None, 1)
    with pytest.raises(RuntimeError, match=r'is not \(C, 1, k, k\)'):
        dw_op(x, torch.randn(4, 1, 3, 3), None, 1)
    with pytest.raises(RuntimeError, match=r'is not \(k\*k, C\)'):
        dw_op(x, torch.randn(8, 8), None, 1)
    with pytest.raises(RuntimeError, match='float32'):
        dw_op(x.double(), torch.randn(8, 1, 3, 3).double(), None, 1)
    with pytest.raises(RuntimeError, match='stride must be positive'):
        dw_op(x, torch.randn(8, 1, 3, 3), None, 0)
    with pytest.raises(RuntimeError, match='bias'):
        dw_op(x, torch.randn(8, 1, 3, 3), torch.randn(5), 1)


@needs_kernel
def test_depthwise_conv_flops_are_counted(dw_op):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 16, 9, 8).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as fc:
        dw_op(x, torch.randn(16, 1, 3, 3), torch.randn(16), 2)
    assert fc.get_total_flops() == 2 * 2 * 16 * 5 * 4 * 9


@needs_kernel
def test_depthwise_conv_radius_skips_zero_taps(dw_op):
    g = torch.Generator().manual_seed(11)
    c, k = 76, 7  # blocks of 64 and 8 channels and a masked tail of 4
    radius = torch.arange(c) % 4  # as Reuse Attention's merged value conv: 1x1, 3x3, 5x5, 7x7 kernels
    w = torch.randn(c, 1, k, k, generator=g)
    d = (torch.arange(k) - k // 2).abs()
    ring = torch.maximum(d[:, None], d[None, :])
    w = w * (ring[None, None] <= radius[:, None, None, None])  # zero outside each channel's radius
    b = torch.randn(c, generator=g)
    for stride, (h, wd) in [(1, (7, 7)), (1, (5, 9)), (2, (14, 14)), (1, (1, 1))]:
        x = torch.randn(2, c, h, wd, generator=g).contiguous(memory_format=torch.channels_last)
        ref = F.conv2d(x, w, b, stride, k // 2, 1, c)
        out = dw_op(x, w, b, stride, radius)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(out, dw_op(x, w, b, stride), atol=1e-5, rtol=1e-5)
    # the radius is obeyed: radius 0 everywhere is the centre tap alone
    centre = torch.zeros_like(w)
    centre[:, :, k // 2, k // 2] = w[:, :, k // 2, k // 2]
    assert torch.allclose(dw_op(x, w, b, 1, torch.zeros(c, dtype=torch.long)), F.conv2d(x, centre, b, 1, k // 2, 1, c),
                          atol=1e-5)
    with pytest.raises(RuntimeError, match=r'radius must lie in 0 .. 3'):
        dw_op(x, w, b, 1, torch.full((c,), 4))
    with pytest.raises(RuntimeError, match=r'radius must be \(C\)'):
        dw_op(x, w, b, 1, radius[:5])
    # the module finds the radius in its weights and follows weight changes
    m = make_conv(c, c, k, 1, k // 2, groups=c).eval()
    with torch.no_grad():
        m.weight.copy_(w)
        assert torch.equal(m._kernel_args()[1], radius)  # (taps-major weight, radius)
        assert torch.allclose(m(x), F.conv2d(x, w, m.bias, 1, k // 2, 1, c), atol=1e-5)
        m.weight.normal_()  # every tap in use now
        assert m._kernel_args()[1] is None
        assert torch.allclose(m(x), F.conv2d(x, m.weight, m.bias, 1, k // 2, 1, c), atol=1e-5)


@needs_kernel
def test_depthwise_module_uses_the_kernel_where_it_may(monkeypatch, dw_op):
    assert type(make_conv(32, 32, 3, 2, 1, groups=32)) is DepthwiseConv2d
    assert type(make_conv(32, 32, 7, 1, 3, groups=32)) is DepthwiseConv2d
    assert type(make_conv(32, 32, 3, 1, 1)) is SameConv2d  # not depthwise
    for stride in (1, 2):
        m = make_conv(24, 24, 7, stride, 3, groups=24).eval()
        x = torch.randn(2, 24, 3, 5).contiguous(memory_format=torch.channels_last)  # smaller than the kernel
        ref = F.conv2d(x, m.weight, m.bias, stride, 3, 1, 24)
        with torch.no_grad():
            m(x)  # the first call also works out the kernel's tap radius (cached)
            with OpLog() as log:
                out = m(x)
            assert log.ops == ['uniform_vit.depthwise_conv'] and torch.allclose(out, ref, atol=1e-5)
            part = torch.cat([x, x], 1).contiguous(memory_format=torch.channels_last)[:, 24:]
            with OpLog() as log:  # a channel slice (attention's queries) too, read in place
                out = m(part)
            assert log.ops == ['uniform_vit.depthwise_conv'] and torch.allclose(out, ref, atol=1e-5)
            with OpLog() as log:  # NCHW maps keep ATen's conv
                assert torch.allclose(m(x.contiguous()), ref, atol=1e-5)
            assert 'uniform_vit.depthwise_conv' not in log.ops
            _, portable = _recorded_by_bench_traces_only(m, x, 'depthwise_conv')
            assert torch.allclose(portable(x), ref, atol=1e-5)
        with OpLog() as log:  # a gradient is needed: ATen's conv
            m(x).sum().backward()
        assert 'uniform_vit.depthwise_conv' not in log.ops and m.weight.grad is not None
        monkeypatch.setattr(conv_mod, 'DEPTHWISE_KERNEL', False)  # the A/B switch of benchmarks/scripts
        with torch.no_grad(), OpLog() as log:
            assert torch.allclose(m(x), ref, atol=1e-5)
        assert 'uniform_vit.depthwise_conv' not in log.ops
        monkeypatch.setattr(conv_mod, 'DEPTHWISE_KERNEL', True)


# ---------------------------------------------------------------------------------------------------------------
# the residual FFN


@pytest.fixture
def ffn_op():
    op = cpu_kernels.residual_ffn()
    assert op is not None, cpu_kernels.status()
    return op


def _ffn_ref(x, w1t, b1, w2t, b2):
    return x + torch.relu(x @ w1t + b1) @ w2t + b2


@needs_kernel
@pytest.mark.parametrize('m,c,h', [(3136, 64, 128), (97, 240, 480), (5, 20, 40), (50, 33, 7), (13, 8, 0), (0, 16, 32)])
def test_residual_ffn_matches_aten(m, c, h, ffn_op):  # row tails (not a multiple of 6 / 12), column tails, no hidden
    g = torch.Generator().manual_seed(m + c + h)
    x = torch.randn(m, c, generator=g)
    w1t, b1 = torch.randn(c, h, generator=g) / c ** 0.5, torch.randn(h, generator=g)
    w2t, b2 = torch.randn(h, c, generator=g) / max(h, 1) ** 0.5, torch.randn(c, generator=g)
    out = ffn_op(x, w1t, b1, w2t, b2)
    assert out.shape == (m, c)
    assert torch.allclose(out, _ffn_ref(x, w1t, b1, w2t, b2), atol=1e-4, rtol=1e-5)
    # any strides: a transposed weight view is read through a copy
    assert torch.equal(ffn_op(x, w1t.t().contiguous().t(), b1, w2t, b2), out)


@needs_kernel
def test_residual_ffn_threads_give_the_same_numbers(ffn_op):
    x, w1t, w2t = torch.randn(700, 48), torch.randn(48, 96), torch.randn(96, 48)
    b1, b2 = torch.randn(96), torch.randn(48)
    one, two = _one_and_two_threads(lambda: ffn_op(x, w1t, b1, w2t, b2))
    assert torch.equal(one, two)


@needs_kernel
def test_residual_ffn_rejects_bad_inputs(ffn_op):
    x, w1t, w2t, b1, b2 = torch.randn(10, 8), torch.randn(8, 16), torch.randn(16, 8), torch.randn(16), torch.randn(8)
    with pytest.raises(RuntimeError, match='shapes do not match'):
        ffn_op(x, w1t, b1, torch.randn(16, 9), b2)
    with pytest.raises(RuntimeError, match='float32'):
        ffn_op(x.double(), w1t, b1, w2t, b2)
    with pytest.raises(RuntimeError, match=r'expected x \(M, C\)'):
        ffn_op(x[None], w1t, b1, w2t, b2)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        ffn_op(x, w1t, b1, w2t, b2)
    assert fc.get_total_flops() == 4 * 10 * 8 * 16


def _recorded_by_bench_traces_only(module: torch.nn.Module, x: torch.Tensor, op: str):
    """The bench's in-process trace records the op; a trace for other machines (under aten_only()) does not."""
    traced = torch.jit.trace(module, x, check_trace=False)
    assert f'uniform_vit::{op}' in str(traced.inlined_graph)
    with aten_only():
        portable = torch.jit.trace(module, x, check_trace=False)
    assert f'uniform_vit::{op}' not in str(portable.inlined_graph)
    return traced, portable


def _trained_looking(module: torch.nn.Module) -> torch.nn.Module:
    for m in module.modules():  # non-trivial BN statistics and weights (the FFN's second BN starts at weight 0)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return module


@needs_kernel
def test_residual_ffn_module_uses_the_kernel_where_it_may(monkeypatch, ffn_op):
    res = _trained_looking(Residual(FFN(24, 48))).eval()
    fused = res.fuse()
    assert type(fused) is ResidualFFN and fused.fuse() is fused
    assert set(fused.state_dict()) == set(Residual(FFN(24, 48)).fuse().state_dict())  # no extra keys
    x = torch.randn(2, 24, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = res(x)
        with OpLog() as log:
            out = fused(x)
        assert log.ops.count('uniform_vit.residual_ffn') == 1 and torch.allclose(out, ref, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)
        with OpLog() as log:  # NCHW maps keep the convs
            assert torch.allclose(fused(x.contiguous()), ref, atol=1e-5)
        assert 'uniform_vit.residual_ffn' not in log.ops
        _recorded_by_bench_traces_only(fused, x, 'residual_ffn')
        # new weights (a fused checkpoint loaded into a deploy model) reach the op: its transposed copy is a cache
        other = _trained_looking(Residual(FFN(24, 48))).eval()
        fused.load_state_dict(other.fuse().state_dict())
        assert torch.allclose(fused(x), other(x), atol=1e-5)
        monkeypatch.setattr(conv_mod, 'FFN_KERNEL', False)  # the A/B switch of benchmarks/scripts
        with OpLog() as log:
            assert torch.allclose(fused(x), other(x), atol=1e-5)
        assert 'uniform_vit.residual_ffn' not in log.ops


# ---------------------------------------------------------------------------------------------------------------
# 1x1 convs, the stem's 3x3 stride-2 convs, patch merging's expansion + depthwise conv (tile_gemm.h)


def _op(name: str):
    op = getattr(cpu_kernels, name)()
    assert op is not None, cpu_kernels.status()
    return op


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@needs_kernel
@pytest.mark.parametrize('m,k,n', [(3136, 64, 256), (97, 240, 120), (5, 20, 40), (50, 33, 7), (13, 8, 1), (0, 16, 32)])
def test_pointwise_conv_matches_aten(m, k, n):  # row tails (not a multiple of 6 / 12), column tails, one column
    op = _op('pointwise_conv')
    g = torch.Generator().manual_seed(m + k + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)
    for relu in (False, True):
        ref = F.linear(x, w, b)
        out = op(x, w.t().contiguous(), b, relu)
        assert out.shape == (m, n)
        assert torch.allclose(out, ref.relu() if relu else ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(op(x, w.t(), None, False), F.linear(x, w), atol=1e-5, rtol=1e-5)  # no bias, any strides


@needs_kernel
@pytest.mark.parametrize('n', [1, 5, 8, 13])
def test_column_tails_sum_like_whole_vectors(n):
    """The last N mod V output columns of the products are one masked vector, summed in the same order as a whole
    one: the first n columns of a 16-column product are bitwise an n-column product's, packed or not, for every ISA
    (until session 26 they were scalar columns on AVX-512, which rounded differently and ran uniform_m's 120-wide
    query conv at 0.28x oneDNN's speed)."""
    pw = _op('pointwise_conv')
    g = torch.Generator().manual_seed(n)
    x, wt, b = torch.randn(37, 40, generator=g), torch.randn(40, 16, generator=g), torch.randn(16, generator=g)
    full = pw(x, wt, b, True)
    part = wt[:, :n].contiguous()
    assert torch.equal(pw(x, part, b[:n], True), full[:, :n])
    assert torch.equal(pw(x, cpu_kernels.pack_panels(part), b[:n], True, True), full[:, :n])


@needs_kernel
@pytest.mark.parametrize('n', [1, 7, 8, 16, 17, 24, 120, 513])  # whole panels, a vector panel, masked tails
def test_packed_weights_give_the_same_products(n):
    g = torch.Generator().manual_seed(n)
    k = 40
    x, wt, b = torch.randn(53, k, generator=g), torch.randn(k, n, generator=g) / k ** 0.5, torch.randn(n, generator=g)
    packed = cpu_kernels.pack_panels(wt)
    assert packed.shape == wt.shape and torch.equal(packed.flatten().sort().values, wt.flatten().sort().values)
    if n > 32:  # wider than one panel (16 columns with AVX2, 32 with AVX-512): column panels one after another
        assert not torch.equal(packed, wt)
    pw = _op('pointwise_conv')
    assert torch.allclose(pw(x, packed, b, True, True), pw(x, wt, b, True), atol=1e-6, rtol=1e-6)
    assert torch.allclose(pw(x, packed, b, False, True), x @ wt + b, atol=1e-5, rtol=1e-5)
    # the FFN: both weights packed; C = n channels, H = 2n hidden
    w1t, b1 = torch.randn(n, 2 * n, generator=g) / n ** 0.5, torch.randn(2 * n, generator=g)
    w2t = torch.randn(2 * n, n, generator=g) / (2 * n) ** 0.5
    xf = torch.randn(50, n, generator=g)
    ffn = _op('residual_ffn')
    ref = ffn(xf, w1t, b1, w2t, b)
    out = ffn(xf, cpu_kernels.pack_panels(w1t), b1, cpu_kernels.pack_panels(w2t), b, True)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    # patch merging's expansion
    xm = torch.randn(2, k, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
    wdw, bdw = torch.randn(3, 3, n, generator=g), torch.randn(n, generator=g)
    e = _op('expand_dw')
    assert torch.allclose(e(xm, packed, b, wdw, bdw, True), e(xm, wt, b, wdw, bdw), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_pointwise_conv_threads_bad_inputs_and_flops():
    op = _op('pointwise_conv')
    x, wt, b = torch.randn(700, 48), torch.randn(48, 96), torch.randn(96)
    one, two = _one_and_two_threads(lambda: op(x, wt, b, True))
    assert torch.equal(one, two)
    with pytest.raises(RuntimeError, match='x has 48 channels, wt 47 rows'):
        op(x, torch.randn(47, 96), b, False)
    with pytest.raises(RuntimeError, match=r'bias must be \(96\)'):
        op(x, wt, torch.randn(5), False)
    with pytest.raises(RuntimeError, match='float32'):
        op(x.double(), wt.double(), None, False)
    with pytest.raises(RuntimeError, match=r'expected x \(M, K\)'):
        op(x[None], wt, b, False)
    assert _flops(lambda: op(x, wt, b, False)) == 2 * 700 * 48 * 96


@needs_kernel
def test_token_row_ops_take_maps_and_a_residual(ffn_op):
    # a channels-last (B, C, H, W) map is its (B*H*W, C) rows: same numbers, returned as a channels-last map (the
    # deploy form passes maps, so a trace records no views around the ops); the 1x1 op adds a residual in its store
    pw = _op('pointwise_conv')
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 24, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 24)
    wt, b = torch.randn(24, 40, generator=g), torch.randn(40, generator=g)
    out = pw(x, wt, b, True)
    assert out.shape == (3, 40, 5, 7) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.permute(0, 2, 3, 1).reshape(-1, 40), pw(rows, wt, b, True))
    assert torch.equal(pw(x.contiguous(), wt, b, True), out)  # an NCHW map goes through a channels-last copy
    res = torch.randn(3, 40, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    assert torch.allclose(pw(x, wt, b, False, False, res), pw(x, wt, b, False) + res, atol=1e-6)
    assert torch.allclose(pw(x, cpu_kernels.pack_panels(wt), b, False, True, res), pw(x, wt, b, False) + res,
                          atol=1e-5)
    assert torch.allclose(pw(rows, wt, None, False, False, res.permute(0, 2, 3, 1).reshape(-1, 40)),
                          rows @ wt + res.permute(0, 2, 3, 1).reshape(-1, 40), atol=1e-5)
    with pytest.raises(RuntimeError, match='shaped like the output'):
        pw(x, wt, b, False, False, res[:, :39])
    with pytest.raises(RuntimeError, match='a residual and a ReLU'):
        pw(x, wt, b, True, False, res)
    assert _flops(lambda: pw(x, wt, b, False)) == 2 * 3 * 5 * 7 * 24 * 40
    w1t, w2t = torch.randn(24, 48, generator=g), torch.randn(48, 24, generator=g)
    b1, b2 = torch.randn(48, generator=g), torch.randn(24, generator=g)
    y = ffn_op(x, w1t, b1, w2t, b2)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.permute(0, 2, 3, 1).reshape(-1, 24), ffn_op(rows, w1t, b1, w2t, b2))
    assert _flops(lambda: ffn_op(x, w1t, b1, w2t, b2)) == 4 * 3 * 5 * 7 * 24 * 48


@needs_kernel
def test_head_linear_runs_on_the_product_for_batches():
    from uniform_vit.layers.conv import BNLinear, KernelLinear

    head = BNLinear(48, 10).eval()
    with torch.no_grad():
        head.bn.running_mean.uniform_(-1, 1)
        head.bn.running_var.uniform_(0.5, 2)
    fused = head.fuse()
    assert type(fused) is KernelLinear and set(fused.state_dict()) == {'weight', 'bias'}
    for rows, kernel in ((16, True), (1, False)):  # one row (batch-1 latency) keeps addmm, which is faster there
        x = torch.randn(rows, 48)
        with torch.no_grad(), OpLog() as log:
            out = fused(x)
        assert ('uniform_vit.pointwise_conv' in log.ops) == kernel
        with torch.no_grad():
            assert torch.allclose(out, head(x), atol=1e-5)
    x = torch.randn(16, 48)
    with torch.no_grad(), aten_only(), OpLog() as log:
        fused(x)
    assert 'uniform_vit.pointwise_conv' not in log.ops
    x.requires_grad_()
    fused(x).sum().backward()  # training keeps nn.Linear's autograd
    assert x.grad is not None


@needs_kernel
@pytest.mark.parametrize('layout', ['token-major', 'channel-major'])
@pytest.mark.parametrize('n', [49, 100])  # 100: two blocks of keys in the token-major value product
def test_kernel_relu_is_applied_at_the_store(kernel, layout, n):
    g = torch.Generator().manual_seed(n)
    q, k, v = _inputs(layout, 3, n, 32, g)
    bias = torch.randn(n, n, generator=g)
    ref = reuse_attention(q, k, v, bias, 0.3, 'eager').relu()
    with torch.no_grad():
        out = reuse_attention(q, k, v, bias, 0.3, 'auto', relu=True)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4) and (out >= 0).all()
        aten_tiles = attention._reuse_tiled(q, k, v, bias, 0.3, tile=16, relu=True)  # a tile size: the ATen loop
        assert torch.allclose(aten_tiles, ref, atol=1e-5, rtol=1e-4)
    assert torch.allclose(reuse_attention(q, k, v, bias, 0.3, 'eager', relu=True), ref)


@needs_kernel
def test_pointwise_module_uses_the_kernel_where_it_may(monkeypatch):
    m = make_conv(24, 40, 1).eval()
    x = torch.randn(2, 24, 5, 7).contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, m.weight, m.bias)
    with torch.no_grad():
        with OpLog() as log:
            out = m(x)
        assert 'uniform_vit.pointwise_conv' in log.ops and torch.allclose(out, ref, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)
        with OpLog() as log:  # NCHW maps: the plain conv
            assert torch.allclose(m(x.contiguous()), ref, atol=1e-5)
        assert 'uniform_vit.pointwise_conv' not in log.ops
        _, portable = _recorded_by_bench_traces_only(m, x, 'pointwise_conv')
        assert torch.allclose(portable(x), ref, atol=1e-5)
        # new weights reach the op: its transposed copy is a cache
        m.weight.mul_(-2.0)
        assert torch.allclose(m(x), F.conv2d(x, m.weight, m.bias), atol=1e-5)
        monkeypatch.setattr(conv_mod, 'PACK_WEIGHTS', False)  # plain transposed weights: the cache is rebuilt
        assert torch.allclose(m(x), F.conv2d(x, m.weight, m.bias), atol=1e-5)
        monkeypatch.setattr(conv_mod, 'POINTWISE_KERNEL', False)  # the A/B switch: oneDNN's matmul then
        with OpLog() as log:
            assert torch.allclose(m(x), F.conv2d(x, m.weight, m.bias), atol=1e-5)
        assert 'uniform_vit.pointwise_conv' not in log.ops
    assert 'pointwise_conv' not in ''.join(m.state_dict())  # the cache is no state


@needs_kernel
@pytest.mark.parametrize('cin,cout', [(8, 16), (5, 12), (32, 64), (3, 1)])  # panels, vector and scalar column tails
# odd/even, tiny; rows of 55 and 29 interior pixels: five register blocks of 11, and blocks of 10, 10 and 9
@pytest.mark.parametrize('h,w', [(40, 38), (29, 33), (1, 1), (2, 35), (7, 2), (4, 5), (3, 112), (5, 60)])
def test_conv3x3_s2_matches_aten(cin, cout, h, w):
    op = _op('conv3x3_s2')
    g = torch.Generator().manual_seed(cin * 100 + cout + h + w)
    x = torch.randn(2, cin, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5, torch.randn(cout, generator=g)
    for relu in (False, True):
        ref = F.conv2d(x, wt, b, stride=2, padding=1)
        out = op(x, wt.permute(2, 3, 1, 0).contiguous(), b, relu)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(out, ref.relu() if relu else ref, atol=1e-5, rtol=1e-5)
    # no bias; an NCHW input is read through a copy
    assert torch.allclose(op(x.contiguous(), wt.permute(2, 3, 1, 0), None, False), F.conv2d(x, wt, None, 2, 1),
                          atol=1e-5, rtol=1e-5)


@needs_kernel
def test_conv3x3_s2_threads_bad_inputs_and_flops():
    op = _op('conv3x3_s2')
    x = torch.randn(3, 16, 20, 18).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(3, 3, 16, 32), torch.randn(32)
    one, two = _one_and_two_threads(lambda: op(x, wt, b, True))
    assert torch.equal(one, two)
    with pytest.raises(RuntimeError, match='x has 16 channels, wt 8'):
        op(x, torch.randn(3, 3, 8, 32), b, False)
    with pytest.raises(RuntimeError, match=r'expected x \(B, Cin, H, W\) and wt \(3, 3, Cin, Cout\)'):
        op(x, torch.randn(32, 16, 3, 3), b, False)
    with pytest.raises(RuntimeError, match=r'bias must be \(32\)'):
        op(x, wt, torch.randn(3), False)
    with pytest.raises(RuntimeError, match='float32'):
        op(x.double(), wt.double(), None, False)
    assert _flops(lambda: op(x, wt, b, False)) == 2 * 3 * 10 * 9 * 32 * 16 * 9


def _expand_dw_ref(x, w1, b1, wd, bd):
    return F.conv2d(F.conv2d(x, w1, b1).relu(), wd, bd, 2, 1, 1, wd.shape[0]).relu()


@needs_kernel
@pytest.mark.parametrize('c,x_', [(64, 256), (24, 96), (6, 20), (5, 3)])  # channel blocks of 32 / 8 and tails
@pytest.mark.parametrize('h,w', [(14, 14), (7, 7), (9, 4), (1, 1), (2, 3), (20, 5)])  # several row chunks, odd sizes
def test_expand_dw_matches_aten(c, x_, h, w):
    op = _op('expand_dw')
    g = torch.Generator().manual_seed(c + x_ + h * w)
    x = torch.randn(2, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    w1, b1 = torch.randn(x_, c, 1, 1, generator=g) / c ** 0.5, torch.randn(x_, generator=g)
    wd, bd = torch.randn(x_, 1, 3, 3, generator=g), torch.randn(x_, generator=g)
    out = op(x, w1.flatten(1).t().contiguous(), b1, wd[:, 0].permute(1, 2, 0).contiguous(), bd)
    ref = _expand_dw_ref(x, w1, b1, wd, bd)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_expand_dw_threads_bad_inputs_and_flops():
    op = _op('expand_dw')
    x = torch.randn(3, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    w1t, b1, wdw, bdw = torch.randn(16, 64), torch.randn(64), torch.randn(3, 3, 64), torch.randn(64)
    one, two = _one_and_two_threads(lambda: op(x, w1t, b1, wdw, bdw))
    assert torch.equal(one, two)
    assert torch.equal(op(x.contiguous(), w1t, b1, wdw, bdw), one)  # an NCHW input is read through a copy
    with pytest.raises(RuntimeError, match='shapes do not match'):
        op(x, w1t, b1, torch.randn(3, 3, 63), bdw)
    with pytest.raises(RuntimeError, match='float32'):
        op(x.double(), w1t, b1, wdw, bdw)
    with pytest.raises(RuntimeError, match=r'expected x \(B, C, H, W\)'):
        op(x[0], w1t, b1, wdw, bdw)
    assert _flops(lambda: op(x, w1t, b1, wdw, bdw)) == 2 * 3 * 14 * 14 * 16 * 64 + 2 * 3 * 7 * 7 * 64 * 9


@needs_kernel
def test_deploy_stem_and_patch_merging_use_the_kernels_where_they_may():
    model = _trained_looking(timm.create_model('uniform_t', num_classes=10).eval())  # stem 8 -> 16 -> 32 -> 64
    deploy = reparameterize(model)
    stem, pms = deploy.patch_embed, [m for m in deploy.modules() if isinstance(m, DeployPatchMerging)]
    assert len(pms) == 2 and all(pm.fuse() is pm for pm in pms)
    x = torch.randn(4, 3, 64, 72)
    with torch.no_grad():
        ref = model(x)
        with OpLog() as log:
            out = deploy(x)
        # each batch chunk x the narrow conv (16 outputs); the 32- and 64-wide ones too where the ops are AVX-512
        layers = 3 if _avx512() else 1
        assert log.ops.count('uniform_vit.conv3x3_s2') == stem.batch_chunks() * layers
        assert log.ops.count('uniform_vit.expand_dw') == 2
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
        stem.conv_kernel = False
        for pm in pms:
            pm.expand_kernel = False
        with OpLog() as log:
            aten = deploy(x)
        assert 'uniform_vit.conv3x3_s2' not in log.ops and 'uniform_vit.expand_dw' not in log.ops
        assert torch.allclose(out, aten, atol=1e-5, rtol=1e-5)
        stem.conv_kernel = True
        for pm in pms:
            pm.expand_kernel = True
        traced, portable = _recorded_by_bench_traces_only(deploy, x, 'expand_dw')
        assert 'uniform_vit::conv3x3_s2' in str(traced.inlined_graph)
        assert 'uniform_vit::conv3x3_s2' not in str(portable.inlined_graph)
        assert torch.equal(traced(x), out) and torch.allclose(portable(x), out, atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)  # a gradient is needed: the ops have no backward, so ATen's convs run
    with OpLog() as log:
        deploy(x).sum().backward()
    assert 'uniform_vit.expand_dw' not in log.ops and 'uniform_vit.conv3x3_s2' not in log.ops


# ---------------------------------------------------------------------------------------------------------------
# training: the depthwise weight gradient on maps smaller than the kernel, 1x1 convs as matrix products, BatchNorm
# over channel counts ATen's channels-last kernel handles slowly


def _aten_dw_grad_weight(x: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    w = torch.empty(x.shape[1], 1, k, k)
    return torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [k // 2] * 2, [1, 1], False, [0, 0],
                                               x.shape[1], [False, True, False])[1]


@needs_kernel
@pytest.mark.parametrize('c', [1, 5, 8, 20, 32, 40, 192])  # one- and two-vector blocks, masked tails
@pytest.mark.parametrize('k', [1, 3, 5, 7])
def test_depthwise_grad_weight_matches_aten(c, k):
    op = _op('depthwise_grad_weight')
    gen = torch.Generator().manual_seed(c * 10 + k)
    for h, w in [(2, 2), (4, 4), (1, 3), (3, 1), (7, 7), (5, 9)]:  # smaller than the kernel, and not
        x, g = (torch.randn(3, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(2))
        ref = _aten_dw_grad_weight(x, g, k)
        out = op(x, g, k, k, k // 2, k // 2)
        assert out.shape == (c, 1, k, k) and torch.allclose(out, ref, atol=1e-4, rtol=1e-5), (h, w)
        assert torch.equal(op(x.contiguous(), g.contiguous(), k, k, k // 2, k // 2), out)  # NCHW: through copies
    wide = torch.randn(3, c + 5, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    wide[:, 2:2 + c] = x
    assert torch.equal(op(wide[:, 2:2 + c], g, k, k, k // 2, k // 2), out)  # a channel slice, read in place
    if k > 1:  # a cropped kernel of another height than width (SameConv2d on a 2 x 5 map)
        x, g = (torch.randn(2, c, 2, 5, generator=gen) for _ in range(2))
        ref = torch.ops.aten.convolution_backward(g, x, torch.empty(c, 1, 3, k), None, [1, 1], [1, k // 2], [1, 1],
                                                  False, [0, 0], c, [False, True, False])[1]
        assert torch.allclose(op(x, g, 3, k, 1, k // 2), ref, atol=1e-4, rtol=1e-5)


@needs_kernel
def test_depthwise_grad_weight_threads_bad_inputs_and_flops():
    op = _op('depthwise_grad_weight')
    x, g = (torch.randn(16, 72, 4, 4).contiguous(memory_format=torch.channels_last) for _ in range(2))
    one, two = _one_and_two_threads(lambda: op(x, g, 7, 7, 3, 3))
    assert torch.equal(one, two)
    with pytest.raises(RuntimeError, match='differ'):
        op(x, g[:, :8], 3, 3, 1, 1)
    with pytest.raises(RuntimeError, match='does not keep the map'):
        op(x, g, 3, 3, 0, 0)
    with pytest.raises(RuntimeError, match='float32'):
        op(x.double(), g.double(), 3, 3, 1, 1)
    with pytest.raises(RuntimeError, match=r'expected x and g \(B, C, H, W\)'):
        op(x[0], g[0], 3, 3, 1, 1)
    assert _flops(lambda: op(x, g, 7, 7, 3, 3)) == 2 * 16 * 72 * 16 * 49


@pytest.mark.parametrize('kernels', [True, False])  # the C++ op, or the sums per tap (no kernels, torch.compile)
def test_depthwise_training_on_small_maps_gives_atens_gradients(kernels, monkeypatch):
    if kernels and not (HAS_TOOLS and ISA_OK and cpu_kernels.enabled()):
        pytest.skip('needs the C++ kernels')
    if not kernels:
        monkeypatch.setattr(cpu_kernels, 'depthwise_grad_weight', lambda: None)
    gen = torch.Generator().manual_seed(3)
    for h, w, k in [(3, 5, 7), (2, 2, 3), (4, 4, 5), (1, 1, 3), (8, 8, 3)]:  # (8, 8): not smaller, ATen's backward
        m = make_conv(24, 24, k, 1, k // 2, groups=24)
        m.bias.data.normal_(generator=gen)
        x = torch.randn(2, 24, h, w, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
        gy = torch.randn(2, 24, h, w, generator=gen)
        xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, m.weight, m.bias))
        F.conv2d(xr, wr, br, 1, k // 2, 1, 24).backward(gy)
        with OpLog() as log:
            y = m(x)
            y.backward(gy)
        assert torch.allclose(y, F.conv2d(xr, wr, br, 1, k // 2, 1, 24), atol=1e-5)
        for got, ref in ((x.grad, xr.grad), (m.weight.grad, wr.grad), (m.bias.grad, br.grad)):
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5), (h, w, k)
        small = h < min(k, 2 * h - 1) or w < min(k, 2 * w - 1)  # after SameConv2d's crop: (1, 1, 3) runs a 1x1
        assert ('uniform_vit.depthwise_grad_weight' in log.ops) == (small and kernels)
        # one ATen convolution backward: the input's gradient alone on small maps, both gradients on (8, 8)
        assert log.ops.count('aten.convolution_backward') == 1
    monkeypatch.setattr(conv_mod, 'SMALL_MAP_GRAD', False)  # the A/B switch: ATen's backward for everything
    m = make_conv(24, 24, 3, 1, 1, groups=24)
    x = torch.randn(2, 24, 2, 2).contiguous(memory_format=torch.channels_last)
    with OpLog() as log:
        m(x).sum().backward()
    assert 'uniform_vit.depthwise_grad_weight' not in log.ops and m.weight.grad is not None


@pytest.mark.parametrize('backend', ['mkl', 'onednn'])
@pytest.mark.parametrize('cin,cout', [(20, 12), (12, 20)])  # narrowing and expanding: both weight-gradient forms
def test_pointwise_conv_trains_as_a_matrix_product(monkeypatch, backend, cin, cout):
    # the products run where the GEMM policy says: BLAS (F.linear), or oneDNN for the forward and both gradients
    # (AMD CPUs with AVX-512, where MKL runs AVX2 code); the same values and gradients either way
    import uniform_vit.layers.gemm as gemm

    if backend == 'onednn' and not gemm.HAS_ONEDNN_LINEAR:
        pytest.skip("this PyTorch build has no oneDNN linear op")
    monkeypatch.setattr(gemm, '_backend', backend)  # what gemm_backend(backend) sets
    gen = torch.Generator().manual_seed(5)
    m = make_conv(cin, cout, 1)
    x = torch.randn(3, cin, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    gy = torch.randn(3, cout, 4, 5, generator=gen)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, m.weight, m.bias))
    ref = F.conv2d(xr, wr, br)
    ref.backward(gy)
    with OpLog() as log:
        y = m(x)
        y.backward(gy)
    assert 'aten.convolution' not in log.ops and 'aten.convolution_backward' not in log.ops
    assert y.is_contiguous(memory_format=torch.channels_last)
    onednn = log.ops.count('mkldnn._linear_pointwise')
    assert (onednn, 'aten.addmm' in log.ops) == ((3, False) if backend == 'onednn' else (0, True))
    assert torch.allclose(y, ref, atol=1e-5)
    for got, want in ((x.grad, xr.grad), (m.weight.grad, wr.grad), (m.bias.grad, br.grad)):
        assert torch.allclose(got, want, atol=1e-5)
    assert m.weight.grad.shape == m.weight.shape and m.weight.grad.is_contiguous()
    x.grad = None
    with OpLog() as log:  # no weight gradient wanted: no weight-gradient product
        m.weight.requires_grad_(False)
        m(x).backward(gy)
        m.weight.requires_grad_(True)
    assert log.ops.count('mkldnn._linear_pointwise') == (2 if backend == 'onednn' else 0)
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)
    for off in ('nchw', 'switch'):  # NCHW maps, or the A/B switch: ATen's convolution
        if off == 'switch':
            monkeypatch.setattr(conv_mod, 'TRAIN_MATMUL', False)
        with OpLog() as log:
            m(x.contiguous() if off == 'nchw' else x).sum().backward()
        assert 'aten.convolution_backward' in log.ops


@pytest.mark.parametrize('n,k', [(64, 256), (256, 64), (48, 48), (1, 7)])
def test_weight_gradient_product_in_either_orientation(n, k):
    # g^T @ x through oneDNN, computed as (x^T @ g)^T when the layer expands (n > k): same values, a plain (n, k)
    import uniform_vit.layers.gemm as gemm

    if not gemm.HAS_ONEDNN_LINEAR:
        pytest.skip("this PyTorch build has no oneDNN linear op")
    gen = torch.Generator().manual_seed(n + k)
    g, x = torch.randn(300, n, generator=gen), torch.randn(300, k, generator=gen)
    with OpLog() as log:
        got = gemm.weight_grad(g, x)
    assert log.ops.count('mkldnn._linear_pointwise') == 1 and 'aten.mm' not in log.ops
    assert got.shape == (n, k) and got.is_contiguous()
    assert torch.allclose(got, g.t() @ x, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize('c', [1, 5, 8, 13, 16, 24, 40])  # whole vectors and scalar tails
def test_batch_norm_train_matches_aten(c):
    fwd, bwd = _op('batch_norm_train'), torch.ops.uniform_vit.batch_norm_train_backward
    gen = torch.Generator().manual_seed(c)
    for shape in [(4, c, 9, 7), (2, c, 1, 2), (16, c, 20, 20)]:  # one chunk of 256 rows, and 25 of them
        x = (torch.randn(*shape, generator=gen) * 3 + 2).contiguous(memory_format=torch.channels_last)
        w, b, g = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen), torch.randn(*shape, generator=gen)
        xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))  # the reference in float64
        ref = F.batch_norm(xr, None, None, wr, br, True, 0.0, 1e-5)
        ref.backward(g.double())
        ref, ref_gx, ref_gw, ref_gb = (t.float() for t in (ref, xr.grad, wr.grad, br.grad))
        rm, rv = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
        rm0, rv0 = rm.clone(), rv.clone()
        y, mean, invstd = fwd(x, w, b, rm, rv, 0.3, 1e-5)
        var, mu = torch.var_mean(x, (0, 2, 3), unbiased=False)
        assert y.is_contiguous(memory_format=torch.channels_last) and torch.allclose(y, ref, atol=1e-5)
        assert torch.allclose(mean, mu, atol=1e-6) and torch.allclose(invstd, (var + 1e-5).rsqrt(), rtol=1e-5)
        m = x.numel() // c  # the running statistics, moved in place: the variance unbiased, as nn.BatchNorm2d's
        assert torch.allclose(rm, 0.7 * rm0 + 0.3 * mu, atol=1e-6)
        assert torch.allclose(rv, 0.7 * rv0 + 0.3 * var * m / (m - 1), rtol=1e-5, atol=1e-6)
        gx, gw, gb = bwd(g, x, mean, invstd, w)
        assert torch.allclose(gx, ref_gx, atol=1e-5, rtol=1e-4), shape
        tol = 2e-7 * (x.numel() // c)  # sums of M float terms (ATen's own float sums drift as far)
        assert torch.allclose(gw, ref_gw, atol=tol, rtol=1e-5) and torch.allclose(gb, ref_gb, atol=tol, rtol=1e-5)
        assert torch.allclose(bwd(g.contiguous(memory_format=torch.channels_last), x, mean, invstd, w)[0], gx)


@needs_kernel
def test_batch_norm_train_threads_and_bad_inputs():
    fwd, bwd = _op('batch_norm_train'), torch.ops.uniform_vit.batch_norm_train_backward
    x = torch.randn(32, 8, 30, 30).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    one, two = _one_and_two_threads(lambda: fwd(x, w, b, torch.zeros(8), torch.ones(8), 0.1, 1e-5))
    for a, b_ in zip(one, two):
        assert torch.allclose(a, b_, rtol=1e-6, atol=1e-7)
    rm, rv = torch.zeros(8), torch.ones(8)
    with pytest.raises(RuntimeError, match='channels-last'):
        fwd(x.contiguous(), w, b, rm, rv, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match=r'weight must be float32 \(8\)'):
        fwd(x, torch.ones(5), b, rm, rv, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match=r'running_var must be a contiguous float32 \(8\)'):
        fwd(x, w, b, rm, torch.ones(16)[::2], 0.1, 1e-5)  # written in place, so never through a copy
    with pytest.raises(RuntimeError, match=r'factor must be in \[0, 1\]'):
        fwd(x, w, b, rm, rv, 1.5, 1e-5)
    for few in (x[:0], x[:1, :, :1, :1]):  # no values, or one per channel (no unbiased variance)
        with pytest.raises(RuntimeError, match='more than one value per channel'):
            fwd(few, w, b, rm, rv, 0.1, 1e-5)
    assert torch.equal(rm, torch.zeros(8)) and torch.equal(rv, torch.ones(8))  # bad calls leave them alone
    with pytest.raises(RuntimeError, match='differ'):
        bwd(x[:2], x, w, w, w)


@needs_kernel
def test_batch_norm_module_uses_the_kernel_where_it_may(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    for momentum in (0.1, None):  # nn.BatchNorm2d's running averages: exponential, or cumulative
        ours, ref = conv_mod.BatchNorm2d(8, momentum=momentum), torch.nn.BatchNorm2d(8, momentum=momentum)
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5, generator=gen)
            ours.bias.normal_(generator=gen)
        ref.load_state_dict(ours.state_dict())
        assert list(ours.state_dict()) == list(ref.state_dict())
        for _ in range(3):
            x = (torch.randn(4, 8, 5, 6, generator=gen) + 1).contiguous(memory_format=torch.channels_last)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            g = torch.randn(4, 8, 5, 6, generator=gen)
            with OpLog() as log:
                y = ours(xa)
                y.backward(g)
            assert 'uniform_vit.batch_norm_train' in log.ops and 'uniform_vit.batch_norm_train_backward' in log.ops
            yr = ref(xb)
            yr.backward(g)
            assert torch.allclose(y, yr, atol=1e-5) and y.is_contiguous(memory_format=torch.channels_last)
            for got, want in ((xa.grad, xb.grad), (ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad)):
                assert torch.allclose(got, want, atol=1e-4)
        for name, t in ours.state_dict().items():  # running mean and (unbiased) variance, batches counted
            assert torch.allclose(t.float(), ref.state_dict()[name].float(), atol=1e-6), name
    bn = conv_mod.BatchNorm2d(8)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    x32 = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    for all_channels in (True, False):  # AVX-512's rule: every channel count on the ops; AVX2's: ATen at 16k
        monkeypatch.setattr(conv_mod, 'BN_ALL_CHANNELS', all_channels)
        with OpLog() as log:
            conv_mod.BatchNorm2d(32).train()(x32)
        assert ('uniform_vit.batch_norm_train' in log.ops) == all_channels
    for case in ('eval', 'nchw', 'switch'):  # ATen's BatchNorm
        bn.train(case != 'eval')
        if case == 'switch':
            monkeypatch.setattr(conv_mod, 'BN_KERNEL', False)
        with OpLog() as log:
            bn(x.contiguous() if case == 'nchw' else x)
        assert 'uniform_vit.batch_norm_train' not in log.ops, case
    monkeypatch.setattr(conv_mod, 'BN_KERNEL', True)
    with pytest.raises(ValueError, match='more than 1 value per channel'):  # ATen's own error, one value per channel
        bn.train()(torch.randn(1, 8, 1, 1).contiguous(memory_format=torch.channels_last))
    assert isinstance(conv_mod.ConvNorm(3, 8, 3).bn, conv_mod.BatchNorm2d)


def test_training_paths_give_the_same_gradients_in_a_model(monkeypatch):
    """A uniform_t training step at 64 px (maps of 2x2 and 1x1 in the late stages) has the same loss and gradients
    with the training paths (depthwise weight gradients on small maps, 1x1 convs as products, the stem's narrow
    BatchNorms) as with ATen's ops."""
    model = timm.create_model('uniform_t', num_classes=10, in_chans=1).to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 3, 7, 9])

    def step():
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    with OpLog() as log:
        loss, grads = step()
    assert 'aten.addmm' in log.ops and 'aten.mm' in log.ops
    monkeypatch.setattr(conv_mod, 'SMALL_MAP_GRAD', False)
    monkeypatch.setattr(conv_mod, 'TRAIN_MATMUL', False)
    monkeypatch.setattr(conv_mod, 'BN_KERNEL', False)
    ref_loss, ref = step()
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    # float rounding of the stem's BatchNorm grows through the late BatchNorms, which see 4 values per channel here
    # (1x1 maps, batch 4): within 0.1 % of each tensor's largest gradient, where a wrong term would be off by O(1)
    scale = max(g.abs().max() for g in ref.values())
    for name, g in grads.items():
        assert (g - ref[name]).abs().max() <= 1e-3 * ref[name].abs().max() + 1e-6 * scale, name


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
        assert cpu_kernels.stem_conv() is None and cpu_kernels.depthwise_conv() is None
        assert cpu_kernels.residual_ffn() is None and cpu_kernels.pointwise_conv() is None
        assert cpu_kernels.conv3x3_s2() is None and cpu_kernels.expand_dw() is None
        assert cpu_kernels.depthwise_grad_weight() is None and cpu_kernels.batch_norm_train() is None
    assert cpu_kernels.status().startswith('off (build failed: RuntimeError')
    q, k, v = _inputs('token-major', 1, 600, 32, torch.Generator().manual_seed(4))
    out = reuse_attention(q, k, v, None, 0.3, 'tiled')  # the ATen path
    assert torch.allclose(out, reuse_attention(q, k, v, None, 0.3, 'eager'), atol=1e-5)


def test_no_kernel_for_other_isas(monkeypatch):
    for isa in ('DEFAULT', 'ZVECTOR'):  # no x86 vector unit: PyTorch's scalar or s390x code
        monkeypatch.setattr(cpu_kernels, '_loaded', None)
        monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda isa=isa: isa)
        assert cpu_kernels.reuse_core() is None and cpu_kernels.stem_conv() is None
        assert cpu_kernels.status() == f'off (no kernel for the {isa} vector ISA)'


@needs_kernel
@pytest.mark.parametrize('opt', ['adamw', 'sgd'])
def test_eval_after_a_fused_optimiser_step_reads_the_new_weights(opt):
    # torch's fused optimisers change the weights in place without bumping their version, the key of the C++ ops'
    # weight-layout caches: the train() / eval() switch around the step must drop the caches, or the evaluation
    # after it runs on the old weights (it did: session 33's training run evaluated at chance after a few epochs)
    import copy

    torch.manual_seed(0)
    model = timm.create_model('uniform_t', in_chans=1, num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    step = (torch.optim.AdamW(model.parameters(), lr=0.05, fused=True) if opt == 'adamw'
            else torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, fused=True))
    with torch.no_grad():
        before = model.eval()(x)  # fills the caches
    model.train()
    F.cross_entropy(model(torch.randn(8, 1, 64, 64).contiguous(memory_format=torch.channels_last)),
                    torch.arange(8)).backward()
    versions = [p._version for p in model.parameters()]
    step.step()
    assert [p._version for p in model.parameters()] == versions  # what makes the switch necessary
    with torch.no_grad():
        after = model.eval()(x)
        fresh = copy.deepcopy(model)(x)  # a copy builds its caches from the current weights
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.allclose(after, fresh, rtol=1e-5, atol=1e-5)
