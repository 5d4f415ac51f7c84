"""Checkpoints: plain state dicts and safetensors round-trip; mismatches give errors that name them."""

import pytest
import timm
import torch

from conftest import randomize_bn
from uniform_vit import CheckpointError, load_checkpoint, reparameterize, save_checkpoint
from uniform_vit.utils.checkpoint import model_from_checkpoint


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_round_trip_with_metadata(tmp_path, suffix):
    m = randomize_bn(timm.create_model('uniform_t', num_classes=10, in_chans=1)).eval()
    path = save_checkpoint(m, tmp_path / f'w{suffix}', meta={'model': 'uniform_t', 'in_chans': 1,
                                                              'labels': [str(i) for i in range(10)]})
    assert not list(tmp_path.glob('*.tmp'))  # atomic write leaves no temp file
    m2, meta = model_from_checkpoint(path)
    assert meta['labels'][3] == '3' and meta['num_classes'] == 10
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), m2.eval()(x))


def test_wrong_class_count_is_named(tmp_path):
    path = save_checkpoint(timm.create_model('uniform_t', num_classes=10), tmp_path / 'w.safetensors',
                           meta={'model': 'uniform_t'})
    m = timm.create_model('uniform_t', num_classes=1000)
    with pytest.raises(CheckpointError, match=r'10 classes .* 1000.*--num-classes 10'):
        load_checkpoint(m, path)
    load_checkpoint(m, path, reset_head=True)  # on purpose: fine-tuning keeps the new head
    assert m.head.linear.out_features == 1000


def test_wrong_variant_is_named(tmp_path):
    path = save_checkpoint(timm.create_model('uniform_s'), tmp_path / 'w.pth', meta={'model': 'uniform_s'})
    with pytest.raises(CheckpointError, match=r'does not fit uniform_t \(it looks like uniform_s\)'):
        load_checkpoint(timm.create_model('uniform_t'), path)


def test_fused_checkpoint_needs_deploy_model(tmp_path):
    m = randomize_bn(timm.create_model('uniform_t', num_classes=10)).eval()
    path = save_checkpoint(reparameterize(m), tmp_path / 'fused.safetensors', meta={'model': 'uniform_t'})
    with pytest.raises(CheckpointError, match='deploy=True'):
        load_checkpoint(timm.create_model('uniform_t', num_classes=10), path)
    m2, meta = model_from_checkpoint(path)  # metadata says fused: built in deploy form
    assert meta['fused'] is True
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m2(x), m(x), atol=1e-5)


def test_training_checkpoint_dict_and_corrupt_files(tmp_path):
    m = timm.create_model('uniform_t', num_classes=3)
    torch.save({'model': {f'module.{k}': v for k, v in m.state_dict().items()}, 'epoch': 4,
                'config': {'model': 'uniform_t', 'num_classes': 3}}, tmp_path / 'train.pth')
    m2, meta = model_from_checkpoint(tmp_path / 'train.pth')
    assert meta['model'] == 'uniform_t' and m2.num_classes == 3
    (tmp_path / 'bad.safetensors').write_bytes(b'not a tensor file')
    with pytest.raises(CheckpointError, match='cannot read'):
        model_from_checkpoint(tmp_path / 'bad.safetensors', model='uniform_t')
    with pytest.raises(CheckpointError, match='not found'):
        model_from_checkpoint(tmp_path / 'missing.pth', model='uniform_t')
