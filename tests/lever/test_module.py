"""Training through ``leverlm train`` (LightningCLI): experiment configs, checkpoints, reload,
the ``select`` CLI, the decoded-sequence table and the trainable-CLIP path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT
from helpers.lever_world import World, make_world, write_store

from leverlm.encoders.store import FeatureStoreError
from leverlm.lever import LeverLMError
from leverlm.lever.module import main as train_main
from leverlm.utils import sha256_file

# End-to-end runs of a job (subprocesses, DDP, kills): not in `make test-fast`.
pytestmark = pytest.mark.slow

EXPERIMENTS = sorted(ROOT.glob("experiments/*/lever_*.yaml"))
PAPER = (
    "coco/lever_openflamingo.yaml",
    "coco/lever_openflamingo_lstm.yaml",
    "vqav2/lever_idefics.yaml",
)


def _print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        train_main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(
        tmp_path_factory.mktemp("world"), num_icds=24, num_anchors=12, beams=2, with_collection=True
    )


def test_there_are_experiment_configs():
    names = {p.relative_to(ROOT / "experiments").as_posix() for p in EXPERIMENTS}
    assert {
        "coco/lever_openflamingo.yaml",
        "vqav2/lever_idefics.yaml",
        "easyvqa/lever_demo.yaml",
    } <= names


@pytest.mark.parametrize(
    "config", EXPERIMENTS, ids=lambda p: p.relative_to(ROOT / "experiments").as_posix()
)
def test_experiment_config_parses_and_runs_a_fast_dev_run(
    config, world, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # loggers and checkpoints write under the working directory
    args = ["fit", "--config", str(config), "--data.gt_dir", str(world.gt_dir)]
    cfg = _print_config(args, capsys)
    name = config.relative_to(ROOT / "experiments").as_posix()
    model, data = cfg["model"], cfg["data"]
    if name in PAPER:  # the paper's training settings, as the authors' code runs them
        assert model["lr"] == pytest.approx(1e-4)
        assert model["weight_decay"] == pytest.approx(1e-3) and model["weight_decay_on"] == "all"
        assert model["warmup_ratio"] == pytest.approx(0.05)
        assert model["n_layer"] == 2 and model["dropout"] == pytest.approx(0.1)
        assert model["n_embd"] == (128 if model["backbone"] == "lstm" else 512)
        assert model["adapter_activation"] == "relu" and model["normalize_at"] == "after_adapter"
        assert model["predict_query_token"] and model["icd_features"] == ["image", "text"]
        assert data["batch_size"] == 64 and data["val_fraction"] == pytest.approx(0.1)
        assert data["split"] == "sorted" and data["score_threshold"] == 0.0
        assert cfg["trainer"]["max_epochs"] == 20 and cfg["trainer"]["precision"] == "16-mixed"
    if name.startswith("vqav2/"):  # facts sheet 3.5: adapter off, norm on, CLIP trained
        assert model["clip_trainable"] and model["normalize"] and not model["adapter"]
        assert model["query_features"] == ["image", "text"]
    if name.startswith("coco/"):  # adapter on, norm off, CLIP frozen, query image
        assert not model["clip_trainable"] and not model["normalize"]
        assert model["query_features"] == ["image"] and model["adapter"]
    if name == "coco/lever_openflamingo_lstm.yaml":  # facts sheet 3.6
        assert model["lstm_variant"] == "authors" and model["adapter_hidden"] == 128
    if name == "easyvqa/lever_demo.yaml":  # the demo keeps today's settings (the defaults)
        assert model["adapter_activation"] == "gelu" and model["normalize_at"] == "before_adapter"
        assert model["weight_decay_on"] == "matrices" and not model["predict_query_token"]
        assert model["adapter_hidden"] is None and model["lstm_variant"] == "leverlm"
        assert data["split"] == "random" and data["score_threshold"] is None
    assert "query_features" not in cfg["data"]  # linked from the model, not set twice
    run = [
        *args,
        "--trainer.fast_dev_run",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
    ]
    run += [
        "--data.batch_size",
        "4",
        "--data.num_workers",
        "0",
        "--trainer.enable_progress_bar",
        "false",
    ]
    if model["clip_trainable"]:
        run += ["--model.clip_model", "leverlm-tiny-clip", "--model.clip_pretrained", "null"]
    else:
        run += ["--data.support_features", str(world.store_dir)]
    assert train_main(run) == 0


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A short real fit of the demo config (CSV logger), and a validate run from its checkpoint."""
    out = tmp_path_factory.mktemp("fit")
    demo = ROOT / "experiments/easyvqa/lever_demo.yaml"
    args = [
        "--config", str(demo), "--data.gt_dir", str(world.gt_dir), "--data.support_features",
        str(world.store_dir), "--trainer.max_epochs", "3", "--data.batch_size", "8",
        "--out", str(out), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(out),
        "--trainer.enable_progress_bar", "false", "--model.n_embd", "32", "--model.n_head", "2",
    ]  # fmt: skip
    assert train_main(["fit", *args]) == 0
    ckpts = sorted(out.rglob("*.ckpt"))
    return out, ckpts, args


