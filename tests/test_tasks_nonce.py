"""The ``vqa_nonce`` task: per-query nonce answer maps, applied identically by every prompt path.

Scoring (``score``, ``score_with_prefix``, ``score_candidates``, ``score_reference``),
generation and the metric's references must all show a query the same remapped answers.
"""

from __future__ import annotations

from collections import Counter

import easy_vqa
import pytest
import torch
from helpers.easyvqa import easyvqa_samples

from leverlm.data.prep.easyvqa import COLORS, SHAPES, YES_NO
from leverlm.gt.scoring import score_candidates, score_candidates_reference
from leverlm.lvlm import load_lvlm
from leverlm.lvlm.tiny import build_tiny
from leverlm.metrics import vqa_accuracy
from leverlm.tasks import (
    EASYVQA_ANSWERS,
    NONCE_WORDS,
    NonceAnswers,
    TaskError,
    get_task,
)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return easyvqa_samples(12)


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory):
    folder = build_tiny("idefics3", tmp_path_factory.mktemp("tiny") / "idefics3", seed=0)
    return load_lvlm("idefics3", folder, get_task("vqa_nonce"))


def test_vocabularies_match_easyvqa() -> None:
    assert set(EASYVQA_ANSWERS) == set(YES_NO) | set(SHAPES) | set(COLORS)
    assert set(easy_vqa.get_answers()) == set(EASYVQA_ANSWERS)
    assert len(NONCE_WORDS) >= len(EASYVQA_ANSWERS)
    assert not set(NONCE_WORDS) & set(EASYVQA_ANSWERS)


def test_map_is_an_injection_drawn_per_episode() -> None:
    nonce = NonceAnswers()
    m = nonce.mapping("easyvqa-test-q000001")
    assert set(m) == set(EASYVQA_ANSWERS)
    assert len(set(m.values())) == len(m) and set(m.values()) <= set(NONCE_WORDS)
    assert nonce.mapping("easyvqa-test-q000001") == m  # deterministic
    maps = [nonce.mapping(f"q{i}") for i in range(400)]
    assert len({tuple(x.values()) for x in maps}) == 400  # a fresh map per episode
    # Roughly uniform: every nonce word stands for "yes" in some episodes, none dominates.
    yes_words = Counter(x["yes"] for x in maps)
    assert set(yes_words) == set(NONCE_WORDS)
    assert max(yes_words.values()) < 3 * 400 / len(NONCE_WORDS)
    assert NonceAnswers(seed=1).mapping("easyvqa-test-q000001") != m


def test_episode_remaps_icds_and_query_with_the_query_map(samples) -> None:
    task = get_task("vqa_nonce")
    assert task.name == "vqa"  # reads VQA collections, like vqa_idefics
    query, icds = samples[0], samples[1:4]
    new_icds, new_query = task.episode(icds, query)
    m = NonceAnswers().mapping(query["__key__"])
    assert new_query["answer"] == m[query["answer"]]
    assert new_query["answers"] == [m[query["answer"]]] * 10
    assert [d["answer"] for d in new_icds] == [m[d["answer"]] for d in icds]
    # inputs untouched, everything else shared
    assert query["answer"] in EASYVQA_ANSWERS and new_query["image"] is query["image"]
    assert new_query["question"] == query["question"]
    # the map depends on the query only, not on which ICDs are shown
    other_icds, again = task.episode(samples[5:9], query)
    assert again == new_query
    assert [d["answer"] for d in other_icds] == [m[d["answer"]] for d in samples[5:9]]
    # an explicit episode id (training) draws another map
    _, trained = task.episode(icds, query, episode_id="train-0-0-0")
    assert trained["answer"] == NonceAnswers().mapping("train-0-0-0")[query["answer"]]


def test_other_tasks_show_samples_unchanged(samples) -> None:
    for name in ("vqa", "vqa_idefics", "caption"):
        icds, query = get_task(name).episode(samples[1:3], samples[0])
        assert icds == samples[1:3] and query is samples[0]


