"""InfoScore: how much a candidate ICD raises the frozen LVLM's probability of the answer.

``InfoScore(d) = P(y | S+d, x) - P(y | S, x)`` with ``P = exp(-mean token cross-entropy)`` over
the query's answer tokens (the paper's definition). ``S+d`` depends on the construct order:
``left`` puts the new ICD farthest from the query (``[d] + S``, the paper's default),
``right`` next to it (``S + [d]``).

:func:`score_candidates` is the fast path: the "without candidate" score once per call, the
candidates in batches through ``LVLM.score`` (``left``) or ``LVLM.score_with_prefix``
(``right``: instruction + S encoded once, its KV cache reused). :func:`score_candidates_reference`
is the straightforward path (one candidate at a time through ``LVLM.score_reference``), kept
for parity tests and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from leverlm.lvlm.base import LVLM, ScoreResult

ORDERS = ("left", "right")
METRICS = ("infoscore", "logprob_mean", "logprob_sum")

Sample = dict[str, Any]


def score_gain(with_: ScoreResult, without: ScoreResult, metric: str = "infoscore") -> torch.Tensor:
    """The per-candidate gain of ``with_`` (``[K]`` rows) over ``without`` (one row).

    ``infoscore``: ``exp(mean) - exp(mean0)``; ``logprob_mean``: ``mean - mean0``;
    ``logprob_sum``: ``sum - sum0``.
    """
    _check_metric(metric)
    if metric == "infoscore":
        return with_.mean_logprob.exp() - without.mean_logprob.exp()[0]
    if metric == "logprob_mean":
        return with_.mean_logprob - without.mean_logprob[0]
    return with_.sum_logprob - without.sum_logprob[0]


def with_candidate(prefix_icds: Sequence[Sample], candidate: Sample, order: str) -> list[Sample]:
    """The ICD sequence (prompt order) after adding ``candidate`` to ``prefix_icds``."""
    _check_order(order)
    return [candidate, *prefix_icds] if order == "left" else [*prefix_icds, candidate]


def score_candidates(
    lvlm: LVLM,
    prefix_icds: Sequence[Sample],
    query: Sample,
    candidates: Sequence[Sample],
    order: str = "left",
    metric: str = "infoscore",
    batch_size: int = 32,
    reference: bool = False,
) -> torch.Tensor:
    """``[K]`` gain of each candidate over the current ICD sequence ``prefix_icds`` (fast path).

    Args:
        prefix_icds: the ICDs chosen so far, in prompt order (``S``; may be empty).
        order: ``left`` (``[d] + S``) or ``right`` (``S + [d]``).
        metric: ``infoscore`` | ``logprob_mean`` | ``logprob_sum`` (see :func:`score_gain`).
        batch_size: candidates per LVLM forward (the paper: 32).
        reference: the straightforward path instead: each candidate alone through
            ``LVLM.score_reference`` (full forward, full logits, no caches; ``batch_size``
            unused).
    """
    import torch

    from leverlm.lvlm.base import ScoreResult

    _validate(lvlm, prefix_icds, query, candidates, order, metric, batch_size)
    if not candidates:
        return torch.zeros(0)
    prefix = list(prefix_icds)
    if reference:
        without = lvlm.score_reference([prefix], [query])
        parts = [
            lvlm.score_reference([with_candidate(prefix, d, order)], [query]) for d in candidates
        ]
        return score_gain(ScoreResult.cat(parts), without, metric)
    if order == "right":
        without = lvlm.score_with_prefix(prefix, [[]], [query])
    else:
        without = lvlm.score([prefix], [query])
    parts = []
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start : start + batch_size]
        if order == "right":
            parts.append(lvlm.score_with_prefix(prefix, [[d] for d in chunk], [query] * len(chunk)))
        else:
            parts.append(lvlm.score([[d, *prefix] for d in chunk], [query] * len(chunk)))
    return score_gain(ScoreResult.cat(parts), without, metric)


def score_candidates_reference(*args: Any, **kwargs: Any) -> torch.Tensor:
    """:func:`score_candidates` on the straightforward path (``reference=True``)."""
    return score_candidates(*args, **kwargs, reference=True)


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def _validate(
    lvlm: LVLM,
    prefix_icds: Sequence[Sample],
    query: Sample,
    candidates: Sequence[Sample],
    order: str,
    metric: str,
    batch_size: int,
) -> None:
    """Every argument and every prompt checked before the first forward.

    Builds and tokenises each ``S+d`` prompt (cheap: tokenisation is cached), so a sample
    with a missing field or a prompt over the model's context fails here, naming the key.
    """
    _check_order(order)
    _check_metric(metric)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seqs = [list(prefix_icds)] + [with_candidate(prefix_icds, d, order) for d in candidates]
    lvlm.encode_pairs(seqs, [query] * len(seqs))
