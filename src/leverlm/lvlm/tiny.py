"""Tiny randomly initialised versions of every supported LVLM architecture: one builder.

:func:`build_tiny` writes a folder that :func:`leverlm.lvlm.load_lvlm` loads through the same
code path as a real checkpoint: ``save_pretrained`` of the model class the real checkpoint
uses, plus its real processor class (image processor configured for small images, a BPE
tokenizer trained in-process on :data:`TINY_CORPUS` with the special tokens that processor
needs). Nothing is downloaded. The folder is written to a temporary sibling and moved into
place at the end, so an interrupted build never leaves a half folder behind.

Sizes: ``test`` (hidden 32-64, 2 layers, 16-64 px images: milliseconds per forward on a CPU;
parity tests) and ``bench`` (hidden 256, 4 layers, 224 px images: the model, not Python,
dominates a benchmark).

CLI: ``python -m leverlm.lvlm.tiny idefics OUT_DIR [--size bench] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from leverlm.errors import LeverError
from leverlm.utils import atomic_replace_dir

# Words and sentences the tiny tokenizers are trained on: the paper's prompt templates, the
# easy-vqa vocabulary and a few caption words, so prompts tokenise into a realistic mix of
# whole words and sub-words.
TINY_CORPUS: tuple[str, ...] = (
    "Instruction: provide an answer to the question. Use the image to answer.",
    "Question:What color is the shape? Short answer:red",
    "Question:What shape is in the image? Short answer:circle",
    "Question:Is there a blue shape in the image? Short answer:yes",
    "Question:Does the image contain a triangle? Short answer:no",
    "Question:Is there not a green rectangle? Short answer:no",
    "Question:What is the color of the rectangle? Short answer:teal",
    "Question:How many dogs are there? Short answer:2",
    "Caption: a dog sitting on a red sofa next to a window.",
    "Caption: two people riding bikes down a city street.",
    "Caption: a plate of food with broccoli and rice on a table.",
    "Caption: a man holding a surfboard on the beach.",
    "red green blue black gray teal brown yellow white orange purple pink",
    "circle rectangle triangle square shape color image picture photo",
    "yes no one two three four five six seven eight nine ten zero",
    "User: Assistant: Answer: the a an of in on with and to is are there what which how",
)

# Added to every BPE alphabet so any ASCII prompt tokenises without unknown pieces.
_ALPHABET: list[str] = sorted(set(string.printable) - set("\x0b\x0c\r"))

SIZES = ("test", "bench")

FAKE = "<fake_token_around_image>"
IDEFICS_SPECIAL_TOKENS = (FAKE, "<image>")
#: Idefics3's special tokens: bos, eos, pad first, then the image markers and its tiling
#: tokens (part of its processor's vocabulary even where tiling is unused).
IDEFICS3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    FAKE,
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)),
)


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------


def train_bpe(
    corpus: Iterable[str] = TINY_CORPUS,
    vocab_size: int = 512,
    *,
    style: str = "metaspace",
    special_tokens: Sequence[str] = (),
    byte_tokens: bool = False,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a small BPE in-process -> ``(vocab, merges)`` for a tokenizer class's constructor.

    Args:
        style: ``"metaspace"`` (sentencepiece-like, Llama/Mistral: spaces become ``▁``) or
            ``"byte_level"`` (GPT-2/Qwen-like: bytes mapped to printable characters).
        special_tokens: placed first in the vocabulary, in this order (ids 0, 1, ...).
        byte_tokens: add Llama's byte-fallback pieces ``<0x00>``..``<0xFF>`` right after the
            special tokens (as Llama's vocabulary has them), so no character is ever dropped.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if style == "metaspace":
        tk = Tokenizer(models.BPE(unk_token=special_tokens[0] if special_tokens else None))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first", split=False
        )
        alphabet = [("▁" if c == " " else c) for c in _ALPHABET]
    elif style == "byte_level":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        raise ValueError(f"unknown BPE style {style!r}; use 'metaspace' or 'byte_level'")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tk.train_from_iterator(list(corpus), trainer)
    model = json.loads(tk.to_str())["model"]
    trained: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Re-number: special tokens, then (optionally) byte pieces, then the trained pieces in order.
    vocab: dict[str, int] = {}
    for tok in special_tokens:
        vocab[tok] = len(vocab)
    if byte_tokens:
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    return vocab, merges  # type: ignore[return-value]


def llama_tokenizer(
    additional_special_tokens: Sequence[str] = (),
    vocab_size: int = 512,
    corpus: Iterable[str] = TINY_CORPUS,
    pad_token: str | None = "<unk>",
    **kwargs: Any,
) -> Any:
    """A Llama-style tokenizer (``LlamaTokenizer``: byte-fallback BPE, ``▁`` spaces, BOS ``<s>``).

    ``additional_special_tokens`` get the ids right after the base vocabulary (IDEFICS' image
    tokens live there, in its "additional vocabulary").
    """
    from transformers import LlamaTokenizer

    vocab, merges = train_bpe(
        corpus,
        vocab_size,
        style="metaspace",
        special_tokens=("<unk>", "<s>", "</s>"),
        byte_tokens=True,
    )
    tok = LlamaTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, **kwargs)
    if additional_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(additional_special_tokens)})
    return tok


def byte_level_tokenizer(
    special_tokens: Sequence[str],
    *,
    bos: str | None,
    eos: str,
    pad: str,
    vocab_size: int = 512,
) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` (Llama 3 style) trained in-process.

    Args:
        special_tokens: all special tokens, given ids 0..n-1 in this order (must include
            ``bos``/``eos``/``pad``).
        bos: prepended by ``tokenizer(text)`` like Llama 3's tokenizer; ``None`` for none.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    missing = [t for t in (bos, eos, pad) if t is not None and t not in special_tokens]
    if missing:
        raise ValueError(f"special tokens {missing} must be listed in special_tokens")
    vocab, merges = train_bpe(
        vocab_size=vocab_size, style="byte_level", special_tokens=tuple(special_tokens)
    )
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    named = {bos, eos, pad}
    kw: dict[str, Any] = dict(
        tokenizer_object=tk,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in special_tokens if t not in named],
    )
    if bos is not None:
        kw["bos_token"] = bos
    return PreTrainedTokenizerFast(**kw)


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------


def _text_dims(size: str) -> dict[str, int]:
    """Decoder sizes shared by every family."""
    values = (64, 128, 2, 4, 2) if size == "test" else (256, 688, 4, 8, 4)
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return dict(zip((*names, "num_key_value_heads"), values, strict=True))


def _vocab_size(size: str) -> int:
    return 512 if size == "test" else 1024


def _siglip(size: str) -> dict[str, int]:
    """Idefics' SigLIP tower: 32 px / patch 8 (test) or 224 px / patch 16 (bench)."""
    values = (32, 64, 2, 2, 32, 8) if size == "test" else (192, 768, 4, 4, 224, 16)
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return dict(zip((*names, "image_size", "patch_size"), values, strict=True))


