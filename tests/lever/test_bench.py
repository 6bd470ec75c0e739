"""The Lever-LM benches run end to end on tiny sizes (no timing asserted: see ``leverlm bench``)."""

from __future__ import annotations

import pytest

from leverlm.lever.bench import bench_select, bench_train


def test_select_bench_reports_rates_and_checks_parity(capsys):
    (rec,) = bench_select(
        ["--num-icds", "40", "--n-embd", "32", "--n-head", "2", "--feature-dim", "16",
         "--queries", "6", "--batch-size", "4", "--reference-queries", "2", "--threads", "1"]
    )  # fmt: skip
    assert rec["bench"] == "select" and rec["shots"] == 8
    assert rec["same_selections"] is True  # batched + cached picks what the reference picks
    assert rec["fast_queries_per_s"] > 0 and rec["reference_queries_per_s"] > 0
    assert '"bench": "select"' in capsys.readouterr().out


def test_train_bench_runs_both_paths():
    (rec,) = bench_train(
        ["--num-icds", "40", "--n-embd", "32", "--n-head", "2", "--clip-model", "leverlm-tiny-clip",
         "--batch-size", "4", "--steps", "1", "--clip-batch-size", "2", "--threads", "1"]
    )  # fmt: skip
    assert rec["bench"] == "train" and rec["store_seq_per_s"] > 0 and rec["clip_seq_per_s"] > 0
    assert rec["feature_dim"] == 128  # the tiny CLIP's output size
    assert rec["speedup"] == pytest.approx(rec["store_seq_per_s"] / rec["clip_seq_per_s"], rel=0.05)


def test_bench_options_are_checked_and_threads_restored():
    import torch

    before = torch.get_num_threads()
    with pytest.raises(SystemExit):
        bench_select(["--shots", "0"])
    with pytest.raises(SystemExit):
        bench_select(["--queries", "4", "--reference-queries", "5"])
    with pytest.raises(SystemExit):
        bench_train(["--steps", "0"])
    bench_select(["--num-icds", "20", "--n-embd", "16", "--n-head", "2", "--feature-dim", "8",
                  "--queries", "2", "--reference-queries", "1", "--threads", "2"])  # fmt: skip
    assert torch.get_num_threads() == before
