"""ICD retrievers: similarity top-k (chunked vs brute force), ordering, seeding, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from leverlm.icl.retrievers import (
    RETRIEVERS,
    FixedRetriever,
    RandomRetriever,
    Retriever,
    RetrieverError,
    ShuffledRetriever,
    SimilarityRetriever,
    available_retrievers,
    build_retriever,
    register_retriever,
    stable_seed,
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


def queries(n: int = Q, **extra) -> list[dict]:
    return [{"__key__": f"q-{i:04d}", "position": i, **extra} for i in range(n)]


def brute_force_ranking(query: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Positions by descending cosine similarity: a full argsort per query (float64)."""
    q = query.astype(np.float64)
    s = support.astype(np.float64)
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        s / np.linalg.norm(s, axis=1, keepdims=True)
    ).T
    return np.argsort(-sims, axis=1, kind="stable")


# ------------------------------------------------------------------ similarity retrievers


def test_siir_order_convention(feats) -> None:
    ranking = brute_force_ranking(feats["query_image"], feats["support_image"])
    last = build_retriever("siir", **feats)
    first = build_retriever("siir", **feats, most_similar="first")
    got_last, got_first = last.retrieve(queries(), 4), first.retrieve(queries(), 4)
    for row in range(Q):
        # prompt order: index 0 farthest; by default the most similar sits next to the query
        assert got_last[row] == ranking[row][:4][::-1].tolist()
        assert got_first[row] == ranking[row][:4].tolist()
        assert got_last[row][-1] == ranking[row][0]


def test_sitr_and_sttr_use_the_right_features(feats) -> None:
    sitr = build_retriever("sitr", **feats, most_similar="first").retrieve(queries(), 5)
    expect = brute_force_ranking(feats["query_image"], feats["support_text"])[:, :5]
    assert sitr == expect.tolist()
    sttr = build_retriever("sttr", **feats, most_similar="first")
    assert not sttr.fallback
    expect = brute_force_ranking(feats["query_text"], feats["support_text"])[:, :5]
    assert sttr.retrieve(queries(), 5) == expect.tolist()
    # captioning queries have no text: STTR compares the query image with ICD texts (= SITR)
    caption_sttr = build_retriever("sttr", **{**feats, "query_text": None}, most_similar="first")
    assert caption_sttr.fallback
    assert caption_sttr.retrieve(queries(), 5) == sitr


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_joint_sim_is_the_mean_of_image_and_text_cosines(feats) -> None:
    def brute_force(query_text: str, shots: int) -> list[list[int]]:
        out = []
        for row in range(Q):
            score = [
                (
                    _cosine(feats["query_image"][row], feats["support_image"][p])
                    + _cosine(feats[query_text][row], feats["support_text"][p])
                )
                / 2
                for p in range(N)
            ]
            out.append(sorted(range(N), key=lambda p: (-score[p], p))[:shots])
        return out

    joint = build_retriever("joint_sim", **feats, most_similar="first")
    assert "joint_sim" in available_retrievers() and not joint.fallback
    assert joint.retrieve(queries(), 6) == brute_force("query_text", 6)
    # captioning queries have no text: the query side is the image alone
    caption = build_retriever("joint_sim", **{**feats, "query_text": None}, most_similar="first")
    assert caption.fallback
    assert caption.retrieve(queries(), 6) == brute_force("query_image", 6)


def test_similarity_batch_independent_and_cached_prefix(feats) -> None:
    qs = queries()
    whole = build_retriever("siir", **feats).retrieve(qs, 6)
    single = build_retriever("siir", **feats, query_chunk_size=1)
    assert [single.retrieve([q], 6)[0] for q in qs] == whole
    shuffled = list(reversed(qs))
    assert build_retriever("siir", **feats).retrieve(shuffled, 6) == whole[::-1]
    # prepare() for 8 shots, then fewer shots come from the cache and equal a fresh run
    cached = build_retriever("siir", **feats)
    cached.prepare(qs, 8)
    fresh = build_retriever("siir", **feats, cache=False)
    for shots in (1, 3, 6, 8):
        assert cached.retrieve(qs, shots) == fresh.retrieve(qs, shots)


