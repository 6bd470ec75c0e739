"""Streaming a collection's shards with webdataset: the jobs that walk a collection in order.

The jobs deal their work to DDP ranks and DataLoader workers themselves (fixed groups of
positions, so results never depend on the split); a worker then reads the samples of its
positions by streaming, in order, only the shards that hold them::

    the shards holding the positions -> tar samples -> keep the wanted keys -> decode

Sequential reads of whole shards suit walks over most of a collection (features, eval
queries). Sparse subsets (gt anchors, a query limit, ICDs and candidates fetched by position)
use the collection's random access (:meth:`leverlm.data.collection.Collection.sample`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from leverlm.data.collection import Collection, CollectionError, make_sample

_META = frozenset({"__key__", "__url__", "__local_path__", "json"})


def _raise(exn: Exception) -> bool:
    """webdataset handler: a damaged shard is an error, never silently skipped."""
    raise exn


def stream_positions(
    collection: Collection, positions: Sequence[int], decode: bool = True
) -> Iterator[dict[str, Any]]:
    """The samples at ``positions`` (ascending), in that order, read by streaming their shards.

    Yields the dicts ``Collection[pos]`` returns. A sample that cannot be read or decoded
    raises :class:`CollectionError` naming its key and shard.
    """
    import webdataset as wds

    positions = [int(p) for p in positions]
    if any(b <= a for a, b in zip(positions, positions[1:], strict=False)):
        raise ValueError("positions must be strictly ascending")
    if not positions:
        return
    keys = collection.keys
    wanted = {keys[p]: p for p in positions}
    shards = sorted({int(s) for s in collection.index["shard"][positions]})
    urls = [str(collection.shard_paths()[s]) for s in shards]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=_raise),
        wds.select(lambda raw: raw["__key__"] in wanted),
    )
    expected = iter(positions)
    try:
        for raw in pipeline:
            key, url = raw["__key__"], raw.get("__url__")
            pos = wanted[key]
            if pos != next(expected, None):
                raise CollectionError(f"{url}: sample {key!r} is out of position order")
            members = [k for k in raw if k not in _META]
            if len(members) != 1 or "json" not in raw:
                raise CollectionError(
                    f"{url}: sample {key!r} has members {sorted(members)}, expected one image + json"
                )
            yield make_sample(key, pos, raw[members[0]], raw["json"], decode, where=url)
    except (OSError, ValueError) as err:
        if isinstance(err, CollectionError):
            raise
        raise CollectionError(f"{collection.path}: cannot read its shards ({err})") from err
    missing = next(expected, None)
    if missing is not None:
        raise CollectionError(
            f"{collection.path}: sample {keys[missing]!r} (position {missing}) is missing "
            "from its shard"
        )
