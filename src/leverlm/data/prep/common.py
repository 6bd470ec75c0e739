"""Shared prep machinery: input checks with precise errors, image reading, the write driver.

Every ``prep_*`` function checks its :class:`PrepOptions`, parses and validates its official
files (no output touched), then hands lists of :class:`PrepItem` to :func:`plan_collection`,
which

1. stats the referenced images and hashes the source files -> a *fingerprint*
   (sha256 of the sources' sha256, the image listing (relative name, size) and the options);
2. marks the plan up to date if ``out_dir`` already holds a complete collection with that
   fingerprint, and refuses (:class:`PrepError`) to replace a *different* one unless
   ``overwrite``;

then :func:`write_planned` writes through :class:`~leverlm.data.collection.CollectionWriter`
(temp folder beside the output, fsync, rename), so an error leaves neither a half collection
nor a temp folder.

Image content changes that keep a file's size are not detected by the fingerprint (hashing
every image would make the no-op check as slow as the prep); ``overwrite`` forces a rebuild.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leverlm.data.collection import (
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_SAMPLES,
    MANIFEST,
    Collection,
    CollectionError,
    CollectionWriter,
    SampleRecord,
    check_shard_limits,
    folder_state,
)
from leverlm.errors import LeverError
from leverlm.utils import sha256_file, sha256_json

REENCODE_CHOICES = ("none", "jpg", "png")
VERIFY_CHOICES = ("header", "full")
# PIL format name -> file extension stored in the shard.
_EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
}
_MAX_LISTED_SKIPS = 1000


class PrepError(LeverError):
    """Bad prep input or an output conflict; the message names the file, field and value."""


@dataclass(frozen=True)
class PrepOptions:
    """The options of every ``prep_*`` function (its keywords) and of ``leverlm prep`` (flags).

    Attributes:
        limit: keep a seeded (``limit_seed``) uniform subset of this many samples.
        shard_samples, shard_bytes: the most samples and bytes per shard.
        skip_missing: skip (and count in the manifest) missing or corrupt images instead of
            failing.
        reencode: ``none`` keeps the source bytes; ``jpg``/``png`` decode to RGB and re-encode.
        verify: ``full`` (decode every image: also catches truncated pixel data, so no job
            meets a damaged image later) or ``header`` (PIL identify + verify: catches
            non-images and broken structure, faster).
        overwrite: replace a different existing collection.
        progress: a progress bar and status lines on stderr.
    """

    limit: int | None = None
    limit_seed: int = 0
    shard_samples: int = DEFAULT_SHARD_SAMPLES
    shard_bytes: int = DEFAULT_SHARD_BYTES
    skip_missing: bool = False
    reencode: str = "none"
    verify: str = "full"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        # Checked before any input is read.
        if self.reencode not in REENCODE_CHOICES:
            raise PrepError(f"reencode must be one of {REENCODE_CHOICES}, got {self.reencode!r}")
        if self.verify not in VERIFY_CHOICES:
            raise PrepError(f"verify must be one of {VERIFY_CHOICES}, got {self.verify!r}")
        if self.limit is not None and self.limit < 1:
            raise PrepError(f"limit must be >= 1, got {self.limit}")
        check_shard_limits(self.shard_samples, self.shard_bytes)

    def subset(self, n: int) -> list[int]:
        """Indices 0..n-1, or a seeded uniform subset of ``limit`` of them, kept in order."""
        if self.limit is None or self.limit >= n:
            return list(range(n))
        return sorted(random.Random(self.limit_seed).sample(range(n), self.limit))

    def manifest(self, **source: Any) -> dict[str, Any]:
        """The manifest's ``options`` (hashed into the fingerprint): ``source`` + these."""
        return {
            **source,
            "limit": self.limit,
            "limit_seed": self.limit_seed if self.limit else None,
            "reencode": self.reencode,
            "verify": self.verify,
            "shard_samples": self.shard_samples,
            "shard_bytes": self.shard_bytes,
            "skip_missing": self.skip_missing,
        }

    def reader(self, cache_size: int | None = 16) -> ImageReader:
        return ImageReader(self.reencode, self.verify, cache_size)


