"""gradq_fx/regions.py: repeated blocks compiled once compute what the whole graph computes,
and the report, the globs and the statistics stay per instance."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from torch._dynamo.utils import counters

import gradq_fx
from gradq_fx import regions
from gradq_fx import stats as layer_stats
from gradq_fx.config import GradQConfig
from gradq_fx.passes import prepare
from gradq_fx.report import report as trace_report
from tests.conftest import tiny_model


def _step(name: str, backend: str, options: dict, depth: int | None = 3, batch: int = 3):
    """One forward and backward of a fresh tiny model: (loss, {parameter: grad}, model)."""
    overrides = {"depth": depth} if depth is not None else {}
    model, size = tiny_model(name, **overrides)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    compiled = torch.compile(model, backend=backend, options=options)
    loss = torch.nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    torch._dynamo.reset()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, model


def _split_line(caplog) -> tuple[int, int]:
    """(pieces, compiled) from the backend's INFO line about the split."""
    (line,) = [r.getMessage() for r in caplog.records if "repeated blocks" in r.getMessage()]
    pieces, compiled = re.search(r"split into (\d+) pieces .*, (\d+) compiled", line).groups()
    return int(pieces), int(compiled)


def _instances_of(model: torch.nn.Module, size: int) -> set[str]:
    found: set[str] = set()

    def backend(gm, inputs):
        prepare(gm, GradQConfig())
        found.update(regions.instances(gm).values())
        return gm.forward

    torch.compile(model, backend=backend)(torch.randn(2, 3, size, size))
    return found


def test_blocks_are_found_where_siblings_repeat():
    model, size = tiny_model("deit_tiny_patch16_224", depth=3)
    assert _instances_of(model, size) == {"blocks.0", "blocks.1", "blocks.2"}
    # Swin's two stages differ in width and hold one block each: nothing repeats.
    model, size = tiny_model("swin_tiny_patch4_window7_224")
    assert _instances_of(model, size) == set()


def test_blocks_compiled_once_compute_what_the_whole_graph_computes(caplog):
    with caplog.at_level(logging.INFO, logger="gradq_fx"):
        loss, grads, _ = _step("deit_tiny_patch16_224", "gradq_eager", {})
    # patch embedding, 3 blocks, head: 5 pieces, the three blocks one compile.
    assert _split_line(caplog) == (5, 3)
    whole_loss, whole_grads, _ = _step(
        "deit_tiny_patch16_224", "gradq_eager", {"compile_once": False}
    )
    assert torch.equal(loss, whole_loss)
    assert grads.keys() == whole_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, whole_grads[name]), name


def test_the_report_names_every_instance(monkeypatch, tmp_path):
    reports = {}
    for once in (True, False):
        folder = tmp_path / str(once)
        monkeypatch.setenv("GRADQ_REPORT", str(folder))
        _step("deit_tiny_patch16_224", "gradq_eager", {"compile_once": once})
        (path,) = folder.glob("*.json")
        reports[once] = json.loads(path.read_text())

    # The same rows in the same order: the pieces' backward rows run last block first, as
    # the whole graph's backward does.
    for key in ("gemms", "float_ops", "coverage"):
        assert reports[True][key] == reports[False][key], key
    assert [row["graph"] for row in reports[True]["gemms"]][-1] == "bwd"
    modules = {row["module"] for row in reports[True]["gemms"]}
    assert {f"blocks.{i}.mlp.fc2" for i in range(3)} <= modules


def test_a_block_excluded_by_a_glob_compiles_on_its_own(caplog):
    options = {"exclude": ["blocks.1.*"]}
    with caplog.at_level(logging.INFO, logger="gradq_fx"):
        loss, grads, _ = _step("deit_tiny_patch16_224", "gradq_eager", options)
    # blocks.0 and blocks.2 share a compile; blocks.1 (all float) has its own.
    assert _split_line(caplog) == (5, 4)
    whole_loss, whole_grads, _ = _step(
        "deit_tiny_patch16_224", "gradq_eager", {**options, "compile_once": False}
    )
    assert torch.equal(loss, whole_loss)
    for name, grad in grads.items():
        assert torch.equal(grad, whole_grads[name]), name


