"""The `leverlm eval` job end to end on tiny VQA collections and the tiny IDEFICS model.

Covers: prediction counts and ICDs per method, manifest + report (values recomputed from the
predictions), prompts equal to the scorer's, resume after SIGKILL, 2-process DDP == 1
process, a complete rerun that loads no model, logging, and bad-config refusal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers import ROOT
from helpers.eval_world import NUM_QUERIES, NUM_SUPPORT, build_world, feature_store

from leverlm.cli import main as cli_main
from leverlm.icl.job import EvalDataModule, EvalModule
from leverlm.lvlm import LVLMSpec

# End-to-end runs of a job (subprocesses, DDP, kills): not in `make test-fast`.
pytestmark = pytest.mark.slow

LIMIT = 10
BATCH = 4
SHOTS = [1, 2, 3]
METHODS = ["zero_shot", "random", "siir", "sttr", "sitr", "fixed", "lever_lm", "lever_lm_shuffled"]
LEVERLM = str(Path(sys.executable).with_name("leverlm"))
RESULT_FILES = ("predictions.jsonl", "manifest.json", "report.md", "report.csv", "report.json")


def _config(w: dict[str, Path], lvlm: Path, model_type: str = "idefics", **model: Any) -> str:
    model_lines = "".join(f"\n    {k}: {v}" for k, v in model.items())
    return f"""
model:
  lvlm:
    model_type: {model_type}
    path: {lvlm}
    dtype: float32{model_lines}
  task: vqa_idefics
data:
  queries: {w["queries"]}
  supporting_set: {w["support"]}
  query_features: {w["query_store"]}
  support_features: {w["support_store"]}
  methods: {json.dumps(METHODS)}
  shots: {json.dumps(SHOTS)}
  retrievers:
    fixed: {{gt_dir: {w["gt"]}}}
    lever_lm: {{checkpoint: {w["ckpt"]}}}
    lever_lm_shuffled: {{seed: 7}}
  limit: {LIMIT}
  seed: 0
  trials: 1
  batch_size: {BATCH}
  num_workers: 0
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
log_samples: 0
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from leverlm.lvlm.tiny import build_tiny

    root = tmp_path_factory.mktemp("eval_job")
    w = build_world(root)
    lvlm = build_tiny("idefics", root / "idefics", seed=0)
    cfg = root / "eval.yaml"
    cfg.write_text(_config(w, lvlm))
    ref = root / "ref"
    assert _run(cfg, ref) == 0
    return SimpleNamespace(root=root, cfg=cfg, ref=ref, lvlm=lvlm, **w)


def _run(cfg: Path, out: Path, *extra: str) -> int:
    return cli_main(["eval", "predict", "--config", str(cfg), "--out", str(out), *extra])


def _bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in (*RESULT_FILES, "report.png")}


def _predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _part_predictions(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted((out / "parts").glob("rank*.jsonl"))
        for line in p.read_text().splitlines()
    ]


# ------------------------------------------------------------------------------ end to end


def test_predictions_cover_every_query_method_and_shot_count(world):
    from leverlm.gt.samplers import select_anchors

    preds = _predictions(world.ref)
    assert len(preds) == LIMIT * ((len(METHODS) - 1) * len(SHOTS) + 1)
    keys = [f"val-{1000 + p:06d}" for p in select_anchors(NUM_QUERIES, LIMIT, seed=0)]
    ids = [(p["query_key"], p["method"], p["shots"]) for p in preds]
    assert len(set(ids)) == len(ids)
    assert {k for k, _, _ in ids} == set(keys)
    assert {(m, s) for _, m, s in ids} == {("zero_shot", 0)} | {
        (m, s) for m in METHODS[1:] for s in SHOTS
    }
    # sorted as the report sorts: method (paper order), shots, key
    order = [(METHODS.index(m), s, k) for k, m, s in ids]
    assert order == sorted(order)
    for p in preds:
        assert len(p["icd_positions"]) == p["shots"] == len(set(p["icd_positions"]))
        assert all(0 <= i < NUM_SUPPORT for i in p["icd_positions"])
        assert isinstance(p["prediction"], str) and len(p["references"]) == 10


