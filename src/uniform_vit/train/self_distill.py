"""Progressive self-knowledge distillation (PS-KD; Kim et al., ICCV 2021, arXiv 2006.12000): the model as its own
teacher, at no extra compute.

Each training image's target is a mix of its (smoothed) label and the class probabilities the model itself gave that
image in the previous epoch, in its training forward pass (train mode, that epoch's augmentation):

    target = (1 - alpha_t) * smoothed_one_hot(label) + alpha_t * p_previous_epoch(image)
    alpha_t = alpha * (epoch + 1) / epochs          (0-based epoch; alpha_T = alpha at the last epoch)

The model's past beliefs soften the labels of hard or ambiguous images (Fashion-MNIST's shirts, T-shirts, pullovers
and coats) and keep the easy ones near one-hot, a per-image label smoothing that grows as the model becomes a better
teacher. The predictions are recorded from the forward pass the step runs anyway: the only cost is one ``N x C``
table (Fashion-MNIST: 2.4 MB), kept in the checkpoint so that a resumed run continues exactly.

An image with no recorded prediction yet (the first epoch, a run forked from a checkpoint without the table, or an
image the sampler dropped from every epoch so far) gets its smoothed label alone.
"""

from __future__ import annotations

import torch

from .distributed import DistInfo, all_reduce_sum


class SelfDistill:
    """The table of last epoch's predictions and the targets mixed from it. Per step: ``targets(idx, y, alpha)``
    before the forward pass, ``record(idx, logits)`` after it; ``end_epoch(info)`` once every process has finished
    the epoch (under DDP the processes' records are summed, so every rank holds the whole table)."""

    def __init__(self, num_samples: int, num_classes: int, alpha: float, smoothing: float = 0.0):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"self-distillation alpha must be in (0, 1], got {alpha}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.alpha, self.smoothing, self.num_classes = alpha, smoothing, num_classes
        self.probs = torch.zeros(num_samples, num_classes)  # last epoch's prediction per image
        self.known = torch.zeros(num_samples, dtype=torch.bool)  # whether it has one
        self._sum = torch.zeros(num_samples, num_classes, dtype=torch.float64)  # this epoch's records
        self._count = torch.zeros(num_samples, dtype=torch.float64)

    def alpha_at(self, epoch: int, epochs: int) -> float:
        """The teacher's weight in ``epoch`` (0-based) of ``epochs``: rising linearly to ``alpha`` at the last."""
        return self.alpha * (epoch + 1) / epochs

    def targets(self, idx: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
        """Soft targets ``(B, C)`` for the images ``idx`` with labels ``y``."""
        from timm.data.mixup import one_hot

        idx = idx.cpu()
        off = self.smoothing / self.num_classes  # timm's smoothed one-hot, as its Mixup targets
        hard = one_hot(y, self.num_classes, on_value=1.0 - self.smoothing + off, off_value=off)
        w = (alpha * self.known[idx].float())[:, None].to(y.device)  # no prediction yet: the label alone
        return (1.0 - w) * hard + w * self.probs[idx].to(y.device)

    @torch.no_grad()
    def record(self, idx: torch.Tensor, logits: torch.Tensor) -> None:
        """Keep the step's predictions for the images ``idx`` (an image seen twice in an epoch, as the sampler's
        padding can make it, keeps the mean)."""
        idx = idx.cpu()
        p = logits.detach().float().softmax(-1).cpu().double()
        self._sum.index_add_(0, idx, p)
        self._count.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))

    def end_epoch(self, info: DistInfo) -> None:
        """This epoch's records become the table (images not seen this epoch keep their older prediction)."""
        all_reduce_sum(self._sum, info)
        all_reduce_sum(self._count, info)
        seen = self._count > 0
        self.probs[seen] = (self._sum[seen] / self._count[seen, None]).float()
        self.known |= seen
        self._sum.zero_()
        self._count.zero_()

    def state_dict(self) -> dict:
        return dict(probs=self.probs.clone(), known=self.known.clone())

    def load_state_dict(self, state: dict) -> None:
        probs, known = state['probs'], state['known']
        if probs.shape != self.probs.shape or known.shape != self.known.shape:
            raise ValueError(f"self-distillation table of shape {tuple(probs.shape)} does not fit this run's "
                             f"{tuple(self.probs.shape)} (images x classes)")
        self.probs.copy_(probs)
        self.known.copy_(known)
