"""GradQ-ViT's outlier-robust loss (docs/method.md, "The CH loss").

    L = delta * CE(z, y) + (1 - delta) * Huber(softmax(z), onehot(y))

The Huber term is bounded in the logits: a mislabelled or outlying sample cannot produce the
unbounded gradients cross-entropy gives it, which keeps the gradients that gradq quantizes
free of the extreme values that would stretch their scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The paper's blend weight and Huber threshold are not known to us (docs/method.md):
# delta = 0.5 weighs both terms equally; huber_delta = 1.0 makes the Huber term quadratic over
# the whole range of a probability difference ([-1, 1]), i.e. 0.5 * squared error per class.
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


def kd_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    target: torch.Tensor | None = None,
    alpha: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Knowledge distillation: alpha * T^2 * soft CE + (1 - alpha) * CE(student, target).

    soft CE = -sum_c p_c log softmax(z / T)_c, averaged over the batch, with p the teacher's
    probabilities [B, C] (rows summing to 1; from a live teacher or a precomputed table,
    `gradq_fx.qat.distill.TeacherTable`). They carry no gradient. With T != 1 they are
    softened as p^(1/T), renormalised: softmax(teacher_logits / T), the same as Hinton's
    temperature applied to the teacher's logits. The T^2 factor keeps the soft term's gradient
    magnitude independent of T (Hinton et al.). Soft cross-entropy rather than KL divergence,
    as the Quantization Variation code: they differ by the teacher's entropy, a constant, so
    the gradients are the same.

    alpha = 1 (the default, and the official code's choice) is pure distillation and needs no
    target; alpha < 1 blends in the hard-label cross-entropy. Computed in float32.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if student_logits.dim() != 2 or teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"kd_loss takes student logits and teacher probabilities [B, C], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    if alpha < 1.0 and (target is None or target.shape != student_logits.shape[:1]):
        raise ValueError("kd_loss with alpha < 1 needs class indices [B] as target")
    logits = student_logits.float()
    probs = teacher_probs.detach().float()
    if temperature != 1.0:
        probs = probs.pow(1.0 / temperature)
        probs = probs / probs.sum(dim=1, keepdim=True)
    log_probs = (logits / temperature).log_softmax(dim=1)
    soft = -(probs * log_probs).sum(dim=1).mean() * temperature**2
    if alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(logits, target)
