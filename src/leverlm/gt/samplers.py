"""Anchors and candidate sets for ground-truth construction.

Everything here is a pure function of (collection size, features, seed, anchor position):
an anchor's candidate set never depends on the rank, the batch or the order in which
anchors are processed, so a DDP run and a resumed run see the same candidates.

Samplers:

- ``random``: K supporting-set positions drawn uniformly without replacement (the paper's).
- ``image_sim`` / ``text_sim``: the K positions most cosine-similar to the anchor in the
  supporting set's feature store (``support_features``), read memory-mapped in row chunks
  (:func:`leverlm.similarity.cosine_topk`).
- ``joint_sim``: the K positions most similar in image *and* text at once: the mean of the
  image and text cosines (= the cosine of the two L2-normalised features side by side). Our
  addition: for templated questions (easy-vqa, VQAv2 "what color...") many ICDs tie on text
  alone, and the ones that also look like the anchor are those that share its answer.
- ``mix``: a blend of the above (e.g. 0.5 random / 0.25 image / 0.25 text), deduplicated and
  topped up with random positions to exactly K.

The anchor itself is never a candidate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from leverlm.errors import LeverError

if TYPE_CHECKING:
    import numpy as np

SAMPLERS = ("random", "image_sim", "text_sim", "joint_sim", "mix")
SIMILARITIES = ("image_sim", "text_sim", "joint_sim")
# Default blend of the ``mix`` sampler (the paper's 0.5 / 0.25 / 0.25).
DEFAULT_MIX: dict[str, float] = {"random": 0.5, "image_sim": 0.25, "text_sim": 0.25}

# Distinct integers mixed into the per-anchor seed so the streams of different uses
# (anchor choice, random candidates, mix top-up) never coincide.
_STREAM_ANCHORS = 0
_STREAM_RANDOM = 1
_STREAM_TOPUP = 2


class SamplerError(LeverError):
    """An impossible sampler configuration (names the setting and the value)."""


def _rng(seed: int, *stream: int) -> np.random.Generator:
    import numpy as np

    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, *stream])


def select_anchors(num_samples: int, num_anchors: int | None, seed: int) -> list[int]:
    """The anchor positions: a seeded random subset of ``range(num_samples)``, sorted.

    ``num_anchors`` of ``None`` or ``-1`` takes every sample. A different seed gives a
    different subset (unless all samples are taken).
    """
    if num_samples < 1:
        raise SamplerError(f"the collection is empty (num_samples={num_samples})")
    if num_anchors is None or num_anchors == -1:
        return list(range(num_samples))
    if num_anchors < 1:
        raise SamplerError(f"num_anchors must be >= 1, or -1/null for all; got {num_anchors}")
    if num_anchors > num_samples:
        raise SamplerError(
            f"num_anchors={num_anchors} exceeds the collection size ({num_samples} samples)"
        )
    perm = _rng(seed, _STREAM_ANCHORS).permutation(num_samples)[:num_anchors]
    return sorted(int(p) for p in perm)


class CandidateSampler(Protocol):
    """Candidate sets for a batch of anchors: ``k`` distinct positions each, anchor excluded."""

    k: int

    def sample(self, anchors: Sequence[int]) -> list[list[int]]: ...


def _check_k(k: int, num_samples: int) -> None:
    if k < 1:
        raise SamplerError(f"num_candidates must be >= 1; got {k}")
    if k > num_samples - 1:
        raise SamplerError(
            f"num_candidates={k} exceeds the {num_samples - 1} samples available per anchor "
            f"(supporting set of {num_samples} minus the anchor itself)"
        )


def _check_anchor(anchor: int, num_samples: int) -> None:
    if not 0 <= anchor < num_samples:
        raise SamplerError(
            f"anchor position {anchor} is outside the supporting set [0, {num_samples})"
        )


class RandomSampler:
    """``k`` positions uniformly without replacement from the supporting set minus the anchor."""

    def __init__(self, num_samples: int, k: int, seed: int) -> None:
        _check_k(k, num_samples)
        self.num_samples, self.k, self.seed = num_samples, k, seed

    def sample_one(
        self, anchor: int, k: int | None = None, stream: int = _STREAM_RANDOM
    ) -> list[int]:
        """Candidates of one anchor (``k`` overrides the set size, e.g. for a mix share)."""
        _check_anchor(anchor, self.num_samples)
        k = self.k if k is None else k
        # Draw from N-1 slots and skip over the anchor: uniform, and never the anchor.
        draw = _rng(self.seed, stream, anchor).choice(self.num_samples - 1, size=k, replace=False)
        return [int(p) + (1 if p >= anchor else 0) for p in draw]

    def sample(self, anchors: Sequence[int]) -> list[list[int]]:
        return [self.sample_one(a) for a in anchors]


class SimilaritySampler:
    """The ``k`` positions most cosine-similar to the anchor in a feature array (row = position).

    ``features`` is an ``(N, D)`` array (may be memory-mapped) or a
    :class:`~leverlm.similarity.JointFeatures`; see :func:`leverlm.similarity.cosine_topk`
    for the block shapes that make candidate sets identical on 1 or N ranks.
    """

    def __init__(
        self, features: Any, k: int, chunk_rows: int = 16384, query_block: int = 16
    ) -> None:
        self.features = features
        self.num_samples = int(features.shape[0])
        _check_k(k, self.num_samples)
        self.k, self.chunk_rows, self.query_block = k, int(chunk_rows), int(query_block)

    def sample(self, anchors: Sequence[int], k: int | None = None) -> list[list[int]]:
        from leverlm.similarity import cosine_topk

        for a in anchors:
            _check_anchor(a, self.num_samples)
        anchors = [int(a) for a in anchors]
        positions, _ = cosine_topk(
            self.features[anchors],
            self.features,
            self.k if k is None else k,
            [[a] for a in anchors],  # the anchor is never its own candidate
            chunk_rows=self.chunk_rows,
            query_block=self.query_block,
        )
        return positions.tolist()


def split_counts(k: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``k`` into integer shares proportional to ``weights`` (largest remainder)."""
    if not weights:
        raise SamplerError("mix weights are empty")
    for name, w in weights.items():
        if name not in ("random", *SIMILARITIES):
            raise SamplerError(
                f"mix weight for unknown sampler {name!r}; use random, " + ", ".join(SIMILARITIES)
            )
        if not (w >= 0 and math.isfinite(w)):
            raise SamplerError(f"mix weight {name}={w} must be a finite number >= 0")
    total = sum(weights.values())
    if total <= 0:
        raise SamplerError(f"mix weights {dict(weights)} sum to {total}; need a positive sum")
    exact = {n: k * w / total for n, w in weights.items()}
    counts = {n: int(math.floor(v)) for n, v in exact.items()}
    left = k - sum(counts.values())
    # Ties in the remainder go to the sampler listed first (dict order is the config order).
    for name in sorted(exact, key=lambda n: -(exact[n] - counts[n]))[:left]:
        counts[name] += 1
    return counts


