"""``leverlm prep vqav2``: official questions + annotations + COCO images; bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.collection_data import leftovers, make_vqav2

from leverlm.cli import main as cli_main
from leverlm.data.collection import Collection
from leverlm.data.prep.common import PrepError
from leverlm.data.prep.vqav2 import prep_vqav2


def main(argv: list[str]) -> int:
    """``leverlm prep ...`` through the command's dispatcher (errors: one line, exit 2)."""
    return cli_main(["prep", *argv])


def _argv(raw: dict, out: Path, *extra: str) -> list[str]:
    return [
        "vqav2",
        "--questions",
        str(raw["questions"]),
        "--annotations",
        str(raw["annotations"]),
        "--images",
        str(raw["images"]),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_roundtrip_every_field(tmp_path: Path) -> None:
    raw = make_vqav2(tmp_path / "raw")
    out = prep_vqav2(
        tmp_path / "out",
        questions=raw["questions"],
        annotations=raw["annotations"],
        images=raw["images"],
        shard_samples=3,
        progress=False,
    )
    col = Collection(out["vqav2-val"])
    expected = raw["expected"]
    assert (col.name, col.task, col.split, len(col)) == ("vqav2-val", "vqa", "val", len(expected))
    assert len(col.manifest["shards"]) == -(-len(expected) // 3)
    for pos, qid in enumerate(sorted(expected)):  # ordered by question id
        sample = col[pos]
        want = expected[qid]
        assert sample["__key__"] == f"vqav2-{qid:09d}"
        assert sample["question_id"] == qid
        for field in ("image_id", "question", "answers", "answer", "answer_type", "question_type"):
            assert sample[field] == want[field], field
        assert len(sample["answers"]) == 10
        assert col.image_bytes(pos) == want["bytes"]
    assert col.manifest["options"]["subtype"] == "val2014"
    assert [s["role"] for s in col.manifest["sources"]] == ["VQAv2 questions", "VQAv2 annotations"]


def test_limit_and_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = make_vqav2(tmp_path / "raw")
    assert main(_argv(raw, tmp_path / "out", "--limit", "4", "--name", "small")) == 0
    first = capsys.readouterr().out
    assert first.startswith("small\ttask=vqa\tsplit=val\tsamples=4\t")
    col = Collection(tmp_path / "out")
    qids = [col.fields(i)["question_id"] for i in range(len(col))]
    assert len(qids) == 4 and qids == sorted(qids) and set(qids) <= set(raw["expected"])
    manifest = (tmp_path / "out" / "manifest.json").read_bytes()
    assert main(_argv(raw, tmp_path / "out", "--limit", "4", "--name", "small")) == 0
    assert capsys.readouterr().out == first
    assert (tmp_path / "out" / "manifest.json").read_bytes() == manifest


def _drop_annotation(d: dict) -> None:
    d["annotations"].pop(0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda raw: raw["annotations"].unlink(),
            r"VQAv2 annotations file not found: .*v2_mscoco_val2014_annotations.json",
        ),
        (
            # the second "," on line 2 is column 21, character 36 of the file
            lambda raw: raw["questions"].write_text('{"questions": [\n  {"question_id": 1,,}]}'),
            r"v2_OpenEnded_mscoco_val2014_questions.json: malformed JSON .*line 2 column 21 \(char 36\)",
        ),
        (
            lambda raw: _edit(
                raw["annotations"], lambda d: d["annotations"][1].pop("multiple_choice_answer")
            ),
            r"v2_mscoco_val2014_annotations.json: annotations\[1\] \(question_id 262148001\): "
            r"missing field 'multiple_choice_answer'",
        ),
        (
            # questions are written in reverse: the first record is image 9's last question
            lambda raw: _edit(raw["questions"], lambda d: d["questions"][0].pop("question")),
            r"questions.json: questions\[0\] \(question_id 9001\): missing field 'question'",
        ),
        (
            lambda raw: _edit(raw["annotations"], lambda d: d["annotations"][0]["answers"].pop()),
            r"annotations\[0\] \(question_id 262148000\): field 'answers' has 9 entries, expected 10",
        ),
        (
            lambda raw: _edit(
                raw["questions"], lambda d: d["questions"][0].update(question_id="x")
            ),
            r"questions\[0\]: field 'question_id' must be int, got 'x'",
        ),
        (
            lambda raw: _edit(raw["annotations"], _drop_annotation),
            r"questions\[\d\] \(question_id 262148000\): no annotation with this question_id",
        ),
        (
            lambda raw: _edit(raw["annotations"], lambda d: d.update(data_subtype="train2014")),
            r"is val2014 but .*annotations.json is train2014",
        ),
        (
            lambda raw: (raw["images"] / "COCO_val2014_000000393225.jpg").unlink(),
            r"image not found: .*val2014/COCO_val2014_000000393225.jpg",
        ),
        (
            lambda raw: (raw["images"] / "COCO_val2014_000000000009.jpg").write_bytes(
                b"\xff\xd8junk"
            ),
            r"corrupt or unsupported image .*COCO_val2014_000000000009.jpg",
        ),
    ],
)
def test_bad_input_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate, message: str
) -> None:
    raw = make_vqav2(tmp_path / "raw")
    mutate(raw)
    assert main(_argv(raw, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert leftovers(tmp_path / "out") == []


def test_a_truncated_jpeg_is_caught_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_vqav2(tmp_path / "raw")
    image = raw["images"] / "COCO_val2014_000000000009.jpg"
    image.write_bytes(image.read_bytes()[:-200])
    assert main(_argv(raw, tmp_path / "out")) == 2
    assert re.search(r"corrupt or unsupported image .*000000000009.jpg", capsys.readouterr().err)
    assert leftovers(tmp_path / "out") == []


def test_skip_missing(tmp_path: Path) -> None:
    raw = make_vqav2(tmp_path / "raw")
    (raw["images"] / "COCO_val2014_000000393225.jpg").unlink()
    assert main(_argv(raw, tmp_path / "out", "--skip_missing")) == 0
    col = Collection(tmp_path / "out")
    gone = [q for q, e in raw["expected"].items() if e["image_id"] == 393225]
    assert len(col) == len(raw["expected"]) - len(gone)
    assert col.manifest["skipped"]["count"] == len(gone)
    assert all(col.fields(i)["image_id"] != 393225 for i in range(len(col)))


def test_output_holding_another_collection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_vqav2(tmp_path / "raw")
    out = tmp_path / "out"
    assert main(_argv(raw, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(_argv(raw, out, "--limit", "2")) == 2
    assert "already holds a different collection" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temp folders
    # a folder that is not a collection at all
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(_argv(raw, tmp_path / "mine")) == 2
    assert "exists and is not a collection" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_subtype_from_filename_or_flag(tmp_path: Path) -> None:
    raw = make_vqav2(tmp_path / "raw")
    for path in (raw["questions"], raw["annotations"]):
        _edit(path, lambda d: d.pop("data_subtype"))
    out = prep_vqav2(
        tmp_path / "out",
        questions=raw["questions"],
        annotations=raw["annotations"],
        images=raw["images"],
        progress=False,
    )
    assert Collection(out["vqav2-val"]).manifest["options"]["subtype"] == "val2014"
    renamed = raw["questions"].with_name("q.json")
    raw["questions"].rename(renamed)
    kw = {"annotations": raw["annotations"], "images": raw["images"], "progress": False}
    other_ann = raw["annotations"].with_name("a.json")
    raw["annotations"].rename(other_ann)
    kw["annotations"] = other_ann
    with pytest.raises(PrepError, match="pass --subtype"):
        prep_vqav2(tmp_path / "out2", questions=renamed, **kw)
    out = prep_vqav2(tmp_path / "out2", questions=renamed, subtype="val2014", **kw)
    assert len(Collection(out["vqav2-val"])) == len(raw["expected"])
