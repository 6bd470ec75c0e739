"""ICD retrievers: which supporting-set positions each query sees as demonstrations.

Every retriever answers ``retrieve(queries, shots) -> list[list[int]]``: per query, ``shots``
distinct supporting-set positions in **prompt order** - index 0 is the ICD farthest from the
query, the last one sits right before the query.

A query is a dict with at least ``__key__`` (stable string id) and ``position`` (its row in the
query feature arrays); an optional ``exclude_positions`` (supporting-set positions it must not
get, e.g. itself when queries come from the supporting set) is honoured by every retriever.

Baselines of the paper: ``zero_shot``; ``random`` (RS); similarity retrieval with CLIP features
``siir`` (image -> image), ``sttr`` (text -> text), ``sitr`` (image -> text); ``fixed`` (one
sequence for every query); ``shuffled`` (any retriever's ICDs in a seeded random order). Ours:
``joint_sim`` (the mean of the image and text cosines, as the gt sampler of that name).
Other modules add theirs with :func:`register_retriever` (e.g. ``lever_lm``).

Randomness is seeded *per query* from ``(seed, __key__)`` with SHA-256, so a query gets the
same ICDs whatever batch, rank or order it is processed in.
"""

from __future__ import annotations

import functools
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from leverlm.errors import LeverError

if TYPE_CHECKING:
    import numpy as np

MostSimilar = Literal["last", "first"]


class RetrieverError(LeverError):
    """A retriever config or query that cannot work (names the value at fault)."""


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

RETRIEVERS: dict[str, Callable[..., Retriever]] = {}

F = TypeVar("F", bound=Callable[..., Any])


def register_retriever(name: str, *, replace: bool = False) -> Callable[[F], F]:
    """Decorator: make a retriever class (or factory function) buildable by ``name``.

    >>> @register_retriever("lever_lm")
    ... class LeverLMRetriever(Retriever): ...
    """

    def decorator(factory: F) -> F:
        if name in RETRIEVERS and not replace and RETRIEVERS[name] is not factory:
            raise RetrieverError(
                f"retriever {name!r} is already registered ({RETRIEVERS[name]!r}); "
                "pass replace=True to override"
            )
        RETRIEVERS[name] = factory
        return factory

    return decorator


def available_retrievers() -> list[str]:
    """Names :func:`build_retriever` accepts."""
    return sorted(RETRIEVERS)


def build_retriever(name: str, **kwargs: Any) -> Retriever:
    """Build a registered retriever by name with its constructor's keyword arguments."""
    if name not in RETRIEVERS:
        raise RetrieverError(
            f"unknown retriever {name!r}; registered: {', '.join(available_retrievers())}"
        )
    try:
        retriever = RETRIEVERS[name](**kwargs)
    except TypeError as err:
        raise RetrieverError(f"retriever {name!r}: bad arguments {sorted(kwargs)}: {err}") from err
    if not isinstance(retriever, Retriever):
        raise RetrieverError(f"retriever {name!r} factory returned {type(retriever).__name__}")
    return retriever


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def stable_seed(seed: int, *parts: str) -> int:
    """A 64-bit seed from ``seed`` and strings, equal on every run and machine.

    (Python's ``hash()`` of a string changes between processes, so it cannot be used.)
    """
    text = "\x1f".join([str(int(seed)), *parts])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def query_rng(seed: int, tag: str, key: str) -> np.random.Generator:
    """The random generator of one query for one purpose (``tag``)."""
    import numpy as np

    return np.random.default_rng(stable_seed(seed, tag, key))


def _query_key(query: dict[str, Any], index: int) -> str:
    if "__key__" not in query:
        raise RetrieverError(f"query {index} has no '__key__' (fields: {sorted(query)})")
    return str(query["__key__"])


def _query_position(query: dict[str, Any], index: int, num_queries: int) -> int:
    if "position" not in query:
        raise RetrieverError(
            f"query {index} ({query.get('__key__', '?')!r}) has no 'position' "
            f"(fields: {sorted(query)})"
        )
    pos = query["position"]
    if isinstance(pos, bool) or not hasattr(pos, "__index__"):
        raise RetrieverError(f"query {query.get('__key__', index)!r}: position {pos!r} is not int")
    pos = int(pos)
    if not 0 <= pos < num_queries:
        raise RetrieverError(
            f"query {query.get('__key__', index)!r}: position {pos} is outside the query "
            f"features (0..{num_queries - 1})"
        )
    return pos


