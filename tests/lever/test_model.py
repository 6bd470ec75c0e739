"""The Lever-LM network: sequence layout, loss, feature injection, overfitting a gt set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.lever_world import make_world

from leverlm.lever.model import IGNORE_INDEX, LeverLMConfig, LeverLMModel, build_sequences


def tiny_config(**kw) -> LeverLMConfig:
    base = dict(
        num_icds=20, n_layer=2, n_embd=32, n_head=4, n_positions=16, dropout=0.0, feature_dim=8
    )
    base.update(kw)
    return LeverLMConfig(**base)


def random_feats(B: int, T: int, D: int = 8, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    q = {m: torch.randn(B, D, generator=g) for m in ("image", "text")}
    icd = {m: torch.randn(B, T, D, generator=g) for m in ("image", "text")}
    return q, icd


def test_special_tokens_and_sequence_layout():
    cfg = tiny_config()
    assert (cfg.eos, cfg.bos, cfg.query, cfg.vocab_size) == (20, 21, 22, 23)
    tokens, targets = build_sequences([[3, 7], [5]], cfg)
    assert tokens.tolist() == [[21, 22, 3, 7], [21, 22, 5, 20]]
    # BOS -> QUERY is not predicted; every ICD and the final EOS are; padding is ignored
    assert targets.tolist() == [[IGNORE_INDEX, 3, 7, 20], [IGNORE_INDEX, 5, 20, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="position 20 out of range"):
        build_sequences([[20]], cfg)


@pytest.mark.parametrize("backbone", ["gpt2", "lstm"])
def test_loss_is_cross_entropy_over_predicted_positions_only(backbone):
    torch.manual_seed(0)
    cfg = tiny_config(backbone=backbone)
    model = LeverLMModel(cfg).eval()
    tokens, targets = build_sequences([[3, 7, 1], [5, 2]], cfg)
    q, icd = random_feats(2, tokens.shape[1])
    logits, loss = model(tokens, q, icd, targets)
    assert logits.shape == (2, 5, cfg.vocab_size)
    rows = [(0, 1, 3), (0, 2, 7), (0, 3, 1), (0, 4, 20), (1, 1, 5), (1, 2, 2), (1, 3, 20)]
    manual = torch.stack(
        [F.cross_entropy(logits[b, t][None], torch.tensor([y])) for b, t, y in rows]
    )
    torch.testing.assert_close(loss, manual.mean())
    # without targets: the last position's logits, equal to the teacher-forced ones
    last, none = model(tokens, q, icd)
    assert none is None and last.shape == (2, 1, cfg.vocab_size)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


@pytest.mark.parametrize("backbone", ["gpt2", "lstm"])
def test_features_enter_only_at_their_tokens(backbone):
    torch.manual_seed(0)
    cfg = tiny_config(backbone=backbone, query_features=("image",), icd_features=("text",))
    model = LeverLMModel(cfg).eval()
    tokens, targets = build_sequences([[3, 7], [5]], cfg)  # row 1 has a padding EOS at t=3
    q, icd = random_feats(2, tokens.shape[1])
    base, _ = model(tokens, q, icd, targets)

    def run(q2, icd2):
        return model(tokens, q2, icd2, targets)[0]

    # unused modalities and the rows of non-ICD tokens (BOS, QUERY, padding) change nothing
    q2 = {**q, "text": torch.randn(2, 8)}
    icd2 = {**icd, "image": torch.randn_like(icd["image"])}
    icd2["text"] = icd["text"].clone()
    icd2["text"][:, :2] = 100.0
    icd2["text"][1, 3] = 100.0
    torch.testing.assert_close(run(q2, icd2), base)
    # the query image and an ICD's text do change the prediction after them
    q3 = {**q, "image": q["image"] + 1.0}
    assert not torch.allclose(run(q3, icd)[:, 1:], base[:, 1:])
    icd3 = {m: t.clone() for m, t in icd.items()}
    icd3["text"][0, 2] += 1.0
    changed = run(q, icd3)
    torch.testing.assert_close(changed[0, :2], base[0, :2])  # causal: earlier positions equal
    assert not torch.allclose(changed[0, 2:], base[0, 2:])
    torch.testing.assert_close(changed[1], base[1])
    with pytest.raises(ValueError, match="missing \\['text'\\]"):
        model(tokens, q, {"image": icd["image"]}, targets)


def test_indices_only_model_needs_no_features():
    cfg = tiny_config(query_features=(), icd_features=())
    model = LeverLMModel(cfg)
    assert len(model.adapters) == 0
    tokens, targets = build_sequences([[1, 2]], cfg)
    _, loss = model(tokens, None, None, targets)
    assert torch.isfinite(loss)


def test_adapter_choices_and_normalisation():
    mlp = LeverLMModel(tiny_config(adapter=True)).adapters["image"].net
    assert isinstance(mlp, torch.nn.Sequential)
    lin = LeverLMModel(tiny_config(adapter=False)).adapters["image"].net
    assert isinstance(lin, torch.nn.Linear)
    same = LeverLMModel(tiny_config(adapter=False, feature_dim=32)).adapters["image"].net
    assert isinstance(same, torch.nn.Identity)
    normed = LeverLMModel(tiny_config(adapter=False, feature_dim=32, normalize=True)).adapters[
        "image"
    ]
    x = torch.randn(3, 32) * 5
    torch.testing.assert_close(normed(x).norm(dim=-1), torch.ones(3))
    assert normed(torch.zeros(2, 32)).abs().sum() == 0  # padding rows stay zero, no NaN


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="backbone"):
        tiny_config(backbone="rnn")
    with pytest.raises(ValueError, match="query_features"):
        tiny_config(query_features=("audio",))
    with pytest.raises(ValueError, match="n_head"):
        tiny_config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="unknown fields"):
        LeverLMConfig.from_dict({"num_icds": 3, "n_layers": 2})
    cfg = tiny_config()
    assert LeverLMConfig.from_dict(cfg.to_dict()) == cfg


def test_paper_size_parameter_count():
    # 2 layers, 512 wide, 8 heads, COCO's 118,287 supporting samples: ~67M parameters (tied head)
    cfg = LeverLMConfig(num_icds=118_287, feature_dim=512, query_features=(), icd_features=())
    n = LeverLMModel(cfg).num_params()
    assert 66e6 < n < 68e6, n


@pytest.mark.parametrize("backbone", ["gpt2", "lstm"])
def test_overfits_a_small_gt_set_and_reproduces_it(tmp_path, backbone):
    from leverlm.lever.data import LeverLMDataModule
    from leverlm.lever.decode import FeatureBank, greedy_decode, reference_decode

    w = make_world(tmp_path, num_icds=24, dim=8, num_anchors=8, shots=3, beams=1)
    dm = LeverLMDataModule(
        str(w.gt_dir), support_features=str(w.store_dir), batch_size=8, val_fraction=0.0
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape[0] == 8
    torch.manual_seed(0)
    cfg = tiny_config(num_icds=24, backbone=backbone, query_features=("image", "text"))
    model = LeverLMModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        _, loss = model(batch["tokens"], batch["query_feats"], batch["icd_feats"], batch["targets"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05
    model.eval()
    anchors = sorted(w.sequences)
    q = {m: torch.from_numpy(getattr(w, m)[anchors]) for m in ("image", "text")}
    bank = FeatureBank({"image": w.image, "text": w.text})
    expected = [w.sequences[a][0] for a in anchors]
    exclude = [[a] for a in anchors]
    assert greedy_decode(model, q, bank, 3, exclude=exclude).tolist() == expected
    assert reference_decode(model, q, bank, 3, exclude=exclude).tolist() == expected
    # the features are what tells the queries apart: shuffling them shuffles the answers
    perm = np.roll(np.arange(len(anchors)), 1)
    q_perm = {m: t[perm] for m, t in q.items()}
    got = greedy_decode(model, q_perm, bank, 3).tolist()
    assert got == [expected[i] for i in perm]


def test_feature_tied_head_is_refused_with_trainable_clip_and_named_in_config():
    from leverlm.lever.module import LeverLMModule

    with pytest.raises(ValueError, match="output_features needs frozen CLIP"):
        LeverLMModule(num_icds=10, clip_trainable=True, output_features=("image",))
    with pytest.raises(ValueError, match="output_features"):
        tiny_config(output_features=("depth",))
    cfg = tiny_config(output_features=("text",), query_features=(), icd_features=())
    assert LeverLMConfig.from_dict(cfg.to_dict()) == cfg
    # the head's keys are the only text weights: no unused input adapter is built
    model = LeverLMModel(cfg)
    assert set(model.output_keys) == {"text"} and len(model.adapters) == 0
