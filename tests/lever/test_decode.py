"""Decoding: per-query no-repeat masks, KV cache == reference, beam search, extrapolation."""

from __future__ import annotations

import itertools

import pytest
import torch

from leverlm.lever.decode import FeatureBank, beam_decode, greedy_decode, reference_decode
from leverlm.lever.model import LeverLMConfig, LeverLMModel


def make(backbone: str = "gpt2", num_icds: int = 30, seed: int = 0, **kw):
    """A random model in float64 (ties impossible in practice), its bank and 6 queries."""
    torch.manual_seed(seed)
    base = dict(
        num_icds=num_icds,
        backbone=backbone,
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=16,
        dropout=0.0,
        feature_dim=8,
        query_features=("image", "text"),
        icd_features=("image", "text"),
    )
    base.update(kw)
    model = LeverLMModel(LeverLMConfig(**base)).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    bank = FeatureBank(
        {m: torch.randn(num_icds, 8, generator=g) for m in ("image", "text")}, dtype=torch.float64
    )
    q = {m: torch.randn(6, 8, generator=g, dtype=torch.float64) for m in ("image", "text")}
    return model, bank, q


def rows(q: dict, idx) -> dict:
    return {m: t[idx] for m, t in q.items()}


@pytest.mark.parametrize("backbone", ["gpt2", "lstm"])
def test_kv_cached_batched_greedy_equals_reference(backbone):
    model, bank, q = make(backbone)
    fast = greedy_decode(model, q, bank, shots=8)
    slow = reference_decode(model, q, bank, shots=8)
    assert fast.shape == (6, 8)
    assert fast.tolist() == slow.tolist()


@pytest.mark.parametrize("backbone", ["gpt2", "lstm"])
def test_each_query_decodes_as_if_alone(backbone):
    model, bank, q = make(backbone)
    together = greedy_decode(model, q, bank, shots=8).tolist()
    for b in range(6):
        alone = greedy_decode(model, rows(q, slice(b, b + 1)), bank, shots=8).tolist()[0]
        assert together[b] == alone
    # any batch composition/order gives each query the same ICDs
    perm = [4, 0, 5, 2]
    assert greedy_decode(model, rows(q, perm), bank, shots=8).tolist() == [
        together[i] for i in perm
    ]


def test_identical_queries_get_identical_sequences():
    # a batch-shared ban (the reference implementation's defect) would give the second copy
    # different ICDs; per-query masks must not
    model, bank, q = make()
    twice = rows(q, [0, 0, 0])
    out = greedy_decode(model, twice, bank, shots=8).tolist()
    assert out[0] == out[1] == out[2]
    beams = beam_decode(model, twice, bank, shots=4, beam_size=3).tolist()
    assert beams[0] == beams[1] == beams[2]


@pytest.mark.parametrize("backbone", ["gpt2", "lstm"])
def test_no_repeats_no_specials_and_exclusions(backbone):
    model, bank, q = make(backbone, num_icds=12)
    # bias the head toward the special tokens and one ICD, so bans are actually exercised
    with torch.no_grad():
        model.lm_head.weight[9:] += 0.5
    exclude = [[0, 1], [], [5], [2, 3, 4], [11], [7]]
    for shots in (8, 10):  # 10 of 12 with two excluded: the candidate pool runs out exactly
        ex = exclude if shots == 8 else [e[:2] for e in exclude]
        out = greedy_decode(model, q, bank, shots=shots, exclude=ex).tolist()
        for seq, e in zip(out, ex, strict=True):
            assert len(seq) == shots and len(set(seq)) == shots
            assert all(0 <= p < 12 for p in seq)
            assert not set(seq) & set(e)
        assert out == reference_decode(model, q, bank, shots=shots, exclude=ex).tolist()
    with pytest.raises(ValueError, match="cannot choose shots=11"):
        greedy_decode(model, q, bank, shots=11, exclude=exclude)


def test_decoding_past_the_trained_length_and_position_limit():
    model, bank, q = make(n_positions=10)
    assert greedy_decode(model, q, bank, shots=9).shape == (6, 9)  # BOS QUERY + 8 fed tokens
    with pytest.raises(ValueError, match="n_positions=10"):
        greedy_decode(model, q, bank, shots=10)
    with pytest.raises(ValueError, match="shots must be >= 1"):
        greedy_decode(model, q, bank, shots=0)


