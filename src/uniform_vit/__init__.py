"""uniform-vit: UniForm (Reuse Attention) vision transformers for edge devices, as timm models.

``import uniform_vit`` registers ``uniform_t/s/m/l`` with timm, so ``timm.create_model('uniform_t')`` works.
"""

from .layers.attention import ATTENTION_KINDS, ReuseAttention, register_attention, reuse_attention
from .layers.fuse import reparameterize
from .models import uniform  # noqa: F401  (registers the models with timm)
from .models.uniform import VARIANTS, UniForm, UniFormConfig
from .utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__version__ = '0.1.0'

__all__ = [
    'ATTENTION_KINDS', 'CheckpointError', 'ReuseAttention', 'UniForm', 'UniFormConfig', 'VARIANTS', 'load_checkpoint',
    'register_attention', 'reparameterize', 'reuse_attention', 'save_checkpoint',
]
