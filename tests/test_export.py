"""Export round trips: ONNX (every variant, dynamic batch, windows with padding), TorchScript, int8, CLI errors."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from conftest import randomize_bn
from uniform_vit import save_checkpoint
from uniform_vit.errors import UserError
from uniform_vit.export.onnx import OrtRunner, check_onnx, export_onnx, max_abs_diff
from uniform_vit.layers.fuse import count_batchnorms, reparameterize
from uniform_vit.models.uniform import VARIANTS

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')


def cli(*args):
    return subprocess.run([sys.executable, '-m', 'uniform_vit.cli.main', *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def fused_model(name: str, attn_type: str = 'reuse', in_chans: int = 3, seed: int = 0) -> torch.nn.Module:
    model = timm.create_model(name, num_classes=10, in_chans=in_chans, attn_type=attn_type)
    fused = reparameterize(randomize_bn(model, seed))
    assert count_batchnorms(fused) == 0
    return fused


@pytest.mark.parametrize('name', list(VARIANTS))
def test_onnx_parity_every_variant_dynamic_batch(tmp_path, name):
    model = fused_model(name)
    path = export_onnx(model, tmp_path / f'{name}.onnx', (3, 64, 64))
    facts = check_onnx(path)
    assert facts['dynamic_batch'] and facts['opset'] >= 18
    runner = OrtRunner(path)
    for b in (1, 3):
        x = torch.randn(b, 3, 64, 64)
        out = runner(x)
        assert out.shape == (b, 10)
        with torch.no_grad():
            ref = model(x)
        assert ref.abs().max() > 0.1  # logits of real size, so the tolerance below means something
        assert float((out - ref).abs().max()) <= 1e-4


def test_onnx_windowed_attention_with_padding_and_mha(tmp_path):
    # 128 px -> 8x8 tokens in stage 0: padded to 14x14 and split into four 7x7 windows, then cropped back
    for attn in ('reuse', 'mha'):
        model = fused_model('uniform_t', attn_type=attn, in_chans=1)
        path = export_onnx(model, tmp_path / f'{attn}.onnx', (1, 128, 128))
        assert max_abs_diff(model, OrtRunner(path), [torch.randn(2, 1, 128, 128)]) <= 1e-4


def test_onnx_graph_is_plain_nchw(tmp_path):
    # the deploy form runs channels-last in PyTorch; in an ONNX graph that would only add layout Transposes. At 64 px
    # every stage fits one window, so the only Transposes left are q^T and A^T feeding a MatMul (onnxruntime folds
    # those into the product); the channels-last graph had others, around the attention output.
    import onnx

    model = fused_model('uniform_t')
    path = export_onnx(model, tmp_path / 't.onnx', (3, 64, 64))
    graph = onnx.load(str(path)).graph
    consumers: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    transposes = [n for n in graph.node if n.op_type == 'Transpose']
    assert transposes and all(consumers.get(n.output[0]) == ['MatMul'] for n in transposes)
    assert max_abs_diff(model, OrtRunner(path), [torch.randn(2, 3, 64, 64)]) <= 1e-4


@pytest.mark.parametrize('name,widths', [('uniform_t', [16, 16, 32, 64]), ('uniform_l', [32, 48, 96, 192])])
def test_align_stem_channels_is_exact(name, widths):
    from uniform_vit.export.onnx import align_stem_channels

    model = fused_model(name)
    wide = align_stem_channels(model, 16)
    assert [c.out_channels for c in wide.patch_embed if isinstance(c, torch.nn.Conv2d)] == widths
    assert [c.out_channels for c in model.patch_embed if isinstance(c, torch.nn.Conv2d)][0] == widths[-1] // 8
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # with the C++ ops a width may take another code path (uniform_l's 24-channel first conv runs the C++ op, the
        # aligned 32-channel one oneDNN), so the sums may round differently (uniform_t's are bitwise equal since
        # session 26, when the products' last columns became a masked vector instead of scalars on AVX-512)
        assert torch.allclose(wide(x), model(x), rtol=1e-5, atol=1e-5)
        # bitwise on the whole batch with ATen's convs; split into 1-image parts oneDNN picks other kernels for 8
        # and 16 channels
        for pe in (model.patch_embed, wide.patch_embed):
            pe.chunks, pe.stem_kernel, pe.conv_kernel = 1, False, False
        assert torch.equal(wide(x), model(x))
    assert align_stem_channels(model, 8 if name == 'uniform_t' else 1) is model  # nothing to round
    assert align_stem_channels(torch.nn.Linear(2, 2), 16).__class__ is torch.nn.Linear  # no stem: unchanged


def test_onnx_align_channels_parity(tmp_path):
    model = fused_model('uniform_t')
    path = export_onnx(model, tmp_path / 'a.onnx', (3, 64, 64), align_channels=16)
    assert max_abs_diff(model, OrtRunner(path), [torch.randn(3, 3, 64, 64)]) <= 1e-4


def test_static_batch_is_fixed(tmp_path):
    model = fused_model('uniform_t', in_chans=1)
    path = export_onnx(model, tmp_path / 'static.onnx', (1, 64, 64), dynamic_batch=False)
    assert not check_onnx(path)['dynamic_batch']
    runner = OrtRunner(path)
    assert max_abs_diff(model, runner, [torch.randn(1, 1, 64, 64)]) <= 1e-4
    with pytest.raises(Exception, match='(?i)dimension|shape'):
        runner(torch.randn(3, 1, 64, 64))


def test_torchscript_parity(tmp_path):
    from uniform_vit.export.torchscript import export_torchscript, load_torchscript

    model = fused_model('uniform_s', in_chans=1)
    path = export_torchscript(model, tmp_path / 's.pt', (1, 64, 64))
    ts = load_torchscript(path)
    assert 'mkldnn::' not in str(ts.inlined_graph)  # standard ops only: LibTorch builds without oneDNN load it
    for b in (1, 3):
        x = torch.randn(b, 1, 64, 64)
        with torch.no_grad():
            assert float((ts(x) - model(x)).abs().max()) <= 1e-4


def test_bad_opset_and_output_are_user_errors(tmp_path):
    model = fused_model('uniform_t')
    with pytest.raises(UserError, match='unsupported opset 11'):
        export_onnx(model, tmp_path / 'a.onnx', (3, 64, 64), opset=11)
    with pytest.raises(UserError, match='does not exist'):
        export_onnx(model, tmp_path / 'missing' / 'a.onnx', (3, 64, 64))
    with pytest.raises(UserError, match='is a directory'):
        export_onnx(model, tmp_path, (3, 64, 64))


def _fashion_batches(n: int, size: int = 64) -> list[torch.Tensor]:
    from uniform_vit.export.images import image_dataset, sample_batches

    try:
        ds = image_dataset('fashion-mnist', size, 1, (0.286,), (0.353,), split='test')
    except UserError as e:
        pytest.skip(f'Fashion-MNIST not installed: {e}')
    return sample_batches(ds, n, 16)


@pytest.fixture(scope='module')
def t_fp32(tmp_path_factory):
    model = fused_model('uniform_t', in_chans=1)
    return model, export_onnx(model, tmp_path_factory.mktemp('fp32') / 'fp32.onnx', (1, 64, 64))


def test_int8_runs_and_stays_close_on_real_images(tmp_path, t_fp32):
    from uniform_vit.export.quant import quantize_int8

    model, fp32 = t_fp32
    calib = _fashion_batches(64)
    q = quantize_int8(fp32, tmp_path / 'int8.onnx', (x.numpy() for x in calib))
    assert q.stat().st_size < 0.5 * fp32.stat().st_size  # weights really are 8-bit
    import onnx

    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear'} <= ops
    real = torch.cat(_fashion_batches(32))  # same seed, a subset of the calibration images is fine for a smoke check
    with torch.no_grad():
        ref = model(real)
    got = OrtRunner(q)(real)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.25, rel
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.97, cos


def test_int8_without_calibration_images_is_an_error(tmp_path, t_fp32):
    from uniform_vit.export.quant import quantize_int8

    fp32 = t_fp32[1]
    with pytest.raises(UserError, match='no calibration batches'):
        quantize_int8(fp32, tmp_path / 'int8.onnx', [])
    with pytest.raises(UserError, match='unknown calibration method'):
        quantize_int8(fp32, tmp_path / 'int8.onnx', [np.zeros((1, 1, 64, 64), np.float32)], method='magic')


# ---- the command line ------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model('uniform_t', num_classes=10, in_chans=1))
    path = tmp_path_factory.mktemp('ck') / 'fm.safetensors'
    save_checkpoint(model, path, {'model': 'uniform_t', 'in_chans': 1, 'img_size': 64, 'mean': [0.286],
                                  'std': [0.353]})
    return path


def test_cli_export_int8_from_checkpoint_with_image_folder(tmp_path, tiny_checkpoint):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(12):  # a folder of images, nested at any depth, is a valid calibration source
        sub = tmp_path / 'imgs' / ('a' if i % 2 else 'b')
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(sub / f'{i}.png')
    out = tmp_path / 'fm_int8.onnx'
    r = cli('export', '--checkpoint', tiny_checkpoint, '--output', out, '--int8', '--calib-data', tmp_path / 'imgs',
            '--check-samples', 8, '--json')
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep['ok'] and rep['fused'] and rep['input_size'] == [1, 64, 64] and rep['dynamic_batch']
    assert rep['max_abs_diff_random'] <= 1e-4 and rep['max_abs_diff_real'] <= 1e-4  # fp32 parity, checked first
    assert rep['calib_images'] == 12 and rep['size_mb'] < 0.5 * rep['fp32_size_mb']
    assert 0.0 <= rep['int8_top1_agreement'] <= 1.0 and out.is_file()


@pytest.mark.parametrize('kwargs, message', [
    (dict(model_name='uniform_s'), 'does not fit uniform_s'),  # wrong variant
    (dict(num_classes=7), 'has 10 classes but --num-classes is 7'),
    (dict(in_chans=3), 'takes 1-channel images but --in-chans is 3'),
    (dict(opset=9), 'unsupported opset 9'),
    (dict(output='/nonexistent-dir/x.onnx'), 'output directory does not exist'),
    (dict(int8=True), '--int8 needs --calib-data'),
    (dict(fmt='torchscript', int8=True, calib_data='x'), 'apply to --format onnx only'),
    (dict(int8=True, calib_data='/nonexistent-images'), 'image folder not found'),
    (dict(int8=True, calib_data='fashion-mnist', calib_method='magic'), "unknown --calib-method 'magic'"),
    (dict(model_name='uniform_tt'), "did you mean 'uniform_t'"),
    (dict(img_size=16), 'at least 32'),
    (dict(align_channels='wide'), "--align-channels takes a positive integer or 'auto', got 'wide'"),
    (dict(align_channels='0'), "--align-channels takes a positive integer or 'auto', got '0'"),
    (dict(fmt='torchscript', align_channels='auto'), 'apply to --format onnx only'),
])
def test_export_bad_arguments_are_user_errors(tmp_path, tiny_checkpoint, kwargs, message):
    from uniform_vit.cli.export import export_model

    kwargs = {'output': str(tmp_path / 'x.onnx'), 'checkpoint': str(tiny_checkpoint), **kwargs}
    with pytest.raises(UserError, match=re.escape(message)):
        export_model(kwargs.pop('model_name', None), **kwargs)
    assert not (tmp_path / 'x.onnx').exists()


def test_cli_export_error_is_one_line_without_traceback(tmp_path, tiny_checkpoint):
    r = cli('export', '--checkpoint', tiny_checkpoint, '--model', 'uniform_m', '--output', tmp_path / 'x.onnx')
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('uniform-vit export: error:')
    assert 'does not fit uniform_m' in lines[0]


def test_executorch_xnnpack_parity_or_clear_error(tmp_path):
    import importlib.util

    from uniform_vit.export.executorch import ExecuTorchRunner, export_executorch

    model = fused_model('uniform_t', in_chans=1)
    if importlib.util.find_spec('executorch') is None:  # optional dependency: the error must say how to get it
        with pytest.raises(UserError, match='pip install executorch'):
            export_executorch(model, tmp_path / 't.pte', (1, 64, 64))
        return
    path = export_executorch(model, tmp_path / 't.pte', (1, 64, 64))
    assert max_abs_diff(model, ExecuTorchRunner(path), [torch.randn(1, 1, 64, 64)]) <= 1e-4


def test_peak_memory_of_onnxruntime_subprocess(t_fp32):
    from uniform_vit.export.bench import peak_memory

    res = peak_memory('onnxruntime', t_fp32[1], 2, (1, 64, 64))
    # a fresh onnxruntime process: tens of MiB, nowhere near this torch-laden test process
    assert 10 < res['base_mib'] <= res['peak_mib'] < 400 and res['model_mib'] > 1
