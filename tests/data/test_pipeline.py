"""Streaming: same samples as random access, exact DDP x worker split, seeded shuffles, epochs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch.utils.data as tud
from helpers.collection_data import caption_records

from leverlm.data.collection import Collection, CollectionError, write_collection
from leverlm.data.pipeline import stream_collection, worker_info


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "c"
    return write_collection(
        path, caption_records(23), name="c", task="caption", split="val", shard_samples=5
    )


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "c2"
    return write_collection(
        path, caption_records(13), name="c2", task="caption", split="val", shard_samples=7
    )


def _keys(dataset, num_workers: int = 0) -> list[str]:
    loader = tud.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [s["__key__"] for s in loader]


def test_streaming_equals_random_access(five_shards: Path) -> None:
    col = Collection(five_shards)
    streamed = list(stream_collection(five_shards))
    assert [s["position"] for s in streamed] == list(range(len(col)))
    for sample in streamed:
        ref = col[sample["position"]]
        assert sample.keys() == ref.keys()
        for k, v in ref.items():
            if k == "image":
                assert sample[k].mode == "RGB"
                assert np.array_equal(np.asarray(sample[k]), np.asarray(v))
            else:
                assert sample[k] == v, k


def test_decode_false_keeps_bytes(two_shards: Path) -> None:
    col = Collection(two_shards)
    for sample in stream_collection(two_shards, decode=False):
        assert "image" not in sample
        assert sample["image_bytes"] == col.image_bytes(sample["position"])


@pytest.mark.parametrize("fixture, level", [("five_shards", "shard"), ("two_shards", "sample")])
def test_two_ranks_two_workers_cover_every_key_once(request, fixture: str, level: str) -> None:
    path: Path = request.getfixturevalue(fixture)
    per_rank = []
    for rank in range(2):
        ds = stream_collection(path, rank=rank, world_size=2, decode=False)
        assert ds.level(4) == level
        per_rank.append(_keys(ds, num_workers=2))
    everything = Counter(per_rank[0] + per_rank[1])
    assert sorted(everything) == Collection(path).keys
    assert set(everything.values()) == {1}
    assert all(per_rank)  # no rank left empty
    if level == "sample":  # balanced: 13 samples over 4 slots -> 4+3 / 3+3
        assert sorted(len(k) for k in per_rank) == [6, 7]


def test_forced_sample_split_is_exact_with_many_shards(five_shards: Path) -> None:
    keys = []
    for rank in range(3):
        ds = stream_collection(five_shards, rank=rank, world_size=3, split_level="sample")
        got = [s["position"] for s in ds]
        assert all(p % 3 == rank for p in got)
        keys += got
    assert sorted(keys) == list(range(23))


def test_split_flags_off_give_everything_to_each(two_shards: Path) -> None:
    ds = stream_collection(two_shards, rank=1, world_size=2, split_by_node=False, decode=False)
    assert _keys(ds) == Collection(two_shards).keys


def test_shuffle_is_seeded_per_epoch(five_shards: Path) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        ds = stream_collection(five_shards, shuffle=8, seed=seed, decode=False)
        ds.set_epoch(epoch)
        return [s["position"] for s in ds]

    a = order(0, 0)
    assert sorted(a) == list(range(23)) and a != list(range(23))
    assert order(0, 0) == a
    assert order(0, 1) != a and order(1, 0) != a
    # without set_epoch, successive iterations are successive epochs
    ds = stream_collection(five_shards, shuffle=8, decode=False)
    first, second = ([s["position"] for s in ds] for _ in range(2))
    assert first == a and second == order(0, 1)


def test_shuffled_split_is_still_a_partition(five_shards: Path) -> None:
    seen = []
    for rank in range(2):
        ds = stream_collection(five_shards, shuffle=4, seed=3, rank=rank, world_size=2)
        ds.set_epoch(5)
        seen += _keys(ds, num_workers=2)
    assert sorted(seen) == Collection(five_shards).keys


@pytest.mark.parametrize("resampled", [True, False])
def test_epoch_samples_equal_per_rank(two_shards: Path, resampled: bool) -> None:
    col = Collection(two_shards)
    counts = []
    for rank in range(2):
        ds = stream_collection(
            two_shards, resampled=resampled, epoch_samples=11, rank=rank, world_size=2, decode=False
        )
        keys = _keys(ds, num_workers=2)
        counts.append(len(keys))
        assert set(keys) <= set(col.keys)
        if not resampled:
            # 11 > this rank's 6-7 samples: its stream is repeated to fill the epoch
            assert max(Counter(keys).values()) >= 2
    assert counts == [11, 11]


def test_resampled_draws_differ_per_slot_and_are_seeded(five_shards: Path) -> None:
    def draw(rank: int, seed: int = 0) -> list[int]:
        ds = stream_collection(
            five_shards, resampled=True, epoch_samples=30, seed=seed, rank=rank, world_size=2
        )
        return [s["position"] for s in ds]

    assert draw(0) == draw(0)
    assert draw(0) != draw(1) and draw(0) != draw(0, seed=1)
    assert len(draw(1)) == 30


def test_too_small_collection_for_fixed_epochs(two_shards: Path) -> None:
    ds = stream_collection(two_shards, epoch_samples=4, rank=0, world_size=20)
    with pytest.raises(CollectionError, match="13 samples cannot feed 20"):
        list(ds)
    # a plain pass is fine: slots beyond the samples are simply empty
    assert [s["position"] for s in stream_collection(two_shards, rank=15, world_size=20)] == []
    assert [s["position"] for s in stream_collection(two_shards, rank=4, world_size=20)] == [4]


def test_worker_info_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_info(1, 4) == (1, 4, 0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert worker_info() == (2, 3, 0, 1)
    monkeypatch.delenv("RANK")
    assert worker_info() == (0, 1, 0, 1)
    with pytest.raises(ValueError, match="invalid rank 4"):
        worker_info(4, 4)
    with pytest.raises(ValueError, match="both"):
        worker_info(rank=1)


def test_worker_info_inside_dataloader_workers() -> None:
    class Info(tud.IterableDataset):
        def __iter__(self):
            yield worker_info(1, 2)

    got = sorted(tuple(t) for t in tud.DataLoader(Info(), batch_size=None, num_workers=2))
    assert got == [(1, 2, 0, 2), (1, 2, 1, 2)]


def test_corrupt_shard_tolerated_or_raised(tmp_path: Path) -> None:
    path = write_collection(
        tmp_path / "c", caption_records(6), name="c", task="caption", split="v", shard_samples=3
    )
    shard = path / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[1536 + 40 : 1536 + 60] = b"\xff" * 20  # inside the first sample's json
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning):
        got = [s["position"] for s in stream_collection(path)]
    assert 0 not in got and got[-3:] == [3, 4, 5]

    def reraise(exn: Exception) -> bool:
        raise exn

    with pytest.raises(Exception):  # noqa: B017 - whatever the decoder raises must surface
        list(stream_collection(path, handler=reraise))


def test_bad_arguments(two_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shuffle"):
        stream_collection(two_shards, shuffle=-1)
    with pytest.raises(ValueError, match="split_level"):
        stream_collection(two_shards, split_level="rows")
    with pytest.raises(ValueError, match="epoch_samples"):
        stream_collection(two_shards, epoch_samples=0)
    with pytest.raises(CollectionError, match="manifest.json is missing"):
        (tmp_path / "x").mkdir()
        stream_collection(tmp_path / "x")
