"""The Lever-LM network: sequence layout, loss, feature injection, overfitting a gt set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.lever_world import make_world

from leverlm.lever import LeverLMError
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


# ------------------------------------------------------------------ the authors' settings


def test_adapter_activation_width_and_where_normalisation_happens():
    """Authors: Linear(D, 4C) -> ReLU -> Linear(4C, C), then L2 norm; ours by default GELU and
    the norm before the adapter."""
    ours = LeverLMModel(tiny_config(adapter=True, normalize=True)).adapters["image"]
    layers = [type(m) for m in ours.net]
    assert layers == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    authors = LeverLMModel(
        tiny_config(normalize=True, adapter_activation="relu", normalize_at="after_adapter")
    ).adapters["image"]
    first, act, last = authors.net
    assert isinstance(act, torch.nn.ReLU)
    assert (first.in_features, first.out_features, last.out_features) == (8, 4 * 32, 32)
    x = torch.randn(5, 8) * 3
    torch.testing.assert_close(authors(x), F.normalize(last(torch.relu(first(x))), dim=-1))
    torch.testing.assert_close(ours(x), ours.net(F.normalize(x, dim=-1)))
    wide = LeverLMModel(tiny_config(adapter_hidden=7)).adapters["text"].net
    assert (wide[0].out_features, wide[2].in_features) == (7, 7)
    # adapter off, dims equal (the authors' VQA setting): the normalised feature itself
    plain = LeverLMModel(
        tiny_config(adapter=False, feature_dim=32, normalize=True, normalize_at="after_adapter")
    ).adapters["image"]
    x = torch.randn(4, 32)
    torch.testing.assert_close(plain(x), F.normalize(x, dim=-1))


def test_authors_lstm_shapes_and_untied_head():
    """Embedding 128, LSTM 128 x 2 layers with dropout 0.1, head 128 -> 128 -> V untied; no
    input dropout, no final LayerNorm."""
    cfg = tiny_config(
        backbone="lstm", lstm_variant="authors", n_embd=128, dropout=0.1, adapter_hidden=128,
        adapter_activation="relu",
    )  # fmt: skip
    model = LeverLMModel(cfg).eval()
    V = cfg.vocab_size
    assert model.embedding.weight.shape == (V, 128)
    lstm = model.lstm
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.dropout) == (128, 128, 2, 0.1)
    head = model.lm_head
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert head[0].weight.shape == (128, 128) and head[2].weight.shape == (V, 128)
    assert head[2].weight.data_ptr() != model.embedding.weight.data_ptr()
    assert not hasattr(model, "ln_f") and not hasattr(model, "drop")
    adapter = model.adapters["image"].net
    assert (adapter[0].in_features, adapter[0].out_features, adapter[2].out_features) == (
        8,
        128,
        128,
    )
    tokens, _ = build_sequences([[3, 7]], cfg)
    q, icd = random_feats(1, tokens.shape[1])
    logits, _ = model(tokens, q, icd, torch.full_like(tokens, IGNORE_INDEX))
    x = model.embed(tokens, q, icd)
    torch.testing.assert_close(logits, head(lstm(x)[0]))
    # our LSTM keeps its tied head, input dropout and LayerNorm
    ours = LeverLMModel(tiny_config(backbone="lstm"))
    assert ours.lm_head.weight is ours.embedding.weight and hasattr(ours, "ln_f")


@pytest.mark.parametrize("backbone", ["gpt2", "lstm"])
def test_predict_query_token_adds_bos_to_query_to_the_loss(backbone):
    torch.manual_seed(0)
    cfg = tiny_config(backbone=backbone, predict_query_token=True, lstm_variant="authors")
    model = LeverLMModel(cfg).eval()
    tokens, targets = build_sequences([[3, 7], [5, 1]], cfg)
    q, icd = random_feats(2, tokens.shape[1])
    logits, loss = model(tokens, q, icd, targets)
    rows = [(b, 0, cfg.query) for b in range(2)] + [(0, 1, 3), (0, 2, 7), (0, 3, 20)]
    rows += [(1, 1, 5), (1, 2, 1), (1, 3, 20)]
    manual = [F.cross_entropy(logits[b, t][None], torch.tensor([y])) for b, t, y in rows]
    torch.testing.assert_close(loss, torch.stack(manual).mean())
    assert targets[:, 0].eq(IGNORE_INDEX).all()  # the caller's targets are left alone


def test_new_options_are_validated_and_old_configs_load_with_todays_defaults():
    for field, bad in [("adapter_activation", "tanh"), ("normalize_at", "never"),
                       ("lstm_variant", "gru"), ("adapter_hidden", 0)]:  # fmt: skip
        with pytest.raises(LeverLMError, match=field):
            tiny_config(**{field: bad})
    old = tiny_config().to_dict()
    for key in ("adapter_activation", "adapter_hidden", "normalize_at", "lstm_variant",
                "predict_query_token"):  # fmt: skip
        del old[key]
    cfg = LeverLMConfig.from_dict(old)
    assert (cfg.adapter_activation, cfg.normalize_at, cfg.lstm_variant) == (
        "gelu", "before_adapter", "leverlm",
    )  # fmt: skip
    assert cfg.adapter_hidden is None and not cfg.predict_query_token


@pytest.mark.parametrize("backbone", ["gpt2", "lstm"])
def test_authors_state_dict_layout_round_trips(backbone):
    """Our weights written in the authors' key layout (their Lightning ``state_dict``) load back
    into a fresh model, which then computes the same logits."""
    kw = dict(
        backbone=backbone,
        lstm_variant="authors",
        adapter_activation="relu",
        normalize=True,
        normalize_at="after_adapter",
        query_features=("image", "text"),
    )
    torch.manual_seed(0)
    model = LeverLMModel(tiny_config(**kw)).eval()
    sd = model.authors_state_dict()
    assert all(k.startswith("lever_lm.") for k in sd)
    names = {k.removeprefix("lever_lm.") for k in sd}
    assert {"img_adapter.0.weight", "img_adapter.2.bias", "sen_adapter.0.weight"} <= names
    if backbone == "gpt2":
        assert {"lm_model.transformer.wte.weight", "lm_model.transformer.h.1.attn.c_attn.weight",
                "lm_model.lm_head.weight", "lm_model.transformer.wpe.weight"} <= names  # fmt: skip
    else:
        assert {"vocab_embedding.weight", "lm_model.weight_ih_l0", "lm_model.weight_hh_l1",
                "proj.0.weight", "proj.2.bias"} <= names  # fmt: skip
    # what their files hold besides: CLIP towers, a longer position table, old mask buffers
    theirs = {**sd, "lever_lm.img_model.vision_model.embeddings.x": torch.zeros(3)}
    if backbone == "gpt2":
        wpe = sd["lever_lm.lm_model.transformer.wpe.weight"]
        theirs["lever_lm.lm_model.transformer.wpe.weight"] = torch.cat([wpe, torch.randn(1008, 32)])
        theirs["lever_lm.lm_model.transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
    torch.manual_seed(1)
    fresh = LeverLMModel(tiny_config(**kw)).eval()
    assert fresh.load_authors_state_dict(theirs) == ["img_model.vision_model.embeddings.x"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    tokens, _ = build_sequences([[3, 7]], model.config)
    q, icd = random_feats(1, tokens.shape[1])
    torch.testing.assert_close(fresh(tokens, q, icd)[0], model(tokens, q, icd)[0])
    # layouts the authors never had, and weights of other options, are refused by name
    with pytest.raises(LeverLMError, match="missing .*sen_adapter"):
        fresh.load_authors_state_dict({k: v for k, v in sd.items() if "sen_adapter" not in k})
    with pytest.raises(LeverLMError, match="do not fit"):
        LeverLMModel(tiny_config(**{**kw, "n_embd": 16, "n_head": 2})).load_authors_state_dict(sd)
    with pytest.raises(LeverLMError, match="lstm_variant: authors"):
        LeverLMModel(tiny_config(backbone="lstm")).authors_state_dict()
    with pytest.raises(LeverLMError, match="linear projection"):
        LeverLMModel(tiny_config(adapter=False)).authors_state_dict()