def test_each_method_gets_its_retrievers_icds(world):
    """ICDs in the results equal the retrievers run directly (independent reference paths)."""
    from leverlm.encoders import FeatureStore
    from leverlm.icl.retrievers import RandomRetriever
    from leverlm.lever.select import LeverLM
    from leverlm.similarity import cosine_topk_reference

    preds = _predictions(world.ref)
    by = {(p["method"], p["shots"], p["query_key"]): p["icd_positions"] for p in preds}
    keys = sorted({p["query_key"] for p in preds})
    pos = [int(k.split("-")[1]) - 1000 for k in keys]
    qs = [{"__key__": k, "position": p} for k, p in zip(keys, pos, strict=True)]
    s, q = FeatureStore(world.support_store), FeatureStore(world.query_store)
    ranked = {
        "siir": cosine_topk_reference(q.image[pos], s.image, 3)[0],
        "sttr": cosine_topk_reference(q.text[pos], s.text, 3)[0],
        "sitr": cosine_topk_reference(q.image[pos], s.text, 3)[0],
    }
    lever = LeverLM.from_checkpoint(world.ckpt, support_features=world.support_store)
    for shots in SHOTS:
        rand = RandomRetriever(NUM_SUPPORT, seed=0).retrieve(qs, shots)
        lm = lever.select(pos, shots, query_features=world.query_store)
        for i, key in enumerate(keys):
            assert by[("random", shots, key)] == rand[i]
            for method, rows in ranked.items():  # most similar next to the query
                assert by[(method, shots, key)] == rows[i][:shots][::-1].tolist()
            assert by[("lever_lm", shots, key)] == lm[i]
            assert sorted(by[("lever_lm_shuffled", shots, key)]) == sorted(lm[i])
    # fixed: the gt dataset's best sequence (7, 2), the last k for k <= 2, extended for 3
    assert {tuple(by[("fixed", 1, k)]) for k in keys} == {(2,)}
    assert {tuple(by[("fixed", 2, k)]) for k in keys} == {(7, 2)}
    (three,) = {tuple(by[("fixed", 3, k)]) for k in keys}
    assert three[1:] == (7, 2) and three[0] not in (7, 2)
    assert any(by[("lever_lm_shuffled", 3, k)] != by[("lever_lm", 3, k)] for k in keys)


def test_manifest_and_report_values_recomputed_from_predictions(world):
    from leverlm.metrics import vqa_accuracy_reference

    manifest = json.loads((world.ref / "manifest.json").read_text())
    assert manifest["format"] == "leverlm-eval"
    assert manifest["task"] == "vqa" and manifest["metric"] == "vqa_accuracy"
    assert manifest["trained_shots"] == 2  # recorded in the test checkpoint
    assert manifest["interpolation_max_shots"] == 4
    assert manifest["lvlm"] == world.lvlm.name
    assert manifest["lvlm_config"]["generation"] == {
        "max_new_tokens": 5, "num_beams": 3, "length_penalty": 0.0
    }  # fmt: skip
    assert manifest["num_queries"] == LIMIT and manifest["methods"] == METHODS
    assert manifest["config"]["data"]["retrievers"]["fixed"]["sequence"] == [7, 2]
    assert len(manifest["run_sha256"]) == 64

    report = json.loads((world.ref / "report.json").read_text())
    preds = _predictions(world.ref)
    rows = {(r["method"], r["shots"]): r for r in report["rows"]}
    assert len(rows) == 1 + (len(METHODS) - 1) * len(SHOTS)
    for (method, shots), row in rows.items():
        group = [p for p in preds if p["method"] == method and p["shots"] == shots]
        want = 100 * np.mean(
            [vqa_accuracy_reference(p["prediction"], p["references"]) for p in group]
        )
        assert row["n"] == LIMIT and row["value"] == pytest.approx(want, abs=1e-6)
    md = (world.ref / "report.md").read_text()
    assert md.splitlines()[0].startswith("| method | 0 | 1 (interp) | 2 (interp) | 3 (interp)")


