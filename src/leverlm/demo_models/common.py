"""Helpers shared by the demo-model trainers: schedules, checkpoints, safetensors files."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from leverlm.utils import atomic_open


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``floor`` at ``steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` a training state atomically (a killed run keeps the previous one)."""
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The training state at ``path`` when it was saved with the same ``config``, else None.

    A checkpoint of another configuration is ignored (and later overwritten), never mixed in.
    """
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("config") != config:
        print(f"[demo-models] {path}: saved with another configuration, starting afresh")
        return None
    return state


def save_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write a safetensors file atomically (contiguous CPU copies of ``tensors``)."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def file_size_mb(path: str | os.PathLike) -> float:
    return os.path.getsize(path) / 2**20
