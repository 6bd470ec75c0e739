"""Tiny on-disk worlds for the Lever-LM tests (gt dataset + feature store), and data tests.

The other ``test_lever_*`` files import the builders from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from leverlm.utils import atomic_write_json


def write_store(path: Path, image: np.ndarray, text: np.ndarray) -> Path:
    """A feature store folder in the ``leverlm-features`` layout (fp16 .npy + manifest)."""
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "image.npy", image.astype(np.float16))
    np.save(path / "text.npy", text.astype(np.float16))
    atomic_write_json(
        path / "manifest.json",
        {
            "format": "leverlm-features",
            "version": 1,
            "num_rows": int(image.shape[0]),
            "dim": int(image.shape[1]),
            "complete": True,
            "model_name": "test-random",
            "normalize": False,
        },
    )
    return path


def write_gt(
    path: Path,
    sequences: dict[int, list[list[int]]],
    num_icds: int,
    order: str = "left",
    scores: dict[int, list[float]] | None = None,
    supporting_set: str = "",
    task: str = "vqa",
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
            "manifest_sha256": "0" * 64,
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
    store = write_store(root / "features", image, text)
    coll = str(write_vqa_collection(root / "support", num_icds)) if with_collection else ""
    gt = write_gt(root / "gt", sequences, num_icds, order=order, supporting_set=coll)
    return World(gt, store, image, text, sequences, num_icds, Path(coll) if coll else None)


# -- data tests ------------------------------------------------------------------------------
def test_split_is_seeded_disjoint_and_order_independent():
    from leverlm.lever.data import split_anchors

    anchors = list(range(100))
    train, val = split_anchors(anchors, 0.1, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == anchors
    assert split_anchors(anchors[::-1], 0.1, seed=3) == (train, val)
    assert split_anchors(anchors, 0.1, seed=4) != (train, val)
    # tiny sets keep both sides non-empty
    tr, va = split_anchors([5, 9], 0.1, seed=0)
    assert len(tr) == 1 and len(va) == 1


def test_datamodule_batches_features_and_all_beams(tmp_path):
    from leverlm.lever.data import LeverLMDataModule
    from leverlm.lever.model import IGNORE_INDEX

    w = make_world(tmp_path, num_anchors=10, beams=3)
    dm = LeverLMDataModule(str(w.gt_dir), features=str(w.store_dir), batch_size=4, val_fraction=0.2)
    assert dm.num_icds == 32 and dm.feature_dim == 16
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 30  # every beam of every anchor
    train_anchors = {p for p, _ in dm.train_dataset.items}
    val_anchors = {p for p, _ in dm.val_dataset.items}
    assert len(val_anchors) == 2 and not train_anchors & val_anchors
    batch = next(iter(dm.val_dataloader()))
    N = w.num_icds
    tokens, targets = batch["tokens"], batch["targets"]
    assert tokens.shape == (4, 4)
    assert (tokens[:, 0] == N + 1).all() and (tokens[:, 1] == N + 2).all()
    for b in range(4):
        q = int(batch["query_position"][b])
        seq = tokens[b, 2:].tolist()
        assert seq in w.sequences[q]
        assert targets[b].tolist() == [IGNORE_INDEX, *seq, N]
        np.testing.assert_allclose(batch["query_feats"]["image"][b].float().numpy(), w.image[q])
        np.testing.assert_allclose(batch["query_feats"]["text"][b].float().numpy(), w.text[q])
        for t, p in enumerate(seq, start=2):
            np.testing.assert_allclose(
                batch["icd_feats"]["image"][b, t].float().numpy(), w.image[p]
            )
            np.testing.assert_allclose(batch["icd_feats"]["text"][b, t].float().numpy(), w.text[p])


def test_score_threshold_and_construction_order(tmp_path):
    from leverlm.lever.data import LeverLMDataModule

    seqs = {0: [[1, 2], [3, 4]], 5: [[6, 7], [8, 9]]}
    scores = {0: [0.9, 0.1], 5: [0.05, 0.01]}
    write_gt(tmp_path / "gt", seqs, num_icds=10, order="left", scores=scores)
    dm = LeverLMDataModule(str(tmp_path / "gt"), score_threshold=0.5, val_fraction=0.0)
    dm.setup()
    assert dm.train_dataset.items == [(0, (1, 2))]  # anchor 5 has no beam left
    dm = LeverLMDataModule(str(tmp_path / "gt"), sequence_order="construction", val_fraction=0.0)
    dm.setup()
    assert (0, (2, 1)) in dm.train_dataset.items  # order=left: construction = reversed prompt
    write_gt(tmp_path / "gt_r", seqs, num_icds=10, order="right")
    dm = LeverLMDataModule(str(tmp_path / "gt_r"), sequence_order="construction", val_fraction=0.0)
    dm.setup()
    assert (0, (1, 2)) in dm.train_dataset.items
    dm = LeverLMDataModule(str(tmp_path / "gt"), score_threshold=5.0)
    with pytest.raises(ValueError, match="score_threshold"):
        dm.setup()


def test_bad_gt_inputs_fail_early_naming_the_problem(tmp_path):
    from leverlm.gt.data import GtDataError
    from leverlm.lever.data import LeverLMDataModule

    with pytest.raises(GtDataError, match="not found"):
        LeverLMDataModule(str(tmp_path / "missing"))
    write_gt(tmp_path / "gt", {0: [[1, 12]]}, num_icds=10)
    with pytest.raises(GtDataError, match=r"\[12\].*num_samples"):
        LeverLMDataModule(str(tmp_path / "gt"))
    w = make_world(tmp_path / "w", num_icds=20)
    other = write_store(tmp_path / "other", w.image[:5], w.text[:5])
    with pytest.raises(ValueError, match="5 rows"):
        LeverLMDataModule(str(w.gt_dir), features=str(other))
    with pytest.raises(ValueError, match="data.features is required"):
        LeverLMDataModule(str(w.gt_dir), query_features=["image"])
    with pytest.raises(ValueError, match="sequence_order"):
        LeverLMDataModule(str(w.gt_dir), features=str(w.store_dir), sequence_order="random")
