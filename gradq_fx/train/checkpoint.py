"""`checkpoint.pt`: everything needed to continue a run exactly where an epoch ended.

Contents (a dict of plain types and tensors, loadable with `torch.load(weights_only=True)`):
- `model`: the model's state_dict (without DDP's or torch.compile's wrappers);
- `optimizer`, `scheduler`: their state_dicts (the scheduler's `last_epoch` is the step count);
- `epoch`: epochs completed; `step`: optimiser steps taken; `history`: the rows of log.csv;
- `rng`: torch's random states (CPU, and CUDA when used) of every process, by rank;
- `config`: the TrainConfig as a dict; `gradq_options`: `GradQConfig.to_options()` of the
  INT8 precisions (None for fp32 and bf16);
- `lsq_bits`: {Linear path: (weight bits, activation bits)} of the LSQ quantizers (`--lsq`;
  their step sizes and offsets are in `model`), checked on resume; `oscillation`: each
  oscillation tracker's last codes.
Data order and augmentation need no saved state: they are functions of (seed, epoch, rank).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random states: torch's CPU generator and the device's, if CUDA."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a crash mid-write leaves the previous checkpoint."""
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load(path: Path, flag: str = "--resume") -> dict[str, Any]:
    """Read a checkpoint written by `save`; ValueError (naming `flag`) when there is none."""
    if not path.is_file():
        if flag == "--resume":
            raise ValueError(f"--resume: no checkpoint at {path} (train without --resume first)")
        raise ValueError(f"{flag}: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)
