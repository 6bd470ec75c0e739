"""The feature job: encode a whole collection once, with Lightning predict (1..N devices).

Positions are cut into a fixed grid of batches (``[0, bs)``, ``[bs, 2 bs)``, ...) that does not
depend on the number of processes; the unfinished batches are dealt round-robin to the ranks.
Every row is therefore computed in the same batch on 1 or N processes and after a resume, so
the arrays are byte-identical. Ranks write disjoint rows straight into the memory-mapped
arrays of the scratch folder and then mark them in ``done.npy``; a rerun skips marked rows.
When every row is marked, rank 0 writes the final manifest and moves the folder into place.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
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
    FeatureStoreError,
    default_feature_dir,
    identity_diff,
    open_array,
    read_manifest,
)
from leverlm.utils import atomic_replace_dir, atomic_write_json, fsync_dir, sha256_file

log = logging.getLogger(__name__)


def partial_dir(out_dir: str | os.PathLike) -> Path:
    """The scratch folder a store is built (and resumed) in: ``.<name>.partial`` beside it."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.partial"


def plan_batches(
    num_rows: int, batch_size: int, done: np.ndarray | None, rank: int, world_size: int
) -> list[list[int]]:
    """The batches (lists of positions) rank ``rank`` of ``world_size`` must encode.

    Batch ``b`` is always positions ``[b*batch_size, (b+1)*batch_size)``; a batch is pending if
    any of its rows is not marked in ``done``; pending batches go to ranks round-robin. A rank
    without work gets one empty batch, so every rank runs the predict loop (and its hooks).
    """
    pending = [
        list(range(start, min(start + batch_size, num_rows)))
        for start in range(0, num_rows, batch_size)
        if done is None or not bool(np.all(done[start : start + batch_size]))
    ]
    mine = pending[rank::world_size]
    return mine or [[]]


class _BatchDataset(Dataset):
    """Item ``i`` is the whole preprocessed batch ``batches[i]`` (one DataLoader worker each)."""

    def __init__(
        self,
        collection: Any,
        batches: list[list[int]],
        text_field: str,
        preprocess: Any,
        tokenizer: Any,
        image_shape: tuple[int, int, int],
        context_length: int,
    ) -> None:
        self.collection = collection
        self.batches = batches
        self.text_field = text_field
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.image_shape = image_shape
        self.context_length = context_length

    def __len__(self) -> int:
        return len(self.batches)

    def _text(self, pos: int) -> str:
        fields = self.collection.fields(pos)
        value = fields.get(self.text_field)
        if not isinstance(value, str):
            key = self.collection.keys[pos]
            raise FeatureStoreError(
                f"collection {self.collection.path}: sample {key!r} (position {pos}) has "
                f"{'no' if value is None else 'a non-string'} text field {self.text_field!r}"
            )
        return value

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        positions = self.batches[i]
        if not positions:
            return {
                "positions": torch.zeros(0, dtype=torch.long),
                "pixels": torch.zeros(0, *self.image_shape),
                "tokens": torch.zeros(0, self.context_length, dtype=torch.long),
            }
        pixels = torch.stack(
            [self.preprocess(self.collection.image(p).convert("RGB")) for p in positions]
        )
        tokens = self.tokenizer([self._text(p) for p in positions])
        return {"positions": torch.tensor(positions), "pixels": pixels, "tokens": tokens}


