"""open_clip encoders: build a CLIP model from a local checkpoint (never a download).

``load_clip(name, pretrained)`` accepts any open_clip model name plus the embedded
``leverlm-tiny-clip`` (a small ViT for 64x64 images + a small text transformer, registered from
``leverlm/assets/clip``). ``pretrained`` is ``None`` (random init from a fixed seed), a local
checkpoint file, or an open_clip tag whose weights are already in the local cache.

The encode methods do not disable gradients: a trainable-CLIP Lever-LM calls them inside its
own training step; inference jobs wrap them in ``torch.inference_mode`` themselves.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from leverlm.errors import LeverError

if TYPE_CHECKING:
    from PIL import Image

TINY_CLIP = "leverlm-tiny-clip"
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip"
# open_clip precisions; fp16/bf16 keep LayerNorm in fp32 (OpenAI style), pure_* cast everything.
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")
_INPUT_DTYPES = {
    "fp16": torch.float16,
    "pure_fp16": torch.float16,
    "bf16": torch.bfloat16,
    "pure_bf16": torch.bfloat16,
}
_registered = False


class EncoderError(LeverError):
    """A model name, checkpoint or precision that cannot be used (names the value)."""


def register_model_configs() -> None:
    """Make the embedded model configs (``leverlm-tiny-clip``) known to open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(ASSET_DIR)
    _registered = True


def _check_model_name(model_name: str) -> None:
    import open_clip

    register_model_configs()
    if model_name.startswith(("hf-hub:", "local-dir:")):
        # ``local-dir:`` is local by definition; ``hf-hub:`` works only from the local HF cache
        # (offline mode), which open_clip resolves and reports itself.
        return
    if open_clip.get_model_config(model_name) is None:
        known = open_clip.list_models()
        close = [m for m in known if model_name.lower().replace("/", "-") in m.lower()][:10]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise EncoderError(
            f"unknown open_clip model {model_name!r}{hint}; see open_clip.list_models() or use "
            f"{TINY_CLIP!r}"
        )


