"""Decoding with Lever-LM: the supporting set's features by position and three decoders.

Three decoders over the same network (:class:`leverlm.lever.model.LeverLMModel`):

- :func:`greedy_decode` - batched, KV-cached greedy decoding; the fast path.
- :func:`beam_decode` - batched beam search (beams are extra batch rows, cache reordered).
- :func:`reference_decode` - one query at a time, the whole prefix recomputed every step, no
  cache. Slow and obviously right: kept for parity tests and the benchmark.

All of them choose exactly ``shots`` ICDs per query, with a *per-query* no-repeat mask: a
query bans only the ICDs it has already chosen (and the special tokens, so EOS can never
end a sequence early - decoding past the trained length works the same way). The
authors' code banned, for every query, the ICDs chosen by any query of the batch, which
made a query's ICDs depend on its batch mates; here a query decodes the same alone or in
any batch (tested).

ICD features for each decoding step are gathered by position from a :class:`FeatureBank`
(the supporting set's precomputed features); nothing is re-encoded while decoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from leverlm.lever import LeverLMError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from leverlm.lever.model import LeverLMModel

Features = dict[str, "Tensor"]


class FeatureBank:
    """Supporting-set features by position, as tensors on the decoding device.

    ``features`` maps a modality (``image``/``text``) to an ``(N, D)`` array or tensor whose
    row ``p`` is the feature of supporting-set position ``p``.
    """

    def __init__(
        self,
        features: Mapping[str, Any],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        import numpy as np
        import torch

        if not features:
            raise LeverLMError("FeatureBank: no feature arrays given")
        self.features: dict[str, torch.Tensor] = {}
        rows = None
        for name, arr in features.items():
            # np.array copies: memmaps are read-only, and the bank must not alias the store
            t = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.array(arr))
            if t.ndim != 2:
                raise LeverLMError(
                    f"FeatureBank: {name} features must be (N, D), got {tuple(t.shape)}"
                )
            if rows is not None and t.shape[0] != rows:
                raise LeverLMError(
                    f"FeatureBank: {name} features have {t.shape[0]} rows, others have {rows}"
                )
            rows = t.shape[0]
            self.features[name] = t.to(device=device, dtype=dtype or torch.float32)
        self.num_rows: int = int(rows)

    @classmethod
    def from_store(
        cls,
        store: Any,
        modalities: Sequence[str],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> FeatureBank:
        """Load ``modalities`` of a feature store (a folder or an object with ``.image``/``.text``)."""
        from leverlm.encoders.store import open_store

        store = open_store(store)
        arrays = {}
        for m in modalities:
            arr = getattr(store, m, None)
            if arr is None:
                raise LeverLMError(
                    f"feature store {getattr(store, 'path', store)} has no {m!r} features "
                    f"(the model needs {list(modalities)})"
                )
            arrays[m] = arr
        return cls(arrays, device=device, dtype=dtype)

    def gather(self, positions: Tensor) -> Features:
        """Features of ``positions`` (any shape S) -> {m: (*S, D)}."""
        return {m: t[positions] for m, t in self.features.items()}


# -- decoding --------------------------------------------------------------------------------
def ensure_output_bank(model: LeverLMModel, bank: FeatureBank | None) -> None:
    """A feature-tied output head without its bank takes the decoding bank's features."""
    if model.config.output_features and model.output_bank is None:
        if bank is None:
            raise LeverLMError(
                "this Lever-LM has a feature-tied output head "
                f"(output_features={list(model.config.output_features)}): decode with a "
                "FeatureBank of the supporting set, or call model.set_output_bank(...)"
            )
        model.set_output_bank(bank.features)


