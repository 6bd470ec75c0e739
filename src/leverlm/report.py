"""Tables and plots from in-context evaluation results (``leverlm report``).

Input: an eval results folder with ``manifest.json`` (``task``, ``metric``, ``trained_shots``,
``lvlm``, ...) and one or more ``predictions*.jsonl`` files (e.g. one shard per rank), one JSON
object per (query, method, shots)::

    {"query_key": str, "method": str, "shots": int, "icd_positions": [int, ...],
     "prediction": str, "references": [str, ...]}

``references`` are the 10 human answers (VQA) or the reference captions (captioning).

Output: the metric per method x shots with an ``avg`` column, as Markdown, CSV and
``report.json`` (byte-identical for the same inputs, however they were sharded), a PNG plot of
metric vs shots, and (optionally) the same logged to a Lightning logger with sample tables.

Shots up to ``interpolation_max_shots`` (default 4: the paper trains Lever-LM on 2 ICDs and
calls 1-4 shots interpolation, 6 and 8 extrapolation) are marked ``interp``, more ``extrap``,
0 is ``zero``. ``avg`` is a method's mean over its shots >= 1 (the paper averages 1-8 shots);
a method evaluated only at 0 shots gets its 0-shot value.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leverlm.errors import LeverError
from leverlm.metrics import METRICS, MetricError
from leverlm.utils import atomic_open, read_jsonl

REPORT_FORMATS = ("md", "csv", "json", "png")
DEFAULT_INTERPOLATION_MAX_SHOTS = 4
# Table order of the paper's methods; any other method follows, alphabetically.
METHOD_ORDER = (
    "zero_shot", "random", "siir", "sttr", "sitr", "fixed", "lever_lm", "lever_lm_shuffled",
)  # fmt: skip
REQUIRED_FIELDS = ("query_key", "method", "shots", "icd_positions", "prediction", "references")
METRIC_LABELS = {"vqa_accuracy": "VQA accuracy (%)", "cider": "CIDEr (x100)"}
FILE_NAMES = {"md": "report.md", "csv": "report.csv", "json": "report.json", "png": "report.png"}


class ReportError(LeverError):
    """Results that cannot be reported (names the file, line, field or value at fault)."""


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One evaluated (query, method, shots)."""

    query_key: str
    method: str
    shots: int
    icd_positions: tuple[int, ...]
    prediction: str
    references: tuple[str, ...]
    source: str = field(default="", compare=False)  # "file:line", for error messages

    def to_json(self) -> dict[str, Any]:
        return {
            "query_key": self.query_key,
            "method": self.method,
            "shots": self.shots,
            "icd_positions": list(self.icd_positions),
            "prediction": self.prediction,
            "references": list(self.references),
        }


@dataclass(frozen=True)
class EvalResults:
    """A results folder: its manifest, its metric and all predictions (sorted, deduplicated)."""

    manifest: dict[str, Any]
    metric: str
    predictions: list[Prediction]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_prediction(obj: Any, where: str) -> Prediction:
    if not isinstance(obj, dict):
        raise ReportError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in obj]
    if missing:
        raise ReportError(f"{where}: missing field(s) {missing} (has {sorted(obj)})")
    if not isinstance(obj["query_key"], str) or not obj["query_key"]:
        raise ReportError(f"{where}: field 'query_key' must be a non-empty string")
    if not isinstance(obj["method"], str) or not obj["method"]:
        raise ReportError(f"{where}: field 'method' must be a non-empty string")
    if not _is_int(obj["shots"]) or obj["shots"] < 0:
        raise ReportError(f"{where}: field 'shots' must be an int >= 0, got {obj['shots']!r}")
    icds = obj["icd_positions"]
    if not isinstance(icds, list) or not all(_is_int(p) for p in icds):
        raise ReportError(f"{where}: field 'icd_positions' must be a list of ints, got {icds!r}")
    if len(icds) != obj["shots"]:
        raise ReportError(
            f"{where}: {len(icds)} icd_positions for shots={obj['shots']} "
            f"(query {obj['query_key']!r}, method {obj['method']!r})"
        )
    if not isinstance(obj["prediction"], str):
        raise ReportError(f"{where}: field 'prediction' must be a string")
    refs = obj["references"]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise ReportError(
            f"{where}: field 'references' must be a non-empty list of strings, got {refs!r}"
        )
    return Prediction(
        query_key=obj["query_key"],
        method=obj["method"],
        shots=obj["shots"],
        icd_positions=tuple(icds),
        prediction=obj["prediction"],
        references=tuple(refs),
        source=where,
    )


