"""``leverlm demo``: the committed demo models are where the demo looks, and every step's
command reads them."""

from __future__ import annotations

import subprocess

import pytest
from helpers import ROOT

from leverlm import demo
from leverlm.demo import CLIP_FILE, clip_checkpoint, lvlm_dir


def test_demo_reads_the_committed_models(tmp_path, capsys) -> None:
    paths = demo.DemoPaths(tmp_path)
    assert paths.clip == clip_checkpoint() and paths.clip.name == CLIP_FILE
    assert paths.lvlm == lvlm_dir() and (paths.lvlm / "model.safetensors").is_file()
    demo.Demo(tmp_path, ROOT).step_models()
    out = capsys.readouterr().out
    assert "idefics3" in out and "vqa_nonce" in out and CLIP_FILE in out


def test_demo_commands_use_the_trained_clip_lvlm_and_feature_stores(tmp_path, monkeypatch) -> None:
    ran: list[tuple[str, list[str]]] = []
    d = demo.Demo(tmp_path, ROOT)
    monkeypatch.setattr(d, "run", lambda step, cmd: ran.append((step, [str(c) for c in cmd])))
    d.step_features()
    d.step_gt()
    d.step_eval()
    feats = [c for s, c in ran if s == "features"]
    assert len(feats) == 2
    for cmd in feats:
        assert cmd[cmd.index("features") + 1] == "predict"
        assert cmd[cmd.index("--model.pretrained") + 1] == str(clip_checkpoint())
    (gt,) = [c for s, c in ran if s == "gt"]
    (ev,) = [c for s, c in ran if s == "eval"]
    for cmd in (gt, ev):
        assert cmd[cmd.index("--model.lvlm.path") + 1] == str(lvlm_dir())
    train_store = d.paths.features(d.paths.train_collection)
    assert gt[gt.index("--data.support_features") + 1] == str(train_store)
    assert ev[ev.index("--data.support_features") + 1] == str(train_store)


def test_missing_models_are_named(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(demo.DemoPaths, "clip", property(lambda self: tmp_path / "none.st"))
    with pytest.raises(demo.DemoError, match=r"none\.st.*make demo-models"):
        demo.Demo(tmp_path, ROOT).step_models()


def test_unknown_step_is_refused(capsys) -> None:
    assert demo.main(["--steps", "prep,lvlm"]) == 2
    assert "lvlm" in capsys.readouterr().err


def test_make_demo_models_retrains_into_the_asset_folder() -> None:
    out = subprocess.run(
        ["make", "-n", "demo-models", f"STAMP={ROOT}/Makefile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "leverlm prep easyvqa --out runs/demo/data" in out
    assert "-m tools.demo_models all --out src/leverlm/assets/demo --data runs/demo/data" in out
