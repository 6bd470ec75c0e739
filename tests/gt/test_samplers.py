"""Anchors and candidate samplers: seeded, anchor-independent, never the anchor itself."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.features import write_store

from leverlm.gt.samplers import (
    MixSampler,
    RandomSampler,
    SamplerError,
    SimilaritySampler,
    build_sampler,
    select_anchors,
    split_counts,
)
from leverlm.similarity import cosine_topk_reference


def topk_cosine_reference(features: np.ndarray, anchors: list[int], k: int) -> list[list[int]]:
    """The anchors' top-k neighbours by the plain reference, the anchor itself excluded."""
    positions, _ = cosine_topk_reference(features[anchors], features, k, [[a] for a in anchors])
    return positions.tolist()


def test_select_anchors_seeded_sorted_and_distinct():
    a = select_anchors(100, 10, seed=0)
    assert a == sorted(set(a)) and len(a) == 10 and all(0 <= p < 100 for p in a)
    assert select_anchors(100, 10, seed=0) == a
    assert select_anchors(100, 10, seed=1) != a
    assert select_anchors(7, None, seed=3) == list(range(7))
    assert select_anchors(7, -1, seed=3) == list(range(7))


@pytest.mark.parametrize("n", [0, 11, -2])
def test_select_anchors_refuses_bad_counts(n):
    with pytest.raises(SamplerError, match="num_anchors|empty"):
        select_anchors(10 if n else 0, n or 1, seed=0)


def test_random_sampler_excludes_anchor_and_is_per_anchor():
    s = RandomSampler(30, 29, seed=5)
    for a in range(30):
        c = s.sample([a])[0]
        assert a not in c and len(set(c)) == 29 and set(c) == set(range(30)) - {a}
    small = RandomSampler(50, 8, seed=5)
    batch = small.sample([3, 17, 40])
    # Same anchor -> same set, whatever else is in the batch.
    assert small.sample([17]) == [batch[1]]
    assert RandomSampler(50, 8, seed=6).sample([17]) != [batch[1]]
    with pytest.raises(SamplerError, match="num_candidates=30"):
        RandomSampler(30, 30, seed=0)


def _features(n: int = 40, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float16)


def test_similarity_matches_reference_and_is_batch_invariant():
    feats = _features()
    # Small blocks/chunks so padding, several chunks and several query blocks are exercised.
    s = SimilaritySampler(feats, k=6, chunk_rows=7, query_block=3)
    anchors = [0, 5, 9, 13, 21, 39, 38]
    got = s.sample(anchors)
    assert got == topk_cosine_reference(feats, anchors, 6)
    for a, c in zip(anchors, got):
        assert a not in c
        assert s.sample([a]) == [c]


def test_similarity_ties_go_to_lower_position():
    feats = np.zeros((10, 4), np.float32)
    feats[:, 0] = 1.0  # every row identical: all similarities tie
    s = SimilaritySampler(feats, k=3, chunk_rows=4, query_block=2)
    assert s.sample([0, 2]) == [[1, 2, 3], [0, 1, 3]]
    assert topk_cosine_reference(feats, [0, 2], 3) == [[1, 2, 3], [0, 1, 3]]


def test_similarity_refuses_misaligned_features(tmp_path):
    store = write_store(tmp_path / "store", _features(12), _features(12))
    with pytest.raises(SamplerError, match="12 rows"):
        build_sampler("text_sim", 40, 3, 0, support_features=str(store))
    with pytest.raises(SamplerError, match="does not exist"):
        build_sampler("text_sim", 40, 3, 0, support_features=str(tmp_path / "nope"))


def test_split_counts():
    assert split_counts(64, {"random": 0.5, "image_sim": 0.25, "text_sim": 0.25}) == {
        "random": 32,
        "image_sim": 16,
        "text_sim": 16,
    }
    c = split_counts(7, {"random": 1, "image_sim": 1, "text_sim": 1})
    assert sum(c.values()) == 7 and max(c.values()) - min(c.values()) <= 1
    with pytest.raises(SamplerError, match="bogus"):
        split_counts(4, {"bogus": 1.0})