def _token_ids(tok: Any) -> dict[str, int | None]:
    return dict(
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )


def _text_config(model_type: str, tok: Any, size: str) -> dict[str, Any]:
    """The decoder config of the Idefics families."""
    return dict(
        model_type=model_type,
        vocab_size=len(tok),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **_text_dims(size),
        **_token_ids(tok),
    )


def _save(model: Any, processor: Any, folder: Path) -> None:
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# --------------------------------------------------------------------------------------------
# IDEFICS (v1): vision tower + perceiver resampler + gated cross-attention into Llama
# --------------------------------------------------------------------------------------------


_IDEFICS_TEXT = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "cross_layer_interval",
    "max_position_embeddings",
)
_IDEFICS_VISION = (
    "embed_dim",
    "image_size",
    "patch_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_PERCEIVER = ("resampler_n_latents", "resampler_depth", "resampler_n_heads", "resampler_head_dim")

# size -> text (hidden, intermediate, layers, heads, cross_layer_interval, context),
# vision (width, image size, patch, intermediate, layers, heads),
# perceiver (latents, depth, heads, head dim)
_IDEFICS_DIMS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "test": ((64, 128, 2, 4, 1, 512), (32, 30, 10, 64, 2, 2), (4, 1, 2, 16)),
    "bench": ((256, 688, 4, 8, 2, 1024), (192, 224, 16, 768, 4, 4), (16, 2, 4, 48)),
    "9b": ((4096, 11008, 32, 32, 4, 2048), (1280, 224, 14, 5120, 32, 16), (64, 6, 16, 96)),
}


