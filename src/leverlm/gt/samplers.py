"""Anchors and candidate sets for ground-truth construction.

Everything here is a pure function of (collection size, features, seed, anchor position):
an anchor's candidate set never depends on the rank, the batch or the order in which
anchors are processed, so a DDP run and a resumed run see the same candidates.

Samplers:

- ``random``: K supporting-set positions drawn uniformly without replacement (the paper's).
- ``image_sim`` / ``text_sim``: the K positions most cosine-similar to the anchor in a
  feature array (any ``(N, D)`` ``.npy`` file aligned with positions, e.g. a feature store's
  ``image.npy`` / ``text.npy``), read memory-mapped in row chunks.
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
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

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


def load_feature_array(path: str | os.PathLike, num_samples: int | None = None) -> np.ndarray:
    """Memory-map an ``(N, D)`` ``.npy`` feature array, checking its shape and row count."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise SamplerError(f"feature file {str(path)!r} does not exist")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise SamplerError(
            f"feature file {str(path)!r} is not a readable .npy array: {err}"
        ) from err
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise SamplerError(f"feature file {str(path)!r} has shape {arr.shape}; expected (N, D)")
    if num_samples is not None and arr.shape[0] != num_samples:
        raise SamplerError(
            f"feature file {str(path)!r} has {arr.shape[0]} rows but the supporting set has "
            f"{num_samples} samples (rows must be aligned with positions)"
        )
    return arr


def feature_file(path: str | os.PathLike, modality: str) -> Path:
    """A ``.npy`` file as given, or a feature-store folder's ``image.npy`` / ``text.npy``."""
    path = Path(path)
    return path / f"{modality}.npy" if path.is_dir() else path


def _normalise(x: np.ndarray) -> np.ndarray:
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.float32(1e-12))


def topk_cosine_reference(features: np.ndarray, anchors: Sequence[int], k: int) -> list[list[int]]:
    """Straightforward top-k cosine neighbours (float64, full matrix): the parity reference.

    Ties are broken by the lower position, like :class:`SimilaritySampler`.
    """
    import numpy as np

    feats = np.asarray(features, dtype=np.float64)
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    out = []
    for a in anchors:
        sims = feats @ feats[a]
        sims[a] = -np.inf
        order = np.lexsort((np.arange(len(sims)), -sims))
        out.append([int(p) for p in order[:k]])
    return out


