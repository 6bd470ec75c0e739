"""``leverlm prep coco``: official 2014/2017 captions and the Karpathy split, round-tripped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.collection_data import leftovers, make_coco_official, make_karpathy, write_image

from leverlm.cli import main as cli_main
from leverlm.cli import main as leverlm_main
from leverlm.data.collection import Collection
from leverlm.data.prep.coco import prep_coco
from leverlm.data.prep.common import PrepError


def main(argv: list[str]) -> int:
    """``leverlm prep ...`` through the command's dispatcher (errors: one line, exit 2)."""
    return cli_main(["prep", *argv])


@pytest.mark.parametrize("year", [2014, 2017])
def test_official_captions_roundtrip(tmp_path: Path, year: int) -> None:
    raw = make_coco_official(tmp_path / "raw", year=year, split="val")
    out = prep_coco(
        tmp_path / "out", captions=raw["captions"], images=raw["images"], progress=False
    )
    name = f"coco{year}-val"
    assert out == {name: tmp_path / "out"}  # --out is the collection folder
    col = Collection(out[name])
    expected = raw["expected"]
    assert (col.task, col.split, len(col)) == ("caption", "val", len(expected))
    assert [col.fields(i)["image_id"] for i in range(len(col))] == sorted(expected)
    for pos, image_id in enumerate(sorted(expected)):
        sample = col[pos]
        want = expected[image_id]
        assert sample["__key__"] == f"coco-{image_id:012d}" == col.keys[pos]
        assert sample["file_name"] == want["file_name"]
        assert sample["captions"] == want["captions"]  # file order, whitespace stripped
        assert sample["caption"] == want["captions"][0]
        assert col.image_bytes(pos) == want["bytes"]  # stored as in the source
        assert sample["image"].mode == "RGB"
    manifest = col.manifest
    assert manifest["sources"][0]["path"] == str(raw["captions"])
    assert manifest["sources"][0]["size"] == raw["captions"].stat().st_size
    assert manifest["images"]["files"] == len(expected)
    assert manifest["skipped"]["count"] == 0


@pytest.mark.parametrize(
    "split, cocoids", [("test", [14, 15]), ("train+restval", [11, 12, 16]), ("val", [13])]
)
def test_karpathy_roundtrip(tmp_path: Path, split: str, cocoids: list[int]) -> None:
    raw = make_karpathy(tmp_path / "raw")
    out = prep_coco(
        tmp_path / "out",
        karpathy=raw["karpathy"],
        images=raw["images"],
        split=split,
        progress=False,
    )
    col = Collection(out[f"coco-karpathy-{split}"])
    assert col.split == split
    assert [col.fields(i)["image_id"] for i in range(len(col))] == cocoids
    for pos, cocoid in enumerate(cocoids):
        want = raw["expected"][cocoid]
        fields = col.fields(pos)
        assert fields["file_name"] == want["file_name"]
        assert fields["captions"] == want["captions"]
        assert fields["caption"] == want["captions"][0]
        assert col.image_bytes(pos) == want["bytes"]


def test_limit_is_a_seeded_subset(tmp_path: Path) -> None:
    raw = make_coco_official(tmp_path / "raw", image_ids=tuple(range(1, 21)))

    def ids(seed: int, name: str) -> list[int]:
        out = prep_coco(
            tmp_path / name,
            captions=raw["captions"],
            images=raw["images"],
            limit=6,
            limit_seed=seed,
            name=name,
            progress=False,
        )
        col = Collection(out[name])
        return [col.fields(i)["image_id"] for i in range(len(col))]

    a = ids(0, "a")
    assert len(a) == 6 and a == sorted(a) and set(a) <= set(range(1, 21))
    assert ids(0, "b") == a
    assert ids(1, "c") != a


