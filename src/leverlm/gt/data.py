"""The gt dataset format: one record per anchor, and the merged dataset.

A gt dataset is a folder (a run folder of ``leverlm gt``, see :mod:`leverlm.runs`)::

    manifest.json   {"format": "leverlm-gt", "version": 1, "task", "order", "shots",
                     "beam_size", "num_anchors", "num_records", "supporting_set": {...},
                     "lvlm": {...}, "config": {...}, "run_sha256"}
    records.jsonl   one record per anchor, sorted by anchor_position

Records and manifest are serialised deterministically (fixed key order / sorted keys, no
timestamps, scores rounded to 9 significant digits - exactly a float32's precision - and
written with ``repr``), so an interrupted-and-resumed run, or a run on N processes, merges
to the same bytes as an uninterrupted 1-process run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leverlm.errors import LeverError
from leverlm.utils import atomic_open, atomic_write_json, read_jsonl

FORMAT = "leverlm-gt"
VERSION = 1
MANIFEST = "manifest.json"
RECORDS = "records.jsonl"
_RECORD_KEYS = ("anchor_key", "anchor_position", "sequences", "scores", "step_scores")


class GtDataError(LeverError):
    """A gt file is malformed or inconsistent (names the file and the field)."""


def round_score(x: float) -> float:
    """A score as stored: 9 significant digits (a float32 round-trips exactly)."""
    x = float(x)
    if not math.isfinite(x):
        raise GtDataError(f"score {x!r} is not finite")
    return float(f"{x:.9g}") + 0.0  # + 0.0 turns -0.0 into 0.0: one spelling per value


@dataclass
class GtRecord:
    """The beams of one anchor (sequences in prompt order, best first)."""

    anchor_key: str
    anchor_position: int
    sequences: list[list[int]]
    scores: list[float]
    step_scores: list[list[float]] = field(default_factory=list)

    @classmethod
    def from_beams(cls, anchor_key: str, anchor_position: int, beams: Sequence[Any]) -> GtRecord:
        """From :class:`leverlm.gt.beam.Beam` objects (``sequence``, ``score``, ``step_scores``)."""
        return cls(
            anchor_key=str(anchor_key),
            anchor_position=int(anchor_position),
            sequences=[[int(p) for p in b.sequence] for b in beams],
            scores=[round_score(b.score) for b in beams],
            step_scores=[[round_score(s) for s in b.step_scores] for b in beams],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "anchor_key": self.anchor_key,
            "anchor_position": self.anchor_position,
            "sequences": self.sequences,
            "scores": [round_score(s) for s in self.scores],
            "step_scores": [[round_score(s) for s in steps] for steps in self.step_scores],
        }

    def to_line(self) -> str:
        """One JSONL line (no newline), byte-stable for equal records."""
        return json.dumps(
            self.to_json(), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )

    @classmethod
    def from_json(cls, obj: Any, where: str = "record") -> GtRecord:
        """Parse and validate one record; ``where`` names the file/line in errors."""
        if not isinstance(obj, dict):
            raise GtDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in _RECORD_KEYS if k not in obj]
        if missing:
            raise GtDataError(f"{where}: missing field(s) {missing}")
        key, pos = obj["anchor_key"], obj["anchor_position"]
        if not isinstance(key, str) or not key:
            raise GtDataError(
                f"{where}: field 'anchor_key' must be a non-empty string, got {key!r}"
            )
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0:
            raise GtDataError(f"{where}: field 'anchor_position' must be an int >= 0, got {pos!r}")
        seqs, scores, steps = obj["sequences"], obj["scores"], obj["step_scores"]
        if not isinstance(seqs, list) or not seqs:
            raise GtDataError(f"{where}: field 'sequences' must be a non-empty list")
        for s in seqs:
            if (
                not isinstance(s, list)
                or not s
                or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in s)
            ):
                raise GtDataError(f"{where}: field 'sequences' holds a bad sequence {s!r}")
            if pos in s:
                raise GtDataError(f"{where}: anchor {pos} appears in its own sequence {s!r}")
        if not isinstance(scores, list) or len(scores) != len(seqs):
            raise GtDataError(f"{where}: field 'scores' must have one score per sequence")
        if not isinstance(steps, list) or len(steps) != len(seqs):
            raise GtDataError(f"{where}: field 'step_scores' must have one list per sequence")
        for s, st in zip(seqs, steps, strict=True):
            if not isinstance(st, list) or len(st) != len(s):
                raise GtDataError(f"{where}: field 'step_scores' entry {st!r} does not match {s!r}")
        try:
            return cls(
                key,
                pos,
                [list(s) for s in seqs],
                [float(x) for x in scores],
                [[float(x) for x in st] for st in steps],
            )
        except (TypeError, ValueError) as err:
            raise GtDataError(f"{where}: non-numeric score ({err})") from err


# -- the merged dataset ---------------------------------------------------------------------


def write_gt(out: str | os.PathLike, records: Sequence[GtRecord], manifest: dict[str, Any]) -> Path:
    """Write ``records.jsonl`` (sorted by anchor position) then ``manifest.json`` (last, so its
    presence marks a complete dataset); returns ``out``."""
    out = Path(out)
    records = sorted(records, key=lambda r: r.anchor_position)
    with atomic_open(out / RECORDS, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(rec.to_line() + "\n")
    atomic_write_json(
        out / MANIFEST,
        {**manifest, "format": FORMAT, "version": VERSION, "num_anchors": len(records),
         "num_records": len(records)},
    )  # fmt: skip
    return out


def read_gt(path: str | os.PathLike) -> tuple[dict[str, Any], list[GtRecord]]:
    """Read a merged gt dataset: ``(manifest, records)``, validated against each other."""
    path = Path(path)
    mpath, rpath = path / MANIFEST, path / RECORDS
    if not mpath.exists():
        raise GtDataError(f"{mpath} does not exist (not a gt dataset, or not merged yet)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise GtDataError(f"{mpath}: unreadable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GtDataError(f"{mpath}: field 'format' must be {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise GtDataError(f"{mpath}: unsupported version {manifest.get('version')!r}")
    records = [GtRecord.from_json(obj, where) for where, obj in read_jsonl(rpath, GtDataError)]
    if len(records) != manifest.get("num_records"):
        raise GtDataError(
            f"{rpath}: {len(records)} records but manifest field num_records is "
            f"{manifest.get('num_records')!r}"
        )
    positions = [r.anchor_position for r in records]
    if positions != sorted(set(positions)):
        raise GtDataError(f"{rpath}: records are not sorted by unique anchor_position")
    return manifest, records
