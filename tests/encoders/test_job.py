"""`leverlm features`: parity with direct encoding, deduplication, resume after a crash or a
kill -9, 2-process DDP, refusals, the store's manifest checks, the shipped configs."""

from __future__ import annotations

import io
import json
import multiprocessing
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image

from leverlm.cli import main as cli_main
from leverlm.data.collection import Collection, SampleRecord, write_collection
from leverlm.encoders import FeatureStore, FeatureStoreError
from leverlm.encoders.clip import TINY_CLIP, ClipEncoder, load_clip
from leverlm.encoders.job import FeatureDataModule, WorkPlan, read_units
from leverlm.encoders.store import MANIFEST
from leverlm.utils import sha256_file

# End-to-end runs of a job (subprocesses, DDP, kills): not in `make test-fast`.
pytestmark = pytest.mark.slow

TINY = ROOT / "conf" / "encoder" / "tiny-clip.yaml"
N = 13  # rows, all distinct; with batch size 4: image batches 0-3 of 4, 4, 4, 1 units, then
# text batches 4-7 likewise
# The collection with duplicates: position i shows image DUP_IMAGES[i] of a pool and asks
# question DUP_TEXTS[i] of a pool (5 distinct images, 3 distinct questions in 16 rows; with
# batch size 2: image batches 0-2, text batches 3-4).
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


def _run(collection: Path, out: Path, *extra: str, config: Path = TINY) -> int:
    """``leverlm features predict`` in this process (batch size 4, CPU, quiet)."""
    args = ["features", "predict", "--config", str(config), "--data.collection", str(collection)]
    args += ["--out", str(out), "--data.batch_size", "4", "--trainer.accelerator", "cpu"]
    args += ["--trainer.logger", "false", "--progress_bar", "false", *extra]
    return cli_main(args)


def _callback(name: str, **init_args) -> list[str]:
    spec = [{"class_path": f"helpers.callbacks.{name}", "init_args": init_args}]
    return ["--trainer.callbacks", json.dumps(spec)]


DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp_fork")


