"""``leverlm bench``: fast paths against their straightforward reference paths, same process.

``leverlm bench`` runs every registered bench with its defaults; ``leverlm bench NAME [options]``
runs one (``leverlm bench scoring --help``). Each bench prints one JSON line per case.

Add a bench by adding ``name -> "module:function"`` to :data:`BENCHES`; the function takes
``argv`` (its own options) and returns the list of result dicts it printed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

# name -> "module:function(argv) -> list[dict]"; modules are imported only when run.
BENCHES: dict[str, str] = {
    "scoring": "leverlm.bench:bench_scoring",
    "train": "leverlm.lever.bench:bench_train",
    "select": "leverlm.lever.bench:bench_select",
}


def emit(record: dict[str, Any]) -> dict[str, Any]:
    """Print one result as a JSON line (flushed: benches are watched live)."""
    print(json.dumps(record, sort_keys=False), flush=True)
    return record


def _resolve(name: str) -> Callable[[list[str]], list[dict[str, Any]]]:
    module_name, func_name = BENCHES[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: leverlm bench [NAME [options]]\n\nbenches: " + ", ".join(BENCHES))
        print("Run 'leverlm bench NAME --help' for a bench's options; no NAME runs them all.")
        return 0
    if not argv or argv[0] == "all":
        for name in BENCHES:
            _resolve(name)([])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(
            f"leverlm bench: unknown bench {name!r}; benches: {', '.join(BENCHES)}", file=sys.stderr
        )
        return 2
    _resolve(name)(rest)
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
        "(default: idefics,idefics2; idefics with --config-size real)",
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
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--vision-batch-size",
        type=int,
        default=None,
        help="images per vision forward (the adapter's vision_batch_size; default: its own)",
    )
    p.add_argument(
        "--reference-candidates",
        type=int,
        default=8,
        help="candidates timed on the reference path (its rate is per candidate)",
    )
    p.add_argument("--task", default="vqa_idefics")
    p.add_argument("--image-size", default="640x480", help="synthetic source images, WxH")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--config-size",
        choices=("tiny", "real"),
        default="tiny",
        help="tiny: the 'bench' tiny model (a checkpoint folder through load_lvlm); real: the "
        "real architecture (IDEFICS-9B) randomly initialised from its config on --device",
    )
    p.add_argument(
        "--tiny-size",
        choices=("test", "bench"),
        default="bench",
        help="size of the tiny model built for --config-size tiny",
    )
    p.add_argument("--model-dir", default=None, help="load this checkpoint instead (one model)")
    p.add_argument(
        "--peak-tflops",
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
    for name in ("candidates", "batch_size", "beams", "reference_candidates", "vision_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("shots", "threads"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    try:
        w, h = (int(x) for x in args.image_size.lower().split("x"))
    except ValueError:
        p.error(f"--image-size must be WxH, got {args.image_size!r}")
    args.image_size = (w, h)
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
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
        p.error("--model-dir needs exactly one --models type")
    if args.config_size == "real" and any(m not in _REAL_BUILDERS for m in args.models):
        p.error(
            f"--config-size real is available for: {', '.join(_REAL_BUILDERS)} "
            f"(got --models {','.join(args.models)})"
        )
    return args


def bench_scoring(argv: list[str]) -> list[dict[str, Any]]:
    """Run the scoring bench; one JSON line per (model, order)."""
    args = parse_scoring_args(argv)
    import torch

    from leverlm.lvlm.base import resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    resolve_dtype(args.dtype)
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
    import tempfile

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


# model_type -> builder of a real-size random model (``--config-size real``)
_REAL_BUILDERS: dict[str, Callable[[argparse.Namespace], Any]] = {"idefics": _real_idefics}


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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
