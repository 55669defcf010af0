"""Shared fixtures: tiny timm models (compiling on 2 CPU cores is slow) and a clean Dynamo;
and the `interpret` marker, which runs tests in Triton's CPU interpreter.

Tests marked `interpret` run gradq's Triton kernels in Triton's CPU interpreter. Triton reads
TRITON_INTERPRET when `triton` is imported (its library functions, tl.zeros and tl.rand among
them, are kernels too) and when each kernel is decorated. This process imported triton before
any test ran (torch._dynamo does), so setting the variable here would come too late, and it
would leak into every later Inductor compile. Instead the `interpret` tests of the session run
together in one child pytest process started with TRITON_INTERPRET=1, and each of them here
reports its child's outcome (passed, skipped, or failed with the child's report). The child
starts once the session's tests are collected and runs beside the parent's tests. With
TRITON_INTERPRET=1 already set (the child itself, or `TRITON_INTERPRET=1 pytest tests`), they
run in place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import timm
import torch
from torch._dynamo.utils import counters

from gradq_fx.kernels import triton_installed, triton_interpreting


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


# -- the `interpret` marker -------------------------------------------------------------

_REPORT_ENV = "GRADQ_INTERPRETER_REPORT"  # the child appends one JSON line per test phase here
_CHILD_TIMEOUT_S = 900


@dataclasses.dataclass
class _Child:
    """The TRITON_INTERPRET=1 pytest process, its files, and (once it ended) its outcomes."""

    process: subprocess.Popen
    folder: tempfile.TemporaryDirectory
    started: float
    outcomes: dict[str, dict] | None = None
    output: str = ""

    def path(self, name: str) -> Path:
        return Path(self.folder.name) / name

    def wait(self) -> None:
        """Wait for the child (up to _CHILD_TIMEOUT_S from its start) and read its outcomes."""
        if self.outcomes is not None:
            return
        try:
            self.process.wait(
                timeout=max(1.0, _CHILD_TIMEOUT_S - (time.monotonic() - self.started))
            )
            self.output = _tail(self.path("stdout"), 6000) + _tail(self.path("stderr"), 4000)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.output = f"the interpreter process ran past {_CHILD_TIMEOUT_S} s"
        rank = {"passed": 0, "skipped": 1, "failed": 2}
        self.outcomes = {}
        for line in self.path("report.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            previous = self.outcomes.get(record["nodeid"])
            if previous is None or rank[record["outcome"]] > rank[previous["outcome"]]:
                self.outcomes[record["nodeid"]] = record

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.folder.cleanup()


_child: _Child | None = None


def _tail(path: Path, chars: int) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "interpret: runs Triton kernels in Triton's CPU interpreter (a child process with "
        "TRITON_INTERPRET=1 unless this one has it)",
    )


def pytest_runtest_logreport(report):
    """In the child: record each phase's outcome for the parent."""
    path = os.environ.get(_REPORT_ENV)
    if path and "interpret" in report.keywords:
        text = report.longreprtext
        if report.skipped and isinstance(report.longrepr, tuple):
            text = report.longrepr[2]  # (path, line, reason)
        record = {"nodeid": report.nodeid, "outcome": report.outcome, "text": text}
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


def pytest_collection_finish(session):
    """In the parent: start the child as soon as the tests are known, so that it runs beside
    the parent's own tests (the interpreter is single-threaded Python, like most of a compile)."""
    global _child
    if session.config.option.collectonly or triton_interpreting() or not triton_installed():
        return
    nodeids = [item.nodeid for item in session.items if item.get_closest_marker("interpret")]
    if not nodeids:
        return
    root = Path(session.config.rootpath)
    folder = tempfile.TemporaryDirectory()
    report = Path(folder.name) / "report.jsonl"
    report.touch()
    env = {**os.environ, "TRITON_INTERPRET": "1", _REPORT_ENV: str(report)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["--rootdir", str(root), *nodeids]
    # Output goes to files, not pipes: nobody reads a pipe while the parent runs its tests.
    with (
        open(Path(folder.name) / "stdout", "w") as out,
        open(Path(folder.name) / "stderr", "w") as err,
    ):
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=err, text=True)
    _child = _Child(process, folder, time.monotonic())


def pytest_sessionfinish(session):
    if _child is not None:
        _child.close()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """In the parent: answer an `interpret` test with its outcome in the child."""
    if pyfuncitem.get_closest_marker("interpret") is None or triton_interpreting():
        return None
    if not triton_installed():
        pytest.skip("triton is not installed")
    if _child is None:
        pytest.fail("no TRITON_INTERPRET=1 process was started for this test", pytrace=False)
    _child.wait()
    record = _child.outcomes.get(pyfuncitem.nodeid)
    if record is None:
        pytest.fail(
            "no result from the TRITON_INTERPRET=1 process; its output:\n" + _child.output,
            pytrace=False,
        )
    if record["outcome"] == "skipped":
        pytest.skip(f"in the TRITON_INTERPRET=1 process: {record['text']}")
    if record["outcome"] == "failed":
        pytest.fail(f"in the TRITON_INTERPRET=1 process:\n{record['text']}", pytrace=False)
    return True