@pytest.fixture(scope="module")
def reference(colls, tmp_path_factory) -> Path:
    """One uninterrupted 1-process run on the vqa collection (batch size 4)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    assert _run(colls["vqa"], out) == 0
    return out


@pytest.fixture(scope="module")
def dup_reference(colls, tmp_path_factory) -> Path:
    """One uninterrupted 1-process run on the collection with duplicates (batch size 2)."""
    out = tmp_path_factory.mktemp("dupref") / "store"
    assert _run(colls["dups"], out, "--data.batch_size", "2") == 0
    return out


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


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    store = FeatureStore(path)
    return np.array(store.image), np.array(store.text)


def _same_arrays(a: Path, b: Path) -> bool:
    (ia, ta), (ib, tb) = _arrays(a), _arrays(b)
    return np.array_equal(ia, ib) and np.array_equal(ta, tb)


def _part_batches(out: Path) -> list[int]:
    return sorted(int(np.load(p)["batch"]) for p in (out / "parts").glob("rank*.npz"))


# -- the plan ----------------------------------------------------------------------------------


def test_the_grid_is_fixed_homogeneous_and_dealt_in_contiguous_blocks(colls) -> None:
    dm = FeatureDataModule(str(colls["vqa"]), batch_size=4)
    plan = dm.plan
    assert [(kind, start, stop) for kind, start, stop in plan.grid] == [
        *(("image", s, min(s + 4, N)) for s in range(0, N, 4)),
        *(("text", s, min(s + 4, N)) for s in range(0, N, 4)),
    ]
    for b in range(len(plan)):  # no batch mixes images and texts; each fills its positions
        batch = plan.batch(b)
        assert batch.kind == plan.grid[b][0] and batch.positions.tolist() == batch.units.tolist()
    dm.skip({0, 5})  # image batch 0 and text batch 1 finished
    todo = [1, 2, 3, 4, 6, 7]
    for world in (1, 2, 3, 6):
        shares = []
        for rank in range(world):
            dm.rank, dm.world_size = rank, world
            shares.append(dm.rank_batches)
        # The same batches whatever the number of ranks; finished ones skipped; no overlap;
        # each rank a contiguous block of the image batches and one of the text batches.
        assert sorted(b for share in shares for b in share) == todo
        for kind in ("image", "text"):
            todo_kind = [b for b in todo if plan.grid[b][0] == kind]
            blocks = [[b for b in share if plan.grid[b][0] == kind] for share in shares]
            assert [b for block in blocks for b in block] == todo_kind  # in order: contiguous
    dm.rank, dm.world_size = 5, 6
    assert dm.rank_batches == [3, 7]
    dm.rank = 0
    assert dm.rank_count == 0  # a rank without work runs an empty loop


def test_read_units_finds_first_occurrences_and_the_plan_fills_every_position(colls) -> None:
    coll = Collection(colls["dups"])
    n = len(coll)
    reps, texts = read_units(coll, "question", dedup=True)
    assert texts == [coll.fields(p)["question"] for p in range(n)]
    for p in range(n):
        i, t = int(reps["image"][p]), int(reps["text"][p])
        # Same content, and the earliest position holding it.
        assert coll.image_bytes(i) == coll.image_bytes(p)
        assert i == min(q for q in range(n) if DUP_IMAGES[q] == DUP_IMAGES[p])
        assert texts[t] == texts[p] and t == texts.index(texts[p])
    plan = WorkPlan(reps, texts, batch_size=2)
    assert plan.units["image"].size == len(set(DUP_IMAGES)) == 5
    assert plan.units["text"].size == len(set(DUP_TEXTS)) == 3
    assert [kind for kind, _, _ in plan.grid] == ["image"] * 3 + ["text"] * 2
    for kind in ("image", "text"):
        filled = np.full(n, -1)
        for b in range(len(plan)):
            batch = plan.batch(b)
            if batch.kind == kind:
                assert np.all(filled[batch.positions] == -1)  # each position once
                filled[batch.positions] = batch.units[batch.row]
        assert filled.tolist() == reps[kind].tolist()  # every position gets its unit's row
    every, _ = read_units(coll, "question", dedup=False)
    assert every["image"].tolist() == every["text"].tolist() == list(range(n))


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
    assert m["collection_name"] == "toy-vqa" and m["version"] == 2
    assert m["collection_manifest_sha256"] == sha256_file(colls["vqa"] / "manifest.json")
    # The run's header stays; its part files and no temp file are left behind.
    assert sorted(p.name for p in reference.iterdir()) == [
        "image.npy",
        "manifest.json",
        "run.json",
        "text.npy",
    ]
    header = json.loads((reference / "run.json").read_text())
    assert header["items"] == list(range(8)) and set(header["inputs"]) == {"collection"}


def test_caption_task_uses_the_caption_field_and_text_field_overrides(colls, tmp_path) -> None:
    coll = Collection(colls["caption"])
    enc = load_clip(TINY_CLIP)
    assert _run(colls["caption"], tmp_path / "cap", "--data.batch_size", "2") == 0
    by_name = tmp_path / "name"
    assert _run(colls["caption"], by_name, "--data.text_field", "file_name") == 0
    with torch.no_grad():
        caps = enc.encode_texts([coll.fields(p)["caption"] for p in range(len(coll))]).numpy()
        names = enc.encode_texts([coll.fields(p)["file_name"] for p in range(len(coll))]).numpy()
    np.testing.assert_allclose(FeatureStore(tmp_path / "cap").text, caps, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(FeatureStore(by_name).text, names, rtol=2e-3, atol=2e-3)
    assert FeatureStore(by_name).manifest["text_field"] == "file_name"


def test_normalize_gives_unit_rows(colls, reference, tmp_path) -> None:
    assert _run(colls["vqa"], tmp_path / "unit", "--model.normalize", "true") == 0
    store = FeatureStore(tmp_path / "unit")
    assert store.normalized
    for arr in (store.image, store.text):
        norms = np.linalg.norm(arr.astype(np.float32), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    raw_img = FeatureStore(reference).image.astype(np.float32)
    assert np.abs(np.linalg.norm(raw_img, axis=1) - 1).max() > 1e-2  # raw rows are not unit
    unit = raw_img / np.linalg.norm(raw_img, axis=1, keepdims=True)
    np.testing.assert_allclose(store.image.astype(np.float32), unit, atol=2e-3)


def test_a_pretrained_checkpoint_is_fingerprinted_by_content(colls, tmp_path) -> None:
    from leverlm.demo import clip_checkpoint

    ckpt = tmp_path / "clip.safetensors"
    shutil.copy(clip_checkpoint(), ckpt)
    out = tmp_path / "store"
    assert _run(colls["vqa"], out, "--model.pretrained", str(ckpt)) == 0
    m = FeatureStore(out).manifest
    assert m["checkpoint"] == str(ckpt) and m["checkpoint_sha256"] == sha256_file(ckpt)
    assert m["seed"] is None  # only a random init needs it
    inputs = json.loads((out / "run.json").read_text())["inputs"]
    assert set(inputs) == {"collection", "clip"}


# -- deduplication -------------------------------------------------------------------------------


def test_duplicates_are_encoded_once_and_copied_to_every_position(
    colls, dup_reference, encoder_calls, tmp_path
) -> None:
    coll = Collection(colls["dups"])
    n = len(coll)
    out = tmp_path / "store"
    assert _run(colls["dups"], out, "--data.batch_size", "2") == 0
    # Each distinct image / text went through its tower once.
    assert encoder_calls == {"images": len(set(DUP_IMAGES)), "texts": len(set(DUP_TEXTS))}
    store = FeatureStore(out)
    m = store.manifest
    assert m["dedup"] is True and m["num_rows"] == n
    assert m["num_distinct_images"] == len({coll.image_bytes(p) for p in range(n)}) == 5
    assert m["num_distinct_texts"] == len({coll.fields(p)["question"] for p in range(n)}) == 3
    assert not (out / "parts").exists()
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
    assert _same_arrays(out, dup_reference)


def test_dedup_matches_the_every_row_reference_path(
    colls, dup_reference, encoder_calls, tmp_path
) -> None:
    out = tmp_path / "all"
    assert _run(colls["dups"], out, "--data.batch_size", "2", "--data.dedup", "false") == 0
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


def test_dedup_two_process_ddp_equals_one_process(colls, dup_reference, tmp_path) -> None:
    # 2 ranks x 2 DataLoader workers, each streaming its own block of image batches.
    out = tmp_path / "ddp"
    assert _run(colls["dups"], out, "--data.batch_size", "2", "--data.num_workers", "2", *DDP) == 0
    assert _same_arrays(out, dup_reference)


def test_progress_bar_counts_batches(colls, tmp_path, capsys) -> None:
    out = tmp_path / "bar"
    assert _run(colls["dups"], out, "--data.batch_size", "2", "--progress_bar", "true") == 0
    err = capsys.readouterr().err
    # 5 distinct images + 3 distinct texts of 16 rows: 3 + 2 batches of 2 units.
    assert "features batch" in err and "5/5" in err
    assert "16/16" not in err and "8/8" not in err


def test_a_store_of_format_version_1_is_still_read_and_reused(
    colls, dup_reference, encoder_calls, tmp_path
) -> None:
    old = tmp_path / "v1"
    old.mkdir()
    for name in ("image.npy", "text.npy"):
        shutil.copy(dup_reference / name, old / name)
    manifest = json.loads((dup_reference / MANIFEST).read_text())
    for key in ("dedup", "num_distinct_images", "num_distinct_texts"):
        del manifest[key]
    (old / MANIFEST).write_text(json.dumps({**manifest, "version": 1}))
    assert FeatureStore(old).complete
    before = (old / MANIFEST).read_bytes()
    assert _run(colls["dups"], old, "--data.batch_size", "2") == 0
    assert encoder_calls == {"images": 0, "texts": 0}  # same features: nothing recomputed
    assert (old / MANIFEST).read_bytes() == before and _same_arrays(old, dup_reference)
    (old / MANIFEST).write_text(json.dumps({**manifest, "version": 3}))
    with pytest.raises(FeatureStoreError, match="version 3 is not supported"):
        FeatureStore(old)


# -- resume --------------------------------------------------------------------------------------


def test_resume_after_a_crash_encodes_each_batch_once(
    colls, reference, encoder_calls, tmp_path, caplog
) -> None:
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(colls["vqa"], out, *_callback("CrashAt", batch=2))
    assert encoder_calls == {"images": 8, "texts": 0}
    assert _part_batches(out) == [0, 1] and not (out / MANIFEST).exists()
    assert not (out / "run.lock").exists()  # released on the way out

    encoder_calls.update(images=0, texts=0)
    with caplog.at_level("INFO", logger="leverlm.features"):
        assert _run(colls["vqa"], out) == 0
    assert "skipped 2 batch" in caplog.text and "(resume)" in caplog.text
    assert encoder_calls == {"images": N - 8, "texts": N}  # finished batches are not redone
    assert _same_arrays(out, reference)  # byte-identical
    assert not (out / "parts").exists()

    encoder_calls.update(images=0, texts=0)
    assert _run(colls["vqa"], out) == 0
    assert encoder_calls == {"images": 0, "texts": 0}  # complete: nothing recomputed
    assert _same_arrays(out, reference)


def _run_then_get_killed(collection: str, out: str, batch: int) -> None:
    _run(Path(collection), Path(out), *_callback("KillAt", batch=batch))


@pytest.mark.parametrize(("batch", "devices"), [(2, 1), (5, 2)])
def test_resume_after_kill_9(colls, reference, encoder_calls, tmp_path, batch, devices) -> None:
    out = tmp_path / "killed"
    # A forked child inherits the loaded modules, so this costs no interpreter start-up.
    proc = multiprocessing.get_context("fork").Process(
        target=_run_then_get_killed, args=(str(colls["vqa"]), str(out), batch)
    )
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL
    assert _part_batches(out) == list(range(batch)) and not (out / MANIFEST).exists()
    # The rerun takes over the dead owner's lock and finishes, on 1 or 2 processes.
    assert _run(colls["vqa"], out, *(DDP if devices == 2 else ())) == 0
    if devices == 1:  # (the DDP ranks encode in child processes)
        done_images = 4 * batch
        assert encoder_calls == {"images": N - done_images, "texts": N}
    assert _same_arrays(out, reference)


def test_merge_command_finishes_a_run_whose_merge_did_not_happen(
    colls, reference, tmp_path, capsys
) -> None:
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(colls["vqa"], out, *_callback("CrashAt", batch=None))
    assert _part_batches(out) == list(range(8)) and not (out / MANIFEST).exists()
    assert cli_main(["features", "merge", "--out", str(out)]) == 0
    assert _same_arrays(out, reference) and not (out / "parts").exists()


def test_a_limited_run_is_unfinished_and_merge_names_the_missing_batches(
    colls, reference, tmp_path, capsys
) -> None:
    out = tmp_path / "store"
    assert _run(colls["vqa"], out, "--trainer.limit_predict_batches", "3") == 3
    assert re.search(r"error: 5 batch\w* of .* are not done yet", capsys.readouterr().err)
    assert cli_main(["features", "merge", "--out", str(out)]) == 2
    assert (
        "5 of 8 batches have no part file yet (first: [3, 4, 5, 6, 7])" in capsys.readouterr().err
    )
    assert not (out / MANIFEST).exists()
    assert _run(colls["vqa"], out) == 0 and _same_arrays(out, reference)


# -- multi-process -----------------------------------------------------------------------------


def test_two_process_ddp_equals_one_process(colls, reference, tmp_path) -> None:
    # Fork-based DDP keeps the test fast; the subprocess launcher is tested through the CLI.
    out = tmp_path / "ddp"
    assert _run(colls["vqa"], out, *DDP) == 0
    assert _same_arrays(out, reference)


def test_ddp_resume_with_fewer_batches_than_ranks(colls, reference, tmp_path) -> None:
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(colls["vqa"], out, *_callback("CrashAt", batch=7))
    # One batch (text units [12]) is left: rank 1 has nothing to do and must not hang or write.
    assert _part_batches(out) == list(range(7))
    assert _run(colls["vqa"], out, *DDP) == 0
    assert _same_arrays(out, reference)


@pytest.mark.slow
def test_cli_ddp_subprocess_launcher_equals_one_process(colls, reference, tmp_path) -> None:
    # The real multi-GPU launcher: every rank re-runs the command (and its input checks);
    # only rank 0 prepares the folder and merges.
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "leverlm.cli", "features", "predict", "--config", str(TINY)]
    cmd += ["--data.collection", str(colls["vqa"]), "--out", str(out), "--data.batch_size", "4"]
    cmd += ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    cmd += ["--progress_bar", "false", "--trainer.logger", "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"rank 1: skipped 0 batch\w* already done, 4 to do on this rank", proc.stderr)
    assert _same_arrays(out, reference)


# -- mismatches and bad input ------------------------------------------------------------------


def test_check_matches_detects_another_collection(colls, reference) -> None:
    store = FeatureStore(reference)
    store.check_matches(colls["vqa"])
    store.check_matches(Collection(colls["vqa"]))
    with pytest.raises(FeatureStoreError, match="toy-vqa-2"):
        store.check_matches(colls["other"])
    with pytest.raises(FeatureStoreError, match="built for collection 'toy-vqa'"):
        store.check_matches(Collection(colls["other"]))


def test_check_matches_refuses_an_incomplete_store(colls, reference, tmp_path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(reference, partial)
    manifest = json.loads((partial / MANIFEST).read_text())
    (partial / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(FeatureStoreError, match="incomplete"):
        FeatureStore(partial)
    with pytest.raises(FeatureStoreError, match="incomplete"):
        FeatureStore(partial, allow_incomplete=True).check_matches(colls["vqa"])


def test_other_inputs_need_overwrite_and_keep_the_old_store_until_done(
    colls, encoder_calls, tmp_path, capsys
) -> None:
    out = tmp_path / "store"
    assert _run(colls["vqa"], out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _run(colls["vqa"], out, "--model.normalize", "true") == 2
    assert "normalize: False != True" in capsys.readouterr().err
    assert _run(colls["other"], out) == 2
    assert "collection_name" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched by refusals
    # An interrupted overwrite leaves the old store whole and readable ...
    crash = _callback("CrashAt", batch=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(colls["vqa"], out, "--model.normalize", "true", "--overwrite", "true", *crash)
    assert FeatureStore(out).complete and not FeatureStore(out).normalized
    assert (out / "image.npy").read_bytes() == before["image.npy"]
    # ... until the same command (resumed without --overwrite: it is this folder's run now)
    # replaces it.
    assert _run(colls["vqa"], out, "--model.normalize", "true") == 0
    assert FeatureStore(out).normalized
    # --overwrite of a complete store of the same features encodes it again.
    encoder_calls.update(images=0, texts=0)
    assert _run(colls["vqa"], out, "--model.normalize", "true", "--overwrite", "true") == 0
    assert encoder_calls == {"images": N, "texts": N} and FeatureStore(out).normalized


def test_a_merge_killed_while_replacing_a_store_never_leaves_a_mix(
    colls, reference, tmp_path, monkeypatch
) -> None:
    import leverlm.encoders.job as job

    out = tmp_path / "store"
    shutil.copytree(reference, out)
    write_json = job.atomic_write_json

    def crash(path, obj):
        raise RuntimeError("simulated crash")

    # Killed after the new arrays went into place, before the new manifest was written: the
    # folder is not a store (rather than old rows under a new manifest, or the reverse).
    monkeypatch.setattr(job, "atomic_write_json", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(colls["vqa"], out, "--model.normalize", "true", "--overwrite", "true")
    with pytest.raises(FeatureStoreError, match="not a feature store"):
        FeatureStore(out)
    monkeypatch.setattr(job, "atomic_write_json", write_json)
    assert _run(colls["vqa"], out, "--model.normalize", "true") == 0  # the merge is redone
    normalized = tmp_path / "normalized"
    assert _run(colls["vqa"], normalized, "--model.normalize", "true") == 0
    assert FeatureStore(out).normalized and _same_arrays(out, normalized)


def test_bad_checkpoints_fail_before_anything_is_written(colls, tmp_path, capsys) -> None:
    out = tmp_path / "store"
    missing = tmp_path / "missing-weights.pt"
    assert _run(colls["vqa"], out, "--model.pretrained", str(missing)) == 2
    assert "missing-weights.pt" in capsys.readouterr().err
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10" + b"\x00" * 7 + b"{}not a checkpoint")
    assert _run(colls["vqa"], out, "--model.pretrained", str(garbage)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "garbage.safetensors' cannot be loaded" in err
    assert not out.exists()


def test_bad_text_field_fails_before_anything_is_written(colls, tmp_path, capsys) -> None:
    out = tmp_path / "store"
    assert _run(colls["vqa"], out, "--data.text_field", "nope") == 2
    assert re.search("'nope'.*missing", capsys.readouterr().err)
    assert _run(colls["vqa"], out, "--data.text_field", "answers") == 2
    assert re.search("'answers'.*not a string", capsys.readouterr().err)
    assert not out.exists()


def test_a_bad_text_field_in_a_later_sample_fails_before_anything_is_written(
    tmp_path, capsys
) -> None:
    def records():
        for i, rec in enumerate(_vqa_records(6, 3)):
            if i == 4:
                rec = SampleRecord(rec.key, rec.image, rec.image_ext, {**rec.fields, "question": 7})
            yield rec

    coll = write_collection(tmp_path / "bad", records(), name="bad", task="vqa", split="train")
    out = tmp_path / "store"
    assert _run(coll, out) == 2
    assert re.search(r"'q3-0004' \(position 4\).*'question'", capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_truncated_image_is_named_by_key_and_shard(tmp_path, capsys, workers) -> None:
    def records():
        for i, rec in enumerate(_vqa_records(6, 3)):
            if i == 4:
                rec = SampleRecord(rec.key, rec.image[: len(rec.image) // 2], "png", rec.fields)
            yield rec

    coll = write_collection(tmp_path / "bad", records(), name="bad", task="vqa", split="train")
    out = tmp_path / "store"
    assert _run(coll, out, "--data.num_workers", workers) == 2
    err = capsys.readouterr().err
    assert "sample 'q3-0004': the image cannot be decoded" in err and "shard-000000.tar" in err
    if workers == "0":  # (a DataLoader worker's error comes wrapped in its traceback)
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert not (out / MANIFEST).exists()


def test_refuses_to_write_into_a_folder_that_is_not_a_store(colls, tmp_path, capsys) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for overwrite in ("false", "true"):
        assert _run(colls["vqa"], out, "--overwrite", overwrite) == 2
        assert "not a feature store" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_corrupt_store_and_part_files_are_named(colls, reference, tmp_path, capsys) -> None:
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
    out = tmp_path / "parts"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(colls["vqa"], out, *_callback("CrashAt", batch=2))
    part = sorted((out / "parts").glob("rank*.npz"))[1]
    part.write_bytes(part.read_bytes()[:100])
    assert _run(colls["vqa"], out) == 2
    assert f"part file {part} is unreadable" in capsys.readouterr().err


# -- the command line and the shipped configs --------------------------------------------------


def test_cli_options_threads_and_refusals(colls, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _run(colls["caption"], out, "--data.dedup", "false", "--cpu_threads", "1") == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert FeatureStore(out).manifest["dedup"] is False and len(FeatureStore(out)) == 5
    assert _run(colls["vqa"], tmp_path / "t0", "--cpu_threads", "0") == 2
    assert "--cpu_threads=0 must be >= 1" in capsys.readouterr().err
    assert _run(colls["vqa"], tmp_path / "bs0", "--data.batch_size", "0") == 2
    assert "data.batch_size must be an int >= 1, got 0" in capsys.readouterr().err
    no_out = ["features", "predict", "--config", str(TINY), "--data.collection", str(colls["vqa"])]
    assert cli_main(no_out) == 2
    assert "no output folder: pass --out DIR" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  model_name: leverlm-tiny-clip\ndata:\n  batchsize: 3\n")
    with pytest.raises(SystemExit):
        _run(colls["vqa"], tmp_path / "x", config=bad)
    assert "batchsize" in capsys.readouterr().err
    bad.write_text("data:\n  batch_size: 3\n")  # no model.model_name
    with pytest.raises(SystemExit):
        _run(colls["vqa"], tmp_path / "x", config=bad)
    assert "model_name" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("t0", "bs0", "x"))


CONFIGS = sorted((ROOT / "conf" / "encoder").glob("*.yaml"))


@pytest.mark.parametrize(
    "config",
    [pytest.param(p, marks=[] if p == TINY else [pytest.mark.slow]) for p in CONFIGS],
    ids=lambda p: p.name,
)
def test_encoder_configs_run_as_written(config, tmp_path) -> None:
    """Each conf/encoder config runs as shipped; only the collection (and --out) are supplied.
    Without a checkpoint (``pretrained: null`` as shipped) open_clip initialises randomly."""
    coll = write_collection(
        tmp_path / "coll", _vqa_records(2, 4), name="two", task="vqa", split="train"
    )
    out = tmp_path / "store"
    args = ["features", "predict", "--config", str(config), "--data.collection", str(coll)]
    args += ["--out", str(out), "--trainer.logger", "false", "--progress_bar", "false"]
    if config == TINY:
        assert cli_main(args) == 0
    else:
        with pytest.warns(UserWarning, match="no checkpoint: random init"):
            assert cli_main(args) == 0
    import yaml

    shipped = yaml.safe_load(config.read_text())
    store = FeatureStore(out)
    assert store.manifest["model_name"] == shipped["model"]["model_name"] and len(store) == 2
    header = json.loads((out / "run.json").read_text())
    assert header["config"]["data"]["batch_size"] == shipped["data"]["batch_size"]
