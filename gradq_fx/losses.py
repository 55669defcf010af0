"""GradQ-ViT's outlier-robust loss (method.md item 2).

    L = delta * CE(z, y) + (1 - delta) * Huber(softmax(z), onehot(y))

The Huber term is bounded in the logits: a mislabelled or outlying sample cannot produce the
unbounded gradients cross-entropy gives it, which keeps the gradients that gradq quantizes
free of the extreme values that would stretch their scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The paper's blend weight and Huber threshold are not known to us (method.md): delta = 0.5
# weighs both terms equally; huber_delta = 1.0 makes the Huber term quadratic over the whole
# range of a probability difference ([-1, 1]), i.e. 0.5 * squared error per class.
DEFAULT_DELTA = 0.5
DEFAULT_HUBER_DELTA = 1.0


def _check_weights(delta: float, huber_delta: float) -> None:
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    if huber_delta <= 0:
        raise ValueError(f"huber_delta must be positive, got {huber_delta!r}")


def ch_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    delta: float = DEFAULT_DELTA,
    huber_delta: float = DEFAULT_HUBER_DELTA,
) -> torch.Tensor:
    """The CH loss of logits [B, C] against class indices [B], averaged over the batch.

    The Huber term is summed over classes and averaged over the batch, like cross-entropy.
    Computed in float32 whatever the logits' dtype.
    """
    _check_weights(delta, huber_delta)
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"ch_loss takes logits [B, C] and target [B], got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    logits = logits.float()
    cross_entropy = F.cross_entropy(logits, target)
    onehot = F.one_hot(target, logits.shape[1]).float()
    huber = F.huber_loss(logits.softmax(dim=1), onehot, reduction="none", delta=huber_delta)
    return delta * cross_entropy + (1.0 - delta) * huber.sum(dim=1).mean()


class CHLoss(torch.nn.Module):
    """`ch_loss` as a module, for training loops that take a criterion."""

    def __init__(self, delta: float = DEFAULT_DELTA, huber_delta: float = DEFAULT_HUBER_DELTA):
        super().__init__()
        _check_weights(delta, huber_delta)
        self.delta, self.huber_delta = delta, huber_delta

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ch_loss(logits, target, self.delta, self.huber_delta)