def idefics_config_kwargs(size: str = "test") -> dict[str, Any]:
    """``IdeficsConfig`` arguments of a tiny IDEFICS (``size``: ``test`` | ``bench`` | ``9b``).

    ``9b`` is the real IDEFICS-9B architecture (for the GPU benchmark; built without weights).
    The tiny ones keep the 9B's structure: a perceiver resampler, gated cross-attention every
    ``cross_layer_interval`` layers, a decoupled 2-token additional vocabulary.
    """
    if size not in _IDEFICS_DIMS:
        raise LeverError(f"unknown IDEFICS size {size!r}; use one of test, bench, 9b")
    text, vision, perceiver = _IDEFICS_DIMS[size]
    kw = dict(
        additional_vocab_size=len(IDEFICS_SPECIAL_TOKENS),
        alpha_type="float",
        alpha_initializer="zeros",
        use_resampler=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        freeze_text_layers=True,
        freeze_vision_layers=True,
        **dict(zip(_IDEFICS_TEXT, text, strict=True)),
        vision_config=dict(zip(_IDEFICS_VISION, vision, strict=True)),
        perceiver_config=dict(use_resampler=True, **dict(zip(_PERCEIVER, perceiver, strict=True))),
    )
    return kw | {"vocab_size": 32000} if size == "9b" else kw


def _idefics(folder: Path, seed: int, size: str, **config_overrides: Any) -> None:
    """``IdeficsForVisionText2Text`` + ``IdeficsProcessor``; ``config_overrides`` replace
    top-level ``IdeficsConfig`` fields (e.g. ``use_resampler``)."""
    import torch
    from transformers import (
        IdeficsConfig,
        IdeficsForVisionText2Text,
        IdeficsImageProcessor,
        IdeficsProcessor,
    )

    tokenizer = llama_tokenizer(IDEFICS_SPECIAL_TOKENS, vocab_size=_vocab_size(size))
    base_vocab = len(tokenizer) - len(IDEFICS_SPECIAL_TOKENS)
    kw = idefics_config_kwargs(size) | {"vocab_size": base_vocab} | config_overrides
    if not kw.get("use_resampler", True):
        kw["perceiver_config"] = dict(kw["perceiver_config"], use_resampler=False)
    config = IdeficsConfig(**kw)
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config)
    # Zero-initialised gates (the config's scheme, as in the 9B) would hide the images from
    # the text; random gates make images matter, so the parity tests can see image bugs.
    # (transformers' own "normal" init fails for float gates, hence set here.)
    with torch.no_grad():
        for layer in model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.normal_(0.0, 1.0)
            layer.alpha_dense.normal_(0.0, 1.0)
    image_processor = IdeficsImageProcessor(image_size=config.vision_config.image_size)
    _save(model, IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer), folder)


# --------------------------------------------------------------------------------------------
# Idefics2 (SigLIP + perceiver resampler + Mistral)
# --------------------------------------------------------------------------------------------


