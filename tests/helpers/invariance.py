"""Checks that an LVLM's results do not depend on what shares a batch or what was cached."""

from __future__ import annotations

import torch

from leverlm.gt.scoring import score_candidates
from leverlm.lvlm.base import PromptImage

#: |alone - in a batch| bound on answer log-likelihoods (fp32). Vision features are bitwise
#: equal; the text forward of a batch pads every row to the longest and runs wider matrix
#: products, so a row's sums may differ in the last bits (~1e-7 relative) from the row alone.
TEXT_BATCH_TOL = 1e-5


def assert_features_batch_invariant(lvlm, samples, vision_batch_size: int = 1) -> None:
    """An image's features are bitwise the same alone, in a batch, after other images were
    cached, with ``vision_batch_size`` images per vision forward."""
    images = [PromptImage.of(s) for s in samples]
    assert len({im.image.size for im in images}) > 1  # several input shapes: several groups
    x, others = images[0], images[1:]
    before = lvlm.vision_batch_size
    lvlm.vision_batch_size = vision_batch_size
    try:
        lvlm.feature_cache.clear()
        alone = lvlm.image_features([x])[0]
        lvlm.feature_cache.clear()
        in_batch = lvlm.image_features([*others[:3], x, *others[3:]])[3]
        lvlm.feature_cache.clear()
        lvlm.image_features(others[::2])
        after = lvlm.image_features([*others[1::2], x])[-1]
    finally:
        lvlm.vision_batch_size = before
        lvlm.feature_cache.clear()
    assert torch.equal(alone, in_batch)
    assert torch.equal(alone, after)


def assert_scores_batch_invariant(lvlm, prefix, query, candidates, others, order: str) -> None:
    """A candidate's score is bitwise the same whatever was cached before (images, prefix KV),
    and within :data:`TEXT_BATCH_TOL` of its score alone."""
    k = len(candidates)

    def batch() -> torch.Tensor:
        return score_candidates(lvlm, prefix, query, candidates, order, "logprob_sum", k)

    lvlm.feature_cache.clear()
    lvlm.prefix_cache.clear()
    cold = batch()
    lvlm.feature_cache.clear()
    lvlm.prefix_cache.clear()
    # another query with the same prefix (its KV cached) and other candidates first
    score_candidates(lvlm, prefix, others[0], others[1:], order, "logprob_sum", 2)
    lvlm.image_features([PromptImage.of(s) for s in candidates[::2]])
    warm = batch()
    assert torch.equal(cold, warm)
    alone = torch.cat(
        [score_candidates(lvlm, prefix, query, [c], order, "logprob_sum") for c in candidates]
    )
    assert (alone - cold).abs().max().item() <= TEXT_BATCH_TOL, (alone, cold)
