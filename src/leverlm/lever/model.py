"""The Lever-LM network: a tiny causal LM over supporting-set positions.

Vocabulary: token id ``p`` in ``0..N-1`` is the ICD at supporting-set position ``p``; the
special tokens come after them: ``EOS = N``, ``BOS = N + 1``, ``QUERY = N + 2``
(``vocab_size = N + 3``). A training sequence is ``BOS, QUERY, ICD_1 .. ICD_n, EOS``; the
model predicts ``ICD_1 .. ICD_n, EOS`` (nothing is predicted for ``BOS -> QUERY``).

Features: the QUERY token's embedding gets the query's CLIP image and/or text feature added,
each ICD token gets its ICD's features added (``query_features`` / ``icd_features``; empty =
token indices only). Each modality passes through a per-modality adapter (MLP, or a linear
projection / identity) and an optional L2 normalisation, before the adapter (``normalize_at``
default) or after it (the authors' order).

The authors' settings, each a config field (defaults = this project's choices): the adapter
MLP's activation (``adapter_activation: relu``) and hidden width (``adapter_hidden``; their
GPT-2 4 * n_embd, their LSTM n_embd), ``normalize_at: after_adapter``, their LSTM layout
(``lstm_variant: authors``: no input dropout or final LayerNorm, an untied MLP head
``n_embd -> n_embd -> V``) and their loss, which also predicts QUERY after BOS
(``predict_query_token``). :meth:`LeverLMModel.authors_state_dict` and
:meth:`LeverLMModel.load_authors_state_dict` convert weights to and from their checkpoints' key
layout.

Output head: the paper's is the (tied) token embedding, so an ICD's logit is learnt from the
sequences it appears in and an ICD no gt sequence contains keeps its random embedding. With
``output_features`` (our extension, off by default) an ICD's logit also gets
``h . W_m f_m(ICD)`` for each listed modality: ICDs that look alike score alike, so what is
learnt about one ICD carries over to the unseen ones (useful when the gt data covers a small
part of a large supporting set). It needs the supporting set's features at every forward:
:meth:`LeverLMModel.set_output_bank`.

Style follows nanoGPT: a dataclass config, shape comments and
``forward(tokens, ..., targets) -> (logits, loss)``; the decoders (greedy, beam, reference)
that choose ICDs with it are in :mod:`leverlm.lever.decode`.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leverlm.lever import LeverLMError

MODALITIES: tuple[str, ...] = ("image", "text")
BACKBONES: tuple[str, ...] = ("gpt2", "lstm")
CHOICES: dict[str, tuple[str, ...]] = {
    "backbone": BACKBONES,
    "adapter_activation": ("gelu", "relu"),
    "normalize_at": ("before_adapter", "after_adapter"),
    "lstm_variant": ("leverlm", "authors"),
}
IGNORE_INDEX = -100

# A decoding state: a transformers Cache for gpt2, an (h, c) pair for lstm.
State = Any
Features = dict[str, Tensor]


@dataclass
class LeverLMConfig:
    """Everything needed to rebuild a :class:`LeverLMModel` (stored in checkpoints)."""

    num_icds: int  # supporting-set size N: token ids 0..N-1 are ICD positions
    backbone: str = "gpt2"  # gpt2 | lstm
    n_layer: int = 2
    n_embd: int = 512
    n_head: int = 8
    n_positions: int = 64  # longest sequence the gpt2 backbone can read: shots + 2
    dropout: float = 0.1
    feature_dim: int = 512  # CLIP embedding size
    query_features: tuple[str, ...] = ("image",)
    icd_features: tuple[str, ...] = ("image", "text")
    adapter: bool = True  # MLP adapter; False: linear projection (identity if dims match)
    adapter_activation: str = "gelu"  # the MLP adapter's activation: gelu | relu (authors)
    adapter_hidden: int | None = None  # the MLP adapter's hidden width; None: 4 * n_embd
    normalize: bool = False  # L2-normalise features
    normalize_at: str = "before_adapter"  # before_adapter | after_adapter (authors)
    lstm_variant: str = "leverlm"  # leverlm | authors (see the module docstring)
    predict_query_token: bool = False  # the loss also predicts QUERY after BOS (authors)
    output_features: tuple[str, ...] = ()  # feature-tied output head (see module docstring)
    output_ids: bool = True  # with output_features: keep the token-embedding term of ICD logits
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, not used by the net

    def __post_init__(self) -> None:
        self.query_features = tuple(self.query_features)
        self.icd_features = tuple(self.icd_features)
        self.output_features = tuple(self.output_features)
        if self.num_icds < 1:
            raise LeverLMError(f"LeverLMConfig.num_icds must be >= 1, got {self.num_icds}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise LeverLMError(
                    f"LeverLMConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in ("query_features", "icd_features", "output_features"):
            values = getattr(self, name)
            bad = [v for v in values if v not in MODALITIES]
            if bad or len(set(values)) != len(values):
                raise LeverLMError(
                    f"LeverLMConfig.{name} must be distinct values from {MODALITIES}, got {list(values)}"
                )
        if self.backbone == "gpt2" and self.n_embd % self.n_head:
            raise LeverLMError(
                f"LeverLMConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_positions < 3:
            raise LeverLMError(f"LeverLMConfig.n_positions must be >= 3, got {self.n_positions}")
        if self.adapter_hidden is not None and self.adapter_hidden < 1:
            raise LeverLMError(
                f"LeverLMConfig.adapter_hidden must be >= 1 or None, got {self.adapter_hidden}"
            )

    # special tokens, after the N ICD positions
    @property
    def eos(self) -> int:
        return self.num_icds

    @property
    def bos(self) -> int:
        return self.num_icds + 1

    @property
    def query(self) -> int:
        return self.num_icds + 2

    @property
    def vocab_size(self) -> int:
        return self.num_icds + 3

    @property
    def modalities(self) -> tuple[str, ...]:
        """Feature modalities the model reads anywhere (query or ICD), in canonical order."""
        used = set(self.query_features) | set(self.icd_features) | set(self.output_features)
        return tuple(m for m in MODALITIES if m in used)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["query_features"] = list(self.query_features)
        d["icd_features"] = list(self.icd_features)
        d["output_features"] = list(self.output_features)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LeverLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LeverLMError(f"LeverLMConfig: unknown fields {unknown}")
        return cls(**d)


def build_sequences(
    icd_seqs: list[list[int]], config: LeverLMConfig, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Token ids and next-token targets for ICD sequences (right-padded, causal => no mask).

    Returns ``tokens (B, L)`` = ``BOS, QUERY, ICD_1..ICD_n`` padded with EOS and
    ``targets (B, L)`` = ``ignore, ICD_1..ICD_n, EOS`` padded with ``IGNORE_INDEX``, where
    ``L = max n + 2``. Padding sits after every real token, so with causal attention it never
    changes the logits of real positions.
    """
    if not icd_seqs:
        raise LeverLMError("build_sequences: no sequences")
    n_max = max(len(s) for s in icd_seqs)
    B, L = len(icd_seqs), n_max + 2
    tokens = torch.full((B, L), config.eos, dtype=torch.long)
    targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    tokens[:, 0], tokens[:, 1] = config.bos, config.query
    for b, seq in enumerate(icd_seqs):
        for p in seq:
            if not 0 <= p < config.num_icds:
                raise LeverLMError(
                    f"ICD position {p} out of range for a supporting set of {config.num_icds}"
                )
        n = len(seq)
        if n:
            tokens[b, 2 : 2 + n] = torch.tensor(seq, dtype=torch.long)
            targets[b, 1 : 1 + n] = tokens[b, 2 : 2 + n]
        targets[b, 1 + n] = config.eos
    if device is not None:
        tokens, targets = tokens.to(device), targets.to(device)
    return tokens, targets


