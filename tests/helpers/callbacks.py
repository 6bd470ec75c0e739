"""Lightning callbacks that interrupt a job at a chosen point (given to a job's CLI as
``--trainer.callbacks '[{"class_path": "helpers.callbacks.CrashAt", "init_args": {...}}]'``)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class CrashAt(pl.Callback):
    """Raises before predict batch ``batch`` (that many batches are finished by then), or at
    the end of the predict loop when ``batch`` is None."""

    def __init__(self, batch: int | None = None) -> None:
        self.batch = batch

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, *_) -> None:
        if batch_idx == self.batch:
            raise RuntimeError("simulated crash")

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.batch is None:
            raise RuntimeError("simulated crash")


class KillAt(pl.Callback):
    """SIGKILLs its own process before predict batch ``batch``: no Python cleanup runs."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, *_) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
