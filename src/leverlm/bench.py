"""``leverlm bench``: fast paths against their straightforward reference paths, same process.

- ``scoring``: InfoScore candidates/s, :func:`~leverlm.gt.scoring.score_candidates` (batched,
  features cached, the prefix encoded once) vs the reference that scores one at a time.
- ``train``: Lever-LM training sequences/s with CLIP features gathered from a (memory-mapped)
  feature store, vs the same step with a frozen ViT-B/32-sized open_clip model (random
  weights) encoding the query and ICD images/texts of every batch.
- ``select``: queries/s choosing ``shots`` ICDs: batched greedy decoding with a KV cache, vs
  one query at a time recomputing the whole prefix every step
  (:func:`~leverlm.lever.decode.reference_decode`); both pick the same ICDs (checked on the
  queries the reference decodes).

``leverlm bench`` runs every bench with its defaults; ``leverlm bench NAME [options]`` runs one
(``leverlm bench scoring --help``). Each bench prints one JSON line per case and returns the
result dicts it printed; add one by adding ``name -> function(argv)`` to :data:`BENCHES`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def emit(record: dict[str, Any]) -> dict[str, Any]:
    """Print one result as a JSON line (flushed: benches are watched live)."""
    print(json.dumps(record, sort_keys=False), flush=True)
    return record


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Torch CPU threads for one bench (None: all cores), restored after: benches share a
    process."""
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: leverlm bench [NAME [options]]\n\nbenches: " + ", ".join(BENCHES))
        print("Run 'leverlm bench NAME --help' for a bench's options; no NAME runs them all.")
        return 0
    if not argv or argv[0] == "all":
        for bench in BENCHES.values():
            bench([])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(
            f"leverlm bench: unknown bench {name!r}; benches: {', '.join(BENCHES)}", file=sys.stderr
        )
        return 2
    BENCHES[name](rest)
    return 0


# --------------------------------------------------------------------------------------------
# scoring: InfoScore of 64 candidates, fast vs reference
# --------------------------------------------------------------------------------------------


