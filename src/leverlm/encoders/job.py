"""The feature job: encode a whole collection once, with Lightning predict (1..N devices).

Each distinct image (by a hash of its encoded bytes) and each distinct text (by its exact
string) is a *work unit*, encoded once at its representative (first) position; at the end
every position's row is copied from its representative. Units are numbered images first, then
texts, and cut into a fixed grid of homogeneous batches (image units ``[0, bs)``, ``[bs, 2 bs)``
..., then text units likewise) that does not depend on the number of processes; the
unfinished batches are dealt round-robin to the ranks. Every unit is therefore computed in the
same batch on 1 or N processes and after a resume, so the arrays are byte-identical.

Ranks write representative rows straight into the memory-mapped arrays of the scratch folder
and, at most every ``sync_interval`` seconds, flush them and then mark their units in
``done.npy``; a rerun skips marked units. When every unit is marked, rank 0 copies the rows of
the duplicates, writes the final manifest and moves the folder into place.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks.progress import ProgressBar
from torch.utils.data import DataLoader, Dataset

from leverlm.encoders.clip import ClipEncoder, load_clip, resolve_pretrained
from leverlm.encoders.store import (
    DONE,
    DTYPE,
    FORMAT,
    FORMAT_VERSION,
    IMAGE,
    MANIFEST,
    TEXT,
    UNITS,
    FeatureStoreError,
    default_feature_dir,
    identity_diff,
    open_array,
    read_manifest,
)
from leverlm.utils import (
    atomic_replace_dir,
    atomic_write_json,
    fsync_dir,
    set_cpu_threads,
    sha256_file,
)

log = logging.getLogger(__name__)

KINDS = ("image", "text")  # unit kinds; column 0 of units.npy is the index into this tuple
DEFAULT_SYNC_INTERVAL = 5.0  # seconds between flushes of written rows + their done marks


def partial_dir(out_dir: str | os.PathLike) -> Path:
    """The scratch folder a store is built (and resumed) in: ``.<name>.partial`` beside it."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.partial"


# -- work units ----------------------------------------------------------------------------------


def image_digests(collection: Any) -> list[bytes]:
    """A 128-bit blake2b digest of every position's encoded image bytes (no decoding).

    One sequential pass (~0.5 GB/s here; a thread pool measured no faster on this machine).
    """
    return [
        hashlib.blake2b(collection.image_bytes(pos), digest_size=16).digest()
        for pos in range(len(collection))
    ]


def first_occurrence(identities: Iterable[Hashable], count: int) -> np.ndarray:
    """``rep[i]`` = the first index whose identity equals identity ``i`` (int64 ``[count]``)."""
    first: dict[Hashable, int] = {}
    return np.fromiter(
        (first.setdefault(key, i) for i, key in enumerate(identities)), dtype=np.int64, count=count
    )


def sample_texts(collection: Any, text_field: str) -> list[str]:
    """The text-encoder input of every position, checked to be a string (names the sample)."""
    texts = []
    for pos in range(len(collection)):
        value = collection.fields(pos).get(text_field)
        if not isinstance(value, str):
            raise FeatureStoreError(
                f"collection {collection.path}: sample {collection.keys[pos]!r} (position {pos}) "
                f"has {'no' if value is None else 'a non-string'} text field {text_field!r}"
            )
        texts.append(value)
    return texts


