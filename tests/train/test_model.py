"""Models: timm arguments where a model takes them, and how each precision compiles."""

from __future__ import annotations

import pytest
import torch

from gradq_fx.train.model import GradQBackend, compile_for, create_model, default_backend


def test_create_model_passes_size_patch_and_depth_to_a_vit():
    model = create_model("deit_tiny_patch16_224", 7, img_size=16, patch_size=4, depth=1)
    assert len(model.blocks) == 1 and model.head.out_features == 7
    assert model.patch_embed.patch_size == (4, 4) and model.patch_embed.img_size == (16, 16)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_create_model_leaves_out_what_a_model_does_not_take():
    model = create_model("mobilevit_xxs", 3, img_size=32, patch_size=4)  # no patch_size
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    cnn = create_model("resnet18", 3, img_size=32, patch_size=4)  # neither
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_create_model_errors_name_the_flag():
    with pytest.raises(ValueError, match="--depth: timm's mobilevit_xxs takes no depth"):
        create_model("mobilevit_xxs", 3, img_size=32, depth=2)
    with pytest.raises(ValueError, match="--model: unknown timm model 'vit_nonsense'"):
        create_model("vit_nonsense", 3, img_size=32)


def test_default_backend_is_eager_on_cpu():
    assert default_backend(torch.device("cpu")) == "gradq_eager"
    assert default_backend(torch.device("cuda", 0)) == "gradq"


def test_gradq_backend_counts_the_rewritten_linears():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    compiled, gradq = compile_for(model, {"exclude": ["2"]}, "gradq_eager", inductor=False)
    assert isinstance(gradq, GradQBackend) and gradq.rewritten == 0
    x = torch.randn(5, 8)
    out = compiled(x)
    out.sum().backward()
    assert (gradq.graphs, gradq.rewritten) == (1, 1)  # layer "2" is excluded
    assert torch.allclose(out, model(x), atol=0.05)  # INT8, close to float


def test_float_precisions_compile_only_on_request():
    model = torch.nn.Linear(2, 2)
    assert compile_for(model, None, None, inductor=False) == (model, None)
    compiled, gradq = compile_for(model, None, None, inductor=True)
    assert gradq is None and compiled is not model
