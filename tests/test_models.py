"""Registry-parametrized model tests: every uniform_* variant honours timm's contract and fuses exactly."""

import pytest
import timm
import torch
import torch.nn as nn

from conftest import randomize_bn
from uniform_vit import reparameterize
from uniform_vit.layers.fuse import count_batchnorms
from uniform_vit.models.uniform import DeployStem, _avx512

MODELS = timm.list_models('uniform_*')
ATTN = ['reuse', 'mha']


def test_registry_has_all_variants():
    assert MODELS == ['uniform_l', 'uniform_m', 'uniform_s', 'uniform_t']


@pytest.mark.parametrize('name,params_m,mmacs', [
    ('uniform_t', 2.01, 73), ('uniform_s', 2.63, 161), ('uniform_m', 6.99, 265), ('uniform_l', 10.4, 463)])
def test_size_matches_paper(name, params_m, mmacs):
    from uniform_vit.layers.flops import count_flops

    m = timm.create_model(name).eval()  # in a fresh process: the first call may load the C++ kernels, whose formulas
    flops = count_flops(m, torch.zeros(1, 3, 224, 224))  # count_flops registers before counting
    assert sum(p.numel() for p in m.parameters()) / 1e6 == pytest.approx(params_m, rel=0.01)
    assert flops / 2e6 == pytest.approx(mmacs, rel=0.01)


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('size', [(32, 32), (64, 48), (100, 100)])
def test_forward_sizes_and_grayscale(name, size):
    m = timm.create_model(name, num_classes=7, in_chans=1).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 1, *size))
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('attn', ATTN)
def test_backward_reaches_every_parameter(name, attn):
    m = timm.create_model(name, num_classes=5, attn_type=attn, drop_path_rate=0.1)
    for mod in m.modules():  # zero-init BNs would block gradients to the layers before them
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.ones_(mod.weight)
    m.train()
    # batch 4: with 2 samples the head BatchNorm1d output is ±1 whatever the input, so gradients vanish;
    # 128 px: stage 2 must have N > 1 tokens or q/k get no gradient through a 1-key softmax
    m(torch.randn(4, 3, 128, 128)).logsumexp(-1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('attn', ATTN)
def test_fused_equals_unfused(name, attn):
    m = randomize_bn(timm.create_model(name, num_classes=10, attn_type=attn)).eval()
    f = reparameterize(m)
    assert count_batchnorms(f) == 0
    assert count_batchnorms(m) > 0, 'reparameterize must not mutate the train form'
    for size in [(64, 64), (120, 90)]:  # 120x90 needs padded windows in stage 0
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            y, yf = m(x), f(x)
        assert (y - yf).abs().max() / y.abs().max() <= 1e-5


@pytest.mark.parametrize('name', MODELS)
def test_features_only(name):
    m = timm.create_model(name, features_only=True).eval()
    chs = m.feature_info.channels()
    assert m.feature_info.reduction() == [16, 32, 64]
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 128, 96))
    assert [f.shape[1] for f in feats] == chs
    assert [tuple(f.shape[2:]) for f in feats] == [(8, 6), (4, 3), (2, 2)]
    m1 = timm.create_model(name, features_only=True, out_indices=(2,)).eval()
    assert len(m1(torch.randn(1, 3, 64, 64))) == 1


@pytest.mark.parametrize('name', MODELS)
def test_torchscript_trace(name):
    m = randomize_bn(timm.create_model(name, num_classes=4)).eval()
    x = torch.randn(2, 3, 64, 64)
    for net in (m, reparameterize(m)):
        with torch.no_grad():
            traced = torch.jit.trace(net, x)
            assert torch.allclose(traced(x), net(x), atol=1e-5)
            x3 = torch.randn(3, 3, 64, 64)
            assert torch.allclose(traced(x3), net(x3), atol=1e-5)


def test_timm_contract():
    m = timm.create_model('uniform_t', num_classes=10).eval()
    assert m.num_features == 192
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 192, 1, 1)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 192)
    assert m.forward_head(feats).shape == (2, 10)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    m.reset_classifier(0)
    assert m(x).shape == (2, 192)
    nwd = m.no_weight_decay()
    assert nwd and all('attention_biases' in n for n in nwd)
    assert len(nwd) == 5  # one bias table per attention layer (depths 1+2+2), not one per head
    final, inter = m.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [64, 128, 192]
    assert torch.equal(final, inter[-1])
    cfg = m.pretrained_cfg
    for key in ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'first_conv', 'classifier', 'license'):
        assert key in cfg
    assert m.get_submodule(cfg['first_conv']).in_channels == 3


