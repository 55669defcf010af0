"""Shared fixtures: tiny timm models (compiling on 2 CPU cores is slow) and a clean Dynamo."""

from __future__ import annotations

import pytest
import timm
import torch
from torch._dynamo.utils import counters


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no Dynamo cache or counters carried between tests."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# Small but structurally complete versions of the models the issue names.
TINY_MODELS = {
    "deit_tiny_patch16_224": (dict(img_size=32, depth=2), 32),
    "swin_tiny_patch4_window7_224": (
        dict(img_size=56, depths=(1, 1), num_heads=(1, 2), embed_dim=32, window_size=7),
        56,
    ),
    "mobilevit_xxs": ({}, 64),
}


def tiny_model(name: str, fused_attn: bool = True, **overrides) -> tuple[torch.nn.Module, int]:
    """A freshly initialised tiny model and its input size; fused_attn picks timm's SDPA path."""
    kwargs, size = TINY_MODELS[name]
    previous = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(fused_attn)
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, **{**kwargs, **overrides})
    finally:
        timm.layers.set_fused_attn(previous)
    return model, size
