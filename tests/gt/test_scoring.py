"""InfoScore math, construct orders, batching and argument checks (with a counting fake LVLM)."""

from __future__ import annotations

import math

import pytest
import torch

from leverlm.gt.scoring import (
    score_candidates,
    score_candidates_reference,
    score_gain,
    with_candidate,
)
from leverlm.lvlm.base import ScoreResult


def _result(means, sums=None):
    means = torch.tensor(means, dtype=torch.float32)
    sums = means * 2 if sums is None else torch.tensor(sums, dtype=torch.float32)
    return ScoreResult(sums, means, torch.full_like(means, 2, dtype=torch.long))


def test_infoscore_is_probability_gain():
    with_, without = _result([-0.5, -2.0, -1.0]), _result([-1.0])
    got = score_gain(with_, without, "infoscore")
    expected = [math.exp(m) - math.exp(-1.0) for m in (-0.5, -2.0, -1.0)]
    assert torch.allclose(got, torch.tensor(expected))
    assert got[0] > 0 > got[1] and got[2] == 0
    assert torch.allclose(
        score_gain(with_, without, "logprob_mean"), torch.tensor([0.5, -1.0, 0.0])
    )
    assert torch.allclose(
        score_gain(_result([-1.0], [-3.0]), _result([-1.0], [-5.0]), "logprob_sum"),
        torch.tensor([2.0]),
    )
    with pytest.raises(ValueError, match="unknown metric 'cider'"):
        score_gain(with_, without, "cider")


def test_with_candidate_orders():
    s, d = [{"k": 1}, {"k": 2}], {"k": 9}
    assert with_candidate(s, d, "left") == [d, *s]  # farthest from the query
    assert with_candidate(s, d, "right") == [*s, d]  # next to the query
    with pytest.raises(ValueError, match="unknown order 'middle'"):
        with_candidate(s, d, "middle")


class CountingLVLM:
    """Scores a prompt by a deterministic function of its ICD keys; records every call."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    @staticmethod
    def _value(icds, query):
        # position-sensitive, so left and right orders give different values
        return -1.0 - sum((i + 1) * 0.1 * icd["v"] for i, icd in enumerate(icds)) - query["v"]

    def _result(self, icd_seqs, queries):
        means = [self._value(s, q) for s, q in zip(icd_seqs, queries)]
        return ScoreResult(
            torch.tensor(means) * 3, torch.tensor(means), torch.full((len(means),), 3)
        )

    def encode_pairs(self, icd_seqs, queries, with_answer=True, extra_tokens=0):
        self.calls.append(("encode", len(queries)))
        for s, q in zip(icd_seqs, queries):
            for sample in [*s, q]:
                if "v" not in sample:
                    raise KeyError(f"sample {sample.get('__key__')!r} has no field 'v'")

    def score(self, icd_seqs, queries):
        self.calls.append(("score", len(queries)))
        return self._result(icd_seqs, queries)

    def score_with_prefix(self, prefix, suffixes, queries):
        self.calls.append(("prefix", len(queries)))
        return self._result([list(prefix) + list(s) for s in suffixes], queries)

    def score_reference(self, icd_seqs, queries):
        self.calls.append(("reference", len(queries)))
        return self._result(icd_seqs, queries)


def _samples(n, start=0):
    return [{"__key__": f"s{i}", "v": (i % 5) / 4} for i in range(start, start + n)]


@pytest.mark.parametrize("order", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 3, 7, 32])
def test_one_without_forward_and_batched_candidates(order, batch_size):
    lvlm = CountingLVLM()
    prefix, query, cands = _samples(2), _samples(1, 50)[0], _samples(7, 10)
    got = score_candidates(lvlm, prefix, query, cands, order, "infoscore", batch_size)
    kind = "prefix" if order == "right" else "score"
    forwards = [c for c in lvlm.calls if c[0] != "encode"]
    assert forwards[0] == (kind, 1)  # the "without candidate" row, once
    sizes = [n for _, n in forwards[1:]]
    assert sizes == [min(batch_size, 7 - i) for i in range(0, 7, batch_size)]
    base = math.exp(lvlm._value(prefix, query))
    expected = [
        math.exp(lvlm._value(with_candidate(prefix, d, order), query)) - base for d in cands
    ]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    ref_lvlm = CountingLVLM()
    ref = score_candidates_reference(ref_lvlm, prefix, query, cands, order)
    assert torch.allclose(got, ref, atol=1e-6)
    assert [n for k, n in ref_lvlm.calls if k == "reference"] == [1] * 8  # one at a time


def test_argument_errors_before_any_forward():
    lvlm = CountingLVLM()
    prefix, query, cands = _samples(1), _samples(1, 50)[0], _samples(3, 10)
    with pytest.raises(ValueError, match="unknown order 'up'"):
        score_candidates(lvlm, prefix, query, cands, order="up")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score_candidates(lvlm, prefix, query, cands, metric="bleu")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        score_candidates(lvlm, prefix, query, cands, batch_size=0)
    with pytest.raises(KeyError, match="'bad'"):
        score_candidates(lvlm, prefix, query, [*cands, {"__key__": "bad"}], batch_size=1)
    assert all(kind == "encode" for kind, _ in lvlm.calls)


def test_no_candidates_gives_empty_scores():
    lvlm = CountingLVLM()
    got = score_candidates(lvlm, _samples(1), _samples(1, 50)[0], [])
    assert got.shape == (0,)
    assert all(kind == "encode" for kind, _ in lvlm.calls)


# -- the benchmark's command line (it is run, not unit-timed; GPU options only parsed here) --


def test_bench_scoring_arguments(capsys):
    from leverlm.bench import parse_scoring_args

    args = parse_scoring_args([])
    assert args.models == ["idefics", "idefics2"] and args.orders == ["left", "right"]
    assert (args.candidates, args.shots, args.batch_size) == (64, 2, 32)
    gpu_argv = ["--device", "cuda", "--dtype", "bfloat16", "--config-size", "real"]
    gpu = parse_scoring_args([*gpu_argv, "--peak-tflops", "989"])
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
        ("--vision-batch-size 0", "--vision-batch-size must be >= 1"),
        ("--image-size 64", "--image-size must be WxH"),
        ("--peak-tflops -1", "--peak-tflops must be > 0"),
        ("--models qwen2_vl --config-size real", "--config-size real is available for: idefics"),
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

    argv = "bench scoring --models idefics --tiny-size test --candidates 3 --shots 1 --beams 2"
    argv += " --reference-candidates 2 --image-size 48x40 --batch-size 2 --peak-tflops 1"
    argv += " --vision-batch-size 2"
    assert main(argv.split()) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(r["model"], r["order"]) for r in lines] == [("idefics", "left"), ("idefics", "right")]
    for r in lines:
        assert r["bench"] == "scoring" and r["candidates"] == 3 and r["shots"] == 1
        assert r["vision_batch_size"] == 2
        assert r["fast_per_s"] > 0 and r["reference_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["fast_per_s"] / r["reference_per_s"], rel=0.02)
        assert r["max_abs_diff"] < 1e-4  # the bench also checks the fast path's numbers
        assert 0 < r["peak_fraction"] < 1
