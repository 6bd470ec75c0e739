"""OpenFlamingo adapter (the paper's OpenFlamingo-v2 3B/9B), via the optional ``open_flamingo``.

``open_flamingo`` pins torch 2.0.1 in its metadata, so it is an optional extra installed
without its dependencies::

    pip install --no-deps open-flamingo==2.0.1 einops einops-exts

Prompt (OpenFlamingo's format): each ICD ``<image>{icd text}<|endofchunk|>``, joined by
``task.icd_join``; the query ``<image>{query text}``. Each text token cross-attends to the
latest ``<image>`` before it (gated cross-attention every ``cross_attn_every_n_layers``).

Loading (:func:`load`): a folder with ``flamingo.json`` holding the arguments of
``open_flamingo.create_model_and_transforms`` plus the Flamingo ``checkpoint`` file; relative
paths are resolved against the folder, and loader keyword arguments override the file. For
OpenFlamingo-9B (``openflamingo/OpenFlamingo-9B-vitl-mpt7b``), with everything downloaded
beforehand::

    {"clip_vision_encoder_path": "ViT-L-14",
     "clip_vision_encoder_pretrained": "/models/clip/ViT-L-14-openai.pt",
     "lang_encoder_path": "/models/mpt-7b", "tokenizer_path": "/models/mpt-7b",
     "cross_attn_every_n_layers": 4, "checkpoint": "checkpoint.pt"}

(3B: ``ViT-L-14`` + ``mpt-1b-redpajama-200b``, ``cross_attn_every_n_layers`` 1.)
``clip_vision_encoder_path`` may also be an open_clip ``local-dir:`` folder.

Compatibility with transformers 5 (this environment has 5.x and torch 2.x):

* ``Flamingo.forward`` passes ``past_key_values=`` to the LM (deprecated in transformers 5,
  removed in 5.40): this adapter never calls it - it conditions the layers itself;
* ``Flamingo.generate`` fails when a batch has no padding: transformers 5's ``generate``
  drops an all-ones ``attention_mask`` and ``FlamingoLMMixin.forward(input_ids,
  attention_mask, **kw)`` requires it positionally (``TypeError: missing 1 required positional
  argument: 'attention_mask'``); :func:`create_flamingo` patches the LM instance so the mask
  defaults to ``None``;
* the MPT language models of the released checkpoints ship remote code (``auto_map`` in their
  ``config.json``; open_flamingo loads with ``trust_remote_code=True``) written for
  transformers 4.x, which could not be checked here (no weights offline). transformers' own
  ``MptForCausalLM`` reads the same weight names and works with open_flamingo under
  transformers 5 (tested on a tiny MPT): delete ``auto_map`` from the MPT folder's
  ``config.json`` to use it. Llama-family LMs work as well (the default tiny model).

The fast path feeds cached perceiver latents (no media-time embeddings in OpenFlamingo, so an
image's latents do not depend on the other images of the prompt) and runs the LM body alone.
A cached prefix (instruction + ICDs) is used when the suffix starts at the new ICD's
``<image>``: its tokens then cross-attend only to the suffix's own images.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

from leverlm.lvlm.base import (
    LVLM,
    EncodedPrompt,
    LVLMError,
    PromptImage,
    Span,
    TokenizerInfo,
    check_checkpoint_dir,
    resolve_dtype,
)
from leverlm.tasks import Task

#: the file in a Flamingo folder holding the ``create_model_and_transforms`` arguments.
FLAMINGO_SPEC = "flamingo.json"

INSTALL_HINT = "pip install --no-deps open-flamingo==2.0.1 einops einops-exts"

MEDIA_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"

_SPEC_KEYS = (
    "clip_vision_encoder_path",
    "clip_vision_encoder_pretrained",
    "lang_encoder_path",
    "tokenizer_path",
    "cross_attn_every_n_layers",
    "checkpoint",
    "decoder_layers_attr_name",
)


class OpenFlamingoMissing(LVLMError, ImportError):
    """``open_flamingo`` is not installed (an :class:`LVLMError` and an ``ImportError``, so
    callers that skip optional model types on ``ImportError`` skip it)."""


def require_open_flamingo() -> Any:
    """Import ``open_flamingo`` or raise :class:`OpenFlamingoMissing` naming the install command."""
    try:
        import open_flamingo
    except ImportError as exc:
        raise OpenFlamingoMissing(
            f"model_type 'flamingo' needs the optional package open_flamingo ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from exc
    return open_flamingo


class _OptionalMaskMixin:
    """Gives ``FlamingoLMMixin.forward`` an optional ``attention_mask`` (transformers 5's
    ``generate`` drops an all-ones mask; open_flamingo 2.0.1 requires it positionally)."""

    def forward(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
        return super().forward(input_ids, attention_mask, **kwargs)  # type: ignore[misc]


def read_spec(folder: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``flamingo.json`` of ``folder`` (if any) updated with ``overrides``; checked for keys."""
    folder = Path(folder)
    spec: dict[str, Any] = {}
    path = folder / FLAMINGO_SPEC
    if path.is_file():
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise LVLMError(f"{str(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(spec, dict):
            raise LVLMError(f"{str(path)!r} must hold a JSON object")
    spec.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise LVLMError(
            f"unknown Flamingo setting(s) {unknown} in {str(path)!r}/arguments; "
            f"known: {', '.join(_SPEC_KEYS)}"
        )
    required = ("clip_vision_encoder_path", "lang_encoder_path", "tokenizer_path")
    missing = [k for k in required if not spec.get(k)]
    if missing:
        raise LVLMError(
            f"Flamingo folder {str(folder)!r}: {FLAMINGO_SPEC} (or the loader arguments) must "
            f"set {', '.join(missing)}"
        )
    return spec


def _resolve(value: str | None, folder: Path) -> str | None:
    """A path relative to the Flamingo folder (keeps names like ``ViT-L-14``/``openai``)."""
    if not value:
        return value
    prefix = ""
    if value.startswith("local-dir:"):
        prefix, value = "local-dir:", value[len("local-dir:") :]
    candidate = folder / value
    if not Path(value).is_absolute() and candidate.exists():
        value = str(candidate)
    return prefix + value


def create_flamingo(spec: dict[str, Any], folder: str | Path) -> tuple[Any, Any, Any]:
    """``open_flamingo.create_model_and_transforms`` from a spec + the checkpoint, if named.

    Returns ``(model, image_processor, tokenizer)``; the model is on the CPU in fp32.
    """
    open_flamingo = require_open_flamingo()
    folder = Path(folder)
    kw: dict[str, Any] = dict(
        clip_vision_encoder_path=_resolve(spec["clip_vision_encoder_path"], folder),
        clip_vision_encoder_pretrained=_resolve(spec.get("clip_vision_encoder_pretrained"), folder),
        lang_encoder_path=_resolve(spec["lang_encoder_path"], folder),
        tokenizer_path=_resolve(spec["tokenizer_path"], folder),
        cross_attn_every_n_layers=int(spec.get("cross_attn_every_n_layers", 1)),
        use_local_files=True,
    )
    if spec.get("decoder_layers_attr_name"):
        kw["decoder_layers_attr_name"] = spec["decoder_layers_attr_name"]
    for key in ("lang_encoder_path", "tokenizer_path"):
        if not Path(kw[key]).is_dir():
            raise LVLMError(f"Flamingo {key} {kw[key]!r} is not a folder")
    # create_model_and_transforms print()s a parameter count: keep stdout clean.
    with contextlib.redirect_stdout(io.StringIO()):
        model, image_processor, tokenizer = open_flamingo.create_model_and_transforms(**kw)
    from open_flamingo.src.utils import extend_instance

    extend_instance(model.lang_encoder, _OptionalMaskMixin)
    ckpt = _resolve(spec.get("checkpoint"), folder)
    if ckpt:
        _load_checkpoint(model, Path(ckpt))
    return model, image_processor, tokenizer


def _load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load a Flamingo ``checkpoint.pt`` (a state dict of at least the trained modules)."""
    if not path.is_file():
        raise LVLMError(f"Flamingo checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of a corrupt file
        raise LVLMError(f"cannot read Flamingo checkpoint {str(path)!r}: {exc}") from exc
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict):
        raise LVLMError(f"Flamingo checkpoint {str(path)!r} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise LVLMError(
            f"Flamingo checkpoint {str(path)!r} has keys the model lacks: "
            f"{result.unexpected_keys[:5]} (wrong cross_attn_every_n_layers or LM?)"
        )
    # The released checkpoints hold only the trained modules; the frozen vision encoder and
    # LM come from their own files. Perceiver and cross-attention weights must be there.
    trained = [
        k for k in result.missing_keys if k.startswith("perceiver.") or "gated_cross_attn" in k
    ]
    if trained:
        raise LVLMError(
            f"Flamingo checkpoint {str(path)!r} misses trained weights, e.g. {trained[:5]}"
        )


class FlamingoLVLM(LVLM):
    """OpenFlamingo behind the LVLM protocol (see the module docstring)."""

    model_type = "flamingo"
    image_text = MEDIA_TOKEN
    icd_end_text = END_OF_CHUNK

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: Any,
        tokenizer: Any,
        task: Task,
        **kwargs: Any,
    ) -> None:
        """Wrap a loaded Flamingo (see :func:`load`); ``image_processor`` is open_clip's
        transform (PIL image -> ``[3, H, W]``), ``kwargs`` :class:`LVLM` options."""
        super().__init__(
            model, tokenizer, task, max_length=_context_length(model.lang_encoder.config), **kwargs
        )
        self.image_processor = image_processor
        self.media_token_id = int(model.media_token_id)
        self.eoc_token_id = int(model.eoc_token_id)

    def tokenizer_info(self) -> TokenizerInfo:
        """BOS only if the tokenizer itself prepends one (GPT-NeoX/MPT tokenizers do not)."""
        info = super().tokenizer_info()
        info.bos_ids = _prepended_ids(self.tokenizer)
        return info

    def bos_text(self) -> str:
        return ""  # the first chunk starts the text (see HFInterleavedLVLM.bos_text)

    @property
    def lm(self) -> torch.nn.Module:
        return self.model.lang_encoder

    @property
    def lm_head(self) -> Any:
        return self.lm.get_output_embeddings()

    @property
    def kv_config(self) -> Any:
        return self.lm.config

    def _layers(self) -> list[torch.nn.Module]:
        return list(self.lm._get_decoder_layers())

    # -- images -----------------------------------------------------------------------------
    def _pixels(self, images: Sequence[PromptImage]) -> torch.Tensor:
        """``[N, 3, H, W]`` through open_clip's transform, in the model's dtype."""
        dtype = next(self.model.parameters()).dtype
        return torch.stack([self.image_processor(im.image) for im in images]).to(self.device, dtype)

    def vision_shape(self, image: PromptImage) -> Hashable:
        return None  # open_clip's transform crops every image to one square

    def vision_features(self, images: list[PromptImage]) -> list[torch.Tensor]:
        """Perceiver latents ``[n_latents, d]`` of each image (as ``_encode_vision_x``)."""
        tokens = self.model.vision_encoder(self._pixels(images))[1]  # [n, v, d]
        latents = self.model.perceiver(tokens[:, None, None])  # [n, 1, n_latents, d]
        return list(latents[:, 0].unbind(0))

    def _vis_x(self, rows: Sequence[Sequence[PromptImage]]) -> torch.Tensor:
        """``[B, N, n_latents, d]`` cached latents of each row's images, zero-padded."""
        latents = self.model.perceiver.latents
        return self.stacked_features(rows, latents.new_zeros(latents.shape[0], self.model.vis_dim))

    def _condition(self, vis_x: torch.Tensor, media_locations: torch.Tensor) -> None:
        for layer in self._layers():
            layer.condition_vis_x(vis_x)
            layer.condition_media_locations(media_locations)
            layer.condition_use_cached_media(False)

    # -- forward pieces ---------------------------------------------------------------------
    def can_split(self, enc: EncodedPrompt) -> bool:
        # The suffix must start at the new image's <image>: its tokens then see only the
        # suffix's images (cross-attention goes to the latest image before a token), numbered
        # from the suffix start; the prefix's images stay in the KV cache.
        return enc.input_ids[enc.prefix_len] == self.media_token_id

    def hidden_states(self, span: Span) -> torch.Tensor:
        self._condition(self._vis_x(span.images), span.ids == self.media_token_id)
        try:
            return self.lm.base_model(
                input_ids=span.ids,
                attention_mask=span.attention_mask,
                position_ids=span.position_ids,
                cache=span.cache,
                use_cache=span.cache is not None,
            ).last_hidden_state
        finally:
            self.lm.clear_conditioned_layers()

    def reference_logits(self, enc: EncodedPrompt) -> torch.Tensor:
        """``Flamingo.forward`` of one prompt on raw pixels (full logits), without its
        deprecated ``past_key_values`` argument: encode the images, condition, run the LM."""
        ids = torch.tensor([enc.input_ids], device=self.device)
        if enc.images:
            vision_x = self._pixels(enc.images)[None, :, None]  # [1, T, F=1, 3, H, W]
            self.model._encode_vision_x(vision_x=vision_x)
        else:
            self._condition(self._vis_x([[]]), ids == self.media_token_id)
        self.model._condition_media_locations(input_ids=ids)
        try:
            out = self.lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        finally:
            self.lm.clear_conditioned_layers()
        return out.logits[0]

    # -- generation -------------------------------------------------------------------------
    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Generation stops at ``<|endofchunk|>`` (OpenFlamingo's convention)."""
        kw = super().generation_kwargs(**overrides)
        kw.setdefault("eos_token_id", self.eoc_token_id)
        kw.setdefault("bad_words_ids", [[self.media_token_id]])
        return kw

    def generate_inputs(
        self, ids: torch.Tensor, encs: Sequence[EncodedPrompt], reference: bool = False
    ) -> dict[str, Any]:
        return {}  # the images enter through the conditioned layers (generation_context)

    @property
    def generation_model(self) -> Any:
        return self.lm

    @contextlib.contextmanager
    def generation_context(self, encs: Sequence[EncodedPrompt], kw: dict[str, Any]) -> Any:
        """What ``Flamingo.generate`` does after ``_encode_vision_x``, with cached latents:
        the LM reuses the conditioned images while it generates token by token."""
        vis_x = self._vis_x([e.images for e in encs])
        beams = int(kw.get("num_beams", 1))
        if beams > 1:
            vis_x = vis_x.repeat_interleave(beams, dim=0)
        for layer in self._layers():
            layer.condition_vis_x(vis_x)
        self.lm._use_cached_vision_x = True
        try:
            yield
        finally:
            self.lm.clear_conditioned_layers()
            self.lm._use_cached_vision_x = False


def _context_length(config: Any) -> int | None:
    """The LM's context limit (``max_seq_len`` for MPT), ``None`` when it declares none."""
    for name in ("max_position_embeddings", "max_seq_len", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def _prepended_ids(tokenizer: Any) -> list[int]:
    """The ids a tokenizer puts before a text when adding special tokens (its BOS, if any)."""
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for cut in range(len(full) - len(plain) + 1):
        if full[cut : cut + len(plain)] == plain:
            return full[:cut]
    return []


def load(
    model_type: str,
    path: str,
    task: Task,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> FlamingoLVLM:
    """Load OpenFlamingo from a folder (``flamingo.json`` + checkpoint), frozen, on ``device``.

    ``kwargs``: Flamingo settings overriding ``flamingo.json`` (``clip_vision_encoder_path``,
    ``clip_vision_encoder_pretrained``, ``lang_encoder_path``, ``tokenizer_path``,
    ``cross_attn_every_n_layers``, ``checkpoint``, ``decoder_layers_attr_name``) and adapter
    options (cache sizes, ``vision_batch_size``). ``attn_implementation`` is not
    supported (open_flamingo builds the LM itself).
    """
    if model_type != "flamingo":
        raise LVLMError(f"the OpenFlamingo adapter cannot load model_type {model_type!r}")
    if attn_implementation:
        raise LVLMError("model_type 'flamingo' does not take attn_implementation")
    require_open_flamingo()
    folder = check_checkpoint_dir(path)
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _SPEC_KEYS}
    spec = read_spec(folder, overrides)
    model, image_processor, tokenizer = create_flamingo(spec, folder)
    model = model.to(device=device, dtype=resolve_dtype(dtype))
    return FlamingoLVLM(
        model, image_processor, tokenizer, task, device=device, dtype=dtype, **kwargs
    )
