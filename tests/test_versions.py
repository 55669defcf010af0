"""gradq_fx/versions.py: the tested stacks, as CI installs them and the GPU script checks them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gradq_fx import versions

SCRIPT = Path(versions.__file__)


def test_a_build_tag_still_matches_its_tested_stack():
    line = versions.check({"torch": "2.11.0+cu130", "triton": "3.6.0", "timm": "1.0.29"})
    assert "the oldest tested stack" in line and "NOT" not in line
    assert "torch 2.11.0+cu130" in line  # what was found is shown as found


def test_an_untested_pair_is_said_to_be_untested():
    line = versions.check({"torch": "2.11.0", "triton": "3.8.0", "timm": "1.0.29"})
    assert "NOT a tested stack" in line
    line = versions.check({"torch": "2.12.0", "triton": None, "timm": None})
    assert "NOT a tested stack" in line and "triton missing" in line


def test_the_script_prints_pip_requirements_without_importing_torch():
    # -S -I: no site-packages, so the script must not need torch to say what to install.
    run = [sys.executable, "-S", "-I", str(SCRIPT), "requirements", "oldest"]
    printed = subprocess.run(run, capture_output=True, text=True, check=True).stdout.split()
    assert "torch==2.11.0" in printed and "triton==3.6.0" in printed
    assert "numpy<2.4" in printed  # triton 3.6's interpreter needs it
    bad = subprocess.run([*run[:-2], "requirements", "newer"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