def _check_shots(shots: Any) -> int:
    if isinstance(shots, bool) or not isinstance(shots, int):
        raise RetrieverError(f"shots must be an int, got {shots!r}")
    if shots < 0:
        raise RetrieverError(f"shots must be >= 0, got shots={shots}")
    return shots


def check_sizes(retriever: str, **sizes: Any) -> None:
    """Each of ``sizes`` is an int >= 1 (else an error naming the retriever and the argument)."""
    for arg, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RetrieverError(f"{retriever}: {arg} must be an int >= 1, got {value!r}")


def _check_most_similar(value: str) -> MostSimilar:
    if value not in ("last", "first"):
        raise RetrieverError(f"most_similar must be 'last' or 'first', got {value!r}")
    return value  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# base
# ---------------------------------------------------------------------------------------------


class Retriever(ABC):
    """Chooses ICDs for queries. Subclasses implement :meth:`retrieve`.

    Args:
        num_candidates: supporting-set size N (positions are 0..N-1); None where unknown.
        exclude_query_position: also exclude the query's own ``position`` from its ICDs (when
            the queries *are* the supporting set, e.g. ground-truth anchors).
    """

    name: str = "retriever"

    def __init__(self, num_candidates: int | None = None, exclude_query_position: bool = False):
        if num_candidates is not None and (
            isinstance(num_candidates, bool) or not isinstance(num_candidates, int)
        ):
            raise RetrieverError(f"num_candidates must be an int, got {num_candidates!r}")
        if num_candidates is not None and num_candidates < 1:
            raise RetrieverError(f"num_candidates must be >= 1, got {num_candidates}")
        self.num_candidates = num_candidates
        self.exclude_query_position = bool(exclude_query_position)

    @abstractmethod
    def retrieve(self, queries: list[dict[str, Any]], shots: int) -> list[list[int]]:
        """Per query, ``shots`` distinct supporting-set positions in prompt order."""

    def prepare(self, queries: list[dict[str, Any]], max_shots: int) -> None:  # noqa: B027
        """Optionally precompute for ``queries`` up to ``max_shots`` (batched); default no-op."""

    def excluded(self, query: dict[str, Any], index: int = 0) -> frozenset[int]:
        """Supporting-set positions this query must not get."""
        raw = query.get("exclude_positions") or ()
        try:
            out = {int(p) for p in raw}
        except (TypeError, ValueError):
            raise RetrieverError(
                f"query {query.get('__key__', index)!r}: exclude_positions {raw!r} must be a "
                "list of ints"
            ) from None
        if self.exclude_query_position:
            if "position" not in query:
                raise RetrieverError(
                    f"query {query.get('__key__', index)!r} has no 'position' to exclude"
                )
            out.add(int(query["position"]))
        return frozenset(out)

    def checked(self, queries: list[dict[str, Any]], shots: int) -> list[tuple[str, frozenset]]:
        """Each query's key and excluded positions, once it is known it can get ``shots`` ICDs."""
        out = []
        for i, query in enumerate(queries):
            key, excluded = _query_key(query, i), self.excluded(query, i)
            self._check_capacity(shots, excluded, key)
            out.append((key, excluded))
        return out

    def _check_capacity(self, shots: int, excluded: frozenset[int], key: Any) -> None:
        """Fail early when a query cannot get ``shots`` distinct allowed ICDs."""
        if self.num_candidates is None:
            return
        n = self.num_candidates
        allowed = n - sum(1 for p in excluded if 0 <= p < n)
        if shots > allowed:
            raise RetrieverError(
                f"{self.name}: shots={shots} is more than the {allowed} ICDs available to query "
                f"{key!r} (supporting set N={n}, {n - allowed} excluded)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_candidates={self.num_candidates})"


# ---------------------------------------------------------------------------------------------
# zero-shot, random, fixed, shuffled
# ---------------------------------------------------------------------------------------------


@register_retriever("zero_shot")
class ZeroShotRetriever(Retriever):
    """No ICDs. Only ``shots=0`` is meaningful; any other value is an error (not ignored)."""

    name = "zero_shot"

    def __init__(self) -> None:
        super().__init__(None)

    def retrieve(self, queries: list[dict[str, Any]], shots: int) -> list[list[int]]:
        if _check_shots(shots) != 0:
            raise RetrieverError(f"zero_shot retrieves no ICDs; got shots={shots} (use 0)")
        return [[] for _ in queries]


@register_retriever("random")
class RandomRetriever(Retriever):
    """Random sampling (RS): ``shots`` distinct random ICDs per query, seeded per query key.

    The choice depends only on ``(seed, __key__, exclusions)``: never on the batch. Draws come
    from one stream per query, so the ICDs for ``k`` shots are those for ``k + 1`` minus the
    last one drawn (runs with more shots extend, not replace, the fewer-shot sets). Prompt
    order is draw order.
    """

    name = "random"
    # Up to this supporting-set size a whole permutation is drawn; above, positions are drawn
    # with rejection of repeats (fast while shots << N; both keep the nesting property).
    _PERMUTATION_MAX_N = 65536
    _BLOCK = 64

    def __init__(self, num_candidates: int, seed: int = 0, exclude_query_position: bool = False):
        if num_candidates is None:
            raise RetrieverError("random: num_candidates (supporting-set size) is required")
        super().__init__(num_candidates, exclude_query_position)
        self.seed = int(seed)

    def _draw(self, key: str, shots: int, excluded: frozenset[int]) -> list[int]:
        n = self.num_candidates
        assert n is not None
        rng = query_rng(self.seed, "random", key)
        if n <= self._PERMUTATION_MAX_N:
            out = []
            for p in rng.permutation(n).tolist():
                if p not in excluded:
                    out.append(p)
                    if len(out) == shots:
                        break
            return out
        chosen: list[int] = []
        seen: set[int] = set(excluded)
        while len(chosen) < shots:
            # Fixed-size blocks so the stream (and so the first k draws) never depends on shots.
            for p in rng.integers(0, n, size=self._BLOCK).tolist():
                if p not in seen:
                    seen.add(p)
                    chosen.append(p)
                    if len(chosen) == shots:
                        break
        return chosen

    def retrieve(self, queries: list[dict[str, Any]], shots: int) -> list[list[int]]:
        keyed = self.checked(queries, _check_shots(shots))
        if shots == 0:
            return [[] for _ in queries]
        return [self._draw(key, shots, excluded) for key, excluded in keyed]


@register_retriever("fixed")
class FixedRetriever(Retriever):
    """The same ICD sequence for every query (e.g. the best-scoring ground-truth sequence).

    ``sequence`` is in prompt order (last = next to the query). For ``shots <= len(sequence)``
    the last ``shots`` items are used: those nearest the query, which both the similarity
    convention and the gt construction order ('left': each new ICD goes in front) make the
    first-chosen, most important ones. For more shots the sequence is extended at the far end
    with distinct positions drawn once from ``seed`` (needs ``num_candidates``), identical for
    every query, so the 8-shot set contains the 4-shot set. A query whose exclusions hit the
    sequence is an error rather than getting a different "fixed" set.
    """

    name = "fixed"

    def __init__(self, sequence: Sequence[int], num_candidates: int | None = None, seed: int = 0):
        super().__init__(num_candidates)
        seq = [int(p) for p in sequence]
        if not seq and num_candidates is None:
            raise RetrieverError("fixed: sequence is empty and no num_candidates to draw from")
        if len(set(seq)) != len(seq):
            raise RetrieverError(f"fixed: sequence {seq} has repeated positions")
        if num_candidates is not None and not all(0 <= p < num_candidates for p in seq):
            raise RetrieverError(
                f"fixed: sequence {seq} has positions outside 0..{num_candidates - 1}"
            )
        self.sequence = seq
        self.seed = int(seed)

    def sequence_for(self, shots: int) -> list[int]:
        """The fixed ICDs for ``shots`` shots (prompt order)."""
        shots = _check_shots(shots)
        if shots <= len(self.sequence):
            return self.sequence[len(self.sequence) - shots :]
        if self.num_candidates is None:
            raise RetrieverError(
                f"fixed: shots={shots} > len(sequence)={len(self.sequence)} and no "
                "num_candidates to extend it from"
            )
        self._check_capacity(shots, frozenset(), "<all>")
        extension = RandomRetriever(self.num_candidates, seed=self.seed)._draw(
            "fixed-extension", shots - len(self.sequence), frozenset(self.sequence)
        )
        # Drawn first = nearest to the given sequence: more shots push the farthest out.
        return extension[::-1] + self.sequence

    def retrieve(self, queries: list[dict[str, Any]], shots: int) -> list[list[int]]:
        seq = self.sequence_for(shots)
        out = []
        for i, query in enumerate(queries):
            hit = self.excluded(query, i) & set(seq)
            if hit:
                raise RetrieverError(
                    f"fixed: query {query.get('__key__', i)!r} excludes positions "
                    f"{sorted(hit)} of the fixed sequence {seq}"
                )
            out.append(list(seq))
        return out


@register_retriever("random_fixed")
def random_fixed(num_candidates: int, seed: int = 0) -> FixedRetriever:
    """The authors' fixed random ICD set: one seeded draw of supporting-set positions shown to
    every query (their ``random_retrieval_fixed``); the 8-shot set contains the 4-shot set."""
    return FixedRetriever((), num_candidates, seed)


@register_retriever("shuffled")
class ShuffledRetriever(Retriever):
    """Another retriever's ICDs in a random order, seeded per query (``lever_lm_shuffled``)."""

    name = "shuffled"

    def __init__(self, inner: Retriever, seed: int = 0):
        if not isinstance(inner, Retriever):
            raise RetrieverError(f"shuffled: inner must be a Retriever, got {inner!r}")
        super().__init__(inner.num_candidates, inner.exclude_query_position)
        self.inner = inner
        self.seed = int(seed)
        self.name = f"{inner.name}_shuffled"

    def prepare(self, queries: list[dict[str, Any]], max_shots: int) -> None:
        self.inner.prepare(queries, max_shots)

    def retrieve(self, queries: list[dict[str, Any]], shots: int) -> list[list[int]]:
        keys = [_query_key(q, i) for i, q in enumerate(queries)]
        out = []
        for key, icds in zip(keys, self.inner.retrieve(queries, shots)):
            # shots in the tag: each shot count gets its own order, independent of the others.
            order = query_rng(self.seed, f"shuffle:{len(icds)}", key).permutation(len(icds))
            out.append([icds[j] for j in order.tolist()])
        return out


@register_retriever("answer_oracle")
class AnswerOracleRetriever(Retriever):
    """An upper reference that peeks at the query's label: ICDs whose answer equals the query's.

    For a VQA-style task with a small answer vocabulary (easy-vqa; the demo's ``oracle``
    method), a query gets supporting-set samples with the same ``field`` value (whitespace- and
    case-folded), in a random order seeded per query key, so the ICDs for ``k`` shots are a
    prefix of those for ``k + 1``. When fewer than ``shots`` samples share the answer, the rest
    are random other samples, placed farthest from the query (first in prompt order).

    It reads the ``field`` of every supporting-set sample once (JSON only, no images).

    Args:
        queries: the query collection (its samples hold the labels peeked at).
        supporting_set: the collection ICD positions point into.
        field: the answer field compared.
        seed: the per-query order seed.
    """

    name = "answer_oracle"

    def __init__(
        self,
        queries: str,
        supporting_set: str,
        num_candidates: int | None = None,
        field: str = "answer",
        seed: int = 0,
        exclude_query_position: bool = False,
    ):
        import numpy as np

        from leverlm.data.collection import Collection

        self.queries = Collection(queries)
        support = Collection(supporting_set)
        n = len(support)
        if num_candidates is not None and num_candidates != n:
            raise RetrieverError(
                f"answer_oracle: num_candidates={num_candidates} but the supporting set "
                f"{supporting_set} has {n} samples"
            )
        super().__init__(n, exclude_query_position)
        self.field, self.seed = str(field), int(seed)
        groups: dict[str, list[int]] = {}
        for pos, fields in enumerate(support.all_fields()):
            groups.setdefault(self._label(fields, pos, supporting_set), []).append(pos)
        self.groups = {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}

    def _label(self, fields: dict[str, Any], pos: int, where: str) -> str:
        value = fields.get(self.field)
        if not isinstance(value, str) or not value.strip():
            raise RetrieverError(
                f"answer_oracle: sample {pos} of {where} has no string field {self.field!r} "
                f"(got {value!r})"
            )
        return " ".join(value.lower().split())

    def _one(self, key: str, label: str, shots: int, excluded: frozenset[int]) -> list[int]:
        rng = query_rng(self.seed, "answer_oracle", key)
        group = self.groups.get(label)
        same: list[int] = []
        if group is not None:
            for p in group[rng.permutation(len(group))].tolist():
                if p not in excluded:
                    same.append(p)
                    if len(same) == shots:
                        return same
        taken = set(same) | set(excluded)
        assert self.num_candidates is not None
        others = [p for p in rng.permutation(self.num_candidates).tolist() if p not in taken]
        # the matching ICDs stay nearest the query; fillers go first in prompt order
        return others[: shots - len(same)] + same

    def retrieve(self, queries: list[dict[str, Any]], shots: int) -> list[list[int]]:
        shots = _check_shots(shots)
        out = []
        for i, (query, (key, excluded)) in enumerate(zip(queries, self.checked(queries, shots))):
            pos = _query_position(query, i, len(self.queries))
            label = self._label(self.queries.fields(pos), pos, str(self.queries.path))
            out.append(self._one(key, label, shots, excluded) if shots else [])
        return out


# ---------------------------------------------------------------------------------------------
# similarity retrieval
# ---------------------------------------------------------------------------------------------


def _check_features(array: Any, name: str) -> None:
    import numpy as np

    if not isinstance(array, np.ndarray):
        raise RetrieverError(f"{name} must be a numpy array (N, D), got {type(array).__name__}")
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise RetrieverError(f"{name} must have shape (N, D) with N, D >= 1, got {array.shape}")
    if array.dtype.kind != "f":
        raise RetrieverError(f"{name} must be float16/32/64, got dtype {array.dtype}")


Pairs = tuple[tuple[str, str], ...]


class SimilarityRetriever(Retriever):
    """Cosine nearest neighbours of each query among the supporting set's CLIP features.

    ``pairs`` names what is compared, as (query modality, ICD modality) pairs; a query's score
    for an ICD is the mean of the pairs' cosines. Registered as ``siir`` (image -> image),
    ``sttr`` (text -> text), ``sitr`` (image -> text) and ``joint_sim`` (image -> image and
    text -> text). A captioning query has no text of its own (its caption is the answer): with
    ``query_text=None`` the query *image* stands in for the query text (STTR then behaves like
    SITR); ``self.fallback`` records it.

    Args:
        support_image / support_text: ``(N, D)`` float arrays (may be memory-mapped fp16); row
            = supporting-set position.
        query_image / query_text: ``(Q, D)`` float arrays; row = the query's ``position``.
        most_similar: ``"last"`` (paper: the most similar ICD next to the query) or ``"first"``.
        chunk_size: supporting rows scored at once (memory ~ 16 x chunk_size floats).
        query_chunk_size: queries ranked together by :meth:`prepare`.
        device: where the similarity products run (``cpu``: numpy).
        cache: remember each query's ranking; a ranking for k shots is the prefix of the one for
            more shots (ties broken by position), so ``prepare(all, max_shots)`` once makes every
            later ``retrieve`` a lookup.
    """

    def __init__(
        self,
        support_image: np.ndarray | None = None,
        query_image: np.ndarray | None = None,
        support_text: np.ndarray | None = None,
        query_text: np.ndarray | None = None,
        *,
        pairs: Pairs = (("image", "image"),),
        name: str = "similarity",
        most_similar: MostSimilar = "last",
        exclude_query_position: bool = False,
        chunk_size: int = 16384,
        query_chunk_size: int = 256,
        device: str = "cpu",
        cache: bool = True,
    ):
        from leverlm.similarity import JointFeatures

        self.name = name
        given = {"support_image": support_image, "support_text": support_text,
                 "query_image": query_image, "query_text": query_text}  # fmt: skip
        self.fallback = query_text is None and any(q == "text" for q, _ in pairs)
        sides: dict[str, list[np.ndarray]] = {"support": [], "query": []}
        for query_m, support_m in pairs:
            if self.fallback and query_m == "text":
                query_m = "image"
            for side, m in (("support", support_m), ("query", query_m)):
                array = given[f"{side}_{m}"]
                if array is None:
                    what = f"{side}_{m}"
                    if self.fallback and side == "query":
                        what = "query_text (or query_image, compared with ICD texts)"
                    raise RetrieverError(f"{name}: {what} is required")
                _check_features(array, f"{name}: {side}_{m} features")
                sides[side].append(array)
        for s, q in zip(sides["support"], sides["query"], strict=True):
            if s.shape[1] != q.shape[1]:
                raise RetrieverError(
                    f"{name}: feature dims differ: supporting-set features {s.shape} vs query "
                    f"features {q.shape}"
                )
        check_sizes(name, chunk_size=chunk_size, query_chunk_size=query_chunk_size)
        support, query = (x[0] if len(x) == 1 else JointFeatures(*x) for x in sides.values())
        super().__init__(int(support.shape[0]), exclude_query_position)
        self.support_features, self.query_features = support, query
        self.most_similar = _check_most_similar(most_similar)
        self.chunk_size = chunk_size
        self.query_chunk_size = query_chunk_size
        self.device = device
        self.cache = cache
        self._ranked: dict[tuple[int, frozenset[int]], list[int]] = {}

    def _resolve(
        self, queries: list[dict[str, Any]], shots: int
    ) -> list[tuple[int, frozenset[int]]]:
        checked = self.checked(queries, _check_shots(shots))
        n = self.query_features.shape[0]
        return [
            (_query_position(q, i, n), ex) for i, (q, (_, ex)) in enumerate(zip(queries, checked))
        ]

    def _rank(self, items: list[tuple[int, frozenset[int]]], k: int) -> list[list[int]]:
        """Ranked (most similar first) top-``k`` per (position, exclusions), using the cache."""
        from leverlm.similarity import cosine_topk

        todo = sorted(
            {item for item in items if len(self._ranked.get(item, ())) < k},
            key=lambda it: (it[0], sorted(it[1])),
        )
        fresh: dict[tuple[int, frozenset[int]], list[int]] = {}
        for start in range(0, len(todo), self.query_chunk_size):
            chunk = todo[start : start + self.query_chunk_size]
            positions, _ = cosine_topk(
                self.query_features[[pos for pos, _ in chunk]],
                self.support_features,
                k,
                [sorted(ex) for _, ex in chunk],
                chunk_rows=self.chunk_size,
                device=self.device,
            )
            fresh.update(zip(chunk, positions.tolist()))
        if self.cache:
            self._ranked.update(fresh)
        return [(fresh[item] if item in fresh else self._ranked[item])[:k] for item in items]

    def prepare(self, queries: list[dict[str, Any]], max_shots: int) -> None:
        items = self._resolve(queries, max_shots)
        if self.cache and max_shots > 0:
            self._rank(items, max_shots)

    def retrieve(self, queries: list[dict[str, Any]], shots: int) -> list[list[int]]:
        items = self._resolve(queries, shots)
        if shots == 0:
            return [[] for _ in queries]
        ranked = self._rank(items, shots)
        # Ranked lists are most-similar-first; prompt order puts index 0 farthest from the query.
        return [r[::-1] if self.most_similar == "last" else list(r) for r in ranked]


# The paper's similarity baselines and ours (joint_sim): (query modality, ICD modality) pairs.
SIMILARITY_PAIRS: dict[str, Pairs] = {
    "siir": (("image", "image"),),
    "sttr": (("text", "text"),),
    "sitr": (("image", "text"),),
    "joint_sim": (("image", "image"), ("text", "text")),
}
for _name, _pairs in SIMILARITY_PAIRS.items():
    register_retriever(_name)(functools.partial(SimilarityRetriever, pairs=_pairs, name=_name))
