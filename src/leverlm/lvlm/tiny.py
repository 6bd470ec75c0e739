"""Tiny randomly initialised versions of every supported LVLM architecture.

:func:`build_tiny` writes a folder with ``save_pretrained`` (model + processor/tokenizer) that
:func:`leverlm.lvlm.load_lvlm` loads through the same code path as a real checkpoint. Nothing
is downloaded: tokenizers are trained in-process with the ``tokenizers`` library on a fixed
corpus (:data:`TINY_CORPUS`) and wrapped in the tokenizer class the real processor expects.

Sizes: ``"test"`` (seconds on a CPU; parity tests) and ``"bench"`` (a few layers, hidden 256,
224 px images: big enough that the model, not Python, dominates a benchmark).

The helpers :func:`train_bpe` and :func:`llama_tokenizer` are shared with the other adapters'
tiny builders (``leverlm.lvlm.tiny_interleaved``).

CLI: ``python -m leverlm.lvlm.tiny idefics OUT_DIR [--size bench] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import string
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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

TINY_SIZES = ("test", "bench")

# Types built here; the others come from ``leverlm.lvlm.tiny_interleaved.BUILDERS``
# (``model_type -> builder(out_dir, seed=...)``), imported only when such a type is built.
_INTERLEAVED_TYPES = ("flamingo", "idefics2", "idefics3", "qwen2_5_vl", "qwen2_vl")


def tiny_model_types() -> list[str]:
    """Model types :func:`build_tiny` can build."""
    return sorted(("idefics", *_INTERLEAVED_TYPES))


# --------------------------------------------------------------------------------------------
# tokenizers (shared helpers)
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


# --------------------------------------------------------------------------------------------
# IDEFICS (v1)
# --------------------------------------------------------------------------------------------

IDEFICS_SPECIAL_TOKENS = ("<fake_token_around_image>", "<image>")


def idefics_config_kwargs(size: str = "test") -> dict[str, Any]:
    """``IdeficsConfig`` arguments of a tiny IDEFICS (``size``: ``test`` | ``bench`` | ``9b``).

    ``9b`` is the real IDEFICS-9B architecture (for the GPU benchmark; built without weights).
    The tiny ones keep the 9B's structure: a perceiver resampler, gated cross-attention every
    ``cross_layer_interval`` layers, a decoupled 2-token additional vocabulary.
    """
    common: dict[str, Any] = dict(
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
    )
    if size == "test":
        return common | dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            cross_layer_interval=1,
            max_position_embeddings=512,
            vision_config=dict(
                embed_dim=32,
                image_size=30,
                patch_size=10,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
            ),
            perceiver_config=dict(
                use_resampler=True,
                resampler_n_latents=4,
                resampler_depth=1,
                resampler_n_heads=2,
                resampler_head_dim=16,
            ),
        )
    if size == "bench":
        return common | dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            cross_layer_interval=2,
            max_position_embeddings=1024,
            vision_config=dict(
                embed_dim=192,
                image_size=224,
                patch_size=16,
                intermediate_size=768,
                num_hidden_layers=4,
                num_attention_heads=4,
            ),
            perceiver_config=dict(
                use_resampler=True,
                resampler_n_latents=16,
                resampler_depth=2,
                resampler_n_heads=4,
                resampler_head_dim=48,
            ),
        )
    if size == "9b":
        return common | dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            cross_layer_interval=4,
            max_position_embeddings=2048,
            vision_config=dict(
                embed_dim=1280,
                image_size=224,
                patch_size=14,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=16,
            ),
            perceiver_config=dict(
                use_resampler=True,
                resampler_n_latents=64,
                resampler_depth=6,
                resampler_n_heads=16,
                resampler_head_dim=96,
            ),
        )
    raise ValueError(f"unknown IDEFICS size {size!r}; use one of test, bench, 9b")


def build_tiny_idefics(
    model_type: str,
    out_dir: str | Path,
    seed: int = 0,
    size: str = "test",
    **config_overrides: Any,
) -> Path:
    """Write a tiny random ``IdeficsForVisionText2Text`` + ``IdeficsProcessor`` to ``out_dir``.

    ``config_overrides`` replace top-level ``IdeficsConfig`` fields (e.g. ``use_resampler``).
    """
    import torch
    from transformers import (
        IdeficsConfig,
        IdeficsForVisionText2Text,
        IdeficsImageProcessor,
        IdeficsProcessor,
    )

    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny size {size!r}; use one of {', '.join(TINY_SIZES)}")
    tokenizer = llama_tokenizer(IDEFICS_SPECIAL_TOKENS, vocab_size=512 if size == "test" else 1024)
    base_vocab = len(tokenizer) - len(IDEFICS_SPECIAL_TOKENS)
    kw = idefics_config_kwargs(size) | {"vocab_size": base_vocab} | config_overrides
    if not kw.get("use_resampler", True):
        kw["perceiver_config"] = dict(kw["perceiver_config"], use_resampler=False)
    config = IdeficsConfig(**kw)
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    # Zero-initialised gates (the config's scheme, as in the 9B) would hide the images from
    # the text; random gates make images matter, so the parity tests can see image bugs.
    # (transformers' own "normal" init fails for float gates, hence set here.)
    with torch.no_grad():
        for layer in model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.normal_(0.0, 1.0)
            layer.alpha_dense.normal_(0.0, 1.0)
    image_processor = IdeficsImageProcessor(image_size=config.vision_config.image_size)
    processor = IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _save(model, processor, out_dir)


def _save(model: Any, processor: Any, out_dir: str | Path) -> Path:
    """``save_pretrained`` model + processor into a temp folder, then move it into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    atomic_replace_dir(tmp, out)
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


# --------------------------------------------------------------------------------------------
# dispatch + CLI
# --------------------------------------------------------------------------------------------


def build_tiny(
    model_type: str, out_dir: str | Path, seed: int = 0, size: str = "test", **kwargs: Any
) -> Path:
    """Build a tiny random ``model_type`` checkpoint folder loadable by ``load_lvlm``.

    Args:
        size: ``test`` or ``bench`` (IDEFICS; the other types have one size, ``test``).
        kwargs: config overrides (IDEFICS) or builder options (the other types).
    """
    if model_type == "idefics":
        return build_tiny_idefics(model_type, out_dir, seed=seed, size=size, **kwargs)
    if model_type not in _INTERLEAVED_TYPES:
        raise ValueError(
            f"unknown model_type {model_type!r} for a tiny model; known: {', '.join(tiny_model_types())}"
        )
    module = importlib.import_module("leverlm.lvlm.tiny_interleaved")
    builder = module.BUILDERS[model_type]
    if size != "test":
        if "size" not in inspect.signature(builder).parameters:
            raise ValueError(f"tiny {model_type!r} has only the 'test' size, not {size!r}")
        kwargs["size"] = size
    return builder(out_dir, seed=seed, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m leverlm.lvlm.tiny", description="write a tiny random LVLM checkpoint"
    )
    parser.add_argument("model_type", choices=tiny_model_types())
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=TINY_SIZES, default="test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny(args.model_type, args.out_dir, seed=args.seed, size=args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
