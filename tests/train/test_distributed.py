"""DDP: `torchrun --nproc_per_node 2 -m gradq_fx train` on CPU (gloo); gradq still rewrites."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradq_fx.train.distributed import Distributed

REPO = Path(__file__).resolve().parents[2]


def test_single_process_collectives_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = Distributed.setup("cpu")
    assert (dist.rank, dist.world_size, dist.is_main, dist.device.type) == (0, 1, True, "cpu")
    assert dist.all_reduce_sum(torch.tensor([2.0])).item() == 2.0
    assert dist.all_gather_object("x") == ["x"]
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model) is model


def test_torchrun_two_cpu_processes_train_with_gradq(idx_dir, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", "-m", "gradq_fx", "train", "--precision", "gradq"]
    command += ["--data-dir", str(idx_dir), "--out", str(out), "--depth", "1"]
    command += ["--img-size", "16", "--batch-size", "16", "--epochs", "2"]
    command += ["--train-subset", "64", "--test-subset", "30", "--log-every", "1"]
    # A collective that waits 120 s fails in the waiting rank, which torchrun then reports
    # (and stops the other): a hang fails with that rank's error, well inside the timeout.
    command += ["--dist-timeout", "120"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        finished = subprocess.run(
            command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired as error:
        output = (error.stderr or b"")[-6000:]
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        pytest.fail(f"torchrun ran past {error.timeout} s; the ranks' last output:\n{output}")
    assert finished.returncode == 0, finished.stderr[-4000:]

    result = json.loads((out / "result.json").read_text())
    assert (result["world_size"], result["backend"]) == (2, "gradq_eager")
    assert result["replicas_in_sync"]  # DDP averaged the gradients, and the layer statistics
    # qkv, proj, fc1, fc2, head and the patch-embedding convolution: rewritten under DDP
    assert result["gradq_rewritten_ops"] == 6
    assert result["steps"] == 4  # 64 images / 2 processes / batch 16, two epochs
    assert result["test_images"] == 30  # the test set split between the ranks, each counted once
    with open(out / "log.csv", newline="") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["1", "2"]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    # Only rank 0 prints progress: one line per step, not two.
    assert finished.stderr.count("epoch 1/2 step 1/2:") == 1


def _skip_a_collective(rank: int, port: int) -> None:
    """Rank 1 waits in an all-reduce that rank 0 never joins."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    dist = Distributed.setup("cpu", timeout=3.0)
    try:
        if rank == 1:
            dist.all_reduce_sum(torch.ones(1))
        else:
            import time

            time.sleep(20)  # alive, but never reaching the collective
    finally:
        dist.close()


def test_a_collective_left_alone_fails_with_the_ranks_error_at_the_timeout():
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException, match="(?i)timed out|timeout"):
        mp.start_processes(_skip_a_collective, args=(port,), nprocs=2, start_method="spawn")
    assert time.perf_counter() - start < 18  # the waiting rank's error, not rank 0's sleep
