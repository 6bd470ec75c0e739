"""``leverlm features``: CLIP features of a collection, a job on the run layer (:mod:`leverlm.runs`).

``leverlm features predict --config conf/encoder/tiny-clip.yaml --data.collection DIR --out STORE``
writes the feature store :mod:`leverlm.encoders.store` reads into ``STORE``;
``leverlm features merge --out STORE`` assembles it from a finished run's part files on its own.

Each distinct image (by a hash of its encoded bytes) and each distinct text (by its exact
string) is a *unit*, encoded once. The plan cuts the image units (in position order), then the
text units, into a fixed grid of batches of ``batch_size`` units: the batches are the work items,
the same whatever the number of processes, so every unit is encoded in the same batch on 1 or N
processes and after a resume, and the arrays come out byte-identical. Each batch's rows go to a
part file with the positions they fill; the merge writes ``image.npy`` and ``text.npy`` (every
position gets its unit's row) and ``manifest.json`` last.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from leverlm.encoders.clip import ClipEncoder, load_clip, resolve_pretrained
from leverlm.encoders.store import (
    DTYPE,
    FORMAT,
    FORMAT_VERSION,
    IMAGE,
    MANIFEST,
    TEXT,
    FeatureStoreError,
    identity_diff,
    read_manifest,
)
from leverlm.errors import LeverError
from leverlm.runs import (
    HEADER,
    LOCK,
    LOGS,
    PARTS,
    Job,
    RunDir,
    RunHeader,
    input_fingerprint,
    run_job,
)
from leverlm.utils import atomic_write_json, fsync_dir, sha256_file

log = logging.getLogger("leverlm.features")

KINDS = ("image", "text")
ARRAYS = {"image": IMAGE, "text": TEXT}


# -- the work plan ----------------------------------------------------------------------------


def first_occurrence(identities: Sequence[Any]) -> np.ndarray:
    """``rep[i]`` = the first index whose identity equals identity ``i`` (int64)."""
    first: dict[Any, int] = {}
    reps = [first.setdefault(key, i) for i, key in enumerate(identities)]
    return np.asarray(reps, dtype=np.int64)


@dataclass(frozen=True)
class Batch:
    """One work item: ``units`` (representative positions) of one kind, encoded together; its
    rows fill ``positions`` (``row[i]`` = the row of ``positions[i]``)."""

    id: int
    kind: str
    units: np.ndarray
    positions: np.ndarray
    row: np.ndarray
    texts: tuple[str, ...] = ()


class WorkPlan:
    """The units of a collection and the fixed grid of batches over them.

    Args:
        reps: per kind, int64 ``[N]``: position ``p`` gets the row of position ``reps[kind][p]``,
            its first occurrence (a unit is a position that is its own representative).
        texts: every position's text.
        batch_size: units per batch.
    """

    def __init__(self, reps: dict[str, np.ndarray], texts: list[str], batch_size: int) -> None:
        self.texts, self.batch_size = texts, batch_size
        self.units: dict[str, np.ndarray] = {}
        self._unit_of: dict[str, np.ndarray] = {}  # sorted unit number of each position ...
        self._order: dict[str, np.ndarray] = {}  # ... and those positions
        for kind in KINDS:
            rep = reps[kind]
            self.units[kind] = np.flatnonzero(rep == np.arange(rep.size))
            unit_of = np.searchsorted(self.units[kind], rep)
            self._order[kind] = np.argsort(unit_of, kind="stable")
            self._unit_of[kind] = unit_of[self._order[kind]]
        self.grid = [
            (kind, start, min(start + batch_size, self.units[kind].size))
            for kind in KINDS
            for start in range(0, self.units[kind].size, batch_size)
        ]

    def __len__(self) -> int:
        return len(self.grid)

    def batch(self, b: int) -> Batch:
        kind, start, stop = self.grid[b]
        lo, hi = np.searchsorted(self._unit_of[kind], [start, stop])
        units = self.units[kind][start:stop]
        texts = tuple(self.texts[p] for p in units) if kind == "text" else ()
        positions, row = self._order[kind][lo:hi], self._unit_of[kind][lo:hi] - start
        return Batch(b, kind, units, positions, row, texts)


def read_units(
    collection: Any, text_field: str, dedup: bool
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every position's representative image and text, and its text. Reads each sample's image
    bytes (no decoding) and json fields once; the first sample without a string ``text_field``
    raises, naming it."""
    digests, texts = [], []
    for pos in range(len(collection)):
        sample = collection.sample(pos, decode=False)
        value = sample.get(text_field)
        if not isinstance(value, str):
            fields = sorted(k for k, v in sample.items() if isinstance(v, str) and k[:2] != "__")
            raise FeatureStoreError(
                f"collection {collection.path}: sample {sample['__key__']!r} (position {pos}): "
                f"text field {text_field!r} is {'missing' if value is None else 'not a string'} "
                f"(its string fields: {fields}); set data.text_field"
            )
        texts.append(value)
        if dedup:
            digests.append(hashlib.blake2b(sample["image_bytes"], digest_size=16).digest())
    if not dedup:
        every = np.arange(len(texts), dtype=np.int64)
        return {"image": every, "text": every.copy()}, texts
    return {"image": first_occurrence(digests), "text": first_occurrence(texts)}, texts


