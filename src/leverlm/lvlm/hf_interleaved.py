"""Adapters for interleaved image-text models of transformers: Idefics2, Idefics3, Qwen2(.5)-VL.

These models take one token stream in which each image is a run of placeholder tokens; the
model replaces the placeholders' embeddings with the image's vision features (Idefics2: the
perceiver latents of the SigLIP output; Idefics3: pixel-shuffled SigLIP tiles; Qwen2-VL: the
2x2-merged ViT patches) and runs a plain causal LM over the result.

Prompts are plain interleaved text with the processor's own placeholders (no chat template by
default, see :class:`PromptTemplate`), tokenised exactly as the processor would tokenise them:

* Idefics2: ``<fake_token_around_image>`` + ``<image>`` x ``image_seq_len`` +
  ``<fake_token_around_image>``, a space inserted before text glued to the closing token (the
  processor's rule);
* Idefics3: per image, rows x cols tiles (``<fake_token_around_image><row_i_col_j><image>...``)
  + the global image (``<global-img>``), as ``Idefics3Processor.replace_image_token`` writes it;
* Qwen2-VL / Qwen2.5-VL: ``<|vision_start|>`` + ``<|image_pad|>`` x (grid_h * grid_w / 4) +
  ``<|vision_end|>``.

The fast path writes the cached vision features into the token embeddings at the
placeholder positions (``inputs_embeds``) and runs the text model alone. A prefix KV cache is
exact for all four families: Idefics' 1-D RoPE positions of the suffix are just offset by the
prefix length, and Qwen's 3-D M-RoPE positions of a token depend only on the tokens and image
grids before it, so the suffix's positions are the full prompt's sliced after the prefix
(:func:`mrope_position_ids`). Generation is the model's own ``generate`` on those embeddings;
:meth:`HFInterleavedLVLM.generate_reference` runs it on raw pixels, and the two agree.

:func:`load` loads every transformers family, IDEFICS (:mod:`leverlm.lvlm.idefics`) included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from leverlm.lvlm.base import (
    LVLM,
    EncodedPrompt,
    LVLMError,
    PromptImage,
    PromptItem,
    Sample,
    Span,
    is_local_path,
    resolve_dtype,
)
from leverlm.lvlm.idefics import IdeficsLVLM
from leverlm.tasks import Task


@dataclass(frozen=True)
class PromptTemplate:
    """Text placed around the images of a plain interleaved prompt.

    The defaults give the paper's prompt (``<image>`` + task text per ICD and for the query).
    Chat-tuned checkpoints may want e.g. ``query_prefix="User:"`` or
    ``icd_suffix="<end_of_utterance>"``; the scored answer always follows the query's split
    token directly.

    Args:
        icd_prefix: text before each ICD's image.
        query_prefix: text before the query's image.
        icd_suffix: text after each ICD's text (before ``task.icd_join``).
    """

    icd_prefix: str = ""
    query_prefix: str = ""
    icd_suffix: str = ""


def mrope_position_ids(
    input_ids: Sequence[int],
    grids: Sequence[Sequence[int]],
    image_token_id: int,
    spatial_merge_size: int,
) -> torch.Tensor:
    """Qwen2-VL's 3-D M-RoPE positions ``[3, T]`` of one unpadded prompt.

    Text tokens get the same running position on all three axes; an image's run of
    ``t * (h/m) * (w/m)`` placeholder tokens gets (temporal, row, column) positions offset by
    the running position, which then advances by ``max(h, w) / m``. A token's position depends
    only on what precedes it, which is what makes a prefix KV cache exact.

    Args:
        grids: ``(t, h, w)`` patch grid of each image, in order of appearance.
    """
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)
    is_image = ids == image_token_id
    n = int(ids.shape[0])
    out = torch.empty(3, n, dtype=torch.long)
    pos = 0  # running position
    grid_iter = iter(grids)
    # Segment boundaries: where the image/text type changes.
    change = torch.nonzero(is_image[1:] != is_image[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), n]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if start >= end:
            continue
        if not bool(is_image[start]):
            out[:, start:end] = torch.arange(pos, pos + end - start)
            pos += end - start
            continue
        # A run holds several images only when they are adjacent (no vision start/end tokens
        # between them); consume one grid per image.
        i = start
        while i < end:
            try:
                t, h, w = (int(x) for x in next(grid_iter))
            except StopIteration:
                raise LVLMError("more image placeholder tokens than image grids") from None
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            count = t * gh * gw
            if i + count > end:
                raise LVLMError(
                    f"an image with grid {(t, h, w)} needs {count} placeholder tokens, "
                    f"found {end - i}"
                )
            tt, hh, ww = torch.meshgrid(
                torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"
            )
            out[:, i : i + count] = torch.stack([tt, hh, ww]).reshape(3, -1) + pos
            pos += max(h, w) // spatial_merge_size
            i += count
    if next(grid_iter, None) is not None:
        raise LVLMError("more image grids than image placeholder runs")
    return out


class HFInterleavedLVLM(LVLM):
    """Shared pieces of the placeholder-token families (see the module docstring).

    Subclasses define the image layout (:meth:`layout`, :meth:`_layout_ids`), the processor
    inputs of raw images (:meth:`_pixel_inputs`), :meth:`vision_features` and, for M-RoPE,
    :meth:`position_ids`.
    """

    #: the image token the model overwrites with vision features.
    image_token: str = "<image>"
    #: special tokens never to be generated (image placeholders and layout tokens).
    banned_tokens: tuple[str, ...] = ()

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        task: Task,
        *,
        template: PromptTemplate | dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Wrap a loaded model + processor (see :func:`load`).

        Args:
            template: text around images (:class:`PromptTemplate` or its fields as a dict).
            kwargs: :class:`~leverlm.lvlm.base.LVLM` options (device, dtype, caches, ...).
        """
        config = model.config
        text_config = config.get_text_config()
        super().__init__(
            model,
            processor.tokenizer,
            task,
            processor=processor,
            max_length=int(getattr(text_config, "max_position_embeddings", 0) or 0) or None,
            **kwargs,
        )
        self.config = config
        self.text_config = text_config
        if isinstance(template, dict):
            template = PromptTemplate(**template)
        self.template = template or PromptTemplate()
        self.icd_end_text = self.template.icd_suffix
        self.image_token_id = int(config.image_token_id)
        if self.tokenizer.convert_tokens_to_ids(self.image_token) != self.image_token_id:
            raise LVLMError(
                f"tokenizer id of {self.image_token!r} "
                f"({self.tokenizer.convert_tokens_to_ids(self.image_token)}) differs from the "
                f"model config's image_token_id ({self.image_token_id})"
            )
        self.bad_words_ids = [
            [i]
            for t in self.banned_tokens
            if (i := self.tokenizer.convert_tokens_to_ids(t)) is not None
            and i != self.tokenizer.unk_token_id
        ]

    # -- family hooks -----------------------------------------------------------------------
    def _layout_ids(self, layout: Any) -> list[int]:
        """Placeholder token ids of an image with this layout."""
        raise NotImplementedError

    def _pixel_inputs(self, rows: Sequence[Sequence[PromptImage]]) -> dict[str, torch.Tensor]:
        """Model keyword arguments holding the raw pixels of each row's images (on device)."""
        raise NotImplementedError

    def _extra_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Further token-aligned model inputs (Qwen: ``mm_token_type_ids``)."""
        return {}

    def _image_meta(self, rows: Sequence[Sequence[PromptImage]]) -> dict[str, torch.Tensor]:
        """Non-pixel image inputs the model needs beside ``inputs_embeds`` (Qwen: grids)."""
        return {}

    @property
    def text_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings, layers, final norm) without the LM head."""
        raise NotImplementedError

    @property
    def kv_config(self) -> Any:
        return self.text_config

    # -- prompt -----------------------------------------------------------------------------
    def bos_text(self) -> str:
        """No context for the first chunk: the processors tokenise the prompt string with BOS
        added by the tokenizer's post-processor, so the first chunk starts the text (a
        sentencepiece-style tokenizer gives it its leading ``▁``; after a literal ``<s>`` it
        would not)."""
        return ""

    def _after_image(self, text: str) -> str:
        """Text as the processor writes it right after an image placeholder."""
        return text

    def icd_items(self, icd: Sample) -> list[PromptItem]:
        items = super().icd_items(icd)
        return [self.template.icd_prefix, items[0], self._after_image(items[1])]

    def query_items(self, query: Sample) -> list[PromptItem]:
        items = super().query_items(query)
        return [self.template.query_prefix, items[0], self._after_image(items[1])]

    def image_ids(self, image: PromptImage) -> list[int]:
        return self._layout_ids(self.cached_layout(image))

    # -- forward pieces ---------------------------------------------------------------------
    def _embed(
        self, ids: torch.Tensor, rows: Sequence[Sequence[PromptImage]], keys: Sequence[str]
    ) -> torch.Tensor:
        """Token embeddings with each row's (cached) image features at its placeholders."""
        embeds = self.text_model.get_input_embeddings()(ids)
        flat = [im for row in rows for im in row]
        if not flat:
            return embeds
        feats = torch.cat(self.image_features(flat), dim=0)
        mask = ids == self.image_token_id
        n_tokens = int(mask.sum())
        if n_tokens != feats.shape[0]:
            raise LVLMError(
                f"prompts for queries {list(keys)} have {n_tokens} image placeholder tokens but "
                f"their images give {feats.shape[0]} feature vectors"
            )
        # Boolean assignment fills row-major, i.e. images in prompt order row after row.
        embeds[mask] = feats.to(embeds.dtype)
        return embeds

    def hidden_states(self, span: Span) -> torch.Tensor:
        return self.text_model(
            inputs_embeds=self._embed(span.ids, span.images, span.keys),
            attention_mask=span.attention_mask,
            position_ids=span.position_ids,
            cache=span.cache,
            use_cache=span.cache is not None,
        ).last_hidden_state

    def reference_logits(self, enc: EncodedPrompt) -> torch.Tensor:
        """The model's plain forward of one prompt on raw pixels: full logits ``[T, V]``."""
        ids = torch.tensor([enc.input_ids], device=self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            use_cache=False,
            **self._pixel_inputs([enc.images]),
            **self._extra_inputs(ids),
        )
        return out.logits[0]

    # -- generation -------------------------------------------------------------------------
    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        kw = super().generation_kwargs(**overrides)
        if self.bad_words_ids and "bad_words_ids" not in kw:
            kw["bad_words_ids"] = self.bad_words_ids
        return kw

    def generate_inputs(
        self, ids: torch.Tensor, encs: Sequence[EncodedPrompt], reference: bool = False
    ) -> dict[str, Any]:
        """The prompt as ``inputs_embeds`` with the cached features in place (the ids go along
        for the model's bookkeeping, e.g. Qwen's M-RoPE positions); raw pixels for the
        reference."""
        rows = [e.images for e in encs]
        if reference:
            inputs = self._pixel_inputs(rows)
        else:
            embeds = self._embed(ids, rows, [e.query_key for e in encs])
            inputs = {"inputs_embeds": embeds, **self._image_meta(rows)}
        return {**inputs, **self._extra_inputs(ids)}

    def generate_reference(
        self,
        icd_seqs: Sequence[Sequence[Sample]],
        queries: Sequence[Sample],
        **generation_kwargs: Any,
    ) -> list[str]:
        """``model.generate`` on ids + raw pixels, as documented; equals :meth:`generate`."""
        return self.decode(
            self.generate_ids(icd_seqs, queries, reference=True, **generation_kwargs)
        )


