"""The IDEFICS adapter on a tiny random IDEFICS: prompts, tokens, generation, errors, caches."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers.invariance import assert_features_batch_invariant, assert_scores_batch_invariant

from leverlm.gt.scoring import score_candidates
from leverlm.lvlm import LVLMError, load_lvlm
from leverlm.lvlm.base import EncodedPrompt
from leverlm.lvlm.idefics import IdeficsLVLM, image_attention_mask, reference_image_attention_mask
from leverlm.lvlm.tiny import build_tiny, synthetic_samples
from leverlm.tasks import TaskError, get_task


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny("idefics", tmp_path_factory.mktemp("idefics") / "tiny", seed=0)


@pytest.fixture(scope="module")
def lvlm(tiny_dir):
    return load_lvlm("idefics", tiny_dir, get_task("vqa_idefics"))


@pytest.fixture(scope="module")
def samples():
    return synthetic_samples(12, seed=7)


def _forbid_forward(lvlm, monkeypatch):
    """Make any model forward fail loudly: errors must come before the work starts."""

    def boom(*args, **kwargs):
        raise AssertionError("a model forward ran before the input error was raised")

    monkeypatch.setattr(lvlm.model.model, "forward", boom)
    monkeypatch.setattr(lvlm.model, "forward", boom)


def test_loaded_frozen_and_typed(lvlm):
    assert isinstance(lvlm, IdeficsLVLM)
    assert not lvlm.model.training
    assert not any(p.requires_grad for p in lvlm.model.parameters())
    assert lvlm.max_length == 512


def test_prompt_matches_processor(lvlm, samples):
    """Our chunked tokenisation, image mask and pixels equal IdeficsProcessor's for the prompt."""
    prompt = lvlm.build_prompt(samples[:3], samples[3], with_answer=False)
    # the paper's layout: instruction, then <image>text\n per ICD, then <image>query
    assert prompt.items[0] == lvlm.task.instruction
    assert prompt.items[2].endswith("Short answer:" + samples[0]["answer"] + "\n")
    assert prompt.items[-1] == "Question:" + samples[3]["question"] + " Short answer:"
    enc = lvlm.encode(prompt)
    raw = [x if isinstance(x, str) else x.image for x in prompt.items]
    expected = lvlm.processor(text=[raw], return_tensors="pt")
    assert enc.input_ids == expected["input_ids"][0].tolist()
    ids = torch.tensor([enc.input_ids])
    assert torch.equal(
        image_attention_mask(ids, lvlm.image_token_id, 4), expected["image_attention_mask"]
    )
    assert torch.equal(
        reference_image_attention_mask(ids, lvlm.tokenizer, 4), expected["image_attention_mask"]
    )
    assert torch.allclose(lvlm.pixel_values(enc.images), expected["pixel_values"][0])


def test_answer_tokens_are_exactly_the_answer(lvlm, samples):
    for query in samples[:6]:
        with_answer = lvlm.encode(lvlm.build_prompt(samples[8:10], query))
        without = lvlm.encode(lvlm.build_prompt(samples[8:10], query, with_answer=False))
        assert with_answer.input_ids[: with_answer.answer_start] == without.input_ids
        answer = lvlm.tokenizer.decode(with_answer.input_ids[with_answer.answer_start :])
        assert answer.strip() == query["answer"]


def test_caption_answer_keeps_its_leading_space(tiny_dir, samples):
    lvlm = load_lvlm("idefics", tiny_dir, "caption")
    enc = lvlm.encode(lvlm.build_prompt(samples[:1], samples[1]))
    pieces = lvlm.tokenizer.convert_ids_to_tokens(enc.input_ids[enc.answer_start :])
    assert "".join(pieces).replace("▁", " ") == " " + samples[1]["caption"]


