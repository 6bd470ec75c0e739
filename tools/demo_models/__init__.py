"""The demo's own small models, trained on easy-vqa (CPU, minutes).

* :mod:`tools.demo_models.clip`: the embedded ``leverlm-tiny-clip`` open_clip model trained
  contrastively on easy-vqa images and their captions (the features of the feature store, the
  similarity baselines and Lever-LM);
* :mod:`tools.demo_models.lvlm`: a small Idefics3 (the real ``idefics3`` adapter path) trained
  from scratch on "fast binding" episodes of the ``vqa_nonce`` task (0..8 demonstrations + a
  query, answers remapped to nonce words per episode), so its answers depend on which
  demonstrations it is shown.

CLI, from the repository root: ``python -m tools.demo_models {clip,lvlm,all} --out DIR``
(``make demo-models`` writes the committed copies that ``leverlm.demo.clip_checkpoint()`` and
``leverlm.demo.lvlm_dir()`` point at).
"""

#: the LVLM adapter type of the demo LVLM.
LVLM_TYPE = "idefics3"
#: the task the demo LVLM was trained on (and must be used with).
TASK = "vqa_nonce"
