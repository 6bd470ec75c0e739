"""``leverlm gt``: ground-truth ICD sequences, a job on the run layer (:mod:`leverlm.runs`).

``leverlm gt predict --config experiments/easyvqa/gt_demo.yaml --out runs/gt/easyvqa`` runs
:class:`GtModule` (LVLM + beam search) over :class:`GtDataModule` (anchors of the train
collection with their candidate sets); each rank's records go to atomic part files, merged into
a gt dataset (:mod:`leverlm.gt.data`) at the end. ``leverlm gt merge --out DIR`` merges on its
own. On several nodes ``--out`` must be on a filesystem every node sees.

Overrides work as in any LightningCLI: ``--trainer.devices 8 --trainer.num_nodes 2
--data.num_anchors 5000 --model.beam_size 5``; ``--print_config`` shows the resolved config.
A rerun of the same command resumes (the merged dataset is byte-identical to an uninterrupted
run); the run is named by the ``data`` and ``model`` sections and the content of its inputs,
so devices, logger and progress settings may change between reruns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from leverlm.errors import LeverError
from leverlm.gt.beam import (
    BeamConfigError,
    CiderGainScorer,
    ScoreFn,
    beam_search,
    check_beam_config,
    infoscore_scorer,
)
from leverlm.gt.data import GtDataError, GtRecord, write_gt
from leverlm.gt.samplers import SAMPLERS, SamplerError, build_sampler, select_anchors, split_counts
from leverlm.lvlm.base import LVLMSpec
from leverlm.runs import Job, RunDir, RunHeader, input_fingerprint, read_jsonl_parts, run_job

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
    def rank_count(self) -> int:
        return len(self.rank_anchors)

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
        lvlm: which LVLM and how it loads (``conf/lvlm/*.yaml``; paper: bf16).
        task: prompt recipe (``vqa``, ``vqa_idefics``, ``caption``, ...).
        beam_size / shots: paper 5 / 2.
        order: ``left`` (paper: each new ICD farthest from the query) or ``right``.
        ranking: ``last`` (paper: the last step's score) or ``cumulative``.
        scorer: ``infoscore`` (paper), ``logprob_mean`` / ``logprob_sum`` (the scorer
            module's other metrics) or ``cider_gain`` (captioning).
        candidate_batch_size: candidates scored per LVLM forward (paper: 32).
        cider_tokenizer: ``cider_gain``'s tokenisation: ``python`` (the PTB stand-in, no
            process per call) or ``ptb`` (Stanford PTB via Java, one process per beam step).
    """

    def __init__(
        self,
        lvlm: LVLMSpec,
        task: str = "vqa_idefics",
        beam_size: int = 5,
        shots: int = 2,
        order: str = "left",
        ranking: str = "last",
        scorer: str = "infoscore",
        candidate_batch_size: int = 32,
        cider_tokenizer: Literal["python", "ptb"] = "python",
    ) -> None:
        super().__init__()
        self.spec, self.task = lvlm, task
        self.beam_size, self.shots, self.order, self.ranking = beam_size, shots, order, ranking
        self.scorer, self.candidate_batch_size = scorer, candidate_batch_size
        self.cider_tokenizer = cider_tokenizer
        self.lvlm: Any = None

    def setup(self, stage: str) -> None:
        if self.lvlm is None:
            self.lvlm = self.spec.load(self.task, device=self.device)

    def score_fn(
        self, anchor: dict[str, Any], samples: dict[int, Any], candidates: list[int]
    ) -> ScoreFn:
        """The beam-search scorer of one anchor."""
        if self.scorer == "cider_gain":
            from leverlm.metrics import tokenize_captions

            return CiderGainScorer(
                self.lvlm.generate,
                anchor,
                samples,
                candidates,
                order=self.order,
                batch_size=self.candidate_batch_size,
                tokenize=lambda caps: tokenize_captions(caps, self.cider_tokenizer)[0],
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


# -- planning: validate everything before any model loads -----------------------------------


def _abspath(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def plan_run(data: dict[str, Any], model: dict[str, Any]) -> RunHeader:
    """Check a gt config and build its run header; raises naming the bad value.

    Reads only small files (the collection manifest, ``.npy`` headers) and fingerprints the
    inputs; loads no model.
    """
    from leverlm.data.collection import CollectionError, read_manifest
    from leverlm.lvlm.base import is_local_path
    from leverlm.tasks import TaskError, get_task

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
    spec = LVLMSpec.checked(model["lvlm"])
    model["lvlm"] = spec.to_dict()

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
            "manifest_sha256": _manifest_sha(data["collection"]),
        },
        "lvlm": {"model_type": spec.model_type, "path": spec.path, "dtype": spec.dtype},
    }
    inputs = {"collection": input_fingerprint(data["collection"])}
    if is_local_path(spec.path):
        inputs["lvlm"] = input_fingerprint(spec.path)
    if data.get("support_features"):
        inputs["support_features"] = input_fingerprint(data["support_features"])
    return RunHeader("gt", config, inputs, anchors, manifest)


