"""Retrievers of the evaluation side: Lever-LM, its shuffled ablation, sequences from a file.

Registered into :mod:`leverlm.icl.retrievers` on import (``leverlm.icl.job`` imports this):

- ``lever_lm``: :meth:`leverlm.lever.select.LeverLM.select` - greedy (or beam) decoding of
  the ICD positions per query from its CLIP features, never repeating an ICD *of that query*.
- ``lever_lm_shuffled``: the same ICDs in a random order seeded per query (the paper's
  ablation of the generated order).
- ``from_file`` (alias ``oracle``): per-query sequences read from JSON lines
  ``{"query_key": str, "icd_positions": [int, ...]}`` (optionally ``"shots": int``), e.g. a
  gt-like best sequence per query, the output of ``leverlm select``, or a user's own retriever.

:func:`best_gt_sequence` reads the sequence the ``fixed`` baseline shows to every query from a
gt dataset folder.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from leverlm.errors import LeverError
from leverlm.icl.retrievers import (
    Retriever,
    RetrieverError,
    ShuffledRetriever,
    _check_shots,
    _query_key,
    check_sizes,
    register_retriever,
)
from leverlm.utils import read_jsonl

if TYPE_CHECKING:
    from leverlm.lever.select import LeverLM

Take = Literal["last", "first"]
log = logging.getLogger("leverlm.eval")


# ---------------------------------------------------------------------------------------------
# Lever-LM
# ---------------------------------------------------------------------------------------------


def _own_clip_reads_no_store(
    checkpoint: str | None, support_features: Any, query_features: Any, queries: str | None
) -> tuple[Any, Any]:
    """``(support_features, query_features)`` a checkpoint reads: for a fine-tuned CLIP, no
    store folder (its CLIP encodes the supporting set and the queries of ``queries``)."""
    from leverlm.lever.select import checkpoint_info

    if not checkpoint:
        raise RetrieverError("lever_lm: a checkpoint (Lever-LM .ckpt) is required")
    if not Path(checkpoint).is_file():
        raise RetrieverError(f"lever_lm: checkpoint {checkpoint!r} does not exist")
    if not checkpoint_info(checkpoint).get("clip_trainable"):
        return support_features, query_features
    folders = (str, os.PathLike)
    if isinstance(support_features, folders) or isinstance(query_features, folders):
        log.info(
            "lever_lm: %s fine-tunes its CLIP, which encodes the supporting set and the "
            "queries (the feature stores serve the similarity baselines)",
            checkpoint,
        )
    support_features = None if isinstance(support_features, folders) else support_features
    query_features = None if isinstance(query_features, folders) else query_features
    if query_features is None and not queries:
        raise RetrieverError(
            "lever_lm: queries (the query collection) is required to encode the queries with "
            "the checkpoint's fine-tuned CLIP"
        )
    return support_features, query_features


@register_retriever("lever_lm")
class LeverLMRetriever(Retriever):
    """ICDs chosen by a trained Lever-LM (prompt order: the order Lever-LM generates them).

    With greedy decoding (``beam_size=1``) the ICDs for ``k`` shots are the first ``k`` of those
    for more shots (each step sees only the query and the ICDs already chosen), so
    :meth:`prepare` decodes every query once at the largest shot count and :meth:`retrieve`
    slices. Beam search has no such prefix property: each shot count is decoded on its own.

    A checkpoint with a fine-tuned CLIP (``clip_trainable``) reads no frozen-CLIP store: its
    CLIP encodes the supporting set (cached, see :mod:`leverlm.lever.select`) and the queries
    of ``queries``; store folders given as ``support_features``/``query_features`` (the eval
    job passes its stores to every method, for the similarity baselines) are not used.

    Args:
        checkpoint: the Lever-LM ``.ckpt`` (ignored when ``lever`` is given).
        support_features: the supporting set's feature store (folder, store object or
            ``{modality: (N, D)}``); default: the store recorded in the checkpoint.
        query_features: the query collection's feature store (row = query ``position``).
        queries: the query collection folder: the query store must have been built for it;
            the queries a fine-tuned CLIP encodes (once each, as they are asked for).
        supporting_set: the supporting-set collection a fine-tuned CLIP encodes (default: the
            one recorded in the checkpoint; checked against it).
        cache_dir: where a fine-tuned CLIP's supporting-set features are cached (default:
            ``support_features/`` beside the checkpoint).
        num_candidates: the supporting-set size, checked against the checkpoint's vocabulary.
        beam_size: 1 = greedy (the paper); more = beam search over sequences.
        batch_size: queries decoded together.
        reverse_seq: reverse each sequence (the authors' inference option; off in the paper).
        device: torch device for decoding.
        lever: an already loaded :class:`~leverlm.lever.select.LeverLM` (tests, the API).
    """

    name = "lever_lm"

    def __init__(
        self,
        checkpoint: str | None = None,
        support_features: Any = None,
        query_features: Any = None,
        queries: str | None = None,
        supporting_set: str | None = None,
        cache_dir: str | None = None,
        num_candidates: int | None = None,
        beam_size: int = 1,
        batch_size: int = 256,
        reverse_seq: bool = False,
        device: str = "cpu",
        lever: LeverLM | None = None,
    ):
        if lever is None:
            support_features, query_features = _own_clip_reads_no_store(
                checkpoint, support_features, query_features, queries
            )
            from leverlm.lever.select import LeverLM

            try:
                lever = LeverLM.from_checkpoint(
                    checkpoint,
                    support_features=support_features,
                    queries=queries,
                    supporting_set=supporting_set,
                    cache_dir=cache_dir,
                    device=device,
                )
            except (LeverError, OSError) as err:
                raise RetrieverError(f"lever_lm: checkpoint {checkpoint!r}: {err}") from err
        vocab = int(lever.model.config.num_icds)
        if num_candidates is not None and num_candidates != vocab:
            raise RetrieverError(
                f"lever_lm: the checkpoint's vocabulary has {vocab} ICDs but the supporting set "
                f"has {num_candidates} samples (trained on another supporting set?)"
            )
        check_sizes("lever_lm", beam_size=beam_size, batch_size=batch_size)
        if query_features is not None and not isinstance(query_features, Mapping):
            from leverlm.encoders.store import FeatureStoreError, open_store

            try:
                query_features = open_store(query_features, queries, what="query_features")
            except FeatureStoreError as err:
                raise RetrieverError(f"lever_lm: {err}") from err
        super().__init__(vocab)
        self.lever, self.checkpoint, self.queries = lever, checkpoint, queries
        self.query_features = query_features
        self.beam_size, self.batch_size, self.reverse_seq = beam_size, batch_size, reverse_seq
        # (position, exclusions) -> greedy sequence of the longest length decoded so far;
        # (position, exclusions, shots) -> beam-search sequence.
        self._cache: dict[tuple, list[int]] = {}

    def _select(self, items: list[tuple[int, frozenset[int]]], shots: int) -> list[list[int]]:
        if self.query_features is None and self.lever.clip is None:
            raise RetrieverError(
                "lever_lm: query_features (the query collection's feature store) is required "
                "for a checkpoint without a fine-tuned CLIP"
            )
        try:
            return self.lever.select(
                [pos for pos, _ in items],
                shots=shots,
                beam_size=self.beam_size,
                batch_size=self.batch_size,
                query_features=self.query_features,
                exclude=[sorted(ex) for _, ex in items],
            )
        except LeverError as err:
            raise RetrieverError(f"lever_lm: {err}") from err

    def _items(self, queries: list[dict[str, Any]], shots: int) -> list[tuple[int, frozenset]]:
        items = []
        for query, (key, excluded) in zip(queries, self.checked(queries, shots), strict=True):
            if "position" not in query:
                raise RetrieverError(f"lever_lm: query {key!r} has no 'position'")
            items.append((int(query["position"]), excluded))
        return items

    def _cache_key(self, item: tuple[int, frozenset], shots: int) -> tuple:
        return item if self.beam_size == 1 else (*item, shots)

    def _fill(self, items: list[tuple[int, frozenset]], shots: int) -> None:
        """Decode (once, in one batched call) the items the cache cannot answer."""
        todo = sorted(
            {it for it in items if len(self._cache.get(self._cache_key(it, shots), ())) < shots},
            key=lambda it: (it[0], sorted(it[1])),
        )
        if todo:
            for item, seq in zip(todo, self._select(todo, shots), strict=True):
                self._cache[self._cache_key(item, shots)] = [int(p) for p in seq]

    def prepare(self, queries: list[dict[str, Any]], max_shots: int) -> None:
        """Decode every query once at ``max_shots`` (greedy: all fewer-shot sets are prefixes)."""
        max_shots = _check_shots(max_shots)
        if max_shots > 0 and self.beam_size == 1:
            self._fill(self._items(queries, max_shots), max_shots)

    def retrieve(self, queries: list[dict[str, Any]], shots: int) -> list[list[int]]:
        shots = _check_shots(shots)
        items = self._items(queries, shots)
        if shots == 0:
            return [[] for _ in queries]
        self._fill(items, shots)
        seqs = [self._cache[self._cache_key(it, shots)][:shots] for it in items]
        return [s[::-1] if self.reverse_seq else list(s) for s in seqs]


@register_retriever("lever_lm_shuffled")
def lever_lm_shuffled(
    seed: int = 0, inner: Retriever | None = None, **lever_lm: Any
) -> ShuffledRetriever:
    """Lever-LM's ICDs in a random order, seeded per query by ``(seed, key, shots)``.

    ``inner``: an existing ``lever_lm`` retriever to shuffle (its decoding is then shared);
    otherwise one is built from the other arguments (those of :class:`LeverLMRetriever`).
    """
    return ShuffledRetriever(inner or LeverLMRetriever(**lever_lm), seed=seed)


# The arguments it accepts, spelled out (configs are checked against them): LeverLMRetriever's,
# then its own.
lever_lm_shuffled.__signature__ = inspect.Signature(
    [
        *inspect.signature(LeverLMRetriever).parameters.values(),
        *list(inspect.signature(lever_lm_shuffled).parameters.values())[:2],
    ]
)


# ---------------------------------------------------------------------------------------------
# sequences from a file
# ---------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_sequences(
    path: str | os.PathLike, num_candidates: int | None = None
) -> dict[str, dict[int | None, list[int]]]:
    """Per-query ICD sequences of a JSONL file: ``{query_key: {shots or None: positions}}``.

    Each line: ``{"query_key": str, "icd_positions": [int, ...]}`` and optionally
    ``"shots": int`` (== the number of positions) for a sequence meant for that shot count
    only. Other fields are ignored (so ``leverlm select`` output reads as is). Errors name the
    file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise RetrieverError(f"sequence file {str(path)!r} does not exist")
    out: dict[str, dict[int | None, list[int]]] = {}
    for where, obj in read_jsonl(path, RetrieverError):
        if not isinstance(obj, dict):
            raise RetrieverError(f"{where}: expected a JSON object")
        key, seq = obj.get("query_key"), obj.get("icd_positions")
        if not isinstance(key, str) or not key:
            raise RetrieverError(f"{where}: field 'query_key' must be a non-empty string")
        if not isinstance(seq, list) or not all(_is_int(p) for p in seq):
            raise RetrieverError(f"{where}: field 'icd_positions' must be a list of ints")
        if len(set(seq)) != len(seq):
            raise RetrieverError(f"{where}: icd_positions {seq} has repeated positions")
        if num_candidates is not None and not all(0 <= p < num_candidates for p in seq):
            raise RetrieverError(
                f"{where}: icd_positions {seq} has positions outside the supporting set "
                f"0..{num_candidates - 1}"
            )
        shots = obj.get("shots")
        if shots is not None and (not _is_int(shots) or shots != len(seq)):
            raise RetrieverError(
                f"{where}: field 'shots' is {shots!r} but icd_positions has {len(seq)} items"
            )
        per_query = out.setdefault(key, {})
        if shots in per_query:
            what = f"shots={shots}" if shots is not None else "a sequence without 'shots'"
            raise RetrieverError(f"{where}: query {key!r} already has {what}")
        per_query[shots] = list(seq)
    return out


@register_retriever("from_file")
@register_retriever("oracle")
class FileRetriever(Retriever):
    """Per-query ICD sequences from a JSONL file (see :func:`read_sequences`).

    For ``shots`` ICDs a query gets its line with ``"shots": shots`` if there is one, else its
    general sequence cut to ``shots`` items: the ``last`` ones (default; those nearest the query,
    as :class:`~leverlm.icl.retrievers.FixedRetriever` does - for a gt sequence built in the
    paper's ``left`` order they are the first chosen) or the ``first`` ones (a greedy
    ``leverlm select`` output: its prefix). A query without a long enough sequence, or whose
    exclusions hit its sequence, is an error naming the query, the shots and the file.
    """

    name = "from_file"

    def __init__(self, path: str, num_candidates: int | None = None, take: Take = "last"):
        if take not in ("last", "first"):
            raise RetrieverError(f"from_file: take must be 'last' or 'first', got {take!r}")
        super().__init__(num_candidates)
        self.path = str(path)
        self.take = take
        self.sequences = read_sequences(path, num_candidates)

    def sequence(self, key: str, shots: int) -> list[int]:
        """The ICDs of query ``key`` for ``shots`` shots (prompt order)."""
        per_query = self.sequences.get(key)
        if per_query is None:
            raise RetrieverError(f"from_file: query {key!r} has no sequence in {self.path}")
        if shots in per_query:
            return list(per_query[shots])
        seq = per_query.get(None)
        if seq is None or len(seq) < shots:
            have = sorted(len(s) for s in per_query.values())
            raise RetrieverError(
                f"from_file: query {key!r} has no sequence of {shots} ICDs in {self.path} "
                f"(lengths there: {have})"
            )
        return list(seq[len(seq) - shots :] if self.take == "last" else seq[:shots])

    def retrieve(self, queries: list[dict[str, Any]], shots: int) -> list[list[int]]:
        shots = _check_shots(shots)
        out = []
        for i, query in enumerate(queries):
            key = _query_key(query, i)
            seq = self.sequence(key, shots) if shots else []
            hit = self.excluded(query, i) & set(seq)
            if hit:
                raise RetrieverError(
                    f"from_file: query {key!r} excludes positions {sorted(hit)} of its "
                    f"sequence {seq} in {self.path}"
                )
            out.append(seq)
        return out


# ---------------------------------------------------------------------------------------------
# the fixed baseline's sequence
# ---------------------------------------------------------------------------------------------


def best_gt_sequence(gt_dir: str | os.PathLike, num_candidates: int | None = None) -> list[int]:
    """The best sequence of a gt dataset's highest-scoring record (prompt order).

    Records keep their beams best first, so a record's score is ``scores[0]`` (the InfoScore
    of its best sequence's last step under the paper's ``last`` ranking); the record with the
    highest one wins, ties going to the lowest anchor position. ``num_candidates`` checks that
    the gt dataset was built on a supporting set of that size.
    """
    from leverlm.gt.data import GtDataError, read_gt

    try:
        manifest, records = read_gt(gt_dir)
    except (GtDataError, OSError) as err:
        raise RetrieverError(f"fixed: gt dataset {str(gt_dir)!r}: {err}") from err
    if not records:
        raise RetrieverError(f"fixed: gt dataset {str(gt_dir)!r} has no records")
    size = (manifest.get("supporting_set") or {}).get("num_samples")
    if num_candidates is not None and size != num_candidates:
        raise RetrieverError(
            f"fixed: gt dataset {str(gt_dir)!r} was built on a supporting set of {size} "
            f"samples, this supporting set has {num_candidates}"
        )
    best = max(records, key=lambda r: (r.scores[0], -r.anchor_position))
    return list(best.sequences[0])
