"""The eval side's retrievers (Lever-LM, shuffled, from file, fixed-from-gt) and method planning."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.eval_world import (
    NUM_SUPPORT,
    feature_store,
    gt_dataset,
    lever_checkpoint,
    vqa_collection,
)
from helpers.lever_world import clip_checkpoint

from leverlm.icl.job import (
    EvalConfigError,
    EvalError,
    accepted_args,
    build_retrievers,
    check_methods_and_shots,
    check_retrieved,
    eval_units,
    resolve_methods,
    select_queries,
)
from leverlm.icl.lever_retriever import (
    FileRetriever,
    LeverLMRetriever,
    best_gt_sequence,
    lever_lm_shuffled,
    read_sequences,
)
from leverlm.icl.retrievers import (
    RETRIEVERS,
    RetrieverError,
    ShuffledRetriever,
    available_retrievers,
    build_retriever,
)

NUM_Q = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_retrievers")
    support = vqa_collection(root / "support", NUM_SUPPORT, "train")
    queries = vqa_collection(root / "queries", NUM_Q, "val", offset=500)
    s_store = feature_store(root / "fs", support, seed=1)
    q_store = feature_store(root / "fq", queries, seed=2)
    ckpt = lever_checkpoint(root / "lever.ckpt", s_store)
    return SimpleNamespace(
        root=root, support=support, queries=queries, s_store=s_store, q_store=q_store, ckpt=ckpt
    )


def _queries(n: int = NUM_Q, **extra) -> list[dict]:
    return [{"__key__": f"val-{i:06d}", "position": i, **extra} for i in range(n)]


def _lever(world):
    from leverlm.lever.select import LeverLM

    return LeverLM.from_checkpoint(world.ckpt, support_features=world.s_store)


# ------------------------------------------------------------------------------- lever_lm


def test_registered_names() -> None:
    for name in ("lever_lm", "lever_lm_shuffled", "from_file", "oracle"):
        assert name in available_retrievers()


def test_greedy_prefix_cache_equals_direct_select_per_shot_count(world) -> None:
    """prepare() decodes once at the most shots; every fewer-shot answer must equal decoding
    that many shots directly (the prefix property the cache relies on)."""
    r = LeverLMRetriever(world.ckpt, query_features=world.q_store, num_candidates=NUM_SUPPORT)
    qs = _queries()
    r.prepare(qs, 6)
    calls = []
    original = r.lever.select
    r.lever.select = lambda *a, **k: calls.append(k["shots"]) or original(*a, **k)
    direct = _lever(world)
    positions = [q["position"] for q in qs]
    for shots in (1, 2, 4, 6):
        got = r.retrieve(qs, shots)
        want = direct.select(positions, shots, query_features=world.q_store)
        assert got == want
        assert all(len(set(s)) == shots for s in got)
    assert calls == []  # answered from the prepared decoding
    assert r.retrieve(qs, 7) == direct.select(positions, 7, query_features=world.q_store)
    assert calls == [7]


def test_beam_search_decodes_each_shot_count(world) -> None:
    r = LeverLMRetriever(
        world.ckpt, query_features=world.q_store, beam_size=3, num_candidates=NUM_SUPPORT
    )
    qs = _queries(5)
    r.prepare(qs, 4)
    direct = _lever(world)
    for shots in (2, 4):
        want = direct.select(list(range(5)), shots, beam_size=3, query_features=world.q_store)
        assert r.retrieve(qs, shots) == want


def test_exclusions_are_honoured_per_query(world) -> None:
    r = LeverLMRetriever(world.ckpt, query_features=world.q_store)
    free = r.retrieve(_queries(4), 3)
    banned = [{**q, "exclude_positions": free[i][:2]} for i, q in enumerate(_queries(4))]
    got = r.retrieve(banned, 3)
    for seq, ban in zip(got, free, strict=True):
        assert not set(seq) & set(ban[:2])
    # the same query without exclusions still gets its own (cached) answer
    assert r.retrieve(_queries(4), 3) == free


def test_fine_tuned_clip_checkpoint_encodes_the_queries_it_is_asked_for(world, tmp_path) -> None:
    """A clip_trainable checkpoint without query features: each query is encoded once with the
    checkpoint's CLIP; the answers equal encoding the queries directly and selecting."""
    from leverlm.lever.select import LeverLM, encode_collection

    ckpt = clip_checkpoint(tmp_path / "clip.ckpt", NUM_SUPPORT, world.support)
    r = LeverLMRetriever(str(ckpt), queries=str(world.queries))
    encoded = []
    import leverlm.lever.select as gen

    real = gen.encode_collection
    gen.encode_collection = lambda *a, **k: encoded.append(k["positions"]) or real(*a, **k)
    try:
        r.prepare(_queries(6)[::2], 3)
        got = r.retrieve(_queries(6), 3)
    finally:
        gen.encode_collection = real
    assert encoded == [[0, 2, 4], [1, 3, 5]]  # the second call encodes only the new ones
    lm = LeverLM.from_checkpoint(ckpt)
    feats = encode_collection(
        lm.clip, "leverlm-tiny-clip", world.queries, "vqa", ("image", "text"), positions=range(6)
    )
    assert got == lm.select(feats, 3)


