"""Streaming a collection: small webdataset stages with an exact DDP / DataLoader-worker split.

The pipeline, per epoch and per (rank, worker) *slot*::

    shard list (optionally shuffled, same order on every slot) or resampled shard draws
      -> split_by_node -> split_by_worker     (shard level, when there are enough shards)
      -> tar samples (tolerant handler)
      -> position (from the collection's keys)
      -> sample-level split                   (when shards are fewer than slots)
      -> shuffle buffer -> decode

**Splitting.** With ``S = world_size * num_workers`` slots and slot ``rank * num_workers +
worker``: if the collection has at least ``S`` shards, whole shards are split (rank first, then
worker, as webdataset does): every slot reads only its own shards. With fewer shards than slots
a shard split would leave slots empty (and DDP ranks with nothing), so each slot instead reads
every shard and keeps the samples whose ``position % S == slot``: exact and balanced, at the
cost of each slot reading the (small) collection fully. Either way, without resampling the
union over all slots is every sample exactly once. ``split_level`` forces one or the other.

**Epochs.** Shuffling is seeded by ``(seed, epoch, rank, worker)``; call :meth:`set_epoch` each
epoch (DataLoader workers are re-forked per epoch, so the dataset object in the main process is
what they see). ``epoch_samples`` fixes the number of samples *per rank* per epoch (split over
workers), so every DDP rank runs the same number of steps; without resampling a slot's stream
is repeated (reshuffled) until its share is reached.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from leverlm.data.collection import Collection, CollectionError, make_sample

_META = frozenset({"__key__", "__url__", "__local_path__", "position", "json"})
SPLIT_LEVELS = ("auto", "shard", "sample")


def worker_info(
    rank: int | None = None, world_size: int | None = None
) -> tuple[int, int, int, int]:
    """``(rank, world_size, worker_id, num_workers)`` of the calling process.

    Explicit ``rank``/``world_size`` win; else an initialised ``torch.distributed``; else the
    ``RANK``/``WORLD_SIZE`` environment (set by torchrun/Lightning before the process group
    exists, and inherited by spawned DataLoader workers); else ``(0, 1)``. The worker part
    comes from ``torch.utils.data.get_worker_info()`` (``(0, 1)`` outside a worker).
    """
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    if rank is None or world_size is None:
        rank, world_size = 0, 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world_size, worker, num_workers


def _seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts``, stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# -- stages (plain generator functions: picklable, testable one by one) ------------------------


def shard_list(urls: list[str], rng: Any = None) -> Iterator[dict[str, str]]:
    """Each shard once, shuffled by ``rng`` if given (same rng on every slot -> same order)."""
    order = list(urls)
    if rng is not None:
        rng.shuffle(order)
    for url in order:
        yield {"url": url}


def resampled_shards(urls: list[str], rng: Any) -> Iterator[dict[str, str]]:
    """Endless shard draws with replacement."""
    while True:
        yield {"url": urls[rng.randrange(len(urls))]}


def split_by_node(src: Iterator[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Every ``world_size``-th item starting at ``rank``."""
    return islice(src, rank, None, world_size)


def split_by_worker(src: Iterator[Any], worker: int, num_workers: int) -> Iterator[Any]:
    """Every ``num_workers``-th item starting at ``worker``."""
    return islice(src, worker, None, num_workers)


def add_positions(
    src: Iterator[dict[str, Any]], position_of: Callable[[str], int], handler: Callable
) -> Iterator[dict[str, Any]]:
    """Attach each tar sample's position (looked up by its key in the collection index)."""
    for sample in src:
        try:
            sample["position"] = position_of(sample["__key__"])
        except Exception as exn:
            if handler(exn):
                continue
            raise
        yield sample


def split_samples(src: Iterator[dict[str, Any]], slot: int, num_slots: int) -> Iterator[dict]:
    """Keep the samples whose ``position % num_slots == slot``."""
    for sample in src:
        if sample["position"] % num_slots == slot:
            yield sample


def to_sample(src: Iterator[dict[str, Any]], decode: bool, handler: Callable) -> Iterator[dict]:
    """Raw tar sample -> the dict ``Collection[pos]`` returns (image decoded unless told not)."""
    for raw in src:
        try:
            images = [k for k in raw if k not in _META]
            if len(images) != 1 or "json" not in raw:
                raise CollectionError(
                    f"{raw.get('__url__')}: sample {raw.get('__key__')!r} has members "
                    f"{sorted(k for k in raw if not k.startswith('__'))}, expected one image + json"
                )
            yield make_sample(
                raw["__key__"], raw["position"], raw[images[0]], raw["json"], decode=decode
            )
        except Exception as exn:
            if handler(exn):
                continue
            raise


# -- the dataset ------------------------------------------------------------------------------


