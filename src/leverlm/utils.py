"""Small shared helpers: atomic writes, JSON lines, hashing, seeding, thread settings, quiet
logs."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from leverlm.errors import LeverError


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kw: Any) -> Iterator[Any]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``.

    A crash (or exception) leaves ``path`` untouched and no temp file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; a finished file gets the usual permissions (0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with open(tmp, mode, **kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kw: Any) -> None:
    """Write JSON atomically (sorted keys by default, so equal objects give equal bytes)."""
    dump_kw.setdefault("indent", 2)
    dump_kw.setdefault("sort_keys", True)
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, **dump_kw)
        fh.write("\n")


def atomic_replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a completed temp folder into place (replacing an existing one)."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def read_jsonl(
    path: str | os.PathLike, error: type[Exception] = LeverError
) -> Iterator[tuple[str, Any]]:
    """The values of a JSON-lines file with their place: ``("file:line", value)`` per line.

    Blank lines are skipped; a line that is not JSON raises ``error`` naming ``file:line``.
    """
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                where = f"{path}:{lineno}"
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise error(f"{where}: not valid JSON ({err.msg})") from None
                yield where, value


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def set_cpu_threads(n: int | None = None) -> None:
    """Cap torch CPU threads (default: ``LEVERLM_THREADS`` or all cores)."""
    import torch

    n = n or int(os.environ.get("LEVERLM_THREADS", "0") or 0) or os.cpu_count() or 1
    torch.set_num_threads(max(1, n))


def setup_logging() -> None:
    """INFO logs of ``leverlm.*`` on stderr (one line each), unless the application configured
    logging itself."""
    log = logging.getLogger("leverlm")
    log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False


# Lightning's adverts for its cloud services and its hardware/seed notes, logged at INFO by
# every Trainer (the jobs log what they run on and where they write themselves).
_LIGHTNING_TIP = re.compile(
    r"💡 Tip: .*\[lit(logger|models)\]|(GPU|TPU|HPU) available: |Seed set to \d+$"
)
# Raised by wandb because Lightning's WandbLogger always passes the deprecated setting.
_WANDB_ANONYMOUS = re.compile(
    r"(The anonymous setting|Deprecated setting 'anonymous') has no effect"
)


def _not_a_lightning_tip(record: logging.LogRecord) -> bool:
    return not _LIGHTNING_TIP.match(record.getMessage())


def _quiet_wandb(wandb: Any) -> None:
    termwarn = wandb.termwarn
    if getattr(termwarn, "quiet", False):
        return

    def quiet_termwarn(string: str, *args: Any, **kwargs: Any) -> None:
        if not _WANDB_ANONYMOUS.match(string):
            termwarn(string, *args, **kwargs)

    quiet_termwarn.quiet = True  # type: ignore[attr-defined]
    wandb.termwarn = quiet_termwarn


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``fix(module)`` right after the first import of the top-level module ``name``."""

    def __init__(self, name: str, fix: Callable[[Any], None]) -> None:
        self.name, self.fix = name, fix

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_fix(module: Any) -> None:
                exec_module(module)
                self.fix(module)

            spec.loader.exec_module = exec_then_fix  # type: ignore[method-assign]
        return spec


def quiet_third_party() -> None:
    """Silence known third-party noise, each by its exact message: Lightning's "💡 Tip" adverts
    (litlogger, litmodels) and hardware/seed notes, torch's ``LeafSpec`` deprecation (raised
    inside Lightning), wandb's warning about the ``anonymous`` setting and its start/finish
    banners (``WANDB_SILENT``), transformers' weight-loading bars (``HF_HUB_DISABLE_PROGRESS_BARS``;
    both only where the caller did not set them). Imports none of those libraries (wandb is
    fixed when it is first imported); calling it again changes nothing."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings(
        "ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning
    )
    # Lightning's rank-zero helpers log through whichever of these they were last pointed at.
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning_utilities.core.rank_zero",
        "lightning.fabric.utilities.seed",
    ):
        logger = logging.getLogger(name)
        if _not_a_lightning_tip not in logger.filters:
            logger.addFilter(_not_a_lightning_tip)
    if "wandb" in sys.modules:
        _quiet_wandb(sys.modules["wandb"])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("wandb", _quiet_wandb))
