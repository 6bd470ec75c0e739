"""Lever-LM training data: the gt dataset (``leverlm-gt`` folder) as ICD-sequence batches.

A gt folder holds ``manifest.json`` and ``records.jsonl`` (one anchor per line; ``sequences``
are the beams in *prompt order*, best first). :class:`LeverLMDataModule` splits the anchors
90/10 (seeded random, or the authors' first 90% of the sorted positions), keeps every beam of
an anchor (optionally only those scoring at least ``score_threshold``; the authors keep
``>= 0.0``) and yields batches::

    {"query_position": (B,), "tokens": (B, L), "targets": (B, L),
     "query_feats": {m: (B, D)}, "icd_feats": {m: (B, L, D)}}         # frozen CLIP (default)

With ``clip_trainable`` the batch carries CLIP inputs instead of features (the LightningModule
encodes them with its own CLIP): ``"query_clip": {m: pixels (B, 3, H, W) | tokens (B, Lt)}``,
``"icd_clip": {m: (M, ...)}`` for the M ICD tokens of the batch and ``"icd_index": (M,)``
their flat index into ``tokens.view(-1)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch

from leverlm.lever import LeverLMError

if TYPE_CHECKING:
    import numpy as np

MODALITY_NAMES = ("image", "text")
SPLITS = ("random", "sorted")


def refuse_query_text(task: str | None, query_features: Sequence[str] | None) -> None:
    """A caption sample's text is its reference caption, i.e. the answer: Lever-LM may not
    read it for the query (the authors never do; STTR avoids it too)."""
    from leverlm.tasks import TaskError, get_task

    if not task or "text" not in (query_features or ()):
        return
    try:
        kind = get_task(task).name
    except TaskError:
        return
    if kind == "caption":
        raise LeverLMError(
            f"model.query_features={list(query_features)} on a {task!r} task: a caption "
            "collection's text is the reference caption (the answer) and would leak into "
            "the query; use query_features: [image]"
        )


def load_gt(gt_dir: str | os.PathLike) -> tuple[dict[str, Any], list[Any]]:
    """Read and validate a gt dataset for training: ``(manifest, records)``.

    On top of :func:`leverlm.gt.data.read_gt` (format, records, sorting), checks what training
    relies on: ``order``, ``supporting_set.num_samples``, and every position inside the
    supporting set.
    """
    from leverlm.gt.data import GtDataError, read_gt

    if not Path(gt_dir).is_dir():
        raise GtDataError(f"gt dataset folder not found: {gt_dir}")
    manifest, records = read_gt(gt_dir)
    mpath = Path(gt_dir) / "manifest.json"
    if manifest.get("order") not in ("left", "right"):
        raise GtDataError(
            f"{mpath}: field 'order' must be 'left' or 'right', got {manifest.get('order')!r}"
        )
    ss = manifest.get("supporting_set")
    n = ss.get("num_samples") if isinstance(ss, dict) else None
    if not isinstance(n, int) or n < 1:
        raise GtDataError(
            f"{mpath}: field 'supporting_set.num_samples' must be a positive int, got {n!r}"
        )
    if not records:
        raise GtDataError(f"{Path(gt_dir) / 'records.jsonl'}: no records")
    for rec in records:
        bad = [p for s in rec.sequences for p in s if p >= n] + (
            [rec.anchor_position] if rec.anchor_position >= n else []
        )
        if bad:
            raise GtDataError(
                f"{Path(gt_dir) / 'records.jsonl'}: anchor {rec.anchor_key!r} uses positions "
                f"{bad[:5]} outside the supporting set of {n} (supporting_set.num_samples)"
            )
    return manifest, records


def split_anchors(
    positions: Sequence[int], val_fraction: float, seed: int, split: str = "random"
) -> tuple[list[int], list[int]]:
    """Split anchor positions into (train, val); independent of input order.

    ``random``: a seeded permutation, both sides non-empty. ``sorted`` (the authors'): the first
    ``int((1 - val_fraction) * n)`` positions in ascending order train, the rest validate.
    """
    import numpy as np

    if not 0.0 <= val_fraction < 1.0:
        raise LeverLMError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split == "sorted":
        anchors = sorted(set(int(p) for p in positions))
        n_train = int((1.0 - val_fraction) * len(anchors))
        return anchors[:n_train], anchors[n_train:]
    anchors = np.array(sorted(set(int(p) for p in positions)), dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(anchors))
    n_val = math.ceil(len(anchors) * val_fraction) if val_fraction > 0 else 0
    if val_fraction > 0 and len(anchors) > 1:
        n_val = min(max(n_val, 1), len(anchors) - 1)  # both sides non-empty
    val = sorted(anchors[perm[:n_val]].tolist())
    train = sorted(anchors[perm[n_val:]].tolist())
    return train, val


class GtSequenceDataset:
    """Map-style dataset of (query position, ICD sequence) pairs: every kept beam of every anchor."""

    def __init__(self, items: list[tuple[int, tuple[int, ...]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        pos, seq = self.items[i]
        return {"query_position": pos, "icds": list(seq)}


def _gather_rows(arr: Any, index: np.ndarray) -> torch.Tensor:
    """Rows of a (memory-mapped) (N, D) array for an integer index of any shape."""
    import numpy as np
    import torch

    flat = index.reshape(-1)
    # numpy fancy indexing on a memmap reads only those rows; sorted unique reads are fastest
    uniq, inverse = np.unique(flat, return_inverse=True)
    rows = np.asarray(arr[uniq])[inverse]
    return torch.from_numpy(np.ascontiguousarray(rows)).reshape(*index.shape, rows.shape[-1])


class SequenceCollator:
    """Builds a training batch from dataset items (runs in DataLoader workers)."""

    def __init__(
        self,
        num_icds: int,
        support_features: Any,
        query_features: Sequence[str],
        icd_features: Sequence[str],
        clip: dict[str, Any] | None = None,
    ):
        self.num_icds = num_icds
        self.support_features = support_features  # a store folder (or an open store)
        self.query_features = tuple(query_features)
        self.icd_features = tuple(icd_features)
        self.clip = clip  # {"model": name, "collection": path, "task": name} when trainable
        self._store: Any = None
        self._clip_io: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # memmaps and collections are reopened per worker process
        state = dict(self.__dict__)
        state["_store"] = state["_clip_io"] = None
        return state

    def _features(self) -> Any:
        if self._store is None:
            from leverlm.encoders.store import open_store

            self._store = open_store(self.support_features)
        return self._store

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np
        import torch

        from leverlm.lever.model import IGNORE_INDEX

        N = self.num_icds
        eos, bos, query = N, N + 1, N + 2
        B = len(items)
        L = max(len(it["icds"]) for it in items) + 2
        tokens = np.full((B, L), eos, dtype=np.int64)
        targets = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
        tokens[:, 0], tokens[:, 1] = bos, query
        for b, it in enumerate(items):
            n = len(it["icds"])
            tokens[b, 2 : 2 + n] = it["icds"]
            targets[b, 1 : 1 + n] = it["icds"]
            targets[b, 1 + n] = eos
        qpos = np.array([it["query_position"] for it in items], dtype=np.int64)
        batch: dict[str, Any] = {
            "query_position": torch.from_numpy(qpos),
            "tokens": torch.from_numpy(tokens),
            "targets": torch.from_numpy(targets),
        }
        if self.clip is not None:
            batch.update(self._clip_batch(qpos, tokens))
            return batch
        if self.query_features or self.icd_features:
            store = self._features()
            icd_rows = np.minimum(tokens, N - 1)  # special tokens: any row, masked in the model
            batch["query_feats"] = {
                m: _gather_rows(getattr(store, m), qpos) for m in self.query_features
            }
            batch["icd_feats"] = {
                m: _gather_rows(getattr(store, m), icd_rows) for m in self.icd_features
            }
        return batch

    def _clip_batch(self, qpos: np.ndarray, tokens: np.ndarray) -> dict[str, Any]:
        import numpy as np
        import torch

        if self._clip_io is None:
            self._clip_io = ClipInputs(
                self.clip["model"], self.clip["collection"], self.clip.get("task")
            )
        io = self._clip_io
        icd_index = np.flatnonzero(tokens.reshape(-1) < self.num_icds)
        icd_pos = tokens.reshape(-1)[icd_index]
        return {
            "query_clip": io.inputs(qpos.tolist(), self.query_features),
            "icd_clip": io.inputs(icd_pos.tolist(), self.icd_features),
            "icd_index": torch.from_numpy(icd_index.astype(np.int64)),
        }


def clip_skeleton(clip_model: str) -> Any:
    """An open_clip encoder whose weights are not used or come next (a checkpoint's): built
    without the random-init warning, which would be false here."""
    import warnings

    from leverlm.encoders import load_clip

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="open_clip model .* has no checkpoint")
        return load_clip(clip_model, None)


class ClipInputs:
    """CLIP inputs (preprocessed pixels, text tokens) of collection samples, by position."""

    def __init__(self, clip_model: str, collection: str, task: str | None):
        from leverlm.data.collection import Collection

        # Only the preprocessing and tokenizer are used; the weights stay in the LightningModule.
        enc = clip_skeleton(clip_model)
        self.preprocess, self.tokenizer = enc.preprocess, enc.tokenizer
        self.collection = Collection(collection)
        self.task = task

    def texts(self, positions: Sequence[int]) -> list[str]:
        from leverlm.tasks import get_task

        fields = [self.collection.fields(p) for p in positions]
        if self.task is not None:
            task = get_task(self.task)
            return [task.feature_text(f) for f in fields]
        return [str(f.get("question") or f.get("caption") or "") for f in fields]

    def inputs(
        self, positions: Sequence[int], modalities: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        import torch

        out: dict[str, torch.Tensor] = {}
        if "image" in modalities:
            imgs = [self.preprocess(self.collection.image(p)) for p in positions]
            out["image"] = torch.stack(imgs) if imgs else torch.zeros(0)
        if "text" in modalities:
            out["text"] = self.tokenizer(self.texts(positions))
        return out


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation per epoch drawn from ``(seed, epoch)`` alone (Lightning calls
    :meth:`set_epoch`), so a resumed run sees the same order as an uninterrupted one."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class LeverLMDataModule(L.LightningDataModule):
    """The gt dataset as Lever-LM training/validation batches.

    Args:
        gt_dir: a ``leverlm-gt`` folder (manifest.json + records.jsonl).
        support_features: the supporting set's feature store (frozen CLIP), built for the gt
            dataset's supporting set (checked by its manifest sha256).
        supporting_set: the supporting-set collection; default: the gt manifest's
            ``supporting_set.path``. Needed for trainable CLIP and for images in the
            decoded-sequence table.
        val_fraction: fraction of *anchors* held out (all their beams go to validation).
        split: ``random`` (seeded by ``seed``; anchors left without beams by
            ``score_threshold`` take no part) or ``sorted`` (the authors': the first
            ``1 - val_fraction`` of all anchor positions in ascending order train, split before
            the score filter).
        score_threshold: keep only beams whose final score is at least this (the authors: 0.0).
        sequence_order: ``prompt`` = as stored (the order Lever-LM generates and the prompt
            uses); ``construction`` = the order the beam search added them (reversed for
            ``order: left``).
        query_features / icd_features: modalities to gather (set from the model by the CLI).
        clip_trainable / clip_model: stream CLIP inputs instead of features (set by the CLI).
    """

    def __init__(
        self,
        gt_dir: str,
        support_features: str | None = None,
        supporting_set: str | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        split: Literal["random", "sorted"] = "random",
        score_threshold: float | None = None,
        sequence_order: Literal["prompt", "construction"] = "prompt",
        num_workers: int = 0,
        query_features: list[str] | None = None,
        icd_features: list[str] | None = None,
        clip_trainable: bool = False,
        clip_model: str = "ViT-B-32-quickgelu",
    ):
        super().__init__()
        if batch_size < 1:
            raise LeverLMError(f"data.batch_size must be >= 1, got {batch_size}")
        if sequence_order not in ("prompt", "construction"):
            raise LeverLMError(
                f"data.sequence_order must be prompt|construction, got {sequence_order!r}"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise LeverLMError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if split not in SPLITS:
            raise LeverLMError(f"data.split must be one of {SPLITS}, got {split!r}")
        self.gt_dir = str(gt_dir)
        # read and validated now: a bad gt folder fails before any model is built
        self.manifest, self._records = load_gt(gt_dir)
        ss = self.manifest["supporting_set"]
        self.num_icds: int = int(ss["num_samples"])
        self.task: str | None = self.manifest.get("task")
        refuse_query_text(self.task, query_features)
        ss_path = supporting_set or ss.get("path") or None
        # absolute, so a checkpoint still finds it from another working directory
        self.supporting_set_path: str | None = os.path.abspath(ss_path) if ss_path else None
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed
        self.split = split
        self.score_threshold, self.sequence_order = score_threshold, sequence_order
        self.num_workers = num_workers
        self.clip_trainable, self.clip_model = clip_trainable, clip_model
        self.supporting_set_sha256: str | None = ss.get("manifest_sha256")
        self.support_features_path: str | None = None
        self.feature_dim: int | None = None
        self._store: Any = None
        if not clip_trainable:
            if support_features is None:
                if query_features or icd_features:
                    raise LeverLMError(
                        "data.support_features is required: the model reads CLIP features "
                        f"(query {query_features}, ICD {icd_features})"
                    )
            else:
                self._open_store(str(support_features))
        elif self.supporting_set_path is None:
            raise LeverLMError(
                "data.supporting_set is required with clip_trainable (images are streamed)"
            )
        available = list(MODALITY_NAMES) if (self._store is not None or clip_trainable) else []
        self.query_features = list(available if query_features is None else query_features)
        self.icd_features = list(available if icd_features is None else icd_features)
        self.train_dataset: GtSequenceDataset | None = None
        self.val_dataset: GtSequenceDataset | None = None

    def _open_store(self, path: str) -> None:
        from leverlm.encoders.store import open_store

        self._store = open_store(
            path,
            self.supporting_set_path,
            sha256=self.supporting_set_sha256,
            what="data.support_features",
        )
        self.support_features_path = os.path.abspath(path)
        self.feature_dim = int(self._store.image.shape[1])

    @property
    def store(self) -> Any:
        """The supporting set's feature store (None with trainable CLIP)."""
        return self._store

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        records = self._records
        reverse = self.sequence_order == "construction" and self.manifest["order"] == "left"
        by_anchor: dict[int, list[tuple[int, ...]]] = {}
        for rec in records:
            kept = [
                s
                for s, score in zip(rec.sequences, rec.scores, strict=True)
                if self.score_threshold is None or score >= self.score_threshold
            ]
            if kept:
                by_anchor[rec.anchor_position] = [
                    tuple(reversed(s)) if reverse else tuple(s) for s in kept
                ]
        if not by_anchor:
            raise LeverLMError(
                f"no gt sequence of {self.gt_dir} has a score >= score_threshold={self.score_threshold}"
            )
        # the authors split all anchors, then filter; the random split sees only kept anchors
        anchors = [r.anchor_position for r in records] if self.split == "sorted" else by_anchor
        train, val = split_anchors(list(anchors), self.val_fraction, self.seed, self.split)
        self.train_dataset = GtSequenceDataset(
            [(a, s) for a in train for s in by_anchor.get(a, ())]
        )
        self.val_dataset = GtSequenceDataset([(a, s) for a in val for s in by_anchor.get(a, ())])

    def collator(self) -> SequenceCollator:
        clip = None
        if self.clip_trainable:
            clip = {
                "model": self.clip_model,
                "collection": self.supporting_set_path,
                "task": self.task,
            }
        return SequenceCollator(
            self.num_icds,
            self.support_features_path,
            self.query_features,
            self.icd_features,
            clip=clip,
        )

    def _loader(self, dataset: GtSequenceDataset, shuffle: bool) -> Any:
        from torch.utils.data import DataLoader

        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(dataset), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=self.collator(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> Any:
        self.setup("fit")
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> Any:
        self.setup("validate")
        if not len(self.val_dataset):
            return []
        return self._loader(self.val_dataset, shuffle=False)
