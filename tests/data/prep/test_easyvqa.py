"""``leverlm prep easyvqa``: caption rule, exact counts on the embedded set, bad input."""

from __future__ import annotations

import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import easy_vqa
import pytest
from helpers.collection_data import leftovers
from PIL import Image

from leverlm.cli import main as cli_main
from leverlm.data.collection import Collection
from leverlm.data.prep.common import PrepError
from leverlm.data.prep.easyvqa import (
    COLORS,
    SHAPES,
    derive_caption,
    load_split,
    prep_easyvqa,
    question_type,
)


def main(argv: list[str]) -> int:
    """``leverlm prep ...`` through the command's dispatcher (errors: one line, exit 2)."""
    return cli_main(["prep", *argv])


CAPTION_FORMS = (
    {"a shape"}
    | {f"a {c} shape" for c in COLORS}
    | {f"a {s}" for s in SHAPES}
    | {f"a {c} {s}" for c in COLORS for s in SHAPES}
)


@pytest.mark.parametrize(
    "qas, expected",
    [
        ([("what color is the triangle?", "blue")], ("a blue triangle", "triangle", "blue")),
        ([("what is the red shape?", "circle")], ("a red circle", "circle", "red")),
        (
            [("is there a green shape?", "yes"), ("does the image contain a circle?", "yes")],
            ("a green circle", "circle", "green"),
        ),
        (  # negated questions answered "no" reveal presence
            [("is there not a teal shape?", "no"), ("is no rectangle present?", "no")],
            ("a teal rectangle", "rectangle", "teal"),
        ),
        (  # two shapes ruled out -> the third
            [
                ("what color is the shape?", "red"),
                ("is there a circle?", "no"),
                ("does the image not contain a triangle?", "yes"),
            ],
            ("a red rectangle", "rectangle", "red"),
        ),
        (  # seven colours ruled out -> the eighth
            [
                (f"is there a {c} shape?", "no")
                for c in ("black", "blue", "brown", "gray", "green", "red", "teal")
            ]
            + [("what shape is present?", "circle")],
            ("a yellow circle", "circle", "yellow"),
        ),
        # fallbacks when the questions do not reveal both
        ([("what color is the shape?", "red")], ("a red shape", None, "red")),
        ([("what shape is in the image?", "triangle")], ("a triangle", "triangle", None)),
        ([("is there a red shape?", "no")], ("a shape", None, None)),
        ([], ("a shape", None, None)),
    ],
)
def test_derive_caption(qas, expected) -> None:
    assert derive_caption(qas) == expected


def test_derive_caption_rejects_contradictions_and_unknown_answers() -> None:
    with pytest.raises(PrepError, match=r"image 7: contradicting color evidence"):
        derive_caption(
            [("what color is the shape?", "red"), ("is there a red shape?", "no")], image="image 7"
        )
    with pytest.raises(PrepError, match="contradicting shape evidence"):
        derive_caption(
            [("what shape is present?", "circle"), ("what is the blue shape?", "triangle")]
        )
    with pytest.raises(PrepError, match="'purple' .* is not an easy-vqa answer"):
        derive_caption([("what color is the shape?", "purple")])


def test_question_type() -> None:
    assert question_type("what color is the triangle?") == "what color is the {shape}?"
    assert question_type("is there not a teal shape?") == "is there not a {color} shape?"
    assert question_type("what shape is present?") == "what shape is present?"


