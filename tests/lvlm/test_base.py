"""Pure helpers of the LVLM protocol: padding, masks, answer log-probs, caches, registry."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT
from PIL import Image

from leverlm.lvlm import LVLMError, known_model_types, load_lvlm, register_lvlm
from leverlm.lvlm.base import (
    LRU,
    LVLM,
    LVLMSpec,
    PromptImage,
    ScoreResult,
    _merge_text,
    answer_token_logprobs,
    expand_kv_cache,
    full_logits_token_logprobs,
    pad_left,
    pad_right,
    resolve_dtype,
    span_mask,
)
from leverlm.tasks import get_task


def _loop_pad(seqs, pad, left):
    width = max(len(s) for s in seqs)
    ids, mask = [], []
    for s in seqs:
        fill = [pad] * (width - len(s))
        ids.append(fill + list(s) if left else list(s) + fill)
        m = [0] * (width - len(s))
        mask.append(m + [1] * len(s) if left else [1] * len(s) + m)
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("left", [False, True])
def test_padding_matches_loop_reference(left):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 50, (int(n),), generator=g).tolist() for n in [3, 7, 1, 7, 5]]
    ids, mask = (pad_left if left else pad_right)(seqs, 0)
    ref_ids, ref_mask = _loop_pad(seqs, 0, left)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


def test_span_mask_matches_loop():
    starts, ends = torch.tensor([0, 2, 5, 3]), torch.tensor([3, 6, 5, 8])
    got = span_mask(starts, ends, 8)
    ref = torch.tensor([[s <= t < e for t in range(8)] for s, e in zip(starts, ends)])
    assert torch.equal(got, ref)


def test_score_result_ignores_padding():
    lp = torch.tensor([[0.0, -1.0, -3.0, float("-inf")], [0.0, 0.0, -2.0, -4.0]])
    mask = torch.tensor([[False, True, True, False], [False, False, True, True]])
    r = ScoreResult.from_token_logprobs(lp, mask)
    assert torch.allclose(r.sum_logprob, torch.tensor([-4.0, -6.0]))
    assert torch.allclose(r.mean_logprob, torch.tensor([-2.0, -3.0]))
    assert torch.equal(r.num_tokens, torch.tensor([2, 2]))
    assert torch.allclose(r.prob, torch.exp(torch.tensor([-2.0, -3.0])))
    both = ScoreResult.cat([r, r])
    assert len(both) == 4 and torch.equal(both.num_tokens, torch.tensor([2, 2, 2, 2]))
    assert len(ScoreResult.cat([])) == 0


def test_answer_logprobs_equal_full_vocab_reference():
    g = torch.Generator().manual_seed(1)
    b, t, h, v = 3, 9, 16, 40
    hidden = torch.randn(b, t, h, generator=g)
    head = torch.nn.Linear(h, v, bias=False)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = span_mask(torch.tensor([4, 6, 1]), torch.tensor([9, 7, 5]), t)
    fast = answer_token_logprobs(hidden, ids, mask, head)
    for i in range(b):  # reference: full logits for the whole sequence, one row at a time
        ref = full_logits_token_logprobs(head(hidden[i]), ids[i])
        assert torch.allclose(fast[i][mask[i]], ref[mask[i]], atol=1e-6)
        assert (fast[i][~mask[i]] == 0).all()
    with pytest.raises(LVLMError, match="position 0"):
        answer_token_logprobs(hidden, ids, span_mask(torch.tensor([0]), torch.tensor([2]), t), head)


def test_lru_evicts_the_least_recent():
    cache = LRU(capacity=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a becomes most recent
    cache.put("c", 3)  # evicts b
    assert cache.get("b") is None and len(cache) == 2
    assert cache.cached("b", lambda: 20) == 20  # computed and kept: evicts a
    assert cache.get("a", "gone") == "gone" and cache.get("c") == 3
    assert cache.cached("c", lambda: 99) == 3  # a hit computes nothing
    assert (cache.hits, cache.misses) == (3, 3)
    off = LRU(capacity=0)
    off.put("x", 1)
    assert len(off) == 0 and off.cached("x", lambda: 2) == 2 and len(off) == 0
    with pytest.raises(LVLMError, match="capacity must be >= 0"):
        LRU(-1)


class _Vision(LVLM):
    """An LVLM with only a vision tower: records each vision forward's images."""

    def __init__(self, **kwargs):
        tok = SimpleNamespace(pad_token_id=0, eos_token_id=1, bos_token_id=None)
        super().__init__(torch.nn.Linear(1, 1), tok, get_task("vqa"), **kwargs)
        self.batches = []

    def vision_features(self, images):
        self.batches.append([im.key for im in images])
        return [torch.full((2,), float(im.key[1:])) for im in images]

    def hidden_states(self, span):
        raise NotImplementedError

    def reference_logits(self, enc):
        raise NotImplementedError

    def generate_inputs(self, ids, encs, reference=False):
        raise NotImplementedError