def test_fit_writes_best_and_last_checkpoints_and_the_config(trained, world):
    out, ckpts, args = trained
    names = {p.name for p in ckpts}
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    saved = list(out.rglob("config.yaml"))
    assert saved, "the resolved config is saved with the run"
    cfg = yaml.safe_load(saved[0].read_text())
    assert cfg["data"]["gt_dir"] == str(world.gt_dir) and cfg["model"]["n_embd"] == 32
    metrics = (next(out.rglob("metrics.csv"))).read_text()
    for key in ("train/loss", "val/loss", "val/next_icd_acc"):
        assert key in metrics
    ckpt = torch.load(
        next(p for p in ckpts if p.name == "last.ckpt"), map_location="cpu", weights_only=True
    )
    hp = ckpt["hyper_parameters"]
    assert hp["num_icds"] == world.num_icds and hp["feature_dim"] == 16
    assert hp["support_features"] == str(Path(world.store_dir).resolve())
    assert hp["supporting_set"] == str(world.collection.resolve())
    assert ckpt["leverlm_config"]["n_embd"] == 32
    # the supporting set the vocabulary indexes, so a store given at decoding is checked
    sha = sha256_file(world.collection / "manifest.json")
    assert ckpt["leverlm_info"]["supporting_set_sha256"] == sha
    # validate from the checkpoint through the same CLI
    assert (
        train_main(["validate", *args, "--ckpt_path", str(out.rglob("last.ckpt").__next__())]) == 0
    )


def test_checkpoint_reload_gives_identical_selections(trained, world, tmp_path):
    from leverlm.lever.decode import FeatureBank, greedy_decode
    from leverlm.lever.module import LeverLMModule
    from leverlm.lever.select import LeverLM

    _, ckpts, _ = trained
    last = next(p for p in ckpts if p.name == "last.ckpt")
    lm = LeverLM.from_checkpoint(last)  # features found through the checkpoint
    queries = list(range(world.num_icds))
    exclude = [[p] for p in queries]
    first = lm.select(queries, shots=4, exclude=exclude)
    again = LeverLM.from_checkpoint(last, support_features=str(world.store_dir)).select(
        queries, shots=4, batch_size=5, exclude=exclude
    )
    assert first == again
    # the same network straight from Lightning decodes the same
    module = LeverLMModule.load_from_checkpoint(last, map_location="cpu").eval()
    q = {m: torch.from_numpy(getattr(world, m)) for m in module.config.query_features}
    bank = FeatureBank({m: getattr(world, m) for m in module.config.icd_features})
    with torch.no_grad():
        direct = greedy_decode(module.model, q, bank, 4, exclude=exclude).tolist()
    assert direct == first
    for q_pos, seq in zip(queries, first, strict=True):
        assert len(set(seq)) == 4 and q_pos not in seq
    # queries as feature tensors select the same as positions
    as_feats = lm.select(
        {m: getattr(world, m) for m in ("image", "text")}, shots=4, exclude=exclude
    )
    assert as_feats == first
    with pytest.raises(ValueError, match="rows"):
        bad = {m: getattr(world, m)[:5] for m in ("image", "text")}
        LeverLM.from_checkpoint(last, support_features=bad)
    # a store of another collection, even of the same size, is refused
    other = write_store(tmp_path / "other", world.image, world.text)
    with pytest.raises(ValueError, match="support_features: feature store .* was built for"):
        LeverLM.from_checkpoint(last, support_features=str(other))