def read_predictions(paths: Iterable[str | Path]) -> list[Prediction]:
    """Read prediction JSON lines; identical repeats (e.g. a resumed shard) are merged.

    A (query, method, shots) with two different records, or a query whose references differ
    between records, is an error naming both places.
    """
    by_id: dict[tuple[str, str, int], Prediction] = {}
    refs_of: dict[str, Prediction] = {}
    for path in paths:
        for where, obj in read_jsonl(path, ReportError):
            pred = _parse_prediction(obj, where)
            ident = (pred.query_key, pred.method, pred.shots)
            seen = by_id.get(ident)
            if seen is not None and seen != pred:
                raise ReportError(
                    f"{where}: query {pred.query_key!r}, method {pred.method!r}, shots "
                    f"{pred.shots} was already recorded differently at {seen.source}"
                )
            first = refs_of.setdefault(pred.query_key, pred)
            if first.references != pred.references:
                raise ReportError(
                    f"{where}: references of query {pred.query_key!r} differ from those at "
                    f"{first.source} (results of different runs mixed?)"
                )
            by_id.setdefault(ident, pred)
    return [by_id[k] for k in sorted(by_id, key=lambda k: (_method_rank(k[1]), k[2], k[0]))]


def _metric_of(manifest: dict[str, Any], path: Path) -> str:
    metric = manifest.get("metric")
    if metric is None and "task" in manifest:
        from leverlm.tasks import TaskError, get_task

        try:
            metric = get_task(str(manifest["task"])).metric
        except TaskError as err:
            raise ReportError(f"{path}: field 'task': {err}") from None
    if metric is None:
        raise ReportError(f"{path}: has neither 'metric' nor 'task' (fields: {sorted(manifest)})")
    if metric not in METRICS:
        raise ReportError(f"{path}: field 'metric' is {metric!r}; known metrics: {METRICS}")
    return str(metric)