class MixSampler:
    """A deduplicated blend of random and similarity candidates, topped up to ``k`` at random."""

    def __init__(
        self,
        num_samples: int,
        k: int,
        seed: int,
        weights: Mapping[str, float],
        sims: Mapping[str, SimilaritySampler],
    ) -> None:
        _check_k(k, num_samples)
        self.counts = split_counts(k, weights)
        for name in SIMILARITIES:
            if self.counts.get(name, 0) and name not in sims:
                raise SamplerError(f"mix uses {name} but has no {name} sampler")
        self.num_samples, self.k, self.seed = num_samples, k, seed
        self.random = RandomSampler(num_samples, k, seed)
        self.sims = dict(sims)

    def sample(self, anchors: Sequence[int]) -> list[list[int]]:
        parts = {
            n: self.sims[n].sample(anchors, c)
            for n, c in self.counts.items()
            if c and n in self.sims
        }
        out = []
        for i, a in enumerate(anchors):
            chosen: list[int] = []
            seen: set[int] = set()
            for name in self.counts:  # config order, so the candidate order is stable
                n = self.counts[name]
                if not n:
                    continue
                picks = parts[name][i] if name in parts else self.random.sample_one(a, n)
                for p in picks:
                    if p not in seen:
                        seen.add(p)
                        chosen.append(p)
            if len(chosen) < self.k:
                # Top up with random positions not chosen yet (a separate seeded stream).
                pool = self.random.sample_one(a, self.num_samples - 1, stream=_STREAM_TOPUP)
                for p in pool:
                    if len(chosen) == self.k:
                        break
                    if p not in seen:
                        seen.add(p)
                        chosen.append(p)
            out.append(chosen)
        return out


def build_sampler(
    kind: str,
    num_samples: int,
    k: int,
    seed: int,
    support_features: Any = None,
    mix: Mapping[str, float] | None = None,
    collection: Any = None,
) -> CandidateSampler:
    """A candidate sampler by name (``random``, ``image_sim``, ``text_sim``, ``joint_sim``,
    ``mix``).

    Args:
        num_samples: size of the supporting set.
        k: candidates per anchor.
        support_features: the supporting set's feature store (folder or open store) for the
            similarity samplers.
        mix: blend weights for ``mix`` (default 0.5 random / 0.25 image / 0.25 text).
        collection: the supporting-set collection the store must have been built for.
    """
    if kind not in SAMPLERS:
        raise SamplerError(f"unknown sampler {kind!r}; choose one of: {', '.join(SAMPLERS)}")
    _check_k(k, num_samples)
    if kind == "random":
        return RandomSampler(num_samples, k, seed)
    weights = dict(mix) if mix else dict(DEFAULT_MIX)
    counts = split_counts(k, weights) if kind == "mix" else {kind: k}
    needed = [n for n in SIMILARITIES if counts.get(n)]
    sims = dict(
        zip(needed, _similarity_samplers(needed, k, num_samples, support_features, collection))
    )
    if kind != "mix":
        return sims[kind]
    return MixSampler(num_samples, k, seed, weights, sims)


def _similarity_samplers(
    names: Sequence[str], k: int, num_samples: int, support_features: Any, collection: Any
) -> list[SimilaritySampler]:
    if not names:
        return []
    if not support_features:
        raise SamplerError(
            f"sampler {', '.join(names)} needs support_features (the supporting set's feature "
            "store)"
        )
    from leverlm.encoders.store import FeatureStoreError, open_store
    from leverlm.similarity import JointFeatures

    try:
        store = open_store(support_features, collection, what="support_features")
    except FeatureStoreError as err:
        raise SamplerError(str(err)) from err
    if len(store.image) != num_samples:
        raise SamplerError(
            f"support_features {support_features} has {len(store.image)} rows but the "
            f"supporting set has {num_samples} samples (rows must be aligned with positions)"
        )
    arrays = {"image_sim": store.image, "text_sim": store.text}
    return [
        SimilaritySampler(
            JointFeatures(store.image, store.text) if n == "joint_sim" else arrays[n], k
        )
        for n in names
    ]
