"""``leverlm prep {coco,vqav2,easyvqa}``: write collections from the official raw files.

``coco`` and ``vqav2`` write one collection at ``--out``; ``easyvqa`` writes four under
``--out``. Prints one summary line per collection on stdout (name, task, split, samples,
shards, skipped, path);
progress and status go to stderr. Bad input exits with status 1 and a message naming the file,
field and value; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leverlm.data.prep import prep_coco, prep_easyvqa, prep_vqav2
from leverlm.data.prep.common import REENCODE_CHOICES, VERIFY_CHOICES, PrepOptions

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """``'512M'`` -> 536870912 (binary units k/m/g, case-insensitive; plain bytes too)."""
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)] if unit else value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (e.g. 268435456, 256M, 1G)"
        ) from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(number * _UNITS[unit])


def _add_options(p: argparse.ArgumentParser, out_help: str) -> None:
    """``--out`` and the :class:`PrepOptions` flags (defaults from the class)."""
    d = PrepOptions()
    p.add_argument("--out", type=Path, required=True, help=out_help)
    p.add_argument("--limit", type=int, help="keep a seeded random subset of this many samples")
    p.add_argument("--limit_seed", type=int, default=d.limit_seed, help="seed of the subset")
    p.add_argument("--shard_samples", type=int, default=d.shard_samples, help="max per shard")
    p.add_argument("--shard_bytes", type=parse_size, default=d.shard_bytes, help="max, e.g. 256M")
    p.add_argument("--skip_missing", action="store_true", help="skip (and count) bad images")
    p.add_argument("--reencode", choices=REENCODE_CHOICES, default=d.reencode, help="re-encode")
    p.add_argument("--verify", choices=VERIFY_CHOICES, default=d.verify, help="full: decode")
    p.add_argument("--overwrite", action="store_true", help="replace a different collection")
    p.add_argument("--quiet", action="store_true", help="no progress bar or status lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leverlm prep", description="Write collections (webdataset shards + manifest + index)."
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="{coco,vqav2,easyvqa}")

    coco = sub.add_parser("coco", help="COCO captions (official 2014/2017 JSON or Karpathy split)")
    src = coco.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", "--annotations", type=Path, help="official captions_*.json")
    src.add_argument("--karpathy", type=Path, help="Karpathy dataset_coco.json")
    images_help = "image folder (official: the split's folder; Karpathy: the COCO root)"
    coco.add_argument("--images", type=Path, required=True, help=images_help)
    coco.add_argument("--split", help="split (Karpathy: e.g. test or train+restval)")
    coco.add_argument("--name", help="collection name (default from the source and split)")
    _add_options(coco, "the collection folder to write")

    vqa = sub.add_parser("vqav2", help="VQAv2 questions + annotations + COCO images")
    vqa.add_argument(
        "--questions", type=Path, required=True, help="v2_OpenEnded_mscoco_*_questions.json"
    )
    vqa.add_argument("--annotations", type=Path, required=True, help="v2_mscoco_*_annotations.json")
    vqa.add_argument("--images", type=Path, required=True, help="folder of COCO_{subtype}_*.jpg")
    vqa.add_argument(
        "--subtype", help="COCO image subtype, e.g. train2014 (default: from the files)"
    )
    vqa.add_argument("--split", help="split name (default: subtype without the year)")
    vqa.add_argument("--name", help="collection name (default vqav2-SPLIT)")
    _add_options(vqa, "the collection folder to write")

    easy = sub.add_parser("easyvqa", help="the embedded easy-vqa set: VQA + caption collections")
    easy.add_argument(
        "--splits", nargs="+", default=["train", "test"], choices=["train", "test"], help="splits"
    )
    easy.add_argument(
        "--data_dir", type=Path, default=None, help="override the package's data folder"
    )
    _add_options(easy, "root folder: writes OUT/easyvqa-{vqa,caption}-{train,test}")
    return parser


def _run(args: argparse.Namespace) -> dict[str, Path]:
    kw = vars(args).copy()
    source, out = kw.pop("source"), kw.pop("out")
    kw["progress"] = not kw.pop("quiet")
    if source == "easyvqa":
        kw["splits"] = tuple(kw["splits"])
    prep = {"coco": prep_coco, "vqav2": prep_vqav2, "easyvqa": prep_easyvqa}[source]
    return prep(out, **kw)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``leverlm prep``; returns the exit status."""
    args = build_parser().parse_args(argv)
    written = _run(args)
    from leverlm.data.collection import read_manifest

    for name, path in written.items():
        m = read_manifest(path)
        skipped = m.get("skipped", {}).get("count", 0)
        print(
            f"{name}\ttask={m['task']}\tsplit={m['split']}\tsamples={m['num_samples']}"
            f"\tshards={len(m['shards'])}\tskipped={skipped}\t{path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
