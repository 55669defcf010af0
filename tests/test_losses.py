"""The CH loss against its formula, computed here in float64 from first principles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradq_fx.losses import CHLoss, ch_loss, kd_loss


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


# --------------------------------------------------------------------------- distillation


def kd_reference(logits, teacher_probs, target, alpha, temperature):
    """alpha * T^2 * soft CE(softened teacher, student / T) + (1 - alpha) * CE, float64."""
    z = logits.double() / temperature
    log_probs = z - z.logsumexp(dim=1, keepdim=True)
    p = teacher_probs.double() ** (1 / temperature)
    p = p / p.sum(dim=1, keepdim=True)
    soft = -(p * log_probs).sum(dim=1).mean() * temperature**2
    if alpha == 1:
        return soft
    full = logits.double() - logits.double().logsumexp(dim=1, keepdim=True)
    hard = -full[torch.arange(len(target)), target].mean()
    return alpha * soft + (1 - alpha) * hard


def teacher_case(seed, batch=13, classes=7):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=gen) * 3
    teacher = (torch.randn(batch, classes, generator=gen) * 2).softmax(dim=1)
    teacher[0] = torch.eye(classes)[2]  # a one-hot row: zeros in the teacher's probabilities
    target = torch.randint(0, classes, (batch,), generator=gen)
    return logits, teacher, target


@pytest.mark.parametrize("alpha", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_loss_matches_formula(alpha, temperature):
    logits, teacher, target = teacher_case(seed=int(10 * alpha + temperature))
    logits.requires_grad_()
    actual = kd_loss(logits, teacher, target, alpha=alpha, temperature=temperature)
    logits64 = logits.detach().double().requires_grad_()
    expected = kd_reference(logits64, teacher, target, alpha, temperature)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)
    assert actual.dtype == torch.float32
    (grad,) = torch.autograd.grad(actual, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits64)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)


def test_kd_loss_pure_distillation_properties():
    logits, teacher, _ = teacher_case(seed=3)
    # Without a target (alpha = 1), the default; against its own softmax the gradient is zero.
    assert kd_loss(logits, teacher) == kd_loss(logits, teacher, alpha=1.0)
    own = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(kd_loss(own, logits.softmax(dim=1)), own)
    assert grad.abs().max() < 1e-6
    # One-hot teacher probabilities make it the hard-label cross-entropy.
    target = torch.arange(13) % 7
    onehot = torch.eye(7)[target]
    torch.testing.assert_close(kd_loss(logits, onehot), F.cross_entropy(logits, target))
    # No gradient flows into the teacher's probabilities.
    probs = teacher.clone().requires_grad_()
    kd_loss(logits.requires_grad_(), probs).backward()
    assert probs.grad is None
    assert kd_loss(logits.bfloat16(), teacher).dtype == torch.float32


def test_kd_loss_bad_arguments():
    logits, teacher, target = teacher_case(seed=4)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(logits, teacher, target, alpha=1.2)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(logits, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="target"):
        kd_loss(logits, teacher, alpha=0.5)
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        kd_loss(logits, teacher[:, :3])
