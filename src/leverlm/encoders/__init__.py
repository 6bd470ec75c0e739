"""open_clip encoders and the feature store (``leverlm features``).

- ``load_clip(model_name, pretrained=None, device, precision, normalize) -> ClipEncoder``
- ``open_store(path, collection)``: the one reader of a feature store (a ``FeatureStore``:
  memory-mapped fp16 ``image`` / ``text`` arrays, row i = position i), checked against the
  collection it was built for
- ``main(argv)``: ``leverlm features predict|merge``, the job that writes a store

Only the store (numpy) is imported eagerly; torch / open_clip / lightning load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leverlm.encoders.store import FeatureStore, FeatureStoreError, open_store

if TYPE_CHECKING:
    from leverlm.encoders.clip import TINY_CLIP, ClipEncoder, EncoderError, load_clip
    from leverlm.encoders.job import main

__all__ = [
    "TINY_CLIP",
    "ClipEncoder",
    "EncoderError",
    "FeatureStore",
    "FeatureStoreError",
    "load_clip",
    "main",
    "open_store",
]

_LAZY = {
    "TINY_CLIP": "leverlm.encoders.clip",
    "ClipEncoder": "leverlm.encoders.clip",
    "EncoderError": "leverlm.encoders.clip",
    "load_clip": "leverlm.encoders.clip",
    "main": "leverlm.encoders.job",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leverlm.encoders' has no attribute {name!r}")