def test_image_mask_offset_matches_full_mask():
    ids = torch.tensor([[5, 7, 9, 7, 5, 7, 5, 5]])  # 7 = <image>
    full = image_attention_mask(ids, 7, 3)
    suffix = image_attention_mask(ids[:, 4:], 7, 2, offset=1)  # slot 0 = image 1 of the full
    assert torch.equal(suffix, full[:, 4:, 1:])
    assert full[0, 0].sum() == 0  # before the first image: no image


def _greedy_reference(lvlm, icds, query, steps):
    enc = lvlm.encode(lvlm.build_prompt(icds, query, with_answer=False))
    ids = list(enc.input_ids)
    new = []
    with torch.inference_mode():
        for _ in range(steps):
            e = EncodedPrompt(ids, enc.images, len(ids), enc.query_key)
            # the base vocabulary only: image placeholders are never generated
            token = int(lvlm.reference_logits(e)[-1, : lvlm.config.vocab_size].argmax())
            if token == lvlm.tok.eos_id:
                break
            ids.append(token)
            new.append(token)
    return new


def test_generate_greedy_matches_reference_loop(lvlm, samples):
    icd_seqs, queries = [samples[:2], [], samples[2:5]], [samples[5], samples[6], samples[7]]
    got = lvlm.generate_ids(icd_seqs, queries, num_beams=1, max_new_tokens=4)
    for ids, icds, query in zip(got, icd_seqs, queries):
        assert ids == _greedy_reference(lvlm, icds, query, 4)
    assert any(got)


def test_generate_with_task_settings(lvlm, samples):
    texts = lvlm.generate([samples[:2], samples[2:3]], [samples[5], samples[6]])
    assert len(texts) == 2 and all(isinstance(t, str) and "\n" not in t for t in texts)
    ids = lvlm.generate_ids([samples[:2]], [samples[5]])  # paper: beams 3, 5 new tokens
    assert len(ids[0]) <= 5
    assert all(t < lvlm.config.vocab_size for t in ids[0])  # no image placeholder tokens


def test_prompt_longer_than_context_fails_before_work(lvlm, samples, monkeypatch):
    _forbid_forward(lvlm, monkeypatch)
    long_query = dict(samples[0], question=" ".join(map(str, range(400))), __key__="long-q")
    with pytest.raises(LVLMError, match=r"'long-q' has \d+ tokens.*limit of 512"):
        lvlm.score([samples[1:3]], [long_query])
    with pytest.raises(LVLMError, match="'long-q'"):
        score_candidates(lvlm, [], long_query, samples[:3])
    with pytest.raises(LVLMError, match=r"\+5 tokens to generate"):
        # fits for scoring but not with the 5 new tokens of generation
        fits = _query_of_length(lvlm, samples, 510)
        lvlm.generate([[]], [fits])


def _query_of_length(lvlm, samples, target):
    """A query whose generation prompt has exactly ``target`` tokens."""
    words = ""
    for _ in range(1000):
        q = dict(samples[0], question=words, __key__="edge")
        n = len(lvlm.encode(lvlm.build_prompt([], q, with_answer=False)).input_ids)
        if n == target:
            return q
        if n > target:
            break
        words += "x"
    raise AssertionError(f"no question gives a {target}-token prompt")


def test_missing_fields_fail_before_work(lvlm, samples, monkeypatch):
    _forbid_forward(lvlm, monkeypatch)
    bad = {k: v for k, v in samples[4].items() if k != "question"}
    with pytest.raises(TaskError, match=r"'tiny-000004' has no field 'question'"):
        lvlm.score([samples[:2]], [bad])
    with pytest.raises(TaskError, match=r"'tiny-000004' has no field 'question'"):
        # the bad candidate is the last one: still caught before the first forward
        score_candidates(lvlm, samples[:1], samples[1], samples[2:4] + [bad], batch_size=1)
    no_image = {k: v for k, v in samples[4].items() if k != "image"}
    with pytest.raises(TaskError, match=r"'tiny-000004' has no field 'image'"):
        lvlm.generate([[no_image]], [samples[0]])


