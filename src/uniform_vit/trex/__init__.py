"""TReX: attention reuse ACROSS layers (Moitra et al., arXiv 2408.12742), for timm ViT/DeiT and UniForm.

UniForm already reuses one attention map across the heads of a layer; TReX lets chosen layers reuse an earlier
layer's map (or whole attention output) instead of computing their own. See docs/trex.md.
"""

from .imc_cost import LABEL as IMC_LABEL
from .imc_cost import CrossbarConfig, LayerCost, attention_costs, summarize
from .reuse import (
    MODES,
    TRANSFORMS,
    AttentionBus,
    AttnLayer,
    OutputReuse,
    TimmReuseAttention,
    TimmSourceAttention,
    UniformMHAReuseAttention,
    UniformMHASourceAttention,
    UniformReuseAttention,
    UniformSourceAttention,
    apply_reuse,
    attention_layers,
    resolve_plan,
)
from .search import (
    LatencyMeter,
    SearchResult,
    deploy_callable,
    greedy_search,
    layer_similarity,
    loss_score,
    plan_score,
)

__all__ = ['IMC_LABEL', 'MODES', 'TRANSFORMS', 'AttentionBus', 'AttnLayer', 'CrossbarConfig', 'LatencyMeter',
           'LayerCost', 'OutputReuse', 'SearchResult', 'TimmReuseAttention', 'TimmSourceAttention',
           'UniformMHAReuseAttention', 'UniformMHASourceAttention', 'UniformReuseAttention', 'UniformSourceAttention',
           'apply_reuse', 'attention_costs', 'attention_layers', 'deploy_callable', 'greedy_search',
           'layer_similarity', 'loss_score', 'plan_score', 'resolve_plan', 'summarize']
