"""The ``LeverLM`` API and ``leverlm select``: ICD sequences for queries from a trained Lever-LM.

A checkpoint alone rebuilds the network and finds the supporting set's features (recorded by
training). Queries are positions (rows of a query feature store; for a fine-tuned-CLIP
checkpoint, samples of a collection), feature tensors ``{modality: (B, D)}``, or raw queries
``{"image": file | PIL image, "question": text}``, encoded with the CLIP behind the supporting
set's features: the one named in the feature store's manifest (frozen CLIP) or the checkpoint's
own (``clip_trainable``).

A fine-tuned-CLIP checkpoint never reads frozen-CLIP stores: it encodes the supporting set with
its own CLIP once, caches the features in a folder named by the checkpoint's sha256 (default:
``support_features/`` beside the checkpoint) and reuses them on every later load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leverlm.lever import LeverLMError
from leverlm.lever.data import clip_skeleton, refuse_query_text
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

    from leverlm.lever.model import LeverLMConfig, LeverLMModel

log = logging.getLogger("leverlm.select")
CACHE_FORMAT = "leverlm-lever-support-features"


def _load_checkpoint(path: str | os.PathLike, authors: bool = False) -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise LeverLMError(f"Lever-LM checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - older/foreign pickles: our own checkpoints, trusted
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - whatever torch raises, name the file
            raise LeverLMError(f"Lever-LM checkpoint {path} cannot be read: {err}") from None
    ours = isinstance(ckpt, dict) and "leverlm_config" in ckpt and "state_dict" in ckpt
    theirs = authors and isinstance(ckpt, dict) and "state_dict" in ckpt
    if not (ours or theirs):
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise LeverLMError(
            f"{path} is not a Lever-LM checkpoint (no 'leverlm_config'/'state_dict'; keys: "
            f"{keys}); for the authors' checkpoints pass config=LeverLMConfig(...)"
        )
    return ckpt


class LeverLM:
    """A trained Lever-LM, ready to configure ICD sequences for queries.

    >>> lm = LeverLM.from_checkpoint("last.ckpt", support_features="features/train")
    >>> lm.select([0, 5, 7], shots=4, query_features="features/val")
    >>> lm.select([{"image": "cat.png", "question": "what is it?"}], shots=2)
    """

    def __init__(
        self,
        model: LeverLMModel,
        bank: FeatureBank | None,
        query_features: Any = None,
        clip: Any = None,
        info: dict[str, Any] | None = None,
        queries: str | None = None,
        encoder: dict[str, Any] | None = None,
    ):
        self.info = dict(info or {})
        refuse_query_text(self.info.get("task"), model.config.query_features)
        self.model = model.eval()
        self.bank = bank
        ensure_output_bank(model, bank)
        self.query_features = query_features
        self.clip = clip  # fine-tuned CLIP of a clip_trainable checkpoint, else None
        self.queries = queries  # the collection whose positions a fine-tuned CLIP encodes
        self.encoder = encoder  # manifest of the supporting set's store: the CLIP of raw queries
        self._raw_clip: Any = None
        self._encoded: dict[int, Features] = {}  # query position -> its fine-tuned-CLIP features

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        support_features: Any = None,
        query_features: Any = None,
        queries: str | os.PathLike | None = None,
        supporting_set: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        config: LeverLMConfig | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LeverLM:
        """Rebuild a trained Lever-LM.

        support_features: the supporting set's features - a feature-store folder, a store
        object, or a mapping ``{modality: (N, D)}``; default: the store recorded in the
        checkpoint. A store folder must have been built for the checkpoint's supporting set
        (checked by its manifest sha256 when the checkpoint records it). A ``clip_trainable``
        checkpoint takes only a mapping (features of its own CLIP); by default it encodes
        ``supporting_set`` (default: the recorded one) with its CLIP, cached in ``cache_dir``.
        query_features: default source for queries given as positions (default:
        ``support_features``, i.e. queries from the supporting set). For a ``clip_trainable``
        checkpoint, positions are samples of the ``queries`` collection (default: the
        supporting set) encoded with its CLIP.
        config: the architecture options of a checkpoint saved by the authors' code (their
        Lightning ``state_dict``; see :meth:`LeverLMModel.load_authors_state_dict`).
        """
        import torch

        from leverlm.lever.model import MODALITIES, LeverLMConfig, LeverLMModel

        ckpt = _load_checkpoint(path, authors=config is not None)
        if "leverlm_config" in ckpt:
            config = LeverLMConfig.from_dict(ckpt["leverlm_config"])
            info = dict(ckpt.get("leverlm_info", {}))
            model = LeverLMModel(config)
            sd = ckpt["state_dict"]
            model.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
        else:
            info, model = {}, LeverLMModel(config)
            if model.load_authors_state_dict(ckpt["state_dict"]):
                log.warning(
                    "%s: the authors' CLIP weights are not loaded; the features come from "
                    "support_features (right for their frozen-CLIP captioning checkpoints, not "
                    "for a fine-tuned CLIP)",
                    path,
                )
        model.to(device=device, dtype=dtype or torch.float32).eval()
        config = model.config
        # the ICD tokens' features, and the feature-tied output head's
        mods = tuple(
            m for m in MODALITIES if m in config.icd_features or m in config.output_features
        )
        bank, clip, encoder = None, None, None
        if info.get("clip_trainable"):
            refuse_frozen_store(support_features, "support_features", path, info)
            refuse_frozen_store(query_features, "query_features", path, info)
            clip = clip_skeleton(info["clip_model"])
            sd = ckpt["state_dict"]
            clip.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("clip.")})
            clip.to(device).eval()
            supporting_set = _supporting_set(path, info, supporting_set)
            if mods and support_features is None:
                support_features = cached_support_features(
                    path, clip, info, supporting_set, mods, cache_dir
                )
            queries = queries or supporting_set
        elif support_features is None:
            support_features = info.get("support_features")
        reads_features = mods or config.query_features
        if reads_features and not isinstance(support_features, Mapping | None):
            from leverlm.encoders.store import open_store

            support_features = open_store(
                support_features,
                info.get("supporting_set"),
                sha256=info.get("supporting_set_sha256"),
                what="support_features",
            )
            encoder = getattr(support_features, "manifest", None)
        if mods:
            if support_features is None:
                raise LeverLMError(f"{path}: no features given and none recorded in the checkpoint")
            if isinstance(support_features, Mapping):
                bank = FeatureBank({m: support_features[m] for m in mods}, device=device)
            else:
                bank = FeatureBank.from_store(support_features, mods, device=device)
            if bank.num_rows != config.num_icds:
                raise LeverLMError(
                    f"supporting-set features have {bank.num_rows} rows, the checkpoint's "
                    f"vocabulary has {config.num_icds} ICDs: wrong feature store?"
                )
        if query_features is None and clip is None:
            query_features = support_features
        queries = str(queries) if queries else None
        return cls(model, bank, query_features, clip, info, queries, encoder)

    # -- queries -----------------------------------------------------------------------------
    def _features_of(self, queries: Any, query_features: Any) -> tuple[int, Callable]:
        """``(B, batch(start, stop) -> {m: (n, D)})`` for queries of any accepted kind."""
        import numpy as np
        import torch

        names = self.model.config.query_features

        def to_device(feats: dict[str, Any]) -> Features:
            return {m: torch.as_tensor(t).to(self.device, torch.float32) for m, t in feats.items()}

        if isinstance(queries, Mapping):  # features
            missing = [m for m in names if m not in queries]
            if missing:
                raise LeverLMError(f"queries lack {missing} features (model needs {list(names)})")
            sizes = {len(v) for v in queries.values()}
            if len(sizes) != 1:
                raise LeverLMError(f"query feature arrays disagree on the query count: {sizes}")
            arrays = {m: np.asarray(queries[m]) for m in names}
            return sizes.pop(), lambda a, b: to_device({m: x[a:b] for m, x in arrays.items()})
        items = list(queries)
        if items and all(isinstance(q, Mapping) for q in items):  # raw queries
            for i, q in enumerate(items):
                check_raw_query(q, names, f"query {i}")
            return len(items), lambda a, b: to_device(self.encode_queries(items[a:b]))
        try:
            positions = np.asarray(items, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise LeverLMError(
                "queries must be positions (ints), {modality: features} or raw queries "
                '({"image": file, "question": text} each)'
            ) from None
        if not names:
            return len(positions), lambda a, b: {}
        source = query_features if query_features is not None else self.query_features
        if self.clip is not None:
            if source is None:
                return len(positions), self._encoded_positions(positions)
            refuse_frozen_store(source, "query_features", "", self.info)
        if source is None:
            raise LeverLMError("queries given as positions but no query feature store is known")
        if isinstance(source, Mapping):
            arrays = {m: source.get(m) for m in names}
        else:
            from leverlm.encoders.store import open_store

            store = open_store(source, what="query_features")
            arrays = {m: getattr(store, m, None) for m in names}
        for m, arr in arrays.items():
            if arr is None:
                raise LeverLMError(f"query feature store {source} has no {m!r} features")
            _check_positions(positions, len(arr), source)

        def rows(a: int, b: int) -> Features:
            return to_device({m: np.asarray(arr[positions[a:b]]) for m, arr in arrays.items()})

        return len(positions), rows

    def _encoded_positions(self, positions: Any) -> Callable:
        """Samples of ``self.queries`` encoded with the checkpoint's fine-tuned CLIP, each
        once (later calls gather the rows already encoded)."""
        import torch

        from leverlm.data.collection import read_manifest

        if not self.queries:
            raise LeverLMError("queries given as positions but no query collection is known")
        _check_positions(positions, int(read_manifest(self.queries)["num_samples"]), self.queries)
        names, info = self.model.config.query_features, self.info

        def rows(a: int, b: int) -> Features:
            want = positions[a:b].tolist()
            missing = sorted({p for p in want if p not in self._encoded})
            if missing:
                task = info.get("task")
                fresh = encode_collection(
                    self.clip, info["clip_model"], self.queries, task, names, positions=missing
                )
                self._encoded.update(
                    {p: {m: t[i] for m, t in fresh.items()} for i, p in enumerate(missing)}
                )
            return {
                m: torch.stack([self._encoded[p][m] for p in want]).to(self.device) for m in names
            }

        return rows

    def encode_queries(self, queries: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """Raw queries ``{"image": file | PIL image, "question": text}`` -> ``{m: (B, D)}``,
        encoded as the supporting set's features were."""
        import torch

        names = self.model.config.query_features
        clip, stored_fp16 = self._raw_encoder()
        out = {}
        with torch.inference_mode():
            if "image" in names:
                out["image"] = clip.encode_images([_image(q["image"]) for q in queries])
            if "text" in names:
                out["text"] = clip.encode_texts([str(q["question"]) for q in queries])
        # a store holds fp16 rows: a raw query is rounded alike, so it matches its stored twin
        return {m: t.half().float() if stored_fp16 else t.float() for m, t in out.items()}

    def _raw_encoder(self) -> tuple[Any, bool]:
        if self.clip is not None:
            return self.clip, False
        if self._raw_clip is None:
            m = self.encoder
            if m is None:
                raise LeverLMError(
                    "raw queries are encoded with the CLIP named in the supporting set's feature "
                    "store: load the checkpoint with support_features as a store folder"
                )
            self._raw_clip = load_store_clip(m, self.device)
        return self._raw_clip, True

    # -- selection ---------------------------------------------------------------------------
    def select(
        self,
        queries: Any,
        shots: int,
        beam_size: int = 1,
        batch_size: int = 256,
        query_features: Any = None,
        exclude: Sequence[Sequence[int]] | None = None,
        reverse_seq: bool = False,
        progress: bool = False,
    ) -> list[list[int]]:
        """ICD positions (prompt order) for each query.

        queries: positions into the query feature store (or the query collection of a
        fine-tuned-CLIP checkpoint), ``{modality: (B, D)}`` features, or raw queries
        ``[{"image": file | PIL image, "question": text}, ...]``.
        exclude[b]: positions query b must not get (e.g. its own position when queries come
        from the supporting set). reverse_seq: reverse each sequence (the authors' option;
        the first chosen ICD then sits next to the query). progress: a bar over query batches.
        """
        import torch

        B, batch_feats = self._features_of(queries, query_features)
        check_decode_args(self.model, B, shots, beam_size, exclude)
        if batch_size < 1:
            raise LeverLMError(f"batch_size must be >= 1, got {batch_size}")
        starts = range(0, B, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="selecting ICDs", unit="batch", dynamic_ncols=True)
        out: list[list[int]] = []
        with torch.inference_mode():
            for start in starts:
                n = min(batch_size, B - start)
                q = batch_feats(start, start + n)
                ex = exclude[start : start + n] if exclude is not None else None
                if beam_size == 1:
                    seqs = greedy_decode(self.model, q, self.bank, shots, exclude=ex, num_queries=n)
                else:
                    seqs = beam_decode(
                        self.model, q, self.bank, shots, beam_size, exclude=ex, num_queries=n
                    )
                out.extend(seqs.tolist())
        return [s[::-1] for s in out] if reverse_seq else out


