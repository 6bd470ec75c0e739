"""``leverlm demo``: the whole pipeline on the embedded easy-vqa set, on CPU, in minutes.

Each step runs the same ``leverlm`` command a user would type (printed before it runs), so the
demo doubles as a worked example. Every step is idempotent: a rerun skips what is complete and
resumes what is not. Outputs go under ``--out`` (default ``runs/demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from leverlm.errors import LeverError

STEPS = ("prep", "models", "features", "gt", "train", "eval", "report")
#: the demo's committed CLIP and LVLM (``make demo-models`` retrains them).
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "demo"
CLIP_FILE = "leverlm-tiny-clip-easyvqa.safetensors"


def clip_checkpoint(out: str | os.PathLike = ASSET_DIR) -> Path:
    """The demo CLIP's checkpoint under a demo-models folder (default: the committed one)."""
    return Path(out) / "clip" / CLIP_FILE


def lvlm_dir(out: str | os.PathLike = ASSET_DIR) -> Path:
    """The demo LVLM's ``save_pretrained`` folder under a demo-models folder."""
    return Path(out) / "lvlm"


class DemoError(LeverError):
    """A demo step failed (names the step and the command)."""


def project_root() -> Path:
    """The folder holding ``conf/`` and ``experiments/`` (the source checkout)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / "conf").is_dir() and (base / "experiments").is_dir():
            return base
    raise DemoError(
        "cannot find the conf/ and experiments/ folders: run the demo from the leverlm "
        "checkout (make demo)"
    )


@dataclass(frozen=True)
class DemoPaths:
    """Where each step reads and writes."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def train_collection(self) -> Path:
        return self.data / "easyvqa-vqa-train"

    @property
    def test_collection(self) -> Path:
        return self.data / "easyvqa-vqa-test"

    @property
    def lvlm(self) -> Path:
        return lvlm_dir()

    @property
    def clip(self) -> Path:
        return clip_checkpoint()

    def features(self, collection: Path) -> Path:
        return self.out / "features" / collection.name / "leverlm-tiny-clip"

    @property
    def gt(self) -> Path:
        return self.out / "gt"

    @property
    def train(self) -> Path:
        return self.out / "train"

    @property
    def checkpoint(self) -> Path:
        return self.train / "checkpoints" / "last.ckpt"

    @property
    def eval(self) -> Path:
        return self.out / "eval"


def _leverlm(*args: str | os.PathLike) -> list[str]:
    return [sys.executable, "-m", "leverlm.cli", *map(str, args)]


