"""Reports: tables recomputed from predictions, deterministic bytes, plot, logger, CLI."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pytest

from leverlm.cli import main as cli_main
from leverlm.metrics import cider, vqa_accuracy_batch
from leverlm.report import (
    ReportError,
    load_results,
    log_report_to_logger,
    main,
    method_averages,
    select_samples,
    write_report,
)

VQA_METHODS = {"zero_shot": [0], "random": [1, 2, 4, 6], "lever_lm": [1, 2, 4, 6, 8]}
VOCAB = ["yes", "no", "2", "red", "blue", "cat", "dog"]


def vqa_records(num_queries: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    answers = {
        f"vqa-{i:05d}": [rng.choice(VOCAB[:3]) if j < 6 else rng.choice(VOCAB) for j in range(10)]
        for i in range(num_queries)
    }
    records = []
    for method, shot_list in VQA_METHODS.items():
        for shots in shot_list:
            for key, refs in answers.items():
                pred = rng.choice(["Two", "Yes.", "no", "a red", "cat", "the dog"])
                records.append(
                    {
                        "query_key": key,
                        "method": method,
                        "shots": shots,
                        "icd_positions": rng.sample(range(100), shots),
                        "prediction": pred,
                        "references": refs,
                    }
                )
    return records


def write_results(
    root: Path, records: list[dict], manifest: dict, shards: int = 2, seed: int = 0
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    for rank in range(shards):
        lines = [json.dumps(r) for r in shuffled[rank::shards]]
        (root / f"predictions-rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    return root


VQA_MANIFEST = {"task": "vqa", "metric": "vqa_accuracy", "trained_shots": 2, "lvlm": "tiny"}


def parse_markdown(text: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    body = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        body[cells[0]] = cells[1:]
    return header, body


def expected_vqa(records: list[dict]) -> dict[tuple[str, int], float]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["shots"]), []).append(r)
    return {
        g: vqa_accuracy_batch([r["prediction"] for r in rs], [r["references"] for r in rs])
        for g, rs in groups.items()
    }


def test_markdown_table_recomputed_from_predictions(tmp_path, capsys) -> None:
    records = vqa_records()
    root = write_results(tmp_path / "run", records, VQA_MANIFEST)
    assert main([str(root)]) == 0
    printed = capsys.readouterr().out
    assert printed == (root / "report.md").read_text()
    header, body = parse_markdown(printed)
    assert header == [
        "method", "0", "1 (interp)", "2 (interp)", "4 (interp)", "6 (extrap)", "8 (extrap)", "avg",
    ]  # fmt: skip
    shots_cols = [0, 1, 2, 4, 6, 8]
    expected = expected_vqa(records)
    assert list(body) == ["zero_shot", "random", "lever_lm"]  # the paper's order
    for method, cells in body.items():
        for shots, cell in zip(shots_cols, cells[:-1]):
            if (method, shots) in expected:
                assert cell == f"{expected[(method, shots)]:.2f}", (method, shots)
            else:
                assert cell == "-"
        values = [v for (m, s), v in expected.items() if m == method and s >= 1] or [
            expected[(method, 0)]
        ]
        assert cells[-1] == f"{sum(values) / len(values):.2f}"
    assert "n = 12 queries per cell" in printed


def test_json_and_csv_contents(tmp_path) -> None:
    records = vqa_records()
    root = write_results(tmp_path / "run", records, VQA_MANIFEST)
    out = tmp_path / "out"
    report = write_report(root, out, "json,csv", interpolation_max_shots=2)
    assert set(report.paths) == {"json", "csv"} and not (out / "report.md").exists()
    data = json.loads((out / "report.json").read_text())
    expected = expected_vqa(records)
    assert len(data["rows"]) == len(expected)
    for row in data["rows"]:
        assert set(row) == {"method", "shots", "metric", "value", "std", "trials", "n", "regime"}
        assert row["std"] is None and row["trials"] == 1  # single-seed methods
        assert row["value"] == pytest.approx(expected[(row["method"], row["shots"])], abs=1e-6)
        assert row["n"] == 12 and row["metric"] == "vqa_accuracy"
        want = "zero" if row["shots"] == 0 else "interp" if row["shots"] <= 2 else "extrap"
        assert row["regime"] == want
    avgs = {a["method"]: a for a in data["averages"]}
    assert avgs["random"]["shots"] == [1, 2, 4, 6]
    assert avgs["random"]["value"] == pytest.approx(
        sum(expected[("random", s)] for s in (1, 2, 4, 6)) / 4, abs=1e-6
    )
    assert data["meta"]["manifest"] == VQA_MANIFEST
    assert data["meta"]["interpolation_max_shots"] == 2 and data["meta"]["num_queries"] == 12
    table = list(csv.reader(io.StringIO((out / "report.csv").read_text())))
    assert table[0][:4] == ["method", "0", "1 (interp)", "2 (interp)"]
    assert table[0][4] == "4 (extrap)"
    lever = next(r for r in table if r[0] == "lever_lm")
    assert float(lever[table[0].index("8 (extrap)")]) == pytest.approx(
        expected[("lever_lm", 8)], abs=1e-4
    )
    zero = next(r for r in table if r[0] == "zero_shot")
    assert zero[2] == ""  # not evaluated


def test_reports_are_byte_identical_across_sharding(tmp_path) -> None:
    records = vqa_records()
    a = write_results(tmp_path / "a", records, VQA_MANIFEST, shards=1, seed=1)
    b = write_results(tmp_path / "b", records, VQA_MANIFEST, shards=3, seed=2)
    # b also has a resumed shard repeating some records: identical repeats merge
    (b / "predictions-rank9.jsonl").write_text("\n".join(json.dumps(r) for r in records[:5]))
    ra, rb = write_report(a), write_report(b)
    for fmt in ("md", "csv", "json", "png"):
        assert ra.paths[fmt].read_bytes() == rb.paths[fmt].read_bytes(), fmt
    png = ra.paths["png"].read_bytes()
    assert len(png) > 1000 and png.startswith(b"\x89PNG\r\n\x1a\n")


def test_caption_report_uses_cider(tmp_path) -> None:
    refs = {
        "coco-1": ["A man riding a wave on a surfboard.", "A surfer on a big wave."],
        "coco-2": ["Two dogs play with a ball.", "Dogs playing in the grass."],
        "coco-3": ["A plate of rice and broccoli.", "A dish of food on a table."],
    }
    preds = {
        ("random", 2): ["a man on a wave", "a dog with a ball", "a cat on a couch"],
        ("siir", 2): ["a surfer riding a wave", "two dogs playing", "a plate of food"],
    }
    records = [
        {
            "query_key": key,
            "method": method,
            "shots": shots,
            "icd_positions": [0, 1],
            "prediction": texts[i],
            "references": refs[key],
        }
        for (method, shots), texts in preds.items()
        for i, key in enumerate(sorted(refs))
    ]
    root = write_results(tmp_path / "cap", records, {"task": "caption"})  # metric from task
    report = write_report(root, formats="json", tokenizer="python")
    assert report.meta["metric"] == "cider" and report.meta["tokenizer"] == "python"
    for row in report.rows:
        texts = preds[(row.method, row.shots)]
        expected = cider(dict(zip(sorted(refs), texts)), refs, tokenizer="python").score
        assert row.value == pytest.approx(expected, rel=1e-9)
    values = {r.method: r.value for r in report.rows}
    assert values["siir"] > values["random"]


def test_bad_inputs_fail_early_and_keep_old_reports(tmp_path, capsys) -> None:
    records = vqa_records(4)
    root = write_results(tmp_path / "run", records, VQA_MANIFEST, shards=1)
    write_report(root)
    before = {p.name: p.read_bytes() for p in root.glob("report.*")}
    shard = root / "predictions-rank0.jsonl"
    good = shard.read_text()

    shard.write_text(good + "{not json\n")
    with pytest.raises(ReportError, match=r"predictions-rank0.jsonl:\d+: not valid JSON"):
        write_report(root)
    shard.write_text(good + json.dumps({**records[0], "shots": "two"}) + "\n")
    with pytest.raises(ReportError, match="'shots'.*'two'"):
        write_report(root)
    bad = {k: v for k, v in records[0].items() if k != "references"}
    shard.write_text(good + json.dumps(bad) + "\n")
    with pytest.raises(ReportError, match=r"missing field\(s\) \['references'\]"):
        write_report(root)
    shard.write_text(good + json.dumps({**records[0], "prediction": "other"}) + "\n")
    with pytest.raises(ReportError, match="already recorded differently"):
        write_report(root)
    shard.write_text(good + json.dumps({**records[0], "icd_positions": [1, 2, 3]}) + "\n")
    with pytest.raises(ReportError, match="3 icd_positions for shots=0"):
        write_report(root)
    assert {p.name: p.read_bytes() for p in root.glob("report.*")} == before
    assert not list(root.glob(".report*"))  # no temp files left behind

    shard.write_text(good)
    with pytest.raises(ReportError, match="formats"):
        write_report(root, formats="md,pdf")
    with pytest.raises(ReportError, match="interpolation_max_shots"):
        write_report(root, interpolation_max_shots=-1)
    (root / "manifest.json").write_text(json.dumps({"lvlm": "x"}))
    with pytest.raises(ReportError, match="neither 'metric' nor 'task'"):
        load_results(root)
    (root / "manifest.json").unlink()
    assert cli_main(["report", str(root)]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err
    with pytest.raises(ReportError, match="does not exist"):
        load_results(tmp_path / "nowhere")


def test_select_samples_same_queries_across_methods(tmp_path) -> None:
    root = write_results(tmp_path / "run", vqa_records(), VQA_MANIFEST)
    samples = select_samples(load_results(root).predictions, num_queries=3)
    assert len(samples) == 3 * len(VQA_METHODS)
    by_method: dict[str, set[str]] = {}
    for s in samples:
        by_method.setdefault(s["method"], set()).add(s["query_key"])
        assert s["shots"] == max(VQA_METHODS[s["method"]])
        assert len(s["icd_positions"]) == s["shots"]
    assert len({frozenset(v) for v in by_method.values()}) == 1


class FakeLogger:
    """Records what a WandbLogger-like logger is asked to log."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.tables: dict[str, tuple[list[str], list[list]]] = {}
        self.images: dict[str, list] = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables[key] = (columns, data)

    def log_image(self, key, images, step=None, **kwargs):
        self.images[key] = images


