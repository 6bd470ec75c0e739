"""The feature job and store: parity with direct encoding, deduplication, resume, DDP, manifest
checks, CLI."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image

from leverlm.data.collection import Collection, SampleRecord, write_collection
from leverlm.encoders import FeatureStore, FeatureStoreError, compute_features, default_feature_dir
from leverlm.encoders.clip import TINY_CLIP, ClipEncoder, EncoderError, load_clip
from leverlm.encoders.job import (
    UnitProgressBar,
    build_parser,
    copy_from_representatives,
    partial_dir,
    plan_batches,
    plan_work,
)
from leverlm.encoders.job import main as features_main
from leverlm.encoders.store import DONE, MANIFEST, UNITS

REPO = ROOT
N = 13  # rows, all distinct; 26 work units; with batch size 4: image batches of 4, 4, 4, 1 then
# text batches of 4, 4, 4, 1
U = 2 * N
# The collection with duplicates: position i shows image DUP_IMAGES[i] of a pool and asks
# question DUP_TEXTS[i] of a pool (5 distinct images, 3 distinct questions in 16 rows).
DUP_IMAGES = [0, 1, 0, 2, 1, 3, 0, 4, 4, 2, 1, 0, 3, 3, 0, 1]
DUP_TEXTS = [0, 0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0, 1, 2]


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _vqa_records(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        fields = {
            "question_id": i,
            "image_id": 100 + i,
            "question": f"what shape is number {i}?",
            "answers": ["circle"] * 10,
            "answer": "circle",
            "answer_type": "other",
            "question_type": "what",
        }
        yield SampleRecord(key=f"q{seed}-{i:04d}", image=_png(rng), image_ext="png", fields=fields)


def _dup_records():
    rng = np.random.default_rng(7)
    pool = [_png(rng) for _ in range(max(DUP_IMAGES) + 1)]
    for i, (img, txt) in enumerate(zip(DUP_IMAGES, DUP_TEXTS, strict=True)):
        fields = {
            "question_id": i,
            "image_id": 500 + img,
            "question": f"what color is shape {txt}?",
            "answers": ["red"] * 10,
            "answer": "red",
            "answer_type": "other",
            "question_type": "what",
        }
        yield SampleRecord(key=f"d{i:04d}", image=pool[img], image_ext="png", fields=fields)


def _caption_records(n: int):
    rng = np.random.default_rng(5)
    for i in range(n):
        caps = [f"a picture of thing {i}", "something else"]
        fields = {"image_id": i, "file_name": f"img{i}.png", "captions": caps, "caption": caps[0]}
        yield SampleRecord(key=f"c{i:04d}", image=_png(rng), image_ext="png", fields=fields)


@pytest.fixture(scope="module")
def colls(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("collections")
    return {
        "vqa": write_collection(
            root / "toy-vqa", _vqa_records(N, 0), name="toy-vqa", task="vqa", split="train"
        ),
        "other": write_collection(
            root / "toy-vqa-2", _vqa_records(N, 1), name="toy-vqa-2", task="vqa", split="train"
        ),
        "caption": write_collection(
            root / "toy-cap", _caption_records(5), name="toy-cap", task="caption", split="val"
        ),
        "dups": write_collection(
            root / "toy-dups", _dup_records(), name="toy-dups", task="vqa", split="train"
        ),
    }


@pytest.fixture(scope="module")
def reference(colls, tmp_path_factory) -> Path:
    """One uninterrupted 1-process build of the vqa collection (batch size 4)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    return compute_features(colls["vqa"], out, TINY_CLIP, batch_size=4)


@pytest.fixture(scope="module")
def dup_reference(colls, tmp_path_factory) -> Path:
    """One uninterrupted 1-process build of the collection with duplicates (batch size 2)."""
    out = tmp_path_factory.mktemp("dupref") / "store"
    return compute_features(colls["dups"], out, TINY_CLIP, batch_size=2)