class CollectionStream(IterableDataset):
    """An IterableDataset over a collection; see the module docstring for split and epochs.

    Args:
        shuffle: shuffle-buffer size (0: stream in position order within each slot).
        resampled: draw shards with replacement, endlessly (pair with ``epoch_samples``).
        epoch_samples: samples per rank per epoch (split evenly over the DataLoader workers).
        decode: decode images to PIL RGB; False keeps the bytes under ``image_bytes``.
        split_by_node / split_by_worker: give each rank / worker a disjoint part.
        split_level: ``auto`` (shards if there are at least ranks*workers of them, else
            samples), ``shard`` or ``sample``.
        rank / world_size: explicit node split (tests, custom launchers); default: detected.
        handler: webdataset exception handler (default: warn and continue).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        shuffle: int = 0,
        resampled: bool = False,
        seed: int = 0,
        epoch_samples: int | None = None,
        decode: bool = True,
        split_by_node: bool = True,
        split_by_worker: bool = True,
        split_level: str = "auto",
        rank: int | None = None,
        world_size: int | None = None,
        handler: Callable[[Exception], bool] | None = None,
    ) -> None:
        super().__init__()
        if shuffle < 0:
            raise ValueError(f"shuffle must be >= 0, got {shuffle}")
        if epoch_samples is not None and epoch_samples < 1:
            raise ValueError(f"epoch_samples must be >= 1 or None, got {epoch_samples}")
        if split_level not in SPLIT_LEVELS:
            raise ValueError(f"split_level must be one of {SPLIT_LEVELS}, got {split_level!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        self.collection = Collection(path)
        self.path = self.collection.path
        self.urls = [str(p) for p in self.collection.shard_paths()]
        self.shuffle, self.resampled, self.seed = shuffle, resampled, seed
        self.epoch_samples, self.decode = epoch_samples, decode
        self.split_by_node, self.split_by_worker = split_by_node, split_by_worker
        self.split_level = split_level
        self.rank, self.world_size = rank, world_size
        self.handler = handler if handler is not None else wds.warn_and_continue
        self._epoch: int | None = None
        self._iterations = 0

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch used for seeding (otherwise: the count of ``iter()`` calls here)."""
        self._epoch = int(epoch)

    def slot(self) -> tuple[int, int, int, int]:
        """This process's ``(rank, world_size, worker, num_workers)`` after the split flags."""
        rank, world, worker, workers = worker_info(self.rank, self.world_size)
        if not self.split_by_node:
            rank, world = 0, 1
        if not self.split_by_worker:
            worker, workers = 0, 1
        return rank, world, worker, workers

    def level(self, num_slots: int) -> str:
        """The split level in effect for ``num_slots`` slots."""
        if self.split_level != "auto":
            return self.split_level
        return "shard" if len(self.urls) >= num_slots else "sample"

    def epoch_share(self, worker: int, num_workers: int) -> int | None:
        """Samples this worker yields per epoch: ``epoch_samples`` split over the workers."""
        if self.epoch_samples is None:
            return None
        base, extra = divmod(self.epoch_samples, num_workers)
        return base + (1 if worker < extra else 0)

    def _pipeline(self, epoch: int, repeat: int) -> wds.DataPipeline:
        import random

        rank, world, worker, workers = self.slot()
        num_slots, slot = world * workers, rank * workers + worker
        level = self.level(num_slots)
        stages: list[Any] = []
        if self.resampled:
            rng = random.Random(_seed("shards", self.seed, epoch, repeat, rank, worker))
            stages.append(lambda: resampled_shards(self.urls, rng))
        else:
            # One shard order for all slots (seeded without rank/worker), so the split below is
            # still a partition.
            rng = random.Random(_seed("order", self.seed, epoch, repeat)) if self.shuffle else None
            stages.append(lambda: shard_list(self.urls, rng))
            if level == "shard":
                stages.append(lambda src: split_by_node(src, rank, world))
                stages.append(lambda src: split_by_worker(src, worker, workers))
        stages.append(wds.tarfile_to_samples(handler=self.handler))
        stages.append(lambda src: add_positions(src, self.collection.position_of, self.handler))
        if level == "sample" and num_slots > 1:
            stages.append(lambda src: split_samples(src, slot, num_slots))
        if self.shuffle:
            buf_rng = random.Random(_seed("buffer", self.seed, epoch, repeat, rank, worker))
            stages.append(wds.shuffle(self.shuffle, initial=self.shuffle, rng=buf_rng))
        stages.append(lambda src: to_sample(src, self.decode, self.handler))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self._epoch if self._epoch is not None else self._iterations
        self._iterations += 1
        _, world, worker, workers = self.slot()
        share = self.epoch_share(worker, workers)
        num_slots = world * workers
        starved = self.level(num_slots) == "sample" and len(self.collection) < num_slots
        if starved and (share or self.resampled):
            raise CollectionError(
                f"{self.path}: {len(self.collection)} samples cannot feed {num_slots} "
                "rank*worker slots with a fixed epoch length or resampling"
            )
        if share is None:
            yield from self._pipeline(epoch, 0)
            return
        if share == 0:
            return
        if self.resampled:
            yield from islice(self._pipeline(epoch, 0), share)
            return
        done, repeat = 0, 0
        while True:
            got = 0
            for sample in self._pipeline(epoch, repeat):
                yield sample
                done += 1
                got += 1
                if done >= share:
                    return
            if got == 0:
                raise CollectionError(f"{self.path}: no samples for this rank/worker slot")
            repeat += 1


def stream_collection(
    path: str | os.PathLike | Path,
    *,
    shuffle: int = 0,
    resampled: bool = False,
    seed: int = 0,
    epoch_samples: int | None = None,
    decode: bool = True,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    split_level: str = "auto",
    rank: int | None = None,
    world_size: int | None = None,
    handler: Callable[[Exception], bool] | None = None,
) -> CollectionStream:
    """Stream a collection's samples (same dicts as ``Collection[pos]``); see CollectionStream."""
    return CollectionStream(
        path,
        shuffle=shuffle,
        resampled=resampled,
        seed=seed,
        epoch_samples=epoch_samples,
        decode=decode,
        split_by_node=split_by_node,
        split_by_worker=split_by_worker,
        split_level=split_level,
        rank=rank,
        world_size=world_size,
        handler=handler,
    )
