"""The gt dataset format: records, per-rank part files, resume bookkeeping and the merge.

A gt dataset is a folder::

    manifest.json   {"format": "leverlm-gt", "version": 1, "task", "order", "shots",
                     "beam_size", "num_anchors", "num_records", "supporting_set": {...},
                     "lvlm": {...}, "config": {...}, "config_sha256"}
    records.jsonl   one record per anchor, sorted by anchor_position
    parts/          the job's working files (kept for resume; not read by consumers)
      config.json   the run header: config + hash, the anchor list, the manifest fields
      rank{r}-{seq:06d}.jsonl   a few records each, written atomically as they come

Records and manifest are serialised deterministically (fixed key order / sorted keys, no
timestamps, scores rounded to 9 significant digits - exactly a float32's precision - and
written with ``repr``), so an interrupted-and-resumed run, or a run on N processes, merges
to the same bytes as an uninterrupted 1-process run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leverlm.errors import LeverError
from leverlm.utils import atomic_open, atomic_write_json, read_jsonl, sha256_json

FORMAT = "leverlm-gt"
PARTS_FORMAT = "leverlm-gt-parts"
VERSION = 1
MANIFEST = "manifest.json"
RECORDS = "records.jsonl"
PARTS = "parts"
PARTS_HEADER = "config.json"
_PART_RE = re.compile(r"^rank(\d+)-(\d{6,})\.jsonl$")
_RECORD_KEYS = ("anchor_key", "anchor_position", "sequences", "scores", "step_scores")


class GtDataError(LeverError):
    """A gt file is malformed or inconsistent (names the file and the field)."""


class GtConfigMismatch(GtDataError):
    """The output folder holds results of a different configuration."""


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


# -- the run header (parts/config.json) -----------------------------------------------------


def make_header(
    config: dict[str, Any], anchors: Sequence[int], manifest: dict[str, Any]
) -> dict[str, Any]:
    """The run header stored in ``parts/config.json``.

    Args:
        config: the result-determining config (what ``config_sha256`` hashes).
        anchors: every anchor position of the run (sorted).
        manifest: the manifest fields except ``config``, ``config_sha256``, ``num_records``.
    """
    return {
        "format": PARTS_FORMAT,
        "version": VERSION,
        "config_sha256": sha256_json(config),
        "config": config,
        "anchors": [int(a) for a in anchors],
        "manifest": manifest,
    }


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise GtDataError(f"{path}: unreadable {what} ({err})") from err


def parts_dir(out: str | os.PathLike) -> Path:
    return Path(out) / PARTS


def read_header(out: str | os.PathLike) -> dict[str, Any] | None:
    """The run header of ``out`` (``None`` when the folder has none)."""
    path = parts_dir(out) / PARTS_HEADER
    if not path.exists():
        return None
    header = _read_json(path, "run header")
    if not isinstance(header, dict) or header.get("format") != PARTS_FORMAT:
        raise GtDataError(f"{path}: not a leverlm gt run header (format {PARTS_FORMAT!r})")
    for key in ("config_sha256", "config", "anchors", "manifest"):
        if key not in header:
            raise GtDataError(f"{path}: missing field {key!r}")
    return header


def _existing_sha(out: Path) -> tuple[str | None, Path | None]:
    """The config hash of whatever gt results ``out`` holds, and the file it came from."""
    header = read_header(out)
    if header is not None:
        return header["config_sha256"], parts_dir(out) / PARTS_HEADER
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            sha = json.loads(manifest.read_text(encoding="utf-8")).get("config_sha256")
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            raise GtDataError(f"{manifest}: unreadable manifest ({err})") from err
        return sha, manifest
    if (out / RECORDS).exists() or any(parts_dir(out).glob("rank*.jsonl")):
        return "<unknown>", out
    return None, None


def check_out_dir(out: str | os.PathLike, config_sha256: str, overwrite: bool = False) -> str:
    """Whether ``out`` is ``"new"``, ``"resume"`` (same config) or to be ``"overwrite"``-n.

    Read-only; raises :class:`GtConfigMismatch` when ``out`` holds results of another
    config and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GtDataError(f"output path {str(out)!r} exists and is not a folder")
    sha, source = _existing_sha(out) if out.exists() else (None, None)
    if sha is None:
        return "new"
    if sha == config_sha256:
        return "overwrite" if overwrite else "resume"
    if overwrite:
        return "overwrite"
    raise GtConfigMismatch(
        f"output folder {str(out)!r} holds gt results of a different config "
        f"(config_sha256 {str(sha)[:12]}... in {source}, this run {config_sha256[:12]}...); "
        "choose another --out, or pass --overwrite to delete them"
    )


