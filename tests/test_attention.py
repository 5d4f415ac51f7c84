"""Reuse Attention against a deliberately naive reference: per-head loop, explicit softmax, explicit windows."""

import math

import pytest
import torch
import torch.nn.functional as F

import uniform_vit.layers.attention as attention
from conftest import OpLog, randomize_bn
from uniform_vit.layers.attention import (
    MultiHeadAttention,
    ReuseAttention,
    WindowAttention,
    reuse_attention,
)


def _bn(x, bn):
    return (x - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps) \
        * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


def naive_reuse(m: ReuseAttention, x: torch.Tensor) -> torch.Tensor:
    """Written plainly from the paper/official code: one map shared by all heads, one value conv per head."""
    B, C, H, W = x.shape
    N = H * W
    qk = _bn(F.conv2d(x, m.qk.c.weight), m.qk.bn)
    q, k = qk[:, :C // 4], qk[:, C // 4:]
    q = _bn(F.conv2d(q, m.q_dw.c.weight, padding=m.q_dw.c.padding, groups=C // 4), m.q_dw.bn)
    table = m.rel_bias.attention_biases[0]
    bias = torch.empty(N, N)
    for i in range(N):
        for j in range(N):
            dy, dx = abs(i // W - j // W), abs(i % W - j % W)
            bias[i, j] = table[dy * m.rel_bias.window_size + dx]
    out = torch.empty(B, C, N)
    for b in range(B):
        logits = q[b].reshape(C // 4, N).T @ k[b].reshape(C // 4, N) * 16 ** -0.5 + bias
        attn = torch.exp(logits - logits.max(-1, keepdim=True).values)
        attn = attn / attn.sum(-1, keepdim=True)  # the ONE map of this window
        c0 = 0
        for h, conv in enumerate(m.v_convs):  # every head: its own channel slice and kernel, the same map
            ch = conv.in_channels
            assert conv.kernel_size[0] == (1, 3, 5, 7)[h]
            v = F.conv2d(x[b:b + 1, c0:c0 + ch], conv.weight, conv.bias, padding=conv.kernel_size[0] // 2, groups=ch)
            out[b, c0:c0 + ch] = v.reshape(ch, N) @ attn.T
            c0 += ch
    y = F.relu(out.reshape(B, C, H, W))
    return _bn(F.conv2d(y, m.proj[1].c.weight), m.proj[1].bn)


def naive_windows(fn, x: torch.Tensor, ws: int) -> torch.Tensor:
    B, C, H, W = x.shape
    if H <= ws and W <= ws:
        return fn(x)
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    xp = torch.zeros(B, C, Hp, Wp)
    xp[:, :, :H, :W] = x
    out = torch.zeros_like(xp)
    for i in range(0, Hp, ws):
        for j in range(0, Wp, ws):
            out[:, :, i:i + ws, j:j + ws] = fn(xp[:, :, i:i + ws, j:j + ws])
    return out[:, :, :H, :W]


@pytest.mark.parametrize('dim,heads', [(64, 4), (48, 3), (32, 2)])
@pytest.mark.parametrize('hw', [(7, 7), (5, 3), (4, 6)])
def test_reuse_attention_matches_naive(dim, heads, hw):
    m = randomize_bn(ReuseAttention(dim, heads)).eval()
    x = torch.randn(2, dim, *hw)
    with torch.no_grad():
        assert torch.allclose(m(x), naive_reuse(m, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('hw', [(14, 14), (9, 16), (7, 7), (20, 8)])
def test_windowed_matches_naive(hw):
    m = randomize_bn(ReuseAttention(32, 4)).eval()
    w = WindowAttention(m, 7)
    x = torch.randn(2, 32, *hw)
    with torch.no_grad():
        assert torch.allclose(w(x), naive_windows(lambda t: naive_reuse(m, t), x, 7), atol=1e-4, rtol=1e-4)


def test_shared_map_is_one_per_window_not_per_head():
    m = ReuseAttention(64, 4)
    n_bias = sum(p.numel() for n, p in m.named_parameters() if 'attention_biases' in n)
    assert n_bias == 49  # one (|dy|, |dx|) table for a 7x7 window
    assert m.qk.c.out_channels == 32  # C/2: q and k of C/4 each, shared by all heads
    assert not any('v_proj' in n for n, _ in m.named_parameters())  # no value projection


@pytest.fixture(autouse=True)
def _aten_core(monkeypatch):
    """The tiled core's ATen path in this file, where the GEMM libraries, buffers and layouts of that path are
    tested; a test sets ``attention.CPU_KERNEL`` back to True to use the C++ core (tests/test_cpu_kernels.py)."""
    monkeypatch.setattr(attention, 'CPU_KERNEL', False)


@pytest.mark.parametrize('impl', ['sdpa', 'tiled', 'auto'])
@pytest.mark.parametrize('n', [49, 600])  # 600 >= TILED_MIN_N: 'auto' takes the tiled path, tiles do not divide N
@pytest.mark.parametrize('token_major', [False, True])  # q, k, v as flattened channels-last maps (oneDNN logits)
@pytest.mark.parametrize('with_bias', [True, False])
# the GEMM policy picks a library per CPU vendor: test both; 'kernel': the C++ core where it is built
@pytest.mark.parametrize('backend', ['onednn', 'mkl', 'kernel'])
def test_core_impls_agree_with_eager(impl, n, token_major, with_bias, backend, monkeypatch):
    from uniform_vit.layers.gemm import gemm_backend

    if backend == 'kernel':
        monkeypatch.setattr(attention, 'CPU_KERNEL', True)
        _core_agrees_with_eager(impl, n, token_major, with_bias)
        return
    with gemm_backend(backend):
        _core_agrees_with_eager(impl, n, token_major, with_bias)


def _core_agrees_with_eager(impl, n, token_major, with_bias):
    if token_major:
        q, k, v = (torch.randn(2, n, c).transpose(1, 2) for c in (8, 8, 32))
    else:
        q, k, v = torch.randn(2, 8, n), torch.randn(2, 8, n), torch.randn(2, 32, n)
    bias = torch.randn(n, n) if with_bias else None
    ref = reuse_attention(q, k, v, bias, 0.3, 'eager')  # a scale that is not a power of two: rounding differs
    out = reuse_attention(q, k, v, bias, 0.3, impl)
    assert out.shape == (2, 32, n)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize('with_bias', [True, False])
def test_tiled_without_onednn_logits_agrees(monkeypatch, with_bias):
    # the fallback for inputs oneDNN does not take (float64, other devices): MKL addmm into one reused buffer
    q, k, v = (torch.randn(2, 600, c).transpose(1, 2) for c in (8, 8, 32))  # token-major: oneDNN would take it
    bias = torch.randn(600, 600) if with_bias else None
    ref = reuse_attention(q, k, v, bias, 0.3, 'eager')
    monkeypatch.setattr(attention, 'ONEDNN_LOGITS', False)
    assert torch.allclose(reuse_attention(q, k, v, bias, 0.3, 'tiled'), ref, atol=1e-5)
    out64 = reuse_attention(q.double(), k.double(), v.double(), None if bias is None else bias.double(), 0.3, 'tiled')
    assert out64.dtype == torch.float64 and torch.allclose(out64.float(), ref, atol=1e-5)


@pytest.mark.parametrize('cq', [8, 32])  # the sliced keys are copied for oneDNN from Cq = 32, else MKL's addmm
@pytest.mark.parametrize('backend', ['onednn', 'mkl'])  # with MKL, token-major keys are copied to (Cq, N) rows
def test_tiled_with_q_and_k_sliced_from_one_map(cq, backend):
    from uniform_vit.layers.gemm import gemm_backend

    with gemm_backend(backend):
        _sliced_qk_agrees(cq)


def _sliced_qk_agrees(cq):
    # what a channels-last deploy layer passes: q and k split from one conv output, token stride 2 x Cq
    qk = torch.randn(2, 600, 2 * cq).transpose(1, 2)
    q, k = qk.split(cq, dim=1)
    v = torch.randn(2, 600, 32).transpose(1, 2)
    bias = torch.randn(600, 600)
    ref = reuse_attention(q, k, v, bias, 0.3, 'eager')
    assert torch.allclose(reuse_attention(q, k, v, bias, 0.3, 'tiled'), ref, atol=1e-5)


@pytest.mark.parametrize('n', [600, 2048])
def test_tiled_output_is_channel_major_only_for_aliasing_channel_major_values(n):
    # with torch.mm (the policy on Intel CPUs), channel-major values with rows a multiple of 4 KiB apart (N = 2048)
    # get a channel-major output, written as (C, T) column blocks; every other case keeps token-major rows
    from uniform_vit.layers.gemm import gemm_backend

    q, k, v = torch.randn(2, 8, n), torch.randn(2, 8, n), torch.randn(2, 32, n)
    bias = torch.randn(n, n)
    with gemm_backend('mkl'):
        out = reuse_attention(q, k, v, bias, 0.3, 'tiled')
        tm = reuse_attention(*(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)), bias, 0.3, 'tiled')
    ref = reuse_attention(q, k, v, bias, 0.3, 'eager')
    assert out.is_contiguous() == (n == 2048) and not tm.is_contiguous()  # token-major values: token-major output
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(tm, ref, atol=1e-5)


@pytest.mark.parametrize('impl', ['eager', 'tiled', 'sdpa'])
@pytest.mark.parametrize('token_major', [False, True])
def test_core_empty_batch(impl, token_major):
    if token_major:
        q, k, v = (torch.randn(0, 600, c).transpose(1, 2) for c in (32, 32, 64))
    else:
        q, k, v = torch.randn(0, 32, 600), torch.randn(0, 32, 600), torch.randn(0, 64, 600)
    out = reuse_attention(q, k, v, torch.randn(600, 600), 0.3, impl)
    assert out.shape == (0, 64, 600)


def test_tiled_refuses_gradients_and_unknown_impl():
    q = torch.randn(1, 8, 600, requires_grad=True)
    with pytest.raises(ValueError, match='inference-only'):
        reuse_attention(q, q.detach(), torch.randn(1, 16, 600), None, 0.25, 'tiled')
    out = reuse_attention(q, q.detach(), torch.randn(1, 16, 600), None, 0.25, 'auto')  # falls back to eager
    out.sum().backward()
    assert q.grad is not None
    with pytest.raises(ValueError, match='unknown reuse attention impl'):
        reuse_attention(q, q, q, None, 0.25, 'fast')


@pytest.mark.parametrize('hw', [(7, 7), (14, 10)])
def test_deploy_form_matches_train_form(hw):
    m = randomize_bn(ReuseAttention(64, 4)).eval()
    d = m.fuse()
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in d.modules())
    x = torch.randn(2, 64, 7, 7)
    with torch.no_grad():
        assert torch.allclose(m(x), d(x), atol=1e-5)
        w, wd = WindowAttention(m, 7), WindowAttention(d, 7)
        x = torch.randn(2, 64, *hw)
        ref = w(x)
        assert torch.allclose(ref, wd(x), atol=1e-5)
        # the deploy network runs channels-last: same numbers, and the layout is kept through the windows
        out_cl = wd(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(ref, out_cl, atol=1e-5)
        assert out_cl.is_contiguous(memory_format=torch.channels_last)


def test_mha_is_per_head():
    m = randomize_bn(MultiHeadAttention(64, 4)).eval()
    assert m.rel_bias.attention_biases.shape == (4, 49)
    x = torch.randn(2, 64, 7, 7)
    B, C, H, W = x.shape
    with torch.no_grad():
        qkv = _bn(F.conv2d(x, m.qkv.c.weight), m.qkv.bn).reshape(B, 4, -1, 49)
        bias = m.rel_bias(7, 7)
        outs = []
        for h in range(4):  # one softmax map per head
            q, k, v = qkv[:, h, :16], qkv[:, h, 16:32], qkv[:, h, 32:]
            a = torch.softmax(q.transpose(1, 2) @ k * 16 ** -0.5 + bias[h], -1)
            outs.append(v @ a.transpose(1, 2))
        ref = _bn(F.conv2d(F.relu(torch.cat(outs, 1).reshape(B, C, H, W)), m.proj[1].c.weight), m.proj[1].bn)
        assert torch.allclose(m(x), ref, atol=1e-4)


def test_bad_head_counts():
    with pytest.raises(ValueError, match='divisible'):
        ReuseAttention(30, 4)
    with pytest.raises(ValueError, match='kernels'):
        ReuseAttention(50, 5)


@pytest.mark.parametrize('hw', [(1, 1), (2, 2), (1, 3), (3, 5), (9, 9)])
@pytest.mark.parametrize('groups', [1, 6])
def test_same_conv_crops_only_taps_that_see_padding(hw, groups):
    from uniform_vit.layers.conv import SameConv2d, make_conv

    conv = make_conv(6, 6, 7, padding=3, groups=groups)
    assert isinstance(conv, SameConv2d)
    assert type(make_conv(6, 6, 3, stride=2, padding=1)) is torch.nn.Conv2d
    x = torch.randn(2, 6, *hw)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=3, groups=groups)
    assert torch.allclose(conv(x), ref, atol=1e-6)


def test_pointwise_conv_is_one_onednn_matmul_on_channels_last_maps(monkeypatch):
    from uniform_vit.layers import conv as conv_mod
    from uniform_vit.layers.conv import PointwiseConv2d, aten_only, make_conv
    from uniform_vit.layers.flops import count_flops

    # where this library's C++ kernels are built they run first (tests/test_cpu_kernels.py); this is the path without
    monkeypatch.setattr(conv_mod, 'POINTWISE_KERNEL', False)

    assert type(make_conv(24, 40, 1, groups=2)) is torch.nn.Conv2d
    assert type(make_conv(24, 40, 1, stride=2)) is torch.nn.Conv2d
    for bias in (True, False):
        conv = make_conv(24, 40, 1, bias=bias)
        assert isinstance(conv, PointwiseConv2d)
        x = torch.randn(3, 24, 5, 7).contiguous(memory_format=torch.channels_last)
        ref = F.conv2d(x, conv.weight, conv.bias)
        with torch.no_grad(), OpLog() as log:
            y = conv(x)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last)
        if conv_mod.HAS_ONEDNN_LINEAR:
            assert 'mkldnn._linear_pointwise' in log.ops and 'aten.convolution' not in log.ops
        with torch.no_grad(), OpLog() as log:  # NCHW maps, and anything else, run the plain conv
            assert torch.allclose(conv(x.contiguous()), ref, rtol=1e-5, atol=1e-5)
        assert 'aten.convolution' in log.ops
        with torch.no_grad():
            assert count_flops(conv, x) == count_flops(torch.nn.Conv2d(24, 40, 1), x) == 2 * 3 * 5 * 7 * 24 * 40

    # with gradients it is an ordinary conv: backward works and matches
    x.requires_grad_(True)
    conv(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.conv2d(x2, conv.weight).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-5)

    # a trace keeps the oneDNN op (through TorchScript) and stays valid at other batch sizes; aten_only() keeps
    # it out of graphs meant for other machines
    x = x.detach()
    with torch.no_grad():
        traced = torch.jit.trace(conv, x, check_trace=False)
        with aten_only():
            portable = torch.jit.trace(conv, x, check_trace=False)
        x5 = torch.randn(5, 24, 5, 7).contiguous(memory_format=torch.channels_last)
        for t in (traced, portable):
            assert torch.allclose(t(x5), F.conv2d(x5, conv.weight), rtol=1e-5, atol=1e-5)
    assert ('mkldnn::_linear_pointwise' in str(traced.inlined_graph)) == conv_mod.HAS_ONEDNN_LINEAR
    assert 'mkldnn::' not in str(portable.inlined_graph) and 'aten::_convolution' in str(portable.inlined_graph)
    assert conv_mod.ONEDNN_POINTWISE  # restored after the block


def test_onednn_linear_matches_mm_and_stays_out_of_traces():
    from uniform_vit.layers.gemm import linear_nt, onednn_linear_available

    a, w = torch.randn(40, 300), torch.randn(24, 300)
    if onednn_linear_available(a, w):
        assert torch.allclose(linear_nt(a, w), a @ w.t(), rtol=1e-5, atol=1e-4)
    assert not onednn_linear_available(a.double(), w.double())
    assert not onednn_linear_available(a.requires_grad_(), w)
    assert onednn_linear_available(a, w, grad=True) == onednn_linear_available(a.detach(), w)  # linear_trainable's
    seen = []

    def probe(x):
        seen.append(onednn_linear_available(x))
        return x + 1

    torch.jit.trace(probe, torch.randn(2), check_trace=False)
    assert seen == [False]  # jit.trace cannot record the oneDNN op, so traced code keeps torch.mm


@pytest.mark.parametrize('token_major', [False, True])
def test_gemm_backend_decides_which_library_runs_the_tiled_core(token_major):
    from uniform_vit.layers.gemm import gemm_backend, onednn_linear_available

    n = 600
    if token_major:
        q, k, v = (torch.randn(1, n, c).transpose(1, 2) for c in (8, 8, 32))
    else:
        q, k, v = torch.randn(1, 8, n), torch.randn(1, 8, n), torch.randn(1, 32, n)
    seen = {}
    for backend in ('onednn', 'mkl'):
        with gemm_backend(backend), torch.no_grad(), OpLog() as log:
            reuse_attention(q, k, v, None, 0.3, 'tiled')
        seen[backend] = log.ops.count('mkldnn._linear_pointwise')
    assert seen['mkl'] == 0  # every product through torch.mm / addmm
    if onednn_linear_available(q, k, v):
        assert seen['onednn'] >= math.ceil(n / 128)  # at least one value product per tile


def test_gemm_policy_follows_the_cpu_vendor_and_isa_and_rejects_unknown_backends(monkeypatch):
    import uniform_vit.layers.gemm as gemm

    assert isinstance(gemm.cpu_vendor(), str)  # this machine's, e.g. 'GenuineIntel' or 'AuthenticAMD'
    monkeypatch.setattr(gemm, '_backend', 'auto')
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512')
    monkeypatch.setattr(gemm, 'cpu_vendor', lambda: 'GenuineIntel')
    assert not gemm.onednn_preferred()  # MKL runs AVX-512 on Intel CPUs
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    monkeypatch.setattr(gemm, 'cpu_vendor', lambda: 'AuthenticAMD')
    assert not gemm.onednn_preferred()  # both libraries run AVX2 code there, and MKL's is faster (Zen 3)
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512')
    assert gemm.onednn_preferred()  # Zen 4/5: oneDNN runs AVX-512, MKL only AVX2
    with gemm.gemm_backend('mkl'):
        assert not gemm.onednn_preferred()
    assert gemm.onednn_preferred()  # restored
    with pytest.raises(ValueError, match='unknown GEMM backend'), gemm.gemm_backend('blas'):
        pass
    from uniform_vit.errors import UserError

    monkeypatch.setattr(gemm, '_backend', 'openblas')  # as from UNIFORM_VIT_GEMM=openblas: one clear CLI line
    with pytest.raises(UserError, match='UNIFORM_VIT_GEMM'):
        gemm.onednn_preferred()
