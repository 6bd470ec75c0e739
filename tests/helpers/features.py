"""Feature stores for tests: the ``leverlm-features`` layout, without running an encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leverlm.data.collection import read_manifest
from leverlm.utils import atomic_write_json, sha256_file

#: the collection sha256 of stores and gt datasets made without a collection folder
NO_COLLECTION_SHA256 = "0" * 64


def write_store(
    path: Path, image: np.ndarray, text: np.ndarray, collection: Path | None = None
) -> Path:
    """A complete store of ``image`` / ``text`` (saved as fp16), built for ``collection``
    (its manifest sha256 recorded; :data:`NO_COLLECTION_SHA256` without one)."""
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "image.npy", image.astype(np.float16))
    np.save(path / "text.npy", text.astype(np.float16))
    manifest = {
        "format": "leverlm-features",
        "version": 1,
        "model_name": "test-random",
        "dim": int(image.shape[1]),
        "dtype": "float16",
        "normalize": False,
        "num_rows": int(image.shape[0]),
        "complete": True,
        "collection_name": read_manifest(collection)["name"] if collection else None,
        "collection_path": str(collection) if collection else None,
        "collection_manifest_sha256": (
            sha256_file(Path(collection) / "manifest.json") if collection else NO_COLLECTION_SHA256
        ),
    }
    atomic_write_json(path / "manifest.json", manifest)
    return path
