"""Idefics2 / Idefics3 / Qwen2-VL / Qwen2.5-VL adapters on tiny random checkpoints.

Each tiny folder is built once (``build_tiny``) and loaded through ``load_lvlm`` like a real
checkpoint. The fast paths (``score``, ``score_with_prefix``, ``score_candidates``) must equal
the reference path (the model's own forward on raw pixels, one prompt at a time) within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from helpers.invariance import assert_features_batch_invariant, assert_scores_batch_invariant

from leverlm.gt.scoring import score_candidates, score_candidates_reference
from leverlm.lvlm import load_lvlm
from leverlm.lvlm.base import LVLMError
from leverlm.lvlm.hf_interleaved import PromptTemplate, mrope_position_ids
from leverlm.lvlm.tiny import build_tiny, synthetic_samples
from leverlm.tasks import get_task

TYPES = ["idefics2", "idefics3", "qwen2_vl", "qwen2_5_vl"]
# variant -> (model_type, build_tiny options); a variant per distinct placeholder layout
VARIANTS: dict[str, tuple[str, dict]] = {t: (t, {}) for t in TYPES}
VARIANTS["idefics2-split"] = ("idefics2", {"image_splitting": True})  # 4 crops + image
TOL = 1e-4

# What a user writes for one image in a plain prompt for each family's processor.
PLACEHOLDER = {
    "idefics2": "<image>",
    "idefics3": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    built: dict[str, object] = {}

    def get(variant: str):
        if variant not in built:
            model_type, options = VARIANTS[variant]
            out = tmp_path_factory.mktemp("tiny") / variant
            built[variant] = build_tiny(model_type, out, seed=0, **options)
        return built[variant]

    return get


@pytest.fixture(scope="module")
def lvlms(folders):
    loaded: dict[tuple[str, str], object] = {}

    def get(variant: str, task: str = "vqa_idefics"):
        if (variant, task) not in loaded:
            model_type = VARIANTS[variant][0]
            loaded[variant, task] = load_lvlm(model_type, folders(variant), get_task(task))
        return loaded[variant, task]

    return get


@pytest.fixture(scope="module")
def samples():
    # Two source sizes: Qwen gives them different token counts, Idefics3 different tilings.
    return synthetic_samples(10, seed=3) + synthetic_samples(
        6, seed=4, image_size=(40, 72), key_prefix="other"
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max().item() < TOL, (a, b)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("task", ["vqa_idefics", "caption"])
def test_prompt_ids_equal_the_processors(lvlms, samples, variant, task):
    """The chunked encoding gives the ids the real processor gives for the same prompt."""
    lvlm = lvlms(variant, task)
    t = lvlm.task
    icds, query = [samples[0], samples[12], samples[1]], samples[14]
    ph = PLACEHOLDER[VARIANTS[variant][0]]
    text = t.instruction + "".join(ph + t.icd_text(s) + t.icd_join for s in icds)
    text += ph + t.query_text(query)
    images = [s["image"] for s in [*icds, query]]
    expected = lvlm.processor(text=[text], images=[images])["input_ids"][0]
    enc = lvlm.encode(lvlm.build_prompt(icds, query, with_answer=False))
    assert enc.input_ids == list(expected)
    assert len(enc.images) == 4
    # with the answer: the prompt part is unchanged and the answer tokens spell the answer
    full = lvlm.encode(lvlm.build_prompt(icds, query))
    assert full.input_ids[: full.answer_start] == enc.input_ids
    answer = lvlm.tokenizer.decode(full.input_ids[full.answer_start :])
    assert answer.strip() == t.query_answer_text(query).strip()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_score_matches_reference_with_padding(lvlms, samples, variant):
    lvlm = lvlms(variant)
    icd_seqs = [samples[0:2], [], samples[2:5], samples[11:12], samples[12:14]]
    queries = [samples[6], samples[7], samples[8], samples[15], samples[9]]
    lengths = {
        len(lvlm.encode(lvlm.build_prompt(s, q)).input_ids) for s, q in zip(icd_seqs, queries)
    }
    assert len(lengths) == len(queries)  # every row has another length: the batch is padded
    fast, ref = lvlm.score(icd_seqs, queries), lvlm.score_reference(icd_seqs, queries)
    _close(fast.sum_logprob, ref.sum_logprob)
    _close(fast.mean_logprob, ref.mean_logprob)
    assert torch.equal(fast.num_tokens, ref.num_tokens)
    assert (fast.num_tokens > 0).all()
    for i in range(len(queries)):  # batch composition does not matter
        _close(lvlm.score([icd_seqs[i]], [queries[i]]).sum_logprob, fast.sum_logprob[i : i + 1])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("order", ["left", "right"])
def test_score_candidates_match_reference(lvlms, samples, variant, order):
    """Both construct orders (right: prefix KV cache), every batch size 1..K."""
    lvlm = lvlms(variant)
    prefix, query, candidates = [samples[0], samples[13]], samples[2], samples[3:6] + samples[11:13]
    ref = score_candidates_reference(lvlm, prefix, query, candidates, order, "logprob_sum")
    assert ref.abs().max() > 1e-3  # candidates change the answer's likelihood
    for batch_size in range(1, len(candidates) + 1):
        fast = score_candidates(lvlm, prefix, query, candidates, order, "logprob_sum", batch_size)
        _close(fast, ref)
    info_ref = score_candidates_reference(lvlm, prefix, query, candidates, order, "infoscore")
    _close(score_candidates(lvlm, prefix, query, candidates, order, "infoscore", 2), info_ref)


@pytest.mark.parametrize("model_type", TYPES)
def test_score_with_prefix_matches_reference(lvlms, samples, model_type):
    lvlm = lvlms(model_type, "caption")
    prefix = [samples[10], samples[14]]
    suffixes = [[samples[0]], [], [samples[1], samples[13]], [samples[2]]]
    queries = [samples[5], samples[5], samples[6], samples[15]]
    lvlm.prefix_cache.clear()
    fast = lvlm.score_with_prefix(prefix, suffixes, queries)
    ref = lvlm.score_reference([prefix + s for s in suffixes], queries)
    _close(fast.sum_logprob, ref.sum_logprob)
    _close(fast.mean_logprob, ref.mean_logprob)
    assert torch.equal(fast.num_tokens, ref.num_tokens)
    assert len(lvlm.prefix_cache) == 1
    again = lvlm.score_with_prefix(prefix, suffixes[:2], queries[:2])  # reuses the prefix KV
    assert len(lvlm.prefix_cache) == 1
    _close(again.sum_logprob, fast.sum_logprob[:2])


@pytest.mark.parametrize("model_type", TYPES)
def test_images_reach_the_model_and_features_are_cached(lvlms, samples, model_type):
    lvlm = lvlms(model_type)
    query = samples[6]
    icd = dict(samples[0])
    swapped = dict(icd, image=samples[9]["image"])  # same text and key, other pixels
    lvlm.feature_cache.clear()
    a = lvlm.score([[icd]], [query])
    misses = lvlm.feature_cache.misses
    b = lvlm.score([[swapped]], [query])
    assert abs(a.sum_logprob.item() - b.sum_logprob.item()) > 1e-4
    assert lvlm.feature_cache.misses == misses + 1  # only the new image was encoded
    hits = lvlm.feature_cache.hits
    again = lvlm.score([[icd]], [query])
    assert lvlm.feature_cache.hits == hits + 2
    _close(again.sum_logprob, a.sum_logprob)


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("vision_batch_size", [1, 4])
def test_features_and_scores_are_batch_invariant(lvlms, samples, model_type, vision_batch_size):
    lvlm = lvlms(model_type)
    assert_features_batch_invariant(lvlm, samples[::2], vision_batch_size)
    lvlm.vision_batch_size = vision_batch_size
    try:
        for order in ("left", "right"):
            prefix, query, candidates = [samples[0], samples[13]], samples[2], samples[3:7]
            assert_scores_batch_invariant(
                lvlm, prefix, query, candidates + samples[11:13], samples[7:10], order
            )
    finally:
        lvlm.vision_batch_size = 1


def test_prompt_template(folders, samples):
    lvlm = load_lvlm(
        "qwen2_vl",
        folders("qwen2_vl"),
        get_task("vqa"),
        template={"icd_prefix": "Example:", "query_prefix": "User:", "icd_suffix": "<|im_end|>"},
    )
    assert lvlm.template == PromptTemplate("Example:", "User:", "<|im_end|>")
    enc = lvlm.encode(lvlm.build_prompt(samples[0:2], samples[3], with_answer=False))
    text = lvlm.tokenizer.decode(enc.input_ids)
    assert text.count("Example:") == 2 and text.count("User:") == 1
    assert text.count("<|im_end|>") == 2
    icd_seqs, queries = [samples[0:2], samples[4:5]], [samples[3], samples[5]]
    _close(
        lvlm.score(icd_seqs, queries).sum_logprob,
        lvlm.score_reference(icd_seqs, queries).sum_logprob,
    )
    _close(
        lvlm.score_with_prefix(
            samples[0:1], [[samples[1]], []], [samples[3], samples[5]]
        ).sum_logprob,
        lvlm.score_reference([samples[0:2], samples[0:1]], [samples[3], samples[5]]).sum_logprob,
    )


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_equal_the_models(lvlms, samples, model_type):
    lvlm = lvlms(model_type)
    enc = lvlm.encode(lvlm.build_prompt([samples[0], samples[12]], samples[13]))
    grids = [lvlm.layout(im) for im in enc.images]
    assert len({g for g in grids}) == 2  # two image sizes -> two grids
    ids = torch.tensor([enc.input_ids])
    expected, _ = lvlm.model.model.get_rope_index(
        ids,
        mm_token_type_ids=(ids == lvlm.image_token_id).int(),
        image_grid_thw=torch.tensor(grids),
    )
    got = mrope_position_ids(enc.input_ids, grids, lvlm.image_token_id, lvlm.merge_size)
    assert torch.equal(got, expected[:, 0])
    with pytest.raises(LVLMError, match="placeholder"):
        mrope_position_ids(enc.input_ids, grids[:1], lvlm.image_token_id, lvlm.merge_size)


@pytest.mark.parametrize("model_type", TYPES)
def test_generate(lvlms, samples, model_type):
    lvlm = lvlms(model_type)
    icd_seqs = [samples[0:2], [], samples[12:13]]
    queries = [samples[3], samples[4], samples[14]]
    out = lvlm.generate(icd_seqs, queries, max_new_tokens=4, num_beams=2)
    assert isinstance(out, list) and len(out) == 3
    assert all(isinstance(s, str) and "\n" not in s for s in out)
    assert all(lvlm.task.postprocess(s) == s for s in out)
    assert lvlm.generate(icd_seqs, queries, max_new_tokens=4, num_beams=2) == out
    # cached features via inputs_embeds == the model's generate on raw pixels
    assert lvlm.generate_reference(icd_seqs, queries, max_new_tokens=4, num_beams=2) == out
    greedy = lvlm.generate(icd_seqs, queries, max_new_tokens=4, num_beams=1)
    assert lvlm.generate_reference(icd_seqs, queries, max_new_tokens=4, num_beams=1) == greedy
    # greedy, one row alone (no padding at all) also works
    assert len(lvlm.generate([samples[0:1]], [samples[5]], max_new_tokens=3, num_beams=1)) == 1


def test_load_errors(folders, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(LVLMError, match="no-weights"):
        load_lvlm("idefics2", empty, "vqa")
    with pytest.raises(LVLMError, match="does not exist"):
        load_lvlm("qwen2_vl", tmp_path / "missing", "vqa")
    folder = folders("idefics3")
    with pytest.raises(LVLMError, match="'idefics3' model, not 'qwen2_vl'"):
        load_lvlm("qwen2_vl", folder, "vqa")


def test_bench_size_builds(tmp_path):
    """The bench size keeps each family's structure at hidden 256 and 224 px images."""
    from transformers import AutoConfig

    path = build_tiny("qwen2_5_vl", tmp_path / "q", size="bench")
    config = AutoConfig.from_pretrained(path)
    assert config.text_config.hidden_size == 256 and config.vision_config.patch_size == 14
    with pytest.raises(ValueError, match="huge"):
        build_tiny("idefics3", tmp_path / "x", size="huge")
