"""``leverlm eval``: in-context evaluation of ICD retrievers with a frozen LVLM, a job on the
run layer (:mod:`leverlm.runs`).

``leverlm eval predict --config experiments/easyvqa/eval_demo.yaml --out runs/eval/easyvqa`` evaluates
every configured method (``zero_shot``, ``random``, ``siir``, ``sttr``, ``sitr``, ``fixed``,
``lever_lm``, ``lever_lm_shuffled``, ``oracle``/``from_file`` or any registered retriever) at
every shot count on the query collection, with ICDs from the supporting set:

1. **Plan** (:func:`plan_eval`, before anything loads): every setting is checked, naming the
   bad value.
2. **Retrieve** (:class:`EvalDataModule`, once per method, up front): each retriever's
   ``prepare`` then ``retrieve`` over *all* queries, so a query's ICDs never depend on batches,
   ranks or resumes.
3. **Generate** (:class:`EvalModule`): work items are (batch of ``batch_size`` queries, method,
   shots), each one batched ``LVLM.generate`` call with the adapter's own prompt code (the one
   the gt scorer uses).
4. **Write and merge**: predictions go to part files; at the end ``OUT/predictions.jsonl``
   (sorted), ``OUT/manifest.json`` and the report (:func:`leverlm.report.write_report`), printed
   and logged.

Batches are fixed chunks of the run's query list, so each generate call sees the same queries
however the work is split over ranks or resumed: the final files are byte-identical to an
uninterrupted 1-process run. ``leverlm eval merge --out DIR`` merges and reports on its own.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch

import leverlm.icl.lever_retriever  # noqa: F401 - registers lever_lm, lever_lm_shuffled, from_file
from leverlm.errors import LeverError
from leverlm.icl.retrievers import RETRIEVERS, Retriever, RetrieverError, available_retrievers
from leverlm.lvlm.base import LVLMSpec
from leverlm.report import Prediction, ReportError, read_predictions
from leverlm.runs import Job, RunDir, RunHeader, input_fingerprint, run_job
from leverlm.utils import atomic_open, atomic_write_json, read_jsonl, sha256_file

if TYPE_CHECKING:
    import numpy as np

    from leverlm.report import Report
    from leverlm.tasks import Task

log = logging.getLogger("leverlm.eval")

FORMAT = "leverlm-eval"
VERSION = 1
PREDICTIONS = "predictions.jsonl"
MANIFEST = "manifest.json"
REPORT_FILES = ("report.md", "report.csv", "report.json", "report.png")
ZERO_SHOT = "zero_shot"
# The paper's evaluation: these methods at 1-4 shots (interpolation; Lever-LM trained on 2)
# and 6, 8 (extrapolation), zero-shot once.
PAPER_METHODS = ("zero_shot", "random", "siir", "sttr", "sitr", "lever_lm")
PAPER_SHOTS = (1, 2, 3, 4, 6, 8)
LEVER_RETRIEVERS = ("lever_lm", "lever_lm_shuffled")
# Retrievers whose picks depend on a seed: evaluated over `data.trials` seeds, reported as mean
# and std (methods "random#0", "random#1", ...).
TRIAL_RETRIEVERS = ("random", "random_fixed", "lever_lm_shuffled")
# Retriever arguments the job fills in from what it knows (unless a method's config sets them).
FEATURE_ARGS = ("support_image", "query_image", "support_text", "query_text")
# Sample field holding a query's references, per metric.
REFERENCE_FIELDS = {"vqa_accuracy": "answers", "cider": "captions"}


class EvalConfigError(LeverError):
    """An impossible or inconsistent eval configuration (names the setting and the value)."""


class EvalError(LeverError):
    """The run's results are incomplete or inconsistent (names the folder and what is missing)."""


# ---------------------------------------------------------------------------------------------
# small pieces
# ---------------------------------------------------------------------------------------------


class EvalPrediction(Prediction):
    """A :class:`~leverlm.report.Prediction` that can be written as a part-file line."""

    def to_line(self) -> str:
        return prediction_line(self)


def prediction_line(pred: Prediction) -> str:
    """One JSONL line (no newline) in the fixed field order; equal predictions, equal bytes."""

    return json.dumps(pred.to_json(), ensure_ascii=False, separators=(",", ":"))


def references_of(task: Task, sample: dict[str, Any]) -> list[str]:
    """The references a query's prediction is scored against (VQA: the 10 human answers;
    captioning: every reference caption), as the task shows them: a task that remaps answers
    per episode (``vqa_nonce``) is scored against the query's own remapped answers."""
    from leverlm.tasks import TaskError

    try:
        sample = task.episode([], sample)[1]
    except TaskError as err:
        raise EvalConfigError(str(err)) from err
    name = REFERENCE_FIELDS.get(task.metric)
    if name is None:
        raise EvalConfigError(f"task {task.name!r}: no reference field for metric {task.metric!r}")
    refs = sample.get(name)
    if refs is None and task.metric == "cider" and sample.get("caption"):
        refs = [sample["caption"]]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise EvalConfigError(
            f"query {sample.get('__key__', '?')!r} has no usable references: field {name!r} "
            f"must be a non-empty list of strings, got {refs!r}"
        )
    return list(refs)


def select_queries(num_samples: int, limit: int | None, seed: int) -> list[int]:
    """The run's query positions: all, or a seeded random subset of ``limit`` (sorted).

    ``limit`` >= the collection size takes every query (a quick-run knob, not a request for
    duplicates).
    """
    from leverlm.gt.samplers import select_anchors

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvalConfigError(f"data.limit must be an int >= 1 or null, got {limit!r}")
    if num_samples < 1:
        raise EvalConfigError("the query collection is empty")
    if limit is None or limit >= num_samples:
        return list(range(num_samples))
    return select_anchors(num_samples, limit, seed)


