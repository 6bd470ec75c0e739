"""Quiet logs: third-party noise silenced by exact message, the rest of the output kept."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT
from helpers.lever_world import make_world

from leverlm.utils import quiet_third_party

NOISE = {
    "Lightning's litlogger/litmodels tips": re.compile(r"💡 Tip|litlogger|litmodels"),
    "torch's LeafSpec deprecation": re.compile(r"LeafSpec"),
    "wandb's anonymous-setting warning": re.compile(r"anonymous"),
    "open_clip's random-init warning": re.compile(r"No pretrained weights loaded"),
    "Lightning's hardware and seed notes": re.compile(r"GPU available|TPU available|Seed set"),
}


def test_only_the_tips_and_notes_of_lightnings_logger_are_dropped(caplog) -> None:
    quiet_third_party()
    quiet_third_party()  # a second call adds nothing
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert log.filters.count(log.filters[-1]) == 1
    kept = "`Trainer.fit` stopped: `max_epochs=1` reached."
    with caplog.at_level(logging.INFO):
        log.info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](x)")
        log.info("💡 Tip: For seamless cloud logging, try installing [litlogger](x) to enable it")
        log.info("GPU available: False, used: False")
        log.info("TPU available: False, using: 0 TPU cores")
        log.info("Seed set to 0")
        log.info(kept)
    assert [r.getMessage() for r in caplog.records] == [kept]


@pytest.mark.slow
def test_a_training_run_prints_no_third_party_noise(tmp_path) -> None:
    # A real fit with every noisy piece: a Trainer (tips, LeafSpec), the config's wandb logger
    # (disabled by conftest, still initialised) and a tiny CLIP built without a checkpoint.
    world = make_world(tmp_path / "world", with_collection=True)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "leverlm.cli", "train", "fit",
        "--config", str(ROOT / "experiments/vqav2/lever_idefics.yaml"),
        "--data.gt_dir", str(world.gt_dir), "--data.batch_size", "4", "--data.num_workers", "0",
        "--model.clip_model", "leverlm-tiny-clip", "--model.clip_pretrained", "null",
        "--model.n_embd", "32", "--model.n_head", "2", "--model.n_layer", "1",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
        "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.precision", "32",
        "--trainer.enable_progress_bar", "false", "--out", str(run),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "`Trainer.fit` stopped" in proc.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["logger"] is None  # the default: wandb under the run's logs/
    assert (run / "logs").is_dir()
    output = proc.stdout + proc.stderr
    for what, pattern in NOISE.items():
        assert not pattern.search(output), f"{what} printed: {pattern.search(output)}"