def test_eval_gives_a_fine_tuned_clip_lever_lm_its_own_features(world, tmp_path) -> None:
    """The eval job hands its frozen feature stores to every method: the similarity baselines
    read them, a fine-tuned-CLIP Lever-LM encodes the supporting set (cached by the
    checkpoint's sha256, reused by the next run) and the queries with its own CLIP."""
    from leverlm.encoders.store import open_store
    from leverlm.icl.job import EvalDataModule
    from leverlm.lever.select import LeverLM
    from leverlm.utils import sha256_file

    ckpt = clip_checkpoint(tmp_path / "run" / "last.ckpt", NUM_SUPPORT, world.support)
    dm = EvalDataModule(
        queries=str(world.queries), supporting_set=str(world.support), task="vqa",
        methods=["siir", "lever_lm"], shots=[1, 3], retrievers={"lever_lm": {"checkpoint": str(ckpt)}},
        query_features=str(world.q_store), support_features=str(world.s_store), num_workers=0,
    )  # fmt: skip
    table = dm.retrieve_all()
    cache = tmp_path / "run" / "support_features" / sha256_file(ckpt)[:16]
    assert (cache / "manifest.json").is_file()
    lm = LeverLM.from_checkpoint(ckpt, queries=world.queries)
    assert lm.query_features is None and lm.clip is not None
    support, queries = open_store(world.s_store), open_store(world.q_store)
    siir = build_retriever("siir", support_image=support.image, query_image=queries.image)
    for shots in (1, 3):
        assert table[("lever_lm", shots)].tolist() == lm.select(dm.query_positions, shots)
        assert table[("siir", shots)].tolist() == siir.retrieve(dm.retrieval_queries(), shots)
    # the Python API: positions of the supporting set, no store anywhere
    assert len(LeverLM.from_checkpoint(ckpt).select([0, 1], shots=2)) == 2


def test_reverse_seq_reverses_each_shot_counts_sequence(world) -> None:
    plain = LeverLMRetriever(world.ckpt, query_features=world.q_store)
    rev = LeverLMRetriever(world.ckpt, query_features=world.q_store, reverse_seq=True)
    qs = _queries()
    rev.prepare(qs, 4)
    for shots in (1, 2, 4):
        assert rev.retrieve(qs, shots) == [s[::-1] for s in plain.retrieve(qs, shots)]


def test_caption_lever_lm_reading_the_query_text_is_refused(world, tmp_path) -> None:
    ckpt = lever_checkpoint(
        tmp_path / "cap.ckpt", world.s_store, query_features=("image", "text"), task="caption"
    )
    with pytest.raises(RetrieverError, match="query_features=.* 'caption' task: .* answer"):
        LeverLMRetriever(str(ckpt))


def test_lever_lm_errors_name_the_problem(world, tmp_path) -> None:
    with pytest.raises(RetrieverError, match="checkpoint .* is required"):
        LeverLMRetriever()
    with pytest.raises(RetrieverError, match="does not exist"):
        LeverLMRetriever(str(tmp_path / "nope.ckpt"))
    with pytest.raises(RetrieverError, match=f"vocabulary has {NUM_SUPPORT} ICDs .* 29 samples"):
        LeverLMRetriever(world.ckpt, num_candidates=29)
    r = LeverLMRetriever(world.ckpt)
    with pytest.raises(RetrieverError, match="query_features"):
        r.retrieve(_queries(2), 2)
    with pytest.raises(RetrieverError, match="shots=31 is more than the 30"):
        LeverLMRetriever(world.ckpt, query_features=world.q_store).retrieve(_queries(1), 31)


