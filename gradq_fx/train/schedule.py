"""The optimiser and its learning-rate schedule: linear warm-up, then cosine decay to zero.

Both move once per optimiser step. With W warm-up steps and T steps in all, step s (counted
from 0) trains at lr * lr_factor(s, W, T):

    (s + 1) / W                              for s < W   (reaches lr at the last warm-up step)
    (1 + cos(pi * (s - W) / (T - W))) / 2    for s >= W  (lr at s = W, towards 0 at s = T)
"""

from __future__ import annotations

import math

import torch

from gradq_fx.stats import LAYER_TYPES

OPTIMIZERS = ("adamw", "sgd")
SGD_MOMENTUM = 0.9


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The multiple of the base learning rate used at `step` (see the module docstring)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """`lr_factor` as a LambdaLR multiplier; a plain object, so LambdaLR's state_dict saves it."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps)


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, layer_groups: bool = False
) -> list[dict]:
    """Weights decay; biases, norms' scales, and what the model lists in `no_weight_decay()`
    (timm: position embeddings, class token) do not.

    With `layer_groups`, each nn.Linear and nn.Conv2d weight gets a group of its own (after the
    two shared ones), so gradq's AdaptiveLR can scale each quantized layer's learning rate.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    layer_weights = set()
    if layer_groups:
        layer_weights = {id(m.weight) for m in model.modules() if isinstance(m, LAYER_TYPES)}
    decay, no_decay, layers = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name in skip:
            no_decay.append(parameter)
        elif id(parameter) in layer_weights:
            layers.append({"params": [parameter], "weight_decay": weight_decay})
        else:
            decay.append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *layers,
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    model: torch.nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    layer_groups: bool = False,
) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum 0.9, over `parameter_groups(model, ...)`."""
    groups = parameter_groups(model, weight_decay, layer_groups)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM)
    raise ValueError(f"--optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + cosine schedule; call its `step()` after every optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps))
