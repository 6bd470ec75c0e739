"""The demo world's own small models, trained here on easy-vqa (CPU, minutes).

* :mod:`leverlm.demo_models.clip`: the embedded ``leverlm-tiny-clip`` open_clip model trained
  contrastively on easy-vqa images and their captions (the features of the feature store, the
  similarity baselines and Lever-LM);
* :mod:`leverlm.demo_models.lvlm`: a small Idefics3 (the real ``idefics3`` adapter path) trained
  from scratch on "fast binding" episodes of the ``vqa_nonce`` task (0..8 demonstrations + a
  query, answers remapped to nonce words per episode), so its answers depend on which
  demonstrations it is shown.

CLI: ``python -m leverlm.demo_models {clip,lvlm,all} --out DIR [--steps N] [--seed S]``
(``make demo-models`` writes the committed copies under ``src/leverlm/assets/demo``).

:data:`ASSET_DIR` holds the committed models: ``clip/<CLIP_FILE>`` for
``load_clip(TINY_CLIP, pretrained=...)`` and ``lvlm/`` for ``load_lvlm(LVLM_TYPE, ...,
task=get_task(TASK))``. Nothing heavy is imported here.
"""

from __future__ import annotations

from pathlib import Path

#: the committed demo models (written by ``python -m leverlm.demo_models all --out ASSET_DIR``).
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
#: the CLIP checkpoint file name inside ``<out>/clip``.
CLIP_FILE = "leverlm-tiny-clip-easyvqa.safetensors"
#: the open_clip model name the CLIP checkpoint belongs to.
CLIP_MODEL = "leverlm-tiny-clip"
#: the LVLM adapter type of the demo LVLM folder ``<out>/lvlm``.
LVLM_TYPE = "idefics3"
#: the task the demo LVLM was trained on (and must be used with).
TASK = "vqa_nonce"


def clip_checkpoint(out: str | Path = ASSET_DIR) -> Path:
    """The CLIP checkpoint file under a demo-models folder."""
    return Path(out) / "clip" / CLIP_FILE


def lvlm_dir(out: str | Path = ASSET_DIR) -> Path:
    """The LVLM ``save_pretrained`` folder under a demo-models folder."""
    return Path(out) / "lvlm"