def test_select_cli_writes_keys_and_positions_atomically(trained, world, tmp_path):
    from leverlm.data.collection import Collection
    from leverlm.lever.select import LeverLM
    from leverlm.lever.select import main as select_main

    _, ckpts, _ = trained
    last = str(next(p for p in ckpts if p.name == "last.ckpt"))
    out = tmp_path / "selections.jsonl"
    args = [
        "--ckpt",
        last,
        "--queries",
        str(world.collection),
        "--query_features",
        str(world.store_dir),
    ]
    assert select_main([*args, "--shots", "3", "--out", str(out), "--exclude_self"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    keys = Collection(world.collection).keys
    assert [x["query_key"] for x in lines] == keys
    assert [x["query_position"] for x in lines] == list(range(len(keys)))
    expected = LeverLM.from_checkpoint(last).select(
        list(range(len(keys))), shots=3, exclude=[[p] for p in range(len(keys))]
    )
    assert [x["icd_positions"] for x in lines] == expected
    # bad input fails before writing, and the existing output is left as it was
    before = out.read_bytes()
    with pytest.raises(LeverLMError, match="--shots"):
        select_main([*args, "--shots", "0", "--out", str(out)])
    # a store of another collection, told apart by the collection's manifest sha256
    short = write_store(tmp_path / "short", world.image[:5], world.text[:5])
    with pytest.raises(FeatureStoreError, match="--query_features: feature store .* was built for"):
        select_main([*args[:-1], str(short), "--shots", "2", "--out", str(out)])
    with pytest.raises(LeverLMError, match="does not exist"):
        select_main(["--ckpt", last + ".missing", *args[2:], "--shots", "2", "--out", str(out)])
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selections.jsonl", "short"]


def test_validation_table_for_wandb(world, tmp_path, monkeypatch):
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from leverlm.lever.data import LeverLMDataModule
    from leverlm.lever.module import LeverLMModule

    logged = []
    monkeypatch.setattr(
        WandbLogger,
        "log_table",
        lambda self, key, columns, data: logged.append((key, columns, data)),
    )
    dm = LeverLMDataModule(
        str(world.gt_dir), support_features=str(world.store_dir), batch_size=8, val_fraction=0.25
    )
    module = LeverLMModule(
        num_icds=world.num_icds, feature_dim=16, n_embd=32, n_head=2, table_rows=2,
        support_features=dm.support_features_path, supporting_set=dm.supporting_set_path,
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=1, logger=WandbLogger(save_dir=str(tmp_path), offline=True),
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert len(logged) == 1
    key, columns, data = logged[0]
    assert key == "val/decoded" and len(data) == 2
    row = dict(zip(columns, data[0], strict=True))
    import wandb

    assert isinstance(row["query_image"], wandb.Image)
    assert len(row["decoded_icds"]) == 2 and len(row["decoded_images"]) == 2
    assert row["query_position"] not in row["decoded_icds"]
    assert row["gt_icds"] in [list(s) for s in world.sequences[row["query_position"]]]


def test_trainable_clip_updates_clip_and_selects_with_it(world, tmp_path, monkeypatch):
    from leverlm.encoders import load_clip
    from leverlm.lever.select import LeverLM
    from leverlm.lever.select import main as select_main

    monkeypatch.chdir(tmp_path)
    args = [
        "fit", "--data.gt_dir", str(world.gt_dir), "--model.clip_trainable", "true",
        "--model.clip_model", "leverlm-tiny-clip", "--model.query_features", "[image, text]",
        "--model.icd_features", "[image]", "--model.normalize", "true", "--model.n_embd", "32",
        "--model.n_head", "2", "--model.lr", "1e-3", "--model.warmup_ratio", "0.0",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--data.batch_size", "4",
        "--trainer.logger", "false", "--out", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
    ]  # fmt: skip
    assert train_main(args) == 0
    last = next(tmp_path.rglob("last.ckpt"))
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    fresh = load_clip("leverlm-tiny-clip", None).state_dict()
    trained = {k[len("clip.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("clip.")}
    assert trained.keys() == fresh.keys()
    assert any(not torch.equal(trained[k], fresh[k]) for k in fresh), "CLIP was not trained"
    lm = LeverLM.from_checkpoint(last)  # encodes the supporting set with the trained CLIP
    assert lm.bank.num_rows == world.num_icds and set(lm.bank.features) == {"image"}
    out = tmp_path / "sel.jsonl"
    assert (
        select_main(
            [
                "--ckpt",
                str(last),
                "--queries",
                str(world.collection),
                "--shots",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == world.num_icds and all(len(set(x["icd_positions"])) == 3 for x in lines)
    # the CLI encoded the queries with the same CLIP the API uses
    from leverlm.lever.select import encode_collection

    feats = encode_collection(
        lm.clip, "leverlm-tiny-clip", world.collection, "vqa", ("image", "text")
    )
    assert [x["icd_positions"] for x in lines] == lm.select(feats, shots=3)
    assert np.isfinite(feats["image"].numpy()).all()


def _last_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def test_kill_9_then_the_same_command_resumes_to_the_uninterrupted_weights(world, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    demo = ROOT / "experiments/easyvqa/lever_demo.yaml"
    args = [
        "--config", str(demo), "--data.gt_dir", str(world.gt_dir), "--data.support_features",
        str(world.store_dir), "--trainer.max_epochs", "4", "--data.batch_size", "4",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--model.n_embd", "32", "--model.n_head", "2", "--model.dropout", "0.2",
    ]  # fmt: skip
    assert train_main(["fit", *args, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "killed"
    leverlm = str(Path(sys.executable).with_name("leverlm"))
    slow = ["--trainer.callbacks+=helpers.lever_world.SlowEpochs"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), *sys.path])}
    proc = subprocess.Popen(
        [leverlm, "train", "fit", *args, *slow, "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert last.exists(), "the run died before its first checkpoint"
    epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert epoch < 3, "the kill came too late to test a resume"

    # the same command again: it resumes (callbacks do not name the run) and ends where an
    # uninterrupted run ends, with one last.ckpt
    assert train_main(["fit", *args, "--out", str(out)]) == 0
    whole, resumed = _last_weights(tmp_path / "whole"), _last_weights(out)
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)
    assert not list((out / "checkpoints").glob("last-v*.ckpt"))


def test_another_config_in_the_run_folder_is_refused(trained, capsys):
    from leverlm.cli import main as cli_main

    out, _, args = trained
    assert cli_main(["train", "fit", *args, "--model.lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert (
        "holds a `leverlm train` run with other inputs or settings (changed: config model.lr" in err
    )


@pytest.mark.parametrize("on", ["matrices", "all"])
def test_weight_decay_groups(on):
    """Ours: no decay on biases and LayerNorm gains; the authors': every parameter decays."""
    from types import SimpleNamespace

    from leverlm.lever.module import LeverLMModule

    module = LeverLMModule(num_icds=10, feature_dim=8, n_embd=16, n_head=2, weight_decay_on=on)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    groups = module.configure_optimizers()["optimizer"].param_groups
    params = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {params[id(p)] for g in groups if g["weight_decay"] == 1e-3 for p in g["params"]}
    if on == "all":
        assert len(groups) == 1 and decayed == set(params.values())
    else:
        matrices = {n for n, p in module.model.named_parameters() if p.ndim >= 2}
        assert decayed == matrices and "gpt2.h.0.ln_1.bias" not in decayed
        assert {params[id(p)] for p in groups[1]["params"]} == set(params.values()) - matrices
        assert groups[1]["weight_decay"] == 0.0


def test_train_refuses_the_query_caption_of_a_caption_task(world, tmp_path, capsys):
    from helpers.lever_world import write_gt

    from leverlm.cli import main as cli_main

    cap = write_gt(tmp_path / "cap", world.sequences, num_icds=world.num_icds, task="caption")
    args = ["train", "fit", "--config", str(ROOT / "experiments/easyvqa/lever_demo.yaml")]
    args += ["--data.gt_dir", str(cap), "--data.support_features", str(world.store_dir)]
    assert cli_main([*args, "--out", str(tmp_path / "run"), "--trainer.logger", "false"]) == 2
    err = capsys.readouterr().err
    assert "error: model.query_features=['image', 'text'] on a 'caption' task" in err
