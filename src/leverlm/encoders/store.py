"""The feature store: memory-mapped fp16 CLIP features of one collection, row i = position i.

Layout of a store folder::

    manifest.json   encoder, checkpoint (+ sha256), dim, normalisation, collection name +
                    manifest sha256, text field, num_rows, num_distinct_images/texts, complete
    image.npy       float16 [num_rows, dim]  (numpy .npy, opened with mmap)
    text.npy        float16 [num_rows, dim]

Each distinct image (by content hash) and each distinct text is encoded once; every row holds
its own copy, so readers never see the deduplication. ``leverlm features`` writes the arrays
first and the manifest last, so a folder with a ``manifest.json`` saying ``complete: true`` is
always whole.

Version 2 added the deduplicated build (the ``num_distinct_*`` fields); version 1 stores hold
the same arrays and stay readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from leverlm.errors import LeverError
from leverlm.utils import sha256_file

FORMAT = "leverlm-features"
FORMAT_VERSION = 2
# Versions whose complete stores this code reads (the array layout is the same in all).
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
IMAGE = "image.npy"
TEXT = "text.npy"
DTYPE = np.float16
# Manifest keys that do not change what the arrays contain: a moved collection or checkpoint
# still matches; completeness is checked on its own; the version and the deduplication counts
# describe how the rows were computed (the counts follow from the collection, already
# identified by its manifest sha256), not which features they hold.
_NON_IDENTITY_KEYS = (
    "complete",
    "collection_path",
    "checkpoint",
    "version",
    "dedup",
    "num_distinct_images",
    "num_distinct_texts",
)


class FeatureStoreError(LeverError):
    """A feature store is missing, incomplete, corrupt or built for other inputs."""


def collection_manifest_path(collection: Any) -> Path:
    """``manifest.json`` of a collection given as a path or a ``Collection`` (its ``path``)."""
    root = Path(getattr(collection, "path", collection))
    return root if root.name == MANIFEST else root / MANIFEST


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields that decide whether two stores hold the same features."""
    return {k: v for k, v in manifest.items() if k not in _NON_IDENTITY_KEYS}


def identity_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences between two manifests' identities (``key: a != b``)."""
    ia, ib = identity(a), identity(b)
    return [
        f"{k}: {ia.get(k)!r} != {ib.get(k)!r}"
        for k in sorted(set(ia) | set(ib))
        if ia.get(k) != ib.get(k)
    ]


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A store's ``manifest.json`` (path = the store folder), checked for format."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FeatureStoreError(f"{file} not found: {path} is not a feature store") from err
    except (OSError, ValueError) as err:
        raise FeatureStoreError(f"cannot read feature store manifest {file}: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FeatureStoreError(f"{file} is not a {FORMAT} manifest (format field)")
    version = manifest.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise FeatureStoreError(
            f"{file}: version {manifest.get('version')!r} is not supported "
            f"(readable: {', '.join(map(str, READABLE_VERSIONS))})"
        )
    for key in ("num_rows", "dim"):
        if not isinstance(manifest.get(key), int) or manifest[key] < 0:
            raise FeatureStoreError(f"{file}: field {key!r} = {manifest.get(key)!r} is invalid")
    return manifest


def open_array(path: Path, num_rows: int, dim: int, mode: str = "r") -> np.memmap:
    """Memory-map one ``.npy`` array, checking shape and dtype against the manifest."""
    try:
        arr = np.load(path, mmap_mode=mode)
    except FileNotFoundError as err:
        raise FeatureStoreError(f"feature array {path} is missing") from err
    except (OSError, ValueError) as err:
        raise FeatureStoreError(f"cannot read feature array {path}: {err}") from err
    if arr.shape != (num_rows, dim) or arr.dtype != DTYPE:
        raise FeatureStoreError(
            f"feature array {path} has shape {arr.shape} dtype {arr.dtype}; the manifest says "
            f"({num_rows}, {dim}) {np.dtype(DTYPE).name}"
        )
    return arr


class FeatureStore:
    """Read-only view of a feature store folder.

    ``image`` / ``text`` are ``np.memmap`` arrays ``[N, dim]`` float16 (row = position); slicing
    reads only the rows asked for. Opening an incomplete store raises unless
    ``allow_incomplete`` (then unfinished rows are zeros).
    """

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete") and not allow_incomplete:
            raise FeatureStoreError(
                f"feature store {self.path} is incomplete (manifest 'complete' is false); "
                f"rerun `leverlm features predict` to finish it"
            )
        n, d = self.manifest["num_rows"], self.manifest["dim"]
        self.image = open_array(self.path / IMAGE, n, d)
        self.text = open_array(self.path / TEXT, n, d)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def normalized(self) -> bool:
        return bool(self.manifest.get("normalize"))

    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"FeatureStore({str(self.path)!r}, model={m.get('model_name')!r}, rows={len(self)}, "
            f"dim={self.dim}, collection={m.get('collection_name')!r})"
        )

    def check_matches(self, collection: Any, sha256: str | None = None) -> None:
        """Raise ``FeatureStoreError`` unless this store is complete and built for ``collection``.

        ``collection`` is a collection folder or a ``Collection``, identified by the sha256 of
        its ``manifest.json``; ``sha256``, when given, is that hash (e.g. as a gt manifest
        records it) and ``collection`` (which may then be None) only names it.
        """
        if not self.complete:
            raise FeatureStoreError(f"feature store {self.path} is incomplete; rerun it")
        folder = None if collection is None else collection_manifest_path(collection).parent
        if sha256 is None:
            try:
                sha256 = sha256_file(folder / MANIFEST)
            except OSError as err:
                raise FeatureStoreError(
                    f"cannot read collection manifest {folder / MANIFEST}: {err}"
                ) from err
        want = self.manifest.get("collection_manifest_sha256")
        if sha256 != want:
            raise FeatureStoreError(
                f"feature store {self.path} was built for collection "
                f"{self.manifest.get('collection_name')!r} (manifest sha256 {str(want)[:12]}...), "
                f"not for {folder or 'this one'} (sha256 {sha256[:12]}...); rebuild it with "
                f"`leverlm features predict --data.collection {folder or 'COLLECTION'} --out "
                f"{self.path} --overwrite`"
            )


def open_store(
    store: Any, collection: Any = None, *, sha256: str | None = None, what: str = "features"
) -> Any:
    """The one way a feature store is opened for reading.

    Args:
        store: a store folder, or an already open store (anything with ``image`` / ``text``
            arrays), which is returned as is.
        collection: the collection the store must have been built for (folder or
            ``Collection``), checked by its manifest's sha256; None: not checked.
        sha256: that collection manifest's sha256, when it is known without reading the folder
            (as a gt manifest or a checkpoint records it); also checked.
        what: the parameter that named the store, for error messages.
    """
    if not isinstance(store, str | os.PathLike):
        return store
    path = Path(store)
    if not path.is_dir():
        problem = "is not a feature store folder" if path.exists() else "does not exist"
        raise FeatureStoreError(
            f"{what}: {path} {problem} (a folder written by `leverlm features predict`)"
        )
    try:
        opened = FeatureStore(path)
        if collection is not None or sha256:
            opened.check_matches(collection, sha256)
    except FeatureStoreError as err:
        raise FeatureStoreError(f"{what}: {err}") from err
    return opened