def load_results(results_dir: str | Path) -> EvalResults:
    """Read ``manifest.json`` and every ``predictions*.jsonl`` of an eval results folder."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ReportError(f"results folder {str(root)!r} does not exist or is not a folder")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise ReportError(f"{manifest_path}: missing (every eval results folder has one)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(f"{manifest_path}: not valid JSON ({err.msg})") from None
    if not isinstance(manifest, dict):
        raise ReportError(f"{manifest_path}: expected a JSON object")
    metric = _metric_of(manifest, manifest_path)
    files = sorted(root.glob("predictions*.jsonl"))
    if not files:
        raise ReportError(f"{root}: no predictions*.jsonl files")
    predictions = read_predictions(files)
    if not predictions:
        raise ReportError(f"{root}: the predictions files ({[f.name for f in files]}) are empty")
    return EvalResults(manifest=manifest, metric=metric, predictions=predictions)


# ---------------------------------------------------------------------------------------------
# metric table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultRow:
    """The metric of one method at one shot count over ``n`` queries; for a method evaluated
    over several seeds (``random#0``, ``random#1``, ...), the mean and sample std over its
    ``trials``."""

    method: str
    shots: int
    metric: str
    value: float
    n: int
    regime: str  # "zero" | "interp" | "extrap"
    std: float | None = None
    trials: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "shots": self.shots,
            "metric": self.metric,
            "value": round(self.value, 6),
            "std": None if self.std is None else round(self.std, 6),
            "trials": self.trials,
            "n": self.n,
            "regime": self.regime,
        }


def trial_base(method: str) -> str:
    """``random#2`` -> ``random`` (the method a trial belongs to)."""
    return method.split("#", 1)[0]


def combine_trials(rows: Sequence[ResultRow]) -> list[ResultRow]:
    """One row per (method, shots): a method's trials (``name#t``) become their mean with the
    sample std (``statistics.stdev``) and the number of trials; other rows are unchanged."""
    import statistics

    groups: dict[tuple[str, int], list[ResultRow]] = {}
    for r in rows:
        groups.setdefault((trial_base(r.method), r.shots), []).append(r)
    out = []
    for (method, _), group in groups.items():
        if len(group) == 1 and group[0].method == method:
            out.append(group[0])
            continue
        values = [r.value for r in group]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(dataclasses.replace(
            group[0], method=method, value=statistics.fmean(values), std=std, trials=len(group)
        ))  # fmt: skip
    return sorted(out, key=lambda r: (_method_rank(r.method), r.shots))


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def regime(shots: int, interpolation_max_shots: int = DEFAULT_INTERPOLATION_MAX_SHOTS) -> str:
    """``zero`` for 0 shots, ``interp`` up to ``interpolation_max_shots``, else ``extrap``."""
    if shots == 0:
        return "zero"
    return "interp" if shots <= interpolation_max_shots else "extrap"


def _check_interp(value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise ReportError(f"interpolation_max_shots must be an int >= 0, got {value!r}")
    return value


def compute_rows(
    results: EvalResults,
    interpolation_max_shots: int = DEFAULT_INTERPOLATION_MAX_SHOTS,
    *,
    tokenizer: str = "auto",
    vqa_variant: str = "official",
) -> tuple[list[ResultRow], dict[str, Any]]:
    """The metric per (method, shots); returns ``(rows, info)`` (info: the VQA accuracy
    variant or the CIDEr tokenizer used)."""
    from leverlm.metrics import cider_from_tokens, tokenize_captions, vqa_accuracy_batch

    interp = _check_interp(interpolation_max_shots)
    groups: dict[tuple[str, int], list[Prediction]] = {}
    for pred in results.predictions:  # already sorted by (method, shots, query_key)
        groups.setdefault((pred.method, pred.shots), []).append(pred)
    info: dict[str, Any] = {}
    values: dict[tuple[str, int], float] = {}
    try:
        if results.metric == "vqa_accuracy":
            info["vqa_accuracy"] = vqa_variant
            for gk, preds in groups.items():
                values[gk] = vqa_accuracy_batch(
                    [p.prediction for p in preds],
                    [list(p.references) for p in preds],
                    variant=vqa_variant,
                )
        else:
            # One tokenizer run for everything: a Java start per (method, shots) would dominate.
            captions: dict[tuple, list[str]] = {}
            for pred in results.predictions:
                captions[("ref", pred.query_key)] = list(pred.references)
                captions[("pred", pred.method, pred.shots, pred.query_key)] = [pred.prediction]
            tokens, used = tokenize_captions(captions, tokenizer)  # type: ignore[arg-type]
            info["tokenizer"] = used
            for (method, shots), preds in groups.items():
                values[(method, shots)], _ = cider_from_tokens(
                    {p.query_key: tokens[("pred", method, shots, p.query_key)][0] for p in preds},
                    {p.query_key: tokens[("ref", p.query_key)] for p in preds},
                )
    except MetricError as err:
        raise ReportError(f"{results.metric}: {err}") from None
    rows = [
        ResultRow(m, s, results.metric, values[(m, s)], len(groups[(m, s)]), regime(s, interp))
        for m, s in sorted(groups, key=lambda g: (_method_rank(g[0]), g[1]))
    ]
    if any(r.method != trial_base(r.method) for r in rows):
        info["trial_rows"] = [r.to_json() for r in rows]
    return combine_trials(rows), info


def _row_dicts(rows: Sequence[ResultRow | Mapping[str, Any]]) -> list[dict[str, Any]]:
    # Full precision: only the file formats round.
    return [dataclasses.asdict(r) if isinstance(r, ResultRow) else dict(r) for r in rows]


def method_averages(rows: Sequence[ResultRow | Mapping[str, Any]]) -> dict[str, float]:
    """Each method's mean over its shots >= 1 (only-0-shot methods: their 0-shot value)."""
    by_method: dict[str, list[tuple[int, float]]] = {}
    for r in _row_dicts(rows):
        by_method.setdefault(r["method"], []).append((int(r["shots"]), float(r["value"])))
    out = {}
    for method in sorted(by_method, key=_method_rank):
        pairs = by_method[method]
        vals = [v for s, v in pairs if s >= 1] or [v for _, v in pairs]
        out[method] = sum(vals) / len(vals)
    return out


def _table(
    rows: Sequence[ResultRow], interpolation_max_shots: int
) -> tuple[list[str], list[list[float | None]], list[str], dict[tuple[str, int], float]]:
    """(column labels, per-method values incl. avg, method names, std per (method, shots)) of
    the wide table."""
    shots = sorted({r.shots for r in rows})
    methods = sorted({r.method for r in rows}, key=_method_rank)
    cell = {(r.method, r.shots): r.value for r in rows}
    stds = {(r.method, r.shots): r.std for r in rows if r.std is not None}
    avgs = method_averages(rows)
    labels = [
        str(s) if s == 0 else f"{s} ({regime(s, interpolation_max_shots)})" for s in shots
    ] + ["avg"]
    values = [[cell.get((m, s)) for s in shots] + [avgs[m]] for m in methods]
    return labels, values, methods, stds


def format_markdown(
    rows: Sequence[ResultRow],
    interpolation_max_shots: int = DEFAULT_INTERPOLATION_MAX_SHOTS,
    *,
    metric: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> str:
    """A Markdown table (methods x shots + avg, 2 decimals, '-' where not evaluated) + caption
    naming the metric's definition (``info``: the VQA accuracy variant or CIDEr tokenizer)."""
    if not rows:
        raise ReportError("no result rows to format")
    labels, values, methods, stds = _table(rows, interpolation_max_shots)
    shots = sorted({r.shots for r in rows})
    lines = [
        "| method | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    trials = {r.method: r.trials for r in rows}
    for method, vals in zip(methods, values):
        cells = ["-" if v is None else f"{v:.2f}" for v in vals]
        for i, s in enumerate(shots):
            if (method, s) in stds:
                cells[i] += f" ± {stds[(method, s)]:.2f}"
        name = f"{method} ({trials[method]} seeds)" if trials[method] > 1 else method
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = sorted({r.n for r in rows})
    n_text = f"n = {counts[0]}" if len(counts) == 1 else f"n = {counts[0]}-{counts[-1]}"
    metric = metric or rows[0].metric
    lines += [
        "",
        f"{metric_definition(metric, info or {})}; {n_text} queries per cell; "
        f"interp: 1-{interpolation_max_shots} shots, extrap: more; avg: mean over shots >= 1"
        + ("; seeded methods: mean ± std over their seeds." if stds else "."),
    ]
    return "\n".join(lines) + "\n"


def metric_definition(metric: str, info: Mapping[str, Any]) -> str:
    """How the numbers were computed, for a table's caption."""
    if metric == "vqa_accuracy":
        variant = info.get("vqa_accuracy", "official")
        how = {
            "official": "the official VQA script",
            "authors": "the Lever-LM authors' variant, always normalised",
        }.get(variant, variant)
        return f"vqa_accuracy (%, {how})"
    tok = info.get("tokenizer")
    how = {"ptb": "PTB tokenizer", "python": "Python stand-in for the PTB tokenizer"}.get(tok, tok)
    return f"cider (CIDEr-D x100{', ' + how if how else ''})"


def format_csv(
    rows: Sequence[ResultRow], interpolation_max_shots: int = DEFAULT_INTERPOLATION_MAX_SHOTS
) -> str:
    """The same wide table as CSV (4 decimals, empty where not evaluated)."""
    if not rows:
        raise ReportError("no result rows to format")
    labels, values, methods, stds = _table(rows, interpolation_max_shots)
    shots = sorted({r.shots for r in rows})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", *labels])
    for method, vals in zip(methods, values):
        writer.writerow([method, *("" if v is None else f"{v:.4f}" for v in vals)])
        if any((method, s) in stds for s in shots):  # the seeds' std, one row below the mean
            row = [f"{stds[(method, s)]:.4f}" if (method, s) in stds else "" for s in shots]
            writer.writerow([f"{method} std", *row, ""])
    return buf.getvalue()


def build_report_json(rows: Sequence[ResultRow], meta: Mapping[str, Any]) -> dict[str, Any]:
    """``{"rows": [...], "averages": [...], "meta": {...}}`` (values rounded to 6 decimals)."""
    by_method: dict[str, list[int]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r.shots)
    averages = [
        {
            "method": method,
            "metric": rows[0].metric,
            "value": round(value, 6),
            "shots": [s for s in sorted(by_method[method]) if s >= 1] or sorted(by_method[method]),
        }
        for method, value in method_averages(rows).items()
    ]
    return {"rows": [r.to_json() for r in rows], "averages": averages, "meta": dict(meta)}


def render_plot(
    rows: Sequence[ResultRow],
    interpolation_max_shots: int = DEFAULT_INTERPOLATION_MAX_SHOTS,
    *,
    title: str | None = None,
) -> bytes:
    """PNG bytes of metric vs shots: one line per method, a band of ± std for methods evaluated
    over several seeds, the extrapolation region shaded, the legend beside the axes.

    Uses the Agg canvas directly (no pyplot): no global backend switch, no GUI.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ReportError("no result rows to plot")
    fig = Figure(figsize=(8.0, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shots = sorted({r.shots for r in rows})
    for method in sorted({r.method for r in rows}, key=_method_rank):
        points = sorted((r.shots, r.value, r.std or 0.0) for r in rows if r.method == method)
        if len(points) == 1 and points[0][0] == 0:
            # A zero-shot method is one number: draw it as a baseline across the plot.
            ax.axhline(points[0][1], linestyle="--", color="0.4", label=method)
            continue
        xs, ys, sd = ([p[i] for p in points] for i in range(3))
        (line,) = ax.plot(xs, ys, marker="o", label=method)
        if any(sd):
            low, high = [y - e for y, e in zip(ys, sd)], [y + e for y, e in zip(ys, sd)]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if shots[-1] > interpolation_max_shots:
        ax.axvspan(
            interpolation_max_shots + 0.5, shots[-1] + 0.5, color="0.92", label="extrapolation"
        )
    ax.set_xticks(shots)
    ax.set_xlabel("shots (ICDs per query)")
    ax.set_ylabel(METRIC_LABELS.get(rows[0].metric, rows[0].metric))
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    buf = io.BytesIO()
    # No "Software" tag with a version in it: the same rows give the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` produced."""

    rows: list[ResultRow]
    markdown: str
    meta: dict[str, Any]
    paths: dict[str, Path]


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"md,csv"`` -> ``("md", "csv")``, checking each name."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    bad = [t for t in items if t not in REPORT_FORMATS]
    if bad or not items:
        raise ReportError(f"formats {items!r}: choose from {', '.join(REPORT_FORMATS)}")
    return tuple(dict.fromkeys(items))


def write_report(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    formats: str | Sequence[str] = REPORT_FORMATS,
    interpolation_max_shots: int | None = None,
    *,
    tokenizer: str = "auto",
    vqa_variant: str | None = None,
) -> Report:
    """Compute the table of an eval results folder and write ``report.{md,csv,json,png}``.

    Everything is computed before the first file is written, and each file is written
    atomically, so a bad input leaves earlier reports untouched.

    Args:
        out_dir: where to write (default: ``results_dir``).
        interpolation_max_shots: default: the manifest's ``interpolation_max_shots``, else 4.
        vqa_variant: ``official`` / ``authors`` (default: the manifest's ``vqa_accuracy``,
            else ``official``; see :mod:`leverlm.metrics`).
    """
    fmts = parse_formats(formats)
    results = load_results(results_dir)
    if interpolation_max_shots is None:
        interpolation_max_shots = results.manifest.get(
            "interpolation_max_shots", DEFAULT_INTERPOLATION_MAX_SHOTS
        )
    interp = _check_interp(interpolation_max_shots)
    variant = vqa_variant or results.manifest.get("vqa_accuracy", "official")
    rows, info = compute_rows(results, interp, tokenizer=tokenizer, vqa_variant=variant)
    meta = {
        "metric": results.metric,
        "interpolation_max_shots": interp,
        "num_predictions": len(results.predictions),
        "num_queries": len({p.query_key for p in results.predictions}),
        "manifest": results.manifest,
        **info,
    }
    markdown = format_markdown(rows, interp, metric=results.metric, info=info)
    payload: dict[str, bytes] = {}
    if "md" in fmts:
        payload["md"] = markdown.encode("utf-8")
    if "csv" in fmts:
        payload["csv"] = format_csv(rows, interp).encode("utf-8")
    if "json" in fmts:
        text = json.dumps(build_report_json(rows, meta), indent=2, sort_keys=True)
        payload["json"] = (text + "\n").encode("utf-8")
    if "png" in fmts:
        parts = [str(results.manifest[k]) for k in ("task_config", "lvlm") if k in results.manifest]
        if "task_config" not in results.manifest and "task" in results.manifest:
            parts.insert(0, str(results.manifest["task"]))
        parts.append(f"n = {meta['num_queries']} queries")
        payload["png"] = render_plot(rows, interp, title=" / ".join(parts))
    out = Path(out_dir) if out_dir is not None else Path(results_dir)
    paths = {}
    for fmt in fmts:
        paths[fmt] = out / FILE_NAMES[fmt]
        with atomic_open(paths[fmt], "wb") as fh:
            fh.write(payload[fmt])
        # The temp file behind atomic_open is created private (0600); reports are for sharing.
        os.chmod(paths[fmt], 0o644)
    return Report(rows=rows, markdown=markdown, meta=meta, paths=paths)


# ---------------------------------------------------------------------------------------------
# samples and loggers
# ---------------------------------------------------------------------------------------------


def select_samples(
    predictions: Sequence[Prediction], num_queries: int = 4, shots: int | None = None
) -> list[dict[str, Any]]:
    """A few queries shown for every method: the same queries across methods, chosen by a hash
    of their keys (deterministic, spread over the set), at ``shots`` (default: each method's
    largest shot count)."""
    methods = sorted({p.method for p in predictions}, key=_method_rank)
    by = {(p.method, p.shots, p.query_key): p for p in predictions}
    chosen_shots = {}
    for method in methods:
        available = sorted({p.shots for p in predictions if p.method == method})
        chosen_shots[method] = shots if shots in available else available[-1]
    common = None
    for method in methods:
        keys = {k for (m, s, k) in by if m == method and s == chosen_shots[method]}
        common = keys if common is None else common & keys
    ordered = sorted(common or (), key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    return [
        {
            "method": method,
            "shots": chosen_shots[method],
            **by[(method, chosen_shots[method], key)].to_json(),
        }
        for key in ordered[:num_queries]
        for method in methods
    ]


def attach_images(
    samples: Sequence[Mapping[str, Any]],
    query_image: Callable[[str], Any],
    icd_image: Callable[[int], Any],
) -> list[dict[str, Any]]:
    """Samples with ``query_image`` (from the query key) and ``icd_images`` (from positions)
    added, e.g. ``query_image=lambda k: queries[queries.position_of(k)]["image"]``."""
    return [
        {
            **s,
            "query_image": query_image(s["query_key"]),
            "icd_images": [icd_image(p) for p in s["icd_positions"]],
        }
        for s in samples
    ]


def _image_strip(images: Sequence[Any], height: int = 96) -> Any:
    """ICD images side by side in prompt order (one table cell)."""
    from PIL import Image

    if not images:
        return None
    resized = [
        im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height))
        for im in images
    ]
    strip = Image.new("RGB", (sum(im.width for im in resized) + 4 * (len(resized) - 1), height))
    x = 0
    for im in resized:
        strip.paste(im, (x, 0))
        x += im.width + 4
    return strip


def _is_wandb_logger(logger: Any) -> bool:
    # A WandbLogger instance means its module is already imported: look it up instead of
    # importing lightning here.
    for name in ("lightning.pytorch.loggers.wandb", "pytorch_lightning.loggers.wandb"):
        module = sys.modules.get(name)
        if module is not None and isinstance(logger, module.WandbLogger):
            return True
    return False


SAMPLE_COLUMNS = [
    "method", "shots", "query_key", "query_image", "icd_positions", "icd_images", "prediction",
    "references",
]  # fmt: skip


def log_report_to_logger(
    logger: Any,
    rows: Sequence[ResultRow | Mapping[str, Any]],
    png_path: str | Path | None = None,
    samples: Sequence[Mapping[str, Any]] | None = None,
    *,
    prefix: str = "report",
) -> None:
    """Log the table, the plot and sample predictions to a Lightning logger.

    Every logger with ``log_metrics`` gets one scalar per (method, shots) and per average
    (``report/<method>/<shots>shot``, ``report/<method>/avg``). Loggers with ``log_table`` /
    ``log_image`` (``WandbLogger``) also get the table, the PNG and a sample table (query
    image, ICD images side by side, prediction, references); images become ``wandb.Image``
    only for a real ``WandbLogger``. A disabled wandb run makes these calls no-ops.
    """
    if logger is None:
        return
    table = _row_dicts(rows)
    averages = method_averages(table)
    if hasattr(logger, "log_metrics"):
        metrics = {f"{prefix}/{r['method']}/{r['shots']}shot": float(r["value"]) for r in table}
        metrics.update({f"{prefix}/{m}/avg": v for m, v in averages.items()})
        logger.log_metrics(metrics)
    if hasattr(logger, "log_table"):
        columns = ["method", "shots", "metric", "value", "std", "trials", "n", "regime"]
        logger.log_table(
            key=f"{prefix}/table",
            columns=columns,
            data=[[r.get(c) for c in columns] for r in table],
        )
    if png_path is not None and hasattr(logger, "log_image"):
        if not Path(png_path).is_file():
            raise ReportError(f"plot {str(png_path)!r} does not exist")
        logger.log_image(key=f"{prefix}/plot", images=[str(png_path)])
    if samples and hasattr(logger, "log_table"):
        as_wandb = _is_wandb_logger(logger)
        if as_wandb:
            import wandb

        def image(value: Any, caption: str) -> Any:
            if value is None or not as_wandb:
                return value
            return wandb.Image(value, caption=caption)

        data = []
        for s in samples:
            positions = list(s.get("icd_positions", []))
            strip = _image_strip(s["icd_images"]) if s.get("icd_images") else None
            data.append(
                [
                    s["method"],
                    s["shots"],
                    s["query_key"],
                    image(s.get("query_image"), str(s["query_key"])),
                    json.dumps(positions),
                    image(strip, " ".join(map(str, positions))),
                    s["prediction"],
                    " | ".join(s["references"]),
                ]
            )
        logger.log_table(key=f"{prefix}/samples", columns=SAMPLE_COLUMNS, data=data)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``leverlm report RESULTS_DIR [--out DIR] [--formats md,csv,json,png]``."""
    parser = argparse.ArgumentParser(
        prog="leverlm report",
        description="Tables (md/csv/json) and a plot of an eval results folder "
        "(manifest.json + predictions*.jsonl). Prints the Markdown table.",
    )
    parser.add_argument("results_dir", help="eval results folder")
    parser.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR)")
    parser.add_argument(
        "--formats", default=",".join(REPORT_FORMATS), help="comma list of md,csv,json,png"
    )
    parser.add_argument(
        "--interpolation_max_shots",
        type=int,
        default=None,
        help="largest 'interp' shot count (default: manifest value, else 4)",
    )
    parser.add_argument(
        "--vqa_accuracy",
        choices=("official", "authors"),
        default=None,
        help="VQA accuracy variant (default: as the eval run chose, else official)",
    )
    parser.add_argument(
        "--tokenizer",
        choices=("auto", "ptb", "python"),
        default="auto",
        help="CIDEr tokenisation (auto: PTB when java is available)",
    )
    args = parser.parse_args(argv)
    report = write_report(
        args.results_dir, args.out, args.formats, args.interpolation_max_shots,
        tokenizer=args.tokenizer, vqa_variant=args.vqa_accuracy,
    )  # fmt: skip
    print(report.markdown, end="")
    for fmt, path in report.paths.items():
        print(f"wrote {fmt}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
