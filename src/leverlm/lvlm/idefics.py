"""IDEFICS (v1) adapter: ``IdeficsForVisionText2Text`` + ``IdeficsProcessor``.

The prompt is what ``IdeficsProcessor`` builds: ``<s>`` + text, each image replaced by
``<fake_token_around_image><image><fake_token_around_image>``. Each text token cross-attends
only to the latest image before it (``image_attention_mask``: one-hot of the running image
count), through gated cross-attention layers.

Fast scoring path (:meth:`IdeficsLVLM.score`, :meth:`IdeficsLVLM.score_with_prefix`):

* vision features once per distinct image (LRU :class:`~leverlm.lvlm.base.FeatureCache`):
  the perceiver output when the model resamples (``perceiver_embeddings``), the vision
  encoder output otherwise (``image_encoder_embeddings``);
* the text model alone for hidden states, ``lm_head`` only at answer positions;
* right padding, masks from tensor ops (``cumsum`` of image tokens);
* a shared prefix (instruction + ICDs) encoded once and its self-attention KV cache expanded
  over the batch. Cross-attention has no cache: it only needs the images that suffix tokens
  attend to - the suffix's own images plus the prefix's last image, which the suffix's first
  token (``<fake_token_around_image>`` of the next image) still attends to.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from leverlm.lvlm.base import (
    LVLM,
    EncodedPrompt,
    LVLMError,
    PromptImage,
    Sample,
    ScoreResult,
    answer_token_logprobs,
    expand_kv_cache,
    kv_cache_tensors,
    pad_left,
    pad_right,
    resolve_dtype,
    span_mask,
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

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        task: Task,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        image_cache_size: int = 4096,
        vision_batch_size: int = 64,
        prefix_cache_size: int = 8,
    ) -> None:
        config = model.config
        super().__init__(
            model,
            processor.tokenizer,
            task,
            processor=processor,
            device=device,
            dtype=dtype,
            max_length=int(config.max_position_embeddings),
            image_cache_size=image_cache_size,
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
        self.vision_batch_size = vision_batch_size
        # transformers renamed the forward's ``past_key_values`` to ``cache`` during 5.x.
        params = inspect.signature(model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._perceiver_4d = self.use_resampler and self._perceiver_wants_4d()
        # prefix ids + image identities -> (per-layer KV of the prefix, its last image's feature)
        self._prefix_cache: OrderedDict[tuple, tuple[list, torch.Tensor | None]] = OrderedDict()
        self._prefix_cache_size = prefix_cache_size

    # -- images -----------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[PromptImage]) -> torch.Tensor:
        """``[N, 3, H, W]`` in the model's dtype, through the processor's image transform."""
        pv = self.processor.image_processor([im.image for im in images], return_tensors="pt")
        pv = getattr(pv, "pixel_values", pv)
        return pv.to(self.device, dtype=self.model.dtype)

    def _compute_features(self, images: list[PromptImage]) -> list[torch.Tensor]:
        """Vision features of new images (perceiver latents when the model resamples)."""
        inner = self.model.model
        out: list[torch.Tensor] = []
        for start in range(0, len(images), self.vision_batch_size):
            chunk = images[start : start + self.vision_batch_size]
            hidden = inner.vision_model(pixel_values=self.pixel_values(chunk)).last_hidden_state
            if self.use_resampler:
                hidden = inner.perceiver_resampler(hidden)
            out.extend(hidden.unbind(0))
        return out

    def image_features(self, rows: Sequence[Sequence[PromptImage]]) -> torch.Tensor:
        """``[B, N, L, D]`` cached features of each row's images, zero-padded to N images."""
        flat = [im for row in rows for im in row]
        feats = self.feature_cache.get(flat, self._compute_features)
        n = max(1, max((len(r) for r in rows), default=0))
        if feats:
            proto = feats[0]
        else:  # no image anywhere: the model still wants a (fully masked) image input
            proto = self._empty_feature()
        out = proto.new_zeros((len(rows), n, *proto.shape))
        i = 0
        for b, row in enumerate(rows):
            if row:
                out[b, : len(row)] = torch.stack(feats[i : i + len(row)])
                i += len(row)
        return out

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

    # -- reference --------------------------------------------------------------------------
    def reference_logits(self, enc: EncodedPrompt) -> torch.Tensor:
        """The plain model forward of one prompt: raw pixels, processor masks, full logits."""
        ids = torch.tensor([enc.input_ids], device=self.device)
        n = max(1, len(enc.images))
        if enc.images:
            pixels = self.pixel_values(enc.images)[None]
            mask = reference_image_attention_mask(ids.cpu(), self.tokenizer, n).to(self.device)
        else:
            vc = self.config.vision_config
            pixels = torch.zeros(
                1, 1, 3, vc.image_size, vc.image_size, device=self.device, dtype=self.model.dtype
            )
            mask = torch.zeros(1, ids.shape[1], 1, dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            image_attention_mask=mask,
            use_cache=False,
        )
        return out.logits[0]

    # -- fast scoring -----------------------------------------------------------------------
    def score(self, icd_seqs: Sequence[Sequence[Sample]], queries: Sequence[Sample]) -> ScoreResult:
        encs = self.encode_pairs(icd_seqs, queries)
        if not encs:
            return ScoreResult.cat([])
        with torch.inference_mode(), self.autocast():
            return self._score_encoded(encs)

    def _score_encoded(self, encs: Sequence[EncodedPrompt]) -> ScoreResult:
        ids, attn = pad_right([e.input_ids for e in encs], self.tok.pad_id, self.device)
        feats = self.image_features([e.images for e in encs])
        img_mask = image_attention_mask(ids, self.image_token_id, feats.shape[1])
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        hidden = self.model.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=position_ids,
            image_attention_mask=img_mask,
            use_cache=False,
            **self._image_kwargs(feats),
        ).last_hidden_state
        starts = torch.tensor([e.answer_start for e in encs], device=self.device)
        answer_mask = span_mask(starts, attn.sum(-1), ids.shape[1])
        lp = answer_token_logprobs(hidden, ids, answer_mask, self.model.lm_head)
        return ScoreResult.from_token_logprobs(lp, answer_mask).to("cpu")

    def score_with_prefix(
        self,
        prefix_icds: Sequence[Sample],
        suffix_icd_seqs: Sequence[Sequence[Sample]],
        queries: Sequence[Sample],
    ) -> ScoreResult:
        """Score ``prefix_icds + suffix`` per row, encoding instruction + prefix ICDs once."""
        if len(suffix_icd_seqs) != len(queries):
            raise LVLMError(
                f"got {len(suffix_icd_seqs)} suffix ICD sequences but {len(queries)} queries"
            )
        encs = []
        for suffix, query in zip(suffix_icd_seqs, queries, strict=True):
            prompt = self.build_prompt(list(prefix_icds) + list(suffix), query)
            enc = self.encode(prompt, split_image=len(prefix_icds))
            if enc.num_answer_tokens == 0:
                raise LVLMError(f"query {enc.query_key!r} has an answer with no tokens")
            self.check_length(enc)
            encs.append(enc)
        if not encs:
            return ScoreResult.cat([])
        p, k = encs[0].prefix_len, encs[0].prefix_images
        prefix_ids = encs[0].input_ids[:p]
        if any(e.input_ids[:p] != prefix_ids or e.prefix_len != p for e in encs):
            # A tokenizer that merges across the prefix boundary: no shared prefix to reuse.
            with torch.inference_mode(), self.autocast():
                return self._score_encoded(encs)
        with torch.inference_mode(), self.autocast():
            prefix_kv, last_feat = self._encode_prefix(prefix_ids, encs[0].images[:k])
            return self._score_suffixes(encs, p, k, prefix_kv, last_feat)

    def _encode_prefix(
        self, prefix_ids: list[int], images: list[PromptImage]
    ) -> tuple[list, torch.Tensor | None]:
        """Self-attention KV of the shared prefix (batch 1), LRU-cached across calls."""
        key = (tuple(prefix_ids), tuple(im.ident for im in images))
        hit = self._prefix_cache.get(key)
        if hit is not None:
            self._prefix_cache.move_to_end(key)
            return hit
        from transformers import DynamicCache

        ids = torch.tensor([prefix_ids], device=self.device)
        feats = self.image_features([images])
        img_mask = image_attention_mask(ids, self.image_token_id, feats.shape[1])
        cache = DynamicCache(config=self.config)
        self.model.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(ids.shape[1], device=self.device)[None],
            image_attention_mask=img_mask,
            use_cache=True,
            **{self._cache_kw: cache},
            **self._image_kwargs(feats),
        )
        result = (kv_cache_tensors(cache), feats[0, len(images) - 1] if images else None)
        self._prefix_cache[key] = result
        if len(self._prefix_cache) > self._prefix_cache_size:
            self._prefix_cache.popitem(last=False)
        return result

    def _score_suffixes(
        self,
        encs: Sequence[EncodedPrompt],
        p: int,
        k: int,
        prefix_kv: list,
        last_feat: torch.Tensor | None,
    ) -> ScoreResult:
        b = len(encs)
        ids, attn = pad_right([e.input_ids[p:] for e in encs], self.tok.pad_id, self.device)
        rows = [e.images[k:] for e in encs]
        feats = self.image_features(rows)
        offset = 0
        if last_feat is not None:
            # Slot 0: the prefix's last image, attended to by suffix tokens before the
            # suffix's first <image> (the leading <fake_token_around_image>).
            feats = torch.cat([last_feat.expand(b, 1, *last_feat.shape), feats], dim=1)
            offset = 1
        img_mask = image_attention_mask(ids, self.image_token_id, feats.shape[1], offset=offset)
        full_attn = torch.cat([attn.new_ones(b, p), attn], dim=1)
        position_ids = p + torch.arange(ids.shape[1], device=self.device)[None].expand(b, -1)
        hidden = self.model.model(
            input_ids=ids,
            attention_mask=full_attn,
            position_ids=position_ids,
            image_attention_mask=img_mask,
            use_cache=True,
            **{self._cache_kw: expand_kv_cache(prefix_kv, b, self.config)},
            **self._image_kwargs(feats),
        ).last_hidden_state
        starts = torch.tensor([e.answer_start - p for e in encs], device=self.device)
        answer_mask = span_mask(starts, attn.sum(-1), ids.shape[1])
        lp = answer_token_logprobs(hidden, ids, answer_mask, self.model.lm_head)
        return ScoreResult.from_token_logprobs(lp, answer_mask).to("cpu")

    # -- generation -------------------------------------------------------------------------
    def generate(
        self,
        icd_seqs: Sequence[Sequence[Sample]],
        queries: Sequence[Sample],
        **generation_kwargs: Any,
    ) -> list[str]:
        """Batched generation with the task's settings, decoded and post-processed."""
        ids = self.generate_ids(icd_seqs, queries, **generation_kwargs)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [self.task.postprocess(t) for t in texts]

    def generate_ids(
        self,
        icd_seqs: Sequence[Sequence[Sample]],
        queries: Sequence[Sample],
        **generation_kwargs: Any,
    ) -> list[list[int]]:
        """New token ids per query (up to, not including, EOS) from left-padded ``generate``.

        Only the base vocabulary is generated (never the image placeholder tokens).
        """
        kw = self.generation_kwargs(**generation_kwargs)
        if int(kw.get("num_beams", 1)) == 1:
            kw.pop("length_penalty", None)  # only meaningful for beam search
        encs = self.encode_pairs(
            icd_seqs, queries, with_answer=False, extra_tokens=int(kw["max_new_tokens"])
        )
        if not encs:
            return []
        ids, attn = pad_left([e.input_ids for e in encs], self.tok.pad_id, self.device)
        n = max(1, max(len(e.images) for e in encs))
        vc = self.config.vision_config
        pixels = torch.zeros(
            len(encs),
            n,
            3,
            vc.image_size,
            vc.image_size,
            device=self.device,
            dtype=self.model.dtype,
        )
        flat = [im for e in encs for im in e.images]
        if flat:
            pv = self.pixel_values(flat)
            i = 0
            for b, e in enumerate(encs):
                pixels[b, : len(e.images)] = pv[i : i + len(e.images)]
                i += len(e.images)
        img_mask = image_attention_mask(ids, self.image_token_id, n)
        if self.config.additional_vocab_size and "logits_processor" not in kw:
            kw["logits_processor"] = _base_vocab_only(int(self.config.vocab_size))
        with torch.inference_mode(), self.autocast():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=attn,
                pixel_values=pixels,
                image_attention_mask=img_mask,
                pad_token_id=self.tok.pad_id,
                eos_token_id=self.tok.eos_id,
                do_sample=False,
                **kw,
            )
        result = []
        for row in out[:, ids.shape[1] :].tolist():
            if self.tok.eos_id in row:
                row = row[: row.index(self.tok.eos_id)]
            result.append(row)
        return result


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


def load(
    model_type: str,
    path: str,
    task: Task,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    image_cache_size: int = 4096,
    **kwargs: Any,
) -> IdeficsLVLM:
    """Load IDEFICS from a folder or hub id (``from_pretrained``), frozen, on ``device``."""
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    if model_type != "idefics":
        raise LVLMError(f"the IDEFICS adapter cannot load model_type {model_type!r}")
    model_kw: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
    if attn_implementation:
        model_kw["attn_implementation"] = attn_implementation
    model = IdeficsForVisionText2Text.from_pretrained(path, **model_kw).to(device)
    processor = AutoProcessor.from_pretrained(path)
    return IdeficsLVLM(
        model,
        processor,
        task,
        device=device,
        dtype=dtype,
        image_cache_size=image_cache_size,
        **kwargs,
    )
