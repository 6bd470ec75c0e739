"""The demo world's trained models: training code (units, parity, resume, CLI smoke run) and
the committed models loaded through the normal encoder/adapter paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.easyvqa import easyvqa_sample, easyvqa_samples

from leverlm.data.prep.easyvqa import prep_easyvqa
from leverlm.demo import ASSET_DIR, clip_checkpoint, lvlm_dir
from leverlm.encoders.clip import TINY_CLIP
from leverlm.tasks import EASYVQA_ANSWERS, NONCE_WORDS, NonceAnswers, get_task
from tools.demo_models import LVLM_TYPE, TASK
from tools.demo_models import common as common_mod
from tools.demo_models.cli import main
from tools.demo_models.clip import (
    COLORS,
    FULL_CAPTIONS,
    SHAPES,
    caption_aware_loss,
    retrieval_metrics,
)
from tools.demo_models.data import DemoModelsError, draw_icds, load_vqa
from tools.demo_models.lvlm import (
    EpisodeBatcher,
    LVLMArch,
    LVLMTrainConfig,
    _pixels_of,
    answer_token_ids,
    build_model,
    forward_logits,
    train_lvlm,
)

# End-to-end runs of a job (subprocesses, DDP, kills): not in `make test-fast`.
pytestmark = pytest.mark.slow

# A very small demo LVLM: the code paths of the real one in milliseconds.
SMALL = LVLMArch(
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate=64,
    hidden=32,
    layers=1,
    heads=2,
    intermediate=64,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Small seeded subsets of the real easy-vqa collections (train and test)."""
    root = tmp_path_factory.mktemp("easyvqa")
    prep_easyvqa(root, limit=160, progress=False)
    return root


@pytest.fixture(scope="module")
def train_data(data_dir):
    return load_vqa(data_dir / "easyvqa-vqa-train")


@pytest.fixture(scope="module")
def small(train_data):
    """``(model, adapter, batcher)`` of an untrained small demo LVLM."""
    from leverlm.lvlm.hf_interleaved import Idefics3LVLM

    model, processor = build_model(SMALL, [f["question"] for f in train_data.fields], seed=0)
    lvlm = Idefics3LVLM(model, processor, get_task(TASK))
    pixels, rows = _pixels_of(processor, train_data)
    return model, lvlm, EpisodeBatcher(lvlm, train_data, pixels, rows)


# --------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------


