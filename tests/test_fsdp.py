"""FSDP2 (`fully_shard` per block and on the root) on 2 CPU processes (gloo), compiled with gradq.

The references: the same steps run in one process in eager float (the losses), and gradq's
report of the unsharded model (the INT8 coverage). Each rank writes its compiled graphs'
reports (GRADQ_REPORT) and its losses; a rank that fails ends the test with its traceback at
once (torch.multiprocessing), it does not wait out a timeout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gradq_fx.report import report

WORLD = 2
STEPS = 3
BATCH = 8  # per rank


def deit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of every step (both ranks' halves), which the model learns by heart."""
    gen = torch.Generator().manual_seed(100)
    x = torch.randn(WORLD * BATCH, 3, 32, 32, generator=gen)
    return x, torch.randint(0, 10, (WORLD * BATCH,), generator=gen)


def train(model, run, steps, rank: int = 0, world: int = 1) -> list[float]:
    """SGD steps on this rank's share of each batch; the global batch's mean loss per step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        x, y = batch()
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss = F.cross_entropy(run(x[share]), y[share])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def _worker(rank: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = deit()
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        compiled = torch.compile(model, backend="gradq")
        losses = train(model, compiled, STEPS, rank, WORLD)
        Path(out, f"losses-{rank}.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def same_layer(path: str, graph_path: str) -> bool:
    """Whether a module path of the unsharded model is the one a graph names `graph_path` (a
    block's graph names its modules from the block)."""
    return path == graph_path or path.endswith("." + graph_path)


def rank_reports(folder: Path, rank: int) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"gradq-*-rank-{rank}.json"))]


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_tracks_eager_float(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    reports = tmp_path / "reports"
    monkeypatch.setenv("GRADQ_REPORT", str(reports))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        start_method="spawn",
    )  # raises, with the failing rank's traceback, as soon as one rank fails

    model = deit()
    expected = train(model, model, STEPS)
    for rank in range(WORLD):
        losses = json.loads((tmp_path / f"losses-{rank}.json").read_text())
        assert losses == pytest.approx(expected, rel=0.02)  # INT8 tracks float
        assert losses[-1] < losses[0]
    # The INT8 coverage is what it is without FSDP2. FSDP2's hooks end a Dynamo graph at each
    # block, and Dynamo compiles the block's code once for both blocks (its modules are named
    # from the block: "attn.qkv"): every GEMM the unsharded model runs in INT8 runs in INT8,
    # and nothing but attention (attention='float') stays float.
    plain = report(deit(), batch()[0][:BATCH])
    assert plain.coverage()["total"]["ratio"] > 0.95
    for rank in range(WORLD):
        found = rank_reports(reports, rank)
        int8 = {(row["module"], row["role"]) for r in found for row in r["gemms"]}
        assert all(row["lowering"] == "reference" for r in found for row in r["gemms"])
        unsharded = {(row.module, row.role) for row in plain.int8_gemms}
        for module, role in unsharded:
            assert any(r == role and same_layer(module, m) for m, r in int8), (module, role)
        for module, role in int8:
            assert any(r == role and same_layer(m, module) for m, r in unsharded), (module, role)
        floats = [op for r in found for op in r["float_ops"]]
        assert floats and all("attention kept float" in op["reason"] for op in floats)