class WorkPlan:
    """The work units of a collection and the representative row every position copies.

    Args:
        image_rep / text_rep: int64 ``[N]``; position ``p`` gets the image (text) row of
            position ``image_rep[p]`` (``text_rep[p]``), a position with ``rep[q] == q``.
        texts: the text of every text unit, in unit order.
        dedup: whether duplicates were merged (False: every position is its own unit, the
            straightforward reference path).
    """

    def __init__(
        self, image_rep: np.ndarray, text_rep: np.ndarray, texts: Sequence[str], dedup: bool
    ) -> None:
        n = image_rep.shape[0]
        arange = np.arange(n, dtype=np.int64)
        self.image_rep = np.asarray(image_rep, dtype=np.int64)
        self.text_rep = np.asarray(text_rep, dtype=np.int64)
        self.dedup = dedup
        self.image_positions = np.flatnonzero(self.image_rep == arange)
        self.text_positions = np.flatnonzero(self.text_rep == arange)
        self.texts = list(texts)
        if len(self.texts) != self.text_positions.size or self.text_rep.shape != (n,):
            raise ValueError("texts / text_rep do not match the text units")
        # Unit u < num_images is image unit u; unit num_images + j is text unit j.
        self.units = np.concatenate(
            [
                np.stack([np.zeros_like(self.image_positions), self.image_positions], axis=1),
                np.stack([np.ones_like(self.text_positions), self.text_positions], axis=1),
            ]
        )

    @property
    def num_rows(self) -> int:
        return int(self.image_rep.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.image_positions.size)

    @property
    def num_texts(self) -> int:
        return int(self.text_positions.size)

    @property
    def num_units(self) -> int:
        return self.num_images + self.num_texts

    def __repr__(self) -> str:
        return (
            f"WorkPlan(rows={self.num_rows}, images={self.num_images}, texts={self.num_texts}, "
            f"dedup={self.dedup})"
        )


def plan_work(collection: Any, text_field: str, dedup: bool = True) -> WorkPlan:
    """Find the distinct images (content hash) and texts (exact string) of a collection.

    Reads every sample's image bytes and json fields once (no image decoding); raises
    ``FeatureStoreError`` naming the first sample without a string ``text_field``.
    """
    texts = sample_texts(collection, text_field)
    n = len(collection)
    if not dedup:
        every = np.arange(n, dtype=np.int64)
        return WorkPlan(every, every.copy(), texts, dedup=False)
    image_rep = first_occurrence(image_digests(collection), n)
    text_rep = first_occurrence(texts, n)
    unit_texts = [texts[pos] for pos in np.flatnonzero(text_rep == np.arange(n))]
    return WorkPlan(image_rep, text_rep, unit_texts, dedup=True)


def plan_batches(
    num_images: int,
    num_texts: int,
    batch_size: int,
    done: np.ndarray | None,
    rank: int,
    world_size: int,
) -> list[list[int]]:
    """The batches (lists of unit indices) rank ``rank`` of ``world_size`` must encode.

    Image batch ``b`` is always units ``[b*bs, (b+1)*bs)`` (cut at ``num_images``); text batch
    ``b`` is units ``num_images + [b*bs, (b+1)*bs)``, so no batch mixes images and texts. A
    batch is pending if any of its units is not marked in ``done``; pending batches go to ranks
    round-robin. A rank without work gets one empty batch, so every rank runs the predict loop
    (and its hooks).
    """
    grid = [
        (offset + start, offset + min(start + batch_size, count))
        for offset, count in ((0, num_images), (num_images, num_texts))
        for start in range(0, count, batch_size)
    ]
    pending = [
        list(range(start, stop))
        for start, stop in grid
        if done is None or not bool(np.all(done[start:stop]))
    ]
    mine = pending[rank::world_size]
    return mine or [[]]


def copy_from_representatives(arr: np.ndarray, rep: np.ndarray, chunk: int = 1 << 16) -> int:
    """Fill every row ``p`` of ``arr`` with row ``rep[p]``; return how many rows were copied.

    Vectorised by chunks of rows (bounded memory for big stores). Representative rows are only
    read (``rep[rep[p]] == rep[p]``), so the order of the chunks does not matter and a rerun
    after a crash gives the same result.
    """
    copies = np.flatnonzero(rep != np.arange(rep.shape[0]))
    for start in range(0, copies.size, chunk):
        idx = copies[start : start + chunk]
        arr[idx] = arr[rep[idx]]
    return int(copies.size)


# -- data ------------------------------------------------------------------------------------------


