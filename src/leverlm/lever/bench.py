"""Lever-LM benchmarks: each fast path against its straightforward reference, same process.

- ``train``: training sequences/s with CLIP features gathered from a (memory-mapped) feature
  store, vs the same Lever-LM step with a frozen ViT-B/32-sized open_clip model (random
  weights) encoding the query and ICD images/texts of every batch.
- ``select``: queries/s choosing ``shots`` ICDs: batched greedy decoding with a KV cache, vs
  one query at a time recomputing the whole prefix every step (:func:`reference_decode`);
  both pick the same ICDs (checked on the queries the reference decodes).

Both follow ``leverlm.bench``'s registry signature: ``bench_x(argv) -> list[dict]``, printing
one JSON line per result.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any


def _emit(record: dict[str, Any]) -> dict[str, Any]:
    try:
        from leverlm.bench import emit
    except ImportError:  # pragma: no cover - the registry module is optional here
        import json

        print(json.dumps(record), flush=True)
        return record
    return emit(record)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-icds", type=int, default=20_000, help="supporting-set size (vocabulary)")
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument(
        "--feature-dim", type=int, default=512, help="CLIP feature size (train: the CLIP's own)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--seed", type=int, default=0)


def _check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, names: list[str]) -> None:
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Set torch CPU threads for one bench and restore them after (benches run in-process)."""
    import torch

    from leverlm.utils import set_cpu_threads

    before = torch.get_num_threads()
    set_cpu_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _model(
    args: argparse.Namespace, query_features: tuple[str, ...], icd_features: tuple[str, ...]
) -> Any:
    import torch

    from leverlm.lever.model import LeverLMConfig, LeverLMModel

    torch.manual_seed(args.seed)
    cfg = LeverLMConfig(
        num_icds=args.num_icds,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        feature_dim=args.feature_dim,
        query_features=query_features,
        icd_features=icd_features,
        dropout=0.0,
    )
    return LeverLMModel(cfg).to(args.device)


# -- train -----------------------------------------------------------------------------------
def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leverlm bench train",
        description="Lever-LM training sequences/s: features from the store vs frozen CLIP per batch",
    )
    _common(p)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps on the store path")
    p.add_argument("--clip-batch-size", type=int, default=4, help="batch on the CLIP path")
    p.add_argument("--clip-steps", type=int, default=1, help="timed steps on the CLIP path")
    p.add_argument(
        "--clip-model", default="ViT-B-32", help="open_clip architecture (random weights)"
    )
    return p


def _bench_train(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[dict[str, Any]]:
    """Training throughput, captioning setting (query image; ICD image + text)."""
    import numpy as np
    import torch

    from leverlm.encoders import load_clip
    from leverlm.lever.data import SequenceCollator

    # the reference path's frozen CLIP, built (and its size checked) before any timing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are the point here: only time is measured
        clip = load_clip(args.clip_model, None, device=args.device, seed=args.seed)
    for prm in clip.parameters():
        prm.requires_grad_(False)
    size = clip.model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    ctx = int(getattr(clip.model, "context_length", 77))
    # the store holds this CLIP's features, so the Lever-LM reads features of its size
    args.feature_dim = int(clip.dim)

    rng = np.random.default_rng(args.seed)
    query_f, icd_f = ("image",), ("image", "text")
    model = _model(args, query_f, icd_f).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    N, D = args.num_icds, args.feature_dim

    def items(n: int) -> list[dict[str, Any]]:
        return [
            {
                "query_position": int(rng.integers(N)),
                "icds": rng.choice(N, size=args.shots, replace=False).tolist(),
            }
            for _ in range(n)
        ]

    def step(batch: dict[str, Any], query: dict, icd: dict) -> None:
        dev = args.device
        _, loss = model(
            batch["tokens"].to(dev),
            {m: t.to(dev) for m, t in query.items()},
            {m: t.to(dev) for m, t in icd.items()},
            batch["targets"].to(dev),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with tempfile.TemporaryDirectory() as tmp:
        # a real memory-mapped fp16 store, as leverlm.encoders.FeatureStore opens it
        arrays = {}
        for m in ("image", "text"):
            arr = np.lib.format.open_memmap(
                f"{tmp}/{m}.npy", mode="w+", dtype=np.float16, shape=(N, D)
            )
            arr[:] = rng.standard_normal((N, D)).astype(np.float16)
            arr.flush()
            arrays[m] = np.load(f"{tmp}/{m}.npy", mmap_mode="r")
        collate = SequenceCollator(N, SimpleNamespace(**arrays), query_f, icd_f)
        b = collate(items(args.batch_size))
        step(b, b["query_feats"], b["icd_feats"])  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            b = collate(items(args.batch_size))
            step(b, b["query_feats"], b["icd_feats"])
        _sync(args.device)
        store_rate = args.steps * args.batch_size / (time.perf_counter() - t0)

    # reference: the frozen CLIP encodes every batch's images and texts (decode/resize not even
    # counted: pixels and tokens are ready-made tensors)
    def clip_step(n: int) -> None:
        b = collate_ids(items(n))
        B, L = b["tokens"].shape
        is_icd = b["tokens"] < N
        n_icd = int(is_icd.sum())
        with torch.no_grad():
            q_img = clip.encode_pixels(torch.randn(B, 3, *size))
            icd_img = clip.encode_pixels(torch.randn(n_icd, 3, *size))
            icd_txt = clip.encode_tokens(torch.randint(1, 49000, (n_icd, ctx)))
        idx = is_icd.reshape(-1).nonzero().squeeze(1).to(args.device)
        icd = {}
        for m, x in (("image", icd_img), ("text", icd_txt)):
            icd[m] = x.new_zeros(B * L, x.shape[-1]).index_copy(0, idx, x).view(B, L, -1)
        step(b, {"image": q_img}, icd)

    collate_ids = SequenceCollator(N, None, (), ())
    clip_step(2)  # warm-up
    _sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.clip_steps):
        clip_step(args.clip_batch_size)
    _sync(args.device)
    clip_rate = args.clip_steps * args.clip_batch_size / (time.perf_counter() - t0)
    return [
        _emit(
            {
                "bench": "train",
                "num_icds": N,
                "shots": args.shots,
                "device": str(args.device),
                "threads": torch.get_num_threads(),
                "store_batch_size": args.batch_size,
                "clip_batch_size": args.clip_batch_size,
                "clip_model": args.clip_model,
                "feature_dim": args.feature_dim,
                "store_seq_per_s": round(store_rate, 2),
                "clip_seq_per_s": round(clip_rate, 2),
                "speedup": round(store_rate / clip_rate, 2),
            }
        )
    ]


# -- select ----------------------------------------------------------------------------------
def select_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leverlm bench select",
        description="Lever-LM decoding queries/s: batched + KV cache vs one query, no cache",
    )
    _common(p)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--queries", type=int, default=128, help="queries decoded on the fast path")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reference-queries", type=int, default=4, help="queries on the reference path")
    return p


