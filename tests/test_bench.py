"""``leverlm bench``: its command line, and every bench end to end on tiny sizes (no timing
asserted: the benches are run, not unit-timed; GPU options are only parsed here)."""

from __future__ import annotations

import pytest

from leverlm.bench import bench_select, bench_train


def test_select_bench_reports_rates_and_checks_parity(capsys):
    (rec,) = bench_select(
        ["--num_icds", "40", "--n_embd", "32", "--n_head", "2", "--feature_dim", "16",
         "--queries", "6", "--batch_size", "4", "--reference_queries", "2", "--threads", "1"]
    )  # fmt: skip
    assert rec["bench"] == "select" and rec["shots"] == 8
    assert rec["same_selections"] is True  # batched + cached picks what the reference picks
    assert rec["fast_queries_per_s"] > 0 and rec["reference_queries_per_s"] > 0
    assert '"bench": "select"' in capsys.readouterr().out


def test_train_bench_runs_both_paths():
    (rec,) = bench_train(
        ["--num_icds", "40", "--n_embd", "32", "--n_head", "2", "--clip_model", "leverlm-tiny-clip",
         "--batch_size", "4", "--steps", "1", "--clip_batch_size", "2", "--threads", "1"]
    )  # fmt: skip
    assert rec["bench"] == "train" and rec["store_seq_per_s"] > 0 and rec["clip_seq_per_s"] > 0
    assert rec["feature_dim"] == 128  # the tiny CLIP's output size
    assert rec["speedup"] == pytest.approx(rec["store_seq_per_s"] / rec["clip_seq_per_s"], rel=0.05)


@pytest.mark.slow
def test_bench_options_are_checked_and_threads_restored():
    import torch

    before = torch.get_num_threads()
    with pytest.raises(SystemExit):
        bench_select(["--shots", "0"])
    with pytest.raises(SystemExit):
        bench_select(["--queries", "4", "--reference_queries", "5"])
    with pytest.raises(SystemExit):
        bench_train(["--steps", "0"])
    bench_select(["--num_icds", "20", "--n_embd", "16", "--n_head", "2", "--feature_dim", "8",
                  "--queries", "2", "--reference_queries", "1", "--threads", "2"])  # fmt: skip
    assert torch.get_num_threads() == before


def test_bench_scoring_arguments(capsys):
    from leverlm.bench import parse_scoring_args

    args = parse_scoring_args([])
    assert args.models == ["idefics", "idefics2"] and args.orders == ["left", "right"]
    assert (args.candidates, args.shots, args.batch_size) == (64, 2, 32)
    gpu_argv = ["--device", "cuda", "--dtype", "bfloat16", "--config_size", "real"]
    gpu = parse_scoring_args([*gpu_argv, "--peak_tflops", "989"])
    assert (gpu.device, gpu.dtype, gpu.config_size, gpu.peak_tflops) == (
        "cuda",
        "bfloat16",
        "real",
        989.0,
    )
    assert gpu.image_size == (640, 480)
    for bad, message in [
        ("--orders left,up", "unknown order 'up'"),
        ("--models idefics,llava", "unknown model type 'llava'"),
        ("--candidates 0", "--candidates must be >= 1"),
        ("--image_size 64", "--image_size must be WxH"),
        ("--peak_tflops -1", "--peak_tflops must be > 0"),
        ("--models qwen2_vl --config_size real", "--config_size real is available for: idefics"),
    ]:
        with pytest.raises(SystemExit):
            parse_scoring_args(bad.split())
        assert message in capsys.readouterr().err


def test_bench_command_dispatch(capsys):
    from leverlm.bench import main

    assert main(["nosuch"]) == 2
    assert "unknown bench 'nosuch'" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "scoring" in capsys.readouterr().out


def test_bench_scoring_runs_end_to_end(capsys):
    import json

    from leverlm.cli import main

    argv = "bench scoring --models idefics --tiny_size test --candidates 3 --shots 1 --beams 2"
    argv += " --reference_candidates 2 --image_size 48x40 --batch_size 2 --peak_tflops 1"
    assert main(argv.split()) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(r["model"], r["order"]) for r in lines] == [("idefics", "left"), ("idefics", "right")]
    for r in lines:
        assert r["bench"] == "scoring" and r["candidates"] == 3 and r["shots"] == 1
        assert r["fast_per_s"] > 0 and r["reference_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["fast_per_s"] / r["reference_per_s"], rel=0.02)
        assert r["max_abs_diff"] < 1e-4  # the bench also checks the fast path's numbers
        assert 0 < r["peak_fraction"] < 1