def test_load_errors(tiny_dir, tmp_path):
    with pytest.raises(LVLMError, match=r"unknown model_type 'idefix'.*idefics, idefics2"):
        load_lvlm("idefix", tiny_dir, "vqa")
    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copy(tiny_dir / "config.json", empty / "config.json")
    with pytest.raises(LVLMError, match=f"{empty}.*has no weights"):
        load_lvlm("idefics", empty, "vqa")
    with pytest.raises(LVLMError, match="does not exist"):
        load_lvlm("idefics", tmp_path / "missing", "vqa")
    with pytest.raises(LVLMError, match="'nobody/no-such-model' is neither a local folder"):
        load_lvlm("idefics", "nobody/no-such-model", "vqa")
    with pytest.raises(LVLMError, match="unknown dtype"):
        load_lvlm("idefics", tiny_dir, "vqa", dtype="int3")


def test_bfloat16_load_scores(tiny_dir, samples):
    lvlm = load_lvlm("idefics", tiny_dir, "vqa_idefics", dtype="bf16")
    assert lvlm.model.dtype == torch.bfloat16
    ref = load_lvlm("idefics", tiny_dir, "vqa_idefics")
    a = lvlm.score([samples[:2]], [samples[3]])
    b = ref.score([samples[:2]], [samples[3]])
    assert torch.isfinite(a.sum_logprob).all()
    assert torch.equal(a.num_tokens, b.num_tokens)
    assert (a.mean_logprob - b.mean_logprob).abs().max() < 0.25


def test_vision_features_computed_once_per_image(tiny_dir, samples):
    lvlm = load_lvlm("idefics", tiny_dir, "vqa_idefics")
    calls = []
    compute = lvlm.vision_features
    lvlm.vision_features = lambda images: calls.append(len(images)) or compute(images)
    prefix, query, candidates = samples[:2], samples[2], samples[3:9]
    first = score_candidates(lvlm, prefix, query, candidates, "left", batch_size=2)
    assert sum(calls) == 9  # 2 prefix + 1 query + 6 candidates, each once
    second = score_candidates(lvlm, prefix, query, candidates, "right", batch_size=4)
    assert sum(calls) == 9  # all hits: features reused across calls and orders
    assert lvlm.feature_cache.hits > 0
    # a cache smaller than one batch evicts and recomputes, with identical results
    small = load_lvlm("idefics", tiny_dir, "vqa_idefics", image_cache_size=2)
    assert torch.allclose(score_candidates(small, prefix, query, candidates, "left"), first)
    assert torch.allclose(score_candidates(small, prefix, query, candidates, "right"), second)
    assert len(small.feature_cache) <= 2


def test_prefix_encoded_once_per_prefix(tiny_dir, samples):
    lvlm = load_lvlm("idefics", tiny_dir, "vqa_idefics")
    calls = []
    prefix_kv = lvlm._prefix_kv
    lvlm._prefix_kv = lambda enc, p, k: calls.append(1) or prefix_kv(enc, p, k)
    score_candidates(lvlm, samples[:2], samples[2], samples[3:9], "right", batch_size=2)
    # the "without" row and three candidate batches share the same prefix: computed once
    assert len(calls) == 4 and len(lvlm.prefix_cache) == 1


@pytest.mark.parametrize("vision_batch_size", [1, 4])
def test_features_and_scores_are_batch_invariant(lvlm, samples, vision_batch_size):
    other_size = synthetic_samples(3, seed=8, image_size=(40, 72), key_prefix="other")
    assert_features_batch_invariant(lvlm, samples[:6] + other_size, vision_batch_size)
    lvlm.vision_batch_size = vision_batch_size
    try:
        for order in ("left", "right"):
            prefix, query = samples[:2], samples[2]
            candidates = samples[3:7] + other_size[:2]
            assert_scores_batch_invariant(lvlm, prefix, query, candidates, samples[7:11], order)
    finally:
        lvlm.vision_batch_size = 1
