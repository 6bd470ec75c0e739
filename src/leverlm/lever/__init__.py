"""Lever-LM: the network (``model``), training (``module``, ``data``), decoding (``decode``) and
the ``LeverLM`` API (``select``).

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
    "LeverLM": "leverlm.lever.select",
    "FeatureBank": "leverlm.lever.decode",
    "greedy_decode": "leverlm.lever.decode",
    "beam_decode": "leverlm.lever.decode",
    "reference_decode": "leverlm.lever.decode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'leverlm.lever' has no attribute {name!r}")