# --------------------------------------------------------------------------------------------
# Idefics2 / Idefics3
# --------------------------------------------------------------------------------------------

FAKE_TOKEN = "<fake_token_around_image>"


class _IdeficsFamily(HFInterleavedLVLM):
    """Idefics2/3: SigLIP features (+ connector) at ``<image>`` tokens of a Mistral/Llama."""

    image_token = "<image>"

    @property
    def text_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    def _images_tensors(self, rows: Sequence[Sequence[PromptImage]]) -> dict[str, torch.Tensor]:
        """``pixel_values [B, N, 3, H, W]`` (zero tiles pad rows) + ``pixel_attention_mask``."""
        data = self.processor.image_processor(
            [[im.image for im in row] for row in rows], return_tensors="pt"
        )
        out = {"pixel_values": data["pixel_values"].to(self.device, dtype=self.model.dtype)}
        if "pixel_attention_mask" in data:
            out["pixel_attention_mask"] = data["pixel_attention_mask"].to(self.device)
        return out

    def _pixel_inputs(self, rows: Sequence[Sequence[PromptImage]]) -> dict[str, torch.Tensor]:
        if not any(rows):
            return {}
        return self._images_tensors(rows)

    def vision_features(self, images: list[PromptImage]) -> list[torch.Tensor]:
        # One image per row: the model drops the all-zero padding tiles and returns each
        # row's tiles' features concatenated in prompt order.
        inputs = self._images_tensors([[im] for im in images])
        out = self.model.model.get_image_features(**inputs, return_dict=True)
        return list(out.pooler_output)


