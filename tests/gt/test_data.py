"""gt records, part files, resume bookkeeping and the merge."""

from __future__ import annotations

import json

import pytest

from leverlm.gt.beam import Beam
from leverlm.gt.data import (
    GtConfigMismatch,
    GtDataError,
    GtRecord,
    check_out_dir,
    done_positions,
    make_header,
    merge,
    next_part_seq,
    part_files,
    prepare_out_dir,
    read_gt,
    round_score,
    write_part,
)


def rec(pos: int, score: float = 0.125) -> GtRecord:
    beams = [
        Beam((pos + 1, pos + 2), score, (0.5, score)),
        Beam((pos + 3, pos + 1), score / 2, (0.25, score / 2)),
    ]
    return GtRecord.from_beams(f"key-{pos}", pos, beams)


def header(anchors=(1, 4, 9), seed=0):
    config = {"data": {"seed": seed, "num_anchors": len(anchors)}, "model": {"beam_size": 2}}
    manifest = {"task": "vqa", "order": "left", "shots": 2, "beam_size": 2}
    return make_header(config, list(anchors), manifest)


def test_round_score_is_float32_exact_and_canonical():
    import numpy as np

    for x in np.random.default_rng(0).standard_normal(200).astype(np.float32):
        assert np.float32(round_score(float(x))) == x
    assert repr(round_score(-0.0)) == "0.0"
    with pytest.raises(GtDataError, match="not finite"):
        round_score(float("inf"))


def test_record_roundtrip_and_validation():
    r = rec(3, 1 / 3)
    back = GtRecord.from_json(json.loads(r.to_line()))
    assert back.to_line() == r.to_line()
    assert list(json.loads(r.to_line())) == [
        "anchor_key",
        "anchor_position",
        "sequences",
        "scores",
        "step_scores",
    ]
    bad = r.to_json() | {"sequences": [[3, 5], [4, 6]]}
    with pytest.raises(GtDataError, match="anchor 3 appears in its own sequence"):
        GtRecord.from_json(bad, "f.jsonl:2")
    with pytest.raises(GtDataError, match=r"f.jsonl:2: missing field\(s\) \['scores'\]"):
        GtRecord.from_json({k: v for k, v in r.to_json().items() if k != "scores"}, "f.jsonl:2")


def test_parts_resume_and_merge(tmp_path):
    out = tmp_path / "gt"
    h = header()
    assert prepare_out_dir(out, h) == "new"
    assert next_part_seq(out, 0) == 0
    write_part(out, 0, 0, [rec(9)])
    write_part(out, 1, 0, [rec(1)])
    (out / "parts" / ".rank0-000001.jsonl.abc.tmp").write_text('{"half')  # a killed writer's temp
    assert done_positions(out) == {1, 9}
    assert next_part_seq(out, 0) == 1 and next_part_seq(out, 2) == 0
    with pytest.raises(GtDataError, match="already exists"):
        write_part(out, 0, 0, [rec(4)])
    with pytest.raises(GtDataError, match=r"1 of 3 anchors have no record yet \(first: \[4\]\)"):
        merge(out)
    assert not (out / "manifest.json").exists()
    # Resume: same config -> nothing lost, then finish the missing anchor.
    assert prepare_out_dir(out, h) == "resume"
    assert done_positions(out) == {1, 9}
    write_part(out, 0, next_part_seq(out, 0), [rec(4)])
    merge(out)
    manifest, records = read_gt(out)
    assert [r.anchor_position for r in records] == [1, 4, 9]
    assert manifest["num_records"] == 3 and manifest["config_sha256"] == h["config_sha256"]
    assert manifest["format"] == "leverlm-gt" and manifest["config"] == h["config"]
    first = (out / "records.jsonl").read_bytes(), (out / "manifest.json").read_bytes()

    # A different split into parts (as on 2 ranks) merges to the same bytes.
    out2 = tmp_path / "gt2"
    prepare_out_dir(out2, h)
    write_part(out2, 0, 0, [rec(4), rec(1)])
    write_part(out2, 3, 7, [rec(9)])
    merge(out2)
    assert ((out2 / "records.jsonl").read_bytes(), (out2 / "manifest.json").read_bytes()) == first


def test_other_config_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "gt"
    prepare_out_dir(out, header(seed=0))
    write_part(out, 0, 0, [rec(1)])
    other = header(seed=1)
    with pytest.raises(GtConfigMismatch, match="different config.*--overwrite"):
        check_out_dir(out, other["config_sha256"])
    with pytest.raises(GtConfigMismatch):
        prepare_out_dir(out, other)
    assert part_files(out)  # nothing lost by the refusal
    assert prepare_out_dir(out, other, overwrite=True) == "overwrite"
    assert part_files(out) == [] and done_positions(out) == set()


def test_merged_folder_without_parts_is_still_checked(tmp_path):
    out = tmp_path / "gt"
    h = header()
    prepare_out_dir(out, h)
    for i, a in enumerate(h["anchors"]):
        write_part(out, 0, i, [rec(a)])
    merge(out)
    import shutil

    shutil.rmtree(out / "parts")
    with pytest.raises(GtConfigMismatch, match="manifest.json"):
        check_out_dir(out, header(seed=5)["config_sha256"])
    assert check_out_dir(out, h["config_sha256"]) == "resume"


def test_conflicting_duplicate_is_an_error(tmp_path):
    out = tmp_path / "gt"
    prepare_out_dir(out, header())
    write_part(out, 0, 0, [rec(1, 0.5)])
    write_part(out, 1, 0, [rec(1, 0.5)])  # identical duplicate: fine
    assert done_positions(out) == {1}
    write_part(out, 2, 0, [rec(1, 0.75)])
    with pytest.raises(GtDataError, match="anchor 1 has a different record"):
        done_positions(out)