class _Count(L.Callback):
    """Counts the work units each predict step encoded (in this process)."""

    def __init__(self) -> None:
        self.units = 0
        self.batches = 0
        self.kinds: list[str] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
        self.units += int(outputs["units"].numel())
        self.batches += 1
        self.kinds.append(outputs["kind"])


@pytest.fixture
def encoder_calls(monkeypatch) -> dict[str, int]:
    """Counts the images and texts passed to the CLIP towers (in this process)."""
    calls = {"images": 0, "texts": 0}
    encode_pixels, encode_tokens = ClipEncoder.encode_pixels, ClipEncoder.encode_tokens

    def count_pixels(self, pixels):
        calls["images"] += int(pixels.shape[0])
        return encode_pixels(self, pixels)

    def count_tokens(self, tokens):
        calls["texts"] += int(tokens.shape[0])
        return encode_tokens(self, tokens)

    monkeypatch.setattr(ClipEncoder, "encode_pixels", count_pixels)
    monkeypatch.setattr(ClipEncoder, "encode_tokens", count_tokens)
    return calls


class _CrashAt(L.Callback):
    """Raises before predict batch ``k`` (k batches are written by then)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, *_):
        if batch_idx == self.k:
            raise RuntimeError("simulated crash")


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    store = FeatureStore(path)
    return np.array(store.image), np.array(store.text)


# -- plan -------------------------------------------------------------------------------------


def test_plan_batches_is_a_fixed_homogeneous_grid_dealt_to_ranks() -> None:
    # 7 image units (0..6) then 5 text units (7..11), batch size 3.
    done = np.zeros(12, np.uint8)
    done[0:3] = 1  # image batch 0 finished
    done[4] = 1  # image batch 1 only partly: still pending
    done[7:10] = 1  # text batch 0 finished
    for world in (1, 2, 3, 6):
        plans = [plan_batches(7, 5, 3, done, r, world) for r in range(world)]
        batches = [b for plan in plans for b in plan if b]
        # The same grid whatever the number of ranks; finished batches skipped; no overlap;
        # the text grid starts afresh after the last (short) image batch.
        assert sorted(batches) == [[3, 4, 5], [6], [10, 11]]
    assert plan_batches(7, 5, 3, done, 5, 6) == [[]]  # a rank without work gets an empty batch
    assert plan_batches(3, 2, 2, None, 0, 1) == [[0, 1], [2], [3, 4]]
    assert plan_batches(0, 3, 2, None, 0, 1) == [[0, 1], [2]]


def test_plan_work_finds_first_occurrences(colls) -> None:
    coll = Collection(colls["dups"])
    plan = plan_work(coll, "question")
    assert (plan.num_images, plan.num_texts) == (len(set(DUP_IMAGES)), len(set(DUP_TEXTS)))
    texts = [coll.fields(p)["question"] for p in range(len(coll))]
    for p in range(len(coll)):
        i, t = int(plan.image_rep[p]), int(plan.text_rep[p])
        # Same content, and the earliest position holding it.
        assert coll.image_bytes(i) == coll.image_bytes(p)
        assert i == min(q for q in range(len(coll)) if DUP_IMAGES[q] == DUP_IMAGES[p])
        assert texts[t] == texts[p]
        assert t == texts.index(texts[p])
    assert plan.texts == [texts[p] for p in plan.text_positions]
    # Images first, then texts; each unit names its kind and representative position.
    assert plan.units[:, 0].tolist() == [0] * plan.num_images + [1] * plan.num_texts
    assert plan.units[: plan.num_images, 1].tolist() == sorted(set(plan.image_rep.tolist()))
    ref = plan_work(coll, "question", dedup=False)
    assert ref.num_units == 2 * len(coll) and not ref.dedup
    assert ref.texts == texts


def test_copy_from_representatives_matches_a_row_loop() -> None:
    rng = np.random.default_rng(3)
    n = 50
    rep = np.arange(n)
    for p in range(1, n):
        if rng.random() < 0.6:
            rep[p] = rep[rng.integers(0, p)]  # a representative: earlier and its own rep
    arr = rng.standard_normal((n, 6)).astype(np.float16)
    expected = arr.copy()
    for p in range(n):  # straightforward reference: one row at a time
        expected[p] = arr[rep[p]]
    copied = copy_from_representatives(arr, rep, chunk=7)  # several chunks
    assert copied == int(np.count_nonzero(rep != np.arange(n))) > 0
    assert np.array_equal(arr, expected)


# -- parity with direct encoding ---------------------------------------------------------------


def test_store_rows_equal_direct_encoding(colls, reference) -> None:
    store = FeatureStore(reference)
    coll = Collection(colls["vqa"])
    assert len(store) == N and store.dim == load_clip(TINY_CLIP).dim
    assert store.image.dtype == np.float16 and store.image.shape == (N, store.dim)
    assert not store.image.flags.writeable
    enc = load_clip(TINY_CLIP)
    with torch.no_grad():
        img = enc.encode_images([coll.image(p) for p in range(N)]).numpy()
        txt = enc.encode_texts([coll.fields(p)["question"] for p in range(N)]).numpy()
    np.testing.assert_allclose(store.image.astype(np.float32), img, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(store.text.astype(np.float32), txt, rtol=2e-3, atol=2e-3)
    m = store.manifest
    assert m["complete"] is True and m["num_rows"] == N and m["text_field"] == "question"
    assert m["model_name"] == TINY_CLIP and m["normalize"] is False and m["seed"] == 0
    assert m["collection_name"] == "toy-vqa"
    from leverlm.utils import sha256_file

    assert m["collection_manifest_sha256"] == sha256_file(colls["vqa"] / "manifest.json")
    # No scratch left behind.
    assert not partial_dir(reference).exists()
    assert not (reference / DONE).exists()


def test_caption_task_uses_the_caption_field_and_text_field_overrides(colls, tmp_path) -> None:
    coll = Collection(colls["caption"])
    enc = load_clip(TINY_CLIP)
    out = compute_features(colls["caption"], tmp_path / "cap", TINY_CLIP, batch_size=2)
    by_name = compute_features(
        colls["caption"], tmp_path / "name", TINY_CLIP, batch_size=2, text_field="file_name"
    )
    with torch.no_grad():
        caps = enc.encode_texts([coll.fields(p)["caption"] for p in range(len(coll))]).numpy()
        names = enc.encode_texts([coll.fields(p)["file_name"] for p in range(len(coll))]).numpy()
    np.testing.assert_allclose(FeatureStore(out).text, caps, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(FeatureStore(by_name).text, names, rtol=2e-3, atol=2e-3)
    assert FeatureStore(by_name).manifest["text_field"] == "file_name"


def test_default_location(colls) -> None:
    want = colls["vqa"].parent / "features" / "toy-vqa" / TINY_CLIP
    assert default_feature_dir(colls["vqa"], TINY_CLIP) == want
    # Model names with schemas or slashes stay one folder.
    odd = default_feature_dir(colls["vqa"], "hf-hub:org/model")
    assert odd.parent == want.parent and "/" not in odd.name and ":" not in odd.name
    out = compute_features(colls["vqa"], None, TINY_CLIP, batch_size=8)
    assert out == want and FeatureStore(out).complete


def test_normalize_flag_gives_unit_rows(colls, reference, tmp_path) -> None:
    out = compute_features(colls["vqa"], tmp_path / "unit", TINY_CLIP, batch_size=4, normalize=True)
    store = FeatureStore(out)
    assert store.normalized
    for arr in (store.image, store.text):
        norms = np.linalg.norm(arr.astype(np.float32), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    raw_img = FeatureStore(reference).image.astype(np.float32)
    assert np.abs(np.linalg.norm(raw_img, axis=1) - 1).max() > 1e-2  # raw rows are not unit
    unit = raw_img / np.linalg.norm(raw_img, axis=1, keepdims=True)
    np.testing.assert_allclose(store.image.astype(np.float32), unit, atol=2e-3)


# -- deduplication -------------------------------------------------------------------------------


def test_duplicates_are_encoded_once_and_copied_to_every_position(
    colls, dup_reference, encoder_calls, tmp_path
) -> None:
    coll = Collection(colls["dups"])
    n = len(coll)
    out = compute_features(colls["dups"], tmp_path / "store", TINY_CLIP, batch_size=2)
    # Each distinct image / text went through its tower once.
    assert encoder_calls == {"images": len(set(DUP_IMAGES)), "texts": len(set(DUP_TEXTS))}
    store = FeatureStore(out)
    m = store.manifest
    assert m["dedup"] is True and m["num_rows"] == n
    assert m["num_distinct_images"] == len({coll.image_bytes(p) for p in range(n)}) == 5
    assert m["num_distinct_texts"] == len({coll.fields(p)["question"] for p in range(n)}) == 3
    assert not (out / UNITS).exists() and not (out / DONE).exists()
    # Every position holds its own row, equal to encoding that position directly.
    enc = load_clip(TINY_CLIP)
    with torch.no_grad():
        img = enc.encode_images([coll.image(p) for p in range(n)]).numpy()
        txt = enc.encode_texts([coll.fields(p)["question"] for p in range(n)]).numpy()
    np.testing.assert_allclose(store.image.astype(np.float32), img, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(store.text.astype(np.float32), txt, rtol=2e-3, atol=2e-3)
    # Positions sharing an image (a text) have byte-identical rows; distinct ones differ.
    for a in range(n):
        for b in range(n):
            same_img = np.array_equal(store.image[a], store.image[b])
            same_txt = np.array_equal(store.text[a], store.text[b])
            assert same_img == (DUP_IMAGES[a] == DUP_IMAGES[b]), (a, b)
            assert same_txt == (DUP_TEXTS[a] == DUP_TEXTS[b]), (a, b)
    ref_img, ref_txt = _arrays(dup_reference)
    assert np.array_equal(store.image, ref_img) and np.array_equal(store.text, ref_txt)


def test_dedup_matches_the_every_row_reference_path(
    colls, dup_reference, encoder_calls, tmp_path
) -> None:
    out = compute_features(colls["dups"], tmp_path / "all", TINY_CLIP, batch_size=2, dedup=False)
    n = len(DUP_IMAGES)
    assert encoder_calls == {"images": n, "texts": n}
    store = FeatureStore(out)
    m = store.manifest
    assert m["dedup"] is False and m["num_distinct_images"] is None
    ref = FeatureStore(dup_reference)
    np.testing.assert_allclose(
        store.image.astype(np.float32), ref.image.astype(np.float32), rtol=2e-3, atol=2e-3
    )
    np.testing.assert_allclose(
        store.text.astype(np.float32), ref.text.astype(np.float32), rtol=2e-3, atol=2e-3
    )
    # Both hold the same features, so either satisfies the other's request.
    encoder_calls.update(images=0, texts=0)
    assert compute_features(colls["dups"], out, TINY_CLIP, batch_size=2) == out
    assert encoder_calls == {"images": 0, "texts": 0}


def test_dedup_resume_encodes_only_the_missing_units(
    colls, dup_reference, encoder_calls, tmp_path
) -> None:
    # bs 2: image units [0, 1], [2, 3], [4]; text units [5, 6], [7].
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="simulated crash"):
        compute_features(colls["dups"], out, TINY_CLIP, batch_size=2, callbacks=[_CrashAt(2)])
    scratch = partial_dir(out)
    assert np.load(scratch / DONE).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert np.load(scratch / UNITS).shape == (8, 2)
    encoder_calls.update(images=0, texts=0)
    compute_features(colls["dups"], out, TINY_CLIP, batch_size=2)
    assert encoder_calls == {"images": 1, "texts": 3}
    ref_img, ref_txt = _arrays(dup_reference)
    img, txt = _arrays(out)
    assert np.array_equal(img, ref_img) and np.array_equal(txt, ref_txt)  # byte-identical


def test_dedup_two_process_ddp_equals_one_process(colls, dup_reference, tmp_path) -> None:
    out = compute_features(
        colls["dups"],
        tmp_path / "ddp",
        TINY_CLIP,
        batch_size=2,
        devices=2,
        accelerator="cpu",
        strategy="ddp_fork",
    )
    ref_img, ref_txt = _arrays(dup_reference)
    img, txt = _arrays(out)
    assert np.array_equal(img, ref_img) and np.array_equal(txt, ref_txt)


def test_progress_bar_counts_work_units(colls, tmp_path, capsys) -> None:
    compute_features(colls["dups"], tmp_path / "bar", TINY_CLIP, batch_size=2, progress=True)
    err = capsys.readouterr().err
    # 5 distinct images + 3 distinct texts of 16 rows; 5 batches.
    assert "8/8" in err and "unit" in err
    assert "16/16" not in err and "5/5" not in err
    # A caller's own bar (of this class here) replaces the default one.
    bar = UnitProgressBar()
    compute_features(
        colls["dups"], tmp_path / "own", TINY_CLIP, batch_size=2, progress=True, callbacks=[bar]
    )
    assert "8/8" in capsys.readouterr().err


def test_a_store_of_format_version_1_is_still_read_and_reused(
    colls, dup_reference, encoder_calls, tmp_path
) -> None:
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(dup_reference, old)
    manifest = json.loads((old / MANIFEST).read_text())
    for key in ("dedup", "num_distinct_images", "num_distinct_texts"):
        del manifest[key]
    (old / MANIFEST).write_text(json.dumps({**manifest, "version": 1}))
    assert FeatureStore(old).complete
    assert compute_features(colls["dups"], old, TINY_CLIP, batch_size=2) == old
    assert encoder_calls == {"images": 0, "texts": 0}  # same features: nothing recomputed
    (old / MANIFEST).write_text(json.dumps({**manifest, "version": 3}))
    with pytest.raises(FeatureStoreError, match="version 3 is not supported"):
        FeatureStore(old)


def test_an_unfinished_build_of_format_version_1_is_restarted(colls, reference, tmp_path) -> None:
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="simulated crash"):
        compute_features(colls["vqa"], out, TINY_CLIP, batch_size=4, callbacks=[_CrashAt(1)])
    # Rewrite the scratch as version 1 left it: no units file, a done mask over rows, here
    # claiming everything is done. Trusting it would finalise zero rows.
    scratch = partial_dir(out)
    manifest = json.loads((scratch / MANIFEST).read_text())
    (scratch / MANIFEST).write_text(json.dumps({**manifest, "version": 1}))
    (scratch / UNITS).unlink()
    np.save(scratch / DONE, np.ones(N, np.uint8))
    count = _Count()
    compute_features(colls["vqa"], out, TINY_CLIP, batch_size=4, callbacks=[count])
    assert count.units == U
    ref_img, ref_txt = _arrays(reference)
    img, txt = _arrays(out)
    assert np.array_equal(img, ref_img) and np.array_equal(txt, ref_txt)


# -- resume --------------------------------------------------------------------------------------


def test_resume_after_a_crash_computes_each_row_once(colls, reference, tmp_path) -> None:
    out = tmp_path / "store"
    first = _Count()
    with pytest.raises(RuntimeError, match="simulated crash"):
        # A long sync interval: the rows of the finished batches are kept because the writer
        # flushes them (and marks them done) when the exception passes through.
        compute_features(
            colls["vqa"],
            out,
            TINY_CLIP,
            batch_size=4,
            callbacks=[first, _CrashAt(2)],
            sync_interval=1e9,
        )
    assert first.units == 8 and first.kinds == ["image", "image"]
    scratch = partial_dir(out)
    assert not out.exists() and scratch.is_dir()
    with pytest.raises(FeatureStoreError, match="incomplete"):
        FeatureStore(scratch)
    partial = FeatureStore(scratch, allow_incomplete=True)
    assert np.array_equal(partial.image[:8], FeatureStore(reference).image[:8])
    assert np.load(scratch / DONE).shape == (U,)
    assert np.count_nonzero(np.load(scratch / DONE)) == 8

    second = _Count()
    assert compute_features(colls["vqa"], out, TINY_CLIP, batch_size=4, callbacks=[second]) == out
    assert second.units == U - 8  # finished units are not recomputed
    ref_img, ref_txt = _arrays(reference)
    img, txt = _arrays(out)
    assert np.array_equal(img, ref_img) and np.array_equal(txt, ref_txt)  # byte-identical
    assert not scratch.exists()

    third = _Count()
    compute_features(colls["vqa"], out, TINY_CLIP, batch_size=4, callbacks=[third])
    assert third.batches == 0  # complete: nothing recomputed


class _KillAt(L.Callback):
    """SIGKILLs its own process before predict batch ``k``: no Python cleanup runs."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, *_):
        if batch_idx == self.k:
            os.kill(os.getpid(), signal.SIGKILL)


