"""Fast scoring paths == the straightforward reference path, for every adapter's tiny model.

Add a model family by adding an entry to ``TINY_VARIANTS``: ``id -> (model_type, build kwargs)``.
Each variant is built once per session with ``build_tiny`` and loaded through ``load_lvlm``.
"""

from __future__ import annotations

import pytest
import torch

from leverlm.gt.scoring import score_candidates, score_candidates_reference
from leverlm.lvlm import load_lvlm
from leverlm.lvlm.tiny import build_tiny, synthetic_samples
from leverlm.tasks import get_task

TINY_VARIANTS: dict[str, tuple[str, dict]] = {
    "idefics": ("idefics", {}),
    # the image_encoder_embeddings path (no perceiver resampler)
    "idefics-no-resampler": ("idefics", {"use_resampler": False}),
}

TOL = 1e-4


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    built: dict[str, object] = {}

    def get(variant: str):
        if variant not in built:
            model_type, kw = TINY_VARIANTS[variant]
            out = tmp_path_factory.mktemp("tiny") / variant
            built[variant] = build_tiny(model_type, out, seed=0, **kw)
        return built[variant]

    return get


@pytest.fixture(scope="session")
def samples():
    # two image sizes: the processor resizes, features must not depend on the source size
    return synthetic_samples(10, seed=3) + synthetic_samples(
        6, seed=4, image_size=(40, 72), key_prefix="other"
    )


def _load(tiny_dirs, variant: str, task: str = "vqa_idefics"):
    model_type, _ = TINY_VARIANTS[variant]
    return load_lvlm(model_type, tiny_dirs(variant), get_task(task))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max().item() < TOL, (a, b)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
@pytest.mark.parametrize("task", ["vqa_idefics", "caption"])
def test_score_matches_reference_with_padding(tiny_dirs, samples, variant, task):
    lvlm = _load(tiny_dirs, variant, task)
    icd_seqs = [samples[0:2], [], samples[2:5], samples[5:6], samples[12:14]]
    queries = [samples[6], samples[7], samples[8], samples[15], samples[9]]
    lengths = {
        len(lvlm.encode(lvlm.build_prompt(s, q)).input_ids) for s, q in zip(icd_seqs, queries)
    }
    assert len(lengths) > 1  # the batch really is padded
    fast, ref = lvlm.score(icd_seqs, queries), lvlm.score_reference(icd_seqs, queries)
    _close(fast.sum_logprob, ref.sum_logprob)
    _close(fast.mean_logprob, ref.mean_logprob)
    assert torch.equal(fast.num_tokens, ref.num_tokens)
    # batch composition must not matter: each row alone gives the same numbers
    for i in range(len(queries)):
        alone = lvlm.score([icd_seqs[i]], [queries[i]])
        _close(alone.sum_logprob, fast.sum_logprob[i : i + 1])


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
@pytest.mark.parametrize("n_prefix", [0, 2])
def test_score_with_prefix_matches_reference(tiny_dirs, samples, variant, n_prefix):
    lvlm = _load(tiny_dirs, variant)
    prefix = samples[10 : 10 + n_prefix]
    suffixes = [[samples[0]], [], [samples[1], samples[13]], [samples[2]]]
    queries = [samples[5], samples[5], samples[6], samples[14]]
    fast = lvlm.score_with_prefix(prefix, suffixes, queries)
    ref = lvlm.score_reference([prefix + s for s in suffixes], queries)
    _close(fast.sum_logprob, ref.sum_logprob)
    _close(fast.mean_logprob, ref.mean_logprob)
    assert torch.equal(fast.num_tokens, ref.num_tokens)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
@pytest.mark.parametrize("order", ["left", "right"])
def test_score_candidates_matches_reference(tiny_dirs, samples, variant, order):
    lvlm = _load(tiny_dirs, variant)
    prefix, query, candidates = samples[0:2], samples[2], samples[3:7] + samples[11:14]
    ref = {
        metric: score_candidates_reference(lvlm, prefix, query, candidates, order, metric)
        for metric in ("infoscore", "logprob_mean", "logprob_sum")
    }
    assert ref["logprob_sum"].abs().max() > 0  # candidates do change the answer's likelihood
    for batch_size in range(1, len(candidates) + 1):
        fast = score_candidates(lvlm, prefix, query, candidates, order, "infoscore", batch_size)
        _close(fast, ref["infoscore"])
    for metric in ("logprob_mean", "logprob_sum"):
        _close(score_candidates(lvlm, prefix, query, candidates, order, metric, 4), ref[metric])


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_order_changes_scores(tiny_dirs, samples, variant):
    """left and right put the candidate in different places, so the scores differ."""
    lvlm = _load(tiny_dirs, variant)
    prefix, query, candidates = samples[0:2], samples[2], samples[3:7]
    left = score_candidates(lvlm, prefix, query, candidates, "left", "logprob_sum")
    right = score_candidates(lvlm, prefix, query, candidates, "right", "logprob_sum")
    assert (left - right).abs().max() > 1e-3
