"""``leverlm gt``: ground-truth ICD sequences as a Lightning predict job.

``leverlm gt predict --config conf/gt/easyvqa_tiny.yaml --out runs/gt/easyvqa`` runs
:class:`GtModule` (LVLM + beam search) over :class:`GtDataModule` (anchors of the train
collection with their candidate sets) with :class:`GtWriter` writing each rank's records as
atomic part files, and merges them into a gt dataset (see :mod:`leverlm.gt.data`) at the end.
``leverlm gt merge --out DIR`` merges on its own. On several nodes, ``--out`` must be on a
filesystem every node sees (rank 0 merges what all ranks wrote); otherwise gather the
``parts/`` folders into one and run ``leverlm gt merge``.

Overrides work as in any LightningCLI: ``--trainer.devices 8 --trainer.num_nodes 2
--data.num_anchors 5000 --model.beam_size 5``; ``--print_config`` shows the resolved config.

Resume: rerunning the same command skips the anchors already in ``OUT/parts`` and finishes the
rest; the merged dataset is byte-identical to an uninterrupted run. The config hash covers the
``data`` and ``model`` sections only (what determines the records), so a rerun may change the
number of devices, the logger or the progress settings.

Bad configs (impossible beam/candidate sizes, a missing collection, LVLM folder or feature
file, an output folder holding another config's results) are refused before the LVLM loads.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from leverlm.errors import LeverError
from leverlm.gt.beam import (
    BeamConfigError,
    CiderGainScorer,
    ScoreFn,
    beam_search,
    check_beam_config,
    infoscore_scorer,
)
from leverlm.gt.data import (
    GtDataError,
    GtRecord,
    check_out_dir,
    done_positions,
    make_header,
    merge,
    next_part_seq,
    prepare_out_dir,
    write_part,
)
from leverlm.gt.samplers import SAMPLERS, SamplerError, build_sampler, select_anchors, split_counts
from leverlm.utils import setup_job_logging, sha256_file

log = logging.getLogger("leverlm.gt")

SCORERS = ("infoscore", "logprob_mean", "logprob_sum", "cider_gain")


class GtConfigError(LeverError):
    """An impossible or inconsistent gt configuration (names the setting and the value)."""


# -- data -----------------------------------------------------------------------------------


def _identity(x: Any) -> Any:
    return x


class AnchorBatches(torch.utils.data.IterableDataset):
    """Batches of anchors with their candidate sets and decoded samples, for one rank.

    Each item: ``{"anchors": [sample, ...], "candidates": [[pos, ...], ...],
    "samples": {pos: sample}}`` (``samples`` holds every candidate of the batch). DataLoader
    workers take every ``num_workers``-th batch, so each anchor is yielded exactly once.
    """

    def __init__(
        self,
        collection: str,
        anchors: Sequence[int],
        anchors_per_batch: int,
        sampler_kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        self.collection, self.anchors = collection, list(anchors)
        self.anchors_per_batch, self.sampler_kwargs = anchors_per_batch, sampler_kwargs

    def batches(self) -> list[list[int]]:
        n = self.anchors_per_batch
        return [self.anchors[i : i + n] for i in range(0, len(self.anchors), n)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from leverlm.data.collection import Collection

        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        coll = Collection(self.collection)
        sampler = build_sampler(num_samples=len(coll), **self.sampler_kwargs)
        mine = self.batches()[worker::num_workers]
        # All of this worker's candidate sets in one call: the similarity samplers scan the
        # feature array once per block of anchors, so full blocks beat one scan per batch.
        flat = sampler.sample([a for batch in mine for a in batch])
        start = 0
        for batch in mine:
            candidates, start = flat[start : start + len(batch)], start + len(batch)
            needed = sorted({p for c in candidates for p in c})
            yield {
                "anchors": [coll[a] for a in batch],
                "candidates": candidates,
                "samples": {p: coll[p] for p in needed},
            }


class GtDataModule(pl.LightningDataModule):
    """Anchors of the train collection (the supporting set) and their candidate sets.

    Anchors are a seeded random subset, split over ranks after removing the ones already
    done (see :meth:`skip`): every anchor is processed exactly once across ranks, uneven
    shares included (no sampler padding). Anchors and their candidates are read by position
    (the collection's offset index) in DataLoader workers: anchors are a sparse subset, so
    random access beats streaming every shard.

    Args:
        collection: the train collection folder (also the supporting set).
        num_anchors: how many anchors (paper: 5000); ``null``/``-1`` for every sample.
        seed: chooses the anchors and the random candidate sets.
        sampler: ``random`` | ``image_sim`` | ``text_sim`` | ``joint_sim`` | ``mix``.
        num_candidates: candidate-set size K (paper: 64).
        support_features: the collection's feature store (``leverlm features``), for the
            similarity samplers.
        mix: the ``mix`` blend, e.g. ``{random: 0.5, image_sim: 0.25, text_sim: 0.25}``.
        anchors_per_batch: anchors per predict step (and per part file).
        num_workers: DataLoader workers decoding anchor and candidate samples.
    """

    def __init__(
        self,
        collection: str,
        num_anchors: int | None = 5000,
        seed: int = 0,
        sampler: str = "random",
        num_candidates: int = 64,
        support_features: str | None = None,
        mix: dict[str, float] | None = None,
        anchors_per_batch: int = 4,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        self.collection = collection
        self.num_anchors, self.seed = num_anchors, seed
        self.sampler, self.num_candidates = sampler, num_candidates
        self.support_features, self.mix = support_features, mix
        self.anchors_per_batch, self.num_workers = anchors_per_batch, num_workers
        self._anchors: list[int] | None = None
        self._done: set[int] = set()
        self.rank, self.world_size = 0, 1

    @property
    def sampler_kwargs(self) -> dict[str, Any]:
        return {
            "kind": self.sampler,
            "k": self.num_candidates,
            "seed": self.seed,
            "support_features": self.support_features,
            "mix": self.mix,
            "collection": self.collection,
        }

    @property
    def anchors(self) -> list[int]:
        """Every anchor of the run (sorted positions)."""
        if self._anchors is None:
            from leverlm.data.collection import read_manifest

            n = int(read_manifest(self.collection)["num_samples"])
            self._anchors = select_anchors(n, self.num_anchors, self.seed)
        return self._anchors

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size

    def skip(self, done: set[int]) -> None:
        """Leave out anchors already finished (by an earlier, interrupted run)."""
        self._done = set(done)

    @property
    def todo(self) -> list[int]:
        """Anchors not done yet, over all ranks."""
        return [a for a in self.anchors if a not in self._done]

    @property
    def rank_anchors(self) -> list[int]:
        """This rank's share of :attr:`todo` (interleaved, so shares differ by at most one)."""
        return self.todo[self.rank :: self.world_size]

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        dataset = AnchorBatches(
            self.collection, self.rank_anchors, self.anchors_per_batch, self.sampler_kwargs
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=False,
        )


# -- model ----------------------------------------------------------------------------------


class GtModule(pl.LightningModule):
    """Beam search over a frozen LVLM for a batch of anchors (``predict_step``).

    Args:
        model_type: the LVLM family (``idefics``, ``flamingo``, ...; see ``leverlm.lvlm``).
        path: the LVLM checkpoint folder (``from_pretrained``).
        task: prompt recipe (``vqa``, ``vqa_idefics``, ``caption``).
        dtype: LVLM precision (paper: ``bf16``).
        beam_size / shots: paper 5 / 2.
        order: ``left`` (paper: each new ICD farthest from the query) or ``right``.
        ranking: ``last`` (paper: the last step's score) or ``cumulative``.
        scorer: ``infoscore`` (paper), ``logprob_mean`` / ``logprob_sum`` (the scorer
            module's other metrics) or ``cider_gain`` (captioning).
        candidate_batch_size: candidates scored per LVLM forward (paper: 32).
        loader: optional ``"module:function"`` LVLM loader registered for ``model_type``
            (a custom adapter, without editing the registry).
        lvlm_kwargs: extra keyword arguments for the LVLM loader.
    """

    def __init__(
        self,
        model_type: str = "idefics",
        path: str = "",
        task: str = "vqa_idefics",
        dtype: str = "bf16",
        beam_size: int = 5,
        shots: int = 2,
        order: str = "left",
        ranking: str = "last",
        scorer: str = "infoscore",
        candidate_batch_size: int = 32,
        loader: str | None = None,
        lvlm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # ``dtype``/``device`` are LightningModule properties: the LVLM's get their own names.
        self.model_type, self.lvlm_path, self.task, self.lvlm_dtype = model_type, path, task, dtype
        self.beam_size, self.shots, self.order, self.ranking = beam_size, shots, order, ranking
        self.scorer, self.candidate_batch_size = scorer, candidate_batch_size
        self.loader, self.lvlm_kwargs = loader, dict(lvlm_kwargs or {})
        self.lvlm: Any = None

    def setup(self, stage: str) -> None:
        if self.lvlm is not None:
            return
        from leverlm.lvlm import load_lvlm, register_lvlm

        if self.loader:
            register_lvlm(self.model_type, self.loader)
        self.lvlm = load_lvlm(
            self.model_type,
            self.lvlm_path,
            self.task,
            dtype=self.lvlm_dtype,
            device=self.device,
            **self.lvlm_kwargs,
        )

    def score_fn(
        self, anchor: dict[str, Any], samples: dict[int, Any], candidates: list[int]
    ) -> ScoreFn:
        """The beam-search scorer of one anchor."""
        if self.scorer == "cider_gain":
            return CiderGainScorer(
                self.lvlm.generate,
                anchor,
                samples,
                candidates,
                order=self.order,
                batch_size=self.candidate_batch_size,
            )
        return infoscore_scorer(
            self.lvlm,
            anchor,
            samples,
            order=self.order,
            metric=self.scorer,
            batch_size=self.candidate_batch_size,
        )

    def search(
        self, anchor: dict[str, Any], candidates: list[int], samples: dict[int, Any]
    ) -> tuple[GtRecord, list[float]]:
        """Beam search for one anchor: its record and every score computed on the way."""
        seen: list[float] = []
        inner = self.score_fn(anchor, samples, candidates)

        def score(prefix: Sequence[int], cands: Sequence[int]) -> list[float]:
            values = [float(v) for v in inner(prefix, cands)]
            seen.extend(values)
            return values

        beams = beam_search(
            candidates,
            score,
            beam_size=self.beam_size,
            shots=self.shots,
            order=self.order,
            ranking=self.ranking,
        )
        return GtRecord.from_beams(anchor["__key__"], anchor["position"], beams), seen

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        records, scores = [], []
        for anchor, candidates in zip(batch["anchors"], batch["candidates"], strict=True):
            rec, seen = self.search(anchor, candidates, batch["samples"])
            records.append(rec)
            scores += seen
        return {"records": records, "scores": scores}


# -- callbacks ------------------------------------------------------------------------------


class GtWriter(BasePredictionWriter):
    """Writes each rank's records as atomic part files; rank 0 merges at the end.

    In ``setup`` (every rank, before any prediction): rank 0 prepares ``out`` (refusing or,
    with ``overwrite``, deleting another config's results) and writes the run header; after a
    barrier every rank reads the finished anchors and tells the datamodule to skip them.
    """

    def __init__(self, out: str, header: dict[str, Any], overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.out, self.header, self.overwrite = Path(out), header, overwrite
        self.seq = 0
        self.written = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            status = prepare_out_dir(self.out, self.header, self.overwrite)
            log.info("gt output %s: %s", self.out, status)
        trainer.strategy.barrier("gt-prepare-out")
        done = done_positions(self.out) & set(self.header["anchors"])
        dm = trainer.datamodule
        if isinstance(dm, GtDataModule):
            dm.skip(done)
            log.info(
                "rank %d: skipped %d anchors already done, %d of %d to do on this rank",
                trainer.global_rank,
                len(done),
                len(dm.rank_anchors),
                len(dm.todo),
            )
        self.seq = next_part_seq(self.out, trainer.global_rank)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        records = prediction["records"]
        if not records:
            return
        write_part(self.out, trainer.global_rank, self.seq, records)
        self.seq += 1
        self.written += len(records)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log.info("rank %d: wrote %d records", trainer.global_rank, self.written)
        trainer.strategy.barrier("gt-merge")
        if not trainer.is_global_zero:
            return
        missing = set(self.header["anchors"]) - done_positions(self.out)
        if missing:
            # e.g. limit_predict_batches / fast_dev_run: what was done is kept for a rerun.
            log.warning(
                "%d of %d anchors not done yet; rerun the same command to finish and merge",
                len(missing),
                len(self.header["anchors"]),
            )
            return
        merge(self.out)
        log.info("gt dataset written to %s", self.out)


def _summary(values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    q10, q50, q90 = np.quantile(arr, [0.1, 0.5, 0.9])
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "p10": float(q10),
        "p50": float(q50),
        "p90": float(q90),
    }


class GtProgress(Callback):
    """Rank 0: a progress bar in anchors (anchors/s, ETA) and throughput + score stats logged.

    Logged per batch: ``gt/anchors_per_s``, ``gt/anchors_done`` and the distribution of every
    candidate score computed (``gt/score_mean|std|min|max|p10|p50|p90``; a histogram too when
    the logger is wandb).
    """

    def __init__(self, enable_bar: bool = True) -> None:
        self.enable_bar = enable_bar
        self.bar: Any = None
        self.done = 0
        self.start = 0.0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.done, self.start = 0, time.perf_counter()
        if not trainer.is_global_zero or not self.enable_bar:
            return
        from tqdm.auto import tqdm

        dm = trainer.datamodule
        total = len(dm.rank_anchors) if isinstance(dm, GtDataModule) else None
        desc = "gt anchors" + (" (rank 0)" if trainer.world_size > 1 else "")
        self.bar = tqdm(total=total, desc=desc, unit="anchor", dynamic_ncols=True)

    @property
    def anchors_per_s(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        n = len(outputs["records"])
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = {"gt/anchors_per_s": self.anchors_per_s, "gt/anchors_done": float(self.done)}
        scores = outputs.get("scores") or []
        if scores:
            metrics |= {f"gt/score_{k}": v for k, v in _summary(scores).items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self.done)
            if type(logger).__name__ == "WandbLogger" and scores:
                import wandb

                hist = wandb.Histogram(scores)
                logger.experiment.log({"gt/score_hist": hist, "trainer/global_step": self.done})

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        log.info(
            "rank %d: %d anchors in %.1fs (%.3f anchors/s)",
            trainer.global_rank,
            self.done,
            time.perf_counter() - self.start,
            self.anchors_per_s,
        )


# -- planning: validate everything before any model loads -----------------------------------


@dataclass
class GtPlan:
    """What a run will do: the header of its parts folder and the status of ``out``."""

    header: dict[str, Any]
    status: str


def _abspath(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def plan_run(
    data: dict[str, Any], model: dict[str, Any], out: str | None, overwrite: bool = False
) -> GtPlan:
    """Check a gt config and build its run header; raises naming the bad value.

    Reads only small files (the collection manifest, ``.npy`` headers, the output folder's
    run header); loads no model.
    """
    from leverlm.data.collection import CollectionError, read_manifest
    from leverlm.lvlm.base import (
        LVLMError,
        check_checkpoint_dir,
        is_local_path,
        known_model_types,
        resolve_dtype,
    )
    from leverlm.tasks import TaskError, get_task

    if not out:
        raise GtConfigError("no output folder: pass --out DIR")
    data, model = dict(data), dict(model)
    try:
        coll_manifest = read_manifest(data["collection"])
    except CollectionError as err:
        raise GtConfigError(f"data.collection: {err}") from err
    n = int(coll_manifest["num_samples"])
    k = int(data["num_candidates"])
    num_anchors = data.get("num_anchors")
    if num_anchors is not None and num_anchors != -1 and num_anchors > n:
        raise GtConfigError(
            f"data.num_anchors={num_anchors} exceeds the collection size: "
            f"{data['collection']} has {n} samples"
        )
    if k > n - 1:
        raise GtConfigError(
            f"data.num_candidates={k} exceeds the {n - 1} candidates available per anchor "
            f"(collection {data['collection']} has {n} samples)"
        )
    if data["sampler"] not in SAMPLERS:
        raise GtConfigError(f"data.sampler={data['sampler']!r}; choose one of {SAMPLERS}")
    if data.get("anchors_per_batch", 1) < 1:
        raise GtConfigError(f"data.anchors_per_batch={data['anchors_per_batch']} must be >= 1")
    if data.get("num_workers", 0) < 0:
        raise GtConfigError(f"data.num_workers={data['num_workers']} must be >= 0")
    if model.get("candidate_batch_size", 1) < 1:
        raise GtConfigError(
            f"model.candidate_batch_size={model['candidate_batch_size']} must be >= 1"
        )
    try:
        check_beam_config(model["beam_size"], model["shots"], k, model["order"], model["ranking"])
        anchors = select_anchors(n, num_anchors, int(data["seed"]))
        if data["sampler"] == "mix":
            split_counts(k, data.get("mix") or {"random": 0.5, "image_sim": 0.25, "text_sim": 0.25})
        # Builds the sampler once: opens (memory-maps) and checks the feature files.
        build_sampler(
            data["sampler"],
            n,
            k,
            int(data["seed"]),
            support_features=data.get("support_features"),
            mix=data.get("mix"),
            collection=data["collection"],
        )
    except (BeamConfigError, SamplerError) as err:
        raise GtConfigError(str(err)) from err
    if model["scorer"] not in SCORERS:
        raise GtConfigError(f"model.scorer={model['scorer']!r}; choose one of {SCORERS}")
    try:
        task = get_task(model["task"])
    except TaskError as err:
        raise GtConfigError(f"model.task: {err}") from err
    if task.name != coll_manifest["task"]:
        raise GtConfigError(
            f"model.task={model['task']!r} is a {task.name!r} task but collection "
            f"{data['collection']} holds {coll_manifest['task']!r} samples"
        )
    if model["scorer"] == "cider_gain" and task.name != "caption":
        raise GtConfigError(
            f"model.scorer='cider_gain' needs a caption task, not {model['task']!r}"
        )
    if not model.get("loader") and model["model_type"] not in known_model_types():
        raise GtConfigError(
            f"model.model_type={model['model_type']!r}; known: {', '.join(known_model_types())}"
        )
    try:
        resolve_dtype(model["dtype"])
        if not model["path"]:
            raise LVLMError("model.path is empty: give the LVLM checkpoint folder")
        if is_local_path(model["path"]):
            check_checkpoint_dir(model["path"])
            model["path"] = _abspath(model["path"])
    except LVLMError as err:
        raise GtConfigError(f"model.path: {err}") from err

    for key in ("collection", "support_features"):
        data[key] = _abspath(data.get(key))
    # Only what determines the records: no worker counts, no batching of anchors.
    result_data = {k: v for k, v in data.items() if k not in ("num_workers", "anchors_per_batch")}
    config = {"data": result_data, "model": model}
    manifest = {
        "task": task.name,
        "order": model["order"],
        "shots": int(model["shots"]),
        "beam_size": int(model["beam_size"]),
        "supporting_set": {
            "path": data["collection"],
            "name": coll_manifest["name"],
            "num_samples": n,
            "manifest_sha256": sha256_file(Path(data["collection"]) / "manifest.json"),
        },
        "lvlm": {"model_type": model["model_type"], "path": model["path"], "dtype": model["dtype"]},
    }
    header = make_header(config, anchors, manifest)
    try:
        status = check_out_dir(out, header["config_sha256"], overwrite)
    except GtDataError as err:
        raise GtConfigError(str(err)) from err
    return GtPlan(header, status)


# -- CLI ------------------------------------------------------------------------------------


class GtCLI(LightningCLI):
    """LightningCLI with only ``predict``, an ``--out``/``--overwrite`` pair and early checks."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--out", type=str | None, default=None, help="gt dataset folder")
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="delete earlier results in --out (of any config) and start over, instead of "
            "resuming (same config) or refusing (another config)",
        )
        parser.add_argument(
            "--progress_bar", type=bool, default=True, help="anchors/s progress bar on rank 0"
        )
        parser.add_argument(
            "--cpu_threads",
            type=int | None,
            default=None,
            help="torch intra-op CPU threads (default: torch's choice); 1 suits tiny models",
        )
        parser.set_defaults({"trainer.enable_progress_bar": False})

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        if cfg["cpu_threads"] is not None:
            if cfg["cpu_threads"] < 1:
                raise GtConfigError(f"cpu_threads={cfg['cpu_threads']} must be >= 1")
            torch.set_num_threads(cfg["cpu_threads"])
        self.plan = plan_run(
            cfg["data"].as_dict(), cfg["model"].as_dict(), cfg["out"], cfg["overwrite"]
        )
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            log.info(
                "gt: %d anchors, config %s..., output %s (%s)",
                len(self.plan.header["anchors"]),
                self.plan.header["config_sha256"][:12],
                cfg["out"],
                self.plan.status,
            )

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        cfg = self.config[self.subcommand]
        trainer_cfg = cfg["trainer"]
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = default_logger(cfg["out"])
        callbacks = list(self._get(self.config_init, "trainer", {}).get("callbacks") or [])
        callbacks += [
            GtWriter(cfg["out"], self.plan.header, cfg["overwrite"]),
            GtProgress(enable_bar=cfg["progress_bar"]),
        ]
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def predict(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        return_predictions: bool | None = None,
        **kwargs: Any,
    ) -> None:
        # Predictions go to part files as they come; holding them all would only cost memory.
        self.trainer.predict(model, datamodule=datamodule, return_predictions=False)


def default_logger(out: str) -> Any:
    """wandb under ``OUT/logs``: offline unless an API key is configured.

    An explicit ``WANDB_MODE`` (``online``, ``offline``, ``disabled``) always wins.
    """
    from lightning.pytorch.loggers import WandbLogger

    save_dir = Path(out) / "logs"
    save_dir.mkdir(parents=True, exist_ok=True)
    offline = not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY")
    return WandbLogger(project="leverlm-gt", save_dir=str(save_dir), offline=offline)


def merge_main(argv: list[str]) -> int:
    """``leverlm gt merge --out DIR``: merge the part files of a finished run."""
    import argparse

    parser = argparse.ArgumentParser(prog="leverlm gt merge", description=merge_main.__doc__)
    parser.add_argument("--out", required=True, help="the gt folder given to `leverlm gt predict`")
    args = parser.parse_args(argv)
    path = merge(args.out)
    print(f"merged {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leverlm gt predict ...`` (LightningCLI) or ``leverlm gt merge --out DIR``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_job_logging(log)
    try:
        if argv and argv[0] == "merge":
            return merge_main(argv[1:])
        # `leverlm gt ...` passes its argv explicitly while sys.argv holds the whole command
        # (which DDP launchers re-run); Lightning warns about that pairing, harmlessly here.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        # Batches carry their anchor positions; Lightning's index tracking is not needed.
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        GtCLI(
            GtModule,
            GtDataModule,
            args=argv,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_callback=None,
            seed_everything_default=0,
            auto_configure_optimizers=False,
        )
    except (GtConfigError, GtDataError) as err:
        print(f"leverlm gt: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "AnchorBatches",
    "GtCLI",
    "GtConfigError",
    "GtDataModule",
    "GtModule",
    "GtPlan",
    "GtProgress",
    "GtWriter",
    "default_logger",
    "main",
    "merge_main",
    "plan_run",
]
