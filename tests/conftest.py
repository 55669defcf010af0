"""Shared fixtures (tiny timm models, a clean Dynamo), and the child processes that run the
`interpret` and `slow` tests beside the others.

Tests marked `interpret` run gradq's Triton kernels in Triton's CPU interpreter. Triton reads
TRITON_INTERPRET when `triton` is imported (its library functions, tl.zeros and tl.rand among
them, are kernels too) and when each kernel is decorated. This process imported triton before
any test ran (torch._dynamo does), so setting the variable here would come too late, and it
would leak into every later Inductor compile. Instead the `interpret` tests of the session run
together in one child pytest process started with TRITON_INTERPRET=1. With TRITON_INTERPRET=1
already set (that child, or `TRITON_INTERPRET=1 pytest tests`), they run in place.
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


# -- tests that run in a child process ----------------------------------------------------
#
# Once the session's tests are collected, two kinds of them start in child pytest processes
# that run beside the parent's own tests; the parent answers each of them with its child's
# outcome (passed, skipped, or failed with the child's report):
# - `interpret` tests, in a child with TRITON_INTERPRET=1 (the module docstring says why);
# - `slow` tests, where the session also holds others. One pytest process kept 1.2 of our 2
#   cores busy (compiling is mostly single-threaded Python), so the slow ones run beside the
#   rest rather than after it.

_REPORT_ENV = "GRADQ_CHILD_REPORT"  # a child appends one JSON line per test phase here
_CHILD_TIMEOUT_S = 3600  # the slow tests ended within the suite's 18 min here; CI allows 90


@dataclasses.dataclass(eq=False)  # one child, one identity: a key of a set
class _Child:
    """A child pytest process, its files, and (once it ended) its outcomes."""

    name: str
    process: subprocess.Popen
    folder: tempfile.TemporaryDirectory
    started: float
    outcomes: dict[str, dict] | None = None
    output: str = ""

    @classmethod
    def start(cls, name: str, nodeids: list[str], root: Path, env: dict[str, str]) -> _Child:
        folder = tempfile.TemporaryDirectory()
        report = Path(folder.name) / "report.jsonl"
        report.touch()
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["--rootdir", str(root), *nodeids]
        env = {**os.environ, **env, _REPORT_ENV: str(report)}
        # Output goes to files, not pipes: nobody reads a pipe while the parent runs its tests.
        with (
            open(Path(folder.name) / "stdout", "w") as out,
            open(Path(folder.name) / "stderr", "w") as err,
        ):
            process = subprocess.Popen(
                command, cwd=root, env=env, stdout=out, stderr=err, text=True
            )
        return cls(name, process, folder, time.monotonic())

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
            self.output = f"the {self.name} ran past {_CHILD_TIMEOUT_S} s"
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


_child_of: dict[str, _Child] = {}  # nodeid -> the child that runs it


def _tail(path: Path, chars: int) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "interpret: runs Triton kernels in Triton's CPU interpreter (a child process with "
        "TRITON_INTERPRET=1 unless this one has it)",
    )


def pytest_runtest_logreport(report):
    """In a child: record each phase's outcome for the parent."""
    path = os.environ.get(_REPORT_ENV)
    if not path:
        return
    text = report.longreprtext
    if report.skipped and isinstance(report.longrepr, tuple):
        text = report.longrepr[2]  # (path, line, reason)
    elif report.failed:
        text += "".join(f"\n--- {name}\n{content}" for name, content in report.sections)
    record = {"nodeid": report.nodeid, "outcome": report.outcome, "text": text}
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(session, config, items):
    """In the parent: start the children on their tests, and run those tests last here, where
    the parent waits for their outcomes (the first of each child's tests waits for all)."""
    if config.option.collectonly or os.environ.get(_REPORT_ENV):
        return
    interpret, slow, rest = [], [], []
    for item in items:
        if item.get_closest_marker("interpret"):
            interpret.append(item)
        elif item.get_closest_marker("slow"):
            slow.append(item)
        else:
            rest.append(item)
    groups = [("slow tests' process", slow if rest or interpret else [], {})]
    if triton_installed() and not triton_interpreting():
        groups.append(("TRITON_INTERPRET=1 process", interpret, {"TRITON_INTERPRET": "1"}))
    for name, group, env in groups:
        if group:
            nodeids = [item.nodeid for item in group]
            child = _Child.start(name, nodeids, Path(config.rootpath), env)
            _child_of.update(dict.fromkeys(nodeids, child))
    items[:] = rest + interpret + slow


def pytest_sessionfinish(session):
    for child in set(_child_of.values()):
        child.close()
    _child_of.clear()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """In the parent: answer a test a child ran with its outcome there."""
    child = _child_of.get(pyfuncitem.nodeid)
    if child is None:
        if pyfuncitem.get_closest_marker("interpret") and not triton_interpreting():
            pytest.skip("triton is not installed")
        return None
    child.wait()
    record = child.outcomes.get(pyfuncitem.nodeid)
    if record is None:
        pytest.fail(f"no result from the {child.name}; its output:\n{child.output}", pytrace=False)
    if record["outcome"] == "skipped":
        pytest.skip(f"in the {child.name}: {record['text']}")
    if record["outcome"] == "failed":
        pytest.fail(f"in the {child.name}:\n{record['text']}", pytrace=False)
    return True
