"""VQAv2 (official questions + annotations JSON, COCO images) -> a VQA collection.

Inputs: ``v2_OpenEnded_mscoco_{train,val}2014_questions.json`` (``questions``: ``question_id``,
``image_id``, ``question``), ``v2_mscoco_{train,val}2014_annotations.json`` (``annotations``:
``question_id``, ``image_id``, ``answers`` [10 x {``answer``...}], ``multiple_choice_answer``,
``answer_type``, ``question_type``) and the COCO image folder holding
``COCO_{subtype}_{image_id:012d}.jpg`` (``subtype`` = the files' ``data_subtype``, e.g.
``train2014``).

Sample fields: ``question_id``, ``image_id``, ``question``, ``answers`` (the 10 human answers),
``answer`` (the official ``multiple_choice_answer``: the most frequent), ``answer_type``,
``question_type``. Samples are ordered by ``question_id``; keys are ``vqav2-{question_id:09d}``.
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
)

NUM_ANSWERS = 10
_SUBTYPE = re.compile(r"(train|val|test)(\d{4})")


def vqav2_key(question_id: int) -> str:
    """Stable sample key of a VQAv2 question."""
    return f"vqav2-{question_id:09d}"


def _subtype(data: Any, path: Path) -> str | None:
    value = data.get("data_subtype") if isinstance(data, dict) else None
    if value is not None:
        if not isinstance(value, str) or not _SUBTYPE.fullmatch(value):
            raise PrepError(f"{path}: field 'data_subtype' is {value!r}, expected e.g. 'train2014'")
        return value
    match = _SUBTYPE.search(path.name)
    return match.group(0) if match else None


def parse_vqav2(
    questions_path: Path, annotations_path: Path
) -> tuple[list[dict[str, Any]], str | None]:
    """Join questions and annotations -> (records sorted by question_id, data subtype)."""
    qdata = load_json(questions_path, "VQAv2 questions file")
    adata = load_json(annotations_path, "VQAv2 annotations file")
    q_sub, a_sub = _subtype(qdata, questions_path), _subtype(adata, annotations_path)
    if q_sub and a_sub and q_sub != a_sub:
        raise PrepError(
            f"{questions_path} is {q_sub} but {annotations_path} is {a_sub}: mismatched files"
        )
    by_id: dict[int, dict[str, Any]] = {}
    f = annotations_path
    for qid, rid, ann in numbered(adata, "annotations", "question_id", file=f):
        answers = require(ann, "answers", file=f, record_id=rid, kind=list)
        if len(answers) != NUM_ANSWERS:
            raise PrepError(
                f"{f}: {rid}: field 'answers' has {len(answers)} entries, expected {NUM_ANSWERS}"
            )
        by_id[qid] = {
            "image_id": require(ann, "image_id", file=f, record_id=rid, kind=int),
            "answers": [
                require(a, "answer", file=f, record_id=f"{rid} answers[{j}]", kind=str)
                for j, a in enumerate(answers)
            ],
            "answer": require(ann, "multiple_choice_answer", file=f, record_id=rid, kind=str),
            "answer_type": require(ann, "answer_type", file=f, record_id=rid, kind=str),
            "question_type": require(ann, "question_type", file=f, record_id=rid, kind=str),
        }
    records: dict[int, dict[str, Any]] = {}
    f = questions_path
    for qid, rid, q in numbered(qdata, "questions", "question_id", file=f):
        image_id = require(q, "image_id", file=f, record_id=rid, kind=int)
        text = require(q, "question", file=f, record_id=rid, kind=str)
        ann = by_id.get(qid)
        if ann is None:
            raise PrepError(
                f"{f}: {rid}: no annotation with this question_id in {annotations_path}"
            )
        if ann["image_id"] != image_id:
            raise PrepError(
                f"{f}: {rid}: image_id {image_id} but its annotation in {annotations_path} "
                f"says {ann['image_id']}"
            )
        records[qid] = {"question_id": qid, "image_id": image_id, "question": text, **ann}
    return [records[k] for k in sorted(records)], q_sub or a_sub


def prep_vqav2(
    out_dir: str | os.PathLike,
    *,
    questions: str | os.PathLike,
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    subtype: str | None = None,
    split: str | None = None,
    name: str | None = None,
    **options: Any,
) -> dict[str, Path]:
    """Write a VQAv2 collection at ``out_dir``; return ``{name: out_dir}``.

    Args:
        images: the folder of ``COCO_{subtype}_{image_id:012d}.jpg`` files.
        subtype: COCO image subtype (``train2014``/``val2014``); default: the files'
            ``data_subtype``, else their names.
        split: collection split; default: ``subtype`` without the year.
        name: collection name (manifest, CLI summary); default ``vqav2-{split}``.
        options: :class:`~leverlm.data.prep.common.PrepOptions` (``limit`` counts questions).
    """
    opts = PrepOptions(**options)
    questions_path, annotations_path = Path(questions), Path(annotations)
    image_root = check_dir(images, "COCO images")
    records, found = parse_vqav2(questions_path, annotations_path)
    subtype = subtype or found
    if subtype is None or not _SUBTYPE.fullmatch(subtype):
        raise PrepError(
            f"cannot tell the COCO image subtype (e.g. train2014) of {questions_path}; pass --subtype"
        )
    split = split or _SUBTYPE.fullmatch(subtype).group(1)  # type: ignore[union-attr]
    if not records:
        raise PrepError(f"{questions_path}: no questions")
    # Questions are sorted by id and VQAv2 ids group by image: the reader's small LRU reads
    # each image once.
    return prep_one(
        records,
        lambda r: PrepItem(
            vqav2_key(r["question_id"]), image_root / f"COCO_{subtype}_{r['image_id']:012d}.jpg", r
        ),
        opts,
        out_dir=out_dir,
        what="questions",
        name=name or f"vqav2-{split}",
        task="vqa",
        split=split,
        sources=[("VQAv2 questions", questions_path), ("VQAv2 annotations", annotations_path)],
        image_root=image_root,
        source_options={"subtype": subtype},
    )