def eval_units(methods: Sequence[str], shots: Sequence[int]) -> list[tuple[str, int]]:
    """Every (method, shots) of a run: zero-shot once at 0, other methods at each shot count."""
    units: list[tuple[str, int]] = []
    for method in methods:
        if method == ZERO_SHOT:
            units.append((method, 0))
        else:
            units += [(method, int(s)) for s in shots]
    return units


def check_methods_and_shots(methods: Any, shots: Any) -> tuple[list[str], list[int]]:
    """Validate ``data.methods`` and ``data.shots`` (names the bad value)."""
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise EvalConfigError(f"data.methods must be a non-empty list, got {methods!r}")
    methods = list(methods)
    dupes = sorted({m for m in methods if methods.count(m) > 1})
    if dupes:
        raise EvalConfigError(f"data.methods lists {dupes} more than once")
    if isinstance(shots, str) or not isinstance(shots, Sequence):
        raise EvalConfigError(f"data.shots must be a list of ints, got {shots!r}")
    shots = list(shots)
    for s in shots:
        if isinstance(s, bool) or not isinstance(s, int):
            raise EvalConfigError(f"data.shots must be ints, got {s!r}")
        if s < 0:
            raise EvalConfigError(f"data.shots has shots={s}; shot counts must be >= 1")
        if s == 0:
            raise EvalConfigError(
                "data.shots has shots=0: zero-shot is a method of its own; list 'zero_shot' "
                "in data.methods instead"
            )
    if len(set(shots)) != len(shots):
        raise EvalConfigError(f"data.shots {shots} has repeated values")
    if any(m != ZERO_SHOT for m in methods) and not shots:
        raise EvalConfigError("data.shots is empty but methods other than zero_shot are listed")
    return methods, sorted(shots)


def lvlm_id(model_type: str, path: str) -> str:
    """A short name for the LVLM in tables and plots: a hub id as is, else the folder name."""
    from leverlm.lvlm.base import is_local_path

    return Path(path).name if is_local_path(path) else path


def _abspath(path: Any) -> Any:
    return str(Path(path).expanduser().resolve()) if isinstance(path, str) and path else path


# ---------------------------------------------------------------------------------------------
# methods -> retrievers
# ---------------------------------------------------------------------------------------------


@dataclass
class MethodSpec:
    """A method of the run: the registered retriever it uses and its resolved arguments.

    ``source`` records where derived arguments came from (``gt_dir`` for ``fixed``).
    """

    method: str
    retriever: str
    kwargs: dict[str, Any]
    source: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"retriever": self.retriever, **self.kwargs, **self.source}