def _manifest_sha(collection: str) -> str:
    from leverlm.utils import sha256_file

    return sha256_file(Path(collection) / "manifest.json")


# -- the job ----------------------------------------------------------------------------------


def _summary(values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    q10, q50, q90 = np.quantile(arr, [0.1, 0.5, 0.9])
    stats = {"mean": arr.mean(), "std": arr.std(), "min": arr.min(), "max": arr.max(),
             "p10": q10, "p50": q50, "p90": q90}  # fmt: skip
    return {f"gt/score_{k}": float(v) for k, v in stats.items()}


class GtJob(Job):
    """Anchors -> records; merged into ``records.jsonl`` + ``manifest.json``."""

    name, unit, units = "gt", "anchor", "anchors"
    results = ("records.jsonl", "manifest.json")

    def plan(self, cfg: dict[str, Any]) -> RunHeader:
        return plan_run(cfg["data"], cfg["model"])

    def _records(self, run: RunDir) -> dict[int, GtRecord]:
        """Every record in the part files, by anchor (a repeat must be identical)."""
        records: dict[int, GtRecord] = {}
        for where, obj in read_jsonl_parts(run.part_files()):
            rec = GtRecord.from_json(obj, where)
            prev = records.setdefault(rec.anchor_position, rec)
            if prev.to_line() != rec.to_line():
                raise GtDataError(
                    f"{where}: anchor {rec.anchor_position} has a different record in another "
                    "part file (two runs wrote to the same folder?)"
                )
        return records

    def done(self, run: RunDir) -> set[int]:
        return set(self._records(run))

    def encode_part(self, outputs: list[Any]) -> bytes:
        return "".join(r.to_line() + "\n" for out in outputs for r in out["records"]).encode()

    def count(self, output: Any) -> int:
        return len(output["records"])

    def progress_metrics(self, output: Any) -> dict[str, float]:
        return _summary(output["scores"]) if output.get("scores") else {}

    def merge(self, run: RunDir) -> Path:
        header = run.header()
        records = self._records(run)
        missing = sorted(set(header.items) - set(records))
        if missing:
            raise GtDataError(
                f"{run.path}: {len(missing)} of {len(header.items)} anchors have no record yet "
                f"(first: {missing[:5]}); rerun `leverlm gt predict` to finish them"
            )
        extra = sorted(set(records) - set(header.items))
        if extra:
            raise GtDataError(f"{run.path}: part files hold anchors not in this run: {extra[:5]}")
        manifest = {**header.manifest, "config": header.config, "run_sha256": header.sha256}
        return write_gt(run.path, list(records.values()), manifest)


def main(argv: list[str]) -> int:
    """``leverlm gt predict ...`` (LightningCLI) or ``leverlm gt merge --out DIR``."""
    return run_job(GtJob(), GtModule, GtDataModule, argv)


__all__ = [
    "AnchorBatches",
    "GtConfigError",
    "GtDataModule",
    "GtJob",
    "GtModule",
    "main",
    "plan_run",
]