@lru_cache(maxsize=1)
def _cached_plan(
    path: str, manifest_sha: str, text_field: str, dedup: bool, batch_size: int
) -> WorkPlan:
    from leverlm.data.collection import Collection

    reps, texts = read_units(Collection(path), text_field, dedup)
    return WorkPlan(reps, texts, batch_size)


def work_plan(collection: str, text_field: str, dedup: bool, batch_size: int) -> WorkPlan:
    """The plan of a collection (one pass over its samples per process: the job's plan step
    and its datamodule share it)."""
    path = Path(collection).resolve()
    sha = sha256_file(path / "manifest.json")
    return _cached_plan(str(path), sha, text_field, dedup, batch_size)


def default_text_field(collection: str) -> str:
    """The field the text tower encodes by default: the task's (question / caption)."""
    from leverlm.data.collection import read_manifest as read_collection_manifest
    from leverlm.tasks import get_task

    return get_task(read_collection_manifest(collection)["task"]).text_field


# -- data -------------------------------------------------------------------------------------


def _identity(x: Any) -> Any:
    return x


def _block(seq: Sequence[Any], i: int, n: int) -> Sequence[Any]:
    """The ``i``-th of ``n`` contiguous, near-equal blocks of ``seq``."""
    return seq[len(seq) * i // n : len(seq) * (i + 1) // n]


class UnitBatches(torch.utils.data.IterableDataset):
    """One rank's batches, preprocessed: ``{"batch", "kind", "pixels" | "tokens", "positions",
    "row"}``. Each DataLoader worker takes a contiguous block of the image batches, whose images
    it streams (:func:`~leverlm.data.pipeline.stream_positions`: mostly its own shards), and a
    contiguous block of the text batches (their texts come with the plan)."""

    def __init__(
        self, collection: str, batches: Sequence[Batch], preprocess: Any, tokenizer: Any
    ) -> None:
        super().__init__()
        self.collection, self.batches = collection, list(batches)
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from leverlm.data.collection import Collection
        from leverlm.data.pipeline import stream_positions

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = {k: _block([b for b in self.batches if b.kind == k], worker, workers) for k in KINDS}
        units = [int(p) for b in mine["image"] for p in b.units]
        stream = stream_positions(Collection(self.collection), units)
        for b in mine["image"]:
            samples = itertools.islice(stream, len(b.units))
            pixels = torch.stack([self.preprocess(s["image"]) for s in samples])
            yield {"batch": b.id, "kind": b.kind, "pixels": pixels,
                   "positions": b.positions, "row": b.row}  # fmt: skip
        for b in mine["text"]:
            yield {"batch": b.id, "kind": b.kind, "tokens": self.tokenizer(list(b.texts)),
                   "positions": b.positions, "row": b.row}  # fmt: skip


class FeatureDataModule(pl.LightningDataModule):
    """The units of a collection in their fixed batches; each rank takes a contiguous block of
    the image batches still to do and one of the text batches.

    Args:
        collection: the collection folder.
        batch_size: units per batch (it fixes the grid: another size is another run).
        text_field: the sample field the text tower encodes; null: the task's (question for
            VQA, caption for captioning).
        dedup: encode each distinct image and text once; false encodes every position (the
            reference path, for parity checks and benchmarks).
        num_workers: DataLoader workers reading and preprocessing the images.
    """

    def __init__(
        self,
        collection: str,
        batch_size: int = 64,
        text_field: str | None = None,
        dedup: bool = True,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        self.collection, self.batch_size = collection, batch_size
        self.text_field, self.dedup, self.num_workers = text_field, dedup, num_workers
        self.rank, self.world_size = 0, 1
        self._done: set[int] = set()

    @property
    def plan(self) -> WorkPlan:
        field = self.text_field or default_text_field(self.collection)
        return work_plan(self.collection, field, self.dedup, self.batch_size)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size

    def skip(self, done: set[int]) -> None:
        """Leave out the batches already finished (by an earlier, interrupted run)."""
        self._done = set(done)

    @property
    def rank_batches(self) -> list[int]:
        plan = self.plan
        todo = [b for b in range(len(plan)) if b not in self._done]
        return [
            b
            for kind in KINDS
            for b in _block(
                [b for b in todo if plan.grid[b][0] == kind], self.rank, self.world_size
            )
        ]

    @property
    def rank_count(self) -> int:
        return len(self.rank_batches)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        plan, encoder = self.plan, self.trainer.lightning_module.encoder
        batches = [plan.batch(b) for b in self.rank_batches]
        dataset = UnitBatches(self.collection, batches, encoder.preprocess, encoder.tokenizer)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=False,
        )


# -- model ------------------------------------------------------------------------------------

# The encoder the plan step loaded to check the checkpoint, handed to the module built right
# after it: one load per process, however large the model.
_checked: dict[str, ClipEncoder] = {}


def load_encoder(model: dict[str, Any]) -> ClipEncoder:
    """The CLIP of a ``model`` section; raises naming what cannot be used."""
    from leverlm.encoders.clip import EncoderError

    try:
        return load_clip(
            model["model_name"],
            model["pretrained"],
            precision=model["precision"],
            normalize=model["normalize"],
            seed=model["seed"],
        )
    except EncoderError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the checkpoint reader raises, name the file
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise EncoderError(
            f"model.pretrained {model['pretrained']!r} cannot be loaded as a "
            f"{model['model_name']!r} checkpoint: {first}"
        ) from None


class FeatureModule(pl.LightningModule):
    """An open_clip encoder; ``predict_step`` encodes one batch of units with one tower.

    Args:
        model_name: an open_clip model name (``ViT-B-32-quickgelu``, ...) or
            ``leverlm-tiny-clip`` (the embedded small CLIP).
        pretrained: a local checkpoint file or a locally cached open_clip tag; null: a random
            init drawn from ``seed``.
        precision: ``fp32``, ``fp16``, ``bf16``, ``pure_fp16`` or ``pure_bf16``.
        normalize: L2-normalise the stored rows.
        seed: the random init's seed (used only without ``pretrained``).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        precision: str = "fp32",
        normalize: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        model = {"model_name": model_name, "pretrained": pretrained, "precision": precision,
                 "normalize": normalize, "seed": seed}  # fmt: skip
        encoder = _checked.pop(json.dumps(model, sort_keys=True), None)
        _checked.clear()
        self.encoder = encoder if encoder is not None else load_encoder(model)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if batch["kind"] == "image":
            feats = self.encoder.encode_pixels(batch["pixels"])
        else:
            feats = self.encoder.encode_tokens(batch["tokens"])
        out = {k: batch[k] for k in ("batch", "kind", "positions", "row")}
        return out | {"rows": feats.float().cpu().numpy().astype(DTYPE)}


# -- the job ----------------------------------------------------------------------------------

_PART_KEYS = ("batch", "kind", "rows", "positions", "row")


def read_part(path: Path, keys: Sequence[str] = _PART_KEYS) -> dict[str, np.ndarray]:
    """The arrays of a part file (only ``keys`` are read)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise FeatureStoreError(
            f"part file {path} is unreadable ({err}); delete it and rerun "
            "`leverlm features predict` to encode its batch again"
        ) from None


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


class FeatureJob(Job):
    """Batches of units -> part files; merged into the feature store (``image.npy``,
    ``text.npy``, ``manifest.json``)."""

    name, unit, units, part_ext = "features", "batch", "batches", "npz"
    # The store's files stay, valid, until the merge of a new run replaces them.
    results = ()
    overwrite = False

    def plan(self, cfg: dict[str, Any]) -> RunHeader:
        from leverlm.data.collection import Collection, CollectionError

        data, model, out = dict(cfg["data"]), dict(cfg["model"]), Path(cfg["out"])
        self.overwrite = bool(cfg["overwrite"])
        for name, low in (("batch_size", 1), ("num_workers", 0)):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LeverError(f"data.{name} must be an int >= {low}, got {value!r}")
        try:
            coll = Collection(data["collection"])
        except CollectionError as err:
            raise CollectionError(f"data.collection: {err}") from None
        if len(coll) == 0:
            raise FeatureStoreError(f"data.collection: {coll.path} has no samples")
        text_field = data["text_field"] or default_text_field(coll.path)
        encoder = load_encoder(model)
        _checked.clear()
        _checked[json.dumps(model, sort_keys=True)] = encoder
        checkpoint, _ = resolve_pretrained(model["model_name"], model["pretrained"])
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model_name": model["model_name"],
            "pretrained": model["pretrained"],
            "checkpoint": checkpoint,
            "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
            "seed": None if checkpoint else model["seed"],  # only a random init needs it
            "precision": encoder.precision,
            "dim": encoder.dim,
            "dtype": np.dtype(DTYPE).name,
            "normalize": encoder.normalize,
            "collection_name": coll.name,
            "collection_path": str(coll.path.resolve()),
            "collection_manifest_sha256": sha256_file(coll.path / "manifest.json"),
            "num_rows": len(coll),
            "text_field": text_field,
        }
        self._check_out(out, manifest)
        plan = work_plan(str(coll.path), text_field, data["dedup"], data["batch_size"])
        counts = {k: int(plan.units[k].size) if data["dedup"] else None for k in KINDS}
        manifest |= {"dedup": data["dedup"], "num_distinct_images": counts["image"],
                     "num_distinct_texts": counts["text"]}  # fmt: skip
        log.info(
            "%s: %d rows -> %d distinct images + %d distinct texts in %d batches",
            coll.path, len(coll), plan.units["image"].size, plan.units["text"].size, len(plan),
        )  # fmt: skip
        pretrained = model["pretrained"]
        if pretrained and os.path.isfile(pretrained):
            pretrained = str(Path(pretrained).resolve())
        config = {
            # Only what determines the rows: no worker counts.
            "data": {"collection": manifest["collection_path"], "text_field": text_field,
                     "dedup": data["dedup"], "batch_size": data["batch_size"]},
            "model": {**model, "pretrained": pretrained, "seed": manifest["seed"]},
        }  # fmt: skip
        inputs = {"collection": input_fingerprint(coll.path)}
        if checkpoint:
            inputs["clip"] = input_fingerprint(checkpoint)
        return RunHeader("features", config, inputs, list(range(len(plan))), manifest)

    def _check_out(self, out: Path, manifest: dict[str, Any]) -> None:
        """Refuse an --out that is not a feature store, or a store of other inputs (unless
        --overwrite, or this folder's run is the one that will replace it)."""
        if not out.is_dir():
            return
        if not (out / MANIFEST).exists():
            own = {HEADER, LOCK, PARTS, LOGS}
            foreign = sorted(p.name for p in out.iterdir() if p.name not in own)
            if foreign and not (out / HEADER).exists():
                raise FeatureStoreError(
                    f"output {out} exists and is not a feature store (it holds {foreign[0]}); "
                    "refusing to write into it: choose another --out"
                )
            return
        if self.overwrite:
            return
        diff = identity_diff(read_manifest(out), manifest)
        run = RunDir(out).header()
        if diff and not (
            run and run.job == self.name and not identity_diff(run.manifest, manifest)
        ):
            raise FeatureStoreError(
                f"feature store {out} was built from other inputs ({'; '.join(diff)}); pass "
                "--overwrite to replace it, or choose another --out"
            )

    def _store_done(self, run: RunDir, header: RunHeader) -> bool:
        """Whether ``run``'s folder already holds the complete store of these features."""
        try:
            old = read_manifest(run.path)
        except FeatureStoreError:
            return False
        return bool(old.get("complete")) and not identity_diff(old, header.manifest)

    def _parts(self, run: RunDir) -> dict[int, Path]:
        parts: dict[int, Path] = {}
        for path in run.part_files():
            b = int(read_part(path, ("batch",))["batch"])
            if b in parts:
                raise FeatureStoreError(
                    f"batch {b} is in two part files ({parts[b].name}, {path.name}) of {run.parts}: "
                    "two runs wrote to this folder? rerun with --overwrite"
                )
            parts[b] = path
        return parts

    def done(self, run: RunDir) -> set[int]:
        header = run.header()
        if header is not None and not self.overwrite and self._store_done(run, header):
            return set(header.items)
        return set(self._parts(run))

    def encode_part(self, outputs: list[Any]) -> bytes:
        (out,) = outputs  # part_size 1: one batch per part file
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(out[k]) for k in _PART_KEYS})
        return buf.getvalue()

    def count(self, output: Any) -> int:
        return 1

    def merge(self, run: RunDir) -> Path:
        """Write the store from the part files: both arrays under temp names, then the manifest
        removed, the arrays renamed into place and the manifest written (``complete``): a reader
        sees the old store, no store, or the new one, never a mix. The part files go last."""
        header = run.header()
        parts = self._parts(run)
        missing = sorted(set(header.items) - set(parts))
        if missing:
            if not self._store_done(run, header):
                raise FeatureStoreError(
                    f"{run.path}: {len(missing)} of {len(header.items)} batches have no part "
                    f"file yet (first: {missing[:5]}); rerun `leverlm features predict` to "
                    "finish them"
                )
            log.info("feature store %s already holds these features", run.path)
        else:
            self._write_store(run, header, parts)
        shutil.rmtree(run.parts, ignore_errors=True)
        return run.path

    def _write_store(self, run: RunDir, header: RunHeader, parts: dict[int, Path]) -> None:
        m = header.manifest
        n, dim = m["num_rows"], m["dim"]
        tmp = {kind: run.path / f".{ARRAYS[kind]}.merge" for kind in KINDS}
        arrays = {kind: np.lib.format.open_memmap(tmp[kind], mode="w+", dtype=DTYPE, shape=(n, dim))
                  for kind in KINDS}  # fmt: skip
        for _, path in sorted(parts.items()):
            part = read_part(path)
            kind, rows = str(part["kind"]), part["rows"]
            if kind not in KINDS or rows.dtype != DTYPE or rows.shape[1:] != (dim,):
                raise FeatureStoreError(
                    f"part file {path} does not hold {dim}-d {np.dtype(DTYPE).name} rows; "
                    "rerun with --overwrite"
                )
            arrays[kind][part["positions"]] = rows[part["row"]]
        for kind in KINDS:
            arrays[kind].flush()
            del arrays[kind]
            _fsync(tmp[kind])
        (run.path / MANIFEST).unlink(missing_ok=True)
        fsync_dir(run.path)
        for kind in KINDS:
            os.replace(tmp[kind], run.path / ARRAYS[kind])
        atomic_write_json(run.path / MANIFEST, {**m, "complete": True})
        log.info(
            "feature store %s: %d rows, %d-d (%s distinct images, %s distinct texts)",
            run.path, n, dim, m["num_distinct_images"], m["num_distinct_texts"],
        )  # fmt: skip


def main(argv: list[str]) -> int:
    """``leverlm features predict ...`` (LightningCLI) or ``leverlm features merge --out DIR``."""
    return run_job(FeatureJob(), FeatureModule, FeatureDataModule, argv)