def _check_positions(positions: Any, n: int, source: Any) -> None:
    bad = positions[(positions < 0) | (positions >= n)]
    if bad.size:
        raise LeverLMError(f"query positions {bad[:5].tolist()} outside 0..{n - 1} of {source}")


def _image(value: Any) -> Any:
    """A raw query's image: a PIL image, or a file decoded as collection images are."""
    if hasattr(value, "convert"):
        return value.convert("RGB")
    from leverlm.data.collection import decode_image

    return decode_image(Path(value).read_bytes(), f"query image {value}")


def check_raw_query(query: Mapping[str, Any], names: Sequence[str], where: str) -> None:
    """A raw query has what the model reads: an existing image file, a question text."""
    if "image" in names:
        image = query.get("image")
        if image is None:
            raise LeverLMError(f"{where} has no 'image' (the model reads query images)")
        if not hasattr(image, "convert") and not Path(image).is_file():
            raise LeverLMError(f"{where}: image file {image} does not exist")
    if "text" in names and not isinstance(query.get("question"), str):
        raise LeverLMError(f"{where} has no 'question' text (the model reads query texts)")


def refuse_frozen_store(value: Any, name: str, path: Any, info: dict[str, Any]) -> None:
    """A fine-tuned-CLIP checkpoint reads its own CLIP's features, never a frozen store's."""
    if value is not None and not isinstance(value, Mapping):
        raise LeverLMError(
            f"{path or 'this Lever-LM'} fine-tunes its CLIP ({info.get('clip_model')}): "
            f"{name} {value} holds another CLIP's features; omit it (the checkpoint's CLIP "
            "encodes the supporting set and the queries) or pass this CLIP's features as "
            "{modality: array}"
        )