@pytest.mark.parametrize("backbone", ["gpt2", "lstm"])
def test_beam_search(backbone):
    model, bank, q = make(backbone, num_icds=10)
    # beam 1 is greedy
    assert (
        beam_decode(model, q, bank, 5, beam_size=1).tolist()
        == greedy_decode(model, q, bank, 5).tolist()
    )
    # beam >= N at 2 shots is exhaustive: it must find the best ordered pair
    seqs, scores = beam_decode(model, q, bank, 2, beam_size=10, return_scores=True)
    cfg = model.config
    for b in range(6):
        best, best_score = None, -float("inf")
        for i, j in itertools.permutations(range(10), 2):
            tokens = torch.tensor([[cfg.bos, cfg.query, i, j]])
            with torch.no_grad():
                feats = bank.gather(tokens.clamp(max=9))
                logits, _ = model(tokens, rows(q, slice(b, b + 1)), feats, tokens)
            logp = torch.log_softmax(logits[0], -1)
            s = float(logp[1, i] + logp[2, j])
            if s > best_score:
                best, best_score = [i, j], s
        assert seqs[b, 0].tolist() == best
        assert float(scores[b, 0]) == pytest.approx(best_score, rel=1e-9)
        assert (scores[b, :-1] >= scores[b, 1:]).all()  # best first
    # per-query independence and no repeats hold for beams too
    together = beam_decode(model, q, bank, 6, beam_size=4).tolist()
    for b in (0, 3):
        assert (
            beam_decode(model, rows(q, slice(b, b + 1)), bank, 6, beam_size=4).tolist()[0]
            == together[b]
        )
    assert all(len(set(s)) == 6 for s in together)