def test_report_of_a_model_with_varied_scores(world, tmp_path):
    cfg = tmp_path / "echo.yaml"
    paths = {k: getattr(world, k) for k in ("queries", "support", "query_store", "support_store")}
    paths |= {"gt": world.gt, "ckpt": world.ckpt}
    cfg.write_text(
        _config(paths, world.lvlm, model_type="echo", loader="helpers.eval_world:echo_lvlm")
    )
    out = tmp_path / "echo"
    assert _run(cfg, out, "--trained_shots", "3", "--interpolation_max_shots", "2") == 0
    from leverlm.metrics import vqa_accuracy_reference

    preds = _predictions(out)
    report = json.loads((out / "report.json").read_text())
    values = {(r["method"], r["shots"]): r["value"] for r in report["rows"]}
    assert len(set(values.values())) > 3  # the methods really differ here
    for (method, shots), value in values.items():
        group = [p for p in preds if p["method"] == method and p["shots"] == shots]
        want = 100 * np.mean(
            [vqa_accuracy_reference(p["prediction"], p["references"]) for p in group]
        )
        assert value == pytest.approx(want, abs=1e-6)
    for avg in report["averages"]:
        per_shot = [values[(avg["method"], s)] for s in avg["shots"]]
        assert avg["value"] == pytest.approx(np.mean(per_shot), abs=1e-6)
    regimes = {(r["method"], r["shots"]): r["regime"] for r in report["rows"]}
    assert regimes[("random", 2)] == "interp" and regimes[("random", 3)] == "extrap"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trained_shots"] == 3  # the command line wins over the checkpoint
    assert manifest["lvlm_config"]["model_type"] == "echo"


def test_prompts_are_the_scorers_prompts_for_the_same_icds(world):
    """The eval job's generate calls build, for each query, exactly the token ids the gt scorer
    builds for the same ICD samples (the prompt without the answer) - and the job's samples are
    the collections' samples at the recorded positions."""
    from leverlm.data.collection import Collection

    dm = EvalDataModule(
        queries=str(world.queries),
        supporting_set=str(world.support),
        task="vqa_idefics",
        methods=["siir", "fixed"],
        shots=[2],
        retrievers={"fixed": {"gt_dir": str(world.gt)}},
        query_features=str(world.query_store),
        support_features=str(world.support_store),
        limit=LIMIT,
        batch_size=BATCH,
        num_workers=0,
    )
    dm.setup("predict")
    module = EvalModule(LVLMSpec("idefics", str(world.lvlm)), task="vqa_idefics")
    module.load_lvlm()
    lvlm = module.lvlm
    seen = []
    original = lvlm.encode_pairs

    def spy(icd_seqs, queries, with_answer=True, extra_tokens=0):
        encs = original(icd_seqs, queries, with_answer, extra_tokens)
        seen.extend(encs)
        return encs

    lvlm.encode_pairs = spy
    queries, support = Collection(world.queries), Collection(world.support)
    ref = {(p["query_key"], p["method"], p["shots"]): p for p in _predictions(world.ref)}
    items = list(dm.predict_dataloader())
    assert len(items) == 2 * 3  # 3 batches of <= 4 queries x 2 methods
    for item in items:
        seen.clear()
        preds = module.predict_item(item)
        assert len(seen) == len(preds) == len(item["queries"])
        lvlm.encode_pairs = original
        for pred, enc in zip(preds, seen, strict=True):
            query = queries[queries.position_of(pred.query_key)]
            icds = [support[p] for p in pred.icd_positions]
            scored = lvlm.encode_pairs([icds], [query], with_answer=True)[0]
            assert enc.input_ids == scored.input_ids[: scored.answer_start]
            assert enc.num_answer_tokens == 0 < scored.num_answer_tokens
            # same work item composition as the full run: the same generation
            want = ref[(pred.query_key, pred.method, pred.shots)]
            assert list(pred.icd_positions) == want["icd_positions"]
            assert pred.prediction == want["prediction"]
        lvlm.encode_pairs = spy


