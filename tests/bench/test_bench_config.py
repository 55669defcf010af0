"""`gradq_fx.bench.config`: the settings list, BenchConfig's validation (ValueError naming the
flag; a usage error on the command line) and the per-device defaults."""

from __future__ import annotations

import pytest
import torch

from gradq_fx.bench.candidates import KERNEL_CANDIDATES
from gradq_fx.bench.config import SETTINGS, BenchConfig, parse_settings, resolve_device
from gradq_fx.cli import main
from tests.bench.conftest import CPU


def test_settings_come_back_in_table_order():
    assert parse_settings(" gradq, fp32-eager ") == ("fp32-eager", "gradq")
    assert parse_settings(",".join(SETTINGS)) == tuple(SETTINGS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gradq,fp16-eager", r"--settings: unknown setting\(s\) \['fp16-eager'\]"),
        ("", "--settings: give at least one"),
        ("gradq,gradq", r"--settings: \['gradq'\] given more than once"),
    ],
)
def test_bad_settings_raise_naming_the_flag_and_the_valid_ones(text, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_settings(text)
    assert "fp32-eager, bf16-eager, bf16-compile, gradq" in str(error.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be an integer >= 1, got 0"),
        ({"iters": -1}, "--iters must be"),
        ({"warmup": 0}, "--warmup must be"),
        ({"img_size": True}, "--img-size must be"),
        ({"seed": -1}, "--seed must be an integer >= 0"),
        ({"device": "tpu"}, "--device must be one of"),
        ({"model": "no_such_model"}, "--model: unknown timm model 'no_such_model'"),
        ({"options": (("no_such_option", 1),)}, "--option: unknown gradq option"),
        ({"kernels": True, "settings": ("gradq",)}, "--settings applies to the step benchmark"),
        ({"max_tokens": 64}, "--max-tokens applies to --kernels only"),
        ({"kernels": True, "candidates": ("cutlass",)}, "--candidates: unknown"),
    ],
)
def test_bad_config_raises_naming_the_flag(fields, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**fields)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
        resolve_device("cuda")


def test_bad_flags_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cpu", "--settings", "gradq,nope"])
    assert exit_info.value.code == 2
    assert "--settings: unknown setting(s) ['nope']" in capsys.readouterr().err


def test_cpu_defaults_pick_the_tiny_model_and_keep_a_given_models_size():
    config = BenchConfig().resolved(CPU)
    assert (config.model, config.img_size, config.patch_size) == ("test_vit", 28, 4)
    assert (config.batch_size, config.num_classes) == (8, 10)
    assert config.settings == ("fp32-eager", "bf16-eager", "bf16-compile", "gradq", "gradq-fused")
    assert config.candidates is None and config.options == ()
    given = BenchConfig(model="deit_tiny_patch16_224", kernels=True).resolved(CPU)
    assert (given.img_size, given.patch_size, given.batch_size) == (None, None, 8)
    assert given.candidates == tuple(KERNEL_CANDIDATES) and given.max_tokens == 2048