def _build_then_get_killed(collection: str, out: str, sync_interval: float) -> None:
    compute_features(
        collection,
        out,
        TINY_CLIP,
        batch_size=4,
        callbacks=[_KillAt(2)],
        sync_interval=sync_interval,
    )


@pytest.mark.parametrize(("sync_interval", "kept"), [(0.0, 8), (1e9, 0)])
def test_resume_after_kill_9(colls, reference, tmp_path, sync_interval, kept) -> None:
    # sync_interval 0 marks every batch done as soon as its rows are flushed; with a long
    # interval a killed job has marked nothing (its rows may be on disk, unmarked) and the
    # rerun recomputes everything; both give the uninterrupted arrays.
    out = tmp_path / "killed"
    # A forked child inherits the loaded modules, so this costs no interpreter start-up.
    proc = multiprocessing.get_context("fork").Process(
        target=_build_then_get_killed, args=(str(colls["vqa"]), str(out), sync_interval)
    )
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL
    assert not out.exists()
    assert np.count_nonzero(np.load(partial_dir(out) / DONE)) == kept
    count = _Count()
    compute_features(colls["vqa"], out, TINY_CLIP, batch_size=4, callbacks=[count])
    assert count.units == U - kept
    ref_img, ref_txt = _arrays(reference)
    img, txt = _arrays(out)
    assert np.array_equal(img, ref_img) and np.array_equal(txt, ref_txt)