class Demo:
    """Runs the steps in order; each step is a method returning the command(s) it ran."""

    def __init__(self, out: Path, root: Path, extra: dict[str, list[str]] | None = None) -> None:
        self.paths = DemoPaths(out)
        self.root = root
        self.extra = extra or {}
        self.timings: dict[str, float] = {}

    # -- running -------------------------------------------------------------------------
    def run(self, step: str, cmd: list[str]) -> None:
        prefix = _leverlm()
        words = ["leverlm", *cmd[len(prefix) :]] if cmd[: len(prefix)] == prefix else cmd
        shown = shlex.join(words)
        print(f"\n[demo:{step}] $ {shown}", flush=True)
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("WANDB_MODE", "offline")
        env.setdefault("PYTHONUNBUFFERED", "1")
        result = subprocess.run(cmd, cwd=self.root, env=env)
        if result.returncode != 0:
            raise DemoError(f"step {step!r} failed (exit {result.returncode}): {shown}")

    def step_prep(self) -> None:
        self.run("prep", _leverlm("prep", "easyvqa", "--out", self.paths.data))

    def step_models(self) -> None:
        """The committed demo models (``make demo-models`` retrains them): check and describe."""
        clip, lvlm = self.paths.clip, self.paths.lvlm
        missing = [str(p) for p in (clip, lvlm / "config.json", lvlm / "model.safetensors")]
        missing = [p for p in missing if not Path(p).is_file()]
        if missing:
            raise DemoError(
                f"the demo models are missing ({', '.join(missing)}): restore them from git "
                "or retrain them with `make demo-models`"
            )
        print(f"\n[demo:models] CLIP {clip.name} ({clip.stat().st_size / 2**20:.1f} MiB)")
        print(f"[demo:models] LVLM {lvlm} (idefics3, task vqa_nonce)")
        for name, path in (
            ("CLIP", clip.parent / "metrics.json"),
            ("LVLM", lvlm / "evaluation.json"),
        ):
            if path.is_file():
                info = json.loads(path.read_text())
                facts = info.get("test") or info.get("accuracy")
                print(f"[demo:models] {name} measured when trained: {json.dumps(facts)}")

    def step_features(self) -> None:
        for coll in (self.paths.train_collection, self.paths.test_collection):
            self.run(
                "features",
                _leverlm(
                    "features",
                    "predict",
                    "--config",
                    "conf/encoder/tiny-clip.yaml",
                    "--out",
                    self.paths.features(coll),
                    "--data.collection",
                    coll,
                    "--model.pretrained",
                    self.paths.clip,
                    "--trainer.accelerator",
                    "cpu",
                    # the tiny encoder's ops are too small to gain from a second thread
                    "--cpu_threads",
                    "1",
                ),
            )

    def step_gt(self) -> None:
        self.run(
            "gt",
            _leverlm(
                "gt",
                "predict",
                "--config",
                "experiments/easyvqa/gt_demo.yaml",
                "--out",
                self.paths.gt,
                "--data.collection",
                self.paths.train_collection,
                "--data.support_features",
                self.paths.features(self.paths.train_collection),
                "--model.lvlm.path",
                self.paths.lvlm,
                *self.extra.get("gt", []),
            ),
        )

    def step_train(self) -> None:
        self.run(
            "train",
            _leverlm(
                "train",
                "fit",
                "--config",
                "experiments/easyvqa/lever_demo.yaml",
                "--data.gt_dir",
                self.paths.gt,
                "--data.support_features",
                self.paths.features(self.paths.train_collection),
                "--out",
                self.paths.train,
                *self.extra.get("train", []),
            ),
        )

    def step_eval(self) -> None:
        p = self.paths
        self.run(
            "eval",
            _leverlm(
                "eval",
                "predict",
                "--config",
                "experiments/easyvqa/eval_demo.yaml",
                "--out",
                p.eval,
                "--data.queries",
                p.test_collection,
                "--data.supporting_set",
                p.train_collection,
                "--data.query_features",
                p.features(p.test_collection),
                "--data.support_features",
                p.features(p.train_collection),
                "--data.retrievers.fixed.gt_dir",
                p.gt,
                "--data.retrievers.lever_lm.checkpoint",
                p.checkpoint,
                "--model.lvlm.path",
                p.lvlm,
                *self.extra.get("eval", []),
            ),
        )

    def step_report(self) -> None:
        self.run("report", _leverlm("report", self.paths.eval, "--out", self.paths.out))

    # -- all -----------------------------------------------------------------------------
    def __call__(self, steps: list[str]) -> None:
        for step in steps:
            start = time.perf_counter()
            fn: Callable[[], None] = getattr(self, f"step_{step}")
            fn()
            self.timings[step] = time.perf_counter() - start
        print(
            "\n[demo] step timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items())
        )
        print(f"[demo] total {sum(self.timings.values()):.0f}s; outputs under {self.paths.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leverlm demo", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument(
        "--steps",
        default=",".join(STEPS),
        help=f"comma-separated subset of {','.join(STEPS)} (default: all, in order)",
    )
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    for step in ("gt", "train", "eval"):
        p.add_argument(
            f"--{step}_args",
            default="",
            help=f"extra overrides for the {step} command, e.g. '--trainer.max_epochs 2'",
        )
    return p


def _terminate(signum: int, frame: object) -> None:
    # subprocess.run kills its child when interrupted: a stopped demo leaves no step running.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(
            f"leverlm demo: unknown step(s) {unknown}; choose from {list(STEPS)}", file=sys.stderr
        )
        return 2
    try:
        root = project_root()
        out = args.out if args.out.is_absolute() else (Path.cwd() / args.out)
        if args.fresh and out.exists():
            shutil.rmtree(out)
        extra = {s: shlex.split(getattr(args, f"{s}_args")) for s in ("gt", "train", "eval")}
        Demo(out, root, extra)(steps)
    except DemoError as err:
        print(f"leverlm demo: error: {err}", file=sys.stderr)
        return 1
    return 0
