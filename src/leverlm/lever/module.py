"""Training Lever-LM: the LightningModule, the logger default and ``leverlm train`` (LightningCLI).

``leverlm train fit --config experiments/coco/lever_openflamingo.yaml --data.gt_dir ...``;
``--print_config`` shows the resolved config, which is also saved beside every run and logged
to the run's logger. The data module's gt manifest fixes the vocabulary (supporting-set size),
the feature dimension and where the features / supporting set live; the CLI links those into
the model, so a checkpoint alone is enough to rebuild the model and find its features.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import fields
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from leverlm.lever import LeverLMError
from leverlm.lever.data import LeverLMDataModule, refuse_query_text
from leverlm.lever.model import IGNORE_INDEX, LeverLMConfig, LeverLMModel

log = logging.getLogger("leverlm.train")

Modality = Literal["image", "text"]


class LeverLMModule(L.LightningModule):
    """Steps, optimisation and logging around :class:`LeverLMModel`.

    Args:
        num_icds: supporting-set size (the CLI links it from the gt dataset).
        feature_dim: CLIP feature size (linked from the feature store; with trainable CLIP
            the CLIP model's own output size is used).
        query_features / icd_features: modalities added to the QUERY / ICD tokens.
        adapter: MLP adapter from CLIP to n_embd; False = linear (identity if dims match).
        adapter_activation / adapter_hidden: the MLP's activation (authors: relu) and hidden
            width (None: 4 * n_embd, as the authors' GPT-2; their LSTM: n_embd).
        normalize: L2-normalise features, ``normalize_at`` ``before_adapter`` (default) or
            ``after_adapter`` (authors).
        lstm_variant: ``leverlm`` (input dropout, final LayerNorm, tied head) or ``authors``
            (neither, untied MLP head); see :mod:`leverlm.lever.model`.
        predict_query_token: the loss also predicts QUERY after BOS (the authors' loss).
        output_features: modalities of the feature-tied output head (our extension; empty = the
            paper's head): an ICD's logit also gets ``h . W f(ICD)``, so what is learnt about
            one ICD carries over to similar ICDs no gt sequence contains. Frozen CLIP only.
        output_ids: with ``output_features``, keep the tied token-embedding term in the ICD
            logits (False: ICDs are scored by their features alone, nothing per ICD to memorise).
        clip_trainable: own an open_clip encoder and fine-tune it on the streamed images/texts.
        clip_model / clip_pretrained: its open_clip name and local checkpoint (None = random).
        clip_lr: learning rate of the CLIP parameters (default: ``lr``).
        warmup_ratio: linear warmup over this fraction of all steps, then cosine to 0.
        weight_decay_on: ``matrices`` (no decay on biases and LayerNorm gains) or ``all``
            (every parameter, as the authors' AdamW).
        support_features / supporting_set / supporting_set_sha256 / task: recorded in the
            checkpoint (linked by the CLI) so decoding finds the features and images without
            extra flags, and checks that a store given instead was built for that collection.
        table_rows: queries decoded each validation epoch into a wandb table (0 = none).
    """

    def __init__(
        self,
        num_icds: int,
        feature_dim: int | None = None,
        backbone: Literal["gpt2", "lstm"] = "gpt2",
        n_layer: int = 2,
        n_embd: int = 512,
        n_head: int = 8,
        n_positions: int = 64,
        dropout: float = 0.1,
        query_features: tuple[Modality, ...] = ("image",),
        icd_features: tuple[Modality, ...] = ("image", "text"),
        adapter: bool = True,
        adapter_activation: Literal["gelu", "relu"] = "gelu",
        adapter_hidden: int | None = None,
        normalize: bool = False,
        normalize_at: Literal["before_adapter", "after_adapter"] = "before_adapter",
        lstm_variant: Literal["leverlm", "authors"] = "leverlm",
        predict_query_token: bool = False,
        output_features: tuple[Modality, ...] = (),
        output_ids: bool = True,
        clip_trainable: bool = False,
        clip_model: str = "ViT-B-32-quickgelu",
        clip_pretrained: str | None = None,
        clip_lr: float | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-3,
        warmup_ratio: float = 0.05,
        weight_decay_on: Literal["matrices", "all"] = "matrices",
        support_features: str | None = None,
        supporting_set: str | None = None,
        supporting_set_sha256: str | None = None,
        task: str | None = None,
        table_rows: int = 4,
    ):
        super().__init__()
        self.save_hyperparameters()
        if lr <= 0 or weight_decay < 0 or not 0 <= warmup_ratio < 1:
            raise LeverLMError(
                f"model: need lr > 0, weight_decay >= 0, 0 <= warmup_ratio < 1; got lr={lr}, "
                f"weight_decay={weight_decay}, warmup_ratio={warmup_ratio}"
            )
        if weight_decay_on not in ("matrices", "all"):
            raise LeverLMError(
                f"model.weight_decay_on must be 'matrices' or 'all', got {weight_decay_on!r}"
            )
        refuse_query_text(task, query_features)
        self.clip: torch.nn.Module | None = None
        if clip_trainable and output_features:
            raise LeverLMError(
                "model.output_features needs frozen CLIP features (a feature store): with "
                "clip_trainable the supporting set's features change every step"
            )
        if clip_trainable:
            from leverlm.encoders import load_clip

            self.clip = load_clip(clip_model, clip_pretrained)
            # load_clip returns eval mode; Lightning keeps submodule modes as they are
            self.clip.train()
            feature_dim = int(self.clip.dim)
        elif feature_dim is None:
            if query_features or icd_features or output_features:
                raise LeverLMError(
                    "model.feature_dim is unknown: give data.support_features (a feature store) or "
                    "model.feature_dim, or use indices only (empty query/icd_features)"
                )
            feature_dim = n_embd
        names = {f.name for f in fields(LeverLMConfig)}
        options = {k: v for k, v in self.hparams.items() if k in names}
        self.config = LeverLMConfig(**{**options, "feature_dim": feature_dim})
        self.model = LeverLMModel(self.config)
        self._table_bank: Any = None

    # -- features ----------------------------------------------------------------------------
    def batch_features(
        self, batch: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(query_feats {m: (B, D)}, icd_feats {m: (B, L, D)}) of a batch.

        Frozen CLIP: gathered from the store by the collator. Trainable CLIP: encoded here,
        so gradients reach the CLIP weights.
        """
        if self.clip is None:
            return batch.get("query_feats", {}), batch.get("icd_feats", {})
        tokens = batch["tokens"]  # (B, L)
        B, L = tokens.shape

        def encode(m: str, x: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_pixels(x) if m == "image" else self.clip.encode_tokens(x)

        query = {m: encode(m, x) for m, x in batch["query_clip"].items()}
        icd = {}
        for m, x in batch["icd_clip"].items():
            flat = encode(m, x)  # (M, D) for the M ICD tokens
            full = flat.new_zeros(B * L, flat.shape[-1])
            icd[m] = full.index_copy(0, batch["icd_index"], flat).view(B, L, -1)
        return query, icd

    def ensure_output_bank(self) -> None:
        """Load the supporting set's features for a feature-tied output head (once, on the
        model's device) from the data module's feature store."""
        model = self.model
        if not self.config.output_features:
            return
        bank = model.output_bank
        if bank is not None and all(t.device == self.device for t in bank.values()):
            return
        from leverlm.lever.decode import FeatureBank

        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        store = getattr(dm, "store", None)
        if store is None:
            if bank is not None:  # moved to another device: move the bank with it
                model.set_output_bank({m: t.to(self.device) for m, t in bank.items()})
                return
            raise LeverLMError(
                "model.output_features needs the supporting set's features: train with a "
                "data module that has a feature store (data.support_features), or call "
                "model.set_output_bank(...)"
            )
        feats = FeatureBank.from_store(store, self.config.output_features, device=self.device)
        model.set_output_bank(feats.features)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.ensure_output_bank()
        query, icd = self.batch_features(batch)
        return self.model(batch["tokens"], query, icd, batch.get("targets"))

    # -- steps -------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        _, loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["tokens"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits, loss = self(batch)
        targets = batch["targets"]
        is_icd = (targets != IGNORE_INDEX) & (targets < self.config.num_icds)  # ICD targets only
        correct = (logits.argmax(-1) == targets) & is_icd
        n_icd = int(is_icd.sum())
        B = targets.shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
        # logged on every rank and step (never conditionally), so DDP's reductions line up
        acc = correct.sum().float() / max(n_icd, 1)
        self.log("val/next_icd_acc", acc, batch_size=max(n_icd, 1), sync_dist=True)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for _, p in self.model.named_parameters():
            if p.requires_grad:
                # matrices (incl. the tied embedding) decay; biases and LayerNorm gains do not,
                # unless every parameter decays (weight_decay_on: all, the authors')
                (decay if p.ndim >= 2 or hp.weight_decay_on == "all" else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if self.clip is not None:
            clip_params = [p for p in self.clip.parameters() if p.requires_grad]
            groups.append(
                {"params": clip_params, "weight_decay": hp.weight_decay, "lr": hp.clip_lr or hp.lr}
            )
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.999))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(round(hp.warmup_ratio * total))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The RNG states, so a resumed run draws what an uninterrupted one would (dropout).
        checkpoint["leverlm_rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["leverlm_rng"]["cuda"] = torch.cuda.get_rng_state_all()
        # plain dicts, so LeverLM.from_checkpoint needs neither Lightning nor this class
        hp = self.hparams
        checkpoint["leverlm_config"] = self.config.to_dict()
        checkpoint["leverlm_info"] = {
            "support_features": hp.support_features,
            "supporting_set": hp.supporting_set,
            "supporting_set_sha256": hp.supporting_set_sha256,
            "task": hp.task,
            "clip_trainable": bool(hp.clip_trainable),
            "clip_model": hp.clip_model,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("leverlm_rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- decoded-sequence table --------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        if self.hparams.table_rows <= 0 or self.trainer.sanity_checking:
            return
        if not self.trainer.is_global_zero or self.clip is not None:
            return  # trainable CLIP: the store's features are not the model's features
        wandb_loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return  # other loggers: no table, and no decoding cost
        rows = self.decoded_rows()
        if rows is None:
            return
        columns, data = rows
        for lg in wandb_loggers:
            lg.log_table(key="val/decoded", columns=columns, data=data)

    def decoded_rows(self) -> tuple[list[str], list[list[Any]]] | None:
        """A few validation queries decoded greedily: (columns, rows) with images if available."""
        import numpy as np

        from leverlm.lever.decode import FeatureBank, greedy_decode

        dm = getattr(self.trainer, "datamodule", None)
        if (
            not isinstance(dm, LeverLMDataModule)
            or dm.val_dataset is None
            or not len(dm.val_dataset)
        ):
            return None
        seen: dict[int, list[int]] = {}
        for pos, seq in dm.val_dataset.items:
            if pos not in seen and len(seen) < self.hparams.table_rows:
                seen[pos] = list(seq)
        positions = list(seen)
        shots = max(1, max(len(s) for s in seen.values()))
        store = dm.store
        if self.config.icd_features and self._table_bank is None:
            self._table_bank = FeatureBank.from_store(
                store, self.config.icd_features, device=self.device
            )
        q = {
            m: torch.from_numpy(np.asarray(getattr(store, m)[positions])).to(self.device)
            for m in self.config.query_features
        }
        decoded = greedy_decode(
            self.model,
            q,
            self._table_bank,
            shots,
            exclude=[[p] for p in positions],
            num_queries=len(positions),
        ).tolist()
        images = _collection_images(dm.supporting_set_path)
        columns = ["query_position", "query_image", "decoded_icds", "decoded_images", "gt_icds"]
        data = []
        for pos, icds in zip(positions, decoded, strict=True):
            data.append(
                [
                    pos,
                    images(pos) if images else None,
                    icds,
                    [images(p) for p in icds] if images else None,
                    seen[pos],
                ]
            )
        return columns, data


def _collection_images(path: str | None) -> Any:
    """pos -> wandb.Image of the supporting set (None when the collection is unavailable)."""
    if not path or not os.path.isdir(path):
        return None
    try:
        import wandb

        from leverlm.data.collection import Collection

        coll = Collection(path)
    except Exception:  # noqa: BLE001 - the table is a nicety; never fail training for it
        return None
    return lambda pos: wandb.Image(coll.image(pos), caption=coll.keys[pos])


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _result_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """What determines the trained weights: the config without where things are written,
    how they are logged or shown, and how many loader workers there are."""
    cfg = {k: v for k, v in cfg.items() if k in ("model", "data", "trainer", "seed_everything")}
    cfg["data"] = {k: v for k, v in cfg.get("data", {}).items() if k != "num_workers"}
    # linked from the data module when it is built (functions of the fingerprinted inputs)
    cfg["model"] = {k: v for k, v in cfg.get("model", {}).items() if k not in _LINKED}
    cfg["trainer"] = {
        k: v for k, v in cfg.get("trainer", {}).items()
        if k not in ("logger", "callbacks", "default_root_dir", "enable_progress_bar",
                     "enable_model_summary", "log_every_n_steps")
    }  # fmt: skip
    return cfg


_LINKED = (
    "num_icds", "feature_dim", "support_features", "supporting_set", "supporting_set_sha256", "task",
)  # fmt: skip
CHECKPOINTS = "checkpoints"


class LeverLMCLI(LightningCLI):
    """``leverlm train fit|validate``: the data -> model links, a run folder (``--out``: config,
    checkpoints, logs) and resume from its ``last.ckpt`` by default."""

    locked: Any = None  # the run folder this process holds the lock of

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # the module has no test/predict steps: offer only what works
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def add_arguments_to_parser(self, parser: Any) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        # what the data module must gather follows the model's configuration
        for key in ("query_features", "icd_features", "clip_trainable", "clip_model"):
            parser.link_arguments(f"model.{key}", f"data.{key}")
        # what the gt dataset fixes: vocabulary, feature size, where features/images live
        for src, dst in (
            ("num_icds", "num_icds"),
            ("feature_dim", "feature_dim"),
            ("support_features_path", "support_features"),
            ("supporting_set_path", "supporting_set"),
            ("supporting_set_sha256", "supporting_set_sha256"),
            ("task", "task"),
        ):
            parser.link_arguments(f"data.{src}", f"model.{dst}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:02d}-{step}",
                "checkpoint.auto_insert_metric_name": False,
                # last.ckpt is always the newest: never last-v1.ckpt beside a stale one
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_argument(
            "--out", type=str | None, default=None,
            help="the run folder (config.yaml, checkpoints/, logs/); default: "
            "trainer.default_root_dir",
        )  # fmt: skip
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="delete the checkpoints in --out (of any run) and start over, instead of "
            "resuming (same run) or refusing (another run)",
        )  # fmt: skip
        parser.add_argument(
            "--cpu_threads", type=int | None, default=None,
            help="torch intra-op CPU threads (default: $LEVERLM_THREADS or torch's choice)",
        )  # fmt: skip

    def before_instantiate_classes(self) -> None:
        from pathlib import Path

        from leverlm.runs import RunDir, RunHeader, input_fingerprint, is_launcher_rank, set_threads

        cfg = self.config[self.subcommand]
        set_threads(cfg["cpu_threads"])
        out = cfg["out"] or cfg["trainer"]["default_root_dir"] or "runs/lever"
        cfg["trainer"]["default_root_dir"] = cfg["out"] = out
        if not cfg["checkpoint"]["dirpath"]:
            cfg["checkpoint"]["dirpath"] = str(Path(out) / CHECKPOINTS)
        plain = cfg.as_dict()
        inputs = {"gt": input_fingerprint(plain["data"]["gt_dir"])}
        if plain["data"].get("features"):
            inputs["features"] = input_fingerprint(plain["data"]["features"])
        header = RunHeader("train", _result_config(plain), inputs, [])
        self.run_dir = run = RunDir(out, results=(CHECKPOINTS, "config.yaml"))
        run.check_writable()
        status = run.status(header, cfg["overwrite"])
        if is_launcher_rank():
            run.lock()
            LeverLMCLI.locked = run
            run.prepare(header, cfg["overwrite"])
        last = Path(cfg["checkpoint"]["dirpath"]) / "last.ckpt"
        if (
            self.subcommand == "fit"
            and status == "resume"
            and last.is_file()
            and not cfg.get("ckpt_path")
        ):
            cfg["ckpt_path"] = str(last)
            log.info("resuming from %s (rerun of the same training run in %s)", last, out)
        else:
            log.info("training run in %s (%s)", out, status)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from leverlm.runs import default_logger

        cfg = self.config[self.subcommand]
        if cfg["trainer"].get("logger") in (None, True):
            kwargs["logger"] = default_logger(cfg["out"], "leverlm-train")
        return super().instantiate_trainer(**kwargs)


class RunConfigCallback(SaveConfigCallback):
    """The resolved config: ``OUT/config.yaml``, and logged to every logger."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import yaml

        from leverlm.utils import atomic_open

        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": yaml.safe_load(text)})
        with atomic_open(os.path.join(trainer.default_root_dir, "config.yaml"), "w") as fh:
            fh.write(text)


def main(argv: list[str]) -> int:
    """``leverlm train {fit,validate} [--config ...] [--print_config] [overrides]``."""
    import sys

    # LightningCLI reads sys.argv (and warns when given both); show "leverlm train" in --help
    saved = sys.argv
    sys.argv = ["leverlm train", *argv]
    LeverLMCLI.locked = None
    try:
        LeverLMCLI(
            LeverLMModule,
            LeverLMDataModule,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = saved
        if LeverLMCLI.locked is not None:
            LeverLMCLI.locked.unlock()
    return 0