def prepare_out_dir(out: str | os.PathLike, header: dict[str, Any], overwrite: bool = False) -> str:
    """Make ``out`` ready for this run (call on one process only); returns the status.

    ``overwrite`` deletes the parts and merged files of any earlier run (other files in
    ``out`` are left alone). The header is (re)written atomically.
    """
    out = Path(out)
    status = check_out_dir(out, header["config_sha256"], overwrite)
    if status == "overwrite":
        shutil.rmtree(parts_dir(out), ignore_errors=True)
        for name in (MANIFEST, RECORDS):
            (out / name).unlink(missing_ok=True)
    if status != "resume" or read_header(out) != header:
        atomic_write_json(parts_dir(out) / PARTS_HEADER, header)
    return status


# -- part files -----------------------------------------------------------------------------


def part_files(out: str | os.PathLike) -> list[Path]:
    """Finished part files (temp files of a killed writer are ignored), in name order."""
    d = parts_dir(out)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _PART_RE.match(p.name))


def next_part_seq(out: str | os.PathLike, rank: int) -> int:
    """The next free sequence number of ``rank``'s part files (never overwrite a part)."""
    seqs = [
        int(m.group(2))
        for p in part_files(out)
        if (m := _PART_RE.match(p.name)) and int(m.group(1)) == rank
    ]
    return max(seqs) + 1 if seqs else 0


def write_part(out: str | os.PathLike, rank: int, seq: int, records: Iterable[GtRecord]) -> Path:
    """Write one part file atomically (temp + fsync + rename); returns its path."""
    path = parts_dir(out) / f"rank{int(rank)}-{int(seq):06d}.jsonl"
    if path.exists():
        raise GtDataError(f"part file {path} already exists; refusing to overwrite results")
    with atomic_open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(rec.to_line() + "\n")
    return path


def read_parts(out: str | os.PathLike) -> dict[int, GtRecord]:
    """All records in ``out``'s part files, by anchor position.

    The same anchor in two parts is accepted only when both records are identical.
    """
    records: dict[int, GtRecord] = {}
    for path in part_files(out):
        for where, obj in read_jsonl(path, GtDataError):
            rec = GtRecord.from_json(obj, where)
            prev = records.get(rec.anchor_position)
            if prev is not None and prev.to_line() != rec.to_line():
                raise GtDataError(
                    f"{where}: anchor {rec.anchor_position} has a different record in "
                    "another part file (two runs wrote to the same folder?)"
                )
            records[rec.anchor_position] = rec
    return records


def done_positions(out: str | os.PathLike) -> set[int]:
    """Anchor positions already finished in ``out``'s part files."""
    return set(read_parts(out))


# -- merge and read -------------------------------------------------------------------------


def merge(out: str | os.PathLike) -> Path:
    """Merge ``out``'s part files into ``records.jsonl`` + ``manifest.json``; returns ``out``.

    Every anchor of the run header must be present exactly once; nothing is written
    otherwise. The manifest is written last, so its presence marks a complete dataset.
    """
    out = Path(out)
    header = read_header(out)
    if header is None:
        raise GtDataError(f"{parts_dir(out) / PARTS_HEADER}: no run header; nothing to merge")
    records = read_parts(out)
    anchors = [int(a) for a in header["anchors"]]
    missing = sorted(set(anchors) - set(records))
    if missing:
        raise GtDataError(
            f"{out}: {len(missing)} of {len(anchors)} anchors have no record yet "
            f"(first: {missing[:5]}); rerun the job to finish them"
        )
    extra = sorted(set(records) - set(anchors))
    if extra:
        raise GtDataError(f"{out}: part files hold anchors not in this run: {extra[:5]}")
    with atomic_open(out / RECORDS, "w", encoding="utf-8") as fh:
        for pos in anchors:
            fh.write(records[pos].to_line() + "\n")
    manifest = {
        **header["manifest"],
        "format": FORMAT,
        "version": VERSION,
        "num_anchors": len(anchors),
        "num_records": len(anchors),
        "config": header["config"],
        "config_sha256": header["config_sha256"],
    }
    atomic_write_json(out / MANIFEST, manifest)
    return out


def read_gt(path: str | os.PathLike) -> tuple[dict[str, Any], list[GtRecord]]:
    """Read a merged gt dataset: ``(manifest, records)``, validated against each other."""
    path = Path(path)
    mpath, rpath = path / MANIFEST, path / RECORDS
    if not mpath.exists():
        raise GtDataError(f"{mpath} does not exist (not a gt dataset, or not merged yet)")
    manifest = _read_json(mpath, "manifest")
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