def load_store_clip(manifest: dict[str, Any], device: Any = "cpu") -> Any:
    """The CLIP that wrote a feature store, rebuilt from its manifest (model name, checkpoint
    file checked by its sha256, precision, normalisation, random-init seed)."""
    from leverlm.encoders import load_clip
    from leverlm.utils import sha256_file

    checkpoint = manifest.get("checkpoint")
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise LeverLMError(
                f"the CLIP checkpoint {checkpoint} named in the supporting set's feature store "
                "manifest is missing: raw queries must be encoded with the CLIP of that store"
            )
        want = manifest.get("checkpoint_sha256")
        if want and sha256_file(checkpoint) != want:
            raise LeverLMError(
                f"the CLIP checkpoint {checkpoint} changed since the supporting set's feature "
                f"store was built (sha256 differs from {want[:12]}...)"
            )
    return load_clip(
        manifest["model_name"],
        checkpoint,
        device=device,
        precision=manifest.get("precision", "fp32"),
        normalize=bool(manifest.get("normalize")),
        seed=manifest.get("seed") or 0,
    )


# -- a fine-tuned CLIP's supporting-set features ---------------------------------------------
def _supporting_set(path: Any, info: dict[str, Any], given: Any) -> str:
    """The supporting set a fine-tuned-CLIP checkpoint encodes, checked against the one it was
    trained on."""
    from leverlm.utils import sha256_file

    coll = given or info.get("supporting_set")
    if not coll or not (Path(coll) / "manifest.json").is_file():
        raise LeverLMError(
            f"{path}: its CLIP encodes the supporting set, but the collection {coll!r} is not "
            "found: pass supporting_set"
        )
    want = info.get("supporting_set_sha256")
    if want and sha256_file(Path(coll) / "manifest.json") != want:
        raise LeverLMError(
            f"supporting set {coll} is not the collection {path} was trained on "
            "(its manifest sha256 differs)"
        )
    return str(coll)


