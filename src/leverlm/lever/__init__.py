"""Lever-LM: the network (``model``), training (``module``, ``data``) and decoding (``generate``).

The names below are imported lazily, so ``import leverlm.lever`` does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LeverLMConfig": "leverlm.lever.model",
    "LeverLMModel": "leverlm.lever.model",
    "LeverLMModule": "leverlm.lever.module",
    "LeverLMDataModule": "leverlm.lever.data",
    "LeverLM": "leverlm.lever.generate",
    "FeatureBank": "leverlm.lever.generate",
    "greedy_decode": "leverlm.lever.generate",
    "beam_decode": "leverlm.lever.generate",
    "reference_decode": "leverlm.lever.generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'leverlm.lever' has no attribute {name!r}")