class _UnitDataset(Dataset):
    """Item ``i`` is the whole preprocessed batch ``batches[i]`` (one DataLoader worker each).

    An image batch carries ``pixels``, a text batch ``tokens``; both carry ``kind``, ``units``
    and ``positions`` (the representative rows to write).
    """

    def __init__(
        self,
        collection: Any,
        plan: WorkPlan,
        batches: list[list[int]],
        preprocess: Any,
        tokenizer: Any,
    ) -> None:
        self.collection = collection
        self.plan = plan
        self.batches = batches
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        units = self.batches[i]
        if not units:
            empty = torch.zeros(0, dtype=torch.long)
            return {"kind": "", "units": empty, "positions": empty}
        plan = self.plan
        kinds = {int(k) for k in plan.units[units, 0]}
        if len(kinds) != 1:  # plan_batches never mixes kinds; a mixed batch is a bug upstream
            raise ValueError(f"batch {i} mixes image and text units")
        kind = KINDS[kinds.pop()]
        positions = plan.units[units, 1]
        batch: dict[str, Any] = {
            "kind": kind,
            "units": torch.tensor(units, dtype=torch.long),
            "positions": torch.from_numpy(positions.copy()),
        }
        if kind == "image":
            batch["pixels"] = torch.stack(
                [self.preprocess(self.collection.image(int(p)).convert("RGB")) for p in positions]
            )
        else:
            batch["tokens"] = self.tokenizer([plan.texts[u - plan.num_images] for u in units])
        return batch


