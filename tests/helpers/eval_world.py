"""A tiny evaluation world for the eval tests: VQA collections, feature stores, a gt dataset,
a Lever-LM checkpoint and an eval config (the tiny IDEFICS is built by the tests that need it).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from helpers.features import write_store

NUM_SUPPORT = 30
NUM_QUERIES = 16
DIM = 8
COLORS = ["red", "green", "blue", "teal", "gray"]


def _image(i: int) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (32, 32), (i * 37 % 256, i * 91 % 256, i * 13 % 256))
    ImageDraw.Draw(im).rectangle([2 + i % 9, 3, 20, 12 + i % 13], fill=(250 - i * 7, 20, i * 9))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def vqa_collection(path: Path, n: int, split: str, offset: int = 0) -> Path:
    """``n`` VQA samples; every 3rd a yes/no question, the others a colour; answers vary."""
    from leverlm.data.collection import SampleRecord, write_collection

    records = []
    for j in range(n):
        i = j + offset
        answer = COLORS[i % 5] if i % 3 else ("yes" if i % 2 else "no")
        question = "What color is the shape?" if i % 3 else "Is there a circle?"
        # Mixed human answers, so VQA accuracy takes fractional values.
        answers = [answer] * 7 + [COLORS[(i + 1) % 5]] * 3
        fields = {
            "question_id": i,
            "image_id": i,
            "question": question,
            "answers": answers,
            "answer": answer,
            "answer_type": "other",
            "question_type": "what",
        }
        records.append(SampleRecord(f"{split}-{i:06d}", _image(i), "png", fields))
    return write_collection(path, records, name=f"tiny-vqa-{split}", task="vqa", split=split)


def feature_store(path: Path, collection: Path, seed: int) -> Path:
    """A complete feature store of random (but fixed) features for ``collection``."""
    from leverlm.data.collection import read_manifest

    n = int(read_manifest(collection)["num_samples"])
    rng = np.random.default_rng(seed)
    image, text = (rng.standard_normal((n, DIM)) for _ in range(2))
    return write_store(path, image, text, collection)


def gt_dataset(path: Path, num_support: int) -> tuple[Path, list[int]]:
    """A merged gt dataset of 4 anchors; returns it and the best record's best sequence."""
    from leverlm.gt.data import GtRecord, write_gt

    records = [
        GtRecord("a0", 0, [[5, 9], [9, 5]], [0.25, 0.125], [[0.5, 0.25], [0.25, 0.125]]),
        GtRecord("a3", 3, [[7, 2], [2, 7]], [0.75, 0.5], [[0.5, 0.75], [0.25, 0.5]]),
        # ties with a3 at 0.75 but has a higher anchor position: a3 wins
        GtRecord("a8", 8, [[1, 4], [4, 1]], [0.75, 0.25], [[0.5, 0.75], [0.5, 0.25]]),
        GtRecord("a11", 11, [[6, 12], [12, 6]], [-0.5, -0.75], [[0.5, -0.5], [0.5, -0.75]]),
    ]
    manifest = {"task": "vqa", "order": "left", "shots": 2, "beam_size": 2,
                "supporting_set": {"num_samples": num_support}}  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    write_gt(path, records, {**manifest, "config": {"test": True}})
    return path, [7, 2]


def lever_checkpoint(
    path: Path, support_store: Path, query_features: tuple = ("image",), **info: Any
) -> Path:
    """A randomly initialised tiny Lever-LM checkpoint in the trainer's format."""
    import torch

    from leverlm.lever.model import LeverLMConfig, LeverLMModel

    torch.manual_seed(0)
    config = LeverLMConfig(
        num_icds=NUM_SUPPORT,
        n_layer=1,
        n_embd=16,
        n_head=2,
        n_positions=16,
        dropout=0.0,
        feature_dim=DIM,
        query_features=query_features,
        icd_features=("image", "text"),
    )
    model = LeverLMModel(config)
    ckpt = {
        "leverlm_config": config.to_dict(),
        "leverlm_info": {
            "support_features": str(support_store),
            "supporting_set": None,
            "task": "vqa",
            "clip_trainable": False,
            "clip_model": "none",
            **info,
        },
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
    }
    torch.save(ckpt, path)
    return path


def build_world(root: Path) -> dict[str, Path]:
    """Collections, stores, gt dataset and Lever-LM checkpoint under ``root``."""
    support = vqa_collection(root / "support", NUM_SUPPORT, "train")
    queries = vqa_collection(root / "queries", NUM_QUERIES, "val", offset=1000)
    support_store = feature_store(root / "feat-support", support, seed=1)
    query_store = feature_store(root / "feat-queries", queries, seed=2)
    gt, _ = gt_dataset(root / "gt", NUM_SUPPORT)
    ckpt = lever_checkpoint(root / "lever.ckpt", support_store, trained_shots=2)
    return {
        "support": support,
        "queries": queries,
        "support_store": support_store,
        "query_store": query_store,
        "gt": gt,
        "ckpt": ckpt,
    }


def echo_lvlm(**kwargs: Any) -> Any:
    """The tiny IDEFICS whose ``generate`` answers with the answer of the ICD next to the query
    ("no" without ICDs), after building its prompts the adapter's way: gives the metric a
    non-trivial spread across methods."""
    from leverlm.lvlm.hf_interleaved import load

    lvlm = load(**{**kwargs, "model_type": "idefics"})

    def generate(icd_seqs, queries, **gen):
        lvlm.encode_pairs(icd_seqs, queries, with_answer=False)
        return [icds[-1]["answer"] if icds else "no" for icds in icd_seqs]

    lvlm.generate = generate
    return lvlm