# -- multi-process -----------------------------------------------------------------------------


def test_two_process_ddp_equals_one_process(colls, reference, tmp_path) -> None:
    # Fork-based DDP keeps the test fast; the subprocess launcher is tested through the CLI.
    out = compute_features(
        colls["vqa"],
        tmp_path / "ddp",
        TINY_CLIP,
        batch_size=4,
        devices=2,
        accelerator="cpu",
        strategy="ddp_fork",
    )
    ref_img, ref_txt = _arrays(reference)
    img, txt = _arrays(out)
    assert np.array_equal(img, ref_img) and np.array_equal(txt, ref_txt)


def test_ddp_resume_with_fewer_batches_than_ranks(colls, reference, tmp_path) -> None:
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="simulated crash"):
        compute_features(colls["vqa"], out, TINY_CLIP, batch_size=4, callbacks=[_CrashAt(7)])
    # One batch (text unit [25]) is left: rank 1 runs an empty batch and must not hang or write.
    assert np.count_nonzero(np.load(partial_dir(out) / DONE)) == U - 1
    compute_features(
        colls["vqa"],
        out,
        TINY_CLIP,
        batch_size=4,
        devices=2,
        accelerator="cpu",
        strategy="ddp_fork",
    )
    ref_img, ref_txt = _arrays(reference)
    img, txt = _arrays(out)
    assert np.array_equal(img, ref_img) and np.array_equal(txt, ref_txt)