def test_shuffled_has_the_same_icds_in_a_seeded_order(world) -> None:
    inner = LeverLMRetriever(world.ckpt, query_features=world.q_store)
    shuffled = lever_lm_shuffled(inner=inner, seed=3)
    assert isinstance(shuffled, ShuffledRetriever) and shuffled.name == "lever_lm_shuffled"
    qs = _queries()
    base, mixed = inner.retrieve(qs, 4), shuffled.retrieve(qs, 4)
    assert [sorted(s) for s in base] == [sorted(s) for s in mixed]
    assert base != mixed  # 12 queries x 4 ICDs: some order differs
    # built from scratch with the same settings: the same orders (seeded per query key)
    again = build_retriever(
        "lever_lm_shuffled", checkpoint=str(world.ckpt), query_features=world.q_store, seed=3
    )
    assert again.retrieve(list(reversed(qs)), 4) == list(reversed(mixed))


# ------------------------------------------------------------------------------- from file


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_file_retriever_takes_shot_specific_lines_then_cuts(tmp_path) -> None:
    path = _write(
        tmp_path / "seqs.jsonl",
        [
            {"query_key": "a", "icd_positions": [4, 5, 6, 7], "query_position": 0},
            {"query_key": "a", "icd_positions": [9, 8], "shots": 2},
            {"query_key": "b", "icd_positions": [1, 2, 3]},
        ],
    )
    qa, qb = {"__key__": "a", "position": 0}, {"__key__": "b", "position": 1}
    last = FileRetriever(str(path), num_candidates=10)
    assert last.retrieve([qa, qb], 2) == [[9, 8], [2, 3]]
    assert last.retrieve([qa, qb], 3) == [[5, 6, 7], [1, 2, 3]]
    first = build_retriever("oracle", path=str(path), take="first")
    assert first.retrieve([qa, qb], 1) == [[4], [1]]
    assert first.retrieve([qa], 0) == [[]]
    with pytest.raises(
        RetrieverError, match=r"query 'b' has no sequence of 4 ICDs .*lengths there: \[3\]"
    ):
        last.retrieve([qb], 4)
    with pytest.raises(RetrieverError, match="query 'c' has no sequence"):
        last.retrieve([{"__key__": "c", "position": 2}], 1)
    with pytest.raises(RetrieverError, match=r"excludes positions \[3\]"):
        last.retrieve([{**qb, "exclude_positions": [3]}], 2)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "seqs.jsonl:2: not valid JSON"),
        ('{"icd_positions": [1]}', "seqs.jsonl:2: field 'query_key'"),
        ('{"query_key": "b", "icd_positions": [1, 1]}', "repeated positions"),
        ('{"query_key": "b", "icd_positions": [1, 10]}', "outside the supporting set 0..9"),
        ('{"query_key": "b", "icd_positions": [1], "shots": 2}', "field 'shots' is 2"),
        ('{"query_key": "a", "icd_positions": [7]}', "query 'a' already has a sequence"),
    ],
)
def test_file_retriever_bad_lines_are_named(tmp_path, line: str, message: str) -> None:
    path = tmp_path / "seqs.jsonl"
    path.write_text('{"query_key": "a", "icd_positions": [1, 2]}\n' + line + "\n")
    with pytest.raises(RetrieverError, match=message):
        read_sequences(path, num_candidates=10)


# ------------------------------------------------------------------------------- fixed / gt


def test_best_gt_sequence_is_the_top_record_best_beam(tmp_path) -> None:
    gt, best = gt_dataset(tmp_path / "gt", NUM_SUPPORT)
    assert best_gt_sequence(gt) == best == [7, 2]  # 0.75 tie: lowest anchor position wins
    with pytest.raises(RetrieverError, match="supporting set of 30 samples, this .* has 31"):
        best_gt_sequence(gt, num_candidates=31)
    with pytest.raises(RetrieverError, match="manifest.json does not exist"):
        best_gt_sequence(tmp_path / "missing")


# ------------------------------------------------------------------------------- planning


def test_resolve_methods_inherits_resolves_and_checks(world, tmp_path) -> None:
    gt, best = gt_dataset(tmp_path / "gt", NUM_SUPPORT)
    seqs = _write(tmp_path / "o.jsonl", [{"query_key": "a", "icd_positions": [1]}])
    specs = resolve_methods(
        ["random", "fixed", "lever_lm", "lever_lm_shuffled", "oracle"],
        {
            "random": {"seed": 5},
            "fixed": {"gt_dir": str(gt)},
            "lever_lm": {"checkpoint": str(world.ckpt), "beam_size": 2},
            "lever_lm_shuffled": {"seed": 1},
            "oracle": {"retriever": "from_file", "path": str(seqs)},
        },
        NUM_SUPPORT,
    )
    by = {s.method: s for s in specs}
    assert by["fixed"].kwargs == {"sequence": best} and by["fixed"].source == {"gt_dir": str(gt)}
    assert by["lever_lm_shuffled"].kwargs == {
        "checkpoint": str(world.ckpt), "beam_size": 2, "seed": 1
    }  # fmt: skip
    assert by["oracle"].retriever == "from_file" and by["random"].kwargs == {"seed": 5}


