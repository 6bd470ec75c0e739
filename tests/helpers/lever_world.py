"""Tiny on-disk worlds for the Lever-LM tests: a gt dataset, a feature store, a collection."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np

from helpers import ROOT
from helpers.features import NO_COLLECTION_SHA256, write_store
from leverlm.utils import atomic_write_json, sha256_file


def write_gt(
    path: Path,
    sequences: dict[int, list[list[int]]],
    num_icds: int,
    order: str = "left",
    scores: dict[int, list[float]] | None = None,
    supporting_set: str = "",
    task: str = "vqa",
    supporting_set_sha256: str = NO_COLLECTION_SHA256,
) -> Path:
    """A gt folder (manifest.json + records.jsonl) for {anchor: [beam, ...]}."""
    path.mkdir(parents=True, exist_ok=True)
    anchors = sorted(sequences)
    shots = max(len(s) for beams in sequences.values() for s in beams)
    beam_size = max(len(b) for b in sequences.values())
    with open(path / "records.jsonl", "w", encoding="utf-8") as fh:
        for a in anchors:
            beams = sequences[a]
            sc = scores[a] if scores else [1.0 - 0.1 * i for i in range(len(beams))]
            rec = {
                "anchor_key": f"s{a:05d}",
                "anchor_position": a,
                "sequences": beams,
                "scores": sc,
                "step_scores": [[0.5] * len(s) for s in beams],
            }
            fh.write(json.dumps(rec) + "\n")
    manifest = {
        "format": "leverlm-gt",
        "version": 1,
        "task": task,
        "order": order,
        "shots": shots,
        "beam_size": beam_size,
        "num_anchors": len(anchors),
        "num_records": len(anchors),
        "supporting_set": {
            "path": supporting_set,
            "name": "tiny",
            "num_samples": num_icds,
            "manifest_sha256": supporting_set_sha256,
        },
        "lvlm": {"model_type": "none", "path": "", "dtype": "float32"},
        "config": {},
        "config_sha256": "0" * 64,
    }
    atomic_write_json(path / "manifest.json", manifest)
    return path


def write_vqa_collection(path: Path, n: int, seed: int = 0) -> Path:
    """A tiny VQA collection (distinct solid-colour PNGs, one question each)."""
    import io

    from PIL import Image

    from leverlm.data.collection import SampleRecord, write_collection

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), ((i * 37 + seed) % 256, i * 91 % 256, i * 53 % 256)).save(
            buf, "PNG"
        )
        return buf.getvalue()

    records = [
        SampleRecord(
            key=f"q-{i:05d}",
            image=png(i),
            image_ext="png",
            fields={
                "question_id": i,
                "image_id": 100 + i,
                "question": f"what colour is square {i}?",
                "answers": [f"colour {i % 3}"] * 10,
                "answer": f"colour {i % 3}",
                "answer_type": "other",
                "question_type": "what colour",
            },
        )
        for i in range(n)
    ]
    return write_collection(path, records, name=path.name, task="vqa", split="train")


@dataclass
class World:
    gt_dir: Path
    store_dir: Path
    image: np.ndarray  # (N, D) float32 (the values stored, after fp16 rounding)
    text: np.ndarray
    sequences: dict[int, list[list[int]]]
    num_icds: int
    collection: Path | None = None


def make_world(
    root: Path,
    num_icds: int = 32,
    dim: int = 16,
    num_anchors: int = 12,
    shots: int = 2,
    beams: int = 1,
    seed: int = 0,
    order: str = "left",
    with_collection: bool = False,
) -> World:
    """Random features and random distinct ICD sequences (never containing the anchor).

    ``with_collection`` also writes the supporting set as a tiny VQA collection (images and
    questions) and records its path in the gt manifest.
    """
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((num_icds, dim)).astype(np.float16).astype(np.float32)
    text = rng.standard_normal((num_icds, dim)).astype(np.float16).astype(np.float32)
    anchors = sorted(rng.choice(num_icds, size=num_anchors, replace=False).tolist())
    sequences = {}
    for a in anchors:
        pool = np.array([p for p in range(num_icds) if p != a])
        sequences[a] = [rng.choice(pool, size=shots, replace=False).tolist() for _ in range(beams)]
    coll = write_vqa_collection(root / "support", num_icds) if with_collection else None
    store = write_store(root / "features", image, text, coll)
    sha = sha256_file(Path(coll) / "manifest.json") if coll else NO_COLLECTION_SHA256
    gt = write_gt(
        root / "gt", sequences, num_icds, order=order, supporting_set=str(coll or ""),
        supporting_set_sha256=sha,
    )  # fmt: skip
    return World(gt, store, image, text, sequences, num_icds, Path(coll) if coll else None)


def clip_checkpoint(
    path: Path, num_icds: int, supporting_set: Path, task: str = "vqa", **model
) -> Path:
    """A randomly initialised ``clip_trainable`` Lever-LM checkpoint (tiny CLIP, tiny GPT-2)
    in the trainer's format, trained on ``supporting_set``."""
    import torch

    from leverlm.lever.module import LeverLMModule

    kw = dict(n_layer=1, n_embd=16, n_head=2, n_positions=16, dropout=0.0)
    kw |= dict(query_features=("image", "text"), icd_features=("image", "text")) | model
    module = LeverLMModule(
        num_icds=num_icds, clip_trainable=True, clip_model="leverlm-tiny-clip",
        supporting_set=str(supporting_set), task=task,
        supporting_set_sha256=sha256_file(Path(supporting_set) / "manifest.json"), **kw,
    )  # fmt: skip
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def encode_store(collection: Path, out: Path) -> Path:
    """The real feature store of ``collection`` (``leverlm features predict``, the demo's
    tiny CLIP)."""
    from leverlm.cli import main as cli_main
    from leverlm.demo import clip_checkpoint as demo_clip

    tiny = ROOT / "conf/encoder/tiny-clip.yaml"
    args = ["features", "predict", "--config", str(tiny), "--data.collection", str(collection)]
    args += ["--model.pretrained", str(demo_clip()), "--out", str(out)]
    args += ["--data.batch_size", "4", "--trainer.accelerator", "cpu"]
    assert cli_main([*args, "--trainer.logger", "false", "--progress_bar", "false"]) == 0
    return out


class SlowEpochs(L.Callback):
    """Sleeps after each training epoch (time to kill a run between its checkpoints)."""

    def __init__(self, seconds: float = 1.5) -> None:
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import time

        time.sleep(self.seconds)