@pytest.mark.slow
def test_cli_ddp_subprocess_launcher_equals_one_process(colls, reference, tmp_path) -> None:
    # The real multi-GPU launcher: every rank re-runs the command (and its input checks);
    # only rank 0 prepares and finalises the store.
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "leverlm.cli",
        "features",
        "--config",
        str(REPO / "conf" / "encoder" / "tiny-clip.yaml"),
        "--collection",
        str(colls["vqa"]),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--accelerator",
        "cpu",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    ref_img, ref_txt = _arrays(reference)
    img, txt = _arrays(out)
    assert np.array_equal(img, ref_img) and np.array_equal(txt, ref_txt)


# -- mismatches and bad input ------------------------------------------------------------------


def test_check_matches_detects_another_collection(colls, reference) -> None:
    store = FeatureStore(reference)
    store.check_matches(colls["vqa"])
    store.check_matches(Collection(colls["vqa"]))
    with pytest.raises(FeatureStoreError, match="toy-vqa-2"):
        store.check_matches(colls["other"])
    with pytest.raises(FeatureStoreError, match="built for collection 'toy-vqa'"):
        store.check_matches(Collection(colls["other"]))


def test_check_matches_refuses_an_incomplete_store(colls, tmp_path) -> None:
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="simulated crash"):
        compute_features(colls["vqa"], out, TINY_CLIP, batch_size=4, callbacks=[_CrashAt(1)])
    partial = FeatureStore(partial_dir(out), allow_incomplete=True)
    with pytest.raises(FeatureStoreError, match="incomplete"):
        partial.check_matches(colls["vqa"])