class Idefics2LVLM(_IdeficsFamily):
    """Idefics2 (e.g. ``HuggingFaceM4/idefics2-8b-base``)."""

    model_type = "idefics2"
    banned_tokens = ("<image>", FAKE_TOKEN)

    def __init__(self, model: torch.nn.Module, processor: Any, task: Task, **kwargs: Any) -> None:
        super().__init__(model, processor, task, **kwargs)
        seq_len = int(processor.image_seq_len)
        one = f"{FAKE_TOKEN}{self.image_token * seq_len}{FAKE_TOKEN}"
        if getattr(processor.image_processor, "do_image_splitting", False):
            # 4 crops + the full image, adjacent fake tokens collapsed (the processor's rule)
            one = (one * 5).replace(FAKE_TOKEN * 2, FAKE_TOKEN)
        self.image_text = one
        self._placeholder_ids = self.text_ids(one, "")

    def _layout_ids(self, layout: Any) -> list[int]:
        return self._placeholder_ids

    def _after_image(self, text: str) -> str:
        # Idefics2Processor inserts a space between the closing fake token and a following
        # character that is neither whitespace nor '<'.
        if text and not text[0].isspace() and text[0] != "<":
            return " " + text
        return text


class Idefics3LVLM(_IdeficsFamily):
    """Idefics3 (e.g. ``HuggingFaceM4/Idefics3-8B-Llama3``): images split into tiles."""

    model_type = "idefics3"
    banned_tokens = (
        "<image>",
        FAKE_TOKEN,
        "<global-img>",
        *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)),
    )
    image_text = FAKE_TOKEN  # every placeholder run ends with it: the next chunk's context

    def layout(self, image: PromptImage) -> tuple[int, int]:
        data = self.processor.image_processor([[image.image]], return_row_col_info=True)
        return int(data["rows"][0][0]), int(data["cols"][0][0])

    def _layout_ids(self, layout: tuple[int, int]) -> list[int]:
        rows, cols = layout
        text = self.processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)
        return self.text_ids(text, "")


