"""COCO captions (official 2014/2017 JSON, or the Karpathy split file) -> a caption collection.

Sample fields: ``image_id``, ``file_name`` (the image path relative to ``images``),
``captions`` (all reference captions, stripped, in file order) and ``caption`` (the first: the
one shown as an ICD). Samples are ordered by ``image_id``; keys are ``coco-{image_id:012d}``
(the same image gets the same key in every COCO collection).

* Official files: ``captions_{train,val}{2014,2017}.json`` with ``images`` (``id``,
  ``file_name``) and ``annotations`` (``image_id``, ``caption``); ``images`` is the folder that
  holds the files named by ``file_name`` (e.g. ``train2017/``).
* Karpathy: ``dataset_coco.json`` with ``images`` (``filepath``, ``filename``, ``split`` in
  train/val/test/restval, ``sentences`` [{``raw``...}], ``cocoid``); ``images`` is the COCO
  root that holds ``{filepath}/{filename}`` (``train2014/``, ``val2014/``). ``split`` selects
  one or more Karpathy splits joined by ``+``; the usual training set is ``train+restval``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from leverlm.data.prep.common import (
    PrepError,
    PrepItem,
    PrepOptions,
    check_dir,
    load_json,
    numbered,
    prep_one,
    require,
    require_list,
)

KARPATHY_SPLITS = ("train", "val", "test", "restval")
_OFFICIAL_NAME = re.compile(r"captions_(train|val)(2014|2017)\.json$")


def coco_key(image_id: int) -> str:
    """Stable sample key of a COCO image."""
    return f"coco-{image_id:012d}"


def parse_coco_captions(path: Path) -> list[dict[str, Any]]:
    """Official captions JSON -> caption records sorted by image id (all checks up front)."""
    data = load_json(path, "COCO captions file")
    records: dict[int, dict[str, Any]] = {}
    for image_id, rid, image in numbered(data, "images", "id", file=path, what="image id"):
        file_name = require(image, "file_name", file=path, record_id=rid, kind=str)
        records[image_id] = {"image_id": image_id, "file_name": file_name, "captions": []}
    for i, ann in enumerate(require_list(data, "annotations", file=path)):
        rid = f"annotations[{i}]" + (
            f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else ""
        )
        image_id = require(ann, "image_id", file=path, record_id=rid, kind=int)
        caption = require(ann, "caption", file=path, record_id=rid, kind=str).strip()
        if image_id not in records:
            raise PrepError(f"{path}: {rid}: image_id {image_id} is not in 'images'")
        if not caption:
            raise PrepError(f"{path}: {rid}: empty caption for image_id {image_id}")
        records[image_id]["captions"].append(caption)
    out = []
    for image_id in sorted(records):
        rec = records[image_id]
        if not rec["captions"]:
            raise PrepError(f"{path}: image id {image_id} ({rec['file_name']}) has no captions")
        rec["caption"] = rec["captions"][0]
        out.append(rec)
    return out


def parse_karpathy(path: Path, splits: tuple[str, ...]) -> list[dict[str, Any]]:
    """Karpathy ``dataset_coco.json`` -> caption records of ``splits``, sorted by cocoid."""
    data = load_json(path, "Karpathy split file")
    if isinstance(data, dict) and data.get("dataset", "coco") != "coco":
        raise PrepError(f"{path}: field 'dataset' is {data['dataset']!r}, expected 'coco'")
    records: dict[int, dict[str, Any]] = {}
    for cocoid, rid, image in numbered(data, "images", "cocoid", file=path):
        split = require(image, "split", file=path, record_id=rid, kind=str)
        if split not in KARPATHY_SPLITS:
            raise PrepError(
                f"{path}: {rid}: field 'split' is {split!r}, not one of {KARPATHY_SPLITS}"
            )
        filepath = require(image, "filepath", file=path, record_id=rid, kind=str)
        filename = require(image, "filename", file=path, record_id=rid, kind=str)
        sentences = require(image, "sentences", file=path, record_id=rid, kind=list)
        captions = []
        for j, sentence in enumerate(sentences):
            raw = require(sentence, "raw", file=path, record_id=f"{rid} sentences[{j}]", kind=str)
            if not raw.strip():
                raise PrepError(f"{path}: {rid} sentences[{j}]: empty caption")
            captions.append(raw.strip())
        if split not in splits:
            continue
        if not captions:
            raise PrepError(f"{path}: {rid}: no sentences")
        records[cocoid] = {
            "image_id": cocoid,
            "file_name": f"{filepath}/{filename}",
            "captions": captions,
            "caption": captions[0],
        }
    return [records[k] for k in sorted(records)]


def prep_coco(
    out_dir: str | os.PathLike,
    *,
    images: str | os.PathLike,
    captions: str | os.PathLike | None = None,
    karpathy: str | os.PathLike | None = None,
    split: str | None = None,
    name: str | None = None,
    **options: Any,
) -> dict[str, Path]:
    """Write a COCO caption collection at ``out_dir``; return ``{name: out_dir}``.

    Args:
        images: folder of the split's images (official files) or the COCO root (Karpathy).
        captions: an official ``captions_*.json`` (exactly one of ``captions``/``karpathy``).
        karpathy: the Karpathy ``dataset_coco.json``.
        split: official files: inferred from the file name, else required; Karpathy: required,
            e.g. ``test`` or ``train+restval``.
        name: collection name (manifest, CLI summary); default ``coco{year}-{split}``
            (official) or ``coco-karpathy-{split}``.
        options: :class:`~leverlm.data.prep.common.PrepOptions` (``limit`` counts images).
    """
    opts = PrepOptions(**options)
    if (captions is None) == (karpathy is None):
        raise PrepError("pass exactly one of --captions (official COCO JSON) or --karpathy")
    image_root = check_dir(images, "COCO images")
    if captions is not None:
        source = Path(captions)
        match = _OFFICIAL_NAME.search(source.name)
        if split is None:
            if match is None:
                raise PrepError(
                    f"cannot tell the split from the file name {source.name}; pass --split"
                )
            split = match.group(1)
        if name is None:
            name = f"coco{match.group(2)}-{split}" if match else f"coco-{split}"
        records = parse_coco_captions(source)
        role, fmt = "COCO captions", "coco"
    else:
        source = Path(karpathy)  # type: ignore[arg-type]
        if not split:
            raise PrepError("--split is required with --karpathy (e.g. test, or train+restval)")
        parts = tuple(split.split("+"))
        bad = [p for p in parts if p not in KARPATHY_SPLITS]
        if bad:
            raise PrepError(f"unknown Karpathy split(s) {bad} in {split!r}; use {KARPATHY_SPLITS}")
        name = name or f"coco-karpathy-{split}"
        records = parse_karpathy(source, parts)
        role, fmt = "Karpathy split file", "karpathy"
    if not records:
        raise PrepError(f"{source}: no images for split {split!r}")
    return prep_one(
        records,
        lambda r: PrepItem(coco_key(r["image_id"]), image_root / r["file_name"], r),
        opts,
        out_dir=out_dir,
        what="images",
        name=name,
        task="caption",
        split=split,
        sources=[(role, source)],
        image_root=image_root,
        source_options={"source_format": fmt},
    )
