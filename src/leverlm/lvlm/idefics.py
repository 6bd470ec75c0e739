"""IDEFICS (v1) adapter: ``IdeficsForVisionText2Text`` + ``IdeficsProcessor``.

The prompt is what ``IdeficsProcessor`` builds: ``<s>`` + text, each image replaced by
``<fake_token_around_image><image><fake_token_around_image>``. Each text token cross-attends
only to the latest image before it (``image_attention_mask``: one-hot of the running image
count), through gated cross-attention layers.

The fast path feeds the vision features (perceiver latents when the model resamples, the
vision encoder output otherwise) instead of pixels and runs the text model alone.
Cross-attention has no KV cache: a suffix after a cached prefix needs the images its tokens
attend to - its own plus the prefix's last image, which the suffix's first token (the
``<fake_token_around_image>`` of the next image) still attends to.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from leverlm.lvlm.base import (
    LVLM,
    EncodedPrompt,
    LVLMError,
    PromptImage,
    Span,
)
from leverlm.tasks import Task

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"


def image_attention_mask(
    input_ids: torch.Tensor, image_token_id: int, num_images: int, offset: int = 0
) -> torch.Tensor:
    """``[B, T, num_images]`` one-hot: token ``t`` attends to the latest image at or before it.

    Tokens before the first image attend to none. ``offset`` is added to the running image
    index (a suffix whose slot 0 holds the prefix's last image uses ``offset=1``).
    """
    idx = (input_ids == image_token_id).long().cumsum(dim=1) - 1 + offset  # [B, T]
    slots = torch.arange(num_images, device=input_ids.device)
    return (idx[..., None] == slots).long()


def reference_image_attention_mask(
    input_ids: torch.Tensor, tokenizer: Any, num_images: int
) -> torch.Tensor:
    """The processor's own (looping) construction of the image mask, for the reference path."""
    from transformers.models.idefics.processing_idefics import (
        image_attention_mask_for_packed_input_ids,
        incremental_to_binary_attention_mask,
    )

    incremental, _ = image_attention_mask_for_packed_input_ids(input_ids, tokenizer, "pt")
    return incremental_to_binary_attention_mask(incremental, "pt", num_classes=num_images)


class IdeficsLVLM(LVLM):
    """IDEFICS v1 (the paper's IDEFICS-9B and tiny random versions of it)."""

    model_type = "idefics"
    image_text = FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN

    def __init__(self, model: torch.nn.Module, processor: Any, task: Task, **kwargs: Any) -> None:
        config = model.config
        super().__init__(
            model,
            processor.tokenizer,
            task,
            processor=processor,
            max_length=int(config.max_position_embeddings),
            **kwargs,
        )
        self.config = config
        self.use_resampler = bool(config.use_resampler)
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        fake_id = self.tokenizer.convert_tokens_to_ids(FAKE_TOKEN)
        unk = self.tokenizer.unk_token_id
        if self.image_token_id == unk or fake_id == unk:
            raise LVLMError(
                f"the IDEFICS tokenizer has no {IMAGE_TOKEN!r}/{FAKE_TOKEN!r} special tokens"
            )
        # transformers renamed the forward's ``past_key_values`` to ``cache`` during 5.x.
        params = inspect.signature(model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._perceiver_4d = self.use_resampler and self._perceiver_wants_4d()

    @property
    def lm_head(self) -> Any:
        return self.model.lm_head

    # -- images -----------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[PromptImage]) -> torch.Tensor:
        """``[N, 3, H, W]`` in the model's dtype, through the processor's image transform."""
        pv = self.processor.image_processor([im.image for im in images], return_tensors="pt")
        pv = getattr(pv, "pixel_values", pv)
        return pv.to(self.device, dtype=self.model.dtype)

    def vision_shape(self, image: PromptImage) -> Hashable:
        return None  # every image is resized to the vision tower's square

    def vision_features(self, images: list[PromptImage]) -> list[torch.Tensor]:
        inner = self.model.model
        hidden = inner.vision_model(pixel_values=self.pixel_values(images)).last_hidden_state
        if self.use_resampler:
            hidden = inner.perceiver_resampler(hidden)
        return list(hidden.unbind(0))

    def _empty_feature(self) -> torch.Tensor:
        vc = self.config.vision_config
        if self.use_resampler:
            length = self.config.perceiver_config.resampler_n_latents
        else:
            length = (vc.image_size // vc.patch_size) ** 2 + 1
        return torch.zeros(length, vc.embed_dim, device=self.device, dtype=self.model.dtype)

    def _image_kwargs(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.use_resampler:
            return {"perceiver_embeddings": feats if self._perceiver_4d else feats.flatten(0, 1)}
        return {"image_encoder_embeddings": feats}

    def _perceiver_wants_4d(self) -> bool:
        """Which ``perceiver_embeddings`` layout this transformers version takes.

        Older 5.x releases unpack ``[B, N, L, D]``; newer ones take ``[B * N, L, D]`` (and would
        silently misread a 4-D tensor), so probe the 3-D form with a one-token forward.
        """
        ids = torch.tensor([[self.image_token_id]], device=self.device)
        try:
            with torch.inference_mode():
                self.model.model(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    perceiver_embeddings=self._empty_feature()[None],
                    image_attention_mask=torch.ones(1, 1, 1, dtype=torch.long, device=self.device),
                    use_cache=False,
                )
        except ValueError:
            return True
        return False

    # -- forward pieces ---------------------------------------------------------------------
    def hidden_states(self, span: Span) -> torch.Tensor:
        # Slot 0 holds the prefix's last image when the span follows a prefix: the span's
        # tokens before its first <image> still attend to it.
        offset = int(span.before[0] is not None)
        rows = [[b, *imgs] if b is not None else imgs for b, imgs in zip(span.before, span.images)]
        feats = self.stacked_features(rows, self._empty_feature())
        img_mask = image_attention_mask(span.ids, self.image_token_id, feats.shape[1], offset)
        cache = {self._cache_kw: span.cache} if span.cache is not None else {}
        return self.model.model(
            input_ids=span.ids,
            attention_mask=span.attention_mask,
            position_ids=span.position_ids,
            image_attention_mask=img_mask,
            use_cache=span.cache is not None,
            **cache,
            **self._image_kwargs(feats),
        ).last_hidden_state

    def reference_logits(self, enc: EncodedPrompt) -> torch.Tensor:
        """The plain model forward of one prompt: raw pixels, processor masks, full logits."""
        ids = torch.tensor([enc.input_ids], device=self.device)
        if enc.images:
            pixels = self.pixel_values(enc.images)[None]
            n = len(enc.images)
            mask = reference_image_attention_mask(ids.cpu(), self.tokenizer, n).to(self.device)
        else:
            pixels = self._pixels(1, 1)
            mask = torch.zeros(1, ids.shape[1], 1, dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            image_attention_mask=mask,
            use_cache=False,
        )
        return out.logits[0]

    def _pixels(self, rows: int, n: int) -> torch.Tensor:
        size = self.config.vision_config.image_size
        return torch.zeros(rows, n, 3, size, size, device=self.device, dtype=self.model.dtype)

    # -- generation -------------------------------------------------------------------------
    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        kw = super().generation_kwargs(**overrides)
        if int(kw.get("num_beams", 1)) == 1:
            kw.pop("length_penalty", None)  # only meaningful for beam search
        if self.config.additional_vocab_size and "logits_processor" not in kw:
            kw["logits_processor"] = _base_vocab_only(int(self.config.vocab_size))
        return kw

    def generate_inputs(
        self, ids: torch.Tensor, encs: Sequence[EncodedPrompt], reference: bool = False
    ) -> dict[str, Any]:
        """Raw pixels ``[B, N, 3, H, W]`` (zero images pad rows) and the image mask."""
        n = max(1, max(len(e.images) for e in encs))
        pixels = self._pixels(len(encs), n)
        flat = [im for e in encs for im in e.images]
        if flat:
            pv = self.pixel_values(flat)
            i = 0
            for b, e in enumerate(encs):
                pixels[b, : len(e.images)] = pv[i : i + len(e.images)]
                i += len(e.images)
        mask = image_attention_mask(ids, self.image_token_id, n)
        return {"pixel_values": pixels, "image_attention_mask": mask}


def _base_vocab_only(vocab_size: int) -> Any:
    """A logits processor that drops IDEFICS' additional vocabulary (the image placeholders).

    Generated text never contains image placeholders; and some transformers 5.x releases
    reshape beam-search scores with ``config.vocab_size``, which the decoupled extra logits
    would break.
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    class BaseVocabOnly(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores[:, :vocab_size]

    return LogitsProcessorList([BaseVocabOnly()])
