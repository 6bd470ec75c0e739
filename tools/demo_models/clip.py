"""Train the embedded ``leverlm-tiny-clip`` on easy-vqa images and their captions.

easy-vqa captions are ``a {color} {shape}`` (8 colours x 3 shapes = 24 distinct texts) shared
by many images, so plain CLIP InfoNCE (one positive per row, every other pair a negative)
would push apart an image and its own caption whenever a batch holds two images with the same
caption. Instead the loss is caption-aware:

* image -> text: cross-entropy over the 24 distinct captions (the image's caption is the
  target);
* text -> image: for each caption present in the batch, the mean log-softmax (over the batch's
  images) of the images with that caption (several positives).

Only images with a complete caption (colour and shape both known: 90% of the train split)
are trained on; "a rectangle" for an image whose colour the questions never reveal would be a
wrong negative for "a red rectangle".

**Retrieval accuracy** (the reported metric): for each test image with a complete caption, the
caption *text* most similar to its image feature among the 24 distinct captions; accuracy = how
often that text is the image's own caption. Colour and shape accuracy are read off the same
top-1 caption. Text -> image: precision@10 of each caption's 10 nearest test images, averaged.
Metrics are measured on the weights as saved (fp16) and reloaded through
:func:`leverlm.encoders.clip.load_clip`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leverlm.data.prep.easyvqa import COLORS, SHAPES
from leverlm.demo import CLIP_FILE
from leverlm.encoders.clip import TINY_CLIP, load_clip
from leverlm.utils import atomic_open
from tools.demo_models.common import TrainConfig, adamw, optimizer_step, resume, save_state, say
from tools.demo_models.data import DemoModelsError, load_captions

#: the 24 complete easy-vqa captions, the retrieval candidates.
FULL_CAPTIONS: tuple[str, ...] = tuple(f"a {c} {s}" for c in COLORS for s in SHAPES)


@dataclass(frozen=True)
class ClipTrainConfig(TrainConfig):
    """CLIP training settings (the defaults made the committed model)."""

    steps: int = 400
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 40
    checkpoint_every: int = 100
    batch_size: int = 64


def _pixels(encoder: Any, images: list[Any], chunk: int = 512) -> Any:
    parts = [encoder.preprocess_images(images[i : i + chunk]) for i in range(0, len(images), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0)


def complete_caption_rows(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, labels)``: rows whose caption is one of :data:`FULL_CAPTIONS`, and its index."""
    index = {c: i for i, c in enumerate(FULL_CAPTIONS)}
    rows = [i for i, c in enumerate(captions) if c in index]
    return np.array(rows, dtype=np.int64), np.array([index[captions[i]] for i in rows])


