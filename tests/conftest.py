import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import uniform_vit  # noqa: F401  (registers the models)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm real, non-trivial statistics and affine params (zero-init BNs would hide fuse bugs)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    for name, p in model.named_parameters():
        if 'attention_biases' in name:
            p.data.normal_(0, 1, generator=g)
    return model


class OpLog(TorchDispatchMode):
    """Records the name of every ATen (or custom) op that runs inside ``with OpLog() as log:`` in ``log.ops``."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
