"""Frozen vision-language models behind one protocol (see :mod:`leverlm.lvlm.base`).

Attributes are resolved lazily so ``import leverlm.lvlm`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leverlm.lvlm.base import (
        LVLM,
        LVLMError,
        LVLMSpec,
        ScoreResult,
        known_model_types,
        load_lvlm,
        register_lvlm,
    )

__all__ = [
    "LVLM",
    "LVLMError",
    "LVLMSpec",
    "ScoreResult",
    "known_model_types",
    "load_lvlm",
    "register_lvlm",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("leverlm.lvlm.base"), name)
    raise AttributeError(f"module 'leverlm.lvlm' has no attribute {name!r}")
