"""The `leverlm gt` job end to end on a tiny VQA collection and the tiny IDEFICS model.

Covers resume after SIGKILL, 2-process DDP, determinism and bad-config refusal.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ROOT
from helpers.features import write_store

from leverlm.cli import main as cli_main
from leverlm.gt.data import read_gt
from leverlm.gt.samplers import RandomSampler, select_anchors

# End-to-end runs of a job (subprocesses, DDP, kills): not in `make test-fast`.
pytestmark = pytest.mark.slow

NUM_SAMPLES = 24
NUM_ANCHORS = 11  # odd: the 2-rank split is uneven
K = 8
LEVERLM = str(Path(sys.executable).with_name("leverlm"))


def _image(i: int) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (32, 32), (i * 37 % 256, i * 91 % 256, i * 13 % 256))
    ImageDraw.Draw(im).rectangle([2 + i % 9, 3, 20, 12 + i % 13], fill=(250 - i * 7, 20, i * 9))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _collection(path: Path, seed: int = 0) -> Path:
    from leverlm.data.collection import SampleRecord, write_collection

    colors = ["red", "green", "blue", "teal", "gray"]
    records = []
    for i in range(NUM_SAMPLES):
        answer = colors[(i + seed) % 5] if i % 3 else ("yes" if i % 2 else "no")
        question = "What color is the shape?" if i % 3 else "Is there a circle?"
        fields = {
            "question_id": i,
            "image_id": i,
            "question": question,
            "answers": [answer] * 10,
            "answer": answer,
            "answer_type": "other",
            "question_type": "what",
        }
        records.append(SampleRecord(f"tiny-{i:06d}", _image(i), "png", fields))
    return write_collection(path, records, name="tiny-vqa-train", task="vqa", split="train")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from leverlm.lvlm.tiny import build_tiny

    root = tmp_path_factory.mktemp("gt_job")
    coll = _collection(root / "coll")
    lvlm = build_tiny("idefics", root / "idefics", seed=0)
    cfg = root / "gt.yaml"
    cfg.write_text(
        f"""
data:
  collection: {coll}
  num_anchors: {NUM_ANCHORS}
  seed: 0
  sampler: random
  num_candidates: {K}
  anchors_per_batch: 1
  num_workers: 0
model:
  lvlm:
    model_type: idefics
    path: {lvlm}
    dtype: float32
  task: vqa_idefics
  beam_size: 3
  shots: 2
  order: left
  ranking: last
  scorer: infoscore
  candidate_batch_size: 16
trainer:
  accelerator: cpu
  devices: 1
  logger: false
