"""The run layer shared by the jobs (``leverlm gt``, ``eval``, ``features``).

A job turns a fixed list of work items into results. Its output folder (``--out``) is a
*run folder*::

    run.json     the run header: job, config (what determines the results), the content
                 fingerprint of every input, the work items, manifest fields; the sha256 of
                 config + inputs names the run
    run.lock     the owner (host, pid) while a process works in the folder
    parts/       rank{r}-{seq:06d}.<ext>: results as they come, each file written atomically
    logs/        the logger's files (wandb, offline unless an API key is configured)
    ...          the job's merged results, written at the end, manifest last

A rerun of the same command skips the items already in ``parts/`` and finishes the rest; a
rerun whose config or inputs changed is refused, naming what changed (``--overwrite`` starts
over). Part files are the only results written during the run, so a killed run leaves nothing
that a rerun would trust but should not.

:class:`JobCLI` is the command line of every job: LightningCLI with one ``predict``
subcommand, ``--out``/``--overwrite``/``--cpu_threads``/``--progress_bar``, early checks
(config, inputs, writable folder, lock) before any model loads, and a ``merge`` subcommand.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leverlm.errors import LeverError, Unfinished
from leverlm.utils import atomic_open, atomic_write_json, read_jsonl, sha256_file, sha256_json

log = logging.getLogger("leverlm.runs")

HEADER = "run.json"
LOCK = "run.lock"
PARTS = "parts"
LOGS = "logs"
_PART_RE = re.compile(r"^rank(\d+)-(\d{6,})\.(\w+)$")
# Files at most this large are hashed whole; larger ones (model weights) by sampled blocks.
_FULL_HASH_BYTES = 64 << 20
_SAMPLE_BLOCKS, _BLOCK_BYTES = 64, 64 << 10


class RunError(LeverError):
    """The run folder cannot be used as asked (names the folder and what to do)."""


# --------------------------------------------------------------------------------------------
# content fingerprints
# --------------------------------------------------------------------------------------------


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's content; for files over 64 MiB, of its size and 64 evenly spaced
    64 KiB blocks (model weights: another checkpoint differs in every block, and a 20 GB
    folder is fingerprinted in milliseconds rather than minutes)."""
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    if size <= _FULL_HASH_BYTES:
        return sha256_file(path)
    h = hashlib.sha256(f"sampled:{size}:".encode())
    step = (size - _BLOCK_BYTES) // (_SAMPLE_BLOCKS - 1)
    with open(path, "rb") as fh:
        for i in range(_SAMPLE_BLOCKS):
            fh.seek(i * step)
            h.update(fh.read(_BLOCK_BYTES))
    return "sampled:" + h.hexdigest()


def folder_fingerprint(path: str | os.PathLike, skip_suffixes: tuple[str, ...] = ()) -> str:
    """One hash over a folder's files (relative names + :func:`file_fingerprint`), leaving out
    hidden files, a run's own bookkeeping (``run.json``, ``run.lock``, ``parts/``, ``logs/``)
    and files ending in ``skip_suffixes``."""
    root = Path(path)
    entries = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if (
            p.is_file()
            and not any(part.startswith(".") for part in rel.parts)
            and rel.parts[0] not in (HEADER, LOCK, PARTS, LOGS)
            and not p.name.endswith(skip_suffixes)
        ):
            entries.append([rel.as_posix(), file_fingerprint(p)])
    return sha256_json(entries)


def input_fingerprint(path: str | os.PathLike) -> str:
    """The identity of an input by content: a file by its bytes, a folder by its files (a
    collection's shards by the checksums its manifest lists, after checking them)."""
    p = Path(path)
    if p.is_file():
        return file_fingerprint(p)
    is_collection = (p / "manifest.json").is_file() and any(p.glob("*.tar"))
    if is_collection:
        from leverlm.data.collection import Collection

        # Results are only as good as the shards: check them against the manifest (once per
        # file while it is unchanged).
        Collection(p).verify()
    return folder_fingerprint(p, (".tar",) if is_collection else ())