def test_rerun_is_a_noop_and_changed_options_conflict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_coco_official(tmp_path / "raw")
    kw = {"captions": raw["captions"], "images": raw["images"]}
    path = prep_coco(tmp_path / "out", **kw)["coco2017-val"]
    err = capsys.readouterr().err
    assert "writing coco2017-val" in err and "coco2017-val: wrote 4 samples" in err
    stamp = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    capsys.readouterr()
    assert prep_coco(tmp_path / "out", **kw)["coco2017-val"] == path
    assert "up to date" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamp

    with pytest.raises(PrepError, match=r"different collection .*reencode: 'none' -> 'png'"):
        prep_coco(tmp_path / "out", **kw, reencode="png", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamp

    prep_coco(tmp_path / "out", **kw, reencode="png", overwrite=True, progress=False)
    col = Collection(path)
    assert col.manifest["options"]["reencode"] == "png"
    assert col.image_bytes(0)[:8] == b"\x89PNG\r\n\x1a\n"
    assert col[0]["image"].size == (12, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temp/old folders


def test_changed_source_is_a_different_collection(tmp_path: Path) -> None:
    raw = make_coco_official(tmp_path / "raw")
    prep_coco(tmp_path / "out", captions=raw["captions"], images=raw["images"], progress=False)
    data = json.loads(raw["captions"].read_text())
    data["annotations"][0]["caption"] = "changed"
    raw["captions"].write_text(json.dumps(data))
    with pytest.raises(PrepError, match="different collection"):
        prep_coco(tmp_path / "out", captions=raw["captions"], images=raw["images"], progress=False)
    # an image replaced by one of another size changes the fingerprint too
    prep_coco(
        tmp_path / "out",
        captions=raw["captions"],
        images=raw["images"],
        overwrite=True,
        progress=False,
    )
    write_image(raw["images"] / "000000000042.jpg", 77)
    (raw["images"] / "000000000042.jpg").write_bytes(
        (raw["images"] / "000000000042.jpg").read_bytes() + b"\0"
    )
    with pytest.raises(PrepError, match="different collection"):
        prep_coco(tmp_path / "out", captions=raw["captions"], images=raw["images"], progress=False)


def test_cli_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = make_karpathy(tmp_path / "raw")
    argv = ["coco", "--karpathy", str(raw["karpathy"]), "--images", str(raw["images"])]
    argv += ["--split", "test", "--out", str(tmp_path / "out"), "--shard_samples", "1"]
    assert leverlm_main(["prep", *argv]) == 0  # through the top-level dispatcher
    out = capsys.readouterr().out.strip().split("\t")
    assert out[:5] == ["coco-karpathy-test", "task=caption", "split=test", "samples=2", "shards=2"]
    assert out[-1] == str(tmp_path / "out")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: raw["captions"].unlink(), r"COCO captions file not found: .*captions_val2017"),
        (
            # the bad token is the "," on line 2: column 18, character 32 of the file
            lambda raw: raw["captions"].write_text('{"images": [],\n "annotations": [,]}'),
            r"captions_val2017.json: malformed JSON .* line 2 column 18 \(char 32\)",
        ),
        (
            lambda raw: _edit(raw["captions"], lambda d: d["annotations"][2].pop("caption")),
            r"captions_val2017.json: annotations\[2\] \(id 502\): missing field 'caption'",
        ),
        (
            lambda raw: _edit(raw["captions"], lambda d: d["images"][1].pop("file_name")),
            r"captions_val2017.json: images\[1\] \(id 7\): missing field 'file_name'",
        ),
        (
            lambda raw: _edit(raw["captions"], lambda d: d["annotations"][0].update(image_id=5)),
            r"annotations\[0\] \(id 500\): image_id 5 is not in 'images'",
        ),
        (
            lambda raw: _edit(raw["captions"], lambda d: d["images"][0].update(id=True)),
            r"images\[0\]: field 'id' must be int, got True",
        ),
        (
            lambda raw: (raw["images"] / "000000000007.jpg").unlink(),
            r"image not found: .*val2017/000000000007.jpg",
        ),
        (
            lambda raw: (raw["images"] / "000000001234.jpg").write_bytes(b"not a jpeg"),
            r"corrupt or unsupported image .*val2017/000000001234.jpg",
        ),
    ],
)
def test_bad_input_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate, message: str
) -> None:
    raw = make_coco_official(tmp_path / "raw")
    mutate(raw)
    argv = ["coco", "--captions", str(raw["captions"]), "--images", str(raw["images"])]
    assert main([*argv, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert leftovers(tmp_path / "out") == []


def test_karpathy_bad_input(tmp_path: Path) -> None:
    raw = make_karpathy(tmp_path / "raw")
    kw = {"karpathy": raw["karpathy"], "images": raw["images"], "progress": False}
    with pytest.raises(PrepError, match="--split is required"):
        prep_coco(tmp_path / "out", **kw)
    with pytest.raises(PrepError, match=r"unknown Karpathy split\(s\) \['dev'\]"):
        prep_coco(tmp_path / "out", split="train+dev", **kw)
    _edit(raw["karpathy"], lambda d: d["images"][3]["sentences"][1].pop("raw"))
    with pytest.raises(
        PrepError, match=r"images\[3\] \(cocoid 14\) sentences\[1\]: missing field 'raw'"
    ):
        prep_coco(tmp_path / "out", split="test", **kw)
    assert leftovers(tmp_path / "out") == []


def test_skip_missing_counts_in_manifest(tmp_path: Path) -> None:
    raw = make_coco_official(tmp_path / "raw")
    (raw["images"] / "000000000007.jpg").unlink()
    (raw["images"] / "000000000099.jpg").write_bytes(b"garbage")
    out = prep_coco(
        tmp_path / "out",
        captions=raw["captions"],
        images=raw["images"],
        skip_missing=True,
        progress=False,
    )
    col = Collection(out["coco2017-val"])
    assert [col.fields(i)["image_id"] for i in range(len(col))] == [42, 1234]
    skipped = col.manifest["skipped"]
    assert skipped["count"] == 2
    assert {s["key"] for s in skipped["samples"]} == {"coco-000000000007", "coco-000000000099"}
    assert col.manifest["images"]["missing"] == 1


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_parse_size() -> None:
    import argparse

    from leverlm.data.prep.cli import parse_size

    assert parse_size("4096") == 4096
    assert parse_size("256M") == parse_size("256MiB") == 256 * 1024**2
    assert parse_size("1.5k") == 1536 and parse_size("2g") == 2 * 1024**3
    for bad in ("lots", "-1M", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_cli_annotations_alias(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = make_coco_official(tmp_path / "raw", year=2014, split="train")
    argv = ["coco", "--annotations", str(raw["captions"]), "--images", str(raw["images"])]
    assert main([*argv, "--out", str(tmp_path / "coco2014-train"), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(
        "coco2014-train\ttask=caption\tsplit=train\tsamples=4"
    )
    assert Collection(tmp_path / "coco2014-train").name == "coco2014-train"