@dataclass(frozen=True)
class PrepItem:
    """One sample before its image is read: key, image file, json fields."""

    key: str
    image_path: Path
    fields: dict[str, Any]


def say(message: str, enabled: bool = True) -> None:
    """A status line on stderr (stdout is kept for the CLI's summary)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


# -- input checks -----------------------------------------------------------------------------


def check_dir(path: str | os.PathLike, role: str) -> Path:
    """``path`` as a Path, or PrepError naming the missing folder and what it should be."""
    path = Path(path)
    if not path.is_dir():
        raise PrepError(f"{role} folder not found: {path}")
    return path


def load_json(path: str | os.PathLike, role: str) -> Any:
    """Parse a JSON file; errors name the file and, for bad JSON, the line/column/position."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{role} not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise PrepError(
            f"{path}: malformed JSON ({role}) at line {err.lineno} column {err.colno} "
            f"(char {err.pos}): {err.msg}"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise PrepError(f"{path}: cannot read {role}: {err}") from err


def require(
    record: Any,
    field: str,
    *,
    file: str | os.PathLike,
    record_id: str,
    kind: type | tuple[type, ...] | None = None,
) -> Any:
    """``record[field]``, or PrepError naming the file, the record and the field.

    Args:
        record_id: how to find the record in the file, e.g. ``"question_id 42"`` or
            ``"annotations[7]"``.
        kind: required type(s) of the value (bool is never accepted as int).
    """
    if not isinstance(record, dict):
        raise PrepError(f"{file}: {record_id}: expected an object, got {type(record).__name__}")
    if field not in record:
        raise PrepError(f"{file}: {record_id}: missing field {field!r}")
    value = record[field]
    if kind is not None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool subclasses int, but True is never a valid id or count
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise PrepError(f"{file}: {record_id}: field {field!r} must be {names}, got {value!r}")
    return value


def require_list(obj: Any, field: str, *, file: str | os.PathLike) -> list[Any]:
    """The top-level list ``obj[field]`` of an annotation file, or PrepError naming it."""
    return require(obj, field, file=file, record_id="top level", kind=list)


