"""The learning-rate schedule against its formula, and the optimiser's parameter groups."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from gradq_fx.train.schedule import build_optimizer, build_scheduler, lr_factor


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1 / 4),  # warm-up: (s + 1) / W with W = 4
        (1, 2 / 4),
        (3, 1.0),  # the last warm-up step reaches the peak
        (4, 1.0),  # cosine starts at the peak: (1 + cos(0)) / 2
        (9, (1 + math.cos(math.pi * 5 / 16)) / 2),
        (12, 0.5),  # half way through the decay
        (19, (1 + math.cos(math.pi * 15 / 16)) / 2),
        (20, 0.0),
    ],
)
def test_lr_factor_at_given_steps(step, expected):
    assert lr_factor(step, warmup_steps=4, total_steps=20) == pytest.approx(expected, abs=1e-12)


def test_lr_factor_without_warmup_is_cosine_from_the_first_step():
    assert lr_factor(0, 0, 10) == 1.0
    assert lr_factor(5, 0, 10) == pytest.approx(0.5)


def test_scheduler_applies_the_factor_per_optimizer_step():
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, "sgd", lr=0.2, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=6)
    used = []
    for _ in range(6):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.2 * lr_factor(s, 2, 6) for s in range(6)]
    assert used == pytest.approx(expected)
    assert used[0] == pytest.approx(0.1) and used[1] == pytest.approx(0.2)


def test_scheduler_state_restores_the_step():
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, "adamw", lr=1.0, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    # Build both, then load: building a scheduler sets the optimizer's lr to step 0's.
    fresh_optimizer = build_optimizer(model, "adamw", lr=1.0, weight_decay=0.0)
    fresh = build_scheduler(fresh_optimizer, warmup_steps=1, total_steps=10)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 4
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(lr_factor(4, 1, 10))


def test_weight_decay_skips_biases_norms_and_position_embeddings():
    model = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, depth=1)
    optimizer = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "head.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"} <= decay
    assert decay | no_decay == set(names.values())


def test_layer_groups_give_each_linear_and_conv_weight_its_own_group():
    # gradq quantizes Linears and GEMM-shaped convolutions (the patch embedding): each such
    # weight may carry a statistics probe, and AdaptiveLR needs it alone in its group.
    model = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, depth=1)
    optimizer = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, layer_groups=True)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    layers = [
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    assert "patch_embed.proj.weight" in layers
    # Every weight of this model is a layer's or skips decay: the shared decay group is empty
    # and left out, so the no-decay group comes first.
    shared, own = groups[: -len(layers)], groups[-len(layers) :]
    assert sorted(g[0] for g in own) == sorted(layers)
    assert all(len(g) == 1 for g in own)
    assert len(shared) == 1 and "head.bias" in shared[0]
    assert [g["weight_decay"] for g in optimizer.param_groups[1:]] == [0.05] * len(layers)


def test_unknown_optimizer_is_a_value_error():
    with pytest.raises(ValueError, match="--optimizer"):
        build_optimizer(torch.nn.Linear(2, 2), "lion", lr=1.0, weight_decay=0.0)
