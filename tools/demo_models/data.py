"""easy-vqa collections held in memory for training, and the episode sampler.

The demo models train on the collections ``leverlm prep easyvqa --out DIR`` writes
(``easyvqa-vqa-{train,test}``, ``easyvqa-caption-{train,test}``). Each image is decoded once
(4,000 train images of 64x64); samples are the dicts of ``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from leverlm.errors import LeverError

if TYPE_CHECKING:
    from PIL import Image


class DemoModelsError(LeverError):
    """Missing or unusable input for the demo models (names the folder, field or value)."""


def open_collection(path: str | Path, task: str) -> Any:
    """Open a collection and check it holds ``task`` samples (``vqa`` or ``caption``)."""
    from leverlm.data.collection import Collection, CollectionError

    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise DemoModelsError(
            f"collection {str(path)!r} does not exist (no manifest.json); write the easy-vqa "
            f"collections first: leverlm prep easyvqa --out {path.parent}"
        )
    try:
        coll = Collection(path)
    except CollectionError as err:
        raise DemoModelsError(f"cannot open collection {str(path)!r}: {err}") from err
    if coll.task != task:
        raise DemoModelsError(f"collection {str(path)!r} holds {coll.task!r} samples, not {task!r}")
    if len(coll) == 0:
        raise DemoModelsError(f"collection {str(path)!r} is empty")
    return coll


@dataclass
class VQAData:
    """A VQA collection in memory: json fields by position, each image decoded once.

    Attributes:
        by_answer: ``answer -> positions`` holding it (sorted).
        image_ids: ``[N]`` image id of each position.
    """

    path: Path
    keys: list[str]
    fields: list[dict[str, Any]]
    images: dict[int, Image.Image]
    image_ids: np.ndarray = field(init=False)
    by_answer: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.image_ids = np.array([int(f["image_id"]) for f in self.fields], dtype=np.int64)
        groups: dict[str, list[int]] = {}
        for pos, f in enumerate(self.fields):
            groups.setdefault(str(f["answer"]), []).append(pos)
        self.by_answer = {a: np.array(p, dtype=np.int64) for a, p in sorted(groups.items())}

    def __len__(self) -> int:
        return len(self.fields)

    def sample(self, pos: int) -> dict[str, Any]:
        """The sample dict at ``pos`` (shares the decoded image)."""
        f = self.fields[pos]
        return {
            "__key__": self.keys[pos],
            "position": int(pos),
            "image": self.images[int(f["image_id"])],
            **f,
        }


def load_vqa(path: str | Path, limit: int | None = None) -> VQAData:
    """Read a VQA collection's fields and decode each distinct image once.

    Args:
        limit: keep only the first ``limit`` positions (tests, quick runs).
    """
    coll = open_collection(path, "vqa")
    n = len(coll) if limit is None else min(limit, len(coll))
    fields = [coll.fields(pos) for pos in range(n)]
    for pos, f in enumerate(fields):
        for name in ("question", "answer", "image_id"):
            if f.get(name) is None:
                raise DemoModelsError(f"{path}: sample {coll.keys[pos]!r} has no field {name!r}")
    images: dict[int, Image.Image] = {}
    for pos, f in enumerate(fields):
        image_id = int(f["image_id"])
        if image_id not in images:
            images[image_id] = coll.image(pos)
    return VQAData(Path(path), list(coll.keys[:n]), fields, images)


def load_captions(path: str | Path) -> tuple[list[Image.Image], list[str], list[str]]:
    """``(images, captions, keys)`` of a caption collection, in position order."""
    coll = open_collection(path, "caption")
    images, captions = [], []
    for pos in range(len(coll)):
        f = coll.fields(pos)
        caption = f.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise DemoModelsError(f"{path}: sample {coll.keys[pos]!r} has no field 'caption'")
        captions.append(caption.strip())
        images.append(coll.image(pos))
    return images, captions, list(coll.keys)


def draw_icds(
    support: VQAData,
    rng: np.random.Generator,
    shots: int,
    match_answer: str | None = None,
    exclude_image: int | None = None,
    exclude_position: int | None = None,
) -> list[int]:
    """Positions of ``shots`` demonstrations, in prompt order.

    Random positions of ``support``; with ``match_answer``, one of them (at a random slot) is
    drawn among the samples with that answer (the "oracle" demonstration). Demonstrations never
    show ``exclude_image`` (the query's own image) nor ``exclude_position``.
    """
    if shots <= 0:
        return []

    def ok(pos: int) -> bool:
        return pos != exclude_position and (
            exclude_image is None or int(support.image_ids[pos]) != exclude_image
        )

    def draw(pool: Sequence[int] | np.ndarray) -> int:
        # Rejection sampling: a query's own image holds a handful of the pool's samples.
        for _ in range(64):
            pos = int(pool[int(rng.integers(len(pool)))])
            if ok(pos):
                return pos
        allowed = [int(p) for p in pool if ok(int(p))]
        if not allowed:
            raise DemoModelsError("no demonstration left after excluding the query's image")
        return allowed[int(rng.integers(len(allowed)))]

    everything = np.arange(len(support))
    icds = [draw(everything) for _ in range(shots)]
    if match_answer is not None:
        pool = support.by_answer.get(match_answer)
        if pool is None or len(pool) == 0:
            raise DemoModelsError(f"no supporting sample has the answer {match_answer!r}")
        icds[int(rng.integers(shots))] = draw(pool)
    return icds