def _samples_with_images(root: Path) -> list[dict]:
    from PIL import Image

    samples = select_samples(load_results(root).predictions, num_queries=2)
    for s in samples:
        s["query_image"] = Image.new("RGB", (40, 30), (200, 10, 10))
        s["icd_images"] = [Image.new("RGB", (20, 30), (0, 0, 255)) for _ in s["icd_positions"]]
    return samples


def test_log_report_to_fake_logger(tmp_path) -> None:
    root = write_results(tmp_path / "run", vqa_records(), VQA_MANIFEST)
    report = write_report(root)
    samples = _samples_with_images(root)
    logger = FakeLogger()
    log_report_to_logger(logger, report.rows, report.paths["png"], samples)
    for row in report.rows:
        assert logger.metrics[f"report/{row.method}/{row.shots}shot"] == row.value
    for method, value in method_averages(report.rows).items():
        assert logger.metrics[f"report/{method}/avg"] == pytest.approx(value)
    columns, data = logger.tables["report/table"]
    assert len(data) == len(report.rows)
    assert {(r[columns.index("method")], r[columns.index("shots")]) for r in data} == {
        (r.method, r.shots) for r in report.rows
    }
    assert logger.images["report/plot"] == [str(report.paths["png"])]
    columns, data = logger.tables["report/samples"]
    assert len(data) == len(samples)
    for s, row in zip(samples, data):
        assert row[columns.index("prediction")] == s["prediction"]
        assert json.loads(row[columns.index("icd_positions")]) == s["icd_positions"]
        strip = row[columns.index("icd_images")]
        if s["shots"]:
            # ICD images side by side, scaled to the strip height, 4 px apart
            assert strip.size == (20 * s["shots"] * 96 // 30 + 4 * (s["shots"] - 1), 96)
        else:
            assert strip is None
    log_report_to_logger(None, report.rows)  # no logger: nothing to do


def test_log_report_to_disabled_wandb_logger(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    from lightning.pytorch.loggers import WandbLogger

    root = write_results(tmp_path / "run", vqa_records(4), VQA_MANIFEST)
    report = write_report(root)
    logger = WandbLogger(project="leverlm-test", save_dir=str(tmp_path), mode="disabled")
    log_report_to_logger(logger, report.rows, report.paths["png"], _samples_with_images(root))
    with pytest.raises(ReportError, match="does not exist"):
        log_report_to_logger(logger, report.rows, tmp_path / "missing.png")


def test_the_vqa_accuracy_variant_is_chosen_recorded_and_named(tmp_path) -> None:
    record = {
        "query_key": "q-1", "method": "random", "shots": 1, "icd_positions": [3],
        "prediction": "Yes", "references": ["yes"] * 10,
    }  # fmt: skip
    root = write_results(tmp_path / "run", [record], VQA_MANIFEST, shards=1)
    official = write_report(root, formats="md,json")
    assert official.rows[0].value == 0.0  # unanimous answers: raw text must match
    assert "vqa_accuracy (%, the official VQA script)" in official.markdown
    authors = write_report(root, formats="md,json", vqa_variant="authors")
    assert authors.rows[0].value == 100.0
    assert "the Lever-LM authors' variant, always normalised" in authors.markdown
    assert json.loads((root / "report.json").read_text())["meta"]["vqa_accuracy"] == "authors"
    (root / "manifest.json").write_text(json.dumps({**VQA_MANIFEST, "vqa_accuracy": "authors"}))
    assert write_report(root, formats="md").rows[0].value == 100.0  # as the eval run chose