def numbered(
    obj: Any, list_name: str, id_field: str, *, file: str | os.PathLike, what: str | None = None
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``(id, record id for errors, record)`` of each record of the top-level list
    ``obj[list_name]``; a record without an int ``id_field``, or with a repeated one, is an error.

    Args:
        what: how the duplicate error names the id (default ``id_field``).
    """
    seen: set[int] = set()
    for i, record in enumerate(require_list(obj, list_name, file=file)):
        rid = f"{list_name}[{i}]"
        value = require(record, id_field, file=file, record_id=rid, kind=int)
        rid = f"{rid} ({id_field} {value})"
        if value in seen:
            raise PrepError(f"{file}: {rid}: duplicate {what or id_field} {value}")
        seen.add(value)
        yield value, rid, record


# -- images -----------------------------------------------------------------------------------


class ImageReader:
    """Read image files as stored bytes (checked), or re-encoded; errors name the file.

    Args:
        reencode, verify: as in :class:`PrepOptions` (which checks them).
        cache_size: images kept in memory (LRU) so a file used by several samples, e.g. an
            image with many questions, is read once; None keeps all.
    """

    def __init__(self, reencode: str = "none", verify: str = "full", cache_size: int | None = 16):
        self.reencode, self.verify, self.cache_size = reencode, verify, cache_size
        self._cache: OrderedDict[Path, tuple[bytes, str] | PrepError] = OrderedDict()
        self.files_read = 0

    def read(self, path: Path) -> tuple[bytes, str]:
        """``(image bytes, extension)`` of ``path``; PrepError if missing, unreadable or corrupt."""
        hit = self._cache.get(path)
        if hit is not None:
            self._cache.move_to_end(path)
        else:
            try:
                hit = self._load(path)
            except PrepError as err:
                hit = err
            self._cache[path] = hit
            if self.cache_size is not None and len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if isinstance(hit, PrepError):
            raise hit
        return hit

    def _load(self, path: Path) -> tuple[bytes, str]:
        from PIL import Image, UnidentifiedImageError

        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise PrepError(f"image not found: {path}") from None
        except OSError as err:
            raise PrepError(f"cannot read image {path}: {err}") from err
        self.files_read += 1
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format or ""
                im.verify()
            if self.verify == "full" or self.reencode != "none":
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    if self.reencode != "none":
                        out = io.BytesIO()
                        rgb = im.convert("RGB")
                        if self.reencode == "jpg":
                            rgb.save(out, format="JPEG", quality=95)
                        else:
                            rgb.save(out, format="PNG")
                        return out.getvalue(), self.reencode
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            # PIL reports broken files as any of these (SyntaxError from some plugins' verify).
            raise PrepError(f"corrupt or unsupported image {path}: {err}") from err
        return data, _EXTENSIONS.get(fmt, fmt.lower() or "bin")


# -- the write driver -------------------------------------------------------------------------


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.name


def _options_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs) if diffs else "source files or images changed"


@dataclass
class CollectionPlan:
    """What :func:`plan_collection` decided for one output: its fingerprint and whether to write."""

    items: Sequence[PrepItem]
    out_dir: Path
    name: str
    task: str
    split: str
    image_root: Path | None
    prep: PrepOptions
    options: dict[str, Any]
    fingerprint: str
    source_info: list[dict[str, Any]]
    sizes: dict[Path, int | None]
    listing: list[tuple[str, int | None]]
    up_to_date: bool = False


def plan_collection(
    items: Sequence[PrepItem],
    *,
    out_dir: str | os.PathLike,
    name: str,
    task: str,
    split: str,
    sources: Sequence[tuple[str, Path]],
    image_root: Path | None,
    options: PrepOptions,
    source_options: dict[str, Any] | None = None,
) -> CollectionPlan:
    """Fingerprint an output and check it can be written; nothing is written here.

    Raises PrepError if ``out_dir`` holds a different collection (or other files) and
    ``options.overwrite`` is off, or if images are missing and ``options.skip_missing`` is off.

    Args:
        sources: ``(role, path)`` of each annotation file read; hashed into the fingerprint.
        image_root: the image folder; listings use names relative to it.
        source_options: what else shapes the output (source format, subtype...); stored in the
            manifest and hashed into the fingerprint with ``options``.
    """
    out_dir = Path(out_dir)
    # 1. fingerprint: sources by content, images by (relative name, size)
    source_info = [
        {"role": role, "path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}
        for role, path in sources
    ]
    sizes: dict[Path, int | None] = {}
    for item in items:
        if item.image_path not in sizes:
            try:
                sizes[item.image_path] = item.image_path.stat().st_size
            except OSError:
                sizes[item.image_path] = None
    listing = [(_relative(p, image_root), s) for p, s in sizes.items()]
    manifest_options = options.manifest(**(source_options or {}))
    fingerprint = sha256_json(
        {
            "name": name,
            "task": task,
            "split": split,
            "sources": [(s["role"], s["sha256"]) for s in source_info],
            "images": sha256_json(listing),
            "options": manifest_options,
        }
    )
    plan = CollectionPlan(
        items,
        out_dir,
        name,
        task,
        split,
        image_root,
        options,
        manifest_options,
        fingerprint,
        source_info,
        sizes,
        listing,
    )
    overwrite = options.overwrite

    # 2. an existing output: up to date, or a conflict
    state = folder_state(out_dir)
    if state == "collection":
        try:
            old = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") == fingerprint:
            try:
                Collection(out_dir)
            except CollectionError as err:
                if not overwrite:
                    raise PrepError(
                        f"{out_dir} has this collection's manifest but is damaged ({err}); "
                        "pass --overwrite to rebuild it"
                    ) from err
            else:
                plan.up_to_date = True
                return plan
        elif not overwrite:
            raise PrepError(
                f"output folder {out_dir} already holds a different collection "
                f"({old.get('name')!r}: {_options_diff(old.get('options', {}), manifest_options)}); "
                "pass --overwrite to replace it"
            )
    elif state == "other" and not overwrite:
        raise PrepError(
            f"output folder {out_dir} exists and is not a collection; "
            "choose another --out or pass --overwrite to replace it"
        )

    # 3. missing images are known now: fail before writing anything
    missing = [p for p, size in sizes.items() if size is None]
    if missing and not options.skip_missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PrepError(f"image not found: {missing[0]}{more}; pass --skip_missing to skip")
    return plan


def write_planned(plan: CollectionPlan, reader: ImageReader) -> Path:
    """Write a planned collection (or say it is up to date); return its path."""
    opts = plan.prep
    if plan.up_to_date:
        say(
            f"{plan.name}: up to date at {plan.out_dir} (same sources and options), nothing to do",
            opts.progress,
        )
        return plan.out_dir
    skipped: list[dict[str, str]] = []
    skipped_count = 0
    try:
        with CollectionWriter(
            plan.out_dir,
            name=plan.name,
            task=plan.task,
            split=plan.split,
            shard_samples=opts.shard_samples,
            shard_bytes=opts.shard_bytes,
            overwrite=opts.overwrite,
        ) as writer:
            iterator: Any = plan.items
            if opts.progress:
                from tqdm.auto import tqdm

                iterator = tqdm(
                    plan.items, desc=f"writing {plan.name}", unit="sample", file=sys.stderr
                )
            for item in iterator:
                try:
                    if plan.sizes[item.image_path] is None:
                        raise PrepError(f"image not found: {item.image_path}")
                    data, ext = reader.read(item.image_path)
                except PrepError as err:
                    if not opts.skip_missing:
                        raise
                    skipped_count += 1
                    if len(skipped) < _MAX_LISTED_SKIPS:
                        skipped.append({"key": item.key, "reason": str(err)})
                    continue
                writer.add(SampleRecord(item.key, data, ext, item.fields))
            if len(writer) == 0:
                raise PrepError(
                    f"{plan.name}: no samples to write "
                    f"({len(plan.items)} selected, {skipped_count} skipped)"
                )
            from leverlm import __version__

            path = writer.commit(
                {
                    "created_by": f"leverlm {__version__}",
                    "fingerprint": plan.fingerprint,
                    "options": plan.options,
                    "sources": plan.source_info,
                    "images": {
                        "root": str(plan.image_root) if plan.image_root is not None else None,
                        "files": len(plan.sizes),
                        "bytes": sum(size or 0 for size in plan.sizes.values()),
                        "missing": sum(size is None for size in plan.sizes.values()),
                        "listing_sha256": sha256_json(plan.listing),
                    },
                    "skipped": {"count": skipped_count, "samples": skipped},
                }
            )
    except CollectionError as err:
        raise PrepError(f"{plan.name}: {err}") from err
    say(
        f"{plan.name}: wrote {len(writer)} samples"
        + (f" (skipped {skipped_count})" if skipped_count else "")
        + f" -> {path}",
        opts.progress,
    )
    return path


def prep_one(
    records: Sequence[dict[str, Any]],
    item: Callable[[dict[str, Any]], PrepItem],
    options: PrepOptions,
    *,
    out_dir: str | os.PathLike,
    what: str,
    **plan: Any,
) -> dict[str, Path]:
    """Write the ``options.limit`` subset of ``records`` (each made a sample by ``item``) as one
    collection; return ``{name: path}``.

    Args:
        what: what a record is (``images``, ``questions``), for the status line.
        plan: the other keywords of :func:`plan_collection`.
    """
    items = [item(records[i]) for i in options.subset(len(records))]
    name = plan["name"]
    say(f"{name}: {len(items)} {what} from {plan['sources'][0][1]}", options.progress)
    planned = plan_collection(items, out_dir=out_dir, options=options, **plan)
    return {name: write_planned(planned, options.reader())}