def test_caption_aware_loss_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(10, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    labels = torch.tensor([0, 0, 1, 3, 3, 3, 1, 4, 0, 1])  # duplicates; caption 2 absent
    scale = torch.tensor(7.0)
    got = caption_aware_loss(img, txt, labels, scale)
    i2t = [-torch.log_softmax(scale * txt @ img[i], 0)[labels[i]] for i in range(10)]
    t2i = []
    for c in sorted(set(labels.tolist())):
        logp = torch.log_softmax(scale * img @ txt[c], 0)
        t2i.append(-torch.stack([logp[i] for i in range(10) if labels[i] == c]).mean())
    want = 0.5 * (torch.stack(i2t).mean() + torch.stack(t2i).mean())
    torch.testing.assert_close(got, want)


def test_retrieval_metrics_read_colour_and_shape_off_the_top_caption() -> None:
    txt = torch.eye(len(FULL_CAPTIONS))
    labels = np.arange(len(FULL_CAPTIONS))
    exact = retrieval_metrics(txt.clone(), labels, txt)
    assert exact["image_to_caption_top1"] == 1.0 and exact[
        "caption_to_image_p_at_10"
    ] == pytest.approx(0.1)
    # every image nearest to the caption with its colour but the next shape
    n_shapes = len(SHAPES)
    shifted = [(c // n_shapes) * n_shapes + (c + 1) % n_shapes for c in labels]
    wrong_shape = retrieval_metrics(txt[shifted], labels, txt)
    assert wrong_shape["image_to_caption_top1"] == 0.0
    assert wrong_shape["color_from_top1"] == 1.0 and wrong_shape["shape_from_top1"] == 0.0
    assert FULL_CAPTIONS[0] == f"a {COLORS[0]} {SHAPES[0]}"


def test_lr_schedule() -> None:
    f = [common_mod.lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert common_mod.lr_factor(100, 100, 10) == pytest.approx(0.1)


def test_draw_icds_oracle_and_exclusions(train_data) -> None:
    query = 0
    image = int(train_data.image_ids[query])
    answer = train_data.fields[query]["answer"]
    for seed in range(20):
        icds = draw_icds(
            train_data,
            np.random.default_rng(seed),
            3,
            match_answer=answer,
            exclude_image=image,
            exclude_position=query,
        )
        assert len(icds) == 3 and query not in icds
        assert all(int(train_data.image_ids[p]) != image for p in icds)
        assert any(train_data.fields[p]["answer"] == answer for p in icds)
    a = draw_icds(train_data, np.random.default_rng(1), 4)
    assert a == draw_icds(train_data, np.random.default_rng(1), 4)
    with pytest.raises(DemoModelsError, match="'maybe'"):
        draw_icds(train_data, np.random.default_rng(0), 2, match_answer="maybe")


def test_tokenizer_keeps_every_answer_word_whole(small) -> None:
    _, lvlm, _ = small
    nonce = answer_token_ids(lvlm, NONCE_WORDS)
    real = answer_token_ids(lvlm, EASYVQA_ANSWERS)
    assert len(set(nonce + real)) == len(NONCE_WORDS) + len(EASYVQA_ANSWERS)
    assert [lvlm.tokenizer.decode([i]) for i in nonce] == list(NONCE_WORDS)


def test_episode_tokens_and_loss_weights(small, train_data) -> None:
    _, lvlm, batcher = small
    shots = 3
    rng = np.random.default_rng(0)
    eps = [batcher.episode(rng, shots, True, f"e{i}") for i in range(4)]
    batch = batcher.collate(eps)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    targets = ids[:, 1:]
    w = batcher.weights(targets, attn[:, 1:], 0.1)
    # weight 1 exactly at the shots + 1 answers of each episode, the query's answer last
    assert ((w == 1.0).sum(1) == shots + 1).all()
    for b, (ep_ids, _, start) in enumerate(eps):
        assert w[b, start - 1] == 1.0 and len(ep_ids) == start + 1
    image_targets = torch.isin(targets, torch.tensor(lvlm.tokenizer.all_special_ids))
    assert (w[image_targets] == 0).all() and (w[attn[:, 1:] == 0] == 0).all()
    assert ((w > 0) & (w < 1)).any()
    # images: shots + 1 per episode, each distinct one gathered once
    assert len(batch["image_index"]) == 4 * (shots + 1)
    assert batch["pixels"].shape[0] == len(set(batch["image_index"].tolist()))
    # evaluation episodes (episode id None) are remapped by the query's own key
    q_rng = np.random.default_rng(5)
    ids0, _, start0 = batcher.episode(q_rng, 0, False, None, query_pos=7)
    word = NonceAnswers().mapping(train_data.keys[7])[train_data.fields[7]["answer"]]
    assert lvlm.tokenizer.decode(ids0[start0:]) == word
    plain, _, pstart = batcher.episode(q_rng, 1, False, None, query_pos=7, plain=True)
    assert lvlm.tokenizer.decode(plain[pstart:]) == train_data.fields[7]["answer"]


def test_training_forward_matches_the_models_own_forward(small) -> None:
    model, lvlm, batcher = small
    model.eval()
    rng = np.random.default_rng(3)
    eps = [batcher.episode(rng, s, False, f"p{s}") for s in (2, 0, 1)]  # ragged: padding
    batch = batcher.collate(eps)
    with torch.no_grad():
        fast = forward_logits(model, batch, batcher.image_token_id)
        for b, (ids, images, _) in enumerate(eps):
            # reference: the model's plain forward on this episode's raw pixel rows, batch 1
            pix = torch.stack([batcher.pixels[row] for _, row in images])[None]
            ref = model(input_ids=torch.tensor([ids]), pixel_values=pix).logits[0]
            torch.testing.assert_close(fast[b, : len(ids)], ref, atol=1e-5, rtol=1e-5)


def test_training_resumes_exactly(train_data, tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file

    config = LVLMTrainConfig(
        steps=4, tokens_per_step=300, warmup=1, checkpoint_every=2, val_every=0, max_shots=2
    )
    straight = train_lvlm(train_data, train_data, tmp_path / "a", tmp_path / "wa", config, SMALL)
    assert straight["config"]["train"]["steps"] == 4

    real = common_mod.lr_factor

    def crash_at_3(step: int, *args: object, **kw: object) -> float:
        if step == 3:
            raise KeyboardInterrupt("killed")
        return real(step, *args, **kw)

    monkeypatch.setattr(common_mod, "lr_factor", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_lvlm(train_data, train_data, tmp_path / "b", tmp_path / "wb", config, SMALL)
    assert (tmp_path / "wb" / "lvlm.ckpt").is_file() and not (tmp_path / "b").exists()
    monkeypatch.setattr(common_mod, "lr_factor", real)
    train_lvlm(train_data, train_data, tmp_path / "b", tmp_path / "wb", config, SMALL)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_smoke_all(data_dir, tmp_path) -> None:
    from leverlm.encoders.clip import load_clip
    from leverlm.lvlm import load_lvlm

    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["all", "--out", str(out), "--data", str(data_dir), "--work", str(work)]
    argv += ["--steps", "3", "--eval_queries", "4", "--val_episodes", "4", "--threads", "1"]
    assert main(argv) == 0
    clip = load_clip(TINY_CLIP, str(clip_checkpoint(out)))
    assert clip.encode_texts(["a red circle"]).shape == (1, clip.dim)
    metrics = json.loads((clip_checkpoint(out).parent / "metrics.json").read_text())
    assert 0 <= metrics["test"]["image_to_caption_top1"] <= 1 and metrics["config"]["steps"] == 3
    lvlm = load_lvlm(LVLM_TYPE, lvlm_dir(out), task=get_task(TASK))
    samples = easyvqa_samples(2)
    assert len(lvlm.generate([samples[1:]], samples[:1], num_beams=1)) == 1
    evaluation = json.loads((lvlm_dir(out) / "evaluation.json").read_text())
    assert set(evaluation["accuracy"]) == {"zero_shot", "random_2", "oracle_2"}
    assert all(0 <= v <= 100 for v in evaluation["accuracy"].values())
    training = json.loads((lvlm_dir(out) / "training.json").read_text())
    assert training["config"]["train"]["steps"] == 3 and "python -m" in training["command"]


def test_cli_bad_input_fails_before_training(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "nodata"
    assert main(["lvlm", "--out", str(out), "--data", str(missing)]) == 1
    err = capsys.readouterr().err
    assert str(missing / "easyvqa-vqa-train") in err and "leverlm prep easyvqa" in err
    assert not out.exists()
    assert main(["clip", "--out", str(out), "--steps", "0"]) == 1
    assert "--steps" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the committed models
# --------------------------------------------------------------------------------------------


def test_committed_models_are_small() -> None:
    files = [p for p in ASSET_DIR.rglob("*") if p.is_file()]
    assert clip_checkpoint() in files and (lvlm_dir() / "model.safetensors") in files
    assert sum(p.stat().st_size for p in files) < 20 * 2**20


def test_committed_clip_matches_images_to_their_captions() -> None:
    import easy_vqa
    from PIL import Image

    from leverlm.encoders.clip import load_clip

    clip = load_clip(TINY_CLIP, str(clip_checkpoint()), normalize=True)
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    # images whose colour and shape the "what color/what shape" questions state
    truth: dict[int, dict[str, str]] = {}
    for q, a, i in zip(questions, answers, image_ids):
        if q.startswith("what color is the") and q.split()[-1].rstrip("?") in SHAPES:
            truth.setdefault(i, {})["caption"] = f"a {a} {q.split()[-1].rstrip('?')}"
    picked = sorted(truth)[:48]
    with torch.inference_mode():
        img = clip.encode_images([Image.open(paths[i]).convert("RGB") for i in picked])
        txt = clip.encode_texts(list(FULL_CAPTIONS))
    top1 = [FULL_CAPTIONS[j] for j in (img @ txt.T).argmax(1).tolist()]
    accuracy = np.mean([t == truth[i]["caption"] for t, i in zip(top1, picked)])
    assert accuracy >= 0.75


def test_committed_lvlm_answers_from_its_demonstrations() -> None:
    import easy_vqa

    from leverlm.lvlm import load_lvlm

    lvlm = load_lvlm(LVLM_TYPE, lvlm_dir(), task=get_task(TASK))
    queries = easyvqa_samples(24)
    # demonstrations: later test questions (other images), one with the query's answer
    _, answers, image_ids = easy_vqa.get_test_questions()
    pool = range(5000, len(answers))
    rng = np.random.default_rng(0)
    oracle = []
    for q in queries:
        same = [i for i in pool if answers[i] == q["answer"] and image_ids[i] != q["image_id"]]
        picks = [same[int(rng.integers(len(same)))], int(rng.integers(5000, len(answers)))]
        oracle.append([easyvqa_sample(i) for i in picks])
    p_zero = lvlm.score([[] for _ in queries], queries).prob
    p_oracle = lvlm.score(oracle, queries).prob
    assert float(p_zero.mean()) < 0.2  # a guess among the nonce words
    assert float(p_oracle.mean()) > float(p_zero.mean()) + 0.25
    answers = lvlm.generate(oracle, queries)
    words = [get_task(TASK).episode([], q)[1]["answer"] for q in queries]
    assert np.mean([a == w for a, w in zip(answers, words)]) >= 0.5
