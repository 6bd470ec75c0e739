"""Streaming positions: the same samples as random access, only the shards needed, and damaged
samples named by key and shard."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from helpers.collection_data import caption_records

from leverlm.data.collection import Collection, CollectionError, write_collection
from leverlm.data.pipeline import stream_positions


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "c"
    return write_collection(
        path, caption_records(23), name="c", task="caption", split="val", shard_samples=5
    )


def _same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "image"} == {
        k: v for k, v in b.items() if k != "image"
    } and a["image"].tobytes() == b["image"].tobytes()


@pytest.mark.parametrize("positions", [list(range(23)), [0, 4, 5, 11, 22], [7], []])
def test_streaming_equals_random_access(five_shards: Path, positions: list[int]) -> None:
    coll = Collection(five_shards)
    got = list(stream_positions(coll, positions))
    assert [s["position"] for s in got] == positions
    assert all(_same(s, coll[p]) for s, p in zip(got, positions, strict=True))


def test_only_the_shards_holding_the_positions_are_read(five_shards: Path, monkeypatch) -> None:
    import webdataset as wds

    read: list[str] = []
    original = wds.SimpleShardList

    def spy(urls, *a, **k):
        read.extend(urls)
        return original(urls, *a, **k)

    monkeypatch.setattr(wds, "SimpleShardList", spy)
    list(stream_positions(Collection(five_shards), [6, 8, 21]))
    assert [Path(u).name for u in read] == ["shard-000001.tar", "shard-000004.tar"]


def test_decode_false_keeps_bytes(five_shards: Path) -> None:
    coll = Collection(five_shards)
    (s,) = stream_positions(coll, [3], decode=False)
    assert s["image_bytes"] == coll.image_bytes(3) and "image" not in s


def test_positions_must_ascend(five_shards: Path) -> None:
    with pytest.raises(ValueError, match="ascending"):
        list(stream_positions(Collection(five_shards), [3, 1]))


def _rewrite_member(shard: Path, name: str, data: bytes) -> None:
    """Replace one tar member's bytes in place, keeping every size (and the index) valid."""
    with tarfile.open(shard) as tf:
        member = tf.getmember(name)
        offset, size = member.offset_data, member.size
    raw = bytearray(shard.read_bytes())
    raw[offset : offset + size] = data.ljust(size, b" ")[:size]
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("suffix", "data", "message"),
    [
        (".json", b"{not json", "its json fields cannot be read"),
        (".jpg", b"\xff\xd8\xff" + b"\x00" * 64, "the image cannot be decoded"),
    ],
)
def test_a_damaged_member_is_named_by_key_and_shard(tmp_path, suffix, data, message) -> None:
    path = write_collection(
        tmp_path / "c", caption_records(6), name="c", task="caption", split="v", shard_samples=3
    )
    shard = path / "shard-000001.tar"
    _rewrite_member(shard, "s-00004" + suffix, data)
    coll = Collection(path)
    for read in (lambda: list(stream_positions(coll, [3, 4, 5])), lambda: coll[4]):
        with pytest.raises(CollectionError, match=message) as info:
            read()
        assert "'s-00004'" in str(info.value) and "shard-000001.tar" in str(info.value)
    assert json.loads(json.dumps(coll.fields(3)))["caption"] == "caption 3"
