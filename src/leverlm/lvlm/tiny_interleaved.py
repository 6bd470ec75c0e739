"""Tiny randomly initialised Idefics2 / Idefics3 / Qwen2-VL / Qwen2.5-VL / OpenFlamingo folders.

Each ``build_tiny_<type>(out_dir, seed, size)`` writes a folder that
:func:`leverlm.lvlm.load_lvlm` loads exactly as it loads a real checkpoint: ``save_pretrained``
of the model class the real checkpoint uses, plus its real processor class (image processor
configured for small images, a BPE tokenizer trained in-process with the special tokens that
processor needs, via the shared helpers of :mod:`leverlm.lvlm.tiny`). Nothing is downloaded.

Sizes: ``test`` (hidden 32-64, 2 layers, 16-64 px images: milliseconds per forward on a CPU)
and ``bench`` (hidden 256, 4 layers, 224 px images: the model, not Python, dominates).

The folder is written to a temporary sibling and moved into place at the end, so an interrupted
build never leaves a half folder that a later run would load.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from leverlm.utils import atomic_replace_dir

SIZES = ("test", "bench")

FAKE = "<fake_token_around_image>"
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


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown tiny size {size!r}; use one of {', '.join(SIZES)}")


def _text_dims(size: str) -> dict[str, int]:
    """Decoder sizes shared by every family."""
    if size == "test":
        return dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    return dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )


def _vocab_size(size: str) -> int:
    return 512 if size == "test" else 1024


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

    from leverlm.lvlm.tiny import train_bpe

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


def _build(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_folder)`` and move the finished folder into ``out_dir`` atomically."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        atomic_replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save(model: Any, processor: Any, folder: Path) -> None:
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _token_ids(tok: Any) -> dict[str, int | None]:
    return dict(
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )


def _siglip(size: str) -> dict[str, int]:
    """Idefics' SigLIP tower: 32 px / patch 8 (test) or 224 px / patch 16 (bench)."""
    if size == "test":
        return dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    return dict(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=224,
        patch_size=16,
    )


# --------------------------------------------------------------------------------------------
# Idefics2 (SigLIP + perceiver resampler + Mistral)
# --------------------------------------------------------------------------------------------


