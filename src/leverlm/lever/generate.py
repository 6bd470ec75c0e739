"""Decoding with Lever-LM and the ``select`` API / CLI.

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

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
            raise ValueError("FeatureBank: no feature arrays given")
        self.features: dict[str, torch.Tensor] = {}
        rows = None
        for name, arr in features.items():
            # np.array copies: memmaps are read-only, and the bank must not alias the store
            t = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.array(arr))
            if t.ndim != 2:
                raise ValueError(
                    f"FeatureBank: {name} features must be (N, D), got {tuple(t.shape)}"
                )
            if rows is not None and t.shape[0] != rows:
                raise ValueError(
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
        """Load ``modalities`` of a feature store (a path or an object with ``.image``/``.text``)."""
        store = open_feature_store(store)
        arrays = {}
        for m in modalities:
            arr = getattr(store, m, None)
            if arr is None:
                raise ValueError(
                    f"feature store {getattr(store, 'path', store)} has no {m!r} features "
                    f"(the model needs {list(modalities)})"
                )
            arrays[m] = arr
        return cls(arrays, device=device, dtype=dtype)

    def gather(self, positions: Tensor) -> Features:
        """Features of ``positions`` (any shape S) -> {m: (*S, D)}."""
        return {m: t[positions] for m, t in self.features.items()}


def open_feature_store(store: Any) -> Any:
    """A feature store from a path (``leverlm.encoders.FeatureStore``) or the object itself."""
    if isinstance(store, (str, os.PathLike)):
        path = Path(store)
        if not path.exists():
            raise FileNotFoundError(f"feature store not found: {path}")
        from leverlm.encoders import FeatureStore

        return FeatureStore(path)
    return store


# -- decoding --------------------------------------------------------------------------------
def _ensure_output_bank(model: LeverLMModel, bank: FeatureBank | None) -> None:
    """A feature-tied output head without its bank takes the decoding bank's features."""
    if model.config.output_features and model.output_bank is None:
        if bank is None:
            raise ValueError(
                "this Lever-LM has a feature-tied output head "
                f"(output_features={list(model.config.output_features)}): decode with a "
                "FeatureBank of the supporting set, or call model.set_output_bank(...)"
            )
        model.set_output_bank(bank.features)