def test_image_features_dedup_cache_and_canonical_batches():
    small = [PromptImage(f"k{i}", Image.new("RGB", (4, 4), (i, 0, 0))) for i in range(5)]
    wide = [PromptImage(f"k{i}", Image.new("RGB", (8, 4), (i, 0, 0))) for i in range(5, 7)]
    lvlm = _Vision(vision_batch_size=3, image_cache_size=8)
    out = lvlm.image_features([small[0], wide[0], small[1], small[0], small[2], small[3]])
    assert [float(o[0]) for o in out] == [0.0, 5.0, 1.0, 0.0, 2.0, 3.0]
    # one size per forward, always 3 images: short batches padded with their last image
    assert lvlm.batches == [["k0", "k1", "k2"], ["k3", "k3", "k3"], ["k5", "k5", "k5"]]
    lvlm.batches.clear()
    lvlm.image_features([small[1], small[4], wide[1], wide[0]])  # only k4 and k6 are new
    assert lvlm.batches == [["k4", "k4", "k4"], ["k6", "k6", "k6"]]
    assert lvlm.feature_cache.hits == 2 and lvlm.feature_cache.misses == 7
    assert all(f._base is None for f in lvlm.feature_cache._data.values())  # not batch views
    alone = _Vision(image_cache_size=0)
    alone.image_features(small[:2])
    alone.image_features(small[:1])
    assert alone.batches == [["k0"], ["k1"], ["k0"]] and len(alone.feature_cache) == 0
    with pytest.raises(LVLMError, match="vision_batch_size must be >= 1"):
        _Vision(vision_batch_size=0)


def test_image_identity_uses_pixels_not_only_key():
    a = PromptImage("same", Image.new("RGB", (4, 4), (1, 2, 3)))
    b = PromptImage("same", Image.new("RGB", (4, 4), (1, 2, 4)))
    c = PromptImage("same", Image.new("RGB", (4, 4), (1, 2, 3)))
    assert a.ident != b.ident and a.ident == c.ident


def test_merge_text_joins_adjacent_text():
    img = PromptImage("k", Image.new("RGB", (2, 2)))
    assert _merge_text(["a", "", "b", img, "c", "\n", img, "d"]) == ["ab", img, "c\n", img, "d"]


def test_expand_kv_cache_is_fresh_per_call():
    kv = [(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)) for _ in range(2)]
    first, second = expand_kv_cache(kv, 5), expand_kv_cache(kv, 5)
    first.update(torch.zeros(5, 2, 1, 4), torch.zeros(5, 2, 1, 4), 0)
    assert first.get_seq_length(0) == 4 and second.get_seq_length(0) == 3
    assert torch.equal(second.layers[1].keys[4], kv[1][0][0])