def build_tiny_idefics2(
    out_dir: str | Path, seed: int = 0, size: str = "test", image_splitting: bool = False
) -> Path:
    """A tiny ``Idefics2ForConditionalGeneration`` + ``Idefics2Processor`` folder.

    4 (test) / 16 (bench) perceiver latents per image; images keep their aspect ratio within
    the edge limits and are padded per batch (``pixel_attention_mask``). Llama-style tokenizer
    (Mistral's), BOS prepended.

    Args:
        image_splitting: the image processor's ``do_image_splitting`` (4 crops + the image,
            5 x the latents per image); off by default, as for idefics2-8b.
    """
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessor,
        Idefics2Processor,
    )

    from leverlm.lvlm.tiny import llama_tokenizer

    _check_size(size)
    test = size == "test"

    def write(folder: Path) -> None:
        tok = llama_tokenizer(
            [FAKE, "<image>", "<end_of_utterance>"],
            vocab_size=_vocab_size(size),
            add_bos_token=True,
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
            text_config=dict(
                model_type="mistral",
                vocab_size=len(tok),
                max_position_embeddings=4096,
                tie_word_embeddings=False,
                **text,
                **_token_ids(tok),
            ),
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
        _seeded(seed)
        _save(Idefics2ForConditionalGeneration(config), processor, folder)

    return _build(out_dir, write)


# --------------------------------------------------------------------------------------------
# Idefics3 (SigLIP + pixel shuffle + Llama 3), images split into tiles
# --------------------------------------------------------------------------------------------


def build_tiny_idefics3(out_dir: str | Path, seed: int = 0, size: str = "test") -> Path:
    """A tiny ``Idefics3ForConditionalGeneration`` + ``Idefics3Processor`` folder.

    Tiles of the vision tower's image size (32 px -> 4 tokens; bench 224 px -> 49 tokens,
    pixel shuffle by 2); images are resized to twice that longest edge and split into up to
    2x2 tiles + the global image, so prompts carry the processor's ``<row_i_col_j>`` /
    ``<global-img>`` layout tokens, as with the real model. Byte-level tokenizer (Llama 3's).
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    _check_size(size)

    def write(folder: Path) -> None:
        bos, eos, pad = IDEFICS3_SPECIAL_TOKENS[:3]
        tok = byte_level_tokenizer(
            IDEFICS3_SPECIAL_TOKENS,
            bos=bos,
            eos=eos,
            pad=pad,
            vocab_size=_vocab_size(size),
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
            text_config=dict(
                model_type="llama",
                vocab_size=len(tok),
                max_position_embeddings=4096,
                tie_word_embeddings=False,
                **_text_dims(size),
                **_token_ids(tok),
            ),
            vision_config=vision,
            scale_factor=2,
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            pad_token_id=tok.pad_token_id,
        )
        _seeded(seed)
        _save(Idefics3ForConditionalGeneration(config), processor, folder)

    return _build(out_dir, write)


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

    from leverlm.lvlm.tiny import train_bpe

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


def build_tiny_qwen2_vl(out_dir: str | Path, seed: int = 0, size: str = "test") -> Path:
    """A tiny ``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor`` folder."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    _check_size(size)

    def write(folder: Path) -> None:
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
        _seeded(seed)
        model = Qwen2VLForConditionalGeneration(config)
        _save(model, _qwen_processor(Qwen2VLProcessor, tok, size), folder)

    return _build(out_dir, write)


def build_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0, size: str = "test") -> Path:
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` + ``Qwen2_5_VLProcessor`` folder.

    Its vision tower mixes windowed attention (windows of 2x2 merged patches) with a
    full-attention last block, like the real model.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    _check_size(size)

    def write(folder: Path) -> None:
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
        _seeded(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
        _save(model, _qwen_processor(Qwen2_5_VLProcessor, tok, size), folder)

    return _build(out_dir, write)


# --------------------------------------------------------------------------------------------
# OpenFlamingo (open_clip ViT + perceiver + gated cross-attention into a causal LM)
# --------------------------------------------------------------------------------------------


def tiny_clip_config(size: str = "test") -> dict[str, Any]:
    """An ``open_clip_config.json`` for a tiny open_clip ViT (``local-dir:`` schema)."""
    _check_size(size)
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


def build_tiny_flamingo(
    out_dir: str | Path, seed: int = 0, size: str = "test", lm: str = "llama"
) -> Path:
    """A tiny OpenFlamingo folder in the layout :func:`leverlm.lvlm.flamingo.load` reads.

    ``out_dir/``: ``flamingo.json`` (the ``create_model_and_transforms`` arguments),
    ``checkpoint.pt`` (the Flamingo state dict), ``clip/`` (an open_clip ``local-dir:``
    folder: config + random weights) and ``lm/`` (a tiny causal LM + its tokenizer with
    ``<|endofchunk|>`` and ``<image>``). Needs the ``open_flamingo`` package.

    Args:
        lm: ``llama`` (Llama LM, Llama tokenizer with BOS) or ``mpt`` (transformers' native
            ``MptForCausalLM`` with ALiBi and a byte-level tokenizer without BOS: the structure
            of OpenFlamingo-3B/9B's MPT language models).
    """
    import torch

    from leverlm.lvlm.flamingo import FLAMINGO_SPEC, create_flamingo

    _check_size(size)
    if lm not in ("llama", "mpt"):
        raise ValueError(f"unknown tiny Flamingo language model {lm!r}; use 'llama' or 'mpt'")

    def write(folder: Path) -> None:
        import open_clip
        from safetensors.torch import save_file

        lm_dir, clip_dir = folder / "lm", folder / "clip"
        lm_dir.mkdir()
        clip_dir.mkdir()
        _write_flamingo_lm(lm_dir, lm, size, seed)
        (clip_dir / "open_clip_config.json").write_text(
            json.dumps(tiny_clip_config(size), indent=2)
        )
        clip = open_clip.CLIP(**tiny_clip_config(size)["model_cfg"])
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
        # OpenFlamingo initialises its gates to 0 (images ignored); open them so images
        # change the LM's output and the parity tests can see image bugs.
        with torch.no_grad():
            for layer in model.lang_encoder.gated_cross_attn_layers:
                if layer is not None:
                    layer.attn_gate.fill_(0.5)
                    layer.ff_gate.fill_(0.5)
        torch.save(model.state_dict(), folder / "checkpoint.pt")
        (folder / FLAMINGO_SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")

    return _build(out_dir, write)


def _write_flamingo_lm(lm_dir: Path, lm: str, size: str, seed: int) -> None:
    """The tiny language model + tokenizer folder that open_flamingo wraps."""
    from transformers import LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM

    from leverlm.lvlm.tiny import llama_tokenizer

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
    _seeded(seed)
    model_cls(config).save_pretrained(lm_dir)


#: model_type -> builder ``(out_dir, seed=0, size="test") -> Path`` (see leverlm.lvlm.tiny).
BUILDERS: dict[str, Callable[..., Path]] = {
    "idefics2": build_tiny_idefics2,
    "idefics3": build_tiny_idefics3,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "flamingo": build_tiny_flamingo,
}