progress_bar: false
"""
    )
    ref = root / "ref"
    assert _run(cfg, ref) == 0
    return SimpleNamespace(root=root, coll=coll, lvlm=lvlm, cfg=cfg, ref=ref)


def _run(cfg: Path, out: Path, *extra: str) -> int:
    return cli_main(["gt", "predict", "--config", str(cfg), "--out", str(out), *extra])


def _bytes(out: Path) -> tuple[bytes, bytes]:
    return (out / "records.jsonl").read_bytes(), (out / "manifest.json").read_bytes()


def _part_records(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted((out / "parts").glob("rank*.jsonl"))
        for line in p.read_text().splitlines()
    ]


def test_reference_run_is_a_valid_gt_dataset(world):
    manifest, records = read_gt(world.ref)
    anchors = select_anchors(NUM_SAMPLES, NUM_ANCHORS, seed=0)
    assert [r.anchor_position for r in records] == anchors
    assert manifest["num_records"] == NUM_ANCHORS and manifest["task"] == "vqa"
    assert manifest["supporting_set"]["num_samples"] == NUM_SAMPLES
    assert manifest["lvlm"] == {
        "model_type": "idefics",
        "path": str(world.lvlm),
        "dtype": "float32",
    }
    sampler = RandomSampler(NUM_SAMPLES, K, seed=0)
    for r in records:
        cands = set(sampler.sample([r.anchor_position])[0])
        assert len(r.sequences) == 3 and r.scores == sorted(r.scores, reverse=True)
        for seq, steps, score in zip(r.sequences, r.step_scores, r.scores):
            assert len(seq) == 2 == len(set(seq)) and set(seq) <= cands
            assert score == steps[-1]  # ranking: last
        assert r.anchor_key == f"tiny-{r.anchor_position:06d}"


def test_same_seed_same_bytes_other_seed_other_anchors(world, tmp_path):
    assert _run(world.cfg, tmp_path / "again") == 0
    assert _bytes(tmp_path / "again") == _bytes(world.ref)
    assert _run(world.cfg, tmp_path / "seed1", "--data.seed", "1") == 0
    other = [r.anchor_position for r in read_gt(tmp_path / "seed1")[1]]
    assert other != [r.anchor_position for r in read_gt(world.ref)[1]]


def test_rerun_of_a_finished_run_changes_nothing(world, tmp_path, caplog):
    import shutil

    out = tmp_path / "finished"
    shutil.copytree(world.ref, out)
    parts = sorted(p.name for p in (out / "parts").iterdir())
    with caplog.at_level("INFO", logger="leverlm.gt"):
        assert _run(world.cfg, out) == 0
    assert f"skipped {NUM_ANCHORS} anchors already done, 0 to do on this rank" in caplog.text
    assert sorted(p.name for p in (out / "parts").iterdir()) == parts
    assert _bytes(out) == _bytes(world.ref)


def test_merge_command_rebuilds_the_same_dataset(world, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(world.ref, out)
    (out / "records.jsonl").unlink()
    (out / "manifest.json").unlink()
    assert cli_main(["gt", "merge", "--out", str(out)]) == 0
    assert _bytes(out) == _bytes(world.ref)


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(folder.glob(pattern)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"job exited (rc {proc.returncode}) before writing {pattern}")
        time.sleep(0.01)
    raise AssertionError(f"no {pattern} in {folder} after {timeout}s")


def test_resume_after_sigkill_is_byte_identical(world, tmp_path, caplog):
    out = tmp_path / "killed"
    cmd = [LEVERLM, "gt", "predict", "--config", str(world.cfg), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for("rank0-*.jsonl", out / "parts", proc)
        os.kill(proc.pid, signal.SIGKILL)  # mid-way through the next anchor
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    done_before = {r["anchor_position"] for r in _part_records(out)}
    assert 1 <= len(done_before) < NUM_ANCHORS, "the kill came too late to test a resume"
    assert not (out / "manifest.json").exists()

    with caplog.at_level("INFO", logger="leverlm.gt"):
        assert _run(world.cfg, out) == 0
    assert f"skipped {len(done_before)} anchors already done" in caplog.text
    # Only the missing anchors were computed: every anchor is in exactly one part record.
    positions = [r["anchor_position"] for r in _part_records(out)]
    assert sorted(positions) == sorted(set(positions)) and len(positions) == NUM_ANCHORS
    assert _bytes(out) == _bytes(world.ref)


def test_two_process_ddp_equals_one_process(world, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        LEVERLM,
        "gt",
        "predict",
        "--config",
        str(world.cfg),
        "--out",
        str(out),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--data.anchors_per_batch",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 1: skipped 0 anchors already done, 5 to do on this rank" in res.stderr
    assert "rank 0: skipped 0 anchors already done, 6 to do on this rank" in res.stderr
    ranks = {p.name.split("-")[0] for p in (out / "parts").glob("rank*.jsonl")}
    assert ranks == {"rank0", "rank1"}
    positions = [r["anchor_position"] for r in _part_records(out)]
    assert len(positions) == NUM_ANCHORS == len(set(positions))
    assert _bytes(out) == _bytes(world.ref)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load an LVLM."""
    import leverlm.lvlm.base

    def boom(*a, **k):
        raise AssertionError("an LVLM was loaded for a config that should have been refused")

    monkeypatch.setattr(leverlm.lvlm.base, "load_lvlm", boom)
    monkeypatch.setattr(leverlm.lvlm.base, "resolve_loader", boom)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.beam_size", "9"], "beam_size=9 exceeds the number of candidates"),
        (["--model.shots", "0"], "shots=0"),
        (["--data.num_anchors", "25"], "num_anchors=25 exceeds the collection size"),
        (["--data.num_candidates", "24"], "num_candidates=24"),
        (["--model.lvlm.path", "/nonexistent/idefics"], "'/nonexistent/idefics' does not exist"),
        (["--model.task", "caption"], "is a 'caption' task but collection"),
    ],
)
def test_bad_config_is_refused_before_loading(
    world, tmp_path, capsys, no_model_load, override, message
):
    out = tmp_path / "bad"
    assert _run(world.cfg, out, *override) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_other_config_in_out_is_refused(world, capsys, no_model_load):
    before = _bytes(world.ref)
    parts = sorted(p.name for p in (world.ref / "parts").iterdir())
    assert _run(world.cfg, world.ref, "--data.seed", "7") == 2
    err = capsys.readouterr().err
    assert (
        "holds a `leverlm gt` run with other inputs or settings (changed: config data.seed)" in err
    )
    assert "--overwrite" in err
    assert _bytes(world.ref) == before
    assert sorted(p.name for p in (world.ref / "parts").iterdir()) == parts


