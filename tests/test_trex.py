"""TReX cross-layer attention reuse: conversion, FLOPs, plans, proxy, budgeted search (fake clock), IMC estimate."""

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, VisionTransformer

from conftest import randomize_bn
from uniform_vit import reparameterize
from uniform_vit.errors import UserError
from uniform_vit.layers.flops import count_flops
from uniform_vit.trex import (
    LatencyMeter,
    OutputReuse,
    TimmReuseAttention,
    UniformMHAReuseAttention,
    UniformReuseAttention,
    apply_reuse,
    attention_costs,
    attention_layers,
    greedy_search,
    layer_similarity,
    resolve_plan,
    summarize,
)


def tiny_vit() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=10,
                             in_chans=1).eval()


def tiny_uniform(attn_type: str = 'reuse') -> nn.Module:
    return randomize_bn(timm.create_model('uniform_t', num_classes=10, in_chans=1, attn_type=attn_type)).eval()


X_VIT = (2, 1, 32, 32)
X_UNI = (2, 1, 64, 64)


@pytest.mark.parametrize('kind', ['vit', 'reuse', 'mha'])
def test_empty_plan_gives_the_original_outputs(kind):
    m = tiny_vit() if kind == 'vit' else tiny_uniform(kind)
    x = torch.randn(*(X_VIT if kind == 'vit' else X_UNI))
    with torch.no_grad():
        assert torch.equal(apply_reuse(m, [])(x), m(x))


def test_vit_reuse_layer_has_no_qk_and_saves_the_expected_flops():
    m = tiny_vit()
    r = apply_reuse(m, [2, 3])
    for i in (2, 3):
        a = r.blocks[i].attn
        assert isinstance(a, TimmReuseAttention)
        names = {n for n, _ in a.named_parameters()}
        assert names == {'v.weight', 'v.bias', 'proj.weight', 'proj.bias'}
        assert torch.equal(a.v.weight, m.blocks[i].attn.qkv.weight[64:])  # V rows kept, Q/K rows dropped
    C, N = 32, 17  # 4x4 patches + class token
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in r.parameters()) == 2 * (2 * C * C + 2 * C)
    x = torch.randn(*X_VIT)
    B = X_VIT[0]
    # per reusing layer: the q and k projections (2 x N x C x C MACs) and q k^T (N x N x C MACs); 2 FLOPs per MAC
    expected = 2 * B * 2 * (2 * N * C * C + N * N * C)
    assert count_flops(m, x) - count_flops(r, x) == expected


@pytest.mark.parametrize('attn_type', ['reuse', 'mha'])
def test_uniform_reuse_layer_has_no_qk_and_saves_the_expected_flops(attn_type):
    m = tiny_uniform(attn_type)
    r = apply_reuse(m, [2, 4])
    x = torch.randn(*X_UNI)
    expected_params, expected_flops = 0, 0
    B, side = X_UNI[0], {1: 2, 2: 1}  # 64 px: stage 1 runs on 2x2 tokens, stage 2 on 1x1 (one window each)
    for s, b in ((1, 1), (2, 1)):  # layers 2 and 4
        old = m.stages[s].blocks[b][2].m.attn
        new = r.stages[s].blocks[b][2].m.attn
        names = {n.split('.')[0] for n, _ in new.named_parameters()}
        N, C = side[s] ** 2, old.dim
        if attn_type == 'reuse':
            assert isinstance(new, UniformReuseAttention)
            assert names == {'v_convs', 'proj'}
            dropped = [old.qk, old.q_dw, old.rel_bias]
            # q's 7x7 depthwise conv only runs the taps that reach the map (SameConv2d): (2*side-1)^2 on tiny maps
            qk, kq = old.qk_dim, min(old.q_dw.c.kernel_size[0], 2 * side[s] - 1)
            macs = N * C * 2 * qk + N * qk * kq * kq + N * N * qk  # qk 1x1 conv, q dw conv, q k^T
        else:
            assert isinstance(new, UniformMHAReuseAttention)
            assert names == {'v', 'proj'}
            h, kd = old.num_heads, old.key_dim
            dropped = [old.rel_bias]
            expected_params += 2 * h * kd * (C + 2)  # q/k rows of the qkv conv and their BN affine
            macs = N * C * 2 * h * kd + h * N * N * kd
        expected_params += sum(p.numel() for d in dropped for p in d.parameters())
        expected_flops += 2 * B * macs
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in r.parameters()) == expected_params
    assert count_flops(m, x) - count_flops(r, x) == expected_flops


