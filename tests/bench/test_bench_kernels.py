"""`gradq_fx.bench.kernels`: kernels.json, and a CPU smoke run of the kernel benchmark.

Timings are never asserted on: only that they exist, are positive and finite.
"""

from __future__ import annotations

import collections
import json
import math

import pytest
from PIL import Image

from gradq_fx.bench.candidates import CLIP_CANDIDATES, KERNEL_CANDIDATES
from gradq_fx.bench.chart import chart_size
from gradq_fx.bench.kernels import KernelReport, Timed
from gradq_fx.bench.results import environment, write_json
from gradq_fx.cli import main
from tests.bench.conftest import CPU, TINY_MODEL, summary


def test_kernel_report_round_trips_through_json(tmp_path):
    peak = Timed("int8", "peak", "torch", 64, 64, 64, "ok", ms=summary(1.0), tops=0.5)
    gemm = Timed("blocks.*.mlp.fc1", "wgrad", "int_mm", 40, 8, 24, "ok", ms=summary(2.0))
    skipped = Timed("blocks.*.mlp.fc1", "wgrad", "gradq", 40, 8, 24, "skipped", "not available")
    report = KernelReport(
        environment=environment(CPU, "python -m gradq_fx bench --kernels"),
        model={"name": "test_vit", "linear_shapes": []},
        timing={"iters": 3},
        peaks=(peak,),
        quantize=(),
        gemms=(gemm, skipped),
        notes={},
    )
    path = tmp_path / "kernels.json"
    write_json(path, report.to_dict())
    assert KernelReport.from_dict(json.loads(path.read_text())) == report
    assert not report.failed


@pytest.mark.slow
def test_kernels_smoke_on_cpu(tmp_path, capsys):
    """Every candidate is checked, then timed, on the tiny model's shapes; JSON and PNG."""
    args = ["bench", "--kernels", *TINY_MODEL, "--batch-size", "2", "--peak-size", "64"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernels.json").read_text())
    report = KernelReport.from_dict(data)
    assert data["environment"]["command"].startswith("python -m gradq_fx bench --kernels")
    assert {p.name for p in report.peaks} == {"bf16", "int8"}
    assert len(report.gemms) == 4 * 3 * len(KERNEL_CANDIDATES)  # shapes x roles x candidates
    by_candidate = {
        name: [t for t in report.gemms if t.candidate == name] for name in ("bf16", "int_mm")
    }
    for rows in by_candidate.values():
        for t in rows:
            assert t.status == "ok", t.error
            assert t.tops > 0 and math.isfinite(t.tops) and t.gbps > 0 and t.percent_of_peak > 0
    assert all(t.status in ("ok", "skipped") for t in report.gemms + report.quantize)
    # The gradient's IQR clip, of dY's rows (dgrad) and dY^T's (wgrad), by every candidate.
    clips = collections.Counter(
        (t.role, t.candidate) for t in report.quantize if t.role.startswith("iqr clip")
    )
    roles = ("iqr clip dgrad", "iqr clip wgrad")
    assert clips == {(role, name): 4 for role in roles for name in CLIP_CANDIDATES}
    assert "iqr clip wgrad" in capsys.readouterr().out
    assert all(t.vs_bf16 is not None for t in report.gemms if t.status == "ok")
    with Image.open(tmp_path / "kernels.png") as image:
        ok = sum(t.status == "ok" for t in report.gemms)
        assert image.size == chart_size(ok)