def test_statistics_probes_stay_per_layer(caplog):
    with caplog.at_level(logging.INFO, logger="gradq_fx"):
        _, _, model = _step("deit_tiny_patch16_224", "gradq_eager", {"stats": True})
    assert _split_line(caplog) == (5, 3)  # the probes are inputs: the blocks share a compile
    _, _, whole = _step(
        "deit_tiny_patch16_224", "gradq_eager", {"stats": True, "compile_once": False}
    )
    found, expected = layer_stats.stats(model), layer_stats.stats(whole)
    assert found.keys() == expected.keys()
    assert {f"blocks.{i}.attn.qkv" for i in range(3)} <= found.keys()
    for name, value in found.items():
        assert torch.equal(value.cosine, expected[name].cosine), name
        assert torch.equal(value.relative_error, expected[name].relative_error), name


@pytest.mark.slow
def test_inductor_blocks_compiled_once_match_the_whole_graph_bit_for_bit(caplog):
    with caplog.at_level(logging.INFO, logger="gradq_fx"):
        loss, grads, _ = _step("deit_tiny_patch16_224", "gradq", {}, depth=2, batch=2)
    assert _split_line(caplog) == (4, 3)
    whole_loss, whole_grads, _ = _step(
        "deit_tiny_patch16_224", "gradq", {"compile_once": False}, depth=2, batch=2
    )
    assert torch.equal(loss, whole_loss)
    for name, grad in grads.items():
        assert torch.equal(grad, whole_grads[name]), name


class _Residual(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + torch.nn.functional.gelu(self.fc(x))


class _TwoStages(torch.nn.Module):
    """Two runs of repeated blocks with a transpose between them (a piece whose output only
    aliases its input, as EfficientFormer's flatten between its stages), then a head."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(_Residual(16), _Residual(16))
        self.later = torch.nn.Sequential(_Residual(11), _Residual(11))
        self.head = torch.nn.Linear(11, 10)

    def forward(self, x):  # x: [batch, 11 tokens, 16]
        x = self.later(self.blocks(x).transpose(1, 2))
        return self.head(x.mean(1))


def _compiled_report(model, x, backend: str, options: dict):
    before = len(gradq_fx.compiled_reports())
    torch._dynamo.reset()
    torch.compile(model, backend=backend, options=options)(x).sum().backward()
    found = gradq_fx.compiled_reports()[before:]
    assert len(found) == 1
    return found[0]


def test_a_piece_without_a_joint_graph_is_still_reported(caplog):
    torch.manual_seed(0)
    model, x = _TwoStages(), torch.randn(3, 11, 16)
    options = {"exclude": ["head"]}
    with caplog.at_level(logging.INFO, logger="gradq_fx"):
        found = _compiled_report(model, x, "gradq_eager", options)
    # 2 + 2 blocks, the transpose, the head; blocks.0 compiles on its own (its input needs no
    # gradient, its sibling's does).
    assert _split_line(caplog) == (6, 5)
    assert found.to_dict() == trace_report(model, x, options, training=True).to_dict()
    assert {row.module for row in found.gemms} == {
        f"{stage}.{i}.fc" for stage in ("blocks", "later") for i in range(2)
    }
    assert {op.module for op in found.float_ops} == {"head"}


@pytest.mark.slow
def test_a_piece_from_aotautograds_cache_is_still_reported(tmp_path, monkeypatch):
    # The head piece has no gradq op (excluded), so AOTAutograd caches it; a compile that
    # hits that cache must still report the head's GEMMs as kept float.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model, x = _TwoStages(), torch.randn(3, 11, 16)
    options = {"exclude": ["head"]}
    with (
        torch._inductor.config.patch(fx_graph_cache=True),
        torch._functorch.config.patch(enable_autograd_cache=True),
    ):
        first = _compiled_report(model, x, "gradq", options)
        counters.clear()
        again = _compiled_report(model, x, "gradq", options)
    assert counters["aot_autograd"]["autograd_cache_hit"] >= 1
    assert again.to_dict() == first.to_dict()
    assert first.to_dict() == trace_report(model, x, options, training=True).to_dict()
    assert {op.module for op in again.float_ops} == {"head"}
