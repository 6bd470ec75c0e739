"""Collections: webdataset tar shards + ``manifest.json`` + an offset index, written atomically.

Layout of a collection folder::

    manifest.json      name, task, split, num_samples, fields, shards (size, sha256), sources...
    shard-000000.tar   webdataset shards: per sample ``{key}.{jpg|png|...}`` then ``{key}.json``
    index.npy          per position: shard id, offset/size of the image and json tar members
    keys.txt           one ``__key__`` per line, in position order

Positions are 0..N-1 in manifest order (shard 0 first). The index is written at prep time, so
``Collection(path)[pos]`` is two ``pread`` calls: O(1), no tar scan. The manifest is written
last and the folder is renamed into place only when complete, so a folder with a manifest is a
whole collection.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leverlm.errors import LeverError
from leverlm.utils import atomic_replace_dir, atomic_write_json, fsync_dir, sha256_file

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

FORMAT = "leverlm-collection"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.npy"
KEYS = "keys.txt"
SHARD_PATTERN = "shard-{:06d}.tar"
DEFAULT_SHARD_SAMPLES = 10_000
DEFAULT_SHARD_BYTES = 256 * 1024**2

# The json fields each task's samples must carry (extra fields are allowed).
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "vqa": (
        "question_id",
        "image_id",
        "question",
        "answers",
        "answer",
        "answer_type",
        "question_type",
    ),
    "caption": ("image_id", "file_name", "captions", "caption"),
}
# Names the decoded sample dict uses itself; a json field may not shadow them.
RESERVED_FIELDS = frozenset({"__key__", "__url__", "position", "image", "image_bytes"})

# webdataset splits a member name at its first "." into key and extension, and "/" would make
# a directory: keys are therefore restricted; 90 chars keeps "key.ext" inside a ustar name.
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,89}$")
_EXT_RE = re.compile(r"^[a-z0-9]{1,8}$")


def _index_dtype() -> np.dtype:
    import numpy as np

    return np.dtype(
        [
            ("shard", "<u4"),
            ("image_offset", "<u8"),
            ("image_size", "<u8"),
            ("json_offset", "<u8"),
            ("json_size", "<u8"),
        ]
    )


class CollectionError(LeverError):
    """A folder is not a (complete, valid) collection, or a sample cannot be written to one."""


@dataclass(frozen=True)
class SampleRecord:
    """One sample to write: ``image`` holds the encoded bytes, ``image_ext`` their format."""

    key: str
    image: bytes
    image_ext: str
    fields: dict[str, Any]


def encode_fields(fields: dict[str, Any]) -> bytes:
    """Canonical json bytes of a sample's fields (sorted keys, so equal dicts -> equal bytes)."""
    return json.dumps(fields, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image (fully loaded); a damaged or
    truncated image raises :class:`CollectionError` naming ``what``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise CollectionError(f"{what}: the image cannot be decoded ({err})") from None


def make_sample(
    key: str, position: int, image: bytes, json_bytes: bytes, decode: bool = True, where: str = ""
) -> dict[str, Any]:
    """The sample dict shared by random access and streaming (``where``: its shard, for errors).

    ``decode=False`` keeps the encoded image under ``image_bytes`` instead of ``image``.
    """
    what = f"{where + ': ' if where else ''}sample {key!r}"
    try:
        fields = json.loads(json_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CollectionError(f"{what}: its json fields cannot be read ({err})") from None
    sample: dict[str, Any] = {"__key__": key, "position": position}
    if decode:
        sample["image"] = decode_image(image, what)
    else:
        sample["image_bytes"] = image
    sample.update(fields)
    return sample


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _fsync_close(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


def check_shard_limits(shard_samples: int, shard_bytes: int) -> None:
    """The most samples (>= 1) and bytes (>= 1024) per shard, or CollectionError."""
    if shard_samples < 1:
        raise CollectionError(f"shard_samples must be >= 1, got {shard_samples}")
    if shard_bytes < 1024:
        raise CollectionError(f"shard_bytes must be >= 1024, got {shard_bytes}")


def folder_state(path: str | os.PathLike) -> str:
    """What a would-be output folder holds: ``missing``, ``empty``, ``collection`` or ``other``."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "other"
    if not any(path.iterdir()):
        return "empty"
    return "collection" if (path / MANIFEST).is_file() else "other"


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar pads an archive to a multiple of its 10 KiB record size


def ustar_header(name: str, size: int) -> bytes:
    """A ustar header for a regular file with fixed metadata (mode 644, uid/gid 0, mtime 0).

    Byte-identical to what ``tarfile`` writes for the same TarInfo in USTAR_FORMAT (the
    parity test checks this); built directly because tarfile's generic header code dominated
    prep time (~60% for small images).
    """
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise CollectionError(f"tar member name longer than 100 bytes: {name!r}")
    if size >= 8**11:
        raise CollectionError(f"tar member {name!r} too large for a ustar header: {size} bytes")
    zero8 = b"0000000\0"
    header = b"".join(
        [
            raw.ljust(100, b"\0"),
            b"0000644\0",  # mode
            zero8,  # uid
            zero8,  # gid
            b"%011o\0" % size,
            b"00000000000\0",  # mtime
            b" " * 8,  # checksum placeholder (spaces while summing)
            b"0",  # regular file
            b"\0" * 100,  # linkname
            b"ustar\x0000",  # magic + version
            b"\0" * 32,  # uname
            b"\0" * 32,  # gname
            b"\0" * 16,  # devmajor, devminor: empty for regular files
            b"\0" * 155,  # prefix
            b"\0" * 12,
        ]
    )
    checksum = sum(header)
    return header[:148] + b"%06o\0 " % checksum + header[156:]


class _ShardFile:
    """Append-only ustar writer (fast path): header + data + zero padding per member."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.size = 0

    def add(self, name: str, data: bytes) -> int:
        """Append a member; return the offset of its data."""
        pad = -len(data) % _BLOCK
        self._fh.write(ustar_header(name, len(data)))
        self._fh.write(data)
        if pad:
            self._fh.write(b"\0" * pad)
        offset = self.size + _BLOCK
        self.size = offset + len(data) + pad
        return offset

    def close(self, sync: bool = True) -> None:
        end = self.size + 2 * _BLOCK
        self._fh.write(b"\0" * (2 * _BLOCK + (-end % _RECORD)))
        if sync:
            _fsync_close(self._fh)
        else:
            self._fh.close()


class _TarfileShard:
    """Reference path: the same shard written by ``tarfile`` (slow; used by parity tests)."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    @property
    def size(self) -> int:
        return self._fh.tell()

    def add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
        self._tar.addfile(info, io.BytesIO(data))
        self._tar.members.clear()  # tarfile keeps every TarInfo otherwise (memory grows)
        return self._fh.tell() - len(data) - (-len(data) % _BLOCK)

    def close(self, sync: bool = True) -> None:
        self._tar.close()
        if sync:
            _fsync_close(self._fh)
        else:
            self._fh.close()


_OWNER = ".owner"  # inside a temp folder: "host pid" of the writer, for stale-folder cleanup


def _make_temp_dir(out_dir: Path) -> Path:
    """A fresh hidden folder beside ``out_dir`` (unlike mkdtemp's 0700, it honours the umask)."""
    for _ in range(100):
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        (tmp / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        return tmp
    raise CollectionError(f"cannot create a temp folder beside {out_dir}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Delete temp folders of ``out_dir`` left by killed writers on this host; return them.

    A folder counts as stale only if its owner file names this host and a process that no
    longer exists, so a concurrent writer's folder is never touched.
    """
    out_dir = Path(out_dir)
    removed = []
    host = socket.gethostname()
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            owner_host, pid = (tmp / _OWNER).read_text().split()
            stale = owner_host == host and not _pid_alive(int(pid))
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


class CollectionWriter:
    """Write samples into a temp folder beside ``out_dir``; :meth:`commit` renames it into place.

    Use as a context manager: an exception inside the block removes the temp folder, so
    nothing half-written is ever left at ``out_dir`` (nor beside it).

    Args:
        shard_samples: start a new shard after this many samples.
        shard_bytes: start a new shard before a sample would push the shard past this size
            (a shard always holds at least one sample; tar's final record padding of up to
            10 KiB is not counted).
        overwrite: replace an existing non-empty ``out_dir`` at commit; otherwise it is an error.
        reference_tar: write shards with ``tarfile`` instead of the fast header writer
            (byte-identical output; for parity tests).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        name: str,
        task: str,
        split: str,
        shard_samples: int = DEFAULT_SHARD_SAMPLES,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        reference_tar: bool = False,
    ) -> None:
        if task not in TASK_FIELDS:
            raise CollectionError(f"unknown task {task!r} (known: {sorted(TASK_FIELDS)})")
        check_shard_limits(shard_samples, shard_bytes)
        if not name or "/" in name:
            raise CollectionError(f"invalid collection name {name!r}")
        self.out_dir = Path(out_dir)
        self.name, self.task, self.split = name, task, split
        self.shard_samples, self.shard_bytes = shard_samples, shard_bytes
        self.overwrite = overwrite
        state = folder_state(self.out_dir)
        if state in ("other", "collection") and not overwrite:
            raise CollectionError(
                f"output folder {self.out_dir} already exists and is not empty "
                "(pass overwrite=True / --overwrite to replace it)"
            )
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        # A killed earlier run may have left a (possibly huge) temp folder: reclaim it.
        remove_stale_temp_dirs(self.out_dir)
        self.tmp_dir = _make_temp_dir(self.out_dir)
        self._keys: list[str] = []
        self._seen: set[str] = set()
        self._rows: list[tuple[int, int, int, int, int]] = []
        self._fields: list[str] | None = None
        self._shards: list[dict[str, Any]] = []
        self._shard_cls = _TarfileShard if reference_tar else _ShardFile
        self._shard: _ShardFile | _TarfileShard | None = None
        self._shard_count = 0
        self._done = False

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> CollectionWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or not self._done:
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far (the temp folder); ``out_dir`` is untouched."""
        if self._shard is not None:
            with contextlib.suppress(Exception):
                self._shard.close(sync=False)
            self._shard = None
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._done = True

    # -- samples ------------------------------------------------------------------------------
    def _check(self, record: SampleRecord) -> bytes:
        key = record.key
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise CollectionError(
                f"invalid sample key {key!r}: use 1-90 characters from [A-Za-z0-9_-], "
                "starting with a letter or digit (no '.' or '/': webdataset splits on them)"
            )
        if key in self._seen:
            raise CollectionError(f"duplicate sample key {key!r} in collection {self.name!r}")
        if not _EXT_RE.match(record.image_ext or ""):
            raise CollectionError(f"sample {key!r}: invalid image extension {record.image_ext!r}")
        if not isinstance(record.image, bytes | bytearray) or not record.image:
            raise CollectionError(f"sample {key!r}: image must be non-empty bytes")
        fields = record.fields
        shadowed = RESERVED_FIELDS.intersection(fields)
        if shadowed:
            raise CollectionError(f"sample {key!r}: reserved field name(s) {sorted(shadowed)}")
        missing = [f for f in TASK_FIELDS[self.task] if f not in fields]
        if missing:
            raise CollectionError(
                f"sample {key!r}: task {self.task!r} needs field(s) {missing} "
                f"(has {sorted(fields)})"
            )
        names = sorted(fields)
        if self._fields is None:
            self._fields = names
        elif names != self._fields:
            raise CollectionError(
                f"sample {key!r}: fields {names} differ from the collection's {self._fields}"
            )
        try:
            return encode_fields(fields)
        except (TypeError, ValueError) as err:
            raise CollectionError(
                f"sample {key!r}: fields are not JSON-serialisable: {err}"
            ) from err

    def _open_shard(self) -> None:
        path = self.tmp_dir / SHARD_PATTERN.format(self._shard_count)
        self._shard = self._shard_cls(path)
        self._shards.append(
            {"file": path.name, "num_samples": 0, "first_position": len(self._keys)}
        )
        self._shard_count += 1

    def _close_shard(self) -> None:
        assert self._shard is not None
        self._shard.close()
        self._shard = None
        info = self._shards[-1]
        path = self.tmp_dir / info["file"]
        info["size"] = path.stat().st_size
        info["sha256"] = sha256_file(path)

    def add(self, record: SampleRecord) -> int:
        """Append a sample; return its position."""
        if self._done:
            raise CollectionError("writer is already committed or aborted")
        json_bytes = self._check(record)
        if self._shard is not None:
            shard = self._shards[-1]
            # two 512-byte headers, padding, and the end-of-archive blocks
            size_after = self._shard.size + len(record.image) + len(json_bytes) + 4 * _BLOCK
            if shard["num_samples"] >= self.shard_samples or size_after > self.shard_bytes:
                self._close_shard()
        if self._shard is None:
            self._open_shard()
        assert self._shard is not None
        shard_id = self._shard_count - 1
        image = bytes(record.image)
        image_offset = self._shard.add(f"{record.key}.{record.image_ext}", image)
        json_offset = self._shard.add(f"{record.key}.json", json_bytes)
        self._rows.append((shard_id, image_offset, len(image), json_offset, len(json_bytes)))
        self._keys.append(record.key)
        self._seen.add(record.key)
        self._shards[-1]["num_samples"] += 1
        return len(self._keys) - 1

    def __len__(self) -> int:
        return len(self._keys)

    def commit(self, extra_manifest: dict[str, Any] | None = None) -> Path:
        """Finish shards, index, keys and manifest; move the folder into place; return its path.

        Args:
            extra_manifest: more manifest entries (sources, options, fingerprint...); they may
                not replace the core entries this writer owns.
        """
        import numpy as np

        if self._done:
            raise CollectionError("writer is already committed or aborted")
        try:
            if self._shard is not None:
                self._close_shard()
            if not self._keys:
                raise CollectionError(f"collection {self.name!r} would be empty: no samples")
            index = np.array(self._rows, dtype=_index_dtype())
            with open(self.tmp_dir / INDEX, "wb") as fh:
                np.save(fh, index, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            with open(self.tmp_dir / KEYS, "w", encoding="utf-8", newline="\n") as fh:
                fh.write("".join(k + "\n" for k in self._keys))
                fh.flush()
                os.fsync(fh.fileno())
            manifest: dict[str, Any] = {
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "name": self.name,
                "task": self.task,
                "split": self.split,
                "num_samples": len(self._keys),
                "fields": self._fields,
                "shards": self._shards,
                "index": {
                    "file": INDEX,
                    "size": (self.tmp_dir / INDEX).stat().st_size,
                    "sha256": sha256_file(self.tmp_dir / INDEX),
                },
                "keys": {
                    "file": KEYS,
                    "size": (self.tmp_dir / KEYS).stat().st_size,
                    "sha256": sha256_file(self.tmp_dir / KEYS),
                },
            }
            clash = set(manifest).intersection(extra_manifest or {})
            if clash:
                raise CollectionError(f"extra manifest entries may not replace {sorted(clash)}")
            manifest.update(extra_manifest or {})
            with open(self.tmp_dir / MANIFEST, "w", encoding="utf-8") as fh:
                json.dump(manifest, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            (self.tmp_dir / _OWNER).unlink()
            fsync_dir(self.tmp_dir)
            # Re-check at the last moment: another process may have written out_dir meanwhile.
            state = folder_state(self.out_dir)
            if state in ("collection", "other") and not self.overwrite:
                raise CollectionError(
                    f"output folder {self.out_dir} appeared while writing; not replacing it"
                )
            atomic_replace_dir(self.tmp_dir, self.out_dir)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.out_dir


def write_collection(
    out_dir: str | os.PathLike,
    records: Iterable[SampleRecord],
    *,
    name: str,
    task: str,
    split: str,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    extra_manifest: dict[str, Any] | None = None,
    progress: bool = False,
    total: int | None = None,
) -> Path:
    """Write ``records`` (in position order) as a collection at ``out_dir``; return the path.

    Atomic: on any error (also one raised by the ``records`` iterator) nothing is left behind.

    Args:
        progress: show a tqdm bar on stderr (``total``: its expected length).
    """
    with CollectionWriter(
        out_dir,
        name=name,
        task=task,
        split=split,
        shard_samples=shard_samples,
        shard_bytes=shard_bytes,
        overwrite=overwrite,
    ) as writer:
        if progress:
            from tqdm.auto import tqdm

            records = tqdm(records, total=total, desc=f"writing {name}", unit="sample")
        for record in records:
            writer.add(record)
        return writer.commit(extra_manifest)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check ``path/manifest.json`` (raises CollectionError naming the problem)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise CollectionError(f"{path} is not a collection: no such folder")
    if not mpath.is_file():
        raise CollectionError(
            f"{path} is not a complete collection: {MANIFEST} is missing "
            "(a prep that did not finish leaves no manifest; rerun `leverlm prep`)"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CollectionError(f"{mpath}: unreadable manifest: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CollectionError(f"{mpath}: not a {FORMAT} manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CollectionError(
            f"{mpath}: schema_version {manifest.get('schema_version')!r} is not supported "
            f"(this leverlm reads {SCHEMA_VERSION}); rerun `leverlm prep`"
        )
    for field in ("name", "task", "split", "num_samples", "shards", "index", "keys", "fields"):
        if field not in manifest:
            raise CollectionError(f"{mpath}: manifest has no {field!r} entry")
    return manifest


class Collection:
    """Random access to a collection by position (O(1) via the offset index).

    ``Collection(path)[pos]`` -> ``{"__key__", "position", "image": PIL RGB, **json_fields}``.
    Safe to share between threads (``os.pread`` has no shared file position) and across fork /
    pickling (file descriptors are per process: reopened lazily after a fork, e.g. in
    DataLoader workers, and dropped when pickled).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        self._check_files()
        self._init_process_state()
        self._index: np.ndarray | None = None
        self._keys: list[str] | None = None
        self._positions: dict[str, int] | None = None

    def _check_files(self) -> None:
        m = self.manifest
        total = 0
        for shard in m["shards"]:
            spath = self.path / shard["file"]
            if not spath.is_file():
                raise CollectionError(f"{self.path} is incomplete: shard {shard['file']} missing")
            if spath.stat().st_size != shard["size"]:
                raise CollectionError(
                    f"{spath}: size {spath.stat().st_size} != {shard['size']} in the manifest "
                    "(truncated or replaced shard)"
                )
            total += shard["num_samples"]
        if total != m["num_samples"]:
            raise CollectionError(
                f"{self.path / MANIFEST}: shard sample counts sum to {total}, "
                f"num_samples says {m['num_samples']}"
            )
        for entry in (m["index"], m["keys"]):
            fpath = self.path / entry["file"]
            if not fpath.is_file() or fpath.stat().st_size != entry["size"]:
                raise CollectionError(f"{self.path} is incomplete: {entry['file']} missing/resized")

    # -- process-local state --------------------------------------------------------------------
    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}

    def _fd(self, shard_id: int) -> int:
        if self._pid != os.getpid():
            # Forked child (DataLoader worker): the inherited descriptors belong to the parent's
            # bookkeeping; close our copies and open fresh ones.
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._init_process_state()
        fd = self._fds.get(shard_id)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard_id)
                if fd is None:
                    fd = os.open(self.path / self.manifest["shards"][shard_id]["file"], os.O_RDONLY)
                    self._fds[shard_id] = fd
        return fd

    def close(self) -> None:
        """Close this process's open shard files (they reopen on the next access)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds = {}

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_fds", "_pid", "_index", "_positions"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()
        self._index = None
        self._positions = None

    # -- metadata -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def split(self) -> str:
        return self.manifest["split"]

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def __repr__(self) -> str:
        return (
            f"Collection({str(self.path)!r}, name={self.name!r}, task={self.task!r}, n={len(self)})"
        )

    @property
    def index(self) -> np.ndarray:
        """The offset index (structured array, one row per position), memory-mapped."""
        if self._index is None:
            import numpy as np

            index = np.load(self.path / INDEX, mmap_mode="r", allow_pickle=False)
            if index.dtype != _index_dtype() or index.shape != (len(self),):
                raise CollectionError(
                    f"{self.path / INDEX}: expected {len(self)} rows of {_index_dtype()}, "
                    f"got shape {index.shape} dtype {index.dtype}"
                )
            self._index = index
        return self._index

    @property
    def keys(self) -> list[str]:
        """Sample keys in position order."""
        if self._keys is None:
            keys = (self.path / KEYS).read_text(encoding="utf-8").splitlines()
            if len(keys) != len(self):
                raise CollectionError(
                    f"{self.path / KEYS}: {len(keys)} keys for {len(self)} samples"
                )
            self._keys = keys
        return self._keys

    def position_of(self, key: str) -> int:
        """Position of the sample with ``__key__ == key`` (KeyError naming the key if absent)."""
        if self._positions is None:
            self._positions = {k: i for i, k in enumerate(self.keys)}
        try:
            return self._positions[key]
        except KeyError:
            raise KeyError(
                f"key {key!r} is not in collection {self.name!r} ({self.path})"
            ) from None

    # -- samples --------------------------------------------------------------------------------
    def _row(self, pos: int) -> Any:
        if isinstance(pos, bool) or not hasattr(pos, "__index__"):
            raise TypeError(f"position must be an int, got {type(pos).__name__}")
        pos = pos.__index__()
        if not 0 <= pos < len(self):
            raise IndexError(
                f"position {pos} out of range for collection {self.name!r} with {len(self)} samples"
            )
        return self.index[pos]

    def _pread(self, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise CollectionError(
                f"{self.path / self.manifest['shards'][shard]['file']}: short read at offset "
                f"{offset} ({len(data)} of {size} bytes): shard truncated?"
            )
        return data

    def fields(self, pos: int) -> dict[str, Any]:
        """The json fields of a sample (no image read or decoded)."""
        row = self._row(pos)
        return json.loads(
            self._pread(int(row["shard"]), int(row["json_offset"]), int(row["json_size"]))
        )

    def all_fields(self) -> list[dict[str, Any]]:
        """The json fields of every sample, in position order (a fresh list each call)."""
        return [self.fields(pos) for pos in range(len(self))]

    def image_bytes(self, pos: int) -> bytes:
        """The encoded image bytes exactly as stored."""
        row = self._row(pos)
        return self._pread(int(row["shard"]), int(row["image_offset"]), int(row["image_size"]))

    def image(self, pos: int) -> Image.Image:
        """The decoded RGB image of a sample."""
        return decode_image(self.image_bytes(pos), f"{self.path}: sample {self.keys[pos]!r}")

    def sample(self, pos: int, decode: bool = True) -> dict[str, Any]:
        """The full sample dict (``decode=False``: ``image_bytes`` instead of ``image``)."""
        row = self._row(pos)
        shard = int(row["shard"])
        image = self._pread(shard, int(row["image_offset"]), int(row["image_size"]))
        js = self._pread(shard, int(row["json_offset"]), int(row["json_size"]))
        where = str(self.path / self.manifest["shards"][shard]["file"])
        return make_sample(self.keys[pos], int(pos), image, js, decode, where)

    def __getitem__(self, pos: int) -> dict[str, Any]:
        return self.sample(pos)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for pos in range(len(self)):
            yield self.sample(pos)

    def shard_paths(self) -> list[Path]:
        """Shard files in manifest order."""
        return [self.path / s["file"] for s in self.manifest["shards"]]

    def verify(self, cache: bool = True) -> None:
        """Check every file's sha256 against the manifest, naming the first that differs.

        With ``cache``, a file whose checksum matched once is not read again while its path,
        size and mtime stay the same (a stamp under ``$XDG_CACHE_HOME/leverlm``): a job pays
        for reading a collection once, not on every run.
        """
        m = self.manifest
        stamps = _VerifiedStamps() if cache else None
        for entry in [*m["shards"], m["index"], m["keys"]]:
            path = self.path / entry["file"]
            if stamps is not None and stamps.known(path, entry["sha256"]):
                continue
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise CollectionError(
                    f"{path}: its content does not match the collection manifest (sha256 "
                    f"{digest[:12]}... != {str(entry['sha256'])[:12]}...): the shard was changed or "
                    "damaged after `leverlm prep`; prepare the collection again"
                )
            if stamps is not None:
                stamps.add(path, entry["sha256"])
        if stamps is not None:
            stamps.save()


class _VerifiedStamps:
    """Files whose sha256 matched their manifest: ``realpath -> [size, mtime_ns, sha256]``."""

    def __init__(self) -> None:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        self.path = Path(root) / "leverlm" / "verified-files.json"
        try:
            self.stamps: dict[str, list] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.stamps = {}
        self.dirty = False

    @staticmethod
    def _stat(path: Path) -> list:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def known(self, path: Path, sha256: str) -> bool:
        return self.stamps.get(os.path.realpath(path)) == [*self._stat(path), sha256]

    def add(self, path: Path, sha256: str) -> None:
        self.stamps[os.path.realpath(path)] = [*self._stat(path), sha256]
        self.dirty = True

    def save(self) -> None:
        if self.dirty:
            with contextlib.suppress(OSError):  # a read-only home: verify again next time
                atomic_write_json(self.path, self.stamps)