@pytest.mark.parametrize(
    ("methods", "retrievers", "message"),
    [
        (["siir", "bogus"], {}, "unknown method 'bogus'; known: answer_oracle, fixed, from_file"),
        (["lever_lm"], {}, "method 'lever_lm' needs a Lever-LM checkpoint"),
        (["lever_lm_shuffled"], {}, "set data.retrievers.lever_lm.checkpoint"),
        (["lever_lm"], {"lever_lm": {"checkpoint": "/no/such.ckpt"}}, "does not exist"),
        (["random"], {"random": {"sede": 1}}, r"unknown argument\(s\) \['sede'\]"),
        (["siir"], {"siir": {"most_simlar": "first"}}, r"\['most_simlar'\] for retriever 'siir'"),
        (["x"], {"x": {"retriever": "nope"}}, "data.retrievers.x.retriever: unknown method 'nope'"),
    ],
)
def test_resolve_methods_refuses_bad_settings(methods, retrievers, message) -> None:
    with pytest.raises(EvalConfigError, match=message):
        resolve_methods(methods, retrievers, NUM_SUPPORT)


def test_settings_of_methods_not_run_are_ignored_with_a_warning(caplog) -> None:
    with caplog.at_level("WARNING", logger="leverlm.eval"):
        specs = resolve_methods(["random"], {"random": {"seed": 2}, "siir": {}}, NUM_SUPPORT)
    assert [s.method for s in specs] == ["random"]
    assert "settings for ['siir'], which are not in data.methods" in caplog.text


def test_accepted_args_follow_kwargs_to_the_base_class() -> None:
    names, open_ = accepted_args(RETRIEVERS["siir"])
    assert {"support_image", "query_image", "most_similar", "device", "chunk_size"} <= names
    assert not open_
    names, _ = accepted_args(RETRIEVERS["lever_lm_shuffled"])
    assert {"checkpoint", "seed", "inner", "query_features"} <= names


def test_build_retrievers_fills_context_and_shares_lever_decoding(world) -> None:
    rng = np.random.default_rng(0)
    ctx = {
        "num_candidates": NUM_SUPPORT,
        "seed": 9,
        "device": "cpu",
        "support_image": rng.standard_normal((NUM_SUPPORT, 4)).astype(np.float32),
        "query_image": rng.standard_normal((NUM_Q, 4)).astype(np.float32),
        "support_text": None,
        "query_text": None,
        "query_features": str(world.q_store),
    }
    specs = resolve_methods(
        ["random", "siir", "lever_lm", "lever_lm_shuffled"],
        {"lever_lm": {"checkpoint": str(world.ckpt)}},
        NUM_SUPPORT,
    )
    built = build_retrievers(specs, ctx)
    assert built["random"].seed == 9 and built["random"].num_candidates == NUM_SUPPORT
    assert built["siir"].support_features is ctx["support_image"]
    assert built["lever_lm_shuffled"].inner is built["lever_lm"]
    # a shuffled method with other Lever-LM settings gets its own decoder
    specs = resolve_methods(
        ["lever_lm", "lever_lm_shuffled"],
        {
            "lever_lm": {"checkpoint": str(world.ckpt)},
            "lever_lm_shuffled": {"beam_size": 2},
        },
        NUM_SUPPORT,
    )
    built = build_retrievers(specs, ctx)
    assert built["lever_lm_shuffled"].inner is not built["lever_lm"]


def test_check_retrieved_names_bad_answers() -> None:
    keys = ["q0", "q1"]
    table = check_retrieved("m", 2, [[1, 2], [3, 0]], keys, 5)
    assert table.tolist() == [[1, 2], [3, 0]] and table.dtype == np.int64
    with pytest.raises(EvalError, match="returned 1 ICD lists for 2 queries"):
        check_retrieved("m", 2, [[1, 2]], keys, 5)
    with pytest.raises(EvalError, match=r"query 'q1' got ICDs \[3, 3\], not 2 distinct"):
        check_retrieved("m", 2, [[1, 2], [3, 3]], keys, 5)
    with pytest.raises(EvalError, match=r"query 'q0' got ICDs \[1, 5\] outside"):
        check_retrieved("m", 2, [[1, 5], [3, 0]], keys, 5)


