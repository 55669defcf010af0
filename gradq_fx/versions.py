"""The torch, triton and timm stacks gradq is tested with, and how the installed one compares.

Two stacks bound the supported range, and CI runs on both (`.ci/run`):
- the oldest, torch 2.11 with triton 3.6 (the GPU machine's): kernel tests, sm_90a compile
  checks and a compiled training run under torchrun, in a second virtual environment;
- the newest, torch 2.14 with triton 3.8 (the README's commands): the whole suite.

Version-specific needs, each where it bites, all for the oldest stack:
- triton 3.6's interpreter fails with numpy >= 2.4 (`numpy<2.4` in pyproject's `dev` extra);
- triton 3.6's ptxas spills registers on tiles that 3.8's does not: kernels/gemm.py and
  kernels/conv.py keep one tile list that fits both (tests/kernels/test_cuda_compile.py checks
  it with the installed triton).

Runs without torch: `python gradq_fx/versions.py requirements oldest` prints the pip
requirements of a stack (CI installs the oldest from it); `... check` says how the installed
packages compare.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys


@dataclasses.dataclass(frozen=True)
class Stack:
    name: str
    torch: str
    triton: str
    torchvision: str
    timm: str  # the oldest timm tested with this torch; newer releases are expected to work

    def requirements(self) -> list[str]:
        """pip requirements that install this stack (and the packages gradq and its tests need)."""
        pins = [f"torch=={self.torch}", f"triton=={self.triton}"]
        pins += [f"torchvision=={self.torchvision}", f"timm=={self.timm}"]
        # numpy < 2.4: triton 3.6's interpreter fails on loops over runtime integers with 2.4.
        return [*pins, "networkx>=3.0", "tabulate>=0.9", "pytest>=8", "numpy<2.4"]


OLDEST = Stack("oldest", torch="2.11.0", triton="3.6.0", torchvision="0.26.0", timm="1.0.29")
NEWEST = Stack("newest", torch="2.14.1", triton="3.8.0", torchvision="0.29.1", timm="1.0.29")
TESTED = (OLDEST, NEWEST)


def installed() -> dict[str, str | None]:
    """The installed versions of torch, triton and timm (None where one is missing)."""
    found: dict[str, str | None] = {}
    for package in ("torch", "triton", "timm"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def _release(version: str | None) -> str | None:
    """'2.11.0+cu130' -> '2.11.0': the local build tag does not change what is tested."""
    return None if version is None else version.split("+")[0]


def check(found: dict[str, str | None] | None = None) -> str:
    """One line: the installed versions and whether they are a tested stack."""
    found = installed() if found is None else found
    shown = ", ".join(f"{package} {version or 'missing'}" for package, version in found.items())
    for stack in TESTED:
        if _release(found["torch"]) == stack.torch and _release(found["triton"]) == stack.triton:
            return f"{shown}: the {stack.name} tested stack"
    tested = "; ".join(f"torch {s.torch} + triton {s.triton}" for s in TESTED)
    return f"{shown}: NOT a tested stack (tested: {tested})"


def main(argv: list[str]) -> int:
    stacks = {stack.name: stack for stack in TESTED}
    if len(argv) == 2 and argv[0] == "requirements" and argv[1] in stacks:
        print(" ".join(stacks[argv[1]].requirements()))
        return 0
    if argv == ["check"]:
        print(check())
        return 0
    print(f"usage: versions.py requirements {{{','.join(stacks)}}} | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