def test_parse_matches_package_api() -> None:
    from leverlm.data.prep.easyvqa import default_data_dir

    for split, api_q, api_i in (
        ("train", easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        ("test", easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    ):
        _, questions, images = load_split(default_data_dir(), split)
        texts, answers, ids = api_q()
        assert questions == list(zip(texts, answers, ids))
        assert {k: str(v) for k, v in images.items()} == {
            k: str(Path(v).resolve()) for k, v in api_i().items()
        }


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The whole embedded set, prepped once (the acceptance check: ~10-20 s on 2 cores)."""
    return prep_easyvqa(tmp_path_factory.mktemp("easyvqa"), progress=False)


@pytest.mark.slow
def test_full_prep_exact_counts(full: dict[str, Path]) -> None:
    counts = {name: len(Collection(path)) for name, path in full.items()}
    assert counts == {
        "easyvqa-vqa-train": 38_575,
        "easyvqa-caption-train": 4_000,
        "easyvqa-vqa-test": 9_673,
        "easyvqa-caption-test": 1_000,
    }
    for name, path in full.items():
        assert path.name == name
        assert Collection(path).task == ("vqa" if "-vqa-" in name else "caption")


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "test"])
def test_full_prep_fields(full: dict[str, Path], split: str) -> None:
    texts, answers, ids = getattr(easy_vqa, f"get_{split}_questions")()
    image_paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    vqa = Collection(full[f"easyvqa-vqa-{split}"])
    for i in range(len(vqa)):
        f = vqa.fields(i)
        assert vqa.keys[i] == f"easyvqa-{split}-q{i:06d}"
        assert (f["question_id"], f["question"], f["answer"], f["image_id"]) == (
            i,
            texts[i],
            answers[i],
            ids[i],
        )
        assert f["answers"] == [answers[i]] * 10
        assert f["answer_type"] == ("yes/no" if answers[i] in ("yes", "no") else "other")
    for i in range(0, len(vqa), 997):  # image bytes are the package's PNG files, untouched
        assert vqa.image_bytes(i) == Path(image_paths[ids[i]]).read_bytes()

    per_image = defaultdict(list)
    for t, a, image_id in zip(texts, answers, ids):
        per_image[image_id].append((t, a))
    cap = Collection(full[f"easyvqa-caption-{split}"])
    assert [cap.fields(i)["image_id"] for i in range(len(cap))] == sorted(image_paths)
    fallbacks = 0
    for i in range(len(cap)):
        f = cap.fields(i)
        image_id = f["image_id"]
        assert cap.keys[i] == f"easyvqa-{split}-i{image_id:04d}"
        caption, shape, color = derive_caption(per_image[image_id])
        assert (f["caption"], f["captions"], f["shape"], f["color"]) == (
            caption,
            [caption],
            shape,
            color,
        )
        assert caption in CAPTION_FORMS
        fallbacks += shape is None or color is None
    # some images' questions do not reveal both (documented fallback); most do
    assert 0 < fallbacks < len(cap) // 5
    sample = cap[len(cap) - 1]
    assert sample["image"].mode == "RGB" and sample["image"].size == (64, 64)


@pytest.mark.slow
def test_rerun_is_noop(full: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root = next(iter(full.values())).parent
    stamps = {p: p.stat().st_mtime_ns for path in full.values() for p in path.iterdir()}
    assert main(["easyvqa", "--out", str(root)]) == 0
    out, err = capsys.readouterr()
    assert err.count("up to date") == 4
    assert "easyvqa-vqa-train\ttask=vqa\tsplit=train\tsamples=38575" in out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_limit_subset(tmp_path: Path) -> None:
    out = prep_easyvqa(tmp_path, splits=("test",), limit=40, limit_seed=3, progress=False)
    assert sorted(out) == ["easyvqa-caption-test", "easyvqa-vqa-test"]
    vqa = Collection(out["easyvqa-vqa-test"])
    qids = [vqa.fields(i)["question_id"] for i in range(len(vqa))]
    assert len(qids) == 40 and qids == sorted(qids) and qids != list(range(40))
    assert len(Collection(out["easyvqa-caption-test"])) == 40


def _tiny_data(root: Path) -> Path:
    """A data folder laid out like the package's, with 3 images and 5 questions per split."""
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        for image_id, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 128, 0)]):
            Image.new("RGB", (8, 8), colour).save(root / split / "images" / f"{image_id}.png")
        questions = [
            ["what color is the shape?", "red", 0],
            ["what shape is present?", "circle", 0],
            ["what is the blue shape?", "triangle", 1],
            ["is there a green shape?", "yes", 2],
            ["is there a rectangle?", "yes", 2],
        ]
        (root / split / "questions.json").write_text(json.dumps(questions))
    return root


def test_tiny_data_dir(tmp_path: Path) -> None:
    data = _tiny_data(tmp_path / "data")
    out = prep_easyvqa(tmp_path / "out", data_dir=data, progress=False)
    cap = Collection(out["easyvqa-caption-train"])
    assert [cap.fields(i)["caption"] for i in range(3)] == [
        "a red circle",
        "a blue triangle",
        "a green rectangle",
    ]
    assert cap.image_bytes(2) == (data / "train" / "images" / "2.png").read_bytes()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: (d / "train" / "questions.json").write_text('[["q", "red", 0]'),
            r"train/questions.json: malformed JSON .*line 1 column 17 \(char 16\)",
        ),
        (
            lambda d: (d / "test" / "questions.json").write_text('[["q", "red", 0], ["q", "red"]]'),
            r"test/questions.json: entry \[1\] is \['q', 'red'\], expected \[question, answer, image_id\]",
        ),
        (
            lambda d: (d / "train" / "questions.json").unlink(),
            r"easy-vqa train questions not found",
        ),
        (
            lambda d: (d / "test" / "images" / "1.png").unlink(),
            r"image not found: .*test/images/1.png",
        ),
        (
            lambda d: (d / "train" / "images" / "2.png").write_bytes(b"\x89PNG broken"),
            r"corrupt or unsupported image .*train/images/2.png",
        ),
        (
            lambda d: (d / "train" / "questions.json").write_text(
                '[["what color is it?", "pink", 0]]'
            ),
            r"easy-vqa train image 0: answer 'pink'",
        ),
    ],
)
def test_bad_input_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate, message: str
) -> None:
    data = _tiny_data(tmp_path / "data")
    mutate(data)
    assert (
        main(["easyvqa", "--data_dir", str(data), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    # questions are parsed and every image read before the first collection is written
    assert leftovers(tmp_path / "out") == []


def test_skip_missing_image(tmp_path: Path) -> None:
    data = _tiny_data(tmp_path / "data")
    (data / "train" / "images" / "0.png").unlink()
    out = prep_easyvqa(tmp_path / "out", data_dir=data, skip_missing=True, progress=False)
    vqa, cap = Collection(out["easyvqa-vqa-train"]), Collection(out["easyvqa-caption-train"])
    assert (len(vqa), len(cap)) == (3, 2)
    assert vqa.manifest["skipped"]["count"] == 2 and cap.manifest["skipped"]["count"] == 1
    assert len(Collection(out["easyvqa-vqa-test"])) == 5


def test_reencode_jpg(tmp_path: Path) -> None:
    data = _tiny_data(tmp_path / "data")
    out = prep_easyvqa(
        tmp_path / "out", data_dir=data, splits=("test",), reencode="jpg", progress=False
    )
    cap = Collection(out["easyvqa-caption-test"])
    assert cap.manifest["options"]["reencode"] == "jpg"
    assert cap.image_bytes(0)[:2] == b"\xff\xd8"  # JPEG, not the source PNG
    pixel = cap[0]["image"].getpixel((4, 4))
    assert pixel[0] > 240 and pixel[1] < 15 and pixel[2] < 15  # still red, up to JPEG loss
    with tarfile.open(cap.shard_paths()[0]) as tf:
        assert tf.getnames()[0] == "easyvqa-test-i0000.jpg"