class FeatureEncoderModule(L.LightningModule):
    """Predict-only module: ``predict_step`` runs one tower on one batch of work units.

    Args:
        encoder: the CLIP encoder (moved to each rank's device by Lightning).
        collection_path: the collection to encode.
        store_dir: the scratch folder holding ``done.npy`` (read to plan this rank's batches).
        plan: the work units (``plan_work``).
    """

    def __init__(
        self,
        encoder: ClipEncoder,
        collection_path: str,
        store_dir: str,
        plan: WorkPlan,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.collection_path = collection_path
        self.store_dir = store_dir
        self.plan = plan
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pending_units = 0  # units this rank encodes in this run (for the progress bar)

    def setup(self, stage: str) -> None:
        # Items are whole batches (batch_size=None), so Lightning has no batch indices to give
        # the writer; rows are addressed by the positions carried in each batch instead.
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")

    def predict_dataloader(self) -> DataLoader:
        from leverlm.data.collection import Collection

        # Read after the writer's setup (rank 0 created done.npy) and before any rank writes:
        # Lightning puts a barrier after every rank has built its predict dataloader.
        done = np.load(Path(self.store_dir) / DONE, mmap_mode="r")
        batches = plan_batches(
            self.plan.num_images,
            self.plan.num_texts,
            self.batch_size,
            done,
            self.global_rank,
            self.trainer.world_size,
        )
        del done
        self.pending_units = sum(len(b) for b in batches)
        dataset = _UnitDataset(
            Collection(self.collection_path),
            self.plan,
            batches,
            self.encoder.preprocess,
            self.encoder.tokenizer,
        )
        return DataLoader(
            dataset,
            batch_size=None,  # items are already batches
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = {k: batch[k] for k in ("kind", "units", "positions")}
        if batch["kind"] == "image":
            out["features"] = self.encoder.encode_pixels(batch["pixels"])
        elif batch["kind"] == "text":
            out["features"] = self.encoder.encode_tokens(batch["tokens"])
        else:  # the empty batch of a rank without work
            out["features"] = None
        return out


class UnitProgressBar(ProgressBar):
    """A tqdm bar over the work units (distinct images + texts) of this rank, not batches."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar: Any = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return
        from tqdm import tqdm

        world = trainer.world_size
        desc = "encoding" if world == 1 else f"encoding (rank 0 of {world})"
        self._bar = tqdm(
            total=int(getattr(pl_module, "pending_units", 0)),
            desc=desc,
            unit="unit",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._bar is not None:
            self._bar.update(int(outputs["units"].numel()))

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._close()


# -- writing -----------------------------------------------------------------------------------


class FeatureWriter(BasePredictionWriter):
    """Writes encoded units into the store and finalises it when all are done.

    Rows are written into the memory-mapped arrays as they come; every ``sync_interval``
    seconds (and at the end, or on an exception) the arrays are flushed to disk and only then
    are the units marked in ``done.npy``, so a done mark never precedes its rows on disk. A
    killed process loses at most the last ``sync_interval`` seconds of work.

    Args:
        out_dir: the final store folder.
        manifest: the store's manifest (``complete`` is set here at the end).
        plan: the work units (the same on every rank).
        discard_partial: rank 0 deletes a stale scratch folder before creating a fresh one.
        sync_interval: seconds between flushes (0: after every batch).
    """

    def __init__(
        self,
        out_dir: str,
        manifest: dict[str, Any],
        plan: WorkPlan,
        discard_partial: bool,
        sync_interval: float = DEFAULT_SYNC_INTERVAL,
    ) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.scratch = partial_dir(self.out_dir)
        self.manifest = dict(manifest)
        self.plan = plan
        self.discard_partial = discard_partial
        self.sync_interval = sync_interval
        self.units_written = 0
        self.syncs = 0
        self._arrays: dict[str, np.memmap] = {}
        self._pending: list[np.ndarray] = []
        self._last_sync = 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # memmaps are per process (reopened in setup)
        state["_pending"] = []
        return state

    # -- store preparation (rank 0), then every rank opens the arrays ---------------------------
    def _prepare(self) -> None:
        scratch, m = self.scratch, self.manifest
        if self.discard_partial and scratch.exists():
            shutil.rmtree(scratch)
        if scratch.exists() and _resumable(scratch, m, self.plan):
            return
        if scratch.exists():
            # Our own scratch of these inputs that cannot be resumed: a crash during creation,
            # or bookkeeping of an older format version.
            shutil.rmtree(scratch)
        tmp = scratch.with_name(scratch.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        n, d = m["num_rows"], m["dim"]
        for name in (IMAGE, TEXT):
            arr = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=DTYPE, shape=(n, d))
            arr.flush()
            del arr
        units = self.plan.units
        done = np.lib.format.open_memmap(
            tmp / DONE, mode="w+", dtype=np.uint8, shape=(units.shape[0],)
        )
        done.flush()
        del done
        with open(tmp / UNITS, "wb") as fh:
            np.save(fh, units)
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write_json(tmp / MANIFEST, {**m, "complete": False})
        fsync_dir(tmp)
        os.replace(tmp, scratch)
        fsync_dir(scratch.parent)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self._prepare()
        trainer.strategy.barrier("leverlm-features-prepared")
        n, d = self.manifest["num_rows"], self.manifest["dim"]
        self._arrays = {
            "image": open_array(self.scratch / IMAGE, n, d, mode="r+"),
            "text": open_array(self.scratch / TEXT, n, d, mode="r+"),
            "done": np.load(self.scratch / DONE, mmap_mode="r+"),
        }
        self._pending = []
        self._last_sync = time.monotonic()

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        units = prediction["units"].cpu().numpy()
        if units.size == 0:
            return
        positions = prediction["positions"].cpu().numpy()
        rows = prediction["features"].float().cpu().numpy().astype(DTYPE)
        self._arrays[prediction["kind"]][positions] = rows
        self._pending.append(units)
        self.units_written += int(units.size)
        if time.monotonic() - self._last_sync >= self.sync_interval:
            self._sync()

    def _sync(self) -> None:
        """Flush the written rows to disk, then mark their units done (and flush the marks)."""
        self._last_sync = time.monotonic()
        if not self._pending or not self._arrays:
            return
        # Rows reach the file before their done marks: a crash in between only recomputes them.
        self._arrays["image"].flush()
        self._arrays["text"].flush()
        done = self._arrays["done"]
        done[np.concatenate(self._pending)] = 1
        done.flush()
        self._pending = []
        self.syncs += 1

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Keep what this rank finished before the error (the rerun resumes after it).
        self._sync()
        self._arrays = {}

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync()
        trainer.strategy.barrier("leverlm-features-written")
        if trainer.is_global_zero:
            done = self._arrays["done"]
            missing = int(done.size - np.count_nonzero(done))
            if missing == 0:
                self._finalize()
            else:
                log.warning(
                    "feature store %s: %d work units are not written yet; rerun to finish",
                    self.scratch,
                    missing,
                )
        self._arrays = {}
        trainer.strategy.barrier("leverlm-features-finalized")

    def _finalize(self) -> None:
        # Duplicates get their representative's row; a crash here leaves every unit marked
        # done, so a rerun goes straight back to this step.
        for kind, rep in (("image", self.plan.image_rep), ("text", self.plan.text_rep)):
            arr = self._arrays[kind]
            copy_from_representatives(arr, rep)
            arr.flush()
        self._arrays = {}
        (self.scratch / DONE).unlink()
        (self.scratch / UNITS).unlink()
        atomic_write_json(self.scratch / MANIFEST, {**self.manifest, "complete": True})
        atomic_replace_dir(self.scratch, self.out_dir)


def _resumable(scratch: Path, manifest: dict[str, Any], plan: WorkPlan) -> bool:
    """Whether ``scratch`` holds a started build of exactly these features and work units."""
    try:
        old = read_manifest(scratch)
    except FeatureStoreError:
        return False
    if old.get("version") != FORMAT_VERSION or identity_diff(old, manifest):
        return False
    n, d = manifest["num_rows"], manifest["dim"]
    try:
        for name in (IMAGE, TEXT):
            open_array(scratch / name, n, d)
        done = np.load(scratch / DONE, mmap_mode="r")
        units = np.load(scratch / UNITS, allow_pickle=False)
    except (FeatureStoreError, OSError, ValueError):
        return False
    return (
        done.shape == (plan.num_units,)
        and done.dtype == np.uint8
        and units.shape == plan.units.shape
        and bool(np.array_equal(units, plan.units))
    )


def _resolve_text_field(collection: Any, text_field: str | None) -> str:
    """The field the text encoder sees: given, or the collection task's ``feature_text`` field."""
    from leverlm.tasks import get_task

    if text_field is None:
        text_field = get_task(collection.task).text_field
    fields = collection.fields(0)
    value = fields.get(text_field)
    if not isinstance(value, str):
        raise FeatureStoreError(
            f"collection {collection.path}: text field {text_field!r} is "
            f"{'missing' if value is None else 'not a string'} in sample "
            f"{collection.keys[0]!r}; string fields: "
            f"{sorted(k for k, v in fields.items() if isinstance(v, str))}"
        )
    return text_field


def build_manifest(
    collection: Any,
    encoder: ClipEncoder,
    *,
    model_name: str,
    pretrained: str | None,
    checkpoint: str | None,
    seed: int,
    text_field: str,
) -> dict[str, Any]:
    """The manifest of the store these inputs produce (``complete`` false)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_name": model_name,
        "pretrained": pretrained,
        "checkpoint": checkpoint,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        # The seed only matters for a random init.
        "seed": None if checkpoint else seed,
        "precision": encoder.precision,
        "dim": encoder.dim,
        "dtype": np.dtype(DTYPE).name,
        "normalize": encoder.normalize,
        "collection_name": collection.name,
        "collection_path": str(Path(collection.path).resolve()),
        "collection_manifest_sha256": sha256_file(Path(collection.path) / "manifest.json"),
        "num_rows": len(collection),
        "text_field": text_field,
        "complete": False,
    }


def add_plan_counts(manifest: dict[str, Any], plan: WorkPlan) -> dict[str, Any]:
    """The manifest with the work plan's counts (None where duplicates were not looked for)."""
    return {
        **manifest,
        "dedup": plan.dedup,
        "num_distinct_images": plan.num_images if plan.dedup else None,
        "num_distinct_texts": plan.num_texts if plan.dedup else None,
    }


def compute_features(
    collection_path: str | os.PathLike,
    out_dir: str | os.PathLike | None,
    model_name: str,
    pretrained: str | None = None,
    batch_size: int = 64,
    text_field: str | None = None,
    normalize: bool = False,
    devices: int | str = 1,
    accelerator: str = "cpu",
    num_workers: int = 0,
    overwrite: bool = False,
    *,
    precision: str = "fp32",
    strategy: str = "auto",
    seed: int = 0,
    progress: bool = False,
    callbacks: Sequence[L.Callback] = (),
    dedup: bool = True,
    sync_interval: float = DEFAULT_SYNC_INTERVAL,
) -> Path:
    """Encode every sample of a collection into a feature store; return the store folder.

    Each distinct image and text is encoded once (``dedup``). Resumes an interrupted build of
    the same features (rows come out byte-identical to an uninterrupted run when the resumed
    job keeps the same ``batch_size``); returns at once when the store is already complete. All
    inputs (every sample's text field included) are checked before any encoding or write.

    Args:
        out_dir: the store folder; None for ``default_feature_dir(collection_path, model_name)``.
        text_field: sample field for the text encoder; None for the collection task's
            ``Task.text_field`` (question for VQA, caption for captioning).
        normalize: L2-normalise rows before storing them.
        devices / accelerator / strategy: Lightning Trainer settings (``strategy="ddp"`` for a
            multi-GPU job; ``"ddp_spawn"`` where the command cannot be re-executed).
        overwrite: build afresh (discarding any unfinished build) and replace the existing store;
            the old store stays in place, valid, until the new one is complete.
        precision: encoder precision (``fp32``, ``fp16``, ``bf16``, ``pure_fp16``, ``pure_bf16``).
        seed: random-init seed when ``pretrained`` is None.
        progress: show a progress bar over work units.
        callbacks: extra Lightning callbacks (tests).
        dedup: encode each distinct image (content hash) and text (exact string) once; False
            encodes every position (the reference path, for parity checks and benchmarks).
        sync_interval: seconds between flushes of written rows and their done marks; a killed
            job recomputes at most this much work (0: flush after every batch).
    """
    from leverlm.data.collection import Collection

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if (
        isinstance(sync_interval, bool)
        or not isinstance(sync_interval, int | float)
        or not (sync_interval >= 0)
    ):
        raise ValueError(f"sync_interval must be a number >= 0, got {sync_interval!r}")
    collection = Collection(collection_path)
    if len(collection) == 0:
        raise FeatureStoreError(f"collection {collection.path} has no samples")
    text_field = _resolve_text_field(collection, text_field)
    checkpoint, _ = resolve_pretrained(model_name, pretrained)
    encoder = load_clip(model_name, pretrained, precision=precision, normalize=normalize, seed=seed)
    manifest = build_manifest(
        collection,
        encoder,
        model_name=model_name,
        pretrained=pretrained,
        checkpoint=checkpoint,
        seed=seed,
        text_field=text_field,
    )
    out = Path(out_dir) if out_dir is not None else default_feature_dir(collection.path, model_name)
    scratch = partial_dir(out)

    if out.exists():
        if (out / MANIFEST).is_file():
            existing = read_manifest(out)
            diff = identity_diff(existing, manifest)
            if not diff and existing.get("complete") and not overwrite:
                log.info("feature store %s is already complete", out)
                return out
            if diff and not overwrite:
                raise FeatureStoreError(
                    f"feature store {out} was built from other inputs ({'; '.join(diff)}); "
                    f"pass overwrite=True / --overwrite to replace it, or choose another --out"
                )
        elif not out.is_dir() or any(out.iterdir()):
            raise FeatureStoreError(
                f"output {out} exists and is not a feature store; refusing to replace it"
            )
    # --overwrite always starts afresh; otherwise a started build of these inputs is resumed.
    discard_partial = overwrite
    if not overwrite and (scratch / MANIFEST).is_file():
        try:
            diff = identity_diff(read_manifest(scratch), manifest)
        except FeatureStoreError as err:
            diff = [str(err)]
        if diff:
            raise FeatureStoreError(
                f"an unfinished feature build of other inputs is in {scratch} "
                f"({'; '.join(diff)}); pass overwrite=True / --overwrite to discard it"
            )

    # Every sample is read here (bytes and json only), so a bad text field anywhere fails
    # before anything is written. Each process of a multi-process launch plans for itself: the
    # plan is a deterministic function of the collection.
    started = time.perf_counter()
    plan = plan_work(collection, text_field, dedup=dedup)
    log.info(
        "%s: %d rows -> %d image + %d text work units (dedup %s, planned in %.1f s)",
        collection.path,
        len(collection),
        plan.num_images,
        plan.num_texts,
        "on" if plan.dedup else "off",
        time.perf_counter() - started,
    )
    manifest = add_plan_counts(manifest, plan)

    module = FeatureEncoderModule(
        encoder,
        str(collection.path),
        str(scratch),
        plan,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    writer = FeatureWriter(str(out), manifest, plan, discard_partial, sync_interval)
    # A caller's own progress bar replaces the default one (Lightning takes only one).
    own_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    bars: list[L.Callback] = [UnitProgressBar()] if progress and not own_bar else []
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        callbacks=[writer, *bars, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        use_distributed_sampler=False,  # the module deals out the batches itself
        inference_mode=True,
    )
    trainer.predict(module, return_predictions=False)
    if trainer.interrupted:
        raise RuntimeError(f"feature job interrupted; rerun to resume from {scratch}")
    final = read_manifest(out) if (out / MANIFEST).is_file() else {}
    if not final.get("complete") or identity_diff(final, manifest):
        raise RuntimeError(
            f"feature job ended without completing {out}; rerun to resume from {scratch}"
        )
    return out


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"leverlm features: cannot read config {path}: {err}") from err
    if not isinstance(data, dict):
        raise SystemExit(f"leverlm features: config {path} must be a mapping of option: value")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SystemExit(
            f"leverlm features: config {path}: unknown key(s) {unknown}; known: {sorted(known)}"
        )
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leverlm features",
        description=(
            "CLIP image/text features of a collection, stored as memory-mapped fp16 arrays "
            "(row i = position i). Resumable; multi-GPU through Lightning."
        ),
    )
    p.add_argument("--config", help="YAML file of option: value (e.g. conf/encoder/*.yaml)")
    p.add_argument("--collection", dest="collection_path", help="collection folder")
    p.add_argument(
        "--out",
        dest="out_dir",
        help="store folder (default: <collection>/../features/<collection-name>/<model-name>)",
    )
    p.add_argument("--model", dest="model_name", help="open_clip model name or leverlm-tiny-clip")
    p.add_argument("--pretrained", help="local checkpoint file (or a locally cached tag)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument("--text-field", dest="text_field", help="default: the task's text field")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--devices", default="1", help="number of devices, or 'auto'")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--num-workers", dest="num_workers", type=int, default=0)
    p.add_argument(
        "--cpu-threads",
        dest="cpu_threads",
        type=int,
        help="torch CPU threads (default: $LEVERLM_THREADS, else torch's choice); "
        "1 is fastest for small models on a busy machine",
    )
    p.add_argument("--seed", type=int, default=0, help="random-init seed without --pretrained")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--dedup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode each distinct image/text once (--no-dedup: every row, for comparisons)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``leverlm features``: build (or resume) the feature store of a collection."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_load_config(pre.config, parser))
    args = parser.parse_args(argv)
    for dest, flag in (("collection_path", "--collection"), ("model_name", "--model")):
        if not getattr(args, dest):
            parser.error(f"{flag} is required (on the command line or in --config)")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        parser.error(f"--cpu-threads must be >= 1, got {args.cpu_threads}")
    if args.cpu_threads is not None or os.environ.get("LEVERLM_THREADS"):
        set_cpu_threads(args.cpu_threads)
    devices: int | str = args.devices
    with contextlib.suppress(ValueError):
        devices = int(devices)
    out = compute_features(
        args.collection_path,
        args.out_dir,
        args.model_name,
        pretrained=args.pretrained,
        batch_size=args.batch_size,
        text_field=args.text_field,
        normalize=args.normalize,
        devices=devices,
        accelerator=args.accelerator,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        precision=args.precision,
        strategy=args.strategy,
        seed=args.seed,
        progress=args.progress,
        dedup=args.dedup,
    )
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        print(out)
    return 0
