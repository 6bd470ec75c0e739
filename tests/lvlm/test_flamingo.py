"""OpenFlamingo adapter on a tiny random checkpoint (open_clip ViT + Llama), plus its errors.

The folder (``flamingo.json`` + ``checkpoint.pt`` + ``clip/`` + ``lm/``) is built once and
loaded through ``load_lvlm``. Fast paths must equal the reference (``Flamingo.forward`` on raw
pixels, one prompt at a time) within 1e-4.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys

import pytest
import torch
from helpers.invariance import assert_features_batch_invariant, assert_scores_batch_invariant

from leverlm.gt.scoring import score_candidates, score_candidates_reference
from leverlm.lvlm import load_lvlm
from leverlm.lvlm.base import LVLMError
from leverlm.lvlm.tiny import build_tiny, synthetic_samples
from leverlm.tasks import get_task

TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny("flamingo", tmp_path_factory.mktemp("tiny") / "flamingo", seed=0)


@pytest.fixture(scope="module", params=["llama", "mpt"])
def lvlm(request, folder, tmp_path_factory):
    """The tiny Flamingo with a Llama LM, and with an MPT LM (ALiBi, no BOS) like the 9B's."""
    if request.param == "llama":
        return load_lvlm("flamingo", folder, get_task("vqa"))
    mpt = build_tiny("flamingo", tmp_path_factory.mktemp("tiny") / "flamingo-mpt", lm="mpt")
    lvlm = load_lvlm("flamingo", mpt, get_task("vqa"))
    assert type(lvlm.lm).__name__ == "MptForCausalLM" and lvlm.tok.bos_ids == []
    assert lvlm.max_length == 4096
    return lvlm


@pytest.fixture(scope="module")
def samples():
    return synthetic_samples(10, seed=5) + synthetic_samples(
        4, seed=6, image_size=(40, 72), key_prefix="other"
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max().item() < TOL, (a, b)


def test_prompt_format(lvlm, samples):
    enc = lvlm.encode(lvlm.build_prompt(samples[0:2], samples[2], with_answer=False))
    text = lvlm.tokenizer.decode(enc.input_ids)
    t = lvlm.task
    expected = (
        "".join(f"<image>{t.icd_text(s)}<|endofchunk|>{t.icd_join}" for s in samples[0:2])
        + f"<image>{t.query_text(samples[2])}"
    )
    assert text.replace("<s>", "").replace(" ", "") == expected.replace(" ", "")
    assert enc.input_ids.count(lvlm.media_token_id) == 3
    assert enc.input_ids.count(lvlm.eoc_token_id) == 2


def test_score_matches_reference_with_padding(lvlm, samples):
    icd_seqs = [samples[0:2], [], samples[2:5], samples[11:12]]
    queries = [samples[6], samples[7], samples[8], samples[13]]
    fast, ref = lvlm.score(icd_seqs, queries), lvlm.score_reference(icd_seqs, queries)
    _close(fast.sum_logprob, ref.sum_logprob)
    _close(fast.mean_logprob, ref.mean_logprob)
    assert torch.equal(fast.num_tokens, ref.num_tokens)
    for i in range(len(queries)):
        _close(lvlm.score([icd_seqs[i]], [queries[i]]).sum_logprob, fast.sum_logprob[i : i + 1])


@pytest.mark.parametrize("order", ["left", "right"])
def test_score_candidates_match_reference(lvlm, samples, order):
    prefix, query, candidates = [samples[0], samples[12]], samples[2], samples[3:6] + samples[10:12]
    ref = score_candidates_reference(lvlm, prefix, query, candidates, order, "logprob_sum")
    assert ref.abs().max() > 1e-3
    for batch_size in range(1, len(candidates) + 1):
        _close(
            score_candidates(lvlm, prefix, query, candidates, order, "logprob_sum", batch_size), ref
        )


@pytest.mark.parametrize("vision_batch_size", [1, 4])
def test_features_and_scores_are_batch_invariant(lvlm, samples, vision_batch_size):
    assert_features_batch_invariant(lvlm, samples[::2] + samples[11:], vision_batch_size)
    lvlm.vision_batch_size = vision_batch_size
    try:
        for order in ("left", "right"):
            prefix, query, candidates = [samples[0], samples[12]], samples[2], samples[3:7]
            assert_scores_batch_invariant(
                lvlm, prefix, query, candidates + samples[10:12], samples[7:10], order
            )
    finally:
        lvlm.vision_batch_size = 1


def test_images_reach_the_model(lvlm, samples):
    query, icd = samples[6], samples[0]
    swapped = dict(icd, image=samples[9]["image"])
    a, b = lvlm.score([[icd]], [query]), lvlm.score([[swapped]], [query])
    assert abs(a.sum_logprob.item() - b.sum_logprob.item()) > 1e-4
    swapped_query = dict(query, image=samples[8]["image"])
    c = lvlm.score([[icd]], [swapped_query])
    assert abs(a.sum_logprob.item() - c.sum_logprob.item()) > 1e-4


def test_generate(lvlm, samples):
    icd_seqs, queries = [samples[0:2], [], samples[11:12]], [samples[3], samples[4], samples[13]]
    out = lvlm.generate(icd_seqs, queries, max_new_tokens=4, num_beams=2)
    assert len(out) == 3 and all(isinstance(s, str) and "\n" not in s for s in out)
    assert all(lvlm.task.postprocess(s) == s for s in out)
    assert lvlm.generate(icd_seqs, queries, max_new_tokens=4, num_beams=2) == out
    # one row, no padding: transformers 5 drops the all-ones mask (needs the patched LM)
    assert len(lvlm.generate([samples[0:1]], [samples[5]], max_new_tokens=3, num_beams=1)) == 1


def test_folder_errors(folder, tmp_path):
    bad = tmp_path / "nospec"
    shutil.copytree(folder, bad)
    spec = json.loads((bad / "flamingo.json").read_text())
    del spec["lang_encoder_path"]
    (bad / "flamingo.json").write_text(json.dumps(spec))
    with pytest.raises(LVLMError, match="lang_encoder_path"):
        load_lvlm("flamingo", bad, "vqa")
    (bad / "flamingo.json").write_text(json.dumps({**spec, "lang_encoder_path": "lm", "bogus": 1}))
    with pytest.raises(LVLMError, match="bogus"):
        load_lvlm("flamingo", bad, "vqa")
    # a checkpoint without the perceiver's trained weights
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("perceiver.")}, bad / "part.pt")
    (bad / "flamingo.json").write_text(json.dumps({**spec, "lang_encoder_path": "lm"}))
    with pytest.raises(LVLMError, match="part.pt.*misses trained weights"):
        load_lvlm("flamingo", bad, "vqa", checkpoint="part.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LVLMError, match="empty"):
        load_lvlm("flamingo", empty, "vqa")


def test_missing_open_flamingo_names_the_install_command(folder, monkeypatch):
    # None in sys.modules makes "import open_flamingo" raise ImportError.
    monkeypatch.setitem(sys.modules, "open_flamingo", None)
    monkeypatch.delitem(sys.modules, "leverlm.lvlm.flamingo")
    flamingo = importlib.import_module("leverlm.lvlm.flamingo")  # imports without it

    with pytest.raises(LVLMError, match="pip install --no-deps open-flamingo==2.0.1"):
        flamingo.require_open_flamingo()
    with pytest.raises(LVLMError, match="open_flamingo"):
        load_lvlm("flamingo", folder, "vqa")
    with pytest.raises(ImportError):  # what callers skipping optional types catch
        load_lvlm("flamingo", folder, "vqa")