def test_query_subset_is_seeded_sorted_and_clamped() -> None:
    a, b = select_queries(100, 10, seed=0), select_queries(100, 10, seed=1)
    assert a == sorted(set(a)) and len(a) == 10 and a == select_queries(100, 10, seed=0)
    assert a != b
    assert select_queries(7, 10, seed=0) == list(range(7)) == select_queries(7, None, seed=3)
    with pytest.raises(EvalConfigError, match="data.limit must be an int >= 1"):
        select_queries(7, 0, seed=0)


def test_units_and_shot_checks() -> None:
    assert eval_units(["zero_shot", "random"], [1, 3]) == [
        ("zero_shot", 0), ("random", 1), ("random", 3)
    ]  # fmt: skip
    assert check_methods_and_shots(("random",), (8, 1)) == (["random"], [1, 8])
    with pytest.raises(EvalConfigError, match="shots=-1; shot counts must be >= 1"):
        check_methods_and_shots(["random"], [1, -1])
    with pytest.raises(EvalConfigError, match="shots=0: zero-shot is a method of its own"):
        check_methods_and_shots(["random"], [0, 1])
    with pytest.raises(EvalConfigError, match=r"lists \['random'\] more than once"):
        check_methods_and_shots(["random", "random"], [1])
    with pytest.raises(EvalConfigError, match="repeated values"):
        check_methods_and_shots(["random"], [1, 1])


# ---------------------------------------------------------------------------------------------
# answer_oracle (the demo's `oracle`: ICDs that share the query's answer)
# ---------------------------------------------------------------------------------------------


def _answers(collection: Path) -> list[str]:
    from leverlm.data.collection import Collection

    coll = Collection(collection)
    return [coll.fields(p)["answer"] for p in range(len(coll))]


def test_answer_oracle_picks_icds_with_the_query_answer(world) -> None:
    support, queries = _answers(world.support), _answers(world.queries)
    oracle = build_retriever(
        "answer_oracle", queries=str(world.queries), supporting_set=str(world.support), seed=3
    )
    qs = _queries()
    for shots in (1, 2, 4):
        for q, icds in zip(qs, oracle.retrieve(qs, shots), strict=True):
            assert len(set(icds)) == shots
            assert all(support[p] == queries[q["position"]] for p in icds), (q, icds)
    # per-query seeded: batch-independent, k shots a prefix of k + 1, another seed differs
    four = oracle.retrieve(qs, 4)
    assert oracle.retrieve(qs[5:7], 4) == four[5:7]
    assert [s[:3] for s in four] == oracle.retrieve(qs, 3)
    other = build_retriever(
        "answer_oracle", queries=str(world.queries), supporting_set=str(world.support), seed=4
    )
    assert other.retrieve(qs, 4) != four


def test_answer_oracle_fills_with_others_far_from_the_query_and_excludes(world) -> None:
    support, queries = _answers(world.support), _answers(world.queries)
    oracle = build_retriever(
        "answer_oracle", queries=str(world.queries), supporting_set=str(world.support)
    )
    q = _queries()[1]
    answer = queries[1]
    same = [p for p, a in enumerate(support) if a == answer]
    assert 0 < len(same) < 7
    icds = oracle.retrieve([q], 7)[0]
    assert len(set(icds)) == 7
    n_fill = 7 - len(same)
    assert sorted(icds[n_fill:]) == same  # every match, nearest the query
    assert all(support[p] != answer for p in icds[:n_fill])
    excl = {**q, "exclude_positions": same[:2]}
    got = oracle.retrieve([excl], 2)[0]
    assert not set(got) & set(same[:2])
    assert sum(support[p] == answer for p in got) == min(2, len(same) - 2)


def test_answer_oracle_is_the_method_oracle_and_names_bad_input(world, tmp_path) -> None:
    specs = resolve_methods(["oracle"], {"oracle": {"retriever": "answer_oracle"}}, NUM_SUPPORT)
    ctx = {
        "num_candidates": NUM_SUPPORT,
        "seed": 0,
        "queries": str(world.queries),
        "supporting_set": str(world.support),
    }
    oracle = build_retrievers(specs, ctx)["oracle"]
    assert oracle.name == "answer_oracle"
    assert oracle.retrieve(_queries(2), 2) == build_retriever(
        "answer_oracle", queries=str(world.queries), supporting_set=str(world.support)
    ).retrieve(_queries(2), 2)
    with pytest.raises(RetrieverError, match="field 'label'"):
        build_retriever(
            "answer_oracle",
            queries=str(world.queries),
            supporting_set=str(world.support),
            field="label",
        )
    with pytest.raises(RetrieverError, match="num_candidates=5"):
        build_retriever(
            "answer_oracle",
            queries=str(world.queries),
            supporting_set=str(world.support),
            num_candidates=5,
        )