def test_other_inputs_need_overwrite_and_keep_the_old_store_until_done(colls, tmp_path) -> None:
    out = compute_features(colls["vqa"], tmp_path / "store", TINY_CLIP, batch_size=4)
    before = (out / "image.npy").read_bytes()
    with pytest.raises(FeatureStoreError, match="normalize: False != True"):
        compute_features(colls["vqa"], out, TINY_CLIP, batch_size=4, normalize=True)
    with pytest.raises(FeatureStoreError, match="collection_name"):
        compute_features(colls["other"], out, TINY_CLIP, batch_size=4)
    assert (out / "image.npy").read_bytes() == before  # untouched by the refusals
    # An interrupted overwrite leaves the old store whole and readable.
    with pytest.raises(RuntimeError, match="simulated crash"):
        compute_features(
            colls["vqa"],
            out,
            TINY_CLIP,
            batch_size=4,
            normalize=True,
            overwrite=True,
            callbacks=[_CrashAt(1)],
        )
    assert FeatureStore(out).complete and not FeatureStore(out).normalized
    assert (out / "image.npy").read_bytes() == before
    # A rerun of other inputs without --overwrite is refused because of the unfinished build.
    compute_features(colls["vqa"], out, TINY_CLIP, batch_size=4, normalize=True, overwrite=True)
    assert FeatureStore(out).normalized


