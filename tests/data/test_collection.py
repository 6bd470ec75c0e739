"""Collections: writing (atomic, validated, deterministic), random access, process safety."""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers.collection_data import caption_records, jpeg_bytes, leftovers

from leverlm.data.collection import (
    Collection,
    CollectionError,
    CollectionWriter,
    SampleRecord,
    ustar_header,
    write_collection,
)


def _write(path: Path, n: int = 10, **kw) -> Path:
    kw.setdefault("shard_samples", 4)
    return write_collection(
        path, caption_records(n), name=path.name, task="caption", split="val", **kw
    )


def test_roundtrip_every_position(tmp_path: Path) -> None:
    records = caption_records(11)
    path = write_collection(
        tmp_path / "c", records, name="c", task="caption", split="val", shard_samples=4
    )
    col = Collection(path)
    assert (len(col), col.name, col.task, col.split) == (11, "c", "caption", "val")
    assert [s["num_samples"] for s in col.manifest["shards"]] == [4, 4, 3]
    assert col.keys == [r.key for r in records]
    for pos, rec in enumerate(records):
        sample = col[pos]
        assert sample["__key__"] == rec.key and sample["position"] == pos
        assert {k: v for k, v in sample.items() if k not in ("__key__", "position", "image")} == (
            rec.fields
        )
        assert col.fields(pos) == rec.fields
        assert col.image_bytes(pos) == rec.image
        assert sample["image"].mode == "RGB" and sample["image"].size == (12, 10)
        assert col.position_of(rec.key) == pos


def test_index_offsets_match_tarfile_members(tmp_path: Path) -> None:
    col = Collection(_write(tmp_path / "c", 9))
    index = col.index
    for shard_id, shard in enumerate(col.shard_paths()):
        with tarfile.open(shard) as tf:
            members = tf.getmembers()
        rows = index[index["shard"] == shard_id]
        assert len(members) == 2 * len(rows)
        for row, (img, js) in zip(rows, zip(members[::2], members[1::2])):
            assert img.name.endswith(".jpg") and js.name.endswith(".json")
            assert (row["image_offset"], row["image_size"]) == (img.offset_data, img.size)
            assert (row["json_offset"], row["json_size"]) == (js.offset_data, js.size)