def _attn_io(model: nn.Module, names: list[str], x: torch.Tensor) -> dict:
    mods = dict(model.named_modules())
    io, hooks = {}, []
    for n in names:
        hooks.append(mods[n].register_forward_hook(lambda mod, a, out, n=n: io.__setitem__(n, (a[0], out))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return io


def test_vit_map_reuse_applies_the_sources_map_to_own_values():
    m = tiny_vit()
    r = apply_reuse(m, {3: 1})
    io = _attn_io(r, ['blocks.1.attn', 'blocks.3.attn'], torch.randn(*X_VIT))
    (x1, _), (x3, out3) = io['blocks.1.attn'], io['blocks.3.attn']
    a1, a3 = m.blocks[1].attn, m.blocks[3].attn  # the ORIGINAL weights
    B, N, C = x1.shape
    q, k, _ = a1.qkv(x1).reshape(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4)
    attn = (q * a1.scale @ k.transpose(-2, -1)).softmax(-1)
    v = a3.qkv(x3).reshape(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
    expected = a3.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(out3, expected)


def test_uniform_map_reuse_applies_the_sources_shared_map_to_own_values():
    m = tiny_uniform()
    r = apply_reuse(m, [2])
    n1, n2 = 'stages.1.blocks.0.2.m.attn', 'stages.1.blocks.1.2.m.attn'
    io = _attn_io(r, [n1, n2], torch.randn(2, 1, 128, 128))  # stage 1 on 4x4 tokens
    (x1, _), (x2, out2) = io[n1], io[n2]
    a1, a2 = m.stages[1].blocks[0][2].m.attn, m.stages[1].blocks[1][2].m.attn
    B, C, H, W = x1.shape
    with torch.no_grad():
        q, k = a1.qk(x1).split([a1.qk_dim, a1.qk_dim], 1)
        q = a1.q_dw(q).flatten(2)
        attn = (q.transpose(1, 2) @ k.flatten(2) * a1.scale + a1.rel_bias(H, W)[0]).softmax(-1)  # (B, N, N)
        v = torch.cat([c(xi) for c, xi in zip(a2.v_convs, x2.split(a2.splits, 1))], 1).flatten(2)
        expected = a2.proj((v @ attn.transpose(1, 2)).view(B, C, H, W))
    torch.testing.assert_close(out2, expected)


@pytest.mark.parametrize('transform', ['channel', 'linear'])
@pytest.mark.parametrize('kind', ['vit', 'reuse'])
def test_output_reuse_starts_as_identity_and_learns(kind, transform):
    m = tiny_vit() if kind == 'vit' else tiny_uniform()
    plan = {3: 1} if kind == 'vit' else {2: 1}
    r = apply_reuse(m, plan, mode='output', transform=transform)
    src, dst = (('blocks.1.attn', 'blocks.3.attn') if kind == 'vit' else
                ('stages.1.blocks.0.2.m.attn', 'stages.1.blocks.1.2.m.attn'))
    x = torch.randn(*(X_VIT if kind == 'vit' else (2, 1, 128, 128)))
    io = _attn_io(r, [src, dst], x)
    reuse = dict(r.named_modules())[dst]
    assert isinstance(reuse, OutputReuse)
    torch.testing.assert_close(io[dst][1], io[src][1])  # T = identity at conversion
    C = 32 if kind == 'vit' else 128
    assert sum(p.numel() for p in reuse.parameters()) == (2 * C if transform == 'channel' else C * C + C)
    r.train()
    r(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reuse.parameters())


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning', 'ignore::FutureWarning')
@pytest.mark.parametrize('mode', ['attn', 'output'])
@pytest.mark.parametrize('kind', ['vit', 'reuse', 'mha'])
def test_deploy_form_and_trace_keep_the_plan(kind, mode):
    m = tiny_vit() if kind == 'vit' else tiny_uniform(kind)
    plan = [1, 3] if kind == 'vit' else [2, 4]
    r = apply_reuse(m, plan, mode=mode)
    if mode == 'output':  # move T off identity so the test sees it
        for p in (p for n, p in r.named_parameters() if n.endswith(('.scale', '.shift'))):
            p.data.uniform_(0.5, 1.5)
    x = torch.randn(*(X_VIT if kind == 'vit' else (2, 1, 128, 128)))
    fused = reparameterize(r)
    if kind != 'vit':
        assert not any(isinstance(mm, nn.BatchNorm2d) for mm in fused.modules())
    with torch.no_grad():
        y = r(x)
        torch.testing.assert_close(fused(x), y, rtol=1e-4, atol=1e-5)
        traced = torch.jit.trace(fused, x, check_trace=False)
        torch.testing.assert_close(traced(x), y, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(y, m(x), atol=1e-4)  # and the plan really changed the network


@pytest.mark.parametrize('mode', ['attn', 'output'])
def test_converted_uniform_deploy_form_stays_channels_last_on_the_fast_ops(mode):
    # the deploy form runs channels-last on this library's ops; a converted layer that returned an NCHW map (or ran
    # its values through a generic conv) sent every later layer to its slow path: the converted uniform_t ran 1.45x
    # slower than the original (session 33). Same numbers from NCHW and channels-last inputs.
    from uniform_vit.layers.conv import DepthwiseConv2d
    from uniform_vit.trex import UniformSourceAttention

    fused = reparameterize(apply_reuse(tiny_uniform(), [2, 4], mode=mode))
    converted = [mm for mm in fused.modules()
                 if isinstance(mm, (UniformSourceAttention, UniformReuseAttention, OutputReuse))]
    assert len(converted) == 4
    for mm in converted:
        if not isinstance(mm, OutputReuse):
            assert len(mm.v_convs) == 1 and isinstance(mm.v_convs[0], DepthwiseConv2d)
    layouts = []
    hooks = [mm.register_forward_hook(lambda mod, inp, out: layouts.append(
        out.is_contiguous(memory_format=torch.channels_last))) for mm in converted]
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        y = fused(x)
        layouts.clear()
        y_cl = fused(x.contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    assert layouts == [True] * 4
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-5)


def test_bad_plans_are_clear_errors():
    layers = attention_layers(tiny_vit())
    with pytest.raises(UserError, match='must be an earlier layer'):
        resolve_plan(layers, {1: 2})
    with pytest.raises(UserError, match='out of range.*4 attention layers'):
        resolve_plan(layers, [7])
    with pytest.raises(UserError, match='out of range'):
        resolve_plan(layers, {2: -1})
    with pytest.raises(UserError, match='layer 0 cannot reuse'):
        resolve_plan(layers, [0])
    with pytest.raises(UserError, match='layer 0 cannot reuse'):
        resolve_plan(layers, [0, 1])
    with pytest.raises(UserError, match='reuses too'):
        resolve_plan(layers, {2: 1, 3: 2})
    with pytest.raises(UserError, match='repeats'):
        resolve_plan(layers, [2, 2])
    with pytest.raises(UserError, match='not a layer index'):
        resolve_plan(layers, ['2'])
    with pytest.raises(UserError, match='unknown reuse mode'):
        apply_reuse(tiny_vit(), [1], mode='heads')
    with pytest.raises(UserError, match='unknown output transform'):
        apply_reuse(tiny_vit(), [1], mode='output', transform='mlp')
    assert resolve_plan(layers, [1, 2]) == {1: 0, 2: 0}  # a chain falls back to the nearest computing layer


def test_uniform_rejects_cross_stage_plans_and_other_models():
    u = tiny_uniform()
    layers = attention_layers(u)
    assert [L.stage for L in layers] == [0, 1, 1, 2, 2]
    with pytest.raises(UserError, match=r'layer 2 \(stage 1\) cannot reuse layer 0 \(stage 0\).*within a stage'):
        resolve_plan(layers, {2: 0})
    with pytest.raises(UserError, match=r'layer 1 \(stage 1\) cannot reuse layer 0 \(stage 0\)'):
        resolve_plan(layers, [1])  # first layer of stage 1: its nearest computing layer is in stage 0
    with pytest.raises(UserError, match='already has cross-layer reuse'):
        apply_reuse(apply_reuse(u, [2]), [4])
    deploy = timm.create_model('uniform_t', num_classes=10, deploy=True)
    with pytest.raises(UserError, match='train form'):
        apply_reuse(deploy, [2])
    with pytest.raises(UserError, match='not supported'):
        apply_reuse(timm.create_model('resnet10t', num_classes=10), [1])


def test_similarity_proxy_scores_identical_maps_as_one():
    m = tiny_vit()
    with torch.no_grad():  # block 1 adds nothing to the stream and block 2 attends exactly like block 1
        for p in (m.blocks[1].attn.proj, m.blocks[1].mlp.fc2):
            p.weight.zero_()
            p.bias.zero_()
        m.blocks[2].norm1.load_state_dict(m.blocks[1].norm1.state_dict())
        m.blocks[2].attn.qkv.weight[:64] = m.blocks[1].attn.qkv.weight[:64]
        m.blocks[2].attn.qkv.bias[:64] = m.blocks[1].attn.qkv.bias[:64]
    sim = layer_similarity(m, [torch.randn(4, 1, 32, 32), torch.randn(3, 1, 32, 32)])
    assert set(sim['attn']) == {(i, j) for i in range(4) for j in range(i)}
    assert sim['attn'][(2, 1)] == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= v < 0.999 for k, v in sim['attn'].items() if k != (2, 1))
    assert all(0 <= v <= 1 for v in sim['output'].values())
    u_sim = layer_similarity(tiny_uniform(), [torch.randn(2, 1, 64, 64)])
    assert set(u_sim['attn']) == {(2, 1), (4, 3)}  # same-stage pairs only


class FakeClock:
    """Time advances only when attention/MLP modules run: 1.0 per computing attention layer, 0.4 per reusing one
    (Q/K and softmax gone), 1.0 per MLP, so a tiny ViT of 4 blocks costs 8.0 and each reuse saves 0.6."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def hook(self, module: nn.Module, args: tuple) -> None:
        from timm.layers import Mlp

        from uniform_vit.trex import TimmSourceAttention

        if type(module) is Attention or isinstance(module, TimmSourceAttention):
            self.t += 1.0
        elif isinstance(module, TimmReuseAttention):
            self.t += 0.4
        elif isinstance(module, Mlp):
            self.t += 1.0


@pytest.fixture
def fake_clock():
    clock = FakeClock()
    handle = nn.modules.module.register_module_forward_pre_hook(clock.hook)
    yield clock
    handle.remove()


SIM = {(1, 0): 0.5, (2, 1): 0.1, (2, 0): 0.05, (3, 2): 0.9, (3, 1): 0.2, (3, 0): 0.1}


def test_search_meets_the_budget_with_measured_latency(fake_clock):
    m = tiny_vit()
    meter = LatencyMeter(m, torch.randn(1, 1, 32, 32), rounds=3, warmup=1, inner=1, clock=fake_clock, trace=False)
    res = greedy_search(m, 0.9, SIM, meter)
    # best proxy first: layer 3 (0.9 with source 2), then layer 1 (plan score 0.5 + 0.9 beats 0.1 + 0.2)
    assert res.reuse_layers == [1, 3] and res.sources == {1: 0, 3: 2}
    assert res.budget_met and res.latency_ratio == pytest.approx((8 - 2 * 0.6) / 8) and res.latency_ratio <= 0.9
    assert [s['latency_ratio'] for s in res.steps] == pytest.approx([(8 - 0.6) / 8, (8 - 1.2) / 8])
    assert meter.measurements[-1]['rounds'] == 6  # the accepted plan was re-measured (verification)


def test_search_reports_an_unreachable_budget(fake_clock):
    m = tiny_vit()
    meter = LatencyMeter(m, torch.randn(1, 1, 32, 32), rounds=2, warmup=0, inner=1, clock=fake_clock, trace=False)
    res = greedy_search(m, 0.5, SIM, meter)
    assert res.reuse_layers == [1, 2, 3] and not res.budget_met
    assert res.latency_ratio == pytest.approx((8 - 3 * 0.6) / 8)
    assert greedy_search(m, 1.0, SIM, meter).reuse_layers == []
    with pytest.raises(UserError, match='budget'):
        greedy_search(m, 1.5, SIM, meter)


def test_imc_estimate_counts():
    m = tiny_vit()
    x = torch.randn(1, 1, 32, 32)
    orig = attention_costs(m, x)
    r = attention_costs(apply_reuse(m, [2]), x)
    o = attention_costs(apply_reuse(m, [3], mode='output'), x)
    N, bits = 17, 8
    # static qkv (96 outputs x 4 slices) + 2 heads x (k^T: 17 cols, v: 16 cols) x 4 slices + proj (32 x 4)
    assert orig[0].counts['adc_reads'] == bits * N * (384 + 2 * 68 + 2 * 64 + 128)
    assert orig[0].counts['softmax_elems'] == 2 * N * N
    assert r[2].kind == 'reuse-map' and r[2].counts['softmax_elems'] == 0
    assert r[2].counts['adc_reads'] == bits * N * (128 + 2 * 64 + 128)  # v only, attn v, proj
    assert o[3].kind == 'reuse-output' and o[3].counts['adc_reads'] == 0 and o[3].counts['digital_macs'] == N * 32
    s = summarize(orig, r)
    assert 'ESTIMATE' in s['label']
    assert all(0 < s['ratio'][k] < 1 for k in ('energy_nj', 'delay_us', 'area_mm2', 'edap'))
    assert r[2].energy_nj < orig[2].energy_nj and r[2].area_mm2 < orig[2].area_mm2
    u = attention_costs(tiny_uniform(), torch.randn(1, 1, 224, 224))
    assert [c.kind for c in u] == ['attention'] * 5 and u[0].counts['mvm'] > u[3].counts['mvm']


def test_loss_proxy_ranks_whole_plans(fake_clock):
    from uniform_vit.trex import loss_score

    m = tiny_vit()
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, 10, (16,))
    score = loss_score(m, x, y)
    assert score({}) == pytest.approx(-torch.nn.functional.cross_entropy(m(x), y).item(), rel=1e-5)
    meter = LatencyMeter(m, x[:1], rounds=2, warmup=0, inner=1, clock=fake_clock, trace=False)
    res = greedy_search(m, 0.95, score, meter)  # one reuse (ratio 0.925) meets 0.95
    singles = {c: score({c: c - 1}) for c in (1, 2, 3)}
    assert res.reuse_layers == [max(singles, key=singles.get)]
    assert res.proxy_score == pytest.approx(max(singles.values()))


def test_bus_keeps_nothing_after_a_forward_and_survives_copies():
    import copy

    from uniform_vit.trex import TimmSourceAttention

    r = apply_reuse(tiny_vit(), {2: 1, 3: 1})  # two readers of one map: the last one removes it
    x = torch.randn(*X_VIT)
    with torch.no_grad():
        y = r(x)
        bus = r.blocks[1].attn.bus
        assert isinstance(r.blocks[1].attn, TimmSourceAttention) and bus.store == {}
        torch.testing.assert_close(copy.deepcopy(r)(x), y)
        assert bus.store == {}