# ------------------------------------------------------------------------------ resume, DDP


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
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
    cmd = [LEVERLM, "eval", "predict", "--config", str(world.cfg), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--part_size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _wait_for("rank0-*.jsonl", out / "parts", proc)
        os.kill(proc.pid, signal.SIGKILL)  # mid-way through the next work item
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    done = _part_predictions(out)
    total = len(_predictions(world.ref))
    assert 1 <= len(done) < total, "the kill came too late to test a resume"
    assert not (out / "manifest.json").exists() and not (out / "predictions.jsonl").exists()

    with caplog.at_level("INFO", logger="leverlm.eval"):
        assert _run(world.cfg, out) == 0
    assert f"skipped {len(done)} predictions already done" in caplog.text
    ids = [(p["query_key"], p["method"], p["shots"]) for p in _part_predictions(out)]
    assert len(ids) == len(set(ids)) == total  # nothing generated twice
    assert _bytes(out) == _bytes(world.ref)


def test_two_process_ddp_equals_one_process(world, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        LEVERLM, "eval", "predict", "--config", str(world.cfg), "--out", str(out),
        "--trainer.devices", "2", "--trainer.strategy", "ddp",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # 3 query batches (4 + 4 + 2 queries) x 22 (method, shots), whole batches dealt round-robin
    assert "rank 0: skipped 0 predictions already done, 132 to do on this rank" in res.stderr
    assert "rank 1: skipped 0 predictions already done, 88 to do on this rank" in res.stderr
    ranks = {p.name.split("-")[0] for p in (out / "parts").glob("rank*.jsonl")}
    assert ranks == {"rank0", "rank1"}
    assert _bytes(out) == _bytes(world.ref)
    assert res.stdout.startswith("| method | 0 | 1 (interp)")  # rank 0 printed the table once
    assert res.stdout.count("| method |") == 1


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load an LVLM."""
    import leverlm.lvlm.base

    def boom(*a, **k):
        raise AssertionError("an LVLM was loaded where none should be")

    monkeypatch.setattr(leverlm.lvlm.base, "load_lvlm", boom)
    monkeypatch.setattr(leverlm.lvlm.base, "resolve_loader", boom)


def test_rerun_of_a_finished_run_loads_no_model_and_keeps_the_bytes(world, tmp_path, no_model_load):
    out = tmp_path / "again"
    shutil.copytree(world.ref, out)
    before = _bytes(out)
    (out / "report.md").unlink()
    (out / "predictions.jsonl").unlink()
    assert _run(world.cfg, out) == 0
    assert _bytes(out) == before
    shutil.rmtree(tmp_path / "merged", ignore_errors=True)
    shutil.copytree(world.ref, tmp_path / "merged")
    for name in RESULT_FILES:
        (tmp_path / "merged" / name).unlink()
    assert cli_main(["eval", "merge", "--out", str(tmp_path / "merged")]) == 0
    assert _bytes(tmp_path / "merged") == before


def test_report_is_logged_to_the_logger(world, tmp_path):
    import csv

    out = tmp_path / "logged"
    args = [
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(tmp_path / "csv"),
        "--data.limit", "2", "--data.methods", '["zero_shot", "random"]',
    ]  # fmt: skip
    assert _run(world.cfg, out, *args) == 0
    (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("report/") and v}
    report = json.loads((out / "report.json").read_text())
    for r in report["rows"]:
        assert logged[f"report/{r['method']}/{r['shots']}shot"] == pytest.approx(r["value"])
    assert {"report/random/avg", "report/zero_shot/avg"} <= set(logged)


# ------------------------------------------------------------------------------ bad configs


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--data.methods", '["random", "siiir"]'],
            "unknown method 'siiir'; known: answer_oracle, fixed",
        ),
        (["--data.shots", "[1, -2]"], "shots=-2; shot counts must be >= 1"),
        (
            ["--data.retrievers", "{}", "--data.methods", '["lever_lm"]'],
            "needs a Lever-LM checkpoint",
        ),
        (["--model.lvlm.path", "/nonexistent/idefics"], "'/nonexistent/idefics' does not exist"),
        (["--data.shots", "[31]"], "shots=31 but the supporting set"),
        (["--model.task", "caption"], "is a 'caption' task but data.queries"),
        (
            ["--data.methods", '["siir"]', "--data.support_features", "null"],
            "set data.support_features",
        ),
        (["--data.batch_size", "0"], "data.batch_size must be an int >= 1"),
        (["--report_formats", "md,pdf"], "--report_formats"),
    ],
)
def test_bad_config_is_refused_before_loading(
    world, tmp_path, capsys, no_model_load, override, message
):
    out = tmp_path / "bad"
    assert _run(world.cfg, out, *override) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_feature_store_of_another_collection_is_refused(world, tmp_path, capsys, no_model_load):
    out = tmp_path / "bad"
    # swapped stores: the supporting set's store given for the queries
    assert _run(world.cfg, out, "--data.query_features", str(world.support_store)) == 2
    err = capsys.readouterr().err
    assert "data.query_features" in err and "was built for collection 'tiny-vqa-train'" in err
    stale = feature_store(tmp_path / "stale", world.queries, seed=3)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["num_rows"] = NUM_QUERIES + 1
    (stale / "manifest.json").write_text(json.dumps(manifest))
    assert _run(world.cfg, out, "--data.query_features", str(stale)) == 2
    assert "data.query_features" in capsys.readouterr().err
    assert not out.exists()


def test_lever_checkpoint_of_another_supporting_set_is_refused(
    world, tmp_path, capsys, no_model_load
):
    from helpers.eval_world import vqa_collection

    other = vqa_collection(tmp_path / "other", NUM_SUPPORT - 1, "train")
    args = ["--data.supporting_set", str(other), "--data.support_features", "null"]
    args += ["--data.methods", '["lever_lm"]']
    assert _run(world.cfg, tmp_path / "bad", *args) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {str(world.ckpt)!r}: its vocabulary has {NUM_SUPPORT} ICDs" in err


def test_other_config_in_out_is_refused(world, capsys, no_model_load):
    before = _bytes(world.ref)
    parts = sorted(p.name for p in (world.ref / "parts").iterdir())
    assert _run(world.cfg, world.ref, "--data.seed", "7") == 2
    err = capsys.readouterr().err
    assert (
        "holds a `leverlm eval` run with other inputs or settings (changed: config data.seed" in err
    )
    assert "--overwrite" in err
    assert _bytes(world.ref) == before
    assert sorted(p.name for p in (world.ref / "parts").iterdir()) == parts


def test_overwrite_replaces_another_configs_results(world, tmp_path):
    out = tmp_path / "over"
    shutil.copytree(world.ref, out)
    args = ["--data.limit", "2", "--data.methods", '["zero_shot"]', "--overwrite", "true"]
    assert _run(world.cfg, out, *args) == 0
    preds = _predictions(out)
    assert len(preds) == 2 and {p["method"] for p in preds} == {"zero_shot"}
    assert len(_part_predictions(out)) == 2  # the other run's parts are gone
    report = json.loads((out / "report.json").read_text())
    assert [(r["method"], r["shots"]) for r in report["rows"]] == [("zero_shot", 0)]


def test_dataloader_workers_yield_each_item_once(world):
    import torch

    dm = EvalDataModule(
        queries=str(world.queries),
        supporting_set=str(world.support),
        methods=["zero_shot", "random"],
        shots=[1, 2],
        limit=LIMIT,
        trials=1,
        batch_size=BATCH,
        num_workers=2,
    )
    dm.setup("predict")
    assert len(dm.items) == 3 * 3
    loader = dm.predict_dataloader()
    assert isinstance(loader, torch.utils.data.DataLoader) and loader.num_workers == 2
    got = sorted((b["batch"], b["method"], b["shots"], len(b["queries"])) for b in loader)
    assert got == sorted((it.batch, it.method, it.shots, len(it.rows)) for it in dm.items)
    dm.skip({(k, "random", 2) for k in dm.query_keys[:BATCH]})  # batch 0 done for random/2
    assert len(dm.items) == 3 * 3 - 1
    dm.skip({(k, "random", 2) for k in dm.query_keys[:2]})  # half of batch 0
    assert [it.rows for it in dm.items if it.method == "random" and it.shots == 2][0] == (2, 3)
    dm.rank, dm.world_size = 1, 2
    assert [it.batch for it in dm.rank_items] == [1, 1, 1]  # whole batches, round-robin
    dm.rank = 0
    assert [it.batch for it in dm.rank_items] == [0, 0, 0, 2, 2, 2]


# ------------------------------------------------------------------------------ configs


CONFIGS = {
    "experiments/easyvqa/eval_demo.yaml": None,
    "experiments/coco/eval_openflamingo.yaml": "caption",
    "experiments/vqav2/eval_idefics.yaml": "vqa_idefics",
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_parse_with_the_papers_settings(name, capsys):
    root = ROOT
    with pytest.raises(SystemExit) as exit_:
        cli_main(["eval", "predict", "--config", str(root / name), "--print_config"])
    assert exit_.value.code in (0, None)
    import yaml

    cfg = yaml.safe_load(capsys.readouterr().out)
    data, model = cfg["data"], cfg["model"]
    if CONFIGS[name] is not None:  # the paper's experiments
        assert model["task"] == CONFIGS[name]
        assert data["shots"] == [1, 2, 3, 4, 6, 8]
        assert data["methods"] == ["zero_shot", "random", "siir", "sttr", "sitr", "lever_lm"]
        assert model["lvlm"]["dtype"] == "bf16"
    assert "checkpoint" in data["retrievers"]["lever_lm"]


def test_demo_config_runs_on_tiny_data(world, tmp_path):
    """The demo config (committed demo LVLM, vqa_nonce) on the tiny world runs end to end."""
    from leverlm.demo import lvlm_dir
    from leverlm.tasks import NonceAnswers

    root = ROOT
    out = tmp_path / "demo"
    args = [
        "--data.queries", str(world.queries), "--data.supporting_set", str(world.support),
        "--data.query_features", str(world.query_store),
        "--data.support_features", str(world.support_store),
        "--data.retrievers.fixed.gt_dir", str(world.gt),
        "--data.retrievers.lever_lm.checkpoint", str(world.ckpt),
        "--model.lvlm.path", str(lvlm_dir()), "--data.limit", "3", "--data.shots", "[1, 8]",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert _run(root / "experiments/easyvqa/eval_demo.yaml", out, *args) == 0
    preds = _predictions(out)
    # zero-shot once; 8 methods, random and lever_lm_shuffled over 3 seeds: 12 x 2 shot counts
    assert len(preds) == 3 * (1 + 12 * 2)
    assert json.loads((out / "manifest.json").read_text())["trained_shots"] == 2
    # scored against the query's own nonce words, as its prompt showed them
    from leverlm.data.collection import Collection

    support, qcoll = Collection(world.support), Collection(world.queries)
    queries = {k: qcoll.fields(p) for p, k in enumerate(qcoll.keys)}
    for p in preds:
        mapping = NonceAnswers().mapping(p["query_key"])
        assert p["references"] == [mapping[a] for a in queries[p["query_key"]]["answers"]]
        if p["method"] == "oracle":
            answer = queries[p["query_key"]]["answer"]
            same = sum(support.fields(i)["answer"] == answer for i in range(len(support)))
            icds = p["icd_positions"][len(p["icd_positions"]) - min(same, p["shots"]) :]
            assert all(support.fields(i)["answer"] == answer for i in icds)


def test_lever_checkpoint_of_another_same_size_supporting_set_is_refused(
    world, tmp_path, capsys, no_model_load
):
    from helpers.eval_world import lever_checkpoint

    other = lever_checkpoint(
        tmp_path / "other.ckpt", world.support_store, supporting_set_sha256="f" * 64
    )
    args = ["--data.retrievers.lever_lm.checkpoint", str(other)]
    assert _run(world.cfg, tmp_path / "bad", *args) == 2
    err = capsys.readouterr().err
    assert "it was trained on another supporting set" in err and "ffffffffffff" in err


PAPER_EVALS = {
    "experiments/coco/eval_openflamingo.yaml": "caption",
    "experiments/vqav2/eval_idefics.yaml": "vqa",
}


@pytest.mark.parametrize("name", sorted(PAPER_EVALS))
def test_paper_eval_configs_run_as_written_on_tiny_stand_ins(world, name, tmp_path):
    """The paper's eval configs as shipped. Overridden: the paths a user supplies (collections,
    feature stores, Lever-LM checkpoint, LVLM folder, --out) and, to run here in seconds, the
    device (CPU, 1 process, no logger), the query count and shot counts."""
    from helpers.collection_data import caption_records
    from helpers.eval_world import feature_store, lever_checkpoint

    from leverlm.data.collection import write_collection
    from leverlm.lvlm.tiny import build_tiny

    if PAPER_EVALS[name] == "caption":
        colls = {
            split: write_collection(
                tmp_path / split,
                caption_records(n, prefix=split),
                name=split,
                task="caption",
                split=split,
            )  # fmt: skip
            for split, n in (("train", NUM_SUPPORT), ("val", 6))
        }
        stores = {s: feature_store(tmp_path / f"feat-{s}", c, seed=3) for s, c in colls.items()}
        ckpt = lever_checkpoint(tmp_path / "lever.ckpt", stores["train"], task="caption")
        lvlm = build_tiny("flamingo", tmp_path / "flamingo", seed=0)
        paths = (colls["val"], colls["train"], stores["val"], stores["train"])
    else:
        ckpt, lvlm = world.ckpt, world.lvlm
        paths = (world.queries, world.support, world.query_store, world.support_store)
    args = [
        *("--data.queries", str(paths[0]), "--data.supporting_set", str(paths[1])),
        *("--data.query_features", str(paths[2]), "--data.support_features", str(paths[3])),
        *("--data.retrievers.lever_lm.checkpoint", str(ckpt), "--model.lvlm.path", str(lvlm)),
        *("--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"),
        *("--trainer.logger", "false", "--data.num_workers", "0", "--progress_bar", "false"),
        *("--data.limit", "2", "--data.shots", "[1, 2]", "--log_samples", "0"),
    ]
    out = tmp_path / "out"
    assert _run(ROOT / name, out, *args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == PAPER_EVALS[name] and manifest["lvlm_config"]["dtype"] == "bf16"
    assert {p["method"].split("#")[0] for p in _predictions(out)} == {
        "zero_shot", "random", "siir", "sttr", "sitr", "lever_lm"
    }  # fmt: skip


def test_seeded_methods_run_over_trials_and_report_mean_and_std(world, tmp_path):
    """random and lever_lm_shuffled over 3 seeds: methods name#t with seeds seed + t; the
    report's row is the mean of the per-seed rows with their sample std."""
    import statistics

    out = tmp_path / "trials"
    args = ["--data.trials", "3", "--data.methods", '["random", "lever_lm", "lever_lm_shuffled"]']
    assert _run(world.cfg, out, *args, "--data.shots", "[1, 2]", "--data.limit", "6") == 0
    methods = {p["method"] for p in _predictions(out)}
    assert methods == {"lever_lm", *(f"{m}#{t}" for m in ("random", "lever_lm_shuffled")
                                     for t in range(3))}  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    per_seed = {(r["method"], r["shots"]): r["value"] for r in report["meta"]["trial_rows"]}
    for row in report["rows"]:
        if row["method"] == "lever_lm":
            assert row["trials"] == 1 and row["std"] is None
            continue
        values = [per_seed[(f"{row['method']}#{t}", row["shots"])] for t in range(3)]
        assert row["trials"] == 3
        assert row["value"] == pytest.approx(statistics.fmean(values), abs=1e-6)
        assert row["std"] == pytest.approx(statistics.stdev(values), abs=1e-6)
    md = (out / "report.md").read_text()
    assert "| random (3 seeds) |" in md and " ± " in md and "mean ± std over their seeds" in md
    # the seeds differ: the three random trials picked different ICDs
    picks = {
        p["method"]: tuple(p["icd_positions"])
        for p in _predictions(out)
        if p["method"].startswith("random#")
        and p["shots"] == 2
        and p["query_key"] == p["query_key"]
    }
    assert len(set(picks.values())) > 1


def test_a_rerun_with_another_lvlm_under_the_same_path_is_refused(world, tmp_path, capsys):
    """12 predictions of one model and 30 of another must never merge into one run."""
    import shutil

    from leverlm.lvlm.tiny import build_tiny

    lvlm = tmp_path / "lvlm"
    shutil.copytree(world.lvlm, lvlm)
    out = tmp_path / "out"
    args = ["--model.lvlm.path", str(lvlm), "--part_size", "1"]
    assert _run(world.cfg, out, *args, "--trainer.limit_predict_batches", "2") == 3
    parts = sorted(p.name for p in (out / "parts").iterdir())
    shutil.rmtree(lvlm)
    build_tiny("idefics", lvlm, seed=1)
    capsys.readouterr()
    assert _run(world.cfg, out, *args) == 2
    assert "input 'lvlm' (its content changed)" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "parts").iterdir()) == parts
