"""easy-vqa (the dataset embedded in the ``easy-vqa`` package) -> VQA and caption collections.

The package ships ``data/{train,test}/questions.json`` (a list of ``[question, answer,
image_id]``, exactly what ``easy_vqa.get_train_questions()`` returns column-wise) and
``data/{split}/images/{image_id}.png``: 4,000 train / 1,000 test images and 38,575 / 9,673
questions. For each split this writes, under ``out_root``:

* ``easyvqa-vqa-{split}``: one sample per question, in file order, key
  ``easyvqa-{split}-q{index:06d}``. Fields in the VQAv2 schema: ``question_id`` (the index in
  questions.json), ``image_id``, ``question``, ``answers`` (the single answer repeated 10 times,
  as VQA accuracy expects 10 human answers), ``answer``, ``answer_type`` (``yes/no`` or
  ``other``), ``question_type`` (the question's template: colour words -> ``{color}``, shape
  words -> ``{shape}``, e.g. ``what color is the {shape}?``).
* ``easyvqa-caption-{split}``: one sample per image, in image id order, key
  ``easyvqa-{split}-i{image_id:04d}``. Fields: ``image_id``, ``file_name`` (``{id}.png``),
  ``captions`` ([caption]), ``caption``, plus ``shape`` and ``color`` (None where unknown).

**Caption rule** (:func:`derive_caption`), from the image's questions and answers only:
an answer that is a colour/shape reveals it ("what color is the shape?" -> blue), and so does a
colour/shape named in such a question ("what color is the triangle?" -> triangle); a yes/no
answer reveals presence or absence of the named colour/shape, negated when the question says
"not"/"no" ("is there not a red shape?" -> no => red). Absent values are eliminated: if only one
shape (or colour) remains, it is taken. The caption is ``a {color} {shape}``; if the colour is
still unknown it is ``a {shape}``, if the shape is, ``a {color} shape``, if both, ``a shape``
(package data, train / test: 259 / 66 images lack the colour, 134 / 34 the shape, 29 / 12
both; every image still gets a caption). Contradicting evidence (none in the package data) is
an error naming the image.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from leverlm.data.prep.common import (
    CollectionPlan,
    PrepError,
    PrepItem,
    PrepOptions,
    check_dir,
    load_json,
    plan_collection,
    say,
    write_planned,
)

SPLITS = ("train", "test")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
YES_NO = ("yes", "no")
NUM_ANSWERS = 10
_WORDS = re.compile(r"[a-z]+")


def default_data_dir() -> Path:
    """The ``data`` folder of the installed easy-vqa package."""
    import easy_vqa

    return Path(easy_vqa.__file__).resolve().parent / "data"


def vqa_name(split: str) -> str:
    return f"easyvqa-vqa-{split}"


def caption_name(split: str) -> str:
    return f"easyvqa-caption-{split}"


def question_type(question: str) -> str:
    """The question's template: colour words -> ``{color}``, shape words -> ``{shape}``."""

    def sub(match: re.Match[str]) -> str:
        word = match.group(0)
        return "{color}" if word in COLORS else "{shape}" if word in SHAPES else word

    return _WORDS.sub(sub, question)


def derive_caption(
    qas: Iterable[tuple[str, str]], image: str = "image"
) -> tuple[str, str | None, str | None]:
    """``(caption, shape, color)`` of an image from its (question, answer) pairs.

    See the module docstring for the rule. ``image`` names the image in errors.
    """
    seen: dict[str, set[str]] = {"shape": set(), "color": set()}
    absent: dict[str, set[str]] = {"shape": set(), "color": set()}
    for question, answer in qas:
        words = set(_WORDS.findall(question.lower()))
        shapes, colors = words.intersection(SHAPES), words.intersection(COLORS)
        if answer in COLORS:
            seen["color"].add(answer)
            seen["shape"] |= shapes
        elif answer in SHAPES:
            seen["shape"].add(answer)
            seen["color"] |= colors
        elif answer in YES_NO:
            negated = bool(words & {"not", "no"})
            present = (answer == "yes") != negated
            target = seen if present else absent
            target["shape"] |= shapes
            target["color"] |= colors
        else:
            raise PrepError(f"{image}: answer {answer!r} to {question!r} is not an easy-vqa answer")
    found: dict[str, str | None] = {}
    for kind, vocab in (("shape", SHAPES), ("color", COLORS)):
        both = seen[kind] & absent[kind]
        if len(seen[kind]) > 1 or both:
            raise PrepError(
                f"{image}: contradicting {kind} evidence: present {sorted(seen[kind])}, "
                f"absent {sorted(absent[kind])}"
            )
        left = [v for v in vocab if v not in absent[kind]]
        found[kind] = next(iter(seen[kind])) if seen[kind] else left[0] if len(left) == 1 else None
    shape, color = found["shape"], found["color"]
    if shape and color:
        caption = f"a {color} {shape}"
    elif shape:
        caption = f"a {shape}"
    elif color:
        caption = f"a {color} shape"
    else:
        caption = "a shape"
    return caption, shape, color