def test_bad_pretrained_path_fails_before_anything_is_written(colls, tmp_path) -> None:
    out = tmp_path / "store"
    with pytest.raises(EncoderError, match="missing-weights.pt"):
        compute_features(
            colls["vqa"], out, TINY_CLIP, pretrained=str(tmp_path / "missing-weights.pt")
        )
    assert not out.exists() and not partial_dir(out).exists()


def test_bad_text_field_fails_before_anything_is_written(colls, tmp_path) -> None:
    out = tmp_path / "store"
    with pytest.raises(FeatureStoreError, match="'nope'.*missing"):
        compute_features(colls["vqa"], out, TINY_CLIP, text_field="nope")
    with pytest.raises(FeatureStoreError, match="'answers'.*not a string"):
        compute_features(colls["vqa"], out, TINY_CLIP, text_field="answers")
    assert not out.exists() and not partial_dir(out).exists()


def test_a_bad_text_field_in_a_later_sample_fails_before_anything_is_written(tmp_path) -> None:
    def records():
        for i, rec in enumerate(_vqa_records(6, 3)):
            if i == 4:
                rec = SampleRecord(rec.key, rec.image, rec.image_ext, {**rec.fields, "question": 7})
            yield rec

    coll = write_collection(tmp_path / "bad", records(), name="bad", task="vqa", split="train")
    out = tmp_path / "store"
    with pytest.raises(FeatureStoreError, match=r"'q3-0004' \(position 4\).*'question'"):
        compute_features(coll, out, TINY_CLIP)
    assert not out.exists() and not partial_dir(out).exists()