def accepted_args(factory: Any) -> tuple[set[str], bool]:
    """Keyword arguments a retriever factory accepts, following ``**kwargs`` up its bases.

    Returns ``(names, open)``; ``open`` is true when some ``**kwargs`` goes nowhere known.
    """
    if inspect.isclass(factory):
        functions = [c.__dict__["__init__"] for c in factory.__mro__ if "__init__" in c.__dict__]
    else:
        functions = [factory]
    names: set[str] = set()
    for fn in functions:
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
        names |= {
            p.name
            for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
            return names, False
    return names, True


_PATH_ARGS = (
    "checkpoint",
    "path",
    "support_features",
    "query_features",
    "queries",
    "supporting_set",
)


def resolve_methods(
    methods: Sequence[str],
    retrievers: dict[str, Any] | None,
    num_candidates: int,
    trials: int = 1,
    seed: int = 0,
) -> list[MethodSpec]:
    """Each method's retriever and arguments from ``data.retrievers`` (checked, paths absolute).

    ``data.retrievers.<method>`` holds the method's keyword arguments; ``retriever: NAME`` in
    it picks another registered retriever (e.g. ``oracle: {retriever: from_file, path: ...}``).
    ``lever_lm_shuffled`` starts from ``lever_lm``'s arguments (same ICDs, shuffled), and a
    ``gt_dir`` given to ``fixed`` becomes its ``sequence`` (:func:`best_gt_sequence`). A method
    of a seeded retriever (:data:`TRIAL_RETRIEVERS`) becomes ``trials`` methods ``name#t`` with
    seeds ``seed + t`` (its own ``seed`` argument, else the run's).
    """
    from leverlm.icl.lever_retriever import best_gt_sequence

    config = dict(retrievers or {})
    if not isinstance(retrievers or {}, dict):
        raise EvalConfigError(f"data.retrievers must be a mapping, got {retrievers!r}")
    stray = sorted(set(config) - set(methods))
    if stray:
        # Not an error: narrowing data.methods on the command line keeps the config's settings.
        log.warning("data.retrievers has settings for %s, which are not in data.methods", stray)
    specs = []
    for method in methods:
        if not isinstance(method, str) or not method:
            raise EvalConfigError(f"data.methods has {method!r}; methods are names")
        kwargs = config.get(method) or {}
        if not isinstance(kwargs, dict):
            raise EvalConfigError(f"data.retrievers.{method} must be a mapping, got {kwargs!r}")
        kwargs = dict(kwargs)
        if method == "lever_lm_shuffled" and isinstance(config.get("lever_lm"), dict):
            inherited = {k: v for k, v in config["lever_lm"].items() if k != "retriever"}
            kwargs = {**inherited, **kwargs}
        name = kwargs.pop("retriever", method)
        if name not in RETRIEVERS:
            where = f"data.retrievers.{method}.retriever" if name != method else "data.methods"
            raise EvalConfigError(
                f"{where}: unknown method {name!r}; known: {', '.join(available_retrievers())}"
            )
        source: dict[str, Any] = {}
        if "gt_dir" in kwargs:
            gt_dir = _abspath(kwargs.pop("gt_dir"))
            try:
                kwargs["sequence"] = best_gt_sequence(gt_dir, num_candidates)
            except RetrieverError as err:
                raise EvalConfigError(f"data.retrievers.{method}.gt_dir: {err}") from err
            source["gt_dir"] = gt_dir
        for key in _PATH_ARGS:
            if key in kwargs:
                kwargs[key] = _abspath(kwargs[key])
        if name in LEVER_RETRIEVERS:
            ckpt = kwargs.get("checkpoint")
            if not ckpt:
                raise EvalConfigError(
                    f"method {method!r} needs a Lever-LM checkpoint: set "
                    f"data.retrievers.{'lever_lm' if method == 'lever_lm_shuffled' else method}"
                    ".checkpoint"
                )
            if not Path(ckpt).is_file():
                raise EvalConfigError(
                    f"data.retrievers.{method}.checkpoint: {ckpt!r} does not exist"
                )
        names, open_ = accepted_args(RETRIEVERS[name])
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown and not open_:
            raise EvalConfigError(
                f"data.retrievers.{method}: unknown argument(s) {unknown} for retriever "
                f"{name!r} (accepts: {', '.join(sorted(names))})"
            )
        if name in TRIAL_RETRIEVERS and trials > 1:
            first = int(kwargs.get("seed", seed))
            for t in range(trials):
                trial = MethodSpec(f"{method}#{t}", name, {**kwargs, "seed": first + t}, source)
                specs.append(trial)
        else:
            specs.append(MethodSpec(method, name, kwargs, source))
    return specs


def needs_feature_arrays(spec: MethodSpec) -> bool:
    """Whether a method reads the query/supporting-set feature arrays (similarity retrieval)."""
    return bool(set(FEATURE_ARGS) & accepted_args(RETRIEVERS[spec.retriever])[0])


def build_retrievers(specs: Sequence[MethodSpec], context: dict[str, Any]) -> dict[str, Retriever]:
    """Build each method's retriever; ``context`` fills the arguments a method does not set.

    A ``lever_lm_shuffled`` with the same settings as ``lever_lm`` shuffles that very
    retriever, so Lever-LM decodes once for both.
    """
    from leverlm.icl.retrievers import build_retriever

    out: dict[str, Retriever] = {}
    for spec in specs:
        names, _ = accepted_args(RETRIEVERS[spec.retriever])
        kwargs = {k: v for k, v in context.items() if k in names and v is not None}
        kwargs.update(spec.kwargs)
        lever = out.get("lever_lm")
        if spec.retriever == "lever_lm_shuffled" and lever is not None and "inner" not in kwargs:
            base = next(s for s in specs if s.method == "lever_lm")
            if {k: v for k, v in spec.kwargs.items() if k != "seed"} == base.kwargs:
                kwargs["inner"] = lever
        out[spec.method] = build_retriever(spec.retriever, **kwargs)
    return out


def check_retrieved(
    method: str, shots: int, lists: Any, keys: Sequence[str], num_candidates: int
) -> np.ndarray:
    """A retriever's answer as a ``(Q, shots)`` int64 array, checked: ``shots`` distinct
    supporting-set positions per query (a custom retriever's slip is named, not evaluated)."""
    import numpy as np

    if not isinstance(lists, Sequence) or len(lists) != len(keys):
        got = len(lists) if isinstance(lists, Sequence) else type(lists).__name__
        raise EvalError(f"method {method!r} returned {got} ICD lists for {len(keys)} queries")
    table = np.zeros((len(keys), shots), dtype=np.int64)
    for row, (key, icds) in enumerate(zip(keys, lists, strict=True)):
        icds = [int(p) for p in icds]
        if len(icds) != shots or len(set(icds)) != shots:
            raise EvalError(
                f"method {method!r}, shots={shots}: query {key!r} got ICDs {icds}, not "
                f"{shots} distinct positions"
            )
        if not all(0 <= p < num_candidates for p in icds):
            raise EvalError(
                f"method {method!r}: query {key!r} got ICDs {icds} outside the supporting set "
                f"0..{num_candidates - 1}"
            )
        table[row] = icds
    return table


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _identity(x: Any) -> Any:
    return x


@dataclass(frozen=True)
class WorkItem:
    """One batched generate call: query rows ``rows`` of batch ``batch`` for (method, shots).

    Rows index the run's query list; positions and ICDs are looked up when the item is loaded
    (a full VQAv2 run has ~400k items: they stay small).
    """

    batch: int
    method: str
    shots: int
    rows: Sequence[int]  # a range when the whole batch is to do


class EvalItems(torch.utils.data.IterableDataset):
    """One rank's work items with their query and ICD samples decoded.

    Each item: ``{"method", "shots", "batch", "queries": [sample, ...], "icd_positions":
    [[pos, ...], ...], "icds": {pos: sample}}``. DataLoader workers take whole query batches
    (every ``num_workers``-th), stream their queries once (:func:`stream_positions`) and
    yield the batch's items; ICDs are fetched by position.

    Args:
        positions: collection position of each query row (ascending).
        table: ``{(method, shots): (Q, shots) array}`` of supporting-set positions.
    """

    def __init__(
        self,
        queries: str,
        supporting_set: str,
        items: Sequence[WorkItem],
        positions: Sequence[int],
        table: dict[tuple[str, int], np.ndarray],
    ) -> None:
        super().__init__()
        self.queries, self.supporting_set, self.items = queries, supporting_set, list(items)
        self.positions, self.table = positions, table

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from leverlm.data.collection import Collection
        from leverlm.data.pipeline import stream_positions

        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        batches = sorted({it.batch for it in self.items})[worker::num_workers]
        by_batch = {b: [it for it in self.items if it.batch == b] for b in batches}
        rows = {b: sorted({r for it in its for r in it.rows}) for b, its in by_batch.items()}
        flat = [r for b in batches for r in rows[b]]  # ascending: batches are row ranges
        qcoll, support = Collection(self.queries), Collection(self.supporting_set)
        stream = zip(flat, stream_positions(qcoll, [self.positions[r] for r in flat]), strict=True)
        for b in batches:
            samples = dict(itertools.islice(stream, len(rows[b])))
            for item in by_batch[b]:
                icds = self.table[(item.method, item.shots)][list(item.rows)].tolist()
                needed = sorted({p for seq in icds for p in seq})
                yield {
                    "batch": item.batch,
                    "method": item.method,
                    "shots": item.shots,
                    "queries": [samples[r] for r in item.rows],
                    "icd_positions": icds,
                    "icds": {p: support[p] for p in needed},
                }


class EvalDataModule(pl.LightningDataModule):
    """The queries of the run, their ICDs per method and shot count, as work items.

    Args:
        queries: the query collection (paper: COCO val2017 / VQAv2 val).
        supporting_set: the collection ICDs come from (the train split; Lever-LM's vocabulary).
        task: set from ``model.task`` by the CLI (picks STTR's query text and the references).
        methods: retriever names (see ``leverlm.icl.retrievers``; ``zero_shot`` runs once).
        shots: shot counts of every method but zero-shot (each >= 1).
        retrievers: per-method retriever arguments, e.g. ``{lever_lm: {checkpoint: ...},
            random: {seed: 1}, fixed: {gt_dir: ...}, oracle: {retriever: from_file, path:
            ...}}`` (see :func:`resolve_methods`).
        query_features / support_features: feature stores (``leverlm features``) of the two
            collections, row = position; needed by siir/sttr/sitr and Lever-LM.
        limit: evaluate a seeded random subset of this many queries (null: all).
        seed: picks the subset; default seed of the seeded retrievers (random, fixed, shuffled).
        trials: seeds of each seeded method (random, lever_lm_shuffled): ``name#0`` ...,
            reported as mean and std.
        batch_size: queries per generate call.
        num_workers: DataLoader workers decoding query and ICD images.
    """

    def __init__(
        self,
        queries: str,
        supporting_set: str,
        task: str = "vqa",
        methods: tuple[str, ...] = PAPER_METHODS,
        shots: tuple[int, ...] = PAPER_SHOTS,
        retrievers: dict[str, dict[str, Any]] | None = None,
        query_features: str | None = None,
        support_features: str | None = None,
        limit: int | None = None,
        seed: int = 0,
        trials: int = 3,
        batch_size: int = 8,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        self.queries, self.supporting_set, self.task = queries, supporting_set, task
        self.methods, self.shots = list(methods), sorted(int(s) for s in shots)
        self.retrievers = dict(retrievers or {})
        self.query_features, self.support_features = query_features, support_features
        self.limit, self.seed, self.trials = limit, seed, trials
        self.batch_size, self.num_workers = batch_size, num_workers
        self.rank, self.world_size = 0, 1
        self.table: dict[tuple[str, int], np.ndarray] | None = None
        self._positions: list[int] | None = None
        self._keys: list[str] | None = None
        self._done: set[tuple[str, str, int]] = set()
        self._items: list[WorkItem] | None = None
        self._units: list[tuple[str, int]] | None = None

    # -- the run's queries ------------------------------------------------------------------
    @property
    def query_positions(self) -> list[int]:
        if self._positions is None:
            from leverlm.data.collection import read_manifest

            n = int(read_manifest(self.queries)["num_samples"])
            self._positions = select_queries(n, self.limit, self.seed)
        return self._positions

    @property
    def query_keys(self) -> list[str]:
        if self._keys is None:
            from leverlm.data.collection import Collection

            keys = Collection(self.queries).keys
            self._keys = [keys[p] for p in self.query_positions]
        return self._keys

    def specs(self, num_candidates: int) -> list[MethodSpec]:
        return resolve_methods(
            self.methods, self.retrievers, num_candidates, self.trials, self.seed
        )

    @property
    def units(self) -> list[tuple[str, int]]:
        if self._units is None:
            from leverlm.data.collection import read_manifest

            n = int(read_manifest(self.supporting_set)["num_samples"])
            self._units = eval_units([spec.method for spec in self.specs(n)], self.shots)
        return self._units

    def retrieval_queries(self) -> list[dict[str, Any]]:
        """The queries as retrievers see them (key + position; the query itself is excluded
        when queries and ICDs come from the same collection)."""
        same = _abspath(self.queries) == _abspath(self.supporting_set)
        out = []
        for key, pos in zip(self.query_keys, self.query_positions, strict=True):
            q: dict[str, Any] = {"__key__": key, "position": pos}
            if same:
                q["exclude_positions"] = [pos]
            out.append(q)
        return out

    # -- retrieval ---------------------------------------------------------------------------
    def retrieval_context(self, device: str) -> dict[str, Any]:
        """What the job knows that retrievers may take (see :func:`build_retrievers`)."""
        from leverlm.data.collection import read_manifest
        from leverlm.encoders.store import open_store
        from leverlm.tasks import get_task

        ctx: dict[str, Any] = {
            "num_candidates": int(read_manifest(self.supporting_set)["num_samples"]),
            "seed": self.seed,
            "device": device,
            "queries": _abspath(self.queries),
            "supporting_set": _abspath(self.supporting_set),
            # paths, for retrievers that open a store themselves (Lever-LM)
            "support_features": _abspath(self.support_features),
            "query_features": _abspath(self.query_features),
        }
        if self.support_features:
            store = open_store(
                self.support_features, self.supporting_set, what="data.support_features"
            )
            ctx["support_image"], ctx["support_text"] = store.image, store.text
        if self.query_features:
            store = open_store(self.query_features, self.queries, what="data.query_features")
            ctx["query_image"] = store.image
            # A caption query's text is its answer: STTR compares its image with ICD texts.
            ctx["query_text"] = None if get_task(self.task).name == "caption" else store.text
        return ctx

    def retrieve_all(self, device: str = "cpu") -> dict[tuple[str, int], np.ndarray]:
        """Every method's ICDs for every query and shot count: ``{(method, shots): (Q, shots)}``."""
        ctx = self.retrieval_context(device)
        n = ctx["num_candidates"]
        specs = self.specs(n)
        retrievers = build_retrievers(specs, ctx)
        queries, keys = self.retrieval_queries(), self.query_keys
        table: dict[tuple[str, int], np.ndarray] = {}
        for spec in specs:
            retriever = retrievers[spec.method]
            counts = [s for m, s in self.units if m == spec.method]
            start = time.perf_counter()
            retriever.prepare(queries, max(counts))
            for shots in counts:
                lists = retriever.retrieve(queries, shots)
                table[(spec.method, shots)] = check_retrieved(spec.method, shots, lists, keys, n)
            log.info(
                "retrieved %s ICDs for %d queries x shots %s in %.2fs",
                spec.method,
                len(queries),
                counts,
                time.perf_counter() - start,
            )
        return table

    def setup(self, stage: str) -> None:
        device = "cpu"
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
            device = str(self.trainer.strategy.root_device)
        if self.table is None:
            self.table = self.retrieve_all(device)
            self._items = None

    # -- work --------------------------------------------------------------------------------
    def skip(self, done: set[tuple[str, str, int]]) -> None:
        """Leave out (query_key, method, shots) already finished by an earlier run."""
        self._done = set(done)
        self._items = None

    @property
    def items(self) -> list[WorkItem]:
        """Work items still to do, over all ranks, in a fixed order (batch, then unit)."""
        if self.table is None:
            raise EvalError("EvalDataModule.setup() has not run: no ICDs retrieved yet")
        if self._items is None:
            keys, out = self.query_keys, []
            for b, start in enumerate(range(0, len(keys), self.batch_size)):
                batch_rows = range(start, min(start + self.batch_size, len(keys)))
                for method, shots in self.units:
                    rows: Sequence[int] = batch_rows
                    if self._done:
                        todo = tuple(
                            r for r in batch_rows if (keys[r], method, shots) not in self._done
                        )
                        rows = batch_rows if len(todo) == len(batch_rows) else todo
                    if rows:
                        out.append(WorkItem(b, method, shots, rows))
            self._items = out
        return self._items

    @property
    def rank_items(self) -> list[WorkItem]:
        """This rank's share of :attr:`items`: whole query batches, dealt round-robin."""
        return [it for it in self.items if it.batch % self.world_size == self.rank]

    @property
    def rank_count(self) -> int:
        return sum(len(it.rows) for it in self.rank_items)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        assert self.table is not None
        dataset = EvalItems(
            _abspath(self.queries),
            _abspath(self.supporting_set),
            self.rank_items,
            self.query_positions,
            self.table,
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=False,
        )


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


class EvalModule(pl.LightningModule):
    """Batched in-context generation with a frozen LVLM (``predict_step`` = one work item).

    Args:
        lvlm: which LVLM and how it loads (``conf/lvlm/*.yaml``; paper: bf16).
        task: prompt recipe (``vqa``, ``vqa_idefics``, ``caption``, ...).
        generation: overrides of the task's generation arguments (``max_new_tokens``,
            ``num_beams``, ``length_penalty``; paper: VQA 5 / 3 / 0, captions 20 / 3).
    """

    def __init__(
        self, lvlm: LVLMSpec, task: str = "vqa_idefics", generation: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.spec, self.task, self.generation = lvlm, task, dict(generation or {})
        self.lvlm: Any = None

    def load_lvlm(self) -> None:
        """Load the LVLM once, on this rank's device (only when there is work to do)."""
        if self.lvlm is None:
            self.lvlm = self.spec.load(self.task, device=self.device)

    def predict_item(self, item: dict[str, Any]) -> list[EvalPrediction]:
        """Generate for one work item; returns its predictions in query order."""
        self.load_lvlm()
        queries = item["queries"]
        icd_seqs = [[item["icds"][p] for p in seq] for seq in item["icd_positions"]]
        texts = self.lvlm.generate(icd_seqs, queries, **self.generation)
        if len(texts) != len(queries):
            raise EvalError(
                f"the LVLM returned {len(texts)} generations for {len(queries)} queries"
            )
        task = self.lvlm.task
        return [
            EvalPrediction(
                query_key=str(q["__key__"]),
                method=item["method"],
                shots=int(item["shots"]),
                icd_positions=tuple(int(p) for p in seq),
                prediction=text,
                references=tuple(references_of(task, q)),
            )
            for q, seq, text in zip(queries, item["icd_positions"], texts, strict=True)
        ]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {"predictions": self.predict_item(batch)}


# ---------------------------------------------------------------------------------------------
# merge and report
# ---------------------------------------------------------------------------------------------


def expected_units(header: RunHeader) -> set[tuple[str, str, int]]:
    """Every (query_key, method, shots) of a run."""
    from leverlm.data.collection import Collection

    all_keys = Collection(header.manifest["queries"]["path"]).keys
    units = [(m, int(s)) for m, s in header.manifest["units"]]
    return {(all_keys[p], m, s) for p in header.items for m, s in units}


def finalize_results(run: RunDir) -> Report:
    """Merge the part files into ``predictions.jsonl`` + ``manifest.json`` and report.

    Every (query, method, shots) of the run must be present exactly once; nothing is written
    otherwise. The manifest is written after the predictions, so its presence marks complete
    results; the report files follow.
    """
    from leverlm.report import write_report

    out, header = run.path, run.header()
    if header is None or header.job != "eval":
        raise EvalError(f"{out}: no eval run header; nothing to merge")
    manifest, settings = header.manifest, header.settings
    expected = expected_units(header)
    try:
        preds = read_predictions(run.part_files())
    except ReportError as err:
        raise EvalError(f"{run.parts}: {err}") from err
    got = {(p.query_key, p.method, p.shots) for p in preds}
    missing = sorted(expected - got)
    if missing:
        raise EvalError(
            f"{out}: {len(missing)} of {len(expected)} predictions are missing "
            f"(first: {missing[:3]}); rerun the same command to finish them"
        )
    extra = sorted(got - expected)
    if extra:
        raise EvalError(f"{out}: part files hold predictions not in this run: {extra[:3]}")
    with atomic_open(out / PREDICTIONS, "w", encoding="utf-8") as fh:
        for pred in preds:  # sorted by (method, shots, query_key) by read_predictions
            fh.write(prediction_line(pred) + "\n")
    final = {
        **manifest,
        "version": VERSION,
        "num_queries": len(header.items),
        "num_predictions": len(preds),
        "trained_shots": settings["trained_shots"],
        "interpolation_max_shots": settings["interpolation_max_shots"],
        "vqa_accuracy": settings.get("vqa_accuracy", "official"),
        "config": header.config,
        "run_sha256": header.sha256,
    }
    atomic_write_json(out / MANIFEST, final)
    return write_report(out, out, settings["report_formats"], settings["interpolation_max_shots"])


def log_results(
    loggers: Sequence[Any], report: Report, out: str | Path, num_samples: int = 4
) -> None:
    """The report's table, plot and a few sample predictions (with images) to each logger."""
    from leverlm.data.collection import Collection
    from leverlm.report import attach_images, log_report_to_logger, select_samples

    if not loggers:
        return
    samples = None
    if num_samples > 0 and any(hasattr(lg, "log_table") for lg in loggers):
        manifest = RunDir(out).header().manifest
        queries = Collection(manifest["queries"]["path"])
        support = Collection(manifest["supporting_set"]["path"])
        chosen = select_samples(read_predictions([Path(out) / PREDICTIONS]), num_samples)
        samples = attach_images(
            chosen,
            lambda key: queries.image(queries.position_of(key)),
            support.image,
        )
    for logger in loggers:
        log_report_to_logger(logger, report.rows, report.paths.get("png"), samples)
        logger.save()


# ---------------------------------------------------------------------------------------------
# planning: validate everything before any model loads
# ---------------------------------------------------------------------------------------------


def _collection_info(path: str, what: str) -> dict[str, Any]:
    from leverlm.data.collection import CollectionError, read_manifest

    try:
        manifest = read_manifest(path)
    except CollectionError as err:
        raise EvalConfigError(f"data.{what}: {err}") from err
    return {
        "path": _abspath(path),
        "name": manifest["name"],
        "task": manifest["task"],
        "num_samples": int(manifest["num_samples"]),
        "manifest_sha256": sha256_file(Path(path) / "manifest.json"),
    }


def _check_store(path: str, collection: dict[str, Any], what: str) -> str:
    """Open a feature store and check it was built for ``collection``; its manifest sha256."""
    from leverlm.encoders.store import FeatureStoreError, open_store

    try:
        open_store(
            path, collection["path"], sha256=collection["manifest_sha256"], what=f"data.{what}"
        )
    except FeatureStoreError as err:
        raise EvalConfigError(str(err)) from err
    return sha256_file(Path(path) / "manifest.json")


def checkpoint_summary(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(leverlm_config, leverlm_info)`` of a Lever-LM checkpoint, memory-mapped (cheap)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip checkpoint (no mmap) or extra pickled types
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - whatever torch raises, name the file
            raise EvalConfigError(f"Lever-LM checkpoint {path!r} cannot be read: {err}") from err
    if not isinstance(ckpt, dict) or "leverlm_config" not in ckpt:
        raise EvalConfigError(f"{path!r} is not a Lever-LM checkpoint (no 'leverlm_config')")
    return dict(ckpt["leverlm_config"]), dict(ckpt.get("leverlm_info") or {})


def _check_lever(
    spec: MethodSpec, data: dict[str, Any], support: dict[str, Any]
) -> tuple[str, int | None]:
    """Check a Lever-LM method against the supporting set; its checkpoint sha256 and the shots
    it was trained on (when the checkpoint records them)."""
    ckpt = spec.kwargs["checkpoint"]
    config, info = checkpoint_summary(ckpt)
    where = f"data.retrievers.{spec.method}.checkpoint {ckpt!r}"
    if int(config.get("num_icds", -1)) != support["num_samples"]:
        raise EvalConfigError(
            f"{where}: its vocabulary has {config.get('num_icds')} ICDs but the supporting set "
            f"{support['path']} has {support['num_samples']} samples"
        )
    trained_on = info.get("supporting_set_sha256")
    if trained_on and trained_on != support["manifest_sha256"]:
        raise EvalConfigError(
            f"{where}: it was trained on another supporting set (manifest sha256 "
            f"{trained_on[:12]}...) than data.supporting_set {support['path']} "
            f"({support['manifest_sha256'][:12]}...)"
        )
    wants_queries = bool(config.get("query_features"))
    if wants_queries and not (
        spec.kwargs.get("query_features")
        or data.get("query_features")
        or info.get("clip_trainable")
    ):
        raise EvalConfigError(
            f"method {spec.method!r} needs the query collection's features: set "
            "data.query_features (a feature store of data.queries)"
        )
    trained = info.get("trained_shots")
    return sha256_file(ckpt), int(trained) if isinstance(trained, int) else None


def plan_eval(
    data: dict[str, Any], model: dict[str, Any], settings: dict[str, Any] | None = None
) -> RunHeader:
    """Check an eval config and build its run header; raises naming the bad value.

    Reads only small files (collection and feature-store manifests, the memory-mapped Lever-LM
    checkpoint header, a gt dataset for ``fixed``, the output folder's run header); loads no
    LVLM.
    """
    from leverlm.lvlm.base import (
        is_local_path,
    )
    from leverlm.tasks import TaskError, get_task

    data, model = dict(data), dict(model)
    settings = dict(settings or {})
    trained_shots = settings.get("trained_shots")
    try:
        task = get_task(model["task"])
    except TaskError as err:
        raise EvalConfigError(f"model.task: {err}") from err
    methods, shots = check_methods_and_shots(data.get("methods"), data.get("shots"))
    queries = _collection_info(data["queries"], "queries")
    support = _collection_info(data["supporting_set"], "supporting_set")
    for what, info in (("queries", queries), ("supporting_set", support)):
        if info["task"] != task.name:
            raise EvalConfigError(
                f"model.task={model['task']!r} is a {task.name!r} task but data.{what} "
                f"{info['path']} holds {info['task']!r} samples"
            )
    positions = select_queries(queries["num_samples"], data.get("limit"), int(data.get("seed", 0)))
    for arg in ("batch_size", "num_workers"):
        value = data.get(arg)
        low = 1 if arg == "batch_size" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise EvalConfigError(f"data.{arg} must be an int >= {low}, got {value!r}")
    if shots and shots[-1] > support["num_samples"]:
        raise EvalConfigError(
            f"data.shots has shots={shots[-1]} but the supporting set {support['path']} has "
            f"only {support['num_samples']} samples"
        )
    # A query without references would fail only at its batch: look at the first one now.
    from leverlm.data.collection import Collection

    first = Collection(queries["path"])
    references_of(task, {"__key__": first.keys[positions[0]], **first.fields(positions[0])})

    trials = data.get("trials", 1)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise EvalConfigError(f"data.trials must be an int >= 1, got {trials!r}")
    specs = resolve_methods(
        methods, data.get("retrievers"), support["num_samples"], trials, int(data.get("seed", 0))
    )
    stores: dict[str, str] = {}
    for key, coll in (("support_features", support), ("query_features", queries)):
        if data.get(key):
            stores[key] = _check_store(data[key], coll, key)
    checksums: dict[str, Any] = {
        "queries": queries["manifest_sha256"],
        "supporting_set": support["manifest_sha256"],
        **{f"{k}_manifest": v for k, v in stores.items()},
    }
    for spec in specs:
        if needs_feature_arrays(spec):
            lacking = [k for k in ("support_features", "query_features") if not data.get(k)]
            if lacking:
                raise EvalConfigError(
                    f"method {spec.method!r} ({spec.retriever}) compares CLIP features: set "
                    f"{' and '.join('data.' + k for k in lacking)} (feature stores of "
                    "data.supporting_set / data.queries, from `leverlm features`)"
                )
        for key, coll in (("support_features", support), ("query_features", queries)):
            path = spec.kwargs.get(key)
            if isinstance(path, str):
                checksums[f"{spec.method}.{key}_manifest"] = _check_store(
                    path, coll, f"retrievers.{spec.method}.{key}"
                )
        if spec.retriever in LEVER_RETRIEVERS:
            sha, recorded = _check_lever(spec, data, support)
            checksums[f"{spec.method}.checkpoint"] = sha
            if trained_shots is None and spec.method == "lever_lm":
                trained_shots = recorded

    generation = model.get("generation") or {}
    if not isinstance(generation, dict):
        raise EvalConfigError(f"model.generation must be a mapping, got {generation!r}")
    spec = LVLMSpec.checked(model["lvlm"])
    model["lvlm"] = spec.to_dict()

    # Only what determines the predictions: no worker counts.
    result_data = {k: v for k, v in data.items() if k != "num_workers"}
    result_data.update(
        queries=queries["path"],
        supporting_set=support["path"],
        query_features=_abspath(data.get("query_features")),
        support_features=_abspath(data.get("support_features")),
        methods=methods,
        shots=shots,
        retrievers={s.method: s.to_json() for s in specs},
    )
    config = {"data": result_data, "model": model, "checksums": checksums}
    units = eval_units([spec.method for spec in specs], shots)
    manifest = {
        "format": FORMAT,
        "task": task.name,
        "task_config": model["task"],
        "metric": task.metric,
        "lvlm": lvlm_id(spec.model_type, spec.path),
        "lvlm_config": {
            "model_type": spec.model_type,
            "path": spec.path,
            "dtype": spec.dtype,
            "generation": task.generation_kwargs | generation,
        },
        "methods": methods,
        "shots": shots,
        "units": [[m, s] for m, s in units],
        "limit": data.get("limit"),
        "seed": int(data.get("seed", 0)),
        "queries": {k: v for k, v in queries.items() if k != "task"},
        "supporting_set": {k: v for k, v in support.items() if k != "task"},
    }
    inputs = {"queries": input_fingerprint(queries["path"])}
    inputs["supporting_set"] = input_fingerprint(support["path"])
    if is_local_path(spec.path):
        inputs["lvlm"] = input_fingerprint(spec.path)
    for key in ("support_features", "query_features"):
        if data.get(key):
            inputs[key] = input_fingerprint(data[key])
    for spec in specs:
        for key in ("checkpoint", "path", "support_features", "query_features"):
            if isinstance(spec.kwargs.get(key), str) and Path(spec.kwargs[key]).exists():
                inputs[f"{spec.method}.{key}"] = input_fingerprint(spec.kwargs[key])
        if "gt_dir" in spec.source:
            inputs[f"{spec.method}.gt_dir"] = input_fingerprint(spec.source["gt_dir"])
    settings["trained_shots"] = trained_shots
    return RunHeader("eval", config, inputs, positions, manifest, settings)


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------


class EvalJob(Job):
    """(query, method, shots) -> predictions; merged into ``predictions.jsonl``, ``manifest.json``
    and the report."""

    name, unit, units, part_size = "eval", "prediction", "predictions", 64
    results = (PREDICTIONS, MANIFEST, *REPORT_FILES)

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--part_size", type=int, default=64, help="predictions per part file (resume unit)"
        )
        parser.add_argument(
            "--trained_shots", type=int | None, default=None,
            help="shots Lever-LM was trained on (default: as recorded in its checkpoint)",
        )  # fmt: skip
        parser.add_argument(
            "--interpolation_max_shots", type=int, default=4,
            help="largest shot count reported as interpolation (paper: 4)",
        )  # fmt: skip
        parser.add_argument(
            "--report_formats", type=str, default="md,csv,json,png", help="report files"
        )
        parser.add_argument(
            "--vqa_accuracy", type=Literal["official", "authors"], default="official",
            help="VQA accuracy: the official script, or the Lever-LM authors' variant (always "
            "normalised; the paper's numbers)",
        )  # fmt: skip
        parser.add_argument(
            "--log_samples", type=int, default=4, help="sample queries logged with images"
        )
        parser.link_arguments("model.task", "data.task")

    def plan(self, cfg: dict[str, Any]) -> RunHeader:
        from leverlm.report import parse_formats

        for name, low in (("part_size", 1), ("interpolation_max_shots", 0), ("log_samples", 0)):
            if cfg[name] < low:
                raise EvalConfigError(f"--{name} must be >= {low}, got {cfg[name]}")
        self.part_size, self.log_samples = cfg["part_size"], cfg["log_samples"]
        try:
            formats = parse_formats(cfg["report_formats"])
        except ReportError as err:
            raise EvalConfigError(f"--report_formats: {err}") from err
        settings = {
            "trained_shots": cfg["trained_shots"],
            "interpolation_max_shots": cfg["interpolation_max_shots"],
            "report_formats": list(formats),
            "vqa_accuracy": cfg["vqa_accuracy"],
        }
        return plan_eval(cfg["data"], cfg["model"], settings)

    def done(self, run: RunDir) -> set[tuple[str, str, int]]:
        """(query_key, method, shots) already in the part files (only those three fields are
        read: a resumed VQAv2 run holds millions of predictions; the merge checks the rest)."""
        done: set[tuple[str, str, int]] = set()
        for path in run.part_files():
            for where, obj in read_jsonl(path, EvalError):
                try:
                    # Interned: the same key and method strings are shared by every unit.
                    done.add((sys.intern(obj["query_key"]), sys.intern(obj["method"]),
                              int(obj["shots"])))  # fmt: skip
                except (KeyError, TypeError, ValueError) as err:
                    raise EvalError(f"{where}: not a prediction line ({err!r})") from None
        return done

    def remaining(self, run: RunDir, header: RunHeader) -> int:
        return len(expected_units(header) - self.done(run))

    def encode_part(self, outputs: list[Any]) -> bytes:
        lines = (prediction_line(p) + "\n" for out in outputs for p in out["predictions"])
        return "".join(lines).encode("utf-8")

    def count(self, output: Any) -> int:
        return len(output["predictions"])

    def merge(self, run: RunDir) -> Report:
        return finalize_results(run)

    def after_merge(self, run: RunDir, result: Any, trainer: Any) -> None:
        print(result.markdown, end="", flush=True)
        if trainer is not None:
            log_results(trainer.loggers, result, run.path, getattr(self, "log_samples", 4))


def main(argv: list[str]) -> int:
    """``leverlm eval predict ...`` (LightningCLI) or ``leverlm eval merge --out DIR``."""
    return run_job(EvalJob(), EvalModule, EvalDataModule, argv)


__all__ = [
    "EvalConfigError",
    "EvalDataModule",
    "EvalError",
    "EvalItems",
    "EvalJob",
    "EvalModule",
    "EvalPrediction",
    "MethodSpec",
    "WorkItem",
    "build_retrievers",
    "check_methods_and_shots",
    "check_retrieved",
    "eval_units",
    "finalize_results",
    "log_results",
    "main",
    "plan_eval",
    "references_of",
    "resolve_methods",
    "select_queries",
]