# --------------------------------------------------------------------------------------------
# the run header
# --------------------------------------------------------------------------------------------


@dataclass
class RunHeader:
    """What a run computes. ``config`` and ``inputs`` determine the results (their hash names
    the run); ``items`` lists the work; ``manifest`` is copied into the merged results;
    ``settings`` are options that do not change results (report formats, ...)."""

    job: str
    config: dict[str, Any]
    inputs: dict[str, str]
    items: list[Any]
    manifest: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # JSON values only (paths as strings), so a header read back equals the one written.
        self.config = json.loads(json.dumps(self.config, default=str))

    @property
    def sha256(self) -> str:
        return sha256_json({"job": self.job, "config": self.config, "inputs": self.inputs})

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "leverlm-run",
            "job": self.job,
            "run_sha256": self.sha256,
            "config": self.config,
            "inputs": self.inputs,
            "items": self.items,
            "manifest": self.manifest,
            "settings": self.settings,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> RunHeader:
        if not isinstance(obj, dict) or obj.get("format") != "leverlm-run":
            raise RunError(f"{where}: not a leverlm run header")
        try:
            return cls(
                obj["job"], obj["config"], obj["inputs"], obj["items"], obj["manifest"],
                obj.get("settings", {}),
            )  # fmt: skip
        except KeyError as err:
            raise RunError(f"{where}: run header has no field {err}") from None


def _diff(old: Any, new: Any, path: str) -> list[str]:
    """Dotted names of the leaves that differ between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [path]


def describe_change(old: RunHeader, new: RunHeader) -> str:
    """What differs between two runs' config and inputs, for a one-line message."""
    changed = [f"input {n!r} (its content changed)" for n in _diff(old.inputs, new.inputs, "")]
    for name in _diff(old.config, new.config, "")[:4]:
        changed.append(f"config {name}")
    if old.job != new.job:
        changed.insert(0, f"job {old.job!r} -> {new.job!r}")
    return ", ".join(changed) or "the work items"