def test_refuses_to_replace_a_folder_that_is_not_a_store(colls, tmp_path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FeatureStoreError, match="not a feature store"):
            compute_features(colls["vqa"], out, TINY_CLIP, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "keep me"


def test_corrupt_store_files_are_named(reference, tmp_path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    np.save(bad / "text.npy", np.zeros((N - 1, 4), np.float16))
    with pytest.raises(FeatureStoreError, match=r"text.npy.*\(12, 4\)"):
        FeatureStore(bad)
    manifest = json.loads((bad / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(FeatureStoreError, match="not a leverlm-features manifest"):
        FeatureStore(bad)
    with pytest.raises(FeatureStoreError, match="not a feature store"):
        FeatureStore(tmp_path / "nothing")


# -- CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "conf" / "encoder").glob("*.yaml")))
def test_encoder_configs_parse(name, colls, tmp_path) -> None:
    from leverlm.encoders.job import _load_config

    parser = build_parser()
    data = _load_config(str(REPO / "conf" / "encoder" / name), parser)
    assert data["model_name"]
    parser.set_defaults(**data)
    args = parser.parse_args(["--collection", str(colls["vqa"])])
    assert args.model_name == data["model_name"]


def test_cli_runs_in_process_and_rejects_unknown_config_keys(colls, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    rc = features_main(
        ["--collection", str(colls["caption"]), "--out", str(out), "--model", TINY_CLIP]
        + ["--batch-size", "2", "--normalize", "--accelerator", "cpu", "--no-progress"]
    )
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    assert FeatureStore(out).normalized and len(FeatureStore(out)) == 5
    assert FeatureStore(out).manifest["dedup"] is True
    every = tmp_path / "every"
    rc = features_main(
        ["--collection", str(colls["caption"]), "--out", str(every), "--model", TINY_CLIP]
        + ["--batch-size", "2", "--no-dedup", "--accelerator", "cpu", "--no-progress"]
    )
    assert rc == 0 and FeatureStore(every).manifest["dedup"] is False
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rc = features_main(
            ["--collection", str(colls["caption"]), "--out", str(out), "--model", TINY_CLIP]
            + ["--batch-size", "2", "--normalize", "--cpu-threads", "1", "--no-progress"]
        )
        assert rc == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(SystemExit):
        features_main(
            ["--collection", str(colls["vqa"]), "--model", TINY_CLIP, "--cpu-threads", "0"]
        )
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name: leverlm-tiny-clip\nbatchsize: 3\n")
    with pytest.raises(SystemExit, match="batchsize"):
        features_main(["--config", str(bad), "--collection", str(colls["vqa"])])
    with pytest.raises(SystemExit):
        features_main(["--collection", str(colls["vqa"])])  # no --model