def _idefics2(folder: Path, seed: int, size: str, image_splitting: bool = False) -> None:
    """``Idefics2ForConditionalGeneration`` + ``Idefics2Processor``.

    4 (test) / 16 (bench) perceiver latents per image; images keep their aspect ratio within
    the edge limits and are padded per batch (``pixel_attention_mask``). Llama-style tokenizer
    (Mistral's), BOS prepended. ``image_splitting``: the image processor's
    ``do_image_splitting`` (4 crops + the image, 5 x the latents per image); off by default,
    as for idefics2-8b.
    """
    import torch
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessor,
        Idefics2Processor,
    )

    test = size == "test"
    tok = llama_tokenizer(
        [FAKE, "<image>", "<end_of_utterance>"], vocab_size=_vocab_size(size), add_bos_token=True
    )
    latents = 4 if test else 16
    image_processor = Idefics2ImageProcessor(
        size={"shortest_edge": 16, "longest_edge": 32}
        if test
        else {"shortest_edge": 112, "longest_edge": 224},
        do_image_splitting=image_splitting,
    )
    processor = Idefics2Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=latents
    )
    text = _text_dims(size)
    config = Idefics2Config(
        text_config=_text_config("mistral", tok, size),
        vision_config=_siglip(size),
        perceiver_config=dict(
            hidden_size=text["hidden_size"],
            resampler_n_latents=latents,
            resampler_depth=1 if test else 2,
            resampler_n_heads=2 if test else 4,
            resampler_head_dim=16 if test else 32,
            num_key_value_heads=1 if test else 2,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    _save(Idefics2ForConditionalGeneration(config), processor, folder)


# --------------------------------------------------------------------------------------------
# Idefics3 (SigLIP + pixel shuffle + Llama 3), images split into tiles
# --------------------------------------------------------------------------------------------


def _idefics3(folder: Path, seed: int, size: str) -> None:
    """``Idefics3ForConditionalGeneration`` + ``Idefics3Processor``.

    Tiles of the vision tower's image size (32 px -> 4 tokens; bench 224 px -> 49 tokens,
    pixel shuffle by 2); images are resized to twice that longest edge and split into up to
    2x2 tiles + the global image, so prompts carry the processor's ``<row_i_col_j>`` /
    ``<global-img>`` layout tokens, as with the real model. Byte-level tokenizer (Llama 3's).
    """
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    bos, eos, pad = IDEFICS3_SPECIAL_TOKENS[:3]
    tok = byte_level_tokenizer(
        IDEFICS3_SPECIAL_TOKENS, bos=bos, eos=eos, pad=pad, vocab_size=_vocab_size(size)
    )
    vision = _siglip(size)
    tile = vision["image_size"]
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 2 * tile},
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
    )
    seq_len = (tile // vision["patch_size"]) ** 2 // 4
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len
    )
    config = Idefics3Config(
        text_config=_text_config("llama", tok, size),
        vision_config=vision,
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    _save(Idefics3ForConditionalGeneration(config), processor, folder)


# --------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL (native-resolution ViT + 2x2 patch merger + Qwen2 with M-RoPE)
# --------------------------------------------------------------------------------------------

_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _qwen_tokenizer(size: str) -> Any:
    """``Qwen2Tokenizer`` (byte-level BPE, no BOS, pads with ``<|endoftext|>``)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(
        vocab_size=_vocab_size(size), style="byte_level", special_tokens=_QWEN_SPECIALS
    )
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIALS[1:])})
    return tok


def _qwen_common(tok: Any, size: str) -> dict[str, Any]:
    """Text config (M-RoPE) and special token ids shared by Qwen2-VL and Qwen2.5-VL."""
    text = _text_dims(size)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2  # rotary frequencies, split over (temporal, height, width)
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    return dict(
        text_config=dict(
            vocab_size=len(tok),
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e4},
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **text,
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )


def _qwen_patch(size: str) -> int:
    return 4 if size == "test" else 14


def _qwen_processor(processor_cls: Any, tok: Any, size: str) -> Any:
    """The real processor; test: 4 px patches, 16-32 px images -> 4-16 tokens after 2x2 merge;
    bench: 14 px patches, 112-224 px images -> 16-64 tokens."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    patch = _qwen_patch(size)
    lo, hi = (16, 32) if size == "test" else (112, 224)
    kw = dict(
        size={"shortest_edge": lo * lo, "longest_edge": hi * hi},
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
    )
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(**kw),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**kw),
    )


def _qwen2_vl(folder: Path, seed: int, size: str) -> None:
    """``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor``."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok = _qwen_tokenizer(size)
    test = size == "test"
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=2 if test else 4,
            embed_dim=32 if test else 192,
            hidden_size=_text_dims(size)["hidden_size"],
            num_heads=2 if test else 4,
            mlp_ratio=2 if test else 4,
            patch_size=_qwen_patch(size),
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **_qwen_common(tok, size),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    _save(model, _qwen_processor(Qwen2VLProcessor, tok, size), folder)


def _qwen2_5_vl(folder: Path, seed: int, size: str) -> None:
    """``Qwen2_5_VLForConditionalGeneration`` + ``Qwen2_5_VLProcessor``: its vision tower mixes
    windowed attention (windows of 2x2 merged patches) with a full-attention last block, like
    the real model."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    tok = _qwen_tokenizer(size)
    test = size == "test"
    depth = 2 if test else 4
    patch = _qwen_patch(size)
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=depth,
            hidden_size=32 if test else 192,
            intermediate_size=64 if test else 512,
            num_heads=2 if test else 4,
            out_hidden_size=_text_dims(size)["hidden_size"],
            patch_size=patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=4 * patch,
            fullatt_block_indexes=[depth - 1],
        ),
        **_qwen_common(tok, size),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _save(model, _qwen_processor(Qwen2_5_VLProcessor, tok, size), folder)