def check_decode_args(
    model: LeverLMModel, num_queries: int, shots: int, beam_size: int, exclude: Any
) -> None:
    cfg = model.config
    if shots < 1:
        raise LeverLMError(f"shots must be >= 1, got {shots}")
    if beam_size < 1:
        raise LeverLMError(f"beam_size must be >= 1, got {beam_size}")
    if cfg.backbone == "gpt2" and shots + 1 > cfg.n_positions:
        raise LeverLMError(
            f"shots={shots} needs {shots + 1} positions; the model was built with "
            f"n_positions={cfg.n_positions}"
        )
    if exclude is not None and len(exclude) != num_queries:
        raise LeverLMError(f"exclude has {len(exclude)} entries for {num_queries} queries")
    most_excluded = max((len(set(e)) for e in exclude), default=0) if exclude else 0
    if shots + most_excluded > cfg.num_icds or beam_size > cfg.num_icds - most_excluded:
        raise LeverLMError(
            f"cannot choose shots={shots} (beam_size={beam_size}) distinct ICDs from a "
            f"supporting set of {cfg.num_icds} with up to {most_excluded} excluded per query"
        )


def _initial_ban(model: LeverLMModel, num_queries: int, exclude: Any, device: Any) -> Tensor:
    """(B, V) bool: special tokens banned for every query, plus each query's exclusions."""
    import torch

    cfg = model.config
    banned = torch.zeros(num_queries, cfg.vocab_size, dtype=torch.bool, device=device)
    banned[:, cfg.num_icds :] = True  # EOS, BOS, QUERY: decoding always runs to `shots`
    if exclude is not None:
        for b, ex in enumerate(exclude):
            for p in ex:
                if not 0 <= int(p) < cfg.num_icds:
                    raise LeverLMError(
                        f"exclude[{b}] has position {p} outside 0..{cfg.num_icds - 1}"
                    )
            if len(ex):
                banned[b, torch.as_tensor(list(ex), dtype=torch.long, device=device)] = True
    return banned


def _icd_feats(model: LeverLMModel, bank: FeatureBank | None, tokens: Tensor) -> Features | None:
    """ICD features of ``tokens`` gathered from the bank (None for an indices-only model)."""
    if not model.config.icd_features:
        return None
    if bank is None:
        raise LeverLMError(
            f"the model reads ICD features {list(model.config.icd_features)}; no FeatureBank given"
        )
    # special tokens (>= N) get some real row; embed() masks it out
    return bank.gather(tokens.clamp(max=model.config.num_icds - 1))


def _prefix(model: LeverLMModel, num_queries: int, device: Any) -> Tensor:
    import torch

    cfg = model.config
    return torch.tensor([[cfg.bos, cfg.query]], device=device).expand(num_queries, 2)


def _num_queries(query_feats: Features, num_queries: int | None = None) -> int:
    if num_queries is not None:
        return num_queries
    if not query_feats:
        raise LeverLMError("query_feats is empty: pass num_queries for an indices-only model")
    sizes = {t.shape[0] for t in query_feats.values()}
    if len(sizes) != 1:
        raise LeverLMError(f"query feature tensors disagree on the number of queries: {sizes}")
    return sizes.pop()


def greedy_decode(
    model: LeverLMModel,
    query_feats: Features,
    bank: FeatureBank | None,
    shots: int,
    exclude: Sequence[Sequence[int]] | None = None,
    num_queries: int | None = None,
) -> Tensor:
    """Batched greedy decoding with a KV cache: (B, shots) ICD positions, prompt order.

    query_feats {m: (B, D)}; exclude[b] are positions query b may never choose (e.g. itself).
    """
    import torch

    B = _num_queries(query_feats, num_queries)
    check_decode_args(model, B, shots, 1, exclude)
    ensure_output_bank(model, bank)
    device = model.wte.weight.device
    rows = torch.arange(B, device=device)
    banned = _initial_ban(model, B, exclude, device)  # (B, V)
    logits, state = model.step(_prefix(model, B, device), query_feats=query_feats)  # (B, V)
    chosen = torch.empty(B, shots, dtype=torch.long, device=device)
    for s in range(shots):
        nxt = logits.masked_fill(banned, float("-inf")).argmax(-1)  # (B,)
        chosen[:, s] = nxt
        banned[rows, nxt] = True  # each query bans only its own choice
        if s + 1 < shots:
            tok = nxt.unsqueeze(1)  # (B, 1)
            logits, state = model.step(tok, icd_feats=_icd_feats(model, bank, tok), state=state)
    return chosen


