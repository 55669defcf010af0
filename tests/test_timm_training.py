"""Training as timm's train.py does, through timm's public API, compiled with gradq.

A model from `timm.create_model` with model kwargs and `set_grad_checkpointing`, an
optimizer from `timm.optim.create_optimizer_v2`, `ModelEmaV3`, mixup / cutmix with
`SoftTargetCrossEntropy`, and fp16 autocast with a `torch.amp.GradScaler` (train.py's
`--amp`). The reference is the same loop in eager float (same seeds, same mixup draws): the
losses track it, an overflow injected into one step is skipped by the scaler exactly as in
float, INT8 covers at least 95% of the GEMM FLOPs, and the state dicts stay clean.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

STEPS = 5
OVERFLOW_STEP = 3  # this step's loss is multiplied by 1e30: its float16 gradients overflow


def timm_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        img_size=32,
        patch_size=8,
        depth=2,
        drop_path_rate=0.0,
    )
    model.set_grad_checkpointing(True)
    return model


def train(model: torch.nn.Module, backend: str | None):
    """train.py's inner loop; returns (losses, scales after each step, ema, parameters after
    each step)."""
    random.seed(0)
    np.random.seed(0)  # mixup draws from numpy
    torch.manual_seed(0)
    run = model if backend is None else torch.compile(model, backend=backend)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    ema = ModelEmaV3(model, decay=0.9)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    loss_fn = SoftTargetCrossEntropy()
    scaler = torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (16,), generator=gen)
    losses, scales, params = [], [], []
    for step in range(STEPS):
        x, y = mixup(images.clone(), labels.clone())
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(run(x), y)
        scaled = scaler.scale(loss * 1e30 if step == OVERFLOW_STEP else loss)
        scaled.backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        ema.update(model)
        losses.append(loss.item())
        scales.append(scaler.get_scale())
        params.append([p.detach().clone() for p in model.parameters()])
    return losses, scales, ema, params


@pytest.mark.slow
def test_timm_training_loop_with_fp16_grad_scaler_tracks_float(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADQ_REPORT", str(tmp_path))
    float_model, gradq_model = timm_model(), timm_model()
    want_losses, want_scales, _, want_params = train(float_model, None)
    losses, scales, ema, params = train(gradq_model, "gradq")

    assert losses == pytest.approx(want_losses, rel=0.05)
    # The scaler skips the overflowing step, and lowers its scale, exactly as in float.
    assert scales == want_scales
    assert scales[OVERFLOW_STEP] == scales[OVERFLOW_STEP - 1] / 2
    before, after = params[OVERFLOW_STEP - 1], params[OVERFLOW_STEP]
    assert all(torch.equal(p, q) for p, q in zip(before, after, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(params[0], params[-1], strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(want_params[0], want_params[-1], strict=True))

    # INT8 covers >= 95% of the GEMM FLOPs of every compiled graph, checkpointing included.
    reports = [json.loads(p.read_text()) for p in tmp_path.glob("gradq-*.json")]
    assert reports and all(r["training"] for r in reports)
    int8 = sum(r["coverage"]["total"]["int8_flops"] for r in reports)
    assert int8 / sum(r["coverage"]["total"]["flops"] for r in reports) >= 0.95

    # Clean state dicts: the model's and its EMA's keys are a fresh model's, nothing added.
    keys = set(timm_model().state_dict())
    assert set(gradq_model.state_dict()) == keys
    assert set(ema.module.state_dict()) == keys
    ema.module.eval()
    with torch.no_grad():
        assert torch.isfinite(ema.module(torch.randn(2, 3, 32, 32))).all()
