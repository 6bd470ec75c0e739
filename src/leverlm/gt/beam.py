"""Beam search for ground-truth ICD sequences, as a pure function over a scoring callable.

A *scorer* is ``score_fn(prefix, candidates) -> scores``: ``prefix`` is a beam's ICD positions
in prompt order (index 0 farthest from the query), ``candidates`` the positions that may be
added, and ``scores[i]`` the value of adding ``candidates[i]`` to that prefix (InfoScore:
P(y | S+d, x) - P(y | S, x)). The scorer is called once per beam state with all its
candidates, so the "without candidate" term is computed once per state.

Adapters turn an LVLM into a scorer: :func:`infoscore_scorer` (``leverlm.gt.scoring``) and
:class:`CiderGainScorer` (captioning: CIDEr with the candidate minus without).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from leverlm.errors import LeverError

ORDERS = ("left", "right")
RANKINGS = ("last", "cumulative")

ScoreFn = Callable[[Sequence[int], Sequence[int]], Sequence[float]]


class BeamConfigError(LeverError):
    """An impossible beam-search setting (names the setting and its value)."""


@dataclass(frozen=True)
class Beam:
    """One ICD sequence under construction.

    ``sequence`` is in prompt order; ``step_scores`` in construction order (the order the
    ICDs were added, which for ``order="left"`` is the reverse of the prompt order).
    """

    sequence: tuple[int, ...]
    score: float
    step_scores: tuple[float, ...]


def check_beam_config(
    beam_size: int, shots: int, num_candidates: int, order: str = "left", ranking: str = "last"
) -> None:
    """Refuse impossible settings early, naming the offending value."""
    if shots < 1:
        raise BeamConfigError(f"shots must be >= 1; got shots={shots}")
    if beam_size < 1:
        raise BeamConfigError(f"beam_size must be >= 1; got beam_size={beam_size}")
    if beam_size > num_candidates:
        raise BeamConfigError(
            f"beam_size={beam_size} exceeds the number of candidates per anchor "
            f"(num_candidates={num_candidates})"
        )
    if shots > num_candidates:
        raise BeamConfigError(
            f"shots={shots} exceeds the number of candidates per anchor "
            f"(num_candidates={num_candidates}); a candidate is used at most once per sequence"
        )
    if order not in ORDERS:
        raise BeamConfigError(f"order must be one of {ORDERS}; got order={order!r}")
    if ranking not in RANKINGS:
        raise BeamConfigError(f"ranking must be one of {RANKINGS}; got ranking={ranking!r}")


def beam_search(
    candidates: Sequence[int],
    score_fn: ScoreFn,
    *,
    beam_size: int,
    shots: int,
    order: str = "left",
    ranking: str = "last",
) -> list[Beam]:
    """Build ``beam_size`` ICD sequences of ``shots`` candidates each, best first.

    Args:
        candidates: the anchor's candidate set (supporting-set positions, distinct).
        score_fn: the scorer (see the module docstring).
        order: ``left`` puts each new ICD in front of the chosen ones (farthest from the
            query; the paper's), ``right`` next to the query.
        ranking: ``last`` ranks beams by the score of their last step (the paper's),
            ``cumulative`` by the sum of their step scores.

    Ties are broken by expansion order (beams best first, candidates in the given order),
    so the result is deterministic for a deterministic scorer.
    """
    check_beam_config(beam_size, shots, len(candidates), order, ranking)
    if len(set(candidates)) != len(candidates):
        raise BeamConfigError(f"candidate set has duplicates: {list(candidates)}")
    beams = [Beam((), 0.0, ())]
    for step in range(shots):
        expansions: list[Beam] = []
        for beam in beams:
            used = set(beam.sequence)
            avail = [c for c in candidates if c not in used]
            scores = [float(s) for s in score_fn(beam.sequence, avail)]
            if len(scores) != len(avail):
                raise ValueError(
                    f"scorer returned {len(scores)} scores for {len(avail)} candidates "
                    f"(step {step + 1}, prefix {list(beam.sequence)})"
                )
            for cand, s in zip(avail, scores, strict=True):
                if math.isnan(s):
                    raise ValueError(
                        f"scorer returned NaN for candidate {cand} (prefix {list(beam.sequence)})"
                    )
                seq = (cand, *beam.sequence) if order == "left" else (*beam.sequence, cand)
                steps = (*beam.step_scores, s)
                total = s if ranking == "last" else math.fsum(steps)
                expansions.append(Beam(seq, total, steps))
        # sorted() is stable: equal scores keep expansion order.
        beams = sorted(expansions, key=lambda b: -b.score)[:beam_size]
    return beams


def beam_search_reference(
    candidates: Sequence[int],
    score_fn: ScoreFn,
    *,
    beam_size: int,
    shots: int,
    order: str = "left",
    ranking: str = "last",
) -> list[Beam]:
    """Beam search spelled out with one scorer call per (beam, candidate): the parity reference.

    Same semantics as :func:`beam_search` without batching candidates into one call.
    """
    check_beam_config(beam_size, shots, len(candidates), order, ranking)
    beams: list[tuple[tuple[int, ...], tuple[float, ...]]] = [((), ())]
    for _ in range(shots):
        scored: list[tuple[float, int, tuple[int, ...], tuple[float, ...]]] = []
        for seq, steps in beams:
            for cand in candidates:
                if cand in seq:
                    continue
                s = float(score_fn(seq, [cand])[0])
                new_seq = (cand, *seq) if order == "left" else (*seq, cand)
                new_steps = (*steps, s)
                key = s if ranking == "last" else math.fsum(new_steps)
                scored.append((key, len(scored), new_seq, new_steps))
        scored.sort(key=lambda t: (-t[0], t[1]))
        beams = [(seq, steps) for _, _, seq, steps in scored[:beam_size]]
    return [
        Beam(seq, steps[-1] if ranking == "last" else math.fsum(steps), steps)
        for seq, steps in beams
    ]


# -- scorers over an LVLM -------------------------------------------------------------------


def infoscore_scorer(
    lvlm: Any,
    query: dict[str, Any],
    samples: Mapping[int, dict[str, Any]],
    *,
    order: str = "left",
    metric: str = "infoscore",
    batch_size: int = 32,
    score_candidates: Callable[..., Any] | None = None,
) -> ScoreFn:
    """A scorer from ``leverlm.gt.scoring.score_candidates`` for one anchor.

    Args:
        query: the anchor sample (its answer is what is scored).
        samples: supporting-set samples by position (every candidate must be present).
        score_candidates: the scoring function (defaults to ``leverlm.gt.scoring``'s;
            injectable for tests).
    """
    if score_candidates is None:
        from leverlm.gt.scoring import score_candidates

    def score(prefix: Sequence[int], candidates: Sequence[int]) -> list[float]:
        values = score_candidates(
            lvlm,
            [samples[p] for p in prefix],
            query,
            [samples[c] for c in candidates],
            order=order,
            metric=metric,
            batch_size=batch_size,
        )
        return [float(v) for v in values]

    return score


CiderFn = Callable[[dict[str, str], dict[str, list[str]]], Mapping[str, float]]
TokenizeFn = Callable[[dict[str, list[str]]], dict[str, list[str]]]


def default_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """Captions tokenised for CIDEr (``leverlm.metrics.tokenize_captions``, PTB if Java)."""
    from leverlm.metrics import tokenize_captions

    return tokenize_captions(captions)[0]


def default_cider_fn(
    predictions: dict[str, str], references: dict[str, list[str]]
) -> dict[str, float]:
    """Per-sample CIDEr-D (x100) of already tokenised captions (``cider_from_tokens``)."""
    from leverlm.metrics import cider_from_tokens

    return {k: float(v) for k, v in cider_from_tokens(predictions, references)[1].items()}


def _references(sample: dict[str, Any]) -> list[str]:
    refs = sample.get("captions") or ([sample["caption"]] if sample.get("caption") else [])
    if not refs:
        raise ValueError(
            f"sample {sample.get('__key__', '?')!r} has no 'captions'/'caption' field "
            "(the cider_gain scorer needs reference captions)"
        )
    return [str(r) for r in refs]


class CiderGainScorer:
    """Captioning scorer: CIDEr of the caption generated with the candidate minus without.

    CIDEr weighs n-grams by inverse document frequency over a corpus; over a single image
    every IDF is 0, so the document frequencies come from a per-anchor corpus: the anchor's
    and its candidates' reference captions (K+1 images), fixed for the anchor, so a
    candidate's gain does not depend on what else is scored with it.

    Tokenisation (one PTB/Java process per call) is batched: references once per anchor,
    generated captions once per beam state; CIDEr itself then runs on tokens.

    Args:
        generate: ``generate(icd_seqs, queries) -> list[str]`` (e.g. ``LVLM.generate``), one
            caption per (ICD sequence, query) pair, already post-processed.
        tokenize: ``tokenize({key: [caption, ...]}) -> {key: [tokenised, ...]}``.
        cider_fn: ``cider_fn(predictions, references) -> {key: score}`` on tokenised text.
    """

    def __init__(
        self,
        generate: Callable[[list[list[dict[str, Any]]], list[dict[str, Any]]], list[str]],
        query: dict[str, Any],
        samples: Mapping[int, dict[str, Any]],
        candidates: Sequence[int],
        *,
        order: str = "left",
        batch_size: int = 32,
        tokenize: TokenizeFn | None = None,
        cider_fn: CiderFn | None = None,
    ) -> None:
        self.generate, self.query, self.samples = generate, query, samples
        self.order, self.batch_size = order, max(1, int(batch_size))
        self.tokenize = tokenize or default_tokenize
        self.cider_fn = cider_fn or default_cider_fn
        self._anchor_key = "__anchor__"
        # Context documents for the IDF: the candidates' references (keys cannot clash with
        # the anchor's), with their own first caption as a placeholder prediction (a
        # prediction does not enter the document frequencies).
        refs = {f"ctx{c}": _references(samples[c]) for c in candidates}
        refs[self._anchor_key] = _references(query)
        self._refs = self.tokenize(refs)
        self._ctx_preds = {k: v[0] for k, v in self._refs.items() if k != self._anchor_key}
        self._base_cache: dict[tuple[int, ...], float] = {}

    def cider(self, captions: Sequence[str]) -> list[float]:
        """CIDEr of generated captions for the anchor, each against the per-anchor corpus."""
        toks = self.tokenize({f"gen{i}": [c] for i, c in enumerate(captions)})
        out = []
        for i in range(len(captions)):
            preds = {self._anchor_key: toks[f"gen{i}"][0], **self._ctx_preds}
            out.append(float(self.cider_fn(preds, self._refs)[self._anchor_key]))
        return out

    def _captions(self, seqs: list[tuple[int, ...]]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i : i + self.batch_size]
            icds = [[self.samples[p] for p in seq] for seq in chunk]
            out += list(self.generate(icds, [self.query] * len(chunk)))
        return out

    def __call__(self, prefix: Sequence[int], candidates: Sequence[int]) -> list[float]:
        prefix = tuple(prefix)
        seqs = [(c, *prefix) if self.order == "left" else (*prefix, c) for c in candidates]
        fresh = prefix not in self._base_cache
        # The "without" caption once per beam state, generated and scored with the others.
        captions = self._captions(([prefix] if fresh else []) + seqs)
        scores = self.cider(captions)
        if fresh:
            self._base_cache[prefix] = scores.pop(0)
        base = self._base_cache[prefix]
        return [s - base for s in scores]