def load_split(
    data_dir: Path, split: str
) -> tuple[Path, list[tuple[str, str, int]], dict[int, Path]]:
    """``(questions.json path, [(question, answer, image_id)], {image_id: png path})``."""
    qpath = data_dir / split / "questions.json"
    raw = load_json(qpath, f"easy-vqa {split} questions")
    if not isinstance(raw, list):
        raise PrepError(f"{qpath}: expected a list of [question, answer, image_id]")
    questions = []
    for i, entry in enumerate(raw):
        ok = (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and isinstance(entry[2], int)
            and not isinstance(entry[2], bool)
        )
        if not ok:
            raise PrepError(
                f"{qpath}: entry [{i}] is {entry!r}, expected [question, answer, image_id]"
            )
        questions.append((entry[0], entry[1], entry[2]))
    image_dir = check_dir(data_dir / split / "images", f"easy-vqa {split} images")
    images: dict[int, Path] = {}
    for path in image_dir.iterdir():
        if path.suffix == ".png" and path.stem.isdigit():
            images[int(path.stem)] = path
    # A question about an image without a file keeps its expected path, so the image check
    # names the missing file (or --skip_missing skips it) instead of a KeyError here.
    for _, _, image_id in questions:
        images.setdefault(image_id, image_dir / f"{image_id}.png")
    return qpath, questions, dict(sorted(images.items()))


def _split_items(
    split: str,
    questions: Sequence[tuple[str, str, int]],
    images: dict[int, Path],
    options: PrepOptions,
) -> list[tuple[str, str, list[PrepItem]]]:
    """``(name, task, items)`` of the split's VQA and caption collections (``options.limit``
    subsets: of the questions, of the images; captions still use all of an image's questions)."""
    vqa = []
    for i in options.subset(len(questions)):
        question, answer, image_id = questions[i]
        fields: dict[str, Any] = {
            "question_id": i,
            "image_id": image_id,
            "question": question,
            "answers": [answer] * NUM_ANSWERS,
            "answer": answer,
            "answer_type": "yes/no" if answer in YES_NO else "other",
            "question_type": question_type(question),
        }
        vqa.append(PrepItem(f"easyvqa-{split}-q{i:06d}", images[image_id], fields))
    per_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image_id in questions:
        per_image[image_id].append((question, answer))
    ids = list(images)
    captions = []
    for j in options.subset(len(images)):
        image_id = ids[j]
        caption, shape, color = derive_caption(
            per_image.get(image_id, ()), image=f"easy-vqa {split} image {image_id}"
        )
        fields = {
            "image_id": image_id,
            "file_name": images[image_id].name,
            "captions": [caption],
            "caption": caption,
            "shape": shape,
            "color": color,
        }
        captions.append(PrepItem(f"easyvqa-{split}-i{image_id:04d}", images[image_id], fields))
    return [(vqa_name(split), "vqa", vqa), (caption_name(split), "caption", captions)]


def prep_easyvqa(
    out_root: str | os.PathLike,
    *,
    splits: Sequence[str] = SPLITS,
    data_dir: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, Path]:
    """Write the easy-vqa VQA and caption collections; return ``{name: path}``.

    Args:
        splits: which of ``train``/``test`` to write.
        data_dir: a folder laid out like the package's ``data`` (default: the installed one).
        options: :class:`~leverlm.data.prep.common.PrepOptions`; ``limit`` applies per
            collection, to the questions (VQA) or the images (caption).
    """
    opts = PrepOptions(**options)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise PrepError(f"unknown easy-vqa split(s) {bad or list(splits)}; use {SPLITS}")
    data_dir = check_dir(data_dir if data_dir is not None else default_data_dir(), "easy-vqa data")
    # Parse, derive and plan everything first: bad input or an output conflict fails before
    # any collection is written.
    plans: list[CollectionPlan] = []
    for split in splits:
        qpath, questions, images = load_split(data_dir, split)
        for name, task, items in _split_items(split, questions, images, opts):
            plans.append(
                plan_collection(
                    items,
                    out_dir=Path(out_root) / name,
                    name=name,
                    task=task,
                    split=split,
                    sources=[(f"easy-vqa {split} questions", qpath)],
                    image_root=qpath.parent / "images",
                    options=opts,
                )
            )
    # One reader for all collections: each image file is read (and checked) once. The set is
    # small (~20 MB), so read what will be written up front: a corrupt image then fails before
    # any collection is written (with skip_missing, the cached error skips its samples later).
    reader = opts.reader(cache_size=None)
    if not opts.skip_missing:
        for plan in plans:
            if not plan.up_to_date:
                for item in plan.items:
                    reader.read(item.image_path)
    out: dict[str, Path] = {}
    for plan in plans:
        say(f"{plan.name}: {len(plan.items)} samples from {data_dir}", opts.progress)
        out[plan.name] = write_planned(plan, reader)
    return out