def caption_aware_loss(image_feats: Any, text_feats: Any, labels: Any, scale: Any) -> Any:
    """The loss of the module docstring.

    Args:
        image_feats: ``[B, D]`` L2-normalised; ``text_feats``: ``[C, D]`` L2-normalised (one
            row per distinct caption); ``labels``: ``[B]`` caption index of each image;
            ``scale``: the (exponentiated) logit scale.
    """
    logits = scale * image_feats @ text_feats.T  # [B, C]
    loss_i2t = torch.nn.functional.cross_entropy(logits, labels)
    present = torch.unique(labels)
    # [P, B]: each present caption's log-softmax over the batch's images
    logp = torch.log_softmax(logits.T[present], dim=-1)
    positives = (labels[None, :] == present[:, None]).float()
    loss_t2i = -((logp * positives).sum(-1) / positives.sum(-1)).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def retrieval_metrics(image_feats: Any, labels: np.ndarray, text_feats: Any) -> dict[str, float]:
    """Image -> caption-text top-1 accuracy (+ colour/shape parts) and text -> image P@10.

    Args:
        image_feats: ``[N, D]`` L2-normalised test image features; ``labels``: ``[N]`` index
            into :data:`FULL_CAPTIONS`; ``text_feats``: ``[24, D]`` features of those captions.
    """
    sims = (image_feats @ text_feats.T).float().numpy()
    top1 = sims.argmax(1)
    n_shapes = len(SHAPES)
    metrics = {
        "image_to_caption_top1": float((top1 == labels).mean()),
        "color_from_top1": float((top1 // n_shapes == labels // n_shapes).mean()),
        "shape_from_top1": float((top1 % n_shapes == labels % n_shapes).mean()),
        "num_test_images": int(len(labels)),
    }
    k = min(10, len(labels))
    precisions = []
    for c in range(sims.shape[1]):
        if not (labels == c).any():
            continue
        nearest = np.argsort(-sims[:, c], kind="stable")[:k]
        precisions.append(float((labels[nearest] == c).mean()))
    metrics["caption_to_image_p_at_10"] = float(np.mean(precisions)) if precisions else 0.0
    return metrics


def evaluate_clip(checkpoint: str | Path, test_collection: str | Path) -> dict[str, float]:
    """Retrieval metrics of a saved CLIP checkpoint on a caption collection (complete captions)."""
    encoder = load_clip(TINY_CLIP, str(checkpoint), normalize=True)
    images, captions, _ = load_captions(test_collection)
    rows, labels = complete_caption_rows(captions)
    if len(rows) == 0:
        raise DemoModelsError(f"{test_collection}: no image has a complete caption to test")
    with torch.inference_mode():
        img = torch.cat(
            [
                encoder.encode_images([images[i] for i in rows[s : s + 256]])
                for s in range(0, len(rows), 256)
            ]
        )
        txt = encoder.encode_texts(list(FULL_CAPTIONS))
    return retrieval_metrics(img, labels, txt)


def train_clip(
    train_collection: str | Path,
    test_collection: str | Path,
    out_dir: str | Path,
    work_dir: str | Path,
    config: ClipTrainConfig = ClipTrainConfig(),
    log_every: int = 50,
) -> dict[str, Any]:
    """Train, save ``out_dir/<CLIP_FILE>`` (fp16); return the settings and test metrics.

    Resumes from ``work_dir/clip.ckpt`` when it holds a checkpoint of the same config.
    """
    from safetensors.torch import save

    if config.steps < 1 or config.batch_size < 2:
        raise DemoModelsError(
            f"CLIP training needs steps >= 1 and batch_size >= 2, got {config.steps}, "
            f"{config.batch_size}"
        )
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    start_time = time.perf_counter()
    images, captions, _ = load_captions(train_collection)
    rows, labels_np = complete_caption_rows(captions)
    if len(rows) < 2:
        raise DemoModelsError(f"{train_collection}: fewer than 2 images with a complete caption")
    torch.manual_seed(config.seed)
    encoder = load_clip(TINY_CLIP, None, seed=config.seed)
    model = encoder.model
    pixels = _pixels(encoder, [images[i] for i in rows])
    labels = torch.as_tensor(labels_np)
    tokens = encoder.tokenize(list(FULL_CAPTIONS))
    opt = adamw(model, config, "embedding", eps=1e-6)
    ckpt_path = work_dir / "clip.ckpt"
    cfg = asdict(config) | {"num_train_images": int(len(rows))}
    start = int(resume(ckpt_path, cfg, model, opt, "clip")["step"])
    model.train()
    batch = min(config.batch_size, len(rows))
    losses: list[float] = []
    for step in range(start, config.steps):
        # The batch is a function of (seed, step): a resumed run draws the same batches.
        idx = torch.as_tensor(
            np.random.default_rng([config.seed, step]).choice(len(rows), batch, replace=False)
        )
        img = torch.nn.functional.normalize(model.encode_image(pixels[idx]), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        loss = caption_aware_loss(img, txt, labels[idx], model.logit_scale.exp())
        optimizer_step(opt, model, loss, step, config)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # scale <= 100, as open_clip's training does
        losses.append(float(loss.detach()))
        done = step + 1
        if done % log_every == 0 or done == config.steps:
            recent = float(np.mean(losses[-log_every:]))
            elapsed = time.perf_counter() - start_time
            say("clip", f"step {done}/{config.steps} loss {recent:.4f} ({elapsed:.0f}s)")
        if done % config.checkpoint_every == 0 and done < config.steps:
            save_state(ckpt_path, cfg, done, model, opt)
    train_seconds = time.perf_counter() - start_time
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CLIP_FILE
    state = model.state_dict()
    fp16 = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    with atomic_open(path, "wb") as fh:
        fh.write(save(fp16, metadata={"model": TINY_CLIP, "seed": str(config.seed)}))
    metrics = evaluate_clip(path, test_collection)
    result = {
        "model": TINY_CLIP,
        "file": CLIP_FILE,
        "size_mb": round(path.stat().st_size / 2**20, 2),
        "config": cfg,
        "final_train_loss": float(np.mean(losses[-log_every:])) if losses else None,
        "train_seconds": round(train_seconds, 1),
        "test": metrics,
        "retrieval_definition": (
            "test images with a complete caption; top-1 caption text among the 24 distinct "
            "'a {color} {shape}' captions must equal the image's caption"
        ),
    }
    say("clip", f"{path} ({result['size_mb']} MB): {json.dumps(metrics)}")
    return result