# --------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL
# --------------------------------------------------------------------------------------------


class QwenVLLVLM(HFInterleavedLVLM):
    """Qwen2-VL and Qwen2.5-VL (e.g. ``Qwen/Qwen2-VL-7B``, ``Qwen/Qwen2.5-VL-7B-Instruct``)."""

    model_type = "qwen2_vl"
    image_token = "<|image_pad|>"
    image_text = "<|vision_end|>"  # every placeholder run ends with it: the next chunk's context
    banned_tokens = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")

    def __init__(self, model: torch.nn.Module, processor: Any, task: Task, **kwargs: Any) -> None:
        super().__init__(model, processor, task, **kwargs)
        self.model_type = str(model.config.model_type)
        self.merge_size = int(model.config.vision_config.spatial_merge_size)
        self._start_ids = self.text_ids("<|vision_start|>", "")
        self._end_ids = self.text_ids("<|vision_end|>", "")

    @property
    def text_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def layout(self, image: PromptImage) -> tuple[int, int, int]:
        grid = self.processor.image_processor([image.image], return_tensors="pt")["image_grid_thw"]
        t, h, w = (int(x) for x in grid[0])
        return t, h, w

    def _layout_ids(self, layout: tuple[int, int, int]) -> list[int]:
        t, h, w = layout
        n = t * h * w // self.merge_size**2
        return self._start_ids + [self.image_token_id] * n + self._end_ids

    def _pixel_inputs(self, rows: Sequence[Sequence[PromptImage]]) -> dict[str, torch.Tensor]:
        flat = [im.image for row in rows for im in row]
        if not flat:
            return {}
        data = self.processor.image_processor(flat, return_tensors="pt")
        return {
            "pixel_values": data["pixel_values"].to(self.device, dtype=self.model.dtype),
            "image_grid_thw": data["image_grid_thw"].to(self.device),
        }

    def _image_meta(self, rows: Sequence[Sequence[PromptImage]]) -> dict[str, torch.Tensor]:
        # With the grids (and mm_token_type_ids) generate computes M-RoPE positions itself.
        grids = [self.cached_layout(im) for row in rows for im in row]
        if not grids:
            return {}
        return {"image_grid_thw": torch.tensor(grids, dtype=torch.long, device=self.device)}

    def _extra_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # 1 marks image placeholders: the model derives M-RoPE positions from it.
        return {"mm_token_type_ids": (ids == self.image_token_id).int()}

    def vision_features(self, images: list[PromptImage]) -> list[torch.Tensor]:
        inputs = self._pixel_inputs([images])
        out = self.model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
        )
        return list(out.pooler_output)

    def position_ids(
        self, encs: Sequence[EncodedPrompt], width: int, start: int = 0
    ) -> torch.Tensor:
        """``[3, B, width]`` M-RoPE positions of tokens ``start:start+width`` of each prompt."""
        out = torch.zeros(3, len(encs), width, dtype=torch.long)
        for b, enc in enumerate(encs):
            grids = [self.cached_layout(im) for im in enc.images]
            pos = mrope_position_ids(enc.input_ids, grids, self.image_token_id, self.merge_size)
            part = pos[:, start : start + width]
            out[:, b, : part.shape[1]] = part
        return out.to(self.device)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

