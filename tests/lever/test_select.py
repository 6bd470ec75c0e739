"""The ``LeverLM`` API and ``leverlm select``: every kind of query (positions, features, raw
images and questions, a JSONL of them), frozen and fine-tuned CLIP, the fine-tuned CLIP's
supporting-set cache, ``reverse_seq`` and the authors' checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.lever_world import clip_checkpoint, encode_store, write_vqa_collection

from leverlm.lever import LeverLMError
from leverlm.lever.model import LeverLMConfig, LeverLMModel
from leverlm.lever.select import LeverLM
from leverlm.lever.select import main as select_main
from leverlm.utils import sha256_file

N = 12
QUESTIONS = [f"what colour is square {i}?" for i in range(N)]


def _ckpt(path: Path, store: Path, collection: Path, task: str = "vqa", **config) -> Path:
    """A random tiny Lever-LM checkpoint reading the features of ``store``."""
    torch.manual_seed(0)
    cfg = dict(num_icds=N, n_layer=1, n_embd=16, n_head=2, n_positions=16, dropout=0.0)
    cfg |= dict(feature_dim=128, query_features=("image", "text")) | config
    model = LeverLMModel(LeverLMConfig(**cfg))
    info = {"support_features": str(store), "supporting_set": str(collection), "task": task,
            "supporting_set_sha256": sha256_file(collection / "manifest.json"),
            "clip_trainable": False, "clip_model": "leverlm-tiny-clip"}  # fmt: skip
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"leverlm_config": model.config.to_dict(), "leverlm_info": info, "state_dict": sd}, path
    )
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A VQA supporting set, its real feature store (tiny CLIP), its images as PNG files, a
    frozen-CLIP and a fine-tuned-CLIP checkpoint."""
    from leverlm.data.collection import Collection

    root = tmp_path_factory.mktemp("select")
    coll = write_vqa_collection(root / "support", N)
    store = encode_store(coll, root / "store")
    images = []
    for p in range(N):
        images.append(root / f"img{p}.png")
        images[-1].write_bytes(Collection(coll).image_bytes(p))
    return SimpleNamespace(
        root=root, coll=coll, store=store, images=images,
        frozen=_ckpt(root / "frozen.ckpt", store, coll),
        tuned=clip_checkpoint(root / "tuned" / "clip.ckpt", N, coll),
    )  # fmt: skip


def _raw(world, positions) -> list[dict]:
    return [{"image": str(world.images[p]), "question": QUESTIONS[p]} for p in positions]


# ---------------------------------------------------------------------------- frozen CLIP


def test_raw_queries_are_encoded_with_the_stores_clip(world):
    """A raw query that is a supporting-set sample (its image file and question) selects what
    its position does: it is encoded by the CLIP the store's manifest names, rounded alike."""
    lm = LeverLM.from_checkpoint(world.frozen)
    positions = list(range(N))
    by_position = lm.select(positions, shots=3)
    assert lm.select(_raw(world, positions), shots=3, batch_size=5) == by_position
    feats = lm.encode_queries(_raw(world, positions))
    from leverlm.encoders.store import open_store

    store = open_store(world.store)
    np.testing.assert_array_equal(feats["image"].numpy(), np.asarray(store.image, np.float32))
    np.testing.assert_allclose(feats["text"].numpy(), np.asarray(store.text, np.float32), atol=1e-3)
    from PIL import Image

    pil = [{"image": Image.open(world.images[p]), "question": QUESTIONS[p]} for p in (2, 5)]
    assert lm.select(pil, shots=3) == [by_position[2], by_position[5]]
    # the features as tensors, and reversed sequences
    assert lm.select(dict(feats), shots=3) == by_position
    assert lm.select(positions, shots=3, reverse_seq=True) == [s[::-1] for s in by_position]


def test_raw_query_errors_name_the_problem(world, tmp_path):
    lm = LeverLM.from_checkpoint(world.frozen)
    with pytest.raises(LeverLMError, match="query 1 has no 'question'"):
        lm.select([*_raw(world, [0]), {"image": str(world.images[1])}], shots=2)
    with pytest.raises(LeverLMError, match="query 0: image file .*nope.png does not exist"):
        lm.select([{"image": str(tmp_path / "nope.png"), "question": "q"}], shots=2)
    with pytest.raises(LeverLMError, match="queries must be positions"):
        lm.select(["a", "b"], shots=2)
    from leverlm.encoders.store import open_store

    s = open_store(world.store)
    as_arrays = LeverLM.from_checkpoint(
        world.frozen, support_features={"image": s.image, "text": s.text}
    )
    with pytest.raises(LeverLMError, match="CLIP named in the supporting set's feature store"):
        as_arrays.select(_raw(world, [0]), shots=2)


