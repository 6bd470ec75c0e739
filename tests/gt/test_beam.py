"""Beam search over a fake deterministic scorer, and the LVLM scorer adapters."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from leverlm.gt.beam import (
    BeamConfigError,
    CiderGainScorer,
    beam_search,
    beam_search_reference,
    infoscore_scorer,
)


def fake_value(prefix, cand) -> float:
    """A deterministic pseudo-random score of adding ``cand`` to ``prefix``."""
    h = hashlib.sha256(repr((tuple(prefix), cand)).encode()).digest()
    return int.from_bytes(h[:4], "little") / 2**32 - 0.5


class CountingScorer:
    def __init__(self):
        self.calls = []

    def __call__(self, prefix, candidates):
        self.calls.append((tuple(prefix), list(candidates)))
        return [fake_value(prefix, c) for c in candidates]


@pytest.mark.parametrize("order", ["left", "right"])
@pytest.mark.parametrize("ranking", ["last", "cumulative"])
def test_matches_reference(order, ranking):
    cands = [11, 3, 7, 25, 2, 9]
    kw = dict(beam_size=3, shots=3, order=order, ranking=ranking)
    fast = beam_search(cands, CountingScorer(), **kw)
    ref = beam_search_reference(cands, CountingScorer(), **kw)
    assert fast == ref


def test_exhaustive_one_step_and_left_order():
    cands = [4, 8, 15, 16]
    scorer = CountingScorer()
    beams = beam_search(cands, scorer, beam_size=4, shots=1)
    want = sorted(cands, key=lambda c: -fake_value((), c))
    assert [b.sequence for b in beams] == [(c,) for c in want]
    # Two shots, left order: the second ICD goes in front (index 0, farthest from the query).
    beams = beam_search(cands, CountingScorer(), beam_size=4, shots=2, order="left")
    for b in beams:
        first, second = b.sequence[1], b.sequence[0]
        assert b.step_scores == (fake_value((), first), fake_value((first,), second))
        assert b.score == b.step_scores[-1]


def test_beam_with_full_width_is_exhaustive_over_last_step():
    cands = [1, 2, 3, 4, 5]
    beams = beam_search(cands, CountingScorer(), beam_size=5, shots=2, order="right")
    # With the beam as wide as the set, step 2 sees every (kept first, second) pair.
    pairs = [(a, b) for a, b in itertools.permutations(cands, 2)]
    best = max(pairs, key=lambda p: fake_value((p[0],), p[1]))
    assert beams[0].sequence == best


def test_one_call_per_beam_state_and_no_repeats():
    scorer = CountingScorer()
    beams = beam_search(list(range(10)), scorer, beam_size=3, shots=3)
    assert len(scorer.calls) == 1 + 3 + 3
    assert len({c[0] for c in scorer.calls}) == len(scorer.calls)  # each prefix scored once
    for prefix, cands in scorer.calls:
        assert not set(prefix) & set(cands)
    for b in beams:
        assert len(set(b.sequence)) == 3


def test_cumulative_differs_from_last():
    # Candidate 0 is great first but everything after it is poor; 1 then 2 is solid.
    table = {((), 0): 10.0, ((), 1): 5.0, ((), 2): 0.0}

    def score(prefix, cands):
        return [table.get((tuple(prefix), c), 3.0 if prefix == (1,) else 1.0) for c in cands]

    last = beam_search([0, 1, 2], score, beam_size=1, shots=2, ranking="last", order="right")
    cum = beam_search([0, 1, 2], score, beam_size=2, shots=2, ranking="cumulative", order="right")
    assert last[0].sequence[0] == 0
    assert cum[0].sequence == (0, 1) and cum[0].score == 11.0
    last2 = beam_search([0, 1, 2], score, beam_size=2, shots=2, ranking="last", order="right")
    assert last2[0].sequence[0] == 1 and last2[0].score == 3.0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(beam_size=5, shots=2), "beam_size=5"),
        (dict(beam_size=2, shots=0), "shots=0"),
        (dict(beam_size=2, shots=5), "shots=5"),
        (dict(beam_size=2, shots=2, order="middle"), "order='middle'"),
        (dict(beam_size=2, shots=2, ranking="best"), "ranking='best'"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(BeamConfigError, match=match):
        beam_search([1, 2, 3, 4], CountingScorer(), **kw)


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN for candidate 2"):
        beam_search(
            [1, 2], lambda p, c: [0.0 if x == 1 else float("nan") for x in c], beam_size=1, shots=1
        )


def test_infoscore_adapter_passes_samples_in_prompt_order():
    samples = {p: {"__key__": f"k{p}", "position": p} for p in range(6)}
    seen = []

    def fake_score_candidates(lvlm, prefix_icds, query, candidates, order, metric, batch_size):
        seen.append(([s["position"] for s in prefix_icds], order, metric, batch_size))
        return [fake_value([s["position"] for s in prefix_icds], c["position"]) for c in candidates]

    score = infoscore_scorer(
        "lvlm",
        samples[0],
        samples,
        order="left",
        batch_size=7,
        score_candidates=fake_score_candidates,
    )
    beams = beam_search([1, 2, 3, 4], score, beam_size=2, shots=2)
    assert beams == beam_search([1, 2, 3, 4], CountingScorer(), beam_size=2, shots=2)
    assert seen[0] == ([], "left", "infoscore", 7)
    assert all(o == "left" and b == 7 for _, o, _, b in seen)


def test_cider_gain_scorer():
    samples = {
        p: {
            "__key__": f"k{p}",
            "position": p,
            "captions": [f"word{p} thing"],
            "caption": f"word{p} thing",
        }
        for p in range(5)
    }
    query = {"__key__": "q", "position": 9, "captions": ["a dog runs"]}
    generated, tokenized, corpora = [], [], []

    def generate(icd_seqs, queries):
        assert all(q is query for q in queries)
        generated.append([tuple(s["position"] for s in seq) for seq in icd_seqs])
        # The caption names the ICDs, so the fake CIDEr can reward ICD 3 next to the query.
        return [" ".join(f"ICD{s['position']}" for s in seq) for seq in icd_seqs]

    def tokenize(captions):
        tokenized.append(sorted(captions))
        return {k: [c.lower() for c in v] for k, v in captions.items()}

    def cider_fn(preds, refs):
        corpora.append(sorted(refs))
        assert refs["__anchor__"] == ["a dog runs"] and refs["ctx1"] == ["word1 thing"]
        return {
            k: (1.0 if v.endswith("icd3") else 0.0) + 0.1 * v.count("icd") for k, v in preds.items()
        }

    scorer = CiderGainScorer(
        generate,
        query,
        samples,
        [1, 2, 3],
        order="right",
        batch_size=2,
        tokenize=tokenize,
        cider_fn=cider_fn,
    )
    assert tokenized == [["__anchor__", "ctx1", "ctx2", "ctx3"]]  # references: once per anchor
    scores = scorer((), [1, 2, 3])
    assert scores == pytest.approx([0.1, 0.1, 1.1])
    # The "without" caption and the candidates' in batches of 2; one tokenizer call for all.
    assert generated == [[(), (1,)], [(2,), (3,)]]
    assert tokenized[1] == ["gen0", "gen1", "gen2", "gen3"]
    # The IDF corpus is the anchor + its candidates, the same in every call.
    assert all(c == ["__anchor__", "ctx1", "ctx2", "ctx3"] for c in corpora)
    # right order: 1 goes next to the query, "icd3 icd1" no longer ends with icd3.
    assert scorer((3,), [1]) == pytest.approx([0.2 - 1.1])
    assert generated[-1] == [(3,), (3, 1)]
    scorer((), [2])  # the "without" caption of a known prefix is not generated again
    assert generated[-1] == [(2,)]


def test_cider_gain_with_the_real_metric():
    """Default tokenizer + CIDEr: the caption matching the anchor's references gains."""
    samples = {
        1: {"captions": ["a red circle on white"]},
        2: {"captions": ["a blue square in the corner"]},
        3: {"captions": ["two green triangles"]},
    }
    query = {"captions": ["a red circle", "a small red circle on a white background"]}
    by_icd = {1: "a red circle", 2: "a blue square", 3: "green things"}

    def generate(icd_seqs, queries):
        return [by_icd[seq[-1]["pos"]] if seq else "something" for seq in icd_seqs]

    for p, s in samples.items():
        s["pos"] = p
    scorer = CiderGainScorer(generate, query, samples, [1, 2, 3], order="right")
    gains = scorer((), [1, 2, 3])
    assert gains[0] > gains[1] and gains[0] > gains[2] and gains[0] > 0