# --------------------------------------------------------------------------------------------
# OpenFlamingo (open_clip ViT + perceiver + gated cross-attention into a causal LM)
# --------------------------------------------------------------------------------------------


def _clip_config(size: str = "test") -> dict[str, Any]:
    """An ``open_clip_config.json`` for a tiny open_clip ViT (``local-dir:`` schema)."""
    test = size == "test"
    return {
        "model_cfg": {
            "embed_dim": 32 if test else 128,
            "vision_cfg": {
                "image_size": 32 if test else 224,
                "layers": 1 if test else 4,
                "width": 32 if test else 192,
                "head_width": 16 if test else 48,
                "patch_size": 8 if test else 16,
            },
            "text_cfg": {
                "context_length": 16,
                "vocab_size": 64,
                "width": 32,
                "heads": 2,
                "layers": 1,
            },
        },
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }


def _flamingo(folder: Path, seed: int, size: str, lm: str = "llama") -> None:
    """A folder in the layout :func:`leverlm.lvlm.flamingo.load` reads: ``flamingo.json``
    (the ``create_model_and_transforms`` arguments), ``checkpoint.pt`` (the Flamingo state
    dict), ``clip/`` (an open_clip ``local-dir:`` folder) and ``lm/`` (a tiny causal LM + its
    tokenizer with ``<|endofchunk|>`` and ``<image>``). Needs the ``open_flamingo`` package.

    ``lm``: ``llama`` (Llama LM, Llama tokenizer with BOS) or ``mpt`` (transformers' native
    ``MptForCausalLM`` with ALiBi and a byte-level tokenizer without BOS: the structure of
    OpenFlamingo-3B/9B's MPT language models).
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    from leverlm.lvlm.flamingo import FLAMINGO_SPEC, create_flamingo

    if lm not in ("llama", "mpt"):
        raise LeverError(f"unknown tiny Flamingo language model {lm!r}; use 'llama' or 'mpt'")
    lm_dir, clip_dir = folder / "lm", folder / "clip"
    lm_dir.mkdir()
    clip_dir.mkdir()
    _write_flamingo_lm(lm_dir, lm, size, seed)
    (clip_dir / "open_clip_config.json").write_text(json.dumps(_clip_config(size), indent=2))
    clip = open_clip.CLIP(**_clip_config(size)["model_cfg"])
    save_file(clip.state_dict(), str(clip_dir / "open_clip_model.safetensors"))
    spec = {
        "clip_vision_encoder_path": "local-dir:clip",
        "clip_vision_encoder_pretrained": None,
        "lang_encoder_path": "lm",
        "tokenizer_path": "lm",
        "cross_attn_every_n_layers": 1,
        "checkpoint": "checkpoint.pt",
    }
    model, _, _ = create_flamingo({**spec, "checkpoint": None}, folder)
    # OpenFlamingo initialises its gates to 0 (images ignored); open them so images change
    # the LM's output and the parity tests can see image bugs.
    with torch.no_grad():
        for layer in model.lang_encoder.gated_cross_attn_layers:
            if layer is not None:
                layer.attn_gate.fill_(0.5)
                layer.ff_gate.fill_(0.5)
    torch.save(model.state_dict(), folder / "checkpoint.pt")
    (folder / FLAMINGO_SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def _write_flamingo_lm(lm_dir: Path, lm: str, size: str, seed: int) -> None:
    """The tiny language model + tokenizer folder that open_flamingo wraps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM

    dims = _text_dims(size)
    if lm == "llama":
        tok = llama_tokenizer(
            ["<|endofchunk|>", "<image>"], vocab_size=_vocab_size(size), add_bos_token=True
        )
        config: Any = LlamaConfig(
            vocab_size=len(tok),
            # 2.5x the default init: context (ICDs, their order) visibly moves the logits
            initializer_range=0.05,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            **dims,
            **_token_ids(tok),
        )
        model_cls: Any = LlamaForCausalLM
    else:
        # GPT-NeoX-style tokenizer of MPT: byte-level, no BOS, <|endoftext|> ends and pads.
        tok = byte_level_tokenizer(
            ["<|endoftext|>", "<|endofchunk|>", "<image>"],
            bos=None,
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            vocab_size=_vocab_size(size),
        )
        config = MptConfig(
            d_model=dims["hidden_size"],
            n_heads=dims["num_attention_heads"],
            n_layers=dims["num_hidden_layers"],
            expansion_ratio=dims["intermediate_size"] // dims["hidden_size"],
            max_seq_len=4096,
            vocab_size=len(tok),
            **_token_ids(tok),
        )
        model_cls = MptForCausalLM
    tok.save_pretrained(lm_dir)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(lm_dir)


