"""Exact cosine top-k: chunked and blocked == the plain reference == a brute-force argsort."""

from __future__ import annotations

import numpy as np
import pytest

from leverlm.similarity import (
    JointFeatures,
    SimilarityError,
    cosine_topk,
    cosine_topk_reference,
)

N, Q, D = 300, 40, 16


@pytest.fixture(scope="module")
def feats() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "support_image": rng.standard_normal((N, D)).astype(np.float16),
        "support_text": rng.standard_normal((N, D)).astype(np.float32),
        "query_image": rng.standard_normal((Q, D)).astype(np.float32),
        "query_text": rng.standard_normal((Q, D)).astype(np.float16),
    }


def brute_force_ranking(query: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Positions by descending cosine similarity: a full argsort per query (float64)."""
    q = query.astype(np.float64)
    s = support.astype(np.float64)
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        s / np.linalg.norm(s, axis=1, keepdims=True)
    ).T
    return np.argsort(-sims, axis=1, kind="stable")


@pytest.mark.parametrize("chunk_size", [1, 7, 64, N, 10 * N])
def test_cosine_topk_chunked_equals_brute_force(feats, chunk_size: int) -> None:
    rng = np.random.default_rng(1)
    exclude = [sorted(rng.choice(N, size=int(rng.integers(0, 5)), replace=False)) for _ in range(Q)]
    k = 12
    pos, scores = cosine_topk(
        feats["query_image"], feats["support_image"], k, exclude, chunk_rows=chunk_size
    )
    ref_pos, ref_scores = cosine_topk_reference(
        feats["query_image"], feats["support_image"], k, exclude
    )
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    ranking = brute_force_ranking(feats["query_image"], feats["support_image"])
    for row in range(Q):
        expected = [p for p in ranking[row] if p not in set(exclude[row])][:k]
        assert pos[row].tolist() == expected
    assert (np.diff(scores, axis=1) <= 0).all()  # most similar first


def test_cosine_topk_whole_set_and_zero(feats) -> None:
    pos, _ = cosine_topk(feats["query_image"][:3], feats["support_image"], N, chunk_rows=50)
    assert all(sorted(row) == list(range(N)) for row in pos.tolist())
    pos0, _ = cosine_topk(feats["query_image"], feats["support_image"], 0)
    assert pos0.shape == (Q, 0)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 1000])
def test_cosine_topk_ties_go_to_lowest_position(chunk_size: int) -> None:
    # Entries of +-0.5 in 4 dims: unit vectors whose cosines are exact in float32, so the many
    # duplicated rows tie exactly whatever the summation order.
    rng = np.random.default_rng(2)
    patterns = rng.choice([-0.5, 0.5], size=(5, 4)).astype(np.float32)
    support = patterns[rng.integers(0, 5, size=60)]
    query = patterns[rng.integers(0, 5, size=10)]
    k = 20
    pos, scores = cosine_topk(query, support, k, chunk_rows=chunk_size)
    ref_pos, _ = cosine_topk_reference(query, support, k)
    np.testing.assert_array_equal(pos, ref_pos)
    for row in range(len(query)):
        for a, b, sa, sb in zip(pos[row], pos[row][1:], scores[row], scores[row][1:]):
            assert sa > sb or (sa == sb and a < b)


def test_cosine_topk_rejects_bad_features(feats) -> None:
    bad = feats["support_image"].astype(np.float32).copy()
    bad[123, 2] = np.nan
    with pytest.raises(SimilarityError, match="row 123"):
        cosine_topk(feats["query_image"], bad, 3, chunk_rows=50)
    with pytest.raises(SimilarityError, match=r"\(40, 16\).*\(300, 8\)"):
        cosine_topk(feats["query_image"], feats["support_image"][:, :8], 3)


@pytest.mark.parametrize("query_block", [1, 3, 16])
def test_a_query_gets_the_same_neighbours_in_any_batch(feats, query_block: int) -> None:
    support, query = feats["support_image"], feats["query_image"]
    whole, _ = cosine_topk(query, support, 9, chunk_rows=64, query_block=query_block)
    for row in (0, 7, 39):
        alone, _ = cosine_topk(query[row : row + 1], support, 9, chunk_rows=64)
        assert alone.tolist() == whole[row : row + 1].tolist()
    shuffled, _ = cosine_topk(query[::-1], support, 9, chunk_rows=64, query_block=query_block)
    assert shuffled.tolist() == whole[::-1].tolist()


def test_joint_features_score_the_mean_of_the_cosines(feats) -> None:
    support = JointFeatures(feats["support_image"], feats["support_text"])
    query = JointFeatures(feats["query_image"], feats["query_text"])
    assert support.shape == (N, 2 * D) and len(support) == N
    pos, scores = cosine_topk(query[:], support, 10, chunk_rows=70)
    ref_pos, _ = cosine_topk_reference(query, support, 10)
    np.testing.assert_array_equal(pos, ref_pos)

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    mean = (
        unit(feats["query_image"]) @ unit(feats["support_image"]).T
        + unit(feats["query_text"]) @ unit(feats["support_text"]).T
    ) / 2
    np.testing.assert_allclose(scores, np.take_along_axis(mean, pos, axis=1), atol=1e-5)
    with pytest.raises(SimilarityError, match="row-aligned"):
        JointFeatures(feats["support_image"], feats["query_text"])


def test_the_device_path_equals_the_reference(feats) -> None:
    # Any device but "cpu" multiplies the blocks with torch there; "cpu:0" takes that path here.
    exclude = [[i % N, (7 * i) % N] for i in range(Q)]
    pos, scores = cosine_topk(
        feats["query_text"], feats["support_image"], 9, exclude, chunk_rows=64, device="cpu:0"
    )
    ref_pos, ref_scores = cosine_topk_reference(
        feats["query_text"], feats["support_image"], 9, exclude
    )
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
