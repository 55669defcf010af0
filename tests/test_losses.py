"""The CH loss against its formula, computed here in float64 from first principles."""

from __future__ import annotations

import pytest
import torch

from gradq_fx.losses import CHLoss, ch_loss


def reference(logits, target, delta, huber_delta):
    z = logits.double()
    log_probs = z - z.logsumexp(dim=1, keepdim=True)
    cross_entropy = -log_probs[torch.arange(len(target)), target].mean()
    diff = (log_probs.exp() - torch.eye(z.shape[1], dtype=torch.float64)[target]).abs()
    quadratic = 0.5 * diff**2
    linear = huber_delta * (diff - 0.5 * huber_delta)
    huber = torch.where(diff <= huber_delta, quadratic, linear).sum(dim=1).mean()
    return delta * cross_entropy + (1 - delta) * huber


@pytest.mark.parametrize("delta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("huber_delta", [1.0, 0.1])
def test_ch_loss_matches_formula(delta, huber_delta):
    torch.manual_seed(0)
    logits = torch.randn(13, 7) * 4
    logits[0, 3] = 60.0  # an outlier logit
    target = torch.randint(0, 7, (13,))
    expected = reference(logits, target, delta, huber_delta)
    actual = ch_loss(logits, target, delta, huber_delta)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)
    assert actual.dtype == torch.float32


def test_ch_loss_gradient_matches_formula_and_bf16_logits():
    torch.manual_seed(1)
    logits = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 10, (5,))
    (expected,) = torch.autograd.grad(reference(logits, target, 0.5, 1.0), logits)
    logits32 = logits.detach().float().requires_grad_(True)
    (actual,) = torch.autograd.grad(ch_loss(logits32, target), logits32)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-6)
    assert ch_loss(logits.detach().bfloat16(), target).dtype == torch.float32


def test_huber_term_bounds_an_outlier_gradient():
    """The point of the blend: a confidently wrong sample's gradient is smaller than CE's."""
    logits = torch.tensor([[30.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([1])
    (ce_grad,) = torch.autograd.grad(ch_loss(logits, target, delta=1.0), logits)
    (huber_grad,) = torch.autograd.grad(ch_loss(logits, target, delta=0.0), logits)
    assert huber_grad.abs().max() < 1e-6 < ce_grad.abs().max()


def test_bad_arguments_raise():
    logits, target = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="delta must be in"):
        ch_loss(logits, target, delta=1.5)
    with pytest.raises(ValueError, match="huber_delta"):
        CHLoss(huber_delta=0.0)
    with pytest.raises(ValueError, match="logits"):
        ch_loss(logits, target[:2])
    torch.testing.assert_close(CHLoss(0.3)(logits, target), ch_loss(logits, target, 0.3))