def _log_softmax(logits: Tensor) -> Tensor:
    """log-probs in at least float32 (fp16 logits would make beam scores tie)."""
    import torch

    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)


def beam_decode(
    model: LeverLMModel,
    query_feats: Features,
    bank: FeatureBank | None,
    shots: int,
    beam_size: int,
    exclude: Sequence[Sequence[int]] | None = None,
    return_scores: bool = False,
    num_queries: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Batched beam search (sum of log-probs), no repeats within a beam: best beam per query.

    Returns (B, shots) positions, or with ``return_scores`` also the (B, K) final beams'
    sequences (B, K, shots) and scores (B, K), best first.
    """
    import torch

    B, K = _num_queries(query_feats, num_queries), beam_size
    check_decode_args(model, B, shots, K, exclude)
    ensure_output_bank(model, bank)
    device = model.wte.weight.device
    V = model.config.vocab_size
    banned = _initial_ban(model, B, exclude, device)  # (B, V)
    logits, state = model.step(_prefix(model, B, device), query_feats=query_feats)
    logp = _log_softmax(logits).masked_fill(banned, float("-inf"))  # (B, V)
    scores, tok = logp.topk(K, dim=-1)  # (B, K): the K best first ICDs of each query
    # every query's prefix state is shared by its K beams: rows b*K .. b*K+K-1
    expand = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,)
    state = model.reorder_state(state, expand)
    banned = banned[expand]  # (B*K, V)
    seqs = tok.reshape(B * K, 1)  # (B*K, s)
    banned[torch.arange(B * K, device=device), seqs[:, 0]] = True
    scores = scores.reshape(B * K)
    for _ in range(1, shots):
        last = seqs[:, -1:]  # (B*K, 1)
        logits, state = model.step(last, icd_feats=_icd_feats(model, bank, last), state=state)
        logp = _log_softmax(logits).masked_fill(banned, float("-inf"))
        total = (scores.unsqueeze(1) + logp).view(B, K * V)  # (B, K*V)
        scores, flat = total.topk(K, dim=-1)  # (B, K)
        origin = (flat // V + torch.arange(B, device=device).unsqueeze(1) * K).reshape(-1)
        tok = (flat % V).reshape(-1)  # (B*K,)
        state = model.reorder_state(state, origin)
        banned = banned[origin]
        banned[torch.arange(B * K, device=device), tok] = True
        seqs = torch.cat([seqs[origin], tok.unsqueeze(1)], dim=1)
        scores = scores.reshape(-1)
    seqs, scores = seqs.view(B, K, shots), scores.view(B, K)
    if return_scores:
        return seqs, scores
    return seqs[:, 0]


def reference_decode(
    model: LeverLMModel,
    query_feats: Features,
    bank: FeatureBank | None,
    shots: int,
    exclude: Sequence[Sequence[int]] | None = None,
    num_queries: int | None = None,
) -> Tensor:
    """Greedy decoding the plain way: one query at a time, whole prefix recomputed each step."""
    import torch

    B = _num_queries(query_feats, num_queries)
    check_decode_args(model, B, shots, 1, exclude)
    ensure_output_bank(model, bank)
    cfg = model.config
    device = model.wte.weight.device
    out = torch.empty(B, shots, dtype=torch.long, device=device)
    for b in range(B):
        q = {m: t[b : b + 1] for m, t in query_feats.items()}  # {m: (1, D)}
        banned = set(range(cfg.num_icds, cfg.vocab_size))
        banned |= {int(p) for p in (exclude[b] if exclude is not None else ())}
        seq: list[int] = []
        for _ in range(shots):
            tokens = torch.tensor([[cfg.bos, cfg.query, *seq]], device=device)  # (1, T)
            logits, _ = model(tokens, q, _icd_feats(model, bank, tokens))
            logits = logits[0, -1].clone()  # (V,)
            logits[sorted(banned)] = float("-inf")
            nxt = int(logits.argmax())
            seq.append(nxt)
            banned.add(nxt)
        out[b] = torch.tensor(seq, device=device)
    return out
