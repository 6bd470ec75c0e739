"""Exact cosine top-k: the nearest supporting-set rows of each query row.

One implementation serves the gt candidate samplers (``image_sim``, ``text_sim``,
``joint_sim``) and the similarity retrievers (SIIR, STTR, SITR, ``joint_sim``):
:func:`cosine_topk`, with :func:`cosine_topk_reference` as its plain, obviously right
counterpart for parity tests.

The work is done in fixed-shape blocks (``query_block`` queries, zero-padded, against
``chunk_rows`` supporting rows, the last chunk zero-padded), so a query's similarities come
from the same kernel shapes whatever else is in its batch: its neighbours are the same on 1 or
N processes, alone or in a batch. Ties go to the lower position. Memory stays at one block of
scores however large the supporting set (which may be a memory-mapped fp16 array).

:class:`JointFeatures` puts row-aligned features side by side, each L2-normalised: the cosine
of two such rows is the mean of the features' cosines (``joint_sim``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from leverlm.errors import LeverError

if TYPE_CHECKING:
    import numpy as np


class SimilarityError(LeverError):
    """Features that cannot be compared (names the array, the row or the shapes)."""


def normalise(x: Any) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (all-zero rows stay zero)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.float32(1e-12))


class JointFeatures:
    """Row-aligned ``(N, D_i)`` arrays side by side, each row L2-normalised per array.

    Rows are built when indexed (a slice, a list of rows), so a memory-mapped store is never
    copied whole: ``joint[a:b]`` is ``(b - a, sum D_i)`` float32.
    """

    def __init__(self, *arrays: Any) -> None:
        rows = {int(a.shape[0]) for a in arrays}
        if not arrays or len(rows) != 1:
            shapes = [tuple(a.shape) for a in arrays]
            raise SimilarityError(f"joint features need row-aligned arrays, got shapes {shapes}")
        self.arrays = arrays
        self.shape = (rows.pop(), sum(int(a.shape[1]) for a in arrays))
        self.ndim, self.dtype = 2, arrays[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        import numpy as np

        return np.concatenate([normalise(a[index]) for a in self.arrays], axis=1)


def _finite(block: np.ndarray, what: str, offset: int) -> None:
    import numpy as np

    bad = ~np.isfinite(block).all(axis=1)
    if bad.any():
        raise SimilarityError(f"{what} row {offset + int(np.flatnonzero(bad)[0])} is not finite")


def cosine_topk(
    queries: Any,
    support: Any,
    k: int,
    exclude: Sequence[Sequence[int]] | None = None,
    *,
    chunk_rows: int = 16384,
    query_block: int = 16,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` supporting rows most cosine-similar to each query row.

    Args:
        queries: ``(Q, D)`` features; support: ``(N, D)`` features (may be memory-mapped, or a
            :class:`JointFeatures`); row = supporting-set position.
        exclude: ``exclude[i]`` are positions query ``i`` must not get.
        chunk_rows / query_block: the fixed block shape (see the module docstring).
        device: where the block products run (``cpu``: numpy; else torch on that device).

    Returns ``(positions int64 (Q, k), scores float32 (Q, k))``, most similar first. The
    supporting set is read once per call, chunk by chunk.
    """
    import numpy as np

    n, dim = int(support.shape[0]), int(support.shape[1])
    if queries.shape[1] != dim:
        raise SimilarityError(
            f"feature dims differ: query features {tuple(queries.shape)} vs supporting-set "
            f"features {tuple(support.shape)}"
        )
    if not 0 <= k <= n:
        raise SimilarityError(f"k={k} must be in 0..N={n}")
    q_count = int(queries.shape[0])
    if k == 0 or q_count == 0:
        return np.zeros((q_count, k), np.int64), np.zeros((q_count, k), np.float32)
    padded = np.zeros((-(-q_count // query_block) * query_block, dim), np.float32)
    padded[:q_count] = normalise(queries[:])
    _finite(padded, "query features", 0)
    ex_r = np.array([i for i, ex in enumerate(exclude or ()) for _ in ex], np.int64)
    ex_c = np.array([int(p) for ex in (exclude or ()) for p in ex], np.int64)
    product = _product(padded, device)
    best_sims = np.full((len(padded), 0), -np.inf, np.float32)
    best_pos = np.zeros((len(padded), 0), np.int64)
    for start in range(0, n, chunk_rows):
        rows = normalise(support[start : start + chunk_rows])
        _finite(rows, "supporting-set features", start)
        n_rows = len(rows)
        if n_rows < chunk_rows:  # pad the last chunk: the same product shape always
            rows = np.concatenate([rows, np.zeros((chunk_rows - n_rows, dim), np.float32)])
        block_sims = product(rows)
        keep = min(k, best_sims.shape[1] + n_rows)
        new_sims = np.empty((len(padded), keep), np.float32)
        new_pos = np.empty((len(padded), keep), np.int64)
        pos = np.arange(start, start + n_rows, dtype=np.int64)
        inside = (ex_c >= start) & (ex_c < start + n_rows)
        for b in range(0, len(padded), query_block):
            sims = block_sims(b, b + query_block)[:, :n_rows]
            hit = inside & (ex_r >= b) & (ex_r < b + query_block)
            sims[ex_r[hit] - b, ex_c[hit] - start] = -np.inf
            sims = np.concatenate([best_sims[b : b + query_block], sims], axis=1)
            cand = np.concatenate(
                [best_pos[b : b + query_block], np.broadcast_to(pos, (query_block, n_rows))], 1
            )
            # Exact top-k, ties to the lower position: a partition finds each row's k-th
            # largest value, then only the entries >= it are sorted on (-similarity, position).
            kth = np.partition(sims, sims.shape[1] - keep, axis=1)[:, sims.shape[1] - keep]
            order = np.tile(np.arange(keep), (query_block, 1))  # padding rows: anything
            for i in range(min(query_block, q_count - b)):
                idx = np.flatnonzero(sims[i] >= kth[i])
                order[i] = idx[np.lexsort((cand[i, idx], -sims[i, idx]))[:keep]]
            new_sims[b : b + query_block] = np.take_along_axis(sims, order, axis=1)
            new_pos[b : b + query_block] = np.take_along_axis(cand, order, axis=1)
        best_sims, best_pos = new_sims, new_pos
    return best_pos[:q_count], best_sims[:q_count]


def _product(queries: np.ndarray, device: str) -> Any:
    """``product(rows)(a, b)``: ``queries[a:b] @ rows.T``, one query block at a time, on
    ``device`` (the rows are moved there once per chunk)."""
    if device == "cpu":
        return lambda rows: lambda a, b: queries[a:b] @ rows.T
    import torch

    q = torch.from_numpy(queries).to(device)

    def per_chunk(rows: np.ndarray) -> Any:
        r = torch.from_numpy(rows).to(device)
        return lambda a, b: (q[a:b] @ r.T).cpu().numpy()

    return per_chunk


def cosine_topk_reference(
    queries: Any, support: Any, k: int, exclude: Sequence[Sequence[int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cosine_topk` the plain way: the whole float64 score matrix, one sort per query."""
    import numpy as np

    def unit(x: Any) -> np.ndarray:
        x = np.asarray(x[:], dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sims = unit(queries) @ unit(support).T
    positions = np.zeros((len(sims), k), np.int64)
    scores = np.zeros((len(sims), k), np.float32)
    for row, row_sims in enumerate(sims):
        for p in exclude[row] if exclude is not None else ():
            row_sims[p] = -np.inf
        order = np.lexsort((np.arange(len(row_sims)), -row_sims))[:k]
        positions[row], scores[row] = order, row_sims[order]
    return positions, scores
