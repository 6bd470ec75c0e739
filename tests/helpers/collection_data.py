"""Tiny raw datasets in the official formats (COCO captions 2014/2017, Karpathy, VQAv2).

Each builder writes small JPEGs (distinct colours) and the JSON files into a folder and
returns the paths plus the records a correct prep must reproduce.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from leverlm.data.collection import SampleRecord


def jpeg_bytes(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    """A small JPEG whose colour depends on ``seed``."""
    buf = io.BytesIO()
    colour = (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_image(path: Path, seed: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = jpeg_bytes(seed)
    path.write_bytes(data)
    return data


def caption_records(n: int, *, prefix: str = "s") -> list[SampleRecord]:
    """``n`` caption samples with distinct images (for collection/pipeline tests)."""
    return [
        SampleRecord(
            key=f"{prefix}-{i:05d}",
            image=jpeg_bytes(i),
            image_ext="jpg",
            fields={
                "image_id": 1000 + i,
                "file_name": f"{i}.jpg",
                "captions": [f"caption {i}", f"another caption {i}"],
                "caption": f"caption {i}",
            },
        )
        for i in range(n)
    ]


def make_coco_official(
    root: Path,
    *,
    year: int = 2017,
    split: str = "val",
    image_ids: tuple[int, ...] = (42, 7, 1234, 99),
) -> dict[str, Any]:
    """``captions_{split}{year}.json`` + ``{split}{year}/`` images; returns paths + expectations.

    Annotations are interleaved across images (as in the real files) and some captions carry
    trailing whitespace, so ordering and stripping are exercised.
    """
    image_dir = root / f"{split}{year}"
    images, annotations, expected = [], [], {}
    for n, image_id in enumerate(image_ids):
        file_name = (
            f"COCO_{split}{year}_{image_id:012d}.jpg" if year == 2014 else f"{image_id:012d}.jpg"
        )
        data = write_image(image_dir / file_name, n)
        images.append(
            {"license": 1, "file_name": file_name, "height": 10, "width": 12, "id": image_id}
        )
        expected[image_id] = {"file_name": file_name, "captions": [], "bytes": data}
    ann_id = 500
    for k in range(3):  # caption k of every image, then caption k+1: interleaved
        for image_id in image_ids:
            text = f"image {image_id} caption {k}"
            annotations.append(
                {"image_id": image_id, "id": ann_id, "caption": text + (" \n" if k == 1 else "")}
            )
            expected[image_id]["captions"].append(text)
            ann_id += 1
    captions = root / "annotations" / f"captions_{split}{year}.json"
    captions.parent.mkdir(parents=True, exist_ok=True)
    captions.write_text(
        json.dumps(
            {
                "info": {"year": year},
                "licenses": [],
                "images": images,
                "annotations": annotations,
            }
        )
    )
    return {"captions": captions, "images": image_dir, "expected": expected}


def make_karpathy(root: Path) -> dict[str, Any]:
    """A ``dataset_coco.json`` with train/val/test/restval images under ``train2014``/``val2014``."""
    plan = [  # (cocoid, split, filepath)
        (11, "train", "train2014"),
        (12, "restval", "val2014"),
        (13, "val", "val2014"),
        (14, "test", "val2014"),
        (15, "test", "val2014"),
        (16, "train", "train2014"),
    ]
    images, expected = [], {}
    for imgid, (cocoid, split, filepath) in enumerate(plan):
        filename = f"COCO_{filepath}_{cocoid:012d}.jpg"
        data = write_image(root / filepath / filename, cocoid)
        raws = [f"A photo number {cocoid}, take {s}." for s in range(5)]
        sentences = [
            {
                "tokens": raw.lower().strip(".").replace(",", "").split(),
                "raw": raw,
                "imgid": imgid,
                "sentid": imgid * 5 + s,
            }
            for s, raw in enumerate(raws)
        ]
        images.append(
            {
                "filepath": filepath,
                "sentids": [s["sentid"] for s in sentences],
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
            }
        )
        expected[cocoid] = {
            "split": split,
            "file_name": f"{filepath}/{filename}",
            "captions": raws,
            "bytes": data,
        }
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return {"karpathy": path, "images": root, "expected": expected}


def make_vqav2(
    root: Path, *, subtype: str = "val2014", image_ids: tuple[int, ...] = (262148, 393225, 9)
) -> dict[str, Any]:
    """Official VQAv2 questions + annotations for 2-3 questions per image, plus the images."""
    image_dir = root / subtype
    questions, annotations, expected = [], [], {}
    for n, image_id in enumerate(image_ids):
        data = write_image(image_dir / f"COCO_{subtype}_{image_id:012d}.jpg", n)
        for k in range(2 + n % 2):
            qid = image_id * 1000 + k
            text = f"What is shown in picture {image_id}, part {k}?"
            human = ["red", "red", "blue", "red", "red", "green", "red", "red", "yes", "red"]
            human = human[k:] + human[:k]
            questions.append({"image_id": image_id, "question": text, "question_id": qid})
            annotations.append(
                {
                    "question_type": "what is",
                    "multiple_choice_answer": "red",
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                        for j, a in enumerate(human)
                    ],
                    "image_id": image_id,
                    "answer_type": "other",
                    "question_id": qid,
                }
            )
            expected[qid] = {
                "image_id": image_id,
                "question": text,
                "answers": human,
                "answer": "red",
                "answer_type": "other",
                "question_type": "what is",
                "bytes": data,
            }
    # The official files are not sorted by question id: shuffle deterministically.
    questions.reverse()
    qpath = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    apath = root / f"v2_mscoco_{subtype}_annotations.json"
    qpath.write_text(
        json.dumps(
            {
                "info": {},
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "license": {},
                "data_subtype": subtype,
                "questions": questions,
            }
        )
    )
    apath.write_text(
        json.dumps(
            {
                "info": {},
                "license": {},
                "data_subtype": subtype,
                "annotations": annotations,
            }
        )
    )
    return {"questions": qpath, "annotations": apath, "images": image_dir, "expected": expected}


def leftovers(root: Path) -> list[str]:
    """Everything under ``root`` (names relative to it): after a failed prep, expect []."""
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
