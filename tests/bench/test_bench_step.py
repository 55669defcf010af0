"""`gradq_fx.bench.step`: the speed-ups, bench.json, and a CPU smoke run of the step benchmark.

Timings are never asserted on: only that they exist, are positive and finite.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from gradq_fx.bench.chart import chart_size
from gradq_fx.bench.config import SETTINGS
from gradq_fx.bench.results import SCHEMA, environment, write_json
from gradq_fx.bench.step import (
    BASELINES,
    Running,
    SettingResult,
    StepReport,
    saved_bytes,
    speedups,
    step_table,
    time_in_rounds,
)
from gradq_fx.bench.timing import Clock
from gradq_fx.cli import main
from tests.bench.conftest import CPU, TINY_MODEL, summary


def test_speedups_are_baseline_median_over_setting_median():
    medians = {"fp32-eager": 120.0, "bf16-eager": 60.0, "bf16-compile": 40.0, "gradq": 32.0}
    ratios = speedups(medians)
    for setting, ms in medians.items():
        expected = {base: medians[base] / ms for base in BASELINES}
        assert ratios[setting] == pytest.approx(expected)
    assert ratios["gradq"]["bf16-compile"] == pytest.approx(1.25)
    assert ratios["bf16-compile"]["bf16-compile"] == 1.0


def test_speedups_leave_out_baselines_that_did_not_run():
    ratios = speedups({"bf16-eager": 50.0, "gradq": 25.0})
    assert ratios == {"bf16-eager": {"bf16-eager": 1.0}, "gradq": {"bf16-eager": 2.0}}


def test_step_report_round_trips_through_json(tmp_path):
    report = StepReport(
        environment=environment(CPU, "python -m gradq_fx bench --device cpu"),
        model={"name": "test_vit", "img_size": 16, "batch_size": 4},
        timing={"warmup": 1, "iters": 3, "clock": "time.perf_counter"},
        gradq_options={"exclude": ["head"], "gradient_bits": 6},
        results={
            "fp32-eager": SettingResult(
                "fp32-eager",
                samples_ms=(9.0, 10.0, 13.0),
                ms=summary(10.0),
                images_per_s=400.0,
                speedup={"fp32-eager": 1.0},
                first_step_ms=12.0,
                final_loss=2.3,
            ),
            "gradq": SettingResult("gradq", error="RuntimeError: boom"),
            "gradq-fused": SettingResult(
                "gradq-fused",
                samples_ms=(5.0,),
                ms=summary(5.0),
                gemm_speedups=(
                    {"op": "gradq.mm", "a_shape": "197x64", "speedup": 0.5},
                    {"op": "gradq.conv2d", "a_shape": "2x3x9x9", "speedup": 1.5},
                ),
            ),
        },
        notes={"peak_memory": "not measured on the CPU"},
    )
    path = tmp_path / "bench.json"
    write_json(path, report.to_dict())
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA and data["mode"] == "step"
    assert set(data["results"]["gradq"]) == set(data["results"]["fp32-eager"])
    assert StepReport.from_dict(data) == report
    assert report.results["gradq-fused"].fallbacks == "1/2"  # one of two GEMMs runs in float
    assert report.results["fp32-eager"].fallbacks is None
    assert "1/2" in step_table(report)
    assert report.failed
    with pytest.raises(ValueError, match="not a gradq-bench/1 step report"):
        StepReport.from_dict({**data, "mode": "kernels"})


def _running(name: str, step) -> Running:
    return Running(SETTINGS[name], torch.nn.Linear(2, 2), step, 1.0, {}, None, None, ())


def test_time_in_rounds_alternates_the_settings_and_drops_one_that_fails():
    calls = []

    def stepper(name, fail_at=None):
        def step():
            calls.append(name)
            if calls.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")

        return step

    names = ["fp32-eager", "bf16-eager", "gradq"]
    running = {name: _running(name, stepper(name)) for name in names}
    samples, errors = time_in_rounds(running, 4, Clock(CPU))
    assert errors == {}
    assert {name: len(s) for name, s in samples.items()} == dict.fromkeys(names, 4)
    assert all(ms >= 0 for s in samples.values() for ms in s)
    # One untimed round, then 4 timed ones; each round one step of every setting, each
    # round in the order of the one before reversed.
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 5 and all(sorted(r) == sorted(names) for r in rounds)
    pairs = zip(rounds[:-1], rounds[1:], strict=True)
    assert all(later == earlier[::-1] for earlier, later in pairs)

    calls.clear()
    running["bf16-eager"] = _running("bf16-eager", stepper("bf16-eager", fail_at=3))
    samples, errors = time_in_rounds(running, 4, Clock(CPU))
    assert list(errors) == ["bf16-eager"] and "bf16-eager broke" in errors["bf16-eager"]
    assert len(samples["bf16-eager"]) == 1  # the untimed step, one timed, then the failure
    assert calls.count("bf16-eager") == 3
    assert len(samples["fp32-eager"]) == len(samples["gradq"]) == 4


def test_saved_bytes_counts_what_backward_keeps_once_and_without_parameters():
    torch.manual_seed(0)
    layer = torch.nn.Linear(13, 17)
    x = torch.randn(7, 13, requires_grad=True)

    def step():
        layer(x).sum().backward()  # F.linear saves x and the weight; sum saves nothing

    assert saved_bytes(step) == x.nbytes + layer.weight.nbytes
    assert saved_bytes(step, exclude=layer.parameters()) == x.nbytes

    def autocast_step():  # the bf16 copies of x and the weight are saved, not the fp32 ones
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()

    expected = (x.numel() + layer.weight.numel()) * 2
    assert saved_bytes(autocast_step, exclude=layer.parameters()) == expected

    def shared_step():  # x saved by two ops, one of them through a view: counted once
        (layer(x).sum() + layer(x[1:]).sum()).backward()

    assert saved_bytes(shared_step, exclude=layer.parameters()) == x.nbytes


def test_no_compiler_start_up_without_a_compiled_setting(tmp_path, capsys):
    argv = ["bench", *TINY_MODEL, "--batch-size", "2", "--iters", "1", "--warmup", "1"]
    assert main([*argv, "--settings", "fp32-eager", "--out", str(tmp_path)]) == 0
    report = StepReport.from_dict(json.loads((tmp_path / "bench.json").read_text()))
    assert report.timing["compiler_start_up_s"] is None
    assert "start-up" not in capsys.readouterr().err


@pytest.mark.slow
def test_step_smoke_on_cpu(tmp_path, capsys):
    """An eager, a compiled and a gradq setting of a one-block test_vit (two Inductor compiles;
    the default settings are test_bench_config's)."""
    settings = ("fp32-eager", "bf16-compile", "gradq")
    argv = ["bench", *TINY_MODEL, "--batch-size", "4", "--settings", ",".join(settings)]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "bench: gradq: first step (compiling)..." in captured.err
    assert "vs bf16-compile" in captured.out
    report = StepReport.from_dict(json.loads((tmp_path / "bench.json").read_text()))
    assert list(report.results) == list(settings)
    for name, result in report.results.items():
        assert result.error is None
        assert len(result.samples_ms) == 2
        assert result.ms.median > 0 and math.isfinite(result.ms.median)
        assert math.isfinite(result.final_loss)
        assert set(result.speedup) == set(BASELINES) & set(settings)
        assert result.peak_memory_bytes is None
        assert result.saved_bytes > 0
        assert (result.compile_s is not None) == (SETTINGS[name].compiler is not None)
    assert report.results["gradq"].rewritten_ops >= 5  # qkv, proj, fc1, fc2, head at least
    # Where the first step went: gradq's stages among torch's compile metrics, within the
    # first step's wall time; only compiled settings have phases.
    assert "Where the first step went" in captured.out
    for name, result in report.results.items():
        phases = result.compile_phases
        if SETTINGS[name].compiler is None:
            assert phases == {}
            continue
        first_s = result.first_step_ms / 1e3
        assert 0 < phases["compile_fx_inner"] <= first_s
        gradq_stages = {"gradq.prepare", "gradq.lower"}
        if SETTINGS[name].compiler == "gradq":
            assert all(0 < phases[stage] < first_s for stage in gradq_stages)
        else:
            assert not gradq_stages & set(phases)
    assert "peak_memory" in report.notes
    assert report.model["parameters"] > 0 and report.timing["iters"] == 2
    # The compiler's one-off start-up in the process came before every setting's first step.
    assert report.timing["compiler_start_up_s"] > 0
    start_up = captured.err.index("bench: compiler start-up ")
    assert start_up < captured.err.index("bench: fp32-eager: first step")
    assert "the compiler's start-up" in captured.out
    with Image.open(tmp_path / "bench.png") as image:
        assert image.size == chart_size(len(settings))
        image.verify()