def test_fast_tar_writer_matches_tarfile_reference(tmp_path: Path) -> None:
    records = caption_records(7)
    a = write_collection(
        tmp_path / "a", records, name="x", task="caption", split="v", shard_samples=3
    )
    with CollectionWriter(
        tmp_path / "b", name="x", task="caption", split="v", shard_samples=3, reference_tar=True
    ) as writer:
        for rec in records:
            writer.add(rec)
        b = writer.commit()
    for name in [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
        "index.npy",
        "keys.txt",
    ]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name, size in [("a.jpg", 0), ("k-1.json", 511), ("x" * 95 + ".jpg", 8**11 - 1)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
        assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_same_input_gives_identical_bytes(tmp_path: Path) -> None:
    a, b = _write(tmp_path / "a"), _write(tmp_path / "b")
    for f in sorted(p.name for p in a.iterdir()):
        if f != "manifest.json":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    ma.pop("name"), mb.pop("name")
    assert ma == mb


def test_shard_bytes_limit(tmp_path: Path) -> None:
    image_size = len(caption_records(1)[0].image)
    limit = 2 * (image_size + 2048) + 2048  # room for two samples, not three
    col = Collection(_write(tmp_path / "c", 7, shard_samples=100, shard_bytes=limit))
    counts = [s["num_samples"] for s in col.manifest["shards"]]
    assert sum(counts) == 7 and max(counts) <= 2 and len(counts) >= 4
    for shard in col.manifest["shards"]:
        # the tar end-of-archive record padding is the only thing allowed past the limit
        assert shard["size"] <= limit + 10240
    assert [col.fields(i)["image_id"] for i in range(7)] == list(range(1000, 1007))


@pytest.mark.parametrize(
    "record, message",
    [
        (SampleRecord("bad.key", b"x", "jpg", {}), "invalid sample key"),
        (SampleRecord("a/b", b"x", "jpg", {}), "invalid sample key"),
        (SampleRecord("ok", b"x", "JPG!", {}), "invalid image extension"),
        (SampleRecord("ok", b"", "jpg", {}), "non-empty bytes"),
        (
            SampleRecord("ok", b"x", "jpg", {"image_id": 1, "file_name": "f", "captions": []}),
            r"needs field\(s\) \['caption'\]",
        ),
        (
            SampleRecord(
                "ok",
                b"x",
                "jpg",
                {"image_id": 1, "file_name": "f", "captions": [], "caption": "", "position": 3},
            ),
            "reserved field",
        ),
        (
            SampleRecord(
                "ok",
                b"x",
                "jpg",
                {"image_id": {1}, "file_name": "f", "captions": [], "caption": ""},
            ),
            "not JSON-serialisable",
        ),
    ],
)
def test_bad_records_rejected_and_nothing_left(tmp_path: Path, record, message) -> None:
    with pytest.raises(CollectionError, match=message):
        write_collection(tmp_path / "c", [record], name="c", task="caption", split="v")
    assert leftovers(tmp_path) == []


def test_duplicate_key_and_changing_fields_rejected(tmp_path: Path) -> None:
    recs = caption_records(3)
    with pytest.raises(CollectionError, match="duplicate sample key 's-00000'"):
        write_collection(tmp_path / "c", [*recs, recs[0]], name="c", task="caption", split="v")
    extra = SampleRecord("z", recs[0].image, "jpg", {**recs[0].fields, "extra": 1})
    with pytest.raises(CollectionError, match="differ from the collection's"):
        write_collection(tmp_path / "c", [recs[0], extra], name="c", task="caption", split="v")
    assert leftovers(tmp_path) == []


def test_error_in_record_iterator_leaves_nothing(tmp_path: Path) -> None:
    def records():
        yield from caption_records(5)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_collection(
            tmp_path / "c", records(), name="c", task="caption", split="v", shard_samples=2
        )
    assert leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    path = _write(tmp_path / "c", 3)
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(CollectionError, match="already exists"):
        _write(tmp_path / "c", 5)
    assert (path / "manifest.json").read_bytes() == before
    _write(tmp_path / "c", 5, overwrite=True)
    assert len(Collection(path)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no .old / .tmp folders


def test_empty_collection_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CollectionError, match="would be empty"):
        write_collection(tmp_path / "c", [], name="c", task="caption", split="v")
    assert leftovers(tmp_path) == []


def test_incomplete_folders_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(CollectionError, match="no such folder"):
        Collection(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(CollectionError, match="manifest.json is missing"):
        Collection(tmp_path / "half")

    path = _write(tmp_path / "c", 9)
    shard = path / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-512])
    with pytest.raises(CollectionError, match="shard-000001.tar: size"):
        Collection(path)
    shard.unlink()
    with pytest.raises(CollectionError, match="shard shard-000001.tar missing"):
        Collection(path)
    shard.write_bytes(data)
    (path / "keys.txt").unlink()
    with pytest.raises(CollectionError, match="keys.txt missing"):
        Collection(path)


def test_verify_detects_changed_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path / "c", 5)
    Collection(path).verify()
    shard = path / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CollectionError, match="shard-000000.tar: its content does not match"):
        Collection(path).verify()


def test_verify_reads_a_verified_file_once(tmp_path: Path, monkeypatch) -> None:
    import leverlm.data.collection as collection

    path = _write(tmp_path / "c", 5)
    read: list[str] = []
    real = collection.sha256_file
    monkeypatch.setattr(collection, "sha256_file", lambda p: read.append(Path(p).name) or real(p))
    Collection(path).verify()
    first = len(read)
    Collection(path).verify()
    assert first > 0 and len(read) == first  # every file's stamp still matches
    shard = path / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))  # a new mtime: read again, and caught
    with pytest.raises(CollectionError, match="shard-000000.tar"):
        Collection(path).verify()