_FAMILIES: dict[str, type[LVLM]] = {
    "idefics": IdeficsLVLM,
    "idefics2": Idefics2LVLM,
    "idefics3": Idefics3LVLM,
    "qwen2_vl": QwenVLLVLM,
    "qwen2_5_vl": QwenVLLVLM,
}


def load(
    model_type: str,
    path: str,
    task: Task,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> LVLM:
    """Load a transformers LVLM (IDEFICS, Idefics2/3, Qwen2(.5)-VL) from a folder or hub id,
    frozen, on ``device``.

    ``AutoModelForImageTextToText`` + ``AutoProcessor``; the folder's ``config.json`` must
    declare ``model_type``. ``kwargs`` go to the adapter (``template``, cache sizes,
    ``vision_batch_size``).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    family = _FAMILIES.get(model_type)
    if family is None:
        raise LVLMError(
            f"the transformers adapters cannot load model_type {model_type!r}; "
            f"they handle {', '.join(sorted(_FAMILIES))}"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and not is_local_path(path):
            raise  # load_lvlm says it: neither a folder nor in the local cache
        raise LVLMError(f"cannot read the model config of {path!r}: {exc}") from exc
    if config.model_type != model_type:
        raise LVLMError(
            f"checkpoint {path!r} holds a {config.model_type!r} model, not {model_type!r}"
        )
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise LVLMError(f"cannot load the processor of {path!r}: {exc}") from exc
    model_kw: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
    if attn_implementation:
        model_kw["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(path, **model_kw).to(device)
    return family(model, processor, task, device=device, dtype=dtype, **kwargs)