def _bench_select(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[dict[str, Any]]:
    """Decoding throughput, VQA feature setting (query image + text; ICD image + text)."""
    import torch

    from leverlm.lever.generate import FeatureBank, greedy_decode, reference_decode

    feats = ("image", "text")
    model = _model(args, feats, feats).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    bank = FeatureBank(
        {m: torch.randn(args.num_icds, args.feature_dim, generator=g) for m in feats},
        device=args.device,
    )
    q = {m: torch.randn(args.queries, args.feature_dim, generator=g).to(args.device) for m in feats}

    def fast(sub: dict[str, torch.Tensor]) -> torch.Tensor:
        n = next(iter(sub.values())).shape[0]
        outs = [
            greedy_decode(
                model, {m: t[s : s + args.batch_size] for m, t in sub.items()}, bank, args.shots
            )
            for s in range(0, n, args.batch_size)
        ]
        return torch.cat(outs)

    with torch.inference_mode():
        fast({m: t[: min(8, args.queries)] for m, t in q.items()})  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        fast_out = fast(q)
        _sync(args.device)
        fast_rate = args.queries / (time.perf_counter() - t0)
        ref_q = {m: t[: args.reference_queries] for m, t in q.items()}
        reference_decode(model, {m: t[:1] for m, t in q.items()}, bank, args.shots)  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        ref_out = reference_decode(model, ref_q, bank, args.shots)
        _sync(args.device)
        ref_rate = args.reference_queries / (time.perf_counter() - t0)
    same = fast_out[: args.reference_queries].tolist() == ref_out.tolist()
    return [
        _emit(
            {
                "bench": "select",
                "num_icds": args.num_icds,
                "shots": args.shots,
                "device": str(args.device),
                "threads": torch.get_num_threads(),
                "batch_size": args.batch_size,
                "fast_queries_per_s": round(fast_rate, 2),
                "reference_queries_per_s": round(ref_rate, 2),
                "speedup": round(fast_rate / ref_rate, 2),
                "same_selections": same,
            }
        )
    ]


def bench_train(argv: list[str]) -> list[dict[str, Any]]:
    """``leverlm bench train``: training throughput, store features vs CLIP on every batch."""
    p = train_parser()
    args = p.parse_args(argv)
    _check_positive(
        p, args, ["num_icds", "shots", "batch_size", "steps", "clip_batch_size", "clip_steps"]
    )
    with _threads(args.threads):
        return _bench_train(args, p)


def bench_select(argv: list[str]) -> list[dict[str, Any]]:
    """``leverlm bench select``: decoding throughput, batched + KV cache vs reference."""
    p = select_parser()
    args = p.parse_args(argv)
    _check_positive(p, args, ["num_icds", "shots", "queries", "batch_size", "reference_queries"])
    if args.reference_queries > args.queries:
        p.error("--reference-queries must be <= --queries")
    with _threads(args.threads):
        return _bench_select(args, p)