def cached_support_features(
    ckpt: Any,
    clip: Any,
    info: dict[str, Any],
    collection: str,
    modalities: Sequence[str],
    cache_dir: Any = None,
) -> dict[str, Any]:
    """The supporting set encoded by a checkpoint's fine-tuned CLIP, ``{m: (N, D)}`` float32:
    read from ``cache_dir/<sha256[:16]>`` (default ``cache_dir``: ``support_features/``
    beside the checkpoint) when it holds this checkpoint's features, else encoded and saved
    there (a folder that cannot be written only costs the reuse)."""
    import shutil
    import tempfile

    import numpy as np

    from leverlm.utils import atomic_write_json, sha256_file

    sha = sha256_file(ckpt)
    folder = Path(cache_dir or Path(ckpt).parent / "support_features") / sha[:16]
    want = {
        "format": CACHE_FORMAT,
        "checkpoint_sha256": sha,
        "clip_model": info["clip_model"],
        "supporting_set_sha256": sha256_file(Path(collection) / "manifest.json"),
    }
    try:
        have = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if {k: have.get(k) for k in want} == want and set(modalities) <= set(have["modalities"]):
            log.info("supporting-set features of the fine-tuned CLIP: %s", folder)
            return {m: np.load(folder / f"{m}.npy", mmap_mode="r") for m in modalities}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: encode again
    log.info("encoding the supporting set %s with the checkpoint's fine-tuned CLIP", collection)
    task = info.get("task")
    feats = encode_collection(clip, info["clip_model"], collection, task, modalities, progress=True)
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        for m, t in feats.items():
            np.save(tmp / f"{m}.npy", t.numpy())
        rows = len(next(iter(feats.values())))
        atomic_write_json(
            tmp / "manifest.json", {**want, "modalities": list(feats), "num_rows": rows}
        )
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)  # fails when another process just put its (equal) copy there
        log.info("cached in %s", folder)
    except OSError as err:
        log.warning("cannot cache the supporting set's features in %s: %s", folder, err)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return feats