def test_select_cli_raw_queries_and_jsonl(world, tmp_path, capsys):
    lm = LeverLM.from_checkpoint(world.frozen)
    want = lm.select([3, 7], shots=2)
    out = tmp_path / "raw.jsonl"
    args = ["--ckpt", str(world.frozen), "--shots", "2", "--out", str(out)]
    images = [str(world.images[p]) for p in (3, 7)]
    assert select_main([*args, "--images", *images, "--questions", QUESTIONS[3], QUESTIONS[7]]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [
        {"image": images[0], "question": QUESTIONS[3], "icd_positions": want[0]},
        {"image": images[1], "question": QUESTIONS[7], "icd_positions": want[1]},
    ]
    assert "selecting ICDs" in capsys.readouterr().err  # the progress bar over batches
    # a JSONL with image paths relative to its folder; other fields are kept
    lines = [{"key": "a", "image": world.images[3].name, "question": QUESTIONS[3]},
             {"key": "b", "image": world.images[7].name, "question": QUESTIONS[7]}]  # fmt: skip
    jsonl = world.root / "queries.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert select_main([*args, "--jsonl", str(jsonl), "--reverse_seq"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["a", "b"]
    assert [r["icd_positions"] for r in rows] == [s[::-1] for s in want]
    before = out.read_bytes()
    for bad, message in [
        (["--images", images[0], "--questions", "q1", "q2"], "1 --images but 2 --questions"),
        (["--images", images[0], "--queries", str(world.coll)], "give the queries one way"),
        ([], "give the queries one way"),
        (["--images", images[0], "--exclude_self"], "--exclude_self and --query_features need"),
        (["--jsonl", str(tmp_path / "none.jsonl")], "--jsonl .* does not exist"),
        (["--images", images[0]], "query 0 has no 'question'"),
    ]:
        with pytest.raises(LeverLMError, match=message):
            select_main([*args, *bad])
    assert out.read_bytes() == before


# ---------------------------------------------------------------------------- fine-tuned CLIP


def test_fine_tuned_clip_checkpoint_selects_positions_and_raw_queries(world, monkeypatch):
    """Positions without any store (the supporting set's samples, encoded with the checkpoint's
    own CLIP), and raw queries encoded with that CLIP too."""
    import leverlm.lever.select as sel

    lm = LeverLM.from_checkpoint(world.tuned)
    got = lm.select([0, 1], shots=2)
    feats = sel.encode_collection(
        lm.clip, "leverlm-tiny-clip", world.coll, "vqa", ("image", "text"), positions=[0, 1]
    )
    assert got == lm.select(feats, shots=2)
    assert lm.select(_raw(world, [0, 1]), shots=2) == got
    # the supporting set's features: encoded once, cached by the checkpoint's sha256
    folder = world.tuned.parent / "support_features" / sha256_file(world.tuned)[:16]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] == sha256_file(world.tuned)
    assert manifest["modalities"] == ["image", "text"] and manifest["num_rows"] == N
    monkeypatch.setattr(sel, "encode_collection", lambda *a, **k: pytest.fail("re-encoded"))
    again = LeverLM.from_checkpoint(world.tuned)
    for m in ("image", "text"):
        assert torch.equal(again.bank.features[m], lm.bank.features[m])


def test_fine_tuned_clip_refuses_frozen_stores_and_caches_where_told(world, tmp_path):
    with pytest.raises(LeverLMError, match="fine-tunes its CLIP .* support_features .* omit it"):
        LeverLM.from_checkpoint(world.tuned, support_features=str(world.store))
    with pytest.raises(LeverLMError, match="query_features"):
        LeverLM.from_checkpoint(world.tuned, query_features=str(world.store))
    lm = LeverLM.from_checkpoint(world.tuned, cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / sha256_file(world.tuned)[:16] / "image.npy").is_file()
    with pytest.raises(LeverLMError, match="query_features"):
        lm.select([0], shots=2, query_features=str(world.store))
    other = write_vqa_collection(tmp_path / "other", N, seed=5)
    with pytest.raises(LeverLMError, match="not the collection .* was trained on"):
        LeverLM.from_checkpoint(world.tuned, supporting_set=other)


def test_caption_lever_lm_reading_the_query_text_is_refused(world, tmp_path):
    """A caption sample's text is its reference caption: refused in training and at loading (a
    checkpoint written before the guard)."""
    message = r"query_features=\['image', 'text'\] on a 'caption' task: .* reference caption"
    with pytest.raises(LeverLMError, match=message):
        clip_checkpoint(tmp_path / "cap.ckpt", N, world.coll, task="caption")
    ckpt = _ckpt(tmp_path / "old.ckpt", world.store, world.coll, task="caption")
    with pytest.raises(LeverLMError, match=message):
        LeverLM.from_checkpoint(ckpt)
    image_only = _ckpt(
        tmp_path / "ok.ckpt", world.store, world.coll, "caption", query_features=("image",)
    )
    assert len(LeverLM.from_checkpoint(image_only).select([0], shots=2)[0]) == 2


# ---------------------------------------------------------------------------- the authors'


@pytest.mark.parametrize("backbone", ["gpt2", "lstm"])
def test_authors_checkpoint_loads_with_the_architecture_options(world, tmp_path, backbone):
    """A checkpoint in the authors' layout (Lightning ``state_dict``, ``lever_lm.`` keys, their
    CLIP towers beside) loads given the options, and selects as the model it came from."""
    torch.manual_seed(1)
    cfg = LeverLMConfig(
        num_icds=N, backbone=backbone, n_layer=2, n_embd=32, n_head=2, feature_dim=128,
        query_features=("image",), adapter_activation="relu", normalize_at="after_adapter",
        normalize=True, lstm_variant="authors", adapter_hidden=32 if backbone == "lstm" else None,
    )  # fmt: skip
    model = LeverLMModel(cfg)
    sd = {**model.authors_state_dict(), "lever_lm.img_model.vision_model.x": torch.zeros(2)}
    torch.save({"state_dict": sd, "hyper_parameters": {"lr": 1e-4}}, tmp_path / "last.ckpt")
    lm = LeverLM.from_checkpoint(
        tmp_path / "last.ckpt", support_features=str(world.store), config=cfg
    )
    ours = LeverLM(model, lm.bank, query_features=lm.query_features)
    assert lm.select(list(range(N)), shots=3) == ours.select(list(range(N)), shots=3)
    with pytest.raises(LeverLMError, match="not a Lever-LM checkpoint"):
        LeverLM.from_checkpoint(tmp_path / "last.ckpt", support_features=str(world.store))