def test_similarity_excludes(feats) -> None:
    retriever = build_retriever("siir", **feats, most_similar="first")
    plain = retriever.retrieve(queries(), 3)
    excluded = [
        {"__key__": f"q-{i:04d}", "position": i, "exclude_positions": plain[i][:2]}
        for i in range(Q)
    ]
    got = retriever.retrieve(excluded, 3)
    for row in range(Q):
        assert not set(got[row]) & set(plain[row][:2])
        assert got[row][0] == plain[row][2]
    # queries that are the supporting set itself never get themselves
    same = SimilarityRetriever(
        feats["support_image"], feats["support_image"], exclude_query_position=True
    )
    out = same.retrieve(queries(N), 4)
    assert all(i not in icds and len(set(icds)) == 4 for i, icds in enumerate(out))
    unexcluded = SimilarityRetriever(feats["support_image"], feats["support_image"])
    assert all(icds[-1] == i for i, icds in enumerate(unexcluded.retrieve(queries(N), 4)))


def test_similarity_memmap_fp16(tmp_path, feats) -> None:
    path = tmp_path / "support.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(N, D))
    mm[:] = feats["support_image"]
    mm.flush()
    ro = np.memmap(path, dtype=np.float16, mode="r", shape=(N, D))
    mapped = build_retriever(
        "siir", support_image=ro, query_image=feats["query_image"], chunk_size=64
    )
    assert mapped.num_candidates == N
    assert mapped.retrieve(queries(), 5) == build_retriever("siir", **feats).retrieve(queries(), 5)


def test_similarity_bad_input_names_value(feats) -> None:
    retriever = build_retriever("siir", **feats)
    with pytest.raises(RetrieverError, match="shots=-1"):
        retriever.retrieve(queries(2), -1)
    with pytest.raises(RetrieverError, match=f"shots={N + 1}.*N={N}"):
        retriever.retrieve(queries(2), N + 1)
    with pytest.raises(RetrieverError, match=f"shots={N}.*{N - 1} ICDs"):
        retriever.retrieve([{"__key__": "a", "position": 0, "exclude_positions": [5]}], N)
    with pytest.raises(RetrieverError, match=r"\(300, 16\).*\(40, 8\)"):
        build_retriever(
            "siir", support_image=feats["support_image"], query_image=feats["query_image"][:, :8]
        )
    with pytest.raises(RetrieverError, match="position 40"):
        retriever.retrieve([{"__key__": "x", "position": Q}], 2)
    with pytest.raises(RetrieverError, match="no 'position'"):
        retriever.retrieve([{"__key__": "x"}], 2)
    with pytest.raises(RetrieverError, match="most_similar"):
        build_retriever("siir", **feats, most_similar="middle")
    with pytest.raises(RetrieverError, match="support_text is required"):
        build_retriever("sitr", query_image=feats["query_image"])
    with pytest.raises(RetrieverError, match="dtype int64"):
        build_retriever(
            "siir", support_image=np.zeros((3, 2), np.int64), query_image=np.zeros((1, 2))
        )


# ---------------------------------------------------------------------------- random


def test_random_per_query_determinism_and_no_duplicates() -> None:
    qs = queries(60)
    rs = build_retriever("random", num_candidates=50, seed=3)
    whole = rs.retrieve(qs, 8)
    assert [
        build_retriever("random", num_candidates=50, seed=3).retrieve([q], 8)[0] for q in qs
    ] == whole
    mixed = qs[30:] + qs[:30]
    assert rs.retrieve(mixed, 8) == whole[30:] + whole[:30]
    assert all(len(set(icds)) == 8 and all(0 <= p < 50 for p in icds) for icds in whole)
    assert len({tuple(icds) for icds in whole}) > 50  # different queries, different ICDs
    assert build_retriever("random", num_candidates=50, seed=4).retrieve(qs, 8) != whole
    full = rs.retrieve(qs[:3], 50)  # every position once
    assert all(sorted(icds) == list(range(50)) for icds in full)


@pytest.mark.parametrize("num_candidates", [40, 200_000])  # permutation / rejection paths
def test_random_fewer_shots_are_a_prefix(num_candidates: int) -> None:
    rs = RandomRetriever(num_candidates, seed=1)
    qs = queries(20)
    longest = rs.retrieve(qs, 8)
    for shots in range(9):
        assert rs.retrieve(qs, shots) == [icds[:shots] for icds in longest]


def test_random_excludes() -> None:
    rs = RandomRetriever(10, seed=0, exclude_query_position=True)
    qs = [
        {"__key__": f"k{i}", "position": i, "exclude_positions": [(i + 1) % 10]} for i in range(10)
    ]
    out = rs.retrieve(qs, 8)
    for i, icds in enumerate(out):
        assert i not in icds and (i + 1) % 10 not in icds and len(set(icds)) == 8
    with pytest.raises(RetrieverError, match="shots=9.*8 ICDs"):
        rs.retrieve(qs[:1], 9)
    with pytest.raises(RetrieverError, match="'__key__'"):
        rs.retrieve([{"position": 0}], 1)


