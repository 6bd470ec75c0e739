"""The run layer: headers naming a run, status and refusals, part files, merge (via the gt job)."""

from __future__ import annotations

import json

import pytest

from leverlm.gt.beam import Beam
from leverlm.gt.data import GtDataError, GtRecord, read_gt
from leverlm.gt.job import GtJob
from leverlm.runs import (
    RunDir,
    RunError,
    RunHeader,
    describe_change,
    file_fingerprint,
    input_fingerprint,
)


def rec(pos: int, score: float = 0.125) -> GtRecord:
    beams = [
        Beam((pos + 1, pos + 2), score, (0.5, score)),
        Beam((pos + 3, pos + 1), score / 2, (0.25, score / 2)),
    ]
    return GtRecord.from_beams(f"key-{pos}", pos, beams)


def header(anchors=(1, 4, 9), seed=0, lvlm="abc") -> RunHeader:
    config = {"data": {"seed": seed, "num_anchors": len(anchors)}, "model": {"beam_size": 2}}
    manifest = {"task": "vqa", "order": "left", "shots": 2, "beam_size": 2}
    return RunHeader("gt", config, {"lvlm": lvlm}, list(anchors), manifest)


def write(run: RunDir, rank: int, seq: int, records: list[GtRecord]) -> None:
    run.write_part(rank, seq, GtJob().encode_part([{"records": records}]), "jsonl")


def test_parts_resume_and_merge(tmp_path):
    job, h = GtJob(), header()
    run = RunDir(tmp_path / "gt", job.results)
    assert run.prepare(h) == "new"
    assert run.next_seq(0) == 0
    write(run, 0, 0, [rec(9)])
    write(run, 1, 0, [rec(1)])
    (run.parts / ".rank0-000001.jsonl.abc.tmp").write_text('{"half')  # a killed writer's temp
    assert job.done(run) == {1, 9} and job.remaining(run, h) == 1
    assert run.next_seq(0) == 1 and run.next_seq(2) == 0
    with pytest.raises(RunError, match="already exists"):
        write(run, 0, 0, [rec(4)])
    with pytest.raises(GtDataError, match=r"1 of 3 anchors have no record yet \(first: \[4\]\)"):
        job.merge(run)
    assert not (run.path / "manifest.json").exists()
    # Resume: the same run -> nothing lost, then finish the missing anchor.
    assert run.prepare(h) == "resume"
    write(run, 0, run.next_seq(0), [rec(4)])
    job.merge(run)
    manifest, records = read_gt(run.path)
    assert [r.anchor_position for r in records] == [1, 4, 9]
    assert manifest["num_records"] == 3 and manifest["run_sha256"] == h.sha256
    assert manifest["format"] == "leverlm-gt" and manifest["config"] == h.config
    first = (run.path / "records.jsonl").read_bytes(), (run.path / "manifest.json").read_bytes()

    # A different split into parts (as on 2 ranks) merges to the same bytes.
    run2 = RunDir(tmp_path / "gt2", job.results)
    run2.prepare(h)
    write(run2, 0, 0, [rec(4), rec(1)])
    write(run2, 3, 7, [rec(9)])
    job.merge(run2)
    got = (run2.path / "records.jsonl").read_bytes(), (run2.path / "manifest.json").read_bytes()
    assert got == first


@pytest.mark.parametrize(
    ("other", "named"),
    [(header(seed=1), "config data.seed"), (header(lvlm="xyz"), "input 'lvlm'")],
)
def test_another_run_is_refused_unless_overwrite(tmp_path, other, named):
    run = RunDir(tmp_path / "gt", GtJob.results)
    run.prepare(header())
    write(run, 0, 0, [rec(1)])
    with pytest.raises(RunError, match=f"changed: {named}.*--overwrite"):
        run.status(other)
    with pytest.raises(RunError):
        run.prepare(other)
    assert run.part_files()  # nothing lost by the refusal
    assert run.prepare(other, overwrite=True) == "overwrite"
    assert run.part_files() == [] and GtJob().done(run) == set()
    assert run.header().to_json() == other.to_json()


def test_a_run_that_wrote_nothing_yet_is_restarted_without_asking(tmp_path):
    run = RunDir(tmp_path / "gt", GtJob.results)
    run.prepare(header())  # e.g. the first run died loading its model
    assert run.status(header(lvlm="fixed")) == "new"


def test_results_without_a_header_are_refused(tmp_path):
    out = tmp_path / "gt"
    out.mkdir()
    (out / "records.jsonl").write_text("")
    with pytest.raises(RunError, match="holds records.jsonl but no run header"):
        RunDir(out, GtJob.results).status(header())


def test_conflicting_duplicate_is_an_error(tmp_path):
    run = RunDir(tmp_path / "gt", GtJob.results)
    run.prepare(header())
    write(run, 0, 0, [rec(1, 0.5)])
    write(run, 1, 0, [rec(1, 0.5)])  # an identical duplicate: fine
    assert GtJob().done(run) == {1}
    write(run, 2, 0, [rec(1, 0.75)])
    with pytest.raises(GtDataError, match="anchor 1 has a different record"):
        GtJob().done(run)


def test_describe_change_names_inputs_and_config():
    text = describe_change(header(), header(seed=3, lvlm="new"))
    assert text == "input 'lvlm' (its content changed), config data.seed"


def test_fingerprints_follow_content_not_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"x": 1}))
        (d / "weights.bin").write_bytes(b"\x01" * 1000)
    assert input_fingerprint(a) == input_fingerprint(b)
    (b / "weights.bin").write_bytes(b"\x01" * 999 + b"\x02")
    assert input_fingerprint(a) != input_fingerprint(b)
    (a / "run.json").write_text("{}")  # a run's own bookkeeping is not content
    (a / "logs").mkdir()
    (a / "logs" / "x").write_text("log")
    (b / "weights.bin").write_bytes(b"\x01" * 1000)
    assert input_fingerprint(a) == input_fingerprint(b)


def test_large_files_are_fingerprinted_by_sampled_blocks(tmp_path, monkeypatch):
    import leverlm.runs as runs

    monkeypatch.setattr(runs, "_FULL_HASH_BYTES", 1 << 16)
    big = tmp_path / "big.bin"
    data = bytearray(range(256)) * 4096  # 1 MiB
    big.write_bytes(bytes(data))
    first = file_fingerprint(big)
    assert first.startswith("sampled:")
    data[0] ^= 1  # the first block is always sampled
    big.write_bytes(bytes(data))
    assert file_fingerprint(big) != first


def test_an_error_from_a_dataloader_worker_is_one_line():
    from leverlm.cli import message
    from leverlm.data.collection import CollectionError

    wrapped = CollectionError(
        "Caught CollectionError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "leverlm.data.collection.CollectionError: shard-1.tar: sample 'k' is damaged\n"
    )
    assert message(wrapped) == "shard-1.tar: sample 'k' is damaged"
    assert message(CollectionError("plain")) == "plain"