# --------------------------------------------------------------------------------------------
# the run folder
# --------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """A job's output folder: header, lock, part files (see the module docstring).

    Args:
        out: the folder.
        results: names of the merged files the job writes (deleted by ``--overwrite``).
    """

    def __init__(self, out: str | os.PathLike, results: Sequence[str] = ()) -> None:
        self.path = Path(out).expanduser()
        self.results = tuple(results)

    @property
    def parts(self) -> Path:
        return self.path / PARTS

    def header(self) -> RunHeader | None:
        path = self.path / HEADER
        if not path.is_file():
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise RunError(f"{path}: unreadable run header ({err})") from err
        return RunHeader.from_json(obj, str(path))

    def status(self, header: RunHeader, overwrite: bool = False) -> str:
        """``"new"``, ``"resume"`` (same run) or ``"overwrite"``; read-only.

        Raises :class:`RunError` when the folder holds another run (naming what changed) and
        ``overwrite`` is false, or when it is not a folder.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"output path {str(self.path)!r} exists and is not a folder")
        old = self.header() if self.path.is_dir() else None
        if old is None:
            stray = [n for n in (*self.results, PARTS) if (self.path / n).exists()]
            if stray and not overwrite:
                raise RunError(
                    f"output folder {str(self.path)!r} holds {stray[0]} but no run header "
                    f"({HEADER}); choose another --out, or pass --overwrite to delete it"
                )
            return "overwrite" if stray else "new"
        if old.sha256 == header.sha256 and old.items == header.items:
            return "overwrite" if overwrite else "resume"
        if overwrite:
            return "overwrite"
        if not self.part_files() and not any((self.path / n).exists() for n in self.results):
            return "new"  # it wrote nothing (e.g. died loading its model): nothing to mix with
        raise RunError(
            f"output folder {str(self.path)!r} holds a `leverlm {old.job}` run with other inputs "
            f"or settings (changed: {describe_change(old, header)}); choose another --out, or pass "
            "--overwrite to delete its results and start over"
        )

    def check_writable(self) -> None:
        """Fail now, before any model loads, if results could not be written here."""
        probe = self.path
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise RunError(f"cannot write to {str(self.path)!r}: {str(probe)!r} is not writable")

    def prepare(self, header: RunHeader, overwrite: bool = False) -> str:
        """Make the folder ready for ``header``'s run (one process only); returns the status."""
        status = self.status(header, overwrite)
        if status == "overwrite":
            shutil.rmtree(self.parts, ignore_errors=True)
            for name in self.results:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.header()
        if old is None or old.to_json() != header.to_json():
            atomic_write_json(self.path / HEADER, header.to_json())
        return status

    # -- lock ---------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder's lock (one run per folder); a dead owner's lock is taken over."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._lock_owner(path)
                if owner is None:
                    continue
                if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                    log.warning(
                        "taking over %s: its owner (pid %s) is gone", path, owner.get("pid")
                    )
                    path.unlink(missing_ok=True)
                    continue
                if owner.get("host") == me["host"] and owner.get("pid") == me["pid"]:
                    return
                raise RunError(
                    f"{str(self.path)!r} is in use by pid {owner.get('pid')} on "
                    f"{owner.get('host')} (since {time.ctime(owner.get('since', 0))}); wait for "
                    f"it, or delete {path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return
        raise RunError(f"could not take the lock {path}")

    @staticmethod
    def _lock_owner(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text(encoding="utf-8") or "{}")
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # being written: treated as held by an unknown owner

    def unlock(self) -> None:
        path = self.path / LOCK
        owner = self._lock_owner(path)
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            path.unlink(missing_ok=True)

    # -- part files ---------------------------------------------------------------------------
    def part_files(self) -> list[Path]:
        """Finished part files (a killed writer's temp files are ignored), in name order."""
        if not self.parts.is_dir():
            return []
        return sorted(p for p in self.parts.iterdir() if _PART_RE.match(p.name))

    def next_seq(self, rank: int) -> int:
        seqs = [
            int(m.group(2))
            for p in self.part_files()
            if (m := _PART_RE.match(p.name)) and int(m.group(1)) == rank
        ]
        return max(seqs) + 1 if seqs else 0

    def write_part(self, rank: int, seq: int, data: bytes, ext: str) -> Path:
        """Write one part file atomically (temp + fsync + rename)."""
        path = self.parts / f"rank{int(rank)}-{int(seq):06d}.{ext}"
        if path.exists():
            raise RunError(f"part file {path} already exists; refusing to overwrite results")
        with atomic_open(path, "wb") as fh:
            fh.write(data)
        return path


def read_jsonl_parts(paths: Iterable[Path]) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` for every line of JSONL part files (``where`` = ``file:line``)."""
    for path in paths:
        yield from read_jsonl(path, RunError)


# --------------------------------------------------------------------------------------------
# the job protocol and its Lightning pieces
# --------------------------------------------------------------------------------------------


class Job:
    """What a job adds to the run layer. Subclasses set the class attributes and implement
    :meth:`plan`, :meth:`done`, :meth:`encode_part` and :meth:`merge`."""

    name = ""  # the command: leverlm <name>
    unit, units = "item", "items"  # what the progress bar counts
    part_ext = "jsonl"
    results: tuple[str, ...] = ()  # merged files / folders, deleted by --overwrite
    part_size = 1  # work items per part file

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"leverlm.{self.name}")

    def add_arguments(self, parser: Any) -> None:
        """Job options beside --out/--overwrite/--cpu_threads/--progress_bar."""

    def plan(self, cfg: dict[str, Any]) -> RunHeader:
        """Check the config and inputs (small files only, no model) -> the run header."""
        raise NotImplementedError

    def done(self, run: RunDir) -> set[Any]:
        """The work items already finished in ``run``'s part files."""
        raise NotImplementedError

    def encode_part(self, outputs: list[Any]) -> bytes:
        """The bytes of a part file holding these predict-step outputs."""
        raise NotImplementedError

    def count(self, output: Any) -> int:
        """Work items finished by one predict-step output (for progress and part sizes)."""
        return len(output)

    def remaining(self, run: RunDir, header: RunHeader) -> int:
        """How many work items of the run are not done yet."""
        return len(set(_keys(header.items)) - set(_keys(self.done(run))))

    def merge(self, run: RunDir) -> Any:
        """Merge the part files of a complete run into the final results (rank 0)."""
        raise NotImplementedError

    def after_merge(self, run: RunDir, result: Any, trainer: Any) -> None:
        """Report / log the merged results (``trainer`` is None for ``leverlm X merge``)."""

    def progress_metrics(self, output: Any) -> dict[str, float]:
        """Extra metrics logged per batch (e.g. score statistics)."""
        return {}


def _lightning() -> Any:
    import lightning.pytorch as pl

    return pl


def make_part_writer(job: Job, run: RunDir, header: RunHeader, overwrite: bool) -> Any:
    """The callback that prepares the run folder, tells the datamodule what is done, and writes
    each rank's outputs as part files (``job.part_size`` items each, flushed at the end and on
    an exception: finished work is never lost to a crash)."""
    pl = _lightning()

    class PartWriter(pl.Callback):
        def __init__(self) -> None:
            self.buffer: list[Any] = []
            self.buffered = self.written = self.seq = self.rank = 0

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self.rank = trainer.global_rank
            if trainer.is_global_zero:
                run.prepare(header, overwrite)
            trainer.strategy.barrier(f"{job.name}-prepare")
            done = job.done(run)
            dm = trainer.datamodule
            dm.skip(done)
            job.log.info(
                "rank %d: skipped %d %s already done, %d to do on this rank",
                self.rank, len(done), job.units, dm.rank_count,
            )  # fmt: skip
            self.seq = run.next_seq(self.rank)

        def flush(self) -> None:
            if self.buffer:
                run.write_part(self.rank, self.seq, job.encode_part(self.buffer), job.part_ext)
                self.seq += 1
                self.written += self.buffered
                self.buffer, self.buffered = [], 0

        def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:  # fmt: skip
            if outputs is None:
                return
            self.buffer.append(outputs)
            self.buffered += job.count(outputs)
            if self.buffered >= job.part_size:
                self.flush()

        def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
            self.flush()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self.flush()

    return PartWriter()


def make_progress(job: Job, enable_bar: bool) -> Any:
    """Rank 0: a progress bar in the job's units, and throughput (+ job metrics) logged."""
    pl = _lightning()

    class Progress(pl.Callback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.done, self.start = 0, 0.0

        def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
            self.done, self.start = 0, time.perf_counter()
            if trainer.is_global_zero and enable_bar:
                from tqdm.auto import tqdm

                desc = f"{job.name} {job.units}" + (" (rank 0)" if trainer.world_size > 1 else "")
                total = trainer.datamodule.rank_count
                self.bar = tqdm(total=total, desc=desc, unit=job.unit, dynamic_ncols=True)

        @property
        def rate(self) -> float:
            elapsed = time.perf_counter() - self.start
            return self.done / elapsed if elapsed > 0 else 0.0

        def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:  # fmt: skip
            n = job.count(outputs) if outputs is not None else 0
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            if trainer.is_global_zero and trainer.loggers and n:
                metrics = {f"{job.name}/{job.units}_per_s": self.rate,
                           f"{job.name}/{job.units}_done": float(self.done)}  # fmt: skip
                metrics |= job.progress_metrics(outputs)
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=self.done)

        def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            job.log.info(
                "rank %d: %d %s in %.1fs (%.3f/s)",
                trainer.global_rank, self.done, job.units,
                time.perf_counter() - self.start, self.rate,
            )  # fmt: skip

    return Progress()


def default_logger(out: str | os.PathLike, project: str, config: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """wandb under ``OUT/logs``, offline unless an API key is configured (an explicit
    ``WANDB_MODE`` wins), with the resolved config."""
    from lightning.pytorch.loggers import WandbLogger

    save_dir = Path(out) / LOGS
    save_dir.mkdir(parents=True, exist_ok=True)
    offline = not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY")
    logger = WandbLogger(project=project, save_dir=str(save_dir), offline=offline)
    if config:
        logger.log_hyperparams(config)
    return logger


def set_threads(cpu_threads: int | None) -> None:
    """torch intra-op CPU threads: ``cpu_threads``, else ``$LEVERLM_THREADS``, else torch's."""
    if cpu_threads is not None and cpu_threads < 1:
        raise LeverError(f"--cpu_threads={cpu_threads} must be >= 1")
    threads = cpu_threads or int(os.environ.get("LEVERLM_THREADS", 0) or 0)
    if threads:
        import torch

        torch.set_num_threads(threads)


def device_kind(accelerator: Any) -> str:
    """``cpu`` or ``cuda`` (or another torch device type) as Lightning resolves ``accelerator``."""
    name = str(accelerator or "auto").lower()
    if name in ("auto", "gpu", "cuda"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def is_launcher_rank() -> bool:
    """True in the process that owns the run (global rank 0 as set by DDP launchers)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def run_job(job: Job, module_cls: type, datamodule_cls: type, argv: list[str]) -> int:
    """``leverlm <job> predict ...`` (LightningCLI) or ``leverlm <job> merge --out DIR``."""
    import warnings

    if argv and argv[0] == "merge":
        return merge_command(job, argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(job_usage(job))
        return 0
    if argv[0] != "predict":
        raise LeverError(
            f"unknown subcommand {argv[0]!r} of `leverlm {job.name}`; "
            f"run `leverlm {job.name} predict --help` or `leverlm {job.name} merge --help`"
        )
    # `leverlm X ...` passes its argv explicitly while sys.argv holds the whole command
    # (which DDP launchers re-run); Lightning warns about that pairing, harmlessly here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    # Batches carry their own keys; Lightning's batch-index tracking is not needed.
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__`")
    job.locked = None
    try:
        cli = _job_cli_class(job)(
            module_cls,
            datamodule_cls,
            args=argv[1:],
            parser_kwargs={"parser_mode": "omegaconf", "prog": f"leverlm {job.name} predict"},
            save_config_callback=None,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            run=False,
            subclass_mode_model=False,
        )
        return cli.run_predict()
    finally:  # also when building the model or data failed: the folder is free again
        if job.locked is not None:
            job.locked.unlock()


def job_usage(job: Job) -> str:
    return (
        f"usage: leverlm {job.name} predict --config CONFIG.yaml --out DIR [options]\n"
        f"       leverlm {job.name} merge --out DIR\n\n"
        f"  predict  run the job (resumes an unfinished run in --out)\n"
        f"  merge    merge the part files of a finished run in --out\n\n"
        f"Run `leverlm {job.name} predict --help` for every option."
    )


def merge_command(job: Job, argv: list[str]) -> int:
    """``leverlm <job> merge --out DIR``: merge a finished run on its own."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=f"leverlm {job.name} merge", description="merge the part files of a finished run"
    )
    parser.add_argument(
        "--out", required=True, help=f"the folder given to `leverlm {job.name} predict`"
    )
    args = parser.parse_args(argv)
    run = RunDir(args.out, job.results)
    if run.header() is None:
        raise RunError(f"{run.path / HEADER}: no run header; nothing to merge")
    result = job.merge(run)
    job.after_merge(run, result, None)
    return 0


def _job_cli_class(job: Job) -> type:
    from lightning.pytorch.cli import LightningCLI

    class JobCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument("--out", type=str | None, default=None, help="the run folder")
            parser.add_argument(
                "--overwrite", type=bool, default=False,
                help="delete the results in --out (of any run) and start over, instead of "
                "resuming (same run) or refusing (another run)",
            )  # fmt: skip
            parser.add_argument("--progress_bar", type=bool, default=True, help="progress bar")
            parser.add_argument(
                "--cpu_threads", type=int | None, default=None,
                help="torch intra-op CPU threads (default: $LEVERLM_THREADS or torch's choice)",
            )  # fmt: skip
            parser.set_defaults({"trainer.enable_progress_bar": False})
            job.add_arguments(parser)

        def before_instantiate_classes(self) -> None:
            cfg = self.config
            set_threads(cfg["cpu_threads"])
            if not cfg["out"]:
                raise LeverError(f"no output folder: pass --out DIR to `leverlm {job.name}`")
            self.run_dir = RunDir(cfg["out"], job.results)
            self.run_dir.check_writable()
            self.header = job.plan(_plain(cfg))
            # CPU and GPU kernels round differently: a run resumes on the same kind of device.
            self.header.config["device"] = device_kind(cfg["trainer"]["accelerator"])
            status = self.run_dir.status(self.header, cfg["overwrite"])
            if is_launcher_rank():
                self.run_dir.lock()
                job.locked = self.run_dir
                job.log.info(
                    "%d %s, run %s..., output %s (%s)",
                    len(self.header.items), job.units, self.header.sha256[:12],
                    self.run_dir.path, status,
                )  # fmt: skip

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            cfg = self.config
            if cfg["trainer"].get("logger") in (None, True):
                kwargs["logger"] = default_logger(cfg["out"], f"leverlm-{job.name}", _plain(cfg))
            callbacks = list(self._get(self.config_init, "trainer", {}).get("callbacks") or [])
            callbacks += [
                make_part_writer(job, self.run_dir, self.header, cfg["overwrite"]),
                make_progress(job, cfg["progress_bar"]),
            ]
            kwargs["callbacks"] = callbacks
            return super().instantiate_trainer(**kwargs)

        def run_predict(self) -> int:
            try:
                self.trainer.predict(
                    self.model, datamodule=self.datamodule, return_predictions=False
                )
                trainer = self.trainer
                trainer.strategy.barrier(f"{job.name}-merge")
                if not trainer.is_global_zero:
                    return 0
                missing = job.remaining(self.run_dir, self.header)
                if missing:
                    raise Unfinished(
                        f"{missing} {job.units} of "
                        f"{self.run_dir.path} are not done yet (stopped early); rerun the same "
                        "command to finish them"
                    )
                result = job.merge(self.run_dir)
                job.after_merge(self.run_dir, result, trainer)
                job.log.info("results written to %s", self.run_dir.path)
                return 0
            finally:
                if is_launcher_rank():
                    self.run_dir.unlock()

    return JobCLI


def _keys(items: Iterable[Any]) -> Iterator[Any]:
    """Hashable forms of work items (JSON lists become tuples)."""
    for item in items:
        yield tuple(item) if isinstance(item, list) else item


def _plain(cfg: Any) -> dict[str, Any]:
    """A jsonargparse namespace as plain dicts (what a job's plan and the logger get), without
    the parser's bookkeeping (``config``, the ``__path__`` of included config files)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k != "__path__"}
        return value

    obj = clean(cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg))
    obj.pop("config", None)
    return obj


__all__ = [
    "HEADER",
    "Job",
    "RunDir",
    "RunError",
    "RunHeader",
    "default_logger",
    "describe_change",
    "file_fingerprint",
    "folder_fingerprint",
    "input_fingerprint",
    "is_launcher_rank",
    "make_part_writer",
    "make_progress",
    "read_jsonl_parts",
    "run_job",
]