class SimilaritySampler:
    """The ``k`` positions most cosine-similar to the anchor in a memory-mapped feature array.

    Work is done in fixed-shape blocks (``query_block`` anchors x ``chunk_rows`` rows, the
    query block zero-padded) so an anchor's similarities are computed by the same kernel
    shapes whatever batch it arrives in: candidate sets are identical on 1 or N ranks.
    Ties are broken by the lower position.
    """

    def __init__(
        self,
        features: str | os.PathLike | np.ndarray,
        k: int,
        num_samples: int | None = None,
        chunk_rows: int = 16384,
        query_block: int = 16,
    ) -> None:
        import numpy as np

        self.features = (
            load_feature_array(features, num_samples)
            if isinstance(features, (str, os.PathLike))
            else np.asarray(features)
        )
        self.num_samples = int(self.features.shape[0])
        _check_k(k, self.num_samples)
        self.k, self.chunk_rows, self.query_block = k, int(chunk_rows), int(query_block)

    def _block(self, anchors: Sequence[int], k: int) -> list[list[int]]:
        import numpy as np

        n_valid = len(anchors)
        queries = np.zeros((self.query_block, self.features.shape[1]), dtype=np.float32)
        queries[:n_valid] = _normalise(self.features[list(anchors)])
        best_sims = np.full((self.query_block, 0), -np.inf, dtype=np.float32)
        best_pos = np.zeros((self.query_block, 0), dtype=np.int64)
        anchor_arr = np.full(self.query_block, -1, dtype=np.int64)
        anchor_arr[:n_valid] = anchors
        for start in range(0, self.num_samples, self.chunk_rows):
            rows = _normalise(self.features[start : start + self.chunk_rows])
            if rows.shape[0] < self.chunk_rows:  # pad the last chunk: same gemm shape always
                pad = np.zeros((self.chunk_rows - rows.shape[0], rows.shape[1]), np.float32)
                n_rows, rows = rows.shape[0], np.concatenate([rows, pad])
            else:
                n_rows = rows.shape[0]
            sims = (queries @ rows.T)[:, :n_rows]
            pos = np.arange(start, start + n_rows, dtype=np.int64)
            # The anchor is never its own candidate.
            sims[pos[None, :] == anchor_arr[:, None]] = -np.inf
            sims = np.concatenate([best_sims, sims], axis=1)
            cand = np.concatenate([best_pos, np.broadcast_to(pos, (self.query_block, n_rows))], 1)
            keep = min(k, sims.shape[1])
            # Exact top-k with ties to the lower position: a partition finds each row's k-th
            # largest value, then only the rows' entries >= it are lexsorted on (-sim, position).
            kth = np.partition(sims, sims.shape[1] - keep, axis=1)[:, sims.shape[1] - keep]
            order = np.tile(np.arange(keep), (len(sims), 1))  # padding rows: anything
            for i in range(n_valid):
                idx = np.flatnonzero(sims[i] >= kth[i])
                order[i] = idx[np.lexsort((cand[i, idx], -sims[i, idx]))[:keep]]
            best_sims = np.take_along_axis(sims, order, axis=1)
            best_pos = np.take_along_axis(cand, order, axis=1)
        return [[int(p) for p in best_pos[i]] for i in range(n_valid)]

    def sample(self, anchors: Sequence[int], k: int | None = None) -> list[list[int]]:
        k = self.k if k is None else k
        for a in anchors:
            _check_anchor(a, self.num_samples)
        out: list[list[int]] = []
        for i in range(0, len(anchors), self.query_block):
            out += self._block(anchors[i : i + self.query_block], k)
        return out


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
        image: SimilaritySampler | None = None,
        text: SimilaritySampler | None = None,
        joint: SimilaritySampler | None = None,
    ) -> None:
        _check_k(k, num_samples)
        self.counts = split_counts(k, weights)
        needs = {"image_sim": "an image_features", "text_sim": "a text_features",
                 "joint_sim": "both image_features and text_features"}  # fmt: skip
        for name, sim in (("image_sim", image), ("text_sim", text), ("joint_sim", joint)):
            if self.counts.get(name, 0) and sim is None:
                raise SamplerError(f"mix uses {name} but {needs[name]} file was not given")
        self.num_samples, self.k, self.seed = num_samples, k, seed
        self.random = RandomSampler(num_samples, k, seed)
        self.image, self.text, self.joint = image, text, joint

    def sample(self, anchors: Sequence[int]) -> list[list[int]]:
        parts: dict[str, list[list[int]]] = {}
        sims = (("image_sim", self.image), ("text_sim", self.text), ("joint_sim", self.joint))
        for name, sim in sims:
            if self.counts.get(name, 0):
                assert sim is not None
                parts[name] = sim.sample(anchors, self.counts[name])
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
    image_features: str | None = None,
    text_features: str | None = None,
    mix: Mapping[str, float] | None = None,
) -> CandidateSampler:
    """A candidate sampler by name (``random``, ``image_sim``, ``text_sim``, ``joint_sim``,
    ``mix``).

    Args:
        num_samples: size of the supporting set (feature files must have this many rows).
        k: candidates per anchor.
        image_features / text_features: ``(N, D)`` ``.npy`` files for the similarity samplers
            (or a feature-store folder, whose ``image.npy`` / ``text.npy`` is then used).
        mix: blend weights for ``mix`` (default 0.5 random / 0.25 image / 0.25 text).
    """
    if kind not in SAMPLERS:
        raise SamplerError(f"unknown sampler {kind!r}; choose one of: {', '.join(SAMPLERS)}")
    _check_k(k, num_samples)
    if kind == "random":
        return RandomSampler(num_samples, k, seed)

    def sim(name: str, path: str | None) -> SimilaritySampler:
        if not path:
            raise SamplerError(f"sampler {kind!r} needs {name} (a .npy feature array)")
        return SimilaritySampler(feature_file(path, name.split("_")[0]), k, num_samples=num_samples)

    def joint() -> SimilaritySampler:
        for name, path in (("image_features", image_features), ("text_features", text_features)):
            if not path:
                raise SamplerError(f"sampler 'joint_sim' needs {name} (a .npy feature array)")
        return SimilaritySampler(
            joint_features(
                load_feature_array(feature_file(image_features, "image"), num_samples),
                load_feature_array(feature_file(text_features, "text"), num_samples),
            ),
            k,
            num_samples=num_samples,
        )

    if kind == "image_sim":
        return sim("image_features", image_features)
    if kind == "text_sim":
        return sim("text_features", text_features)
    if kind == "joint_sim":
        return joint()
    weights = dict(mix) if mix else dict(DEFAULT_MIX)
    counts = split_counts(k, weights)
    image = sim("image_features", image_features) if counts.get("image_sim") else None
    text = sim("text_features", text_features) if counts.get("text_sim") else None
    both = joint() if counts.get("joint_sim") else None
    return MixSampler(num_samples, k, seed, weights, image=image, text=text, joint=both)


def joint_features(image: np.ndarray, text: np.ndarray, block: int = 65536) -> np.ndarray:
    """``[image / |image|, text / |text|]`` per row, float32: its cosine between two rows is the
    mean of their image and text cosines."""
    import numpy as np

    if image.shape[0] != text.shape[0]:
        raise SamplerError(
            f"image and text features have {image.shape[0]} and {text.shape[0]} rows"
        )
    out = np.empty((image.shape[0], image.shape[1] + text.shape[1]), dtype=np.float32)
    for start in range(0, image.shape[0], block):
        end = start + block
        out[start:end, : image.shape[1]] = _normalise(image[start:end])
        out[start:end, image.shape[1] :] = _normalise(text[start:end])
    return out