class FeatureEncoderModule(L.LightningModule):
    """Predict-only module: ``predict_step`` encodes one batch of positions.

    Args:
        encoder: the CLIP encoder (moved to each rank's device by Lightning).
        collection_path: the collection to encode.
        store_dir: the scratch folder holding ``done.npy`` (read to plan this rank's batches).
        text_field: the sample field the text encoder sees.
    """

    def __init__(
        self,
        encoder: ClipEncoder,
        collection_path: str,
        store_dir: str,
        text_field: str,
        num_rows: int,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.collection_path = collection_path
        self.store_dir = store_dir
        self.text_field = text_field
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.num_workers = num_workers

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
            self.num_rows, self.batch_size, done, self.global_rank, self.trainer.world_size
        )
        del done
        size = _image_size(self.encoder)
        dataset = _BatchDataset(
            Collection(self.collection_path),
            batches,
            self.text_field,
            self.encoder.preprocess,
            self.encoder.tokenizer,
            (3, size[0], size[1]),
            _context_length(self.encoder),
        )
        return DataLoader(
            dataset,
            batch_size=None,  # items are already batches
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        positions = batch["positions"]
        if positions.numel() == 0:
            return {"positions": positions, "image": None, "text": None}
        return {
            "positions": positions,
            "image": self.encoder.encode_pixels(batch["pixels"]),
            "text": self.encoder.encode_tokens(batch["tokens"]),
        }


class FeatureWriter(BasePredictionWriter):
    """Writes predicted rows into the store by position and finalises it when all are done.

    Args:
        out_dir: the final store folder.
        manifest: the store's manifest (``complete`` is set here at the end).
        discard_partial: rank 0 deletes a stale scratch folder before creating a fresh one.
    """

    def __init__(self, out_dir: str, manifest: dict[str, Any], discard_partial: bool) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.scratch = partial_dir(self.out_dir)
        self.manifest = dict(manifest)
        self.discard_partial = discard_partial
        self.rows_written = 0
        self._arrays: dict[str, np.memmap] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # memmaps are per process (reopened in setup)
        return state

    # -- store preparation (rank 0), then every rank opens the arrays ---------------------------
    def _prepare(self) -> None:
        scratch, m = self.scratch, self.manifest
        if self.discard_partial and scratch.exists():
            shutil.rmtree(scratch)
        if scratch.exists() and _resumable(scratch, m):
            return
        if scratch.exists():
            # Our own scratch without a valid manifest: a crash during creation.
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
        done = np.lib.format.open_memmap(tmp / DONE, mode="w+", dtype=np.uint8, shape=(n,))
        done.flush()
        del done
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
        positions = prediction["positions"].cpu().numpy()
        if positions.size == 0:
            return
        image, text, done = self._arrays["image"], self._arrays["text"], self._arrays["done"]
        image[positions] = prediction["image"].float().cpu().numpy().astype(DTYPE)
        text[positions] = prediction["text"].float().cpu().numpy().astype(DTYPE)
        # Rows reach the file before their done flags: a crash in between only recomputes them.
        image.flush()
        text.flush()
        done[positions] = 1
        done.flush()
        self.rows_written += int(positions.size)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for arr in self._arrays.values():
            arr.flush()
        trainer.strategy.barrier("leverlm-features-written")
        if trainer.is_global_zero:
            done = self._arrays["done"]
            missing = int(done.size - np.count_nonzero(done))
            self._arrays = {}
            del done
            if missing == 0:
                self._finalize()
            else:
                log.warning(
                    "feature store %s: %d rows are not written yet; rerun to finish",
                    self.scratch,
                    missing,
                )
        self._arrays = {}
        trainer.strategy.barrier("leverlm-features-finalized")

    def _finalize(self) -> None:
        (self.scratch / DONE).unlink()
        atomic_write_json(self.scratch / MANIFEST, {**self.manifest, "complete": True})
        atomic_replace_dir(self.scratch, self.out_dir)


def _resumable(scratch: Path, manifest: dict[str, Any]) -> bool:
    """Whether ``scratch`` holds a started build of exactly these features."""
    try:
        old = read_manifest(scratch)
    except FeatureStoreError:
        return False
    if identity_diff(old, manifest):
        return False
    n, d = manifest["num_rows"], manifest["dim"]
    try:
        for name in (IMAGE, TEXT):
            open_array(scratch / name, n, d)
        done = np.load(scratch / DONE, mmap_mode="r")
    except (FeatureStoreError, OSError, ValueError):
        return False
    return done.shape == (n,) and done.dtype == np.uint8


def _image_size(encoder: ClipEncoder) -> tuple[int, int]:
    size = getattr(encoder.model.visual, "image_size", 224)
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _context_length(encoder: ClipEncoder) -> int:
    return int(getattr(encoder.tokenizer, "context_length", 77))


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
) -> Path:
    """Encode every sample of a collection into a feature store; return the store folder.

    Resumes an interrupted build of the same features (rows come out byte-identical to an
    uninterrupted run when the resumed job keeps the same ``batch_size``); returns at once when
    the store is already complete. All inputs are checked before any work or write.

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
        callbacks: extra Lightning callbacks (progress, tests).
    """
    from leverlm.data.collection import Collection

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
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

    module = FeatureEncoderModule(
        encoder,
        str(collection.path),
        str(scratch),
        text_field,
        len(collection),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    writer = FeatureWriter(str(out), manifest, discard_partial)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        callbacks=[writer, *callbacks],
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
    p.add_argument("--seed", type=int, default=0, help="random-init seed without --pretrained")
    p.add_argument("--overwrite", action="store_true")
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
    )
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        print(out)
    return 0