def test_registry_and_errors(tmp_path):
    types = known_model_types()
    assert {"idefics", "idefics2", "idefics3", "qwen2_vl", "qwen2_5_vl", "flamingo"} <= set(types)
    with pytest.raises(LVLMError, match="unknown model_type 'gpt5'.*flamingo, idefics"):
        load_lvlm("gpt5", tmp_path, "vqa")
    with pytest.raises(LVLMError, match="module:function"):
        register_lvlm("x", "no_colon")
    register_lvlm("test_fake", "leverlm.tasks:get_task")
    assert "test_fake" in known_model_types()
    with pytest.raises(LVLMError, match="has no weights"):
        load_lvlm("test_fake", tmp_path, "vqa")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp32") is torch.float32
    with pytest.raises(LVLMError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def test_import_is_light():
    code = "import sys, leverlm, leverlm.lvlm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_conf_lvlm_fragments_are_load_lvlm_arguments(tmp_path):
    import inspect

    from omegaconf import OmegaConf

    from leverlm.tasks import get_task

    folder = ROOT / "conf" / "lvlm"
    files = sorted(folder.glob("*.yaml"))
    assert files
    params = set(inspect.signature(load_lvlm).parameters) - {"kwargs"}
    for f in files:
        cfg = OmegaConf.to_container(OmegaConf.load(f))
        assert set(cfg) <= params, f"{f.name}: {sorted(set(cfg) - params)}"
        assert cfg["model_type"] in known_model_types(), f.name
        resolve_dtype(cfg["dtype"])
        spec = LVLMSpec.from_dict(cfg)  # fragments are specs
        assert spec.model_type == cfg["model_type"]
    demo = LVLMSpec.from_dict(OmegaConf.to_container(OmegaConf.load(folder / "demo-idefics3.yaml")))
    assert demo.check().load(get_task("vqa")).task.name == "vqa"


def test_lvlm_spec_checks_each_field_and_loads(tmp_path, monkeypatch):
    import leverlm.lvlm
    from leverlm.lvlm.idefics import IdeficsLVLM
    from leverlm.lvlm.tiny import build_tiny

    assert leverlm.lvlm.LVLMSpec is LVLMSpec  # exported by the package
    # the loader this test registers must not outlive it
    monkeypatch.setattr(leverlm.lvlm.base, "_LOADERS", dict(leverlm.lvlm.base._LOADERS))
    build_tiny("idefics", tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    spec = LVLMSpec("idefics", "tiny", kwargs={"vision_batch_size": 2})
    checked = spec.check()
    assert checked.path == str(tmp_path / "tiny") and checked.kwargs == spec.kwargs
    with pytest.raises(LVLMError, match=r"unknown LVLM setting\(s\) \['pth'\]; known: model_type"):
        LVLMSpec.from_dict({"model_type": "idefics", "pth": "x"})
    bad = {
        "model_type='gpt5'; known: .*flamingo, idefics": dict(model_type="gpt5"),
        "loader='nocolon' must be 'module:function'": dict(loader="nocolon"),
        "dtype: unknown dtype 'int3'": dict(dtype="int3"),
        "path: checkpoint .* holds a 'idefics' model, not model_type='idefics3'": dict(
            model_type="idefics3"
        ),
        "path is empty": dict(path=""),
        "path: checkpoint folder .*missing' does not exist": dict(path="missing"),
        "image_cache_size must be >= 0": dict(image_cache_size=-1),
    }
    for message, change in bad.items():
        with pytest.raises(LVLMError, match=message):
            LVLMSpec.from_dict({**vars(spec), **change}).check()
    lvlm = checked.load("vqa", device="cpu")
    assert isinstance(lvlm, IdeficsLVLM) and lvlm.vision_batch_size == 2
    assert lvlm.feature_cache.capacity == 4096 and lvlm.task.name == "vqa"
    custom = LVLMSpec("custom", checked.path, loader="leverlm.lvlm.hf_interleaved:load")
    with pytest.raises(LVLMError, match="cannot load model_type 'custom'"):
        custom.check().load("vqa")  # registered first: the loader itself refuses the type
    assert "custom" in known_model_types()
