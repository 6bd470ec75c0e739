"""The ``LeverLM`` API and ``leverlm select``: ICD sequences for queries from a trained Lever-LM.

A checkpoint alone rebuilds the network and finds the supporting set's features (recorded by
training); queries are positions in a query feature store, feature tensors, or (for a
checkpoint with a fine-tuned CLIP) samples of a collection encoded with that CLIP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leverlm.lever.decode import (
    FeatureBank,
    Features,
    beam_decode,
    check_decode_args,
    ensure_output_bank,
    greedy_decode,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from leverlm.lever.model import LeverLMModel


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

    >>> lm = LeverLM.from_checkpoint("last.ckpt", support_features="features/train")
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
        ensure_output_bank(model, bank)
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
        support_features: Any = None,
        query_features: Any = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LeverLM:
        """Rebuild a trained Lever-LM.

        support_features: the supporting set's features - a feature-store folder, a store
        object, or a mapping ``{modality: (N, D)}``; default: the store recorded in the
        checkpoint. A store folder must have been built for the checkpoint's supporting set
        (checked by its manifest sha256 when the checkpoint records it). For a checkpoint
        trained with ``clip_trainable`` and no ``support_features`` given, the supporting set
        is encoded once with the checkpoint's fine-tuned CLIP.
        query_features: default store for queries given as positions (default:
        ``support_features``, i.e. queries from the supporting set).
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
        bank = None  # indices only: nothing to gather
        if mods and support_features is not None:
            bank = cls._bank(support_features, mods, device, info)
        elif mods and clip is not None:
            coll = info.get("supporting_set")
            if not coll:
                raise ValueError(f"{path}: clip_trainable checkpoint without a supporting_set path")
            feats = encode_collection(clip, info["clip_model"], coll, info.get("task"), mods)
            bank = FeatureBank(feats, device=device)
        elif mods and info.get("support_features"):
            bank = cls._bank(info["support_features"], mods, device, info)
        elif mods:
            raise ValueError(f"{path}: no features given and none recorded in the checkpoint")
        if bank is not None and bank.num_rows != config.num_icds:
            raise ValueError(
                f"supporting-set features have {bank.num_rows} rows, the checkpoint's vocabulary "
                f"has {config.num_icds} ICDs: wrong feature store?"
            )
        if query_features is None:
            query_features = (
                support_features if support_features is not None else info.get("support_features")
            )
        return cls(model, bank, query_features=query_features, clip=clip, info=info)

    @staticmethod
    def _bank(
        features: Any, modalities: Sequence[str], device: Any, info: dict[str, Any]
    ) -> FeatureBank:
        if isinstance(features, Mapping):
            return FeatureBank({m: features[m] for m in modalities}, device=device)
        from leverlm.encoders.store import open_store

        store = open_store(
            features,
            info.get("supporting_set"),
            sha256=info.get("supporting_set_sha256"),
            what="support_features",
        )
        return FeatureBank.from_store(store, modalities, device=device)

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
            from leverlm.encoders.store import open_store

            store = open_store(source, what="query_features")
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
        check_decode_args(self.model, B, shots, beam_size, exclude)
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
        "--query_features",
        default=None,
        help="feature store of the queries' collection (omit for clip_trainable checkpoints: "
        "the queries are encoded with the checkpoint's CLIP)",
    )
    p.add_argument(
        "--support_features",
        default=None,
        help="feature store of the supporting set (default: the one recorded in the checkpoint)",
    )
    p.add_argument("--shots", type=int, required=True, help="ICDs per query")
    p.add_argument("--beam_size", type=int, default=1, help="1 = greedy")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=None, help="only the first N queries")
    p.add_argument(
        "--exclude_self",
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
        raise SystemExit(f"leverlm select: --beam_size must be >= 1, got {args.beam_size}")
    for flag, value in (("--ckpt", args.ckpt), ("--queries", args.queries)):
        if not Path(value).exists():
            raise SystemExit(f"leverlm select: {flag} {value} does not exist")
    from leverlm.data.collection import Collection
    from leverlm.encoders.store import open_store
    from leverlm.utils import atomic_open

    queries = Collection(args.queries)
    n = len(queries) if args.limit is None else min(args.limit, len(queries))
    positions = list(range(n))
    query_feats: Any = positions
    lm = LeverLM.from_checkpoint(
        args.ckpt, support_features=args.support_features, device=args.device
    )
    if args.query_features is not None:
        qsource: Any = open_store(args.query_features, queries, what="--query_features")
    if args.query_features is None:
        if lm.clip is None:
            raise SystemExit("leverlm select: --query_features is required for this checkpoint")
        query_feats = encode_collection(
            lm.clip,
            lm.info["clip_model"],
            args.queries,
            lm.info.get("task"),
            lm.model.config.query_features,
            positions=positions,
        )
        qsource = None
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