class FeatureAdapter(nn.Module):
    """CLIP feature -> n_embd: an MLP (Linear, activation, Linear) or a linear map (or identity),
    with an optional L2 normalisation before or after it."""

    def __init__(self, in_dim: int, out_dim: int, config: LeverLMConfig):
        super().__init__()
        self.normalize_at = config.normalize_at if config.normalize else None
        if config.adapter:
            hidden = config.adapter_hidden or 4 * out_dim
            act = nn.ReLU() if config.adapter_activation == "relu" else nn.GELU()
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_dim, hidden), act, nn.Linear(hidden, out_dim)
            )
        elif in_dim != out_dim:
            self.net = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (..., D) -> (..., C)
        # F.normalize clamps the norm, so the all-zero rows used as padding stay zero
        if self.normalize_at == "before_adapter":
            x = F.normalize(x, dim=-1)
        x = self.net(x)
        return F.normalize(x, dim=-1) if self.normalize_at == "after_adapter" else x


def _cache_kwarg() -> str:
    """Name of GPT2Model.forward's KV-cache argument (``cache`` in transformers 5.x)."""
    from transformers import GPT2Model

    params = inspect.signature(GPT2Model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class LeverLMModel(nn.Module):
    """The Lever-LM network: GPT-2 (or LSTM) over ICD positions with CLIP features added."""

    def __init__(self, config: LeverLMConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        if config.backbone == "gpt2":
            from transformers import GPT2Config, GPT2Model

            gpt_config = GPT2Config(
                vocab_size=config.vocab_size,
                n_positions=config.n_positions,
                n_embd=C,
                n_layer=config.n_layer,
                n_head=config.n_head,
                resid_pdrop=config.dropout,
                embd_pdrop=config.dropout,
                attn_pdrop=config.dropout,
                bos_token_id=config.bos,
                eos_token_id=config.eos,
                pad_token_id=config.eos,
                attn_implementation="sdpa",
            )
            self.gpt2 = GPT2Model(gpt_config)
            self._cache_kw = _cache_kwarg()
        else:
            # the authors' LSTM: PyTorch's default init, no input dropout, no final LayerNorm
            authors = config.lstm_variant == "authors"
            self.embedding = nn.Embedding(config.vocab_size, C)
            if not authors:
                nn.init.normal_(self.embedding.weight, std=0.02)
                self.drop = nn.Dropout(config.dropout)
            self.lstm = nn.LSTM(
                C,
                C,
                num_layers=config.n_layer,
                batch_first=True,
                dropout=config.dropout if config.n_layer > 1 else 0.0,
            )
            if not authors:
                self.ln_f = nn.LayerNorm(C)
        self.adapters = nn.ModuleDict(
            {
                m: FeatureAdapter(config.feature_dim, C, config)
                for m in config.modalities
                if m in config.query_features or m in config.icd_features
            }
        )
        self.lm_head: nn.Module
        if self.untied_head:  # the authors' LSTM head: an MLP, not tied to the embedding
            self.lm_head = nn.Sequential(
                nn.Linear(C, C), nn.ReLU(), nn.Linear(C, config.vocab_size)
            )
        else:
            # weight tying, as GPT-2 does (the vocabulary dominates the parameter count)
            self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
            self.lm_head.weight = self.wte.weight
        # feature-tied output head: a linear key W_m f + b_m per modality from the (optionally
        # L2-normalised) supporting-set features; see set_output_bank / logits
        self.output_keys = nn.ModuleDict(
            {m: nn.Linear(config.feature_dim, C) for m in config.output_features}
        )
        self._output_bank: Features | None = None
        self._bank_matrix: Tensor | None = None  # (N, M*D): the modalities' features side by side

    # -- pieces ------------------------------------------------------------------------------
    @property
    def wte(self) -> nn.Embedding:
        """The token embedding (GPT-2's own ``wte`` for gpt2), tied to ``lm_head`` unless
        :attr:`untied_head`."""
        return self.gpt2.wte if self.config.backbone == "gpt2" else self.embedding

    @property
    def untied_head(self) -> bool:
        return self.config.backbone == "lstm" and self.config.lstm_variant == "authors"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- feature-tied output head ------------------------------------------------------------
    @property
    def output_bank(self) -> Features | None:
        return self._output_bank

    def set_output_bank(self, features: Features | None) -> None:
        """The supporting set's features ``{m: (N, D)}`` for the ``output_features`` head
        (tensors on the model's device; not part of the state dict)."""
        cfg = self.config
        if features is None:
            self._output_bank = self._bank_matrix = None
            return
        missing = [m for m in cfg.output_features if m not in features]
        if missing:
            raise LeverLMError(
                f"output bank lacks {missing} features (needs {cfg.output_features})"
            )
        for m in cfg.output_features:
            shape = tuple(features[m].shape)
            if shape != (cfg.num_icds, cfg.feature_dim):
                raise LeverLMError(
                    f"output bank {m} features are {shape}, the model needs "
                    f"({cfg.num_icds}, {cfg.feature_dim}) (one row per supporting-set position)"
                )
        self._output_bank = {m: features[m] for m in cfg.output_features}
        parts = [self._bank_feature(features[m]) for m in cfg.output_features]
        self._bank_matrix = torch.cat(parts, dim=1)  # (N, M*D)

    def _bank_feature(self, f: Tensor) -> Tensor:
        f = f.float()
        return F.normalize(f, dim=-1) if self.config.normalize else f

    def logits(self, h: Tensor) -> Tensor:
        """Next-token logits for hidden states h (..., C) -> (..., V).

        Feature-tied head: ICD j's logit gains ``sum_m h . (W_m f_m(j) + b_m)``, computed as
        ``(h W) F^T + h . b`` (W = the W_m side by side, F the bank): no per-ICD key is built.
        """
        out = self.lm_head(h)
        if not self.config.output_features:
            return out
        if self._bank_matrix is None:
            raise LeverLMError(
                "this Lever-LM has a feature-tied output head (output_features="
                f"{list(self.config.output_features)}): call set_output_bank(features) first"
            )
        layers = [self.output_keys[m] for m in self.config.output_features]
        W = torch.cat([lin.weight for lin in layers], dim=1)  # (C, M*D)
        bias = sum(lin.bias for lin in layers)  # (C,)
        bank = self._bank_matrix.to(h.dtype)
        icd = (h @ W) @ bank.t() + (h @ bias).unsqueeze(-1)  # (..., N)
        N = self.config.num_icds
        if not self.config.output_ids:  # ICDs scored by their features alone
            return torch.cat([icd, out[..., N:]], dim=-1)
        return torch.cat([out[..., :N] + icd, out[..., N:]], dim=-1)

    def logits_reference(self, h: Tensor) -> Tensor:
        """:meth:`logits` the plain way: each ICD's key built from its features, one at a time
        (for parity tests)."""
        out = self.lm_head(h).clone()
        cfg = self.config
        if cfg.output_features and not cfg.output_ids:
            out[..., : cfg.num_icds] = 0
        for j in range(cfg.num_icds if cfg.output_features else 0):
            for m in cfg.output_features:
                f = self._bank_feature(self._output_bank[m][j]).to(h.dtype)
                key = self.output_keys[m](f)  # (C,)
                out[..., j] += (h * key).sum(-1)
        return out

    def _feature_sum(
        self, feats: Features | None, names: tuple[str, ...], where: str
    ) -> Tensor | None:
        """Sum of adapted features over ``names``: (..., D) each -> (..., C)."""
        if not names:
            return None
        if feats is None:
            raise LeverLMError(f"LeverLM needs {where} features {list(names)}, got none")
        missing = [m for m in names if m not in feats]
        if missing:
            raise LeverLMError(
                f"LeverLM needs {where} features {list(names)}; missing {missing} "
                f"(given: {sorted(feats)})"
            )
        dtype = self.wte.weight.dtype
        out = None
        for m in names:
            x = feats[m]
            if x.shape[-1] != self.config.feature_dim:
                raise LeverLMError(
                    f"{where} {m} features have dim {x.shape[-1]}, model expects "
                    f"feature_dim={self.config.feature_dim}"
                )
            y = self.adapters[m](x.to(dtype))
            out = y if out is None else out + y
        return out

    def embed(
        self, tokens: Tensor, query_feats: Features | None = None, icd_feats: Features | None = None
    ) -> Tensor:
        """Input embeddings: token embedding + features at the QUERY and ICD tokens.

        tokens (B, T); query_feats {m: (B, D)}, needed when a QUERY token is in ``tokens``;
        icd_feats {m: (B, T, D)} aligned with ``tokens`` (rows at non-ICD tokens are ignored).
        """
        cfg = self.config
        x = self.wte(tokens)  # (B, T, C)
        is_query = tokens == cfg.query  # (B, T)
        if cfg.query_features and bool(is_query.any()):
            q = self._feature_sum(query_feats, cfg.query_features, "query")  # (B, C)
            x = x + is_query.unsqueeze(-1).to(x.dtype) * q.unsqueeze(1)
        is_icd = tokens < cfg.num_icds  # (B, T)
        if cfg.icd_features and bool(is_icd.any()):
            icd = self._feature_sum(icd_feats, cfg.icd_features, "ICD")  # (B, T, C)
            if icd.shape[:2] != tokens.shape:
                raise LeverLMError(
                    f"ICD features cover {tuple(icd.shape[:2])} tokens, sequence is {tuple(tokens.shape)}"
                )
            # masked, so the adapter's bias on padding rows never leaks into special tokens
            x = x + is_icd.unsqueeze(-1).to(x.dtype) * icd
        return x

    def backbone(
        self, x: Tensor, state: State = None, use_cache: bool = False
    ) -> tuple[Tensor, State]:
        """Hidden states for input embeddings x (B, T, C), continuing from ``state``."""
        if self.config.backbone == "gpt2":
            past = state.get_seq_length() if state is not None else 0
            if past + x.shape[1] > self.config.n_positions:
                raise LeverLMError(
                    f"sequence of {past + x.shape[1]} tokens exceeds n_positions="
                    f"{self.config.n_positions} (shots + 2); train with a larger n_positions"
                )
            kw = {self._cache_kw: state} if state is not None else {}
            out = self.gpt2(inputs_embeds=x, use_cache=use_cache, **kw)
            new_state = getattr(out, "cache", None) if use_cache else None
            if use_cache and new_state is None:
                new_state = getattr(out, "past_key_values", None)
            return out.last_hidden_state, new_state
        if self.config.lstm_variant == "authors":
            h, new_state = self.lstm(x, state)
        else:
            h, new_state = self.lstm(self.drop(x), state)
            h = self.ln_f(h)
        return h, (new_state if use_cache else None)

    @staticmethod
    def reorder_state(state: State, index: Tensor) -> State:
        """Select/reorder the batch rows of a decoding state (beam search, per-query splits)."""
        if state is None:
            return None
        if isinstance(state, tuple):  # lstm (h, c): (n_layer, B, C)
            return tuple(s.index_select(1, index) for s in state)
        state.reorder_cache(index)
        return state

    # -- API -------------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        query_feats: Features | None = None,
        icd_feats: Features | None = None,
        targets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits and loss for whole sequences (teacher forcing; the reference decoding path).

        tokens (B, T); targets (B, T) with IGNORE_INDEX where nothing is predicted. With
        targets: logits (B, T, V) and the mean cross-entropy; without: logits of the last
        position only, (B, 1, V), and loss None (as nanoGPT does at inference).
        """
        h, _ = self.backbone(self.embed(tokens, query_feats, icd_feats))  # (B, T, C)
        if targets is None:
            return self.logits(h[:, -1:, :]), None
        if self.config.predict_query_token:  # the authors' loss: every shifted position
            targets = targets.clone()
            targets[:, 0] = torch.where(
                tokens[:, 1] == self.config.query, self.config.query, targets[:, 0]
            )
        logits = self.logits(h)  # (B, T, V)
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE_INDEX
        )
        return logits, loss

    def step(
        self,
        tokens: Tensor,
        query_feats: Features | None = None,
        icd_feats: Features | None = None,
        state: State = None,
    ) -> tuple[Tensor, State]:
        """Incremental decoding: feed new tokens (B, T) after ``state``; last logits (B, V)."""
        h, state = self.backbone(self.embed(tokens, query_feats, icd_feats), state, use_cache=True)
        return self.logits(h[:, -1, :]), state

    # -- the authors' checkpoints ----------------------------------------------------------
    def _authors_names(self) -> dict[str, str]:
        """Our state-dict key -> the authors' (their model's attribute names)."""
        cfg = self.config
        if cfg.output_features:
            raise LeverLMError("output_features (the feature-tied head) has no authors' layout")
        if cfg.backbone == "lstm" and cfg.lstm_variant != "authors":
            raise LeverLMError("only lstm_variant: authors has the authors' LSTM layout")
        names = {}
        for key in self.state_dict():
            head, _, rest = key.partition(".")
            if head == "adapters":
                m, _, rest = rest.partition(".net.")
                if not isinstance(self.adapters[m].net, nn.Sequential):
                    raise LeverLMError(
                        "the authors' model has no linear projection of features: use adapter: "
                        "true, or adapter: false with feature_dim == n_embd (features added as is)"
                    )
                names[key] = {"image": "img_adapter.", "text": "sen_adapter."}[m] + rest
            elif head == "gpt2":
                names[key] = "lm_model.transformer." + rest
            elif head == "lm_head":
                names[key] = ("lm_model.lm_head." if cfg.backbone == "gpt2" else "proj.") + rest
            else:
                names[key] = {"embedding": "vocab_embedding.", "lstm": "lm_model."}[head] + rest
        return names

    def authors_state_dict(self) -> dict[str, Tensor]:
        """The weights in the key layout of the authors' Lightning checkpoints (``state_dict``
        with ``lever_lm.`` prefixes; no CLIP towers)."""
        sd = self.state_dict()
        return {"lever_lm." + theirs: sd[ours] for ours, theirs in self._authors_names().items()}

    def load_authors_state_dict(self, state_dict: dict[str, Tensor]) -> list[str]:
        """Load weights saved by the authors' code into this model (built with the same
        architecture options); returns their CLIP keys, which are not loaded (features come
        from a feature store or this project's CLIP)."""
        sd = {k.removeprefix("lever_lm."): v for k, v in state_dict.items()}
        clip = sorted(k for k in sd if k.startswith(("img_model.", "sen_model.")))
        # GPT-2's causal-mask buffers, saved by older transformers
        used = set(clip) | {k for k in sd if k.endswith((".attn.bias", ".attn.masked_bias"))}
        ours, missing = {}, []
        for key, theirs in self._authors_names().items():
            if theirs not in sd:
                missing.append(theirs)
                continue
            used.add(theirs)
            value = sd[theirs]
            if key == "gpt2.wpe.weight":  # rows past n_positions are never read
                value = value[: self.config.n_positions]
            ours[key] = value
        unexpected = sorted(set(sd) - used)
        if missing or unexpected:
            raise LeverLMError(
                f"the authors' weights do not fit these architecture options: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]} (check backbone, adapter, "
                "query/icd_features, lstm_variant)"
            )
        try:
            self.load_state_dict(ours)
        except RuntimeError as err:
            raise LeverLMError(
                f"the authors' weights do not fit these architecture options (num_icds, n_embd, "
                f"n_layer, adapter_hidden, ...): {str(err).splitlines()[-1].strip()}"
            ) from None
        return clip