def test_grad_checkpointing_same_result():
    m = timm.create_model('uniform_t', num_classes=4).train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    y0 = m(x)
    m.set_grad_checkpointing(True)
    torch.manual_seed(1)
    y1 = m(x)
    assert torch.allclose(y0, y1, atol=1e-6)
    y1.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_drop_path_is_stochastic_in_train_only():
    m = timm.create_model('uniform_t', num_classes=4, drop_path_rate=0.5)
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.ones_(mod.weight)
    x = torch.randn(4, 3, 64, 64)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))


def test_deploy_constructor_has_no_bn_and_loads_fused_weights():
    m = randomize_bn(timm.create_model('uniform_t', num_classes=10)).eval()
    f = reparameterize(m)
    d = timm.create_model('uniform_t', num_classes=10, deploy=True)
    assert count_batchnorms(d) == 0
    d.load_state_dict(f.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(d(x), m(x), atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match='attn_type'):
        timm.create_model('uniform_t', attn_type='nope')
    with pytest.raises(RuntimeError, match='no pretrained'):
        timm.create_model('uniform_t', pretrained=True)


@pytest.mark.parametrize('shape', [(2, 3, 9, 7), (2, 1, 8, 8), (2, 4, 5, 6), (1, 16, 4, 4)])
def test_deploy_stem_channels_last_copy(shape):
    from uniform_vit.models.uniform import _to_channels_last

    x = torch.randn(shape)
    y = _to_channels_last(x)
    ref = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, ref) and y.stride() == ref.stride()
    nc = torch.randn(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)  # already channels-last
    assert _to_channels_last(nc).data_ptr() == nc.data_ptr()


def test_deploy_stem_defaults_follow_the_vector_isa(monkeypatch):
    import uniform_vit.models.uniform as um

    widths = {name: [(c.in_channels, c.out_channels) for c in list(reparameterize(
        timm.create_model(name).eval()).patch_embed)[2::2]] for name in ('uniform_t', 'uniform_s', 'uniform_l')}
    assert widths == {'uniform_t': [(8, 16), (16, 32), (32, 64)], 'uniform_s': [(16, 32), (32, 64), (64, 128)],
                      'uniform_l': [(24, 48), (48, 96), (96, 192)]}
    stem = DeployStem()
    for avx512, chunks, takes in ((False, 2, {(8, 16)}), (True, 4, set(sum(widths.values(), [])))):
        monkeypatch.setattr(um, '_avx512', lambda v=avx512: v)
        assert stem.batch_chunks() == chunks
        for w in sum(widths.values(), []):  # AVX2: only the 16-wide conv; AVX-512: every later stem conv
            assert stem._conv_op_width(nn.Conv2d(w[0], w[1], 3, 2, 1)) == (w in takes), (avx512, w)
        stem.chunks, stem.conv_kernel_max_out = 3, 48  # set explicitly: the same on every ISA
        assert stem.batch_chunks() == 3 and stem._conv_op_width(nn.Conv2d(24, 48, 3)) and \
            not stem._conv_op_width(nn.Conv2d(32, 64, 3))
        stem.chunks = stem.conv_kernel_max_out = None


def test_deploy_stem_chunks_are_exact_and_trace_safe():
    model = reparameterize(randomize_bn(timm.create_model('uniform_t', num_classes=10)).eval())
    stem = model.patch_embed
    assert stem.chunks is None and stem.batch_chunks() == (4 if _avx512() else 2)  # the ISA's default
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        stem.chunks = 1
        whole = model(x)
        stem.chunks = 2
        assert torch.allclose(model(x), whole, atol=1e-5)
        traced = torch.jit.trace(model, x[:4], check_trace=False)
        assert 'tensor_split' in str(traced.patch_embed.graph)  # the split is in the trace, not unrolled by size
        for b in (1, 3, 5):  # other batch sizes, including odd ones and a single image
            assert torch.allclose(traced(x[:b]), whole[:b], atol=1e-5)
        # fewer images than parts (empty parts) still leave the stem's map channels-last, eager and traced
        stem.chunks = 4
        traced4 = torch.jit.trace(model.patch_embed, x[:4], check_trace=False)
        for b in (1, 2, 3):
            for run in (stem, traced4):
                y = run(x[:b])
                assert y.is_contiguous(memory_format=torch.channels_last) and (b == 1 or not y.is_contiguous()), b
            assert torch.allclose(model(x[:b]), whole[:b], atol=1e-5)
        stem.chunks = 2
        single = torch.jit.trace(model, x[:1], check_trace=False)
        assert 'tensor_split' not in str(single.patch_embed.graph)  # a batch-1 trace does not split
        assert torch.allclose(single(x), whole, atol=1e-5)
