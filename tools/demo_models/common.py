"""What both trainers share: settings, optimiser, schedule, steps, resumable checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leverlm.utils import atomic_open


@dataclass(frozen=True)
class TrainConfig:
    """Settings every trainer has (each trainer's defaults made the committed model)."""

    steps: int
    lr: float
    weight_decay: float
    warmup: int
    checkpoint_every: int
    seed: int = 0


def say(tag: str, message: str) -> None:
    print(f"[demo-models:{tag}] {message}", flush=True)


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``floor`` at ``steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(model: torch.nn.Module, config: TrainConfig, no_decay: str, **kw: Any) -> Any:
    """AdamW decaying the weight matrices only (not biases, norms nor ``no_decay`` tables)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and no_decay not in name else rest).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": rest, "weight_decay": 0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), **kw)


def optimizer_step(
    opt: Any, model: torch.nn.Module, loss: torch.Tensor, step: int, config: TrainConfig
) -> None:
    """One update at ``step`` of the schedule, gradients clipped to norm 1."""
    for group in opt.param_groups:
        group["lr"] = config.lr * lr_factor(step, config.steps, config.warmup)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def resume(path: Path, config: dict[str, Any], model: Any, opt: Any, tag: str) -> dict[str, Any]:
    """Load the training state at ``path`` into ``model`` and ``opt``; return the state.

    A state saved with another ``config`` is ignored (and later overwritten), never mixed in;
    with none to resume from this returns ``{"step": 0}``.
    """
    if not path.is_file():
        return {"step": 0}
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("config") != config:
        say(tag, f"{path}: saved with another configuration, starting afresh")
        return {"step": 0}
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    say(tag, f"resuming at step {state['step']}")
    return state


def save_state(
    path: Path, config: dict[str, Any], step: int, model: Any, opt: Any, **extra: Any
) -> None:
    """``torch.save`` the training state atomically (a killed run keeps the previous one)."""
    state = {"config": config, "step": step, "model": model.state_dict(), **extra}
    state["optimizer"] = opt.state_dict()
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)