def scoring_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leverlm bench scoring",
        description="InfoScore candidates/s: score_candidates vs score_candidates_reference",
    )
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated model types, or 'all' for every type whose tiny model builds here "
        "(default: idefics,idefics2; idefics with --config_size real)",
    )
    p.add_argument("--orders", default="left,right", help="comma-separated: left,right")
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--shots", type=int, default=2, help="ICDs already in the prefix S")
    p.add_argument(
        "--beams",
        type=int,
        default=5,
        help="fast path: calls per case, each with another S, as the beams of one beam-search "
        "step score the same candidates (paper: beam 5); the first call starts with an empty "
        "feature cache, so fast_per_s includes computing every image's features once",
    )
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument(
        "--vision_batch_size",
        type=int,
        default=None,
        help="images per vision forward (the adapter's vision_batch_size; default: its own)",
    )
    p.add_argument(
        "--reference_candidates",
        type=int,
        default=8,
        help="candidates timed on the reference path (its rate is per candidate)",
    )
    p.add_argument("--task", default="vqa_idefics")
    p.add_argument("--image_size", default="640x480", help="synthetic source images, WxH")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--config_size",
        choices=("tiny", "real"),
        default="tiny",
        help="tiny: the 'bench' tiny model (a checkpoint folder through load_lvlm); real: the "
        "real architecture (IDEFICS-9B) randomly initialised from its config on --device",
    )
    p.add_argument(
        "--tiny_size",
        choices=("test", "bench"),
        default="bench",
        help="size of the tiny model built for --config_size tiny",
    )
    p.add_argument("--model_dir", default=None, help="load this checkpoint instead (one model)")
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="device peak TFLOP/s; adds the fast path's achieved fraction of it",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for both paths (default 1: on a shared CPU, threads that wait "
        "on each other distort timings; 0 keeps torch's default)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_scoring_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check ``leverlm bench scoring`` options (errors name the option)."""
    p = scoring_parser()
    args = p.parse_args(argv)
    args.orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    for order in args.orders:
        if order not in ("left", "right"):
            p.error(f"--orders: unknown order {order!r}; use left,right")
    _check_at_least(
        p,
        args,
        1,
        ["candidates", "batch_size", "beams", "reference_candidates", "vision_batch_size"],
    )
    _check_at_least(p, args, 0, ["shots", "threads"])
    try:
        w, h = (int(x) for x in args.image_size.lower().split("x"))
    except ValueError:
        p.error(f"--image_size must be WxH, got {args.image_size!r}")
    args.image_size = (w, h)
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak_tflops must be > 0, got {args.peak_tflops}")
    from leverlm.lvlm.tiny import tiny_model_types

    known = tiny_model_types()
    if args.models is None:
        args.models = "idefics" if args.config_size == "real" else "idefics,idefics2"
    if args.models == "all":
        args.models = known
    else:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        for m in args.models:
            if m not in known:
                p.error(f"--models: unknown model type {m!r}; known: {', '.join(known)}")
    if args.model_dir and len(args.models) != 1:
        p.error("--model_dir needs exactly one --models type")
    if args.config_size == "real" and any(m not in _REAL_BUILDERS for m in args.models):
        p.error(
            f"--config_size real is available for: {', '.join(_REAL_BUILDERS)} "
            f"(got --models {','.join(args.models)})"
        )
    return args


def bench_scoring(argv: list[str]) -> list[dict[str, Any]]:
    """Run the scoring bench; one JSON line per (model, order)."""
    args = parse_scoring_args(argv)
    import torch

    from leverlm.lvlm.base import resolve_dtype

    resolve_dtype(args.dtype)
    # --threads 0 keeps torch's default
    with _threads(args.threads or torch.get_num_threads()):
        return _bench_scoring(args)


def _bench_scoring(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for model_type in args.models:
        try:
            lvlm = _bench_lvlm(model_type, args)
        except ImportError as err:  # an optional dependency (open_flamingo) is missing
            if len(args.models) == 1:
                raise
            results.append(emit({"bench": "scoring", "model": model_type, "skipped": str(err)}))
            continue
        for order in args.orders:
            results.append(emit(_scoring_case(lvlm, model_type, order, args)))
    return results


def _bench_lvlm(model_type: str, args: argparse.Namespace) -> Any:
    from leverlm.lvlm import load_lvlm
    from leverlm.lvlm.tiny import build_tiny

    if args.config_size == "real":
        return _REAL_BUILDERS[model_type](args)
    kw: dict[str, Any] = dict(dtype=args.dtype, device=args.device)
    if args.vision_batch_size:
        kw["vision_batch_size"] = args.vision_batch_size
    if args.model_dir:
        return load_lvlm(model_type, args.model_dir, args.task, **kw)
    folder = tempfile.mkdtemp(prefix=f"leverlm-bench-{model_type}-")
    path = build_tiny(model_type, f"{folder}/model", seed=args.seed, size=args.tiny_size)
    return load_lvlm(model_type, path, args.task, **kw)


def _real_idefics(args: argparse.Namespace) -> Any:
    """IDEFICS-9B's architecture, random weights made on the device (no download, no disk)."""
    import torch
    from transformers import (
        IdeficsConfig,
        IdeficsForVisionText2Text,
        IdeficsImageProcessor,
        IdeficsProcessor,
    )

    from leverlm.lvlm.base import resolve_dtype
    from leverlm.lvlm.idefics import IdeficsLVLM
    from leverlm.lvlm.tiny import IDEFICS_SPECIAL_TOKENS, idefics_config_kwargs, llama_tokenizer
    from leverlm.tasks import get_task

    tokenizer = llama_tokenizer(IDEFICS_SPECIAL_TOKENS)
    config = IdeficsConfig(**idefics_config_kwargs("9b"))
    dtype = resolve_dtype(args.dtype)
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = IdeficsForVisionText2Text(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # open the gates, as a trained model has them
        for layer in model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.fill_(0.5)
            layer.alpha_dense.fill_(0.5)
    processor = IdeficsProcessor(
        image_processor=IdeficsImageProcessor(image_size=config.vision_config.image_size),
        tokenizer=tokenizer,
    )
    kw = {"vision_batch_size": args.vision_batch_size} if args.vision_batch_size else {}
    return IdeficsLVLM(model, processor, get_task(args.task), device=args.device, dtype=dtype, **kw)


# model_type -> builder of a real-size random model (``--config_size real``)
_REAL_BUILDERS: dict[str, Callable[[argparse.Namespace], Any]] = {"idefics": _real_idefics}


class _WorkCounter:
    """Approximate model FLOPs actually run: 2 x params x tokens, for text and vision.

    Counts the text tokens every forward of the text model processes (padding included: it is
    work done) and the images the vision tower encodes; attention's quadratic term is left out
    (prompts are short), so the FLOP/s fraction is a slight underestimate.
    """

    def __init__(self, lvlm: Any) -> None:
        inner = lvlm.model.model
        vision = [inner.vision_model] + (
            [inner.perceiver_resampler] if getattr(inner, "perceiver_resampler", None) else []
        )
        vision_params = sum(p.numel() for m in vision for p in m.parameters())
        embed = sum(p.numel() for p in inner.embed_tokens.parameters())
        text_params = sum(p.numel() for p in inner.parameters()) - vision_params - embed
        vc = lvlm.config.vision_config
        self.text_flops_per_token = 2 * text_params
        self.vision_flops_per_image = (
            2 * vision_params * ((vc.image_size // vc.patch_size) ** 2 + 1)
        )
        self.text_tokens = 0
        self.images = 0
        self._handles = [
            inner.register_forward_pre_hook(self._count_text, with_kwargs=True),
            inner.vision_model.register_forward_pre_hook(self._count_images, with_kwargs=True),
        ]

    def _count_text(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.text_tokens += int(ids.numel())

    def _count_images(self, module: Any, args: tuple, kwargs: dict) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        if pixels is not None:
            self.images += int(pixels.shape[0])

    @property
    def flops(self) -> float:
        return (
            self.text_tokens * self.text_flops_per_token + self.images * self.vision_flops_per_image
        )

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _scoring_case(lvlm: Any, model_type: str, order: str, args: argparse.Namespace) -> dict:
    import torch

    from leverlm.gt.scoring import score_candidates, score_candidates_reference
    from leverlm.lvlm.tiny import synthetic_samples

    k, shots, beams = args.candidates, args.shots, args.beams
    pool = synthetic_samples(
        k + shots * beams + 1, seed=args.seed, image_size=args.image_size, key_prefix="bench"
    )
    candidates, query = pool[:k], pool[k]
    prefixes = [pool[k + 1 + b * shots : k + 1 + (b + 1) * shots] for b in range(beams)]

    # warm-up: first-call costs (kernels, allocator, lazy imports) are not what we measure
    score_candidates(lvlm, prefixes[0], query, candidates[:2], order, batch_size=2)
    lvlm.feature_cache.clear()
    lvlm.prefix_cache.clear()

    # The FLOP count knows IDEFICS's layout (vision tower + perceiver + text model) only.
    countable = model_type == "idefics" and hasattr(lvlm, "config")
    counter = _WorkCounter(lvlm) if args.peak_tflops and countable else None
    times = []
    fast = None
    for prefix in prefixes:
        _sync(args.device)
        t0 = time.perf_counter()
        scores = score_candidates(
            lvlm, prefix, query, candidates, order, batch_size=args.batch_size
        )
        _sync(args.device)
        times.append(time.perf_counter() - t0)
        fast = scores if fast is None else fast
    if counter is not None:
        counter.close()

    n_ref = min(args.reference_candidates, k)
    _sync(args.device)
    t0 = time.perf_counter()
    ref = score_candidates_reference(lvlm, prefixes[0], query, candidates[:n_ref], order)
    _sync(args.device)
    ref_time = time.perf_counter() - t0

    fast_per_s = k * beams / sum(times)
    reference_per_s = n_ref / ref_time
    record: dict[str, Any] = {
        "bench": "scoring",
        "model": model_type,
        "order": order,
        "candidates": k,
        "shots": shots,
        "fast_per_s": round(fast_per_s, 2),
        "reference_per_s": round(reference_per_s, 2),
        "ratio": round(fast_per_s / reference_per_s, 2),
        "fast_cold_per_s": round(k / times[0], 2),
        "fast_warm_per_s": round(k * (beams - 1) / sum(times[1:]), 2) if beams > 1 else None,
        "beams": beams,
        "reference_candidates": n_ref,
        "max_abs_diff": float((fast[:n_ref].float() - ref.float()).abs().max()),
        "device": str(args.device),
        "dtype": str(args.dtype),
        "config_size": args.config_size,
        "threads": torch.get_num_threads(),
        "vision_batch_size": lvlm.vision_batch_size,
    }
    if counter is not None:
        achieved = counter.flops / sum(times)
        record["achieved_tflops"] = round(achieved / 1e12, 2)
        record["peak_fraction"] = round(achieved / (args.peak_tflops * 1e12), 4)
    return record


# --------------------------------------------------------------------------------------------
# train and select: Lever-LM, fast vs reference
# --------------------------------------------------------------------------------------------


def _lever_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options the Lever-LM benches share."""
    p = argparse.ArgumentParser(prog=f"leverlm bench {name}", description=description)
    p.add_argument("--num_icds", type=int, default=20_000, help="supporting-set size (vocabulary)")
    p.add_argument("--n_embd", type=int, default=512)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument(
        "--feature_dim", type=int, default=512, help="CLIP feature size (train: the CLIP's own)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _check_at_least(
    p: argparse.ArgumentParser, args: argparse.Namespace, low: int, names: list[str]
) -> None:
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name} must be >= {low}, got {getattr(args, name)}")


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
    p = _lever_parser(
        "train", "Lever-LM training sequences/s: features from the store vs frozen CLIP per batch"
    )
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps on the store path")
    p.add_argument("--clip_batch_size", type=int, default=4, help="batch on the CLIP path")
    p.add_argument("--clip_steps", type=int, default=1, help="timed steps on the CLIP path")
    p.add_argument(
        "--clip_model", default="ViT-B-32", help="open_clip architecture (random weights)"
    )
    return p


def _bench_train(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[dict[str, Any]]:
    """Training throughput, captioning setting (query image; ICD image + text)."""
    import numpy as np
    import torch

    from leverlm.encoders import load_clip
    from leverlm.encoders.store import open_array
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
            arrays[m] = open_array(Path(f"{tmp}/{m}.npy"), N, D)
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
        emit(
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
    p = _lever_parser(
        "select", "Lever-LM decoding queries/s: batched + KV cache vs one query, no cache"
    )
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--queries", type=int, default=128, help="queries decoded on the fast path")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--reference_queries", type=int, default=4, help="queries on the reference path")
    return p


def _bench_select(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[dict[str, Any]]:
    """Decoding throughput, VQA feature setting (query image + text; ICD image + text)."""
    import torch

    from leverlm.lever.decode import FeatureBank, greedy_decode, reference_decode

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
        emit(
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
    _check_at_least(
        p, args, 1, ["num_icds", "shots", "batch_size", "steps", "clip_batch_size", "clip_steps"]
    )
    with _threads(args.threads):
        return _bench_train(args, p)


def bench_select(argv: list[str]) -> list[dict[str, Any]]:
    """``leverlm bench select``: decoding throughput, batched + KV cache vs reference."""
    p = select_parser()
    args = p.parse_args(argv)
    _check_at_least(p, args, 1, ["num_icds", "shots", "queries", "batch_size", "reference_queries"])
    if args.reference_queries > args.queries:
        p.error("--reference_queries must be <= --queries")
    with _threads(args.threads):
        return _bench_select(args, p)


# name -> function(argv) -> the result dicts it printed
BENCHES: dict[str, Callable[[list[str]], list[dict[str, Any]]]] = {
    "scoring": bench_scoring,
    "train": bench_train,
    "select": bench_select,
}
