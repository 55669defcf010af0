"""examples/qat_ablation.py: a tiny sweep (teacher, then a distilled W2A2 LSQ run) and its table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.train.conftest import write_idx_dataset

SCRIPT = Path(__file__).parents[2] / "examples" / "qat_ablation.py"
spec = importlib.util.spec_from_file_location("qat_ablation", SCRIPT)
qat_ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qat_ablation)


@pytest.mark.slow
def test_tiny_sweep_trains_teacher_and_student_then_tables(tmp_path, capsys):
    data = write_idx_dataset(tmp_path / "data", train=32, test=16, size=16)
    root = tmp_path / "runs"
    argv = ["run", "--root", str(root), "--models", "test_vit", "--bits", "2", "--seeds", "0"]
    argv += ["--settings", "lsq+obr+kd", "--epochs", "1", "--train-subset", "32"]
    argv += ["--test-subset", "16", "--img-size", "16", "--batch-size", "16"]
    argv += ["--backend", "gradq_eager", "--", "--data-dir", str(data), "--depth", "1"]
    assert qat_ablation.main(argv) == 0

    teacher = json.loads((root / "test_vit" / "teacher" / "seed0" / "result.json").read_text())
    assert teacher["precision"] == "fp32" and teacher["lsq_bits"] == {}
    student_dir = root / "test_vit" / "lsq+obr+kd-w2a2" / "seed0"
    student = json.loads((student_dir / "result.json").read_text())
    config = student["config"]
    assert (config["weight_bits"], config["activation_bits"], config["lsq"]) == (2, 2, True)
    assert config["obr"] and config["precision"] == "gradq"
    assert config["teacher"] == str(root / "test_vit" / "teacher" / "seed0" / "checkpoint.pt")
    assert set(map(tuple, student["lsq_bits"].values())) == {(2, 2)}

    # Finished runs are skipped: a second call trains nothing.
    stamp = (student_dir / "result.json").stat().st_mtime_ns
    assert qat_ablation.main(argv) == 0
    assert (student_dir / "result.json").stat().st_mtime_ns == stamp

    # --teacher: every distilled run of another sweep learns from that checkpoint, and no
    # teacher of its own is trained.
    given = root / "test_vit" / "teacher" / "seed0" / "checkpoint.pt"
    other = tmp_path / "other"
    argv_other = [other if a == str(root) else a for a in argv]
    split = argv_other.index("--")
    argv_other[split:split] = ["--teacher", str(given)]
    assert qat_ablation.main([str(a) for a in argv_other]) == 0
    assert not (other / "test_vit" / "teacher").exists()
    distilled = json.loads((other / "test_vit" / "lsq+obr+kd-w2a2" / "seed0" / "result.json")
                           .read_text())  # fmt: skip
    assert distilled["config"]["teacher"] == str(given)

    capsys.readouterr()
    assert qat_ablation.main(["table", "--root", str(root)]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()]
    cells = {row[2].strip(): row[3:5] for row in rows if len(row) > 4 and "test_vit" in row[1]}
    assert set(cells) == {"teacher", "lsq+obr+kd-w2a2"}
    mean = float(cells["lsq+obr+kd-w2a2"][1])
    assert cells["lsq+obr+kd-w2a2"][0].strip() == "1" and mean == pytest.approx(student["top1"])


def test_run_rejects_unknown_settings_and_bits(capsys):
    with pytest.raises(SystemExit):
        qat_ablation.main(["run", "--settings", "lsq,lsq+magic"])
    assert "--settings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qat_ablation.main(["run", "--bits", "4,1"])
    assert "--bits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qat_ablation.main(["run", "--teacher", "no/such/checkpoint.pt"])
    assert "--teacher" in capsys.readouterr().err