def _check_decode_args(
    model: LeverLMModel, num_queries: int, shots: int, beam_size: int, exclude: Any
) -> None:
    cfg = model.config
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if cfg.backbone == "gpt2" and shots + 1 > cfg.n_positions:
        raise ValueError(
            f"shots={shots} needs {shots + 1} positions; the model was built with "
            f"n_positions={cfg.n_positions}"
        )
    if exclude is not None and len(exclude) != num_queries:
        raise ValueError(f"exclude has {len(exclude)} entries for {num_queries} queries")
    most_excluded = max((len(set(e)) for e in exclude), default=0) if exclude else 0
    if shots + most_excluded > cfg.num_icds or beam_size > cfg.num_icds - most_excluded:
        raise ValueError(
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
                    raise ValueError(f"exclude[{b}] has position {p} outside 0..{cfg.num_icds - 1}")
            if len(ex):
                banned[b, torch.as_tensor(list(ex), dtype=torch.long, device=device)] = True
    return banned


def _icd_feats(model: LeverLMModel, bank: FeatureBank | None, tokens: Tensor) -> Features | None:
    """ICD features of ``tokens`` gathered from the bank (None for an indices-only model)."""
    if not model.config.icd_features:
        return None
    if bank is None:
        raise ValueError(
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
        raise ValueError("query_feats is empty: pass num_queries for an indices-only model")
    sizes = {t.shape[0] for t in query_feats.values()}
    if len(sizes) != 1:
        raise ValueError(f"query feature tensors disagree on the number of queries: {sizes}")
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
    _check_decode_args(model, B, shots, 1, exclude)
    _ensure_output_bank(model, bank)
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
    _check_decode_args(model, B, shots, K, exclude)
    _ensure_output_bank(model, bank)
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
    _check_decode_args(model, B, shots, 1, exclude)
    _ensure_output_bank(model, bank)
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


# -- the Python API ----------------------------------------------------------------------
def _load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Lever-LM checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - older/foreign pickles: our own checkpoints, trusted
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "leverlm_config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not a Lever-LM checkpoint (no 'leverlm_config'/'state_dict'; "
            f"keys: {sorted(ckpt)[:10]})"
        )
    return ckpt


class LeverLM:
    """A trained Lever-LM, ready to configure ICD sequences for queries.

    >>> lm = LeverLM.from_checkpoint("last.ckpt", features="features/train")
    >>> lm.select([0, 5, 7], shots=4, query_features="features/val")
    """

    def __init__(
        self,
        model: LeverLMModel,
        bank: FeatureBank | None,
        query_features: Any = None,
        clip: Any = None,
        info: dict[str, Any] | None = None,
    ):
        self.model = model.eval()
        self.bank = bank
        _ensure_output_bank(model, bank)
        self.query_features = query_features
        self.clip = clip  # fine-tuned CLIP of a clip_trainable checkpoint, else None
        self.info = dict(info or {})

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        features: Any = None,
        query_features: Any = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LeverLM:
        """Rebuild a trained Lever-LM.

        features: the supporting set's features - a feature-store path, a store object, or a
        mapping ``{modality: (N, D)}``; default: the store recorded in the checkpoint. For a
        checkpoint trained with ``clip_trainable`` and no ``features`` given, the supporting set
        is encoded once with the checkpoint's fine-tuned CLIP.
        query_features: default store for queries given as positions (default: ``features``,
        i.e. queries from the supporting set).
        """
        import torch

        from leverlm.lever.model import MODALITIES, LeverLMConfig, LeverLMModel

        ckpt = _load_checkpoint(path)
        config = LeverLMConfig.from_dict(ckpt["leverlm_config"])
        info = dict(ckpt.get("leverlm_info", {}))
        model = LeverLMModel(config)
        sd = ckpt["state_dict"]
        model_sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
        model.load_state_dict(model_sd)
        model.to(device=device, dtype=dtype or torch.float32).eval()
        clip = None
        if info.get("clip_trainable"):
            from leverlm.encoders import load_clip

            clip = load_clip(info["clip_model"], None)
            clip_sd = {k[len("clip.") :]: v for k, v in sd.items() if k.startswith("clip.")}
            clip.load_state_dict(clip_sd)
            clip.to(device).eval()
        # the ICD tokens' features, and the feature-tied output head's
        mods = tuple(
            m for m in MODALITIES if m in config.icd_features or m in config.output_features
        )
        bank = None
        if not mods:
            bank = None  # indices only: nothing to gather
        elif features is not None:
            bank = cls._bank(features, mods, device)
        elif clip is not None:
            coll = info.get("supporting_set")
            if not coll:
                raise ValueError(f"{path}: clip_trainable checkpoint without a supporting_set path")
            feats = encode_collection(clip, info["clip_model"], coll, info.get("task"), mods)
            bank = FeatureBank(feats, device=device)
        elif info.get("feature_store"):
            bank = cls._bank(info["feature_store"], mods, device)
        else:
            raise ValueError(f"{path}: no features given and none recorded in the checkpoint")
        if bank is not None and bank.num_rows != config.num_icds:
            raise ValueError(
                f"supporting-set features have {bank.num_rows} rows, the checkpoint's vocabulary "
                f"has {config.num_icds} ICDs: wrong feature store?"
            )
        if query_features is None:
            query_features = features if features is not None else info.get("feature_store")
        return cls(model, bank, query_features=query_features, clip=clip, info=info)

    @staticmethod
    def _bank(features: Any, modalities: Sequence[str], device: Any) -> FeatureBank:
        if isinstance(features, Mapping):
            return FeatureBank({m: features[m] for m in modalities}, device=device)
        return FeatureBank.from_store(features, modalities, device=device)

    def _query_feats(self, queries: Any, query_features: Any) -> tuple[Features, int]:
        """({m: (B, D)}, B) for queries given as positions or as a feature mapping."""
        import numpy as np
        import torch

        names = self.model.config.query_features
        if isinstance(queries, Mapping):
            out = {}
            for m in names:
                if m not in queries:
                    raise ValueError(f"queries lack {m!r} features (model needs {list(names)})")
                out[m] = torch.as_tensor(np.asarray(queries[m]))
            sizes = {len(v) for v in queries.values()}
            if len(sizes) != 1:
                raise ValueError(f"query feature arrays disagree on the number of queries: {sizes}")
            return {m: t.to(self.device, torch.float32) for m, t in out.items()}, sizes.pop()
        positions = np.asarray(queries, dtype=np.int64).reshape(-1)
        if not names:
            return {}, len(positions)
        source = query_features if query_features is not None else self.query_features
        if source is None:
            raise ValueError("queries given as positions but no query feature store is known")
        if isinstance(source, Mapping):
            arrays = {m: source.get(m) for m in names}
        else:
            store = open_feature_store(source)
            arrays = {m: getattr(store, m, None) for m in names}
        out = {}
        for m, arr in arrays.items():
            if arr is None:
                raise ValueError(f"query feature store {source} has no {m!r} features")
            n = len(arr)
            bad = positions[(positions < 0) | (positions >= n)]
            if bad.size:
                raise IndexError(
                    f"query positions {bad[:5].tolist()} outside 0..{n - 1} of {source}"
                )
            out[m] = torch.as_tensor(np.asarray(arr[positions]))
        return {m: t.to(self.device, torch.float32) for m, t in out.items()}, len(positions)

    def select(
        self,
        queries: Any,
        shots: int,
        beam_size: int = 1,
        batch_size: int = 256,
        query_features: Any = None,
        exclude: Sequence[Sequence[int]] | None = None,
    ) -> list[list[int]]:
        """ICD positions (prompt order) for each query.

        queries: positions into the query feature store, or ``{modality: (B, D)}`` features.
        exclude[b]: positions query b must not get (e.g. its own position when queries come
        from the supporting set).
        """
        import torch

        feats, B = self._query_feats(queries, query_features)
        _check_decode_args(self.model, B, shots, beam_size, exclude)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[list[int]] = []
        with torch.inference_mode():
            for start in range(0, B, batch_size):
                n = min(batch_size, B - start)
                q = {m: t[start : start + n] for m, t in feats.items()}
                ex = exclude[start : start + n] if exclude is not None else None
                if beam_size == 1:
                    seqs = greedy_decode(self.model, q, self.bank, shots, exclude=ex, num_queries=n)
                else:
                    seqs = beam_decode(
                        self.model, q, self.bank, shots, beam_size, exclude=ex, num_queries=n
                    )
                out.extend(seqs.tolist())
        return out


def encode_collection(
    clip: Any,
    clip_model: str,
    collection: str | os.PathLike,
    task: str | None,
    modalities: Sequence[str],
    positions: Sequence[int] | None = None,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Encode (part of) a collection with a ``ClipEncoder``: {m: (n, D)} float32 on CPU."""
    import torch

    from leverlm.lever.data import ClipInputs

    io = ClipInputs(clip_model, str(collection), task)
    idx = list(range(len(io.collection))) if positions is None else [int(p) for p in positions]
    out: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    with torch.inference_mode():
        for s in range(0, len(idx), batch_size):
            inputs = io.inputs(idx[s : s + batch_size], modalities)
            if "image" in modalities:
                out["image"].append(clip.encode_pixels(inputs["image"]).float().cpu())
            if "text" in modalities:
                out["text"].append(clip.encode_tokens(inputs["text"]).float().cpu())
    return {m: torch.cat(v) for m, v in out.items()}


# -- the CLI ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leverlm select",
        description="Configure ICD sequences for a collection of queries with a trained Lever-LM.",
    )
    p.add_argument("--ckpt", required=True, help="Lever-LM checkpoint (.ckpt)")
    p.add_argument("--queries", required=True, help="collection of the queries (for their keys)")
    p.add_argument(
        "--query-features",
        default=None,
        help="feature store of the queries' collection (omit for clip_trainable checkpoints: "
        "the queries are encoded with the checkpoint's CLIP)",
    )
    p.add_argument(
        "--features",
        default=None,
        help="feature store of the supporting set (default: the one recorded in the checkpoint)",
    )
    p.add_argument("--shots", type=int, required=True, help="ICDs per query")
    p.add_argument("--beam-size", type=int, default=1, help="1 = greedy")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=None, help="only the first N queries")
    p.add_argument(
        "--exclude-self",
        action="store_true",
        help="never select a query's own position (queries drawn from the supporting set)",
    )
    p.add_argument("--out", required=True, help="output JSONL, written atomically")
    return p


def main(argv: list[str] | None = None) -> int:
    """``leverlm select``: write ``{"query_key", "query_position", "icd_positions"}`` lines."""
    args = _parser().parse_args(argv)
    if args.shots < 1:
        raise SystemExit(f"leverlm select: --shots must be >= 1, got {args.shots}")
    if args.beam_size < 1:
        raise SystemExit(f"leverlm select: --beam-size must be >= 1, got {args.beam_size}")
    for flag, value in (("--ckpt", args.ckpt), ("--queries", args.queries)):
        if not Path(value).exists():
            raise SystemExit(f"leverlm select: {flag} {value} does not exist")
    from leverlm.data.collection import Collection
    from leverlm.utils import atomic_open

    queries = Collection(args.queries)
    n = len(queries) if args.limit is None else min(args.limit, len(queries))
    positions = list(range(n))
    lm = LeverLM.from_checkpoint(args.ckpt, features=args.features, device=args.device)
    if args.query_features is not None:
        query_feats: Any = positions
        qsource: Any = args.query_features
        store = open_feature_store(args.query_features)
        for m in lm.model.config.query_features:
            arr = getattr(store, m, None)
            if arr is not None and len(arr) != len(queries):
                raise SystemExit(
                    f"leverlm select: --query-features {args.query_features} has {len(arr)} rows, "
                    f"--queries {args.queries} has {len(queries)} samples"
                )
    elif lm.clip is not None:
        query_feats = encode_collection(
            lm.clip,
            lm.info["clip_model"],
            args.queries,
            lm.info.get("task"),
            lm.model.config.query_features,
            positions=positions,
        )
        qsource = None
    else:
        raise SystemExit("leverlm select: --query-features is required for this checkpoint")
    exclude = [[p] for p in positions] if args.exclude_self else None
    selections = lm.select(
        query_feats,
        shots=args.shots,
        beam_size=args.beam_size,
        batch_size=args.batch_size,
        query_features=qsource,
        exclude=exclude,
    )
    keys = queries.keys
    with atomic_open(args.out, "w", encoding="utf-8") as fh:
        for pos, icds in zip(positions, selections, strict=True):
            row = {"query_key": keys[pos], "query_position": pos, "icd_positions": icds}
            fh.write(json.dumps(row) + "\n")
    print(f"leverlm select: {n} queries x {args.shots} shots -> {args.out}", file=sys.stderr)
    return 0