def test_stable_seed_is_process_independent() -> None:
    code = "from leverlm.icl.retrievers import stable_seed; print(stable_seed(7, 'random', 'q-1'))"
    outs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(int(res.stdout))
    assert outs == {stable_seed(7, "random", "q-1")}
    assert stable_seed(7, "random", "q-1") != stable_seed(8, "random", "q-1")


# --------------------------------------------------------------- zero-shot, fixed, shuffled


def test_zero_shot() -> None:
    zs = build_retriever("zero_shot")
    assert zs.retrieve(queries(3), 0) == [[], [], []]
    with pytest.raises(RetrieverError, match="shots=2"):
        zs.retrieve(queries(3), 2)


def test_fixed_truncates_and_extends() -> None:
    fixed = build_retriever("fixed", sequence=[7, 3, 9], num_candidates=20, seed=5)
    assert fixed.retrieve(queries(2), 3) == [[7, 3, 9]] * 2
    assert fixed.retrieve(queries(2), 2) == [[3, 9]] * 2  # keeps those next to the query
    assert fixed.retrieve(queries(1), 0) == [[]]
    eight = fixed.retrieve(queries(2), 8)
    assert eight[0] == eight[1] and eight[0][-3:] == [7, 3, 9] and len(set(eight[0])) == 8
    six = fixed.retrieve(queries(1), 6)[0]
    assert eight[0][-6:] == six  # more shots push further ICDs in front
    with pytest.raises(RetrieverError, match="shots=4 > len"):
        FixedRetriever([1, 2, 3]).retrieve(queries(1), 4)
    with pytest.raises(RetrieverError, match="repeated"):
        FixedRetriever([1, 1])
    with pytest.raises(RetrieverError, match=r"excludes positions \[9\]"):
        fixed.retrieve([{"__key__": "a", "position": 0, "exclude_positions": [9]}], 3)


def test_random_fixed_is_one_seeded_set_for_every_query() -> None:
    fixed = build_retriever("random_fixed", num_candidates=50, seed=3)
    eight = fixed.retrieve(queries(3), 8)
    assert eight[0] == eight[1] == eight[2] and len(set(eight[0])) == 8
    four = fixed.retrieve(queries(1), 4)[0]
    assert eight[0][-4:] == four  # the 8-shot set contains the 4-shot set
    assert build_retriever("random_fixed", num_candidates=50, seed=3).retrieve(queries(1), 8) == [
        eight[0]
    ]
    other = build_retriever("random_fixed", num_candidates=50, seed=4).retrieve(queries(1), 8)
    assert other[0] != eight[0]
    with pytest.raises(RetrieverError, match="sequence is empty and no num_candidates"):
        FixedRetriever([])


def test_shuffled_wrapper(feats) -> None:
    inner = build_retriever("siir", **feats)
    shuf = ShuffledRetriever(inner, seed=11)
    qs = queries()
    base, got = inner.retrieve(qs, 6), shuf.retrieve(qs, 6)
    assert all(sorted(a) == sorted(b) for a, b in zip(base, got))
    assert sum(a != b for a, b in zip(base, got)) > Q // 2
    assert [ShuffledRetriever(inner, seed=11).retrieve([q], 6)[0] for q in reversed(qs)] == got[
        ::-1
    ]
    assert ShuffledRetriever(inner, seed=12).retrieve(qs, 6) != got
    assert shuf.name == "siir_shuffled"
    assert build_retriever("shuffled", inner=inner, seed=11).retrieve(qs, 6) == got


# ----------------------------------------------------------------------------- registry


def test_registry_decorator_and_factory() -> None:
    assert {"zero_shot", "random", "siir", "sttr", "sitr", "fixed", "shuffled"} <= set(
        available_retrievers()
    )

    @register_retriever("test_constant")
    class Constant(Retriever):
        name = "test_constant"

        def __init__(self, position: int):
            super().__init__(None)
            self.position = position

        def retrieve(self, queries, shots):
            return [[self.position] * shots for _ in queries]

    try:
        assert build_retriever("test_constant", position=4).retrieve(queries(2), 1) == [[4], [4]]
        with pytest.raises(RetrieverError, match="already registered"):
            register_retriever("test_constant")(lambda: None)
        with pytest.raises(RetrieverError, match="'test_constant': bad arguments"):
            build_retriever("test_constant", pos=4)
    finally:
        RETRIEVERS.pop("test_constant")
    with pytest.raises(RetrieverError, match="unknown retriever 'lever_lm_x'"):
        build_retriever("lever_lm_x")
