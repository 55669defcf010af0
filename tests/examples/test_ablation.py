"""examples/ablation.py: the results table from finished runs, and its input checks."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "examples" / "ablation.py"
spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)

PROTOCOL = {key: 1 for key in ablation.PROTOCOL}


def write_run(root: Path, model: str, setting: str, seed: int, top1: float, **protocol):
    out = ablation.run_dir(root, model, setting, seed)
    out.mkdir(parents=True)
    config = {**PROTOCOL, **protocol}
    (out / "result.json").write_text(json.dumps({"top1": top1, "config": config}))


def test_table_gives_mean_and_sample_std_per_setting(tmp_path, capsys):
    for seed, top1 in enumerate([80.0, 82.0, 84.5]):
        write_run(tmp_path, "test_vit", "gradq -iqr", seed, top1)
    write_run(tmp_path, "test_vit", "fp32", 0, 85.25)
    assert ablation.main(["table", "--root", str(tmp_path)]) == 0
    rows = {line.split("|")[2].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| test_vit")}  # fmt: skip
    mean = (80.0 + 82.0 + 84.5) / 3
    std = math.sqrt(sum((t - mean) ** 2 for t in (80.0, 82.0, 84.5)) / 2)
    cells = [c.strip() for c in rows["gradq -iqr"].split("|")]
    assert cells[3:6] == ["3", f"{mean:.2f}", f"{std:.2f}"]
    assert [c.strip() for c in rows["fp32"].split("|")][3:6] == ["1", "85.25", "nan"]
    assert list(rows) == ["fp32", "gradq -iqr"]  # settings in the script's order


def test_table_refuses_mixed_protocols_and_empty_roots(tmp_path):
    write_run(tmp_path, "test_vit", "gradq", 0, 80.0)
    write_run(tmp_path, "test_vit", "gradq", 1, 81.0, epochs=2)
    with pytest.raises(SystemExit):
        ablation.main(["table", "--root", str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="different protocols"):
        ablation.table(ablation.argparse.Namespace(root=tmp_path))


def test_run_rejects_unknown_settings(capsys):
    with pytest.raises(SystemExit):
        ablation.main(["run", "--settings", "gradq,fp64"])
    assert "--settings" in capsys.readouterr().err


def test_table_tells_runs_apart_by_their_gradq_options(tmp_path, capsys):
    write_run(tmp_path, "test_vit", "gradq", 0, 80.0, options={"gradient_bits": 4})
    write_run(tmp_path, "test_vit", "gradq", 1, 81.0, options={"gradient_bits": 4})
    assert ablation.table(ablation.argparse.Namespace(root=tmp_path)) == 0
    assert "('gradient_bits', 4)" in capsys.readouterr().out  # the protocol line names it
    write_run(tmp_path, "test_vit", "gradq", 2, 82.0, options={})
    with pytest.raises(ValueError, match="different protocols"):
        ablation.table(ablation.argparse.Namespace(root=tmp_path))
