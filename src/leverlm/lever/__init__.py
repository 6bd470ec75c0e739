"""Lever-LM: the network (``model``), training (``module``, ``data``), decoding (``decode``) and
the ``LeverLM`` API (``select``).

The names below are imported lazily, so ``import leverlm.lever`` does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from leverlm.errors import LeverError


class LeverLMError(LeverError):
    """A Lever-LM input that cannot be used: a config value, checkpoint, feature store or query
    (the message names it and what to do)."""


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

__all__ = sorted([*_EXPORTS, "LeverLMError"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'leverlm.lever' has no attribute {name!r}")