def test_bad_samples_name_key_and_value(samples) -> None:
    task = get_task("vqa_nonce")
    bad = dict(samples[0], answer="purple")
    with pytest.raises(TaskError, match=r"easyvqa-test-q000000.*'purple'"):
        task.episode([], bad)
    bad_list = dict(samples[0], answers=["yes", "maybe"])
    with pytest.raises(TaskError, match=r"answers\[1\].*'maybe'"):
        task.episode([], bad_list)
    with pytest.raises(TaskError, match="__key__"):
        task.episode([], {k: v for k, v in samples[0].items() if k != "__key__"})
    with pytest.raises(TaskError, match="also answers"):
        NonceAnswers(words=("yes", *NONCE_WORDS[1:]))
    with pytest.raises(TaskError, match="injectively"):
        NonceAnswers(words=NONCE_WORDS[:5])


def test_scorer_and_generator_build_the_same_remapped_prompt(lvlm, samples) -> None:
    task = lvlm.task
    query, icds = samples[0], samples[1:3]
    m = NonceAnswers().mapping(query["__key__"])
    scored = lvlm.build_prompt(icds, query, with_answer=True)
    generated = lvlm.build_prompt(icds, query, with_answer=False)

    def shown(items):
        return [x if isinstance(x, str) else x.ident for x in items]

    assert shown(scored.items) == shown(generated.items)
    text = "".join(x for x in scored.items if isinstance(x, str))
    for icd in icds:
        assert f"{icd['question']} Short answer:{m[icd['answer']]}" in text
    assert scored.answer == m[query["answer"]]
    # the metric's references are the same words
    refs = task.episode([], query)[1]["answers"]
    assert vqa_accuracy(scored.answer, refs) == 1.0
    assert vqa_accuracy(query["answer"], refs) == 0.0
    # token level: generation's prompt is exactly the scored prompt without its answer
    enc_score = lvlm.encode_pairs([icds], [query], with_answer=True)[0]
    enc_gen = lvlm.encode_pairs([icds], [query], with_answer=False)[0]
    assert enc_gen.input_ids == enc_score.input_ids[: enc_score.answer_start]
    assert lvlm.tokenizer.decode(enc_score.input_ids[enc_score.answer_start :]) == scored.answer


def test_one_icd_shows_the_word_of_the_query_it_serves(lvlm, samples) -> None:
    icd = samples[1]
    words = {
        lvlm.build_prompt([icd], q).items[1].split("Short answer:")[1].split("\n")[0]
        for q in samples[2:]
    }
    assert len(words) > 1  # different queries, different maps


@pytest.mark.parametrize("order", ["left", "right"])
def test_fast_scoring_paths_match_reference_under_the_remap(lvlm, samples, order) -> None:
    query, prefix, cands = samples[0], [samples[1]], samples[2:7]
    fast = score_candidates(lvlm, prefix, query, cands, order=order, batch_size=2)
    ref = score_candidates_reference(lvlm, prefix, query, cands, order=order)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)
    # the KV-cached prefix is keyed by the query's remapped tokens: two queries sharing the
    # prefix ICD (shown with different words) still score as the reference does
    other = samples[8]
    got = lvlm.score_with_prefix(prefix, [[cands[0]], [cands[1]]], [query, other])
    want = lvlm.score_reference([[*prefix, cands[0]], [*prefix, cands[1]]], [query, other])
    torch.testing.assert_close(got.mean_logprob, want.mean_logprob, atol=1e-4, rtol=0)


def test_generate_runs_on_the_remapped_prompt(lvlm, samples) -> None:
    out = lvlm.generate([samples[1:3], []], samples[:2], max_new_tokens=2, num_beams=1)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_eval_references_are_the_querys_remapped_answers(samples) -> None:
    from leverlm.icl.job import EvalConfigError, references_of

    query = samples[0]
    plain = references_of(get_task("vqa"), query)
    nonce_task = get_task("vqa_nonce")
    remapped = references_of(nonce_task, query)
    mapping = NonceAnswers().mapping(str(query["__key__"]))
    assert remapped == [mapping[a] for a in plain]
    assert set(remapped) <= set(NONCE_WORDS)
    # what the scorer and generator show for this query is what the metric expects
    assert nonce_task.episode(samples[1:3], query)[1]["answers"] == remapped
    with pytest.raises(EvalConfigError, match="not in the nonce task's answer vocabulary"):
        references_of(nonce_task, {**query, "answers": ["purple"] * 10})