def test_feature_bank_checks_and_gathers():
    bank = FeatureBank({"image": torch.arange(12.0).view(4, 3)})
    got = bank.gather(torch.tensor([[3, 0]]))["image"]
    assert got.tolist() == [[[9.0, 10.0, 11.0], [0.0, 1.0, 2.0]]]
    with pytest.raises(ValueError, match="rows"):
        FeatureBank({"image": torch.zeros(4, 3), "text": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        FeatureBank({"image": torch.zeros(4)})


# ---------------------------------------------------------------------------------------------
# feature-tied output head (output_features)
# ---------------------------------------------------------------------------------------------


def make_tied(backbone: str = "gpt2", **kw):
    model, bank, q = make(backbone, output_features=("image", "text"), **kw)
    model.set_output_bank(bank.features)
    return model, bank, q


@pytest.mark.parametrize(
    "backbone,normalize,ids",
    [("gpt2", False, True), ("lstm", False, True), ("gpt2", True, True), ("gpt2", True, False)],
)
def test_output_head_logits_equal_a_loop_over_icds(backbone, normalize, ids):
    model, bank, _ = make_tied(backbone, normalize=normalize, output_ids=ids)
    h = torch.randn(3, 5, 32, dtype=torch.float64)
    fast, slow = model.logits(h), model.logits_reference(h)
    assert fast.shape == (3, 5, model.config.vocab_size)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    # special tokens keep the plain head's logits; ICD logits move with the ICD's features
    N = model.config.num_icds
    torch.testing.assert_close(fast[..., N:], model.lm_head(h)[..., N:])
    if not ids:  # features alone: two ICDs with the same features score the same
        same = {m: t.clone() for m, t in bank.features.items()}
        for t in same.values():
            t[5] = t[6]
        model.set_output_bank(same)
        tied = model.logits(h)
        torch.testing.assert_close(tied[..., 5], tied[..., 6])
        model.set_output_bank(bank.features)
    moved = {m: t.clone() for m, t in bank.features.items()}
    moved["image"][7] += 1.0
    model.set_output_bank(moved)
    after = model.logits(h)
    assert not torch.allclose(after[..., 7], fast[..., 7])
    torch.testing.assert_close(after[..., :7], fast[..., :7])


@pytest.mark.parametrize("backbone,ids", [("gpt2", True), ("lstm", True), ("gpt2", False)])
def test_output_head_kv_cached_greedy_and_beam_equal_reference(backbone, ids):
    model, bank, q = make_tied(backbone, output_ids=ids)
    fast = greedy_decode(model, q, bank, shots=6)
    assert fast.tolist() == reference_decode(model, q, bank, shots=6).tolist()
    # the plain head ranks differently: the tied head is really in the loop
    plain = LeverLMModel(LeverLMConfig(**{**model.config.to_dict(), "output_features": []}))
    plain.load_state_dict(model.state_dict(), strict=False)
    plain = plain.double().eval()
    assert greedy_decode(plain, q, bank, shots=6).tolist() != fast.tolist()
    seqs, scores = beam_decode(model, q, bank, shots=3, beam_size=1, return_scores=True)
    assert seqs[:, 0].tolist() == greedy_decode(model, q, bank, shots=3).tolist()


def test_output_head_follows_weight_updates_and_needs_a_bank():
    model, bank, _ = make(output_features=("text",))
    h = torch.randn(2, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="set_output_bank"):
        model.logits(h)
    with pytest.raises(ValueError, match=r"\(30, 8\)"):
        model.set_output_bank({"text": bank.features["text"][:10]})
    model.set_output_bank(bank.features)
    with torch.no_grad():
        before = model.logits(h).clone()
        assert torch.equal(model.logits(h), before)
        model.output_keys["text"].weight.add_(0.5)  # an optimiser step, in place
        assert not torch.allclose(model.logits(h), before)
    # gradients reach the output keys
    model.train()
    model.logits(h).sum().backward()
    assert model.output_keys["text"].weight.grad is not None


def test_output_head_generalises_to_icds_no_sequence_contains():
    """Train on sequences over half the ICDs only; the ICD of the right 'class' is still picked
    among the unseen half (the plain head cannot: unseen ICDs keep random embeddings)."""
    torch.manual_seed(0)
    N, D, classes = 40, 8, 4
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(classes, D, generator=g) * 3
    icd_class = torch.arange(N) % classes
    feats = protos[icd_class] + 0.1 * torch.randn(N, D, generator=g)
    seen = torch.arange(N) < N // 2

    def train(output_features):
        torch.manual_seed(0)
        cfg = LeverLMConfig(
            num_icds=N, n_layer=1, n_embd=16, n_head=2, n_positions=8, dropout=0.0,
            feature_dim=D, query_features=("image",), icd_features=(),
            output_features=output_features,
        )  # fmt: skip
        model = LeverLMModel(cfg)
        if output_features:
            model.set_output_bank({"image": feats})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        from leverlm.lever.model import build_sequences

        for step in range(150):
            c = torch.randint(classes, (32,), generator=torch.Generator().manual_seed(step))
            q = protos[c] + 0.1 * torch.randn(32, D)
            targets = [
                int(torch.nonzero(seen & (icd_class == int(k)))[step % (N // 2 // classes)])
                for k in c
            ]
            tokens, tgt = build_sequences([[t] for t in targets], cfg)
            _, loss = model(tokens, {"image": q}, None, tgt)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        q = {"image": protos}
        exclude = [torch.nonzero(seen).flatten().tolist()] * classes  # only unseen ICDs allowed
        picked = greedy_decode(model, q, None, shots=1, exclude=exclude)[:, 0]
        return (icd_class[picked] == torch.arange(classes)).float().mean().item()

    assert train(("image",)) == 1.0
    assert train(()) < 1.0


def test_authors_variants_decode_as_the_reference():
    """The authors' LSTM (untied MLP head) and adapter (ReLU, norm after): the cached greedy and
    beam decoders agree with the reference decoder."""
    model, bank, q = make(
        "lstm", lstm_variant="authors", adapter_activation="relu", normalize=True,
        normalize_at="after_adapter",
    )  # fmt: skip
    fast = greedy_decode(model, q, bank, shots=5)
    assert fast.tolist() == reference_decode(model, q, bank, shots=5).tolist()
    assert beam_decode(model, q, bank, shots=5, beam_size=1).tolist() == fast.tolist()