def test_mix_deduplicates_and_tops_up(tmp_path):
    feats = _features(40)
    # same features: image and text picks coincide
    store = write_store(tmp_path / "store", feats, feats)
    s = build_sampler("mix", 40, 12, seed=1, support_features=str(store))
    assert isinstance(s, MixSampler)
    for a, c in zip([0, 7, 33], s.sample([0, 7, 33])):
        assert len(c) == 12 and len(set(c)) == 12 and a not in c
        # The image share (3 nearest) is in the set.
        assert set(topk_cosine_reference(feats, [a], 3)[0]) <= set(c)
    assert s.sample([7]) == s.sample([0, 7])[1:]


def test_build_sampler_errors_name_the_setting():
    with pytest.raises(SamplerError, match="image_sim needs support_features"):
        build_sampler("image_sim", 10, 3, 0)
    with pytest.raises(SamplerError, match="unknown sampler 'nearest'"):
        build_sampler("nearest", 10, 3, 0)


def test_feature_store_folder_is_read_and_checked(tmp_path):
    from helpers.lever_world import write_vqa_collection

    feats = _features(40)
    store = write_store(tmp_path / "store", feats, feats[::-1].copy())
    by_folder = build_sampler("text_sim", 40, 5, 0, support_features=str(store))
    assert by_folder.sample([3]) == topk_cosine_reference(feats[::-1], [3], 5)
    assert build_sampler("image_sim", 40, 5, 0, str(store)).sample([3]) == (
        topk_cosine_reference(feats, [3], 5)
    )
    with pytest.raises(SamplerError, match="not a feature store folder"):
        build_sampler("text_sim", 40, 5, 0, support_features=str(store / "text.npy"))
    # the store must have been built for the collection (by its manifest sha256)
    coll = write_vqa_collection(tmp_path / "coll", 40)
    with pytest.raises(SamplerError, match="support_features: feature store .* was built for"):
        build_sampler("text_sim", 40, 5, 0, support_features=str(store), collection=coll)
    built_for = write_store(tmp_path / "for-coll", feats, feats, collection=coll)
    assert build_sampler("text_sim", 40, 5, 0, str(built_for), collection=coll).sample([3])


def _joint_reference(image: np.ndarray, text: np.ndarray, anchor: int, k: int) -> list[int]:
    """Top-k by the mean of image and text cosines, ties to the lower position, no anchor."""

    def cos(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return x @ x[anchor]

    score = (cos(image) + cos(text)) / 2
    order = sorted((p for p in range(len(image)) if p != anchor), key=lambda p: (-score[p], p))
    return order[:k]


def test_joint_similarity_is_the_mean_of_image_and_text_cosines(tmp_path):
    rng = np.random.default_rng(5)
    image = rng.standard_normal((50, 6)).astype(np.float32) * rng.uniform(0.5, 3, (50, 1))
    text = rng.standard_normal((50, 6)).astype(np.float32)
    text[10:20] = text[3]  # many equal texts (templated questions): the image decides
    # the values a store holds (fp16)
    image, text = (x.astype(np.float16).astype(np.float32) for x in (image, text))
    store = str(write_store(tmp_path / "store", image, text))
    s = build_sampler("joint_sim", 50, 7, 0, support_features=store)
    anchors = [3, 12, 49]
    got = s.sample(anchors)
    assert got == [_joint_reference(image, text, a, 7) for a in anchors]
    assert s.sample([12]) == got[1:2]  # batch-invariant
    # the text-only ranking differs: the image breaks the text ties
    assert got[1] != build_sampler("text_sim", 50, 7, 0, support_features=store).sample([12])[0]
    m = build_sampler(
        "mix", 50, 8, 1, support_features=store, mix={"random": 0.5, "joint_sim": 0.5}
    )
    for a, c in zip(anchors, m.sample(anchors), strict=True):
        assert len(set(c)) == 8 and a not in c
        assert set(_joint_reference(image, text, a, 4)) <= set(c)
    with pytest.raises(SamplerError, match="joint_sim needs support_features"):
        build_sampler("joint_sim", 50, 7, 0)
    with pytest.raises(SamplerError, match="joint_sim"):
        build_sampler("mix", 50, 8, 1, mix={"joint_sim": 1.0})
