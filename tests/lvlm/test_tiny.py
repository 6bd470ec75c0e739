"""Tiny model builders: local tokenizers, deterministic folders, the CLI."""

from __future__ import annotations

import pytest

from leverlm.lvlm.tiny import (
    TINY_CORPUS,
    build_tiny,
    llama_tokenizer,
    main,
    synthetic_samples,
    tiny_model_types,
    train_bpe,
)
from leverlm.tasks import get_task
from leverlm.utils import sha256_file


@pytest.mark.parametrize("style", ["metaspace", "byte_level"])
def test_train_bpe_is_deterministic_and_ordered(style):
    specials = ("<unk>", "<s>", "</s>")
    a = train_bpe(TINY_CORPUS, 300, style=style, special_tokens=specials)
    b = train_bpe(TINY_CORPUS, 300, style=style, special_tokens=specials)
    assert a == b
    vocab, merges = a
    assert [vocab[t] for t in specials] == [0, 1, 2]
    assert sorted(vocab.values()) == list(range(len(vocab)))  # dense ids
    assert merges and all(len(m) == 2 for m in merges)
    with pytest.raises(ValueError, match="unknown BPE style 'wordpiece'"):
        train_bpe(TINY_CORPUS, 300, style="wordpiece")


def test_llama_tokenizer_round_trips_any_text():
    tok = llama_tokenizer(("<fake_token_around_image>", "<image>"))
    assert tok.convert_tokens_to_ids("<s>") == 1 and tok.pad_token == "<unk>"
    base = len(tok) - 2
    assert tok.convert_tokens_to_ids("<image>") == base + 1  # additional vocab after the base
    for text in ["Question:What color is the shape? Short answer:red", "naïve café 123\n\tok"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids  # byte fallback: nothing is unknown
        assert tok.decode(ids) == text


def test_build_tiny_idefics_is_deterministic(tmp_path):
    a = build_tiny("idefics", tmp_path / "a", seed=1)
    b = build_tiny("idefics", tmp_path / "b", seed=1)
    c = build_tiny("idefics", tmp_path / "c", seed=2)
    weights = [sha256_file(p / "model.safetensors") for p in (a, b, c)]
    assert weights[0] == weights[1] != weights[2]
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_build_tiny_errors(tmp_path):
    assert {"idefics", "idefics2", "qwen2_vl", "flamingo"} <= set(tiny_model_types())
    with pytest.raises(ValueError, match="unknown model_type 'llava'.*idefics"):
        build_tiny("llava", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown tiny size 'huge'"):
        build_tiny("idefics", tmp_path / "x", size="huge")
    assert not (tmp_path / "x").exists()


def test_cli_writes_a_loadable_folder(tmp_path, capsys):
    from leverlm.lvlm import load_lvlm

    assert main(["idefics", str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert str(tmp_path / "cli") in capsys.readouterr().out
    lvlm = load_lvlm("idefics", tmp_path / "cli", "vqa")
    assert lvlm.model.config.use_resampler


def test_synthetic_samples_fit_every_task():
    a, b = synthetic_samples(20, seed=5), synthetic_samples(20, seed=5)
    assert [s["__key__"] for s in a] == [s["__key__"] for s in b]
    assert [s["image"].tobytes() for s in a] == [s["image"].tobytes() for s in b]
    assert len({s["__key__"] for s in a}) == 20 and [s["position"] for s in a] == list(range(20))
    for name in ("vqa", "vqa_idefics", "caption"):
        task = get_task(name)
        for s in a:
            assert task.query_text(s) + task.query_answer_text(s) == task.icd_text(s)
    assert len({s["answer"] for s in a}) > 3