def test_progress_metrics_are_logged(world, tmp_path):
    out = tmp_path / "logged"
    args = [
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path / "csv"),
        "--data.num_anchors",
        "3",
    ]
    assert _run(world.cfg, out, *args) == 0
    (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    for name in ("gt/anchors_per_s", "gt/anchors_done", "gt/score_mean", "gt/score_p90"):
        assert name in header
    assert len(metrics.read_text().splitlines()) == 1 + 3  # one row per anchor batch


def test_limited_run_keeps_its_parts_and_a_rerun_finishes(world, tmp_path, capsys):
    out = tmp_path / "limited"
    assert _run(world.cfg, out, "--trainer.limit_predict_batches", "3") == 3
    err = capsys.readouterr().err
    assert "error: 8 anchors of" in err and "rerun the same command" in err
    assert len(_part_records(out)) == 3 and not (out / "manifest.json").exists()
    assert _run(world.cfg, out) == 0
    assert _bytes(out) == _bytes(world.ref)


# -- the shipped configs ----------------------------------------------------------------------

EXPERIMENTS = sorted(ROOT.glob("experiments/*/gt_*.yaml"))
PAPER_EXPERIMENTS = [p for p in EXPERIMENTS if p.parent.name != "easyvqa"]
PAPER = {
    "data": {"num_anchors": 5000, "sampler": "random", "num_candidates": 64},
    "model": {
        "beam_size": 5,
        "shots": 2,
        "order": "left",
        "ranking": "last",
        "scorer": "infoscore",
        "candidate_batch_size": 32,
    },
}


def _print_config(cfg: Path, capsys) -> dict:
    import yaml

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["gt", "predict", "--config", str(cfg), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_experiment_configs_pin_the_paper_settings(capsys):
    names = {f"{p.parent.name}/{p.name}" for p in EXPERIMENTS}
    assert names >= {
        "coco/gt_idefics.yaml",
        "coco/gt_openflamingo.yaml",
        "vqav2/gt_idefics.yaml",
        "vqav2/gt_openflamingo.yaml",
    }
    for path in PAPER_EXPERIMENTS:
        resolved = _print_config(path, capsys)
        for section, values in PAPER.items():
            for key, value in values.items():
                assert resolved[section][key] == value, (path, section, key)
        task = "caption" if path.parent.name == "coco" else "vqa"
        assert resolved["model"]["task"].startswith(task), path
        assert resolved["model"]["lvlm"]["dtype"] == "bf16", path


def _collection_for(task: str, path: Path, n: int = 66) -> Path:
    from leverlm.data.collection import SampleRecord, write_collection

    words = ["a red shape on white", "a small blue circle", "two green squares", "a gray triangle"]
    records = []
    for i in range(n):
        if task == "caption":
            fields = {
                "image_id": i,
                "file_name": f"{i}.png",
                "captions": [words[i % 4], words[(i + 1) % 4]],
                "caption": words[i % 4],
            }
        else:
            answer = ["red", "blue", "yes", "no"][i % 4]
            fields = {
                "question_id": i,
                "image_id": i,
                "question": "What color is the shape?",
                "answers": [answer] * 10,
                "answer": answer,
                "answer_type": "other",
                "question_type": "what",
            }
        records.append(SampleRecord(f"{task}-{i:06d}", _image(i), "png", fields))
    return write_collection(path, records, name=f"tiny-{task}", task=task, split="train")


@pytest.fixture(scope="module")
def stand_ins(world):
    """Tiny stand-ins for the experiment configs' placeholders (66 samples: K=64 fits)."""
    from leverlm.lvlm.tiny import build_tiny

    root = world.root / "stand_ins"
    return SimpleNamespace(
        caption=_collection_for("caption", root / "caption"),
        vqa=_collection_for("vqa", root / "vqa"),
        idefics=world.lvlm,
        flamingo=build_tiny("flamingo", root / "flamingo", seed=0),
    )


@pytest.mark.parametrize("config", PAPER_EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_experiment_configs_run_on_tiny_stand_ins(config, stand_ins, tmp_path):
    """Each experiment config runs as shipped, with only paths, device and size overridden."""
    coll = stand_ins.caption if config.parent.name == "coco" else stand_ins.vqa
    lvlm = stand_ins.flamingo if "openflamingo" in config.name else stand_ins.idefics
    out = tmp_path / "out"
    overrides = [
        *("--data.collection", str(coll), "--model.lvlm.path", str(lvlm)),
        *("--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"),
        *("--trainer.logger", "false", "--data.num_anchors", "1", "--data.num_workers", "0"),
        *("--progress_bar", "false"),
    ]
    assert _run(config, out, *overrides) == 0
    manifest, (record,) = read_gt(out)
    assert manifest["beam_size"] == 5 and manifest["shots"] == 2 and manifest["order"] == "left"
    assert len(record.sequences) == 5 and all(len(s) == 2 for s in record.sequences)


def test_demo_config_runs_with_the_default_logger(world, tmp_path):
    """experiments/easyvqa/gt_demo.yaml as the demo calls it (the committed demo LVLM on the tiny
    collection), wandb disabled."""
    import numpy as np

    from leverlm.demo import lvlm_dir

    out = tmp_path / "demo"
    assert os.environ.get("WANDB_MODE") == "disabled"
    rng = np.random.default_rng(0)
    # the demo's joint_sim sampler reads the CLIP features
    image, text = (rng.standard_normal((NUM_SAMPLES, 8)) for _ in range(2))
    store = write_store(tmp_path / "store", image, text, world.coll)
    overrides = ["--data.collection", str(world.coll), "--model.lvlm.path", str(lvlm_dir())]
    overrides += ["--data.support_features", str(store)]
    cfg = ROOT / "experiments" / "easyvqa" / "gt_demo.yaml"
    assert _run(cfg, out, *overrides, "--data.num_anchors", "4", "--progress_bar", "false") == 0
    manifest, records = read_gt(out)
    assert len(records) == 4 and manifest["config"]["data"]["num_candidates"] == 16
    assert manifest["config"]["data"]["sampler"] == "joint_sim"
    assert manifest["lvlm"]["model_type"] == "idefics3"
    assert manifest["config"]["model"]["task"] == "vqa_nonce"
    assert (out / "logs").is_dir()


def test_anchor_batches_split_over_workers_exactly_once(world):
    import torch

    from leverlm.gt.job import AnchorBatches

    anchors = select_anchors(NUM_SAMPLES, NUM_ANCHORS, seed=0)
    kw = {"kind": "random", "k": 5, "seed": 3}
    data = AnchorBatches(str(world.coll), anchors, anchors_per_batch=2, sampler_kwargs=kw)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, num_workers=2, collate_fn=lambda x: x
    )
    seen = []
    sampler = RandomSampler(NUM_SAMPLES, 5, seed=3)
    for batch in loader:
        for anchor, cands in zip(batch["anchors"], batch["candidates"]):
            seen.append(anchor["position"])
            assert cands == sampler.sample([anchor["position"]])[0]
            assert all(batch["samples"][p]["position"] == p for p in cands)
            assert anchor["image"].size == (32, 32)
    assert sorted(seen) == anchors


def test_similarity_mix_sampler_in_the_job(world, tmp_path):
    import numpy as np

    from leverlm.gt.samplers import build_sampler

    rng = np.random.default_rng(0)
    image, text = (rng.standard_normal((NUM_SAMPLES, 16)) for _ in range(2))
    store = write_store(tmp_path / "store", image, text, world.coll)
    out = tmp_path / "mix"
    args = ["--data.sampler", "mix", "--data.support_features", str(store)]
    args += ["--data.num_anchors", "3"]
    assert _run(world.cfg, out, *args) == 0
    manifest, records = read_gt(out)
    assert manifest["config"]["data"]["support_features"] == str(store)
    sampler = build_sampler("mix", NUM_SAMPLES, K, 0, str(store), collection=world.coll)
    for r in records:
        cands = set(sampler.sample([r.anchor_position])[0])
        assert all(set(s) <= cands for s in r.sequences)


def test_cider_gain_scorer_in_the_job(world, stand_ins, tmp_path):
    out = tmp_path / "cider"
    args = [
        *("--data.collection", str(stand_ins.caption), "--model.task", "caption"),
        *("--model.scorer", "cider_gain", "--data.num_anchors", "2", "--data.num_candidates", "4"),
        *("--model.beam_size", "2"),
    ]
    assert _run(world.cfg, out, *args) == 0
    manifest, records = read_gt(out)
    assert manifest["task"] == "caption" and manifest["config"]["model"]["scorer"] == "cider_gain"
    assert all(len(r.sequences) == 2 for r in records)
    # CIDEr x100 differences, bounded by the CIDEr-D range.
    assert all(-1000.0 <= s <= 1000.0 for r in records for s in r.scores)


@pytest.mark.parametrize("damage", ["shard byte", "manifest sha256"])
def test_a_collection_changed_after_prep_is_refused(world, tmp_path, capsys, no_model_load, damage):
    import shutil

    coll = tmp_path / "coll"
    shutil.copytree(world.coll, coll)
    if damage == "shard byte":  # e.g. a label edited in place: same sizes, other content
        shard = sorted(coll.glob("*.tar"))[0]
        data = bytearray(shard.read_bytes())
        data[700] ^= 0x01
        shard.write_bytes(bytes(data))
    else:
        manifest = json.loads((coll / "manifest.json").read_text())
        manifest["shards"][0]["sha256"] = "0" * 64
        (coll / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    assert _run(world.cfg, out, "--data.collection", str(coll)) == 2
    err = capsys.readouterr().err
    assert "shard-000000.tar: its content does not match the collection manifest" in err
    assert not out.exists()


def test_one_run_per_folder_and_a_dead_owners_lock_is_taken_over(world, tmp_path, capsys, caplog):
    import socket

    out = tmp_path / "locked"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": sleeper.pid, "since": time.time()}
        (out / "run.lock").write_text(json.dumps(lock))
        assert _run(world.cfg, out) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {sleeper.pid}" in err and "run.lock" in err
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing else written
    finally:
        sleeper.kill()
        sleeper.wait()
    with caplog.at_level("WARNING", logger="leverlm.runs"):
        assert _run(world.cfg, out, "--data.num_anchors", "2") == 0
    assert f"its owner (pid {sleeper.pid}) is gone" in caplog.text
    assert not (out / "run.lock").exists()  # released at the end


def test_an_unwritable_out_is_refused_before_loading(world, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _run(world.cfg, blocker / "out") == 2
    assert "cannot write to" in capsys.readouterr().err


@pytest.mark.parametrize("changed", ["collection", "lvlm"])
def test_a_rerun_whose_inputs_changed_is_refused(world, tmp_path, capsys, changed):
    """Same paths, other content: never a gt dataset mixing two collections or two models."""
    import shutil

    from leverlm.lvlm.tiny import build_tiny

    coll, lvlm = tmp_path / "coll", tmp_path / "lvlm"
    shutil.copytree(world.coll, coll)
    shutil.copytree(world.lvlm, lvlm)
    out = tmp_path / "out"
    args = ["--data.collection", str(coll), "--model.lvlm.path", str(lvlm)]
    assert _run(world.cfg, out, *args, "--trainer.limit_predict_batches", "2") == 3
    parts = sorted(p.name for p in (out / "parts").iterdir())
    if changed == "collection":
        shutil.rmtree(coll)
        _collection(coll, seed=1)
    else:
        shutil.rmtree(lvlm)
        build_tiny("idefics", lvlm, seed=1)
    capsys.readouterr()
    assert _run(world.cfg, out, *args) == 2
    err = capsys.readouterr().err
    assert f"input '{changed}' (its content changed)" in err and "--overwrite" in err
    assert sorted(p.name for p in (out / "parts").iterdir()) == parts
    assert _run(world.cfg, out, *args, "--overwrite", "true") == 0
