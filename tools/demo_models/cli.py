"""``python -m tools.demo_models {clip,lvlm,all} --out DIR``: train the demo's models.

Reads the easy-vqa collections of ``leverlm prep easyvqa --out DATA`` (default
``runs/demo/data``) and writes ``OUT/clip/<CLIP_FILE>`` + ``metrics.json`` and ``OUT/lvlm/``
(``save_pretrained`` + ``training.json`` + ``evaluation.json``). Training checkpoints go to
``--work`` (default ``runs/demo_models``); a rerun of the same command resumes from them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from leverlm.demo import clip_checkpoint, lvlm_dir
from leverlm.utils import atomic_write_json
from tools.demo_models.data import DemoModelsError

PARTS = ("clip", "lvlm", "all")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.demo_models", description=__doc__)
    p.add_argument("part", choices=PARTS, help="which model(s) to train")
    p.add_argument("--out", type=Path, required=True, help="output folder (clip/, lvlm/)")
    p.add_argument(
        "--data", type=Path, default=Path("runs/demo/data"), help="easy-vqa collections folder"
    )
    p.add_argument(
        "--work", type=Path, default=Path("runs/demo_models"), help="resumable checkpoints"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps of each model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--eval_queries",
        type=int,
        default=300,
        help="test queries for the LVLM's generate() evaluation (0: skip)",
    )
    p.add_argument(
        "--val_episodes",
        type=int,
        default=None,
        help="held-out episodes per periodic LVLM validation (0: none)",
    )
    return p


def _check(args: argparse.Namespace) -> None:
    """Every input checked before any training starts."""
    from tools.demo_models.data import open_collection

    if args.steps is not None and args.steps < 1:
        raise DemoModelsError(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1 or args.eval_queries < 0:
        raise DemoModelsError("--threads must be >= 1 and --eval_queries >= 0")
    if args.part in ("clip", "all"):
        for split in ("train", "test"):
            open_collection(args.data / f"easyvqa-caption-{split}", "caption")
    if args.part in ("lvlm", "all"):
        for split in ("train", "test"):
            open_collection(args.data / f"easyvqa-vqa-{split}", "vqa")


def _with_steps(config: Any, steps: int | None) -> Any:
    """``config`` shortened to ``steps`` (warmup, checkpoint and validation intervals capped)."""
    if steps is None:
        return config
    caps = {"warmup": steps // 5, "checkpoint_every": steps, "val_every": steps}
    return replace(
        config,
        steps=steps,
        **{k: min(getattr(config, k), v) for k, v in caps.items() if hasattr(config, k)},
    )


def run_clip(args: argparse.Namespace, command: str) -> None:
    from tools.demo_models.clip import ClipTrainConfig, train_clip

    config = _with_steps(ClipTrainConfig(seed=args.seed), args.steps)
    out = clip_checkpoint(args.out).parent
    train, test = (args.data / f"easyvqa-caption-{split}" for split in ("train", "test"))
    result = train_clip(train, test, out, args.work, config)
    atomic_write_json(out / "metrics.json", result | {"command": command})


def run_lvlm(args: argparse.Namespace, command: str) -> None:
    from tools.demo_models.data import load_vqa
    from tools.demo_models.lvlm import LVLMTrainConfig, evaluate_lvlm, train_lvlm

    config = _with_steps(LVLMTrainConfig(seed=args.seed), args.steps)
    if args.val_episodes is not None:
        config = replace(config, val_episodes=args.val_episodes)
        if args.val_episodes == 0:
            config = replace(config, val_every=0)
    train = load_vqa(args.data / "easyvqa-vqa-train")
    test = load_vqa(args.data / "easyvqa-vqa-test")
    out = lvlm_dir(args.out)
    result = train_lvlm(train, test, out, args.work, config)
    if args.eval_queries:
        evaluation = evaluate_lvlm(out, train, test, args.eval_queries, seed=args.seed)
        atomic_write_json(out / "evaluation.json", evaluation | {"command": command})
    atomic_write_json(out / "training.json", result | {"command": command})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "tools.demo_models", *(argv or sys.argv[1:])])
    try:
        _check(args)
        import torch

        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        if args.part in ("clip", "all"):
            run_clip(args, command)
        if args.part in ("lvlm", "all"):
            run_lvlm(args, command)
        print(f"[demo-models] done in {time.perf_counter() - start:.0f}s; outputs under {args.out}")
    except DemoModelsError as err:
        print(f"demo-models: error: {err}", file=sys.stderr)
        return 1
    return 0