# --------------------------------------------------------------------------------------------
# the builder + CLI
# --------------------------------------------------------------------------------------------

# model_type -> writer(folder, seed, size, **options)
_BUILDERS: dict[str, Callable[..., None]] = {
    "idefics": _idefics,
    "idefics2": _idefics2,
    "idefics3": _idefics3,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "flamingo": _flamingo,
}


def tiny_model_types() -> list[str]:
    """Model types :func:`build_tiny` can build."""
    return sorted(_BUILDERS)


def build_tiny(
    model_type: str, out_dir: str | Path, seed: int = 0, size: str = "test", **options: Any
) -> Path:
    """Build a tiny random ``model_type`` checkpoint folder loadable by ``load_lvlm``.

    Args:
        size: ``test`` or ``bench`` (see the module docstring).
        options: the type's options: IDEFICS config overrides (e.g. ``use_resampler=False``),
            Idefics2 ``image_splitting``, Flamingo ``lm`` (``llama`` | ``mpt``).
    """
    if model_type not in _BUILDERS:
        raise LeverError(
            f"unknown model_type {model_type!r} for a tiny model; "
            f"known: {', '.join(tiny_model_types())}"
        )
    if size not in SIZES:
        raise LeverError(f"unknown tiny size {size!r}; use one of {', '.join(SIZES)}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _BUILDERS[model_type](tmp, seed, size, **options)
        atomic_replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# synthetic samples (tests, benchmarks, smoke runs)
# --------------------------------------------------------------------------------------------

_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
_SHAPES = ("circle", "rectangle", "triangle")
_QUESTIONS = (
    ("What color is the shape?", "color"),
    ("What shape is in the image?", "shape"),
    ("Is there a {color} shape in the image?", "yes"),
    ("Does the image not contain a {shape}?", "no"),
    ("What is the color of the {shape} in the picture?", "color"),
)


def synthetic_samples(
    n: int,
    seed: int = 0,
    image_size: tuple[int, int] = (64, 48),
    key_prefix: str = "tiny",
) -> list[dict[str, Any]]:
    """``n`` easy-vqa-like samples (a coloured shape on a background) with VQA *and* caption
    fields, in the collection sample format (``__key__``, ``position``, ``image``, fields).

    Questions and answers vary in length, so batches of them need padding.
    """
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for i in range(n):
        color, shape = rng.choice(_COLORS), rng.choice(_SHAPES)
        bg = tuple(rng.randrange(256) for _ in range(3))
        img = Image.new("RGB", image_size, bg)
        w, h = image_size
        box = sorted(rng.sample(range(w), 2)), sorted(rng.sample(range(h), 2))
        xy = [box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1]
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse(xy, fill=color)
        elif shape == "rectangle":
            draw.rectangle(xy, fill=color)
        else:
            draw.polygon(
                [(xy[0], xy[3]), (xy[2], xy[3]), ((xy[0] + xy[2]) // 2, xy[1])], fill=color
            )
        template, kind = rng.choice(_QUESTIONS)
        question = template.format(color=rng.choice(_COLORS), shape=rng.choice(_SHAPES))
        answer = {"color": color, "shape": shape}.get(kind, kind)
        if rng.random() < 0.2:
            answer = f"{color} {shape}"  # a multi-token answer now and then
        caption = f"a {color} {shape} on a plain background"
        out.append(
            {
                "__key__": f"{key_prefix}-{i:06d}",
                "position": i,
                "image": img,
                "question": question,
                "answer": answer,
                "question_id": i,
                "image_id": i,
                "caption": caption,
                "captions": [caption],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m leverlm.lvlm.tiny", description="write a tiny random LVLM checkpoint"
    )
    parser.add_argument("model_type", choices=tiny_model_types())
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=SIZES, default="test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny(args.model_type, args.out_dir, seed=args.seed, size=args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
