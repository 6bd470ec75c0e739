"""open_clip encoders and the feature store (``leverlm features``).

- ``load_clip(model_name, pretrained=None, device, precision, normalize) -> ClipEncoder``
- ``open_store(path, collection)``: the one reader of a feature store (a ``FeatureStore``:
  memory-mapped fp16 ``image`` / ``text`` arrays, row i = position i), checked against the
  collection it was built for
- ``compute_features(collection_path, out_dir, model_name, ...) -> Path``: the Lightning job
- ``default_feature_dir(collection_path, model_name)``:
  ``<collection>/../features/<collection-name>/<model-name>/``

Only the store (numpy) is imported eagerly; torch / open_clip / lightning load on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from leverlm.encoders.store import (
    FeatureStore,
    FeatureStoreError,
    default_feature_dir,
    open_store,
)

if TYPE_CHECKING:
    from leverlm.encoders.clip import TINY_CLIP, ClipEncoder, EncoderError, load_clip
    from leverlm.encoders.job import compute_features

__all__ = [
    "TINY_CLIP",
    "ClipEncoder",
    "EncoderError",
    "FeatureStore",
    "FeatureStoreError",
    "compute_features",
    "default_feature_dir",
    "load_clip",
    "main",
    "open_store",
]

_LAZY = {
    "TINY_CLIP": "leverlm.encoders.clip",
    "ClipEncoder": "leverlm.encoders.clip",
    "EncoderError": "leverlm.encoders.clip",
    "load_clip": "leverlm.encoders.clip",
    "compute_features": "leverlm.encoders.job",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leverlm.encoders' has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """``leverlm features ...`` (see ``leverlm features --help``)."""
    from leverlm.encoders.job import main as _main

    return _main(argv)
