"""gt records: rounding, serialisation, validation."""

from __future__ import annotations

import json

import pytest

from leverlm.gt.beam import Beam
from leverlm.gt.data import GtDataError, GtRecord, round_score


def rec(pos: int, score: float = 0.125) -> GtRecord:
    beams = [
        Beam((pos + 1, pos + 2), score, (0.5, score)),
        Beam((pos + 3, pos + 1), score / 2, (0.25, score / 2)),
    ]
    return GtRecord.from_beams(f"key-{pos}", pos, beams)


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