def encode_collection(
    clip: Any,
    clip_model: str,
    collection: str | os.PathLike,
    task: str | None,
    modalities: Sequence[str],
    positions: Sequence[int] | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Encode (part of) a collection with a ``ClipEncoder``: {m: (n, D)} float32 on CPU."""
    import torch

    from leverlm.lever.data import ClipInputs

    io = ClipInputs(clip_model, str(collection), task)
    idx = list(range(len(io.collection))) if positions is None else [int(p) for p in positions]
    out: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    starts = range(0, len(idx), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"encoding {Path(collection).name}", unit="batch")
    with torch.inference_mode():
        for s in starts:
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
        description="Configure ICD sequences for queries with a trained Lever-LM: the samples "
        "of a collection (--queries) or raw queries (--images/--questions, or --jsonl).",
    )
    p.add_argument("--ckpt", required=True, help="Lever-LM checkpoint (.ckpt)")
    p.add_argument("--queries", default=None, help="a collection whose samples are the queries")
    p.add_argument("--images", nargs="+", default=None, help="raw queries: image files")
    p.add_argument(
        "--questions", nargs="+", default=None,
        help="raw queries: question texts (one per image, in order)",
    )  # fmt: skip
    p.add_argument(
        "--jsonl", default=None,
        help='raw queries, a JSON object a line: {"image": file, "question": text} (relative '
        "image paths are read from the file's folder; other fields are copied to the output)",
    )  # fmt: skip
    p.add_argument(
        "--query_features",
        default=None,
        help="feature store of --queries (omit for clip_trainable checkpoints: the queries are "
        "encoded with the checkpoint's CLIP)",
    )
    p.add_argument(
        "--support_features",
        default=None,
        help="feature store of the supporting set (default: the one recorded in the checkpoint)",
    )
    p.add_argument(
        "--cache_dir", default=None,
        help="clip_trainable checkpoints: where the supporting set's features are cached "
        "(default: support_features/ beside the checkpoint)",
    )  # fmt: skip
    p.add_argument("--shots", type=int, required=True, help="ICDs per query")
    p.add_argument("--beam_size", type=int, default=1, help="1 = greedy")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=None, help="only the first N queries")
    p.add_argument(
        "--exclude_self",
        action="store_true",
        help="never select a query's own position (--queries drawn from the supporting set)",
    )
    p.add_argument(
        "--reverse_seq", action="store_true",
        help="reverse each sequence (the authors' option: the first chosen ICD next to the query)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output JSONL, written atomically")
    return p


def raw_queries(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The raw queries of ``--images``/``--questions`` or ``--jsonl`` (None: ``--queries``)."""
    from leverlm.utils import read_jsonl

    given = [f for f in ("queries", "images", "jsonl") if getattr(args, f)]
    given += ["questions"] if args.questions and not args.images else []
    if len(given) != 1:
        raise LeverLMError(
            "leverlm select: give the queries one way: --queries COLLECTION, --images "
            f"[--questions], --questions, or --jsonl FILE (got {', '.join(given) or 'none'})"
        )
    if args.queries:
        return None
    if args.jsonl:
        if not Path(args.jsonl).is_file():
            raise LeverLMError(f"leverlm select: --jsonl {args.jsonl} does not exist")
        out = []
        for where, obj in read_jsonl(args.jsonl, LeverLMError):
            if not isinstance(obj, dict):
                raise LeverLMError(f"{where}: expected a JSON object")
            if isinstance(obj.get("image"), str):
                obj["image"] = str(Path(args.jsonl).parent / obj["image"])
            out.append(obj)
        return out
    images, questions = args.images or [], args.questions or []
    if images and questions and len(images) != len(questions):
        raise LeverLMError(
            f"leverlm select: {len(images)} --images but {len(questions)} --questions "
            "(one question per image)"
        )
    n = max(len(images), len(questions))
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for row, image in zip(rows, images, strict=False):
        row["image"] = image
    for row, question in zip(rows, questions, strict=False):
        row["question"] = question
    return rows


def main(argv: list[str] | None = None) -> int:
    """``leverlm select``: write ``{"query_key", "query_position", "icd_positions"}`` lines
    (raw queries: the query's own fields and ``icd_positions``)."""
    args = _parser().parse_args(argv)
    if args.shots < 1:
        raise LeverLMError(f"leverlm select: --shots must be >= 1, got {args.shots}")
    if args.beam_size < 1:
        raise LeverLMError(f"leverlm select: --beam_size must be >= 1, got {args.beam_size}")
    for flag in ("ckpt", "queries", "query_features", "support_features"):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            raise LeverLMError(f"leverlm select: --{flag} {value} does not exist")
    raw = raw_queries(args)
    if raw is not None and (args.exclude_self or args.query_features):
        raise LeverLMError("leverlm select: --exclude_self and --query_features need --queries")
    from leverlm.data.collection import Collection
    from leverlm.encoders.store import open_store
    from leverlm.utils import atomic_open

    lm = LeverLM.from_checkpoint(
        args.ckpt,
        support_features=args.support_features,
        queries=args.queries,
        cache_dir=args.cache_dir,
        device=args.device,
    )
    if raw is not None:
        queries: Any = raw[: args.limit] if args.limit is not None else raw
        n, qsource, exclude = len(queries), None, None
    else:
        collection = Collection(args.queries)
        n = len(collection) if args.limit is None else min(args.limit, len(collection))
        queries = list(range(n))
        exclude = [[p] for p in queries] if args.exclude_self else None
        qsource = None
        if args.query_features is not None:
            qsource = open_store(args.query_features, collection, what="--query_features")
        elif lm.clip is None:
            raise LeverLMError("leverlm select: --query_features is required for this checkpoint")
    selections = lm.select(
        queries,
        shots=args.shots,
        beam_size=args.beam_size,
        batch_size=args.batch_size,
        query_features=qsource,
        exclude=exclude,
        reverse_seq=args.reverse_seq,
        progress=True,
    )
    with atomic_open(args.out, "w", encoding="utf-8") as fh:
        for i, icds in enumerate(selections):
            if raw is not None:
                row = {k: v for k, v in queries[i].items() if k != "icd_positions"}
            else:
                row = {"query_key": collection.keys[i], "query_position": i}
            fh.write(json.dumps({**row, "icd_positions": icds}) + "\n")
    print(f"leverlm select: {n} queries x {args.shots} shots -> {args.out}", file=sys.stderr)
    return 0


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``leverlm_info`` of a Lever-LM checkpoint, read memory-mapped (cheap)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip checkpoint (no mmap): read it whole
        ckpt = _load_checkpoint(path, authors=True)
    return dict(ckpt.get("leverlm_info") or {}) if isinstance(ckpt, dict) else {}