def test_bad_positions_and_keys(tmp_path: Path) -> None:
    col = Collection(_write(tmp_path / "c", 3))
    for bad in (3, -1, 100):
        with pytest.raises(IndexError, match=f"position {bad} out of range"):
            col[bad]
    with pytest.raises(TypeError):
        col["0"]  # type: ignore[index]
    with pytest.raises(KeyError, match="'missing'"):
        col.position_of("missing")
    assert col[np.int64(2)]["position"] == 2


def test_threads_share_a_collection(tmp_path: Path) -> None:
    col = Collection(_write(tmp_path / "c", 12, shard_samples=5))
    expected = [col.image_bytes(i) for i in range(12)]
    col.close()
    order = [i % 12 for i in range(240)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(col.image_bytes, order))
    assert got == [expected[i] for i in order]


def _child_reads(col: Collection, queue) -> None:
    import os

    data = [col.image_bytes(i) for i in range(len(col))]
    queue.put((data, col._pid == os.getpid(), col.fields(1)))


def test_fork_and_pickle_reopen_files(tmp_path: Path) -> None:
    col = Collection(_write(tmp_path / "c", 6, shard_samples=2))
    expected = [col.image_bytes(i) for i in range(6)]  # parent has descriptors open now
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_reads, args=(col, queue))
    proc.start()
    data, reopened, fields = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0 and reopened and data == expected
    assert fields == col.fields(1)
    clone = pickle.loads(pickle.dumps(col))
    assert clone._fds == {} and [clone.image_bytes(i) for i in range(6)] == expected


def test_dataloader_workers_random_access(tmp_path: Path) -> None:
    import torch.utils.data as tud

    col = Collection(_write(tmp_path / "c", 10, shard_samples=3))
    col[0]  # open a descriptor in the parent before the workers fork

    class Fields(tud.Dataset):
        def __len__(self) -> int:
            return len(col)

        def __getitem__(self, i: int) -> int:
            return col.fields(i)["image_id"]

    loader = tud.DataLoader(Fields(), batch_size=None, num_workers=2)
    assert list(loader) == list(range(1000, 1010))


def test_images_decode_to_rgb(tmp_path: Path) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (5, 4), 200).save(buf, format="PNG")
    rec = SampleRecord(
        "grey",
        buf.getvalue(),
        "png",
        {"image_id": 1, "file_name": "g.png", "captions": ["g"], "caption": "g"},
    )
    other = SampleRecord("rgb", jpeg_bytes(3), "jpg", rec.fields)
    col = Collection(
        write_collection(tmp_path / "c", [rec, other], name="c", task="caption", split="v")
    )
    image = col[0]["image"]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (200, 200, 200)
    assert col.image_bytes(0) == buf.getvalue()


def test_stale_temp_folders_of_dead_writers_are_reclaimed(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale, live, foreign = (tmp_path / f".c.tmp-{n}" for n in ("dead", "live", "other"))
    for folder, owner in ((stale, f"{host} {dead.pid}"), (live, f"{host} {os.getpid()}")):
        folder.mkdir()
        (folder / ".owner").write_text(owner)
        (folder / "shard-000000.tar").write_bytes(b"partial")
    foreign.mkdir()
    (foreign / ".owner").write_text(f"{host}-elsewhere {dead.pid}")
    path = _write(tmp_path / "c", 3)
    assert not stale.exists()
    assert live.exists() and foreign.exists()  # a running writer / another host: untouched
    assert not (path / ".owner").exists()
    assert sorted(p.name for p in path.iterdir()) == [
        "index.npy",
        "keys.txt",
        "manifest.json",
        "shard-000000.tar",
    ]


def test_all_fields(tmp_path: Path) -> None:
    col = Collection(_write(tmp_path / "c", 6))
    assert col.all_fields() == [r.fields for r in caption_records(6)]