def _cached_tag_file(model_name: str, tag_cfg: dict[str, Any]) -> str | None:
    """The local file of an open_clip pretrained tag, looked up in the caches only."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        names = [filename] if filename else []
        names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo_id=repo_id, filename=name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = tag_cfg.get("url", "")
    if url:
        # open_clip's own download cache for URL weights.
        candidate = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def resolve_pretrained(
    model_name: str, pretrained: str | None
) -> tuple[str | None, dict[str, Any]]:
    """Map ``pretrained`` to a local checkpoint file (or None) and the tag's settings.

    Raises ``EncoderError`` naming ``pretrained`` if it is neither an existing file nor a tag of
    ``model_name`` whose weights are already cached locally: nothing is ever downloaded.
    """
    if pretrained is None or pretrained == "":
        return None, {}
    if os.path.isfile(pretrained):
        return str(Path(pretrained).resolve()), {}
    if os.path.exists(pretrained):
        raise EncoderError(f"pretrained {pretrained!r} exists but is not a file (a checkpoint)")
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        path = _cached_tag_file(model_name, tag_cfg)
        if path is None:
            raise EncoderError(
                f"pretrained tag {pretrained!r} of {model_name!r} is not in the local cache and "
                f"nothing is downloaded here; pass the checkpoint file instead (--pretrained FILE)"
            )
        return path, tag_cfg
    raise EncoderError(
        f"pretrained {pretrained!r} is not an existing checkpoint file (nor a known open_clip tag "
        f"of {model_name!r}); pass a local file path, or omit it for a random init"
    )


class ClipEncoder(nn.Module):
    """A CLIP image/text encoder with its preprocessing and tokenizer.

    ``encode_images``/``encode_texts`` take PIL images / strings; ``encode_pixels``/
    ``encode_tokens`` take already preprocessed tensors (what a DataLoader worker produces).
    All return float32 ``[B, dim]``, L2-normalised when ``normalize`` is set.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Any,
        tokenizer: Any,
        *,
        model_name: str,
        dim: int,
        normalize: bool = False,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.dim = dim
        self.normalize = normalize
        self.precision = precision
        self._input_dtype = _INPUT_DTYPES.get(precision, torch.float32)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _finish(self, feats: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: fp16 norms of 512-768-d vectors lose precision.
        feats = feats.float()
        if self.normalize:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> ``[B, 3, H, W]`` pixel tensor (the model's eval transform)."""
        return torch.stack([self.preprocess(img.convert("RGB")) for img in images])

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> ``[B, context_length]`` token ids (over-long texts are truncated)."""
        return self.tokenizer(list(texts))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` preprocessed pixels -> ``[B, dim]`` image features."""
        pixels = pixels.to(device=self.device, dtype=self._input_dtype)
        return self._finish(self.model.encode_image(pixels))

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` token ids -> ``[B, dim]`` text features."""
        return self._finish(self.model.encode_text(tokens.to(self.device)))

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> ``[B, dim]`` image features."""
        return self.encode_pixels(self.preprocess_images(images))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> ``[B, dim]`` text features."""
        return self.encode_tokens(self.tokenize(texts))


def _not_a_random_init_warning(record: logging.LogRecord) -> bool:
    # open_clip warns (on the root logger) whenever it loaded no weights itself; without a
    # checkpoint that is what was asked for (warned about below where it matters) or the
    # weights come next, from a Lever-LM checkpoint.
    return not record.getMessage().startswith("No pretrained weights loaded for model")


def load_clip(
    model_name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    normalize: bool = False,
    seed: int = 0,
) -> ClipEncoder:
    """Build an open_clip encoder in eval mode.

    Args:
        model_name: an open_clip model name (``ViT-B-32``; ``ViT-B-32-quickgelu`` for OpenAI
            weights given as a file) or ``leverlm-tiny-clip``.
        pretrained: local checkpoint file, a locally cached open_clip tag, or None for a random
            init drawn from ``seed`` (identical on every process, so DDP ranks agree).
        precision: one of ``PRECISIONS``.
        normalize: L2-normalise every output row.
    """
    import open_clip

    if precision not in PRECISIONS:
        raise EncoderError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    _check_model_name(model_name)
    checkpoint, tag_cfg = resolve_pretrained(model_name, pretrained)
    kwargs: dict[str, Any] = {}
    if tag_cfg:
        # What open_clip would take from the tag itself (activation and preprocessing).
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        for key, arg in (
            ("mean", "image_mean"),
            ("std", "image_std"),
            ("interpolation", "image_interpolation"),
            ("resize_mode", "image_resize_mode"),
        ):
            if tag_cfg.get(key) is not None:
                kwargs[arg] = tag_cfg[key]
    # A fixed seed for the random init, without disturbing the caller's RNG state.
    root = logging.getLogger()
    root.addFilter(_not_a_random_init_warning)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=checkpoint, precision=precision, device=device, **kwargs
            )
    except (RuntimeError, KeyError, ValueError) as err:
        where = f" from checkpoint {checkpoint!r}" if checkpoint else ""
        raise EncoderError(f"cannot build open_clip model {model_name!r}{where}: {err}") from err
    finally:
        root.removeFilter(_not_a_random_init_warning)
    model.eval()
    if checkpoint is None and model_name != TINY_CLIP:
        warnings.warn(
            f"open_clip model {model_name!r} has no checkpoint: random init (seed {seed}); "
            f"pass pretrained=<checkpoint file> for meaningful features",
            stacklevel=2,
        )
    tokenizer = open_clip.get_tokenizer(model_name)
    dim = _embed_dim(model, model_name)
    return ClipEncoder(
        model,
        preprocess,
        tokenizer,
        model_name=model_name,
        dim=dim,
        normalize=normalize,
        precision=precision,
    )


def _embed_dim(model: nn.Module, model_name: str) -> int:
    import open_clip

    cfg = open_clip.get_model_config(model_name) if ":" not in model_name else None
    if cfg and "embed_dim" in cfg:
        return int(cfg["embed_dim"])
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    raise EncoderError(f"cannot tell the embedding size of open_clip model {model_name!r}")
