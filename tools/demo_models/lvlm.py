"""A small Idefics3 trained from scratch to learn in context on easy-vqa "fast binding" episodes.

**Architecture.** ``Idefics3ForConditionalGeneration`` (SigLIP-style ViT -> pixel shuffle ->
linear connector -> Llama), so the demo runs the real ``idefics3`` adapter
(:class:`leverlm.lvlm.hf_interleaved.Idefics3LVLM`). Images are squared to 64 px (no tiling);
16 px patches and a 2x2 pixel shuffle give 4 image tokens per image, inline in the token
stream (``<fake_token_around_image><global-img><image>x4<fake_token_around_image>``), which
lets the query's tokens attend to every demonstration's image and answer directly. The
tokenizer is a byte-level BPE (Llama 3 style, the class the real processor uses) trained on
the prompt template, the easy-vqa questions and the nonce words, each nonce word one token.

**Episodes** (the ``vqa_nonce`` task, :class:`leverlm.tasks.NonceAnswers`): a query and 0..8
demonstrations from the train split; every answer (yes/no included) is replaced by a nonce
word through a map drawn per episode and shared by the demonstrations and the query. So the
zero-shot answer is a guess among the nonce words, and the model answers right only by finding
a demonstration whose (latent) answer is the query's and copying its word. In ``match_prob`` of
the episodes with demonstrations, one of them has the query's answer (at a random slot).
Prompts are built by the adapter's own code (``task.episode`` -> ``LVLM.assemble_prompt`` ->
``LVLM.encode``), so training, scoring and generation see the same token streams; training
draws a fresh episode id (hence map) per episode where evaluation uses the query's key.

**Loss**: next-token cross-entropy on every answer (nonce) token of the episode, the
demonstrations' included (each is a binding problem given the demonstrations before it), plus
``text_loss_weight`` x the other text tokens (the prompt format, e.g. the line break after an
answer, which generation relies on to stop).

**What made it learn within CPU minutes** (pilot runs, teacher-forced 2-shot accuracy on
held-out episodes): batches of a fixed token budget (``tokens_per_step``; short episodes come
in larger batches); a curriculum growing the number of demonstrations from 2 to 8 over the
first 30% of the steps; half of the queries drawn uniformly over the 13 answers (otherwise
yes/no, 74% of the questions, dominates and the colour/shape bindings lag); and in a quarter
of the episodes with demonstrations, during the first 80% of the steps, the *real* answers
shown (plain VQA in context: a direct signal for recognising answers). Plain episodes stop
before the end so that, with no demonstration to copy from, the model guesses among the
nonce words (zero-shot accuracy at chance) instead of answering in real words.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leverlm.data.prep.easyvqa import SHAPES
from leverlm.lvlm.tiny import IDEFICS3_SPECIAL_TOKENS as SPECIAL_TOKENS
from leverlm.tasks import EASYVQA_ANSWERS, NONCE_WORDS, get_task
from leverlm.utils import atomic_replace_dir, atomic_write_json
from tools.demo_models import LVLM_TYPE, TASK
from tools.demo_models.common import TrainConfig, adamw, optimizer_step, resume, save_state, say
from tools.demo_models.data import DemoModelsError, VQAData, draw_icds


@dataclass(frozen=True)
class LVLMArch:
    """Sizes of the demo Idefics3 (the defaults are the committed model's)."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 192
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    intermediate: int = 384
    vocab_size: int = 512
    max_positions: int = 1024

    @property
    def image_seq_len(self) -> int:
        """Image tokens per image after the 2x2 pixel shuffle."""
        return (self.image_size // self.patch_size) ** 2 // 4


@dataclass(frozen=True)
class LVLMTrainConfig(TrainConfig):
    """Training settings (the defaults made the committed model)."""

    steps: int = 4000
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    checkpoint_every: int = 500
    #: prompt tokens per step: the batch holds ``tokens_per_step // episode length`` episodes,
    #: so every step costs about the same whatever its number of demonstrations.
    tokens_per_step: int = 1500
    max_shots: int = 8
    #: share of the steps over which the largest number of demonstrations drawn grows from
    #: 2 to ``max_shots`` (short episodes first: binding among few candidates is learnt first).
    curriculum: float = 0.3
    match_prob: float = 0.7
    #: share of episodes whose query is drawn uniformly over the answers (then over the
    #: samples with that answer) instead of over the samples: 74% of easy-vqa questions are
    #: yes/no, and without this the colour/shape bindings are learnt late.
    balance_answers: float = 0.5
    #: share of episodes with demonstrations that show the real answers (plain VQA in
    #: context): a direct signal for recognising answers, which binding builds on.
    plain_prob: float = 0.25
    #: plain episodes stop after this share of the steps, so the final model answers in nonce
    #: words when it has no demonstrations to copy from (zero-shot stays at chance).
    plain_until: float = 0.8
    text_loss_weight: float = 0.1
    val_every: int = 1000
    val_episodes: int = 256


# --------------------------------------------------------------------------------------------
# building the (untrained) model + processor
# --------------------------------------------------------------------------------------------


def tokenizer_corpus(questions: Sequence[str]) -> list[str]:
    """What the BPE is trained on: the prompt format over every question, answer and nonce word.

    Sorted and de-duplicated, so the same questions give the same tokenizer.
    """
    task = get_task(TASK)
    lines = set()
    for q in sorted(set(questions)):
        lines.add(task.icd_text({"question": q, "answer": EASYVQA_ANSWERS[0]}))
    for word in (*NONCE_WORDS, *EASYVQA_ANSWERS):
        # Repeated so each word is merged into a single token before rarer pieces.
        lines.update(f"Short answer:{word}\nShort answer:{word} {k}" for k in range(20))
    return sorted(lines)


def build_tokenizer(questions: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Idefics3's special tokens, BOS first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from leverlm.lvlm.tiny import train_bpe

    vocab, merges = train_bpe(
        tokenizer_corpus(questions),
        vocab_size=vocab_size,
        style="byte_level",
        special_tokens=SPECIAL_TOKENS,
    )
    bos, eos, pad = SPECIAL_TOKENS[:3]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
    )


def build_model(arch: LVLMArch, questions: Sequence[str], seed: int) -> tuple[Any, Any]:
    """An untrained ``Idefics3ForConditionalGeneration`` + its ``Idefics3Processor``."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    if arch.image_size % (2 * arch.patch_size):
        raise DemoModelsError(
            f"image_size {arch.image_size} must be a multiple of 2 x patch_size {arch.patch_size}"
        )
    tok = build_tokenizer(questions, arch.vocab_size)
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": arch.image_size},
        max_image_size={"longest_edge": arch.image_size},
        do_image_splitting=False,
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=arch.image_seq_len
    )
    config = Idefics3Config(
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=arch.hidden,
            intermediate_size=arch.intermediate,
            num_hidden_layers=arch.layers,
            num_attention_heads=arch.heads,
            num_key_value_heads=arch.heads,
            max_position_embeddings=arch.max_positions,
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=arch.vision_hidden,
            intermediate_size=arch.vision_intermediate,
            num_hidden_layers=arch.vision_layers,
            num_attention_heads=arch.vision_heads,
            image_size=arch.image_size,
            patch_size=arch.patch_size,
        ),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def answer_token_ids(lvlm: Any, words: Sequence[str] = NONCE_WORDS) -> list[int]:
    """The single token id of each answer word as it follows ``Short answer:`` in a prompt.

    Raises when a word takes several tokens: the loss and the checks assume one.
    """
    task = lvlm.task
    ids = []
    for word in words:
        sample = {"question": "what color is the shape?", "answer": word}
        query = task.query_text(sample)
        answer = lvlm.answer_ids(query, word, lvlm.image_text)
        if len(answer) != 1:
            raise DemoModelsError(
                f"answer word {word!r} tokenises into {len(answer)} tokens {answer}; the demo "
                f"LVLM's tokenizer must keep each answer word whole (raise vocab_size)"
            )
        ids.append(answer[0])
    return ids


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


class EpisodeBatcher:
    """Builds tokenised training/validation batches of episodes through the adapter's code.

    Args:
        lvlm: an ``Idefics3LVLM`` around the model being trained (used for prompt building and
            tokenisation only).
        data: the episodes' samples (queries and demonstrations).
        support: where demonstrations come from (default: ``data``).
    """

    def __init__(
        self,
        lvlm: Any,
        data: VQAData,
        pixels: Any,
        pixel_row: dict[int, int],
        support: VQAData | None = None,
        support_pixels: Any = None,
        support_row: dict[int, int] | None = None,
    ) -> None:
        self.lvlm = lvlm
        self.data = data
        self.support = support or data
        self.pixels = pixels
        self.pixel_row = pixel_row
        self.support_pixels = pixels if support_pixels is None else support_pixels
        self.support_row = pixel_row if support_row is None else support_row
        tok = lvlm.tokenizer
        self.nonce_ids = torch.tensor(answer_token_ids(lvlm, NONCE_WORDS))
        # answers as shown by "plain" episodes (the real words after "Short answer:")
        self.answer_ids = torch.cat(
            [self.nonce_ids, torch.tensor(answer_token_ids(lvlm, EASYVQA_ANSWERS))]
        )
        self.special_ids = torch.tensor(sorted(set(tok.all_special_ids)))
        self.image_token_id = lvlm.image_token_id
        # Typical tokens per demonstration (image placeholders + text), for batch sizing.
        probe = data.sample(0)
        self.item_tokens = len(lvlm.image_ids(lvlm.query_items(probe)[1])) + len(
            lvlm.text_ids(lvlm.task.icd_text(probe) + lvlm.task.icd_join, lvlm.image_text)
        )

    def episode(
        self,
        rng: np.random.Generator,
        shots: int,
        match: bool,
        episode_id: str | None,
        query_pos: int | None = None,
        plain: bool = False,
        balanced: bool = False,
    ) -> tuple[list[int], list[tuple[str, int]], int]:
        """One tokenised episode: ``(input_ids, images as (source, row), answer_start)``.

        ``episode_id=None`` seeds the nonce map with the query's key, as evaluation does;
        ``plain`` shows the real answers (no episode transform); ``balanced`` draws the query's
        answer uniformly first.
        """
        data, support = self.data, self.support
        if query_pos is not None:
            q = query_pos
        elif balanced:
            answers = list(data.by_answer)
            pool = data.by_answer[answers[int(rng.integers(len(answers)))]]
            q = int(pool[int(rng.integers(len(pool)))])
        else:
            q = int(rng.integers(len(data)))
        query = data.sample(q)
        same_set = support is data
        icd_pos = draw_icds(
            support,
            rng,
            shots,
            match_answer=str(query["answer"]) if match else None,
            exclude_image=int(query["image_id"]) if same_set else None,
            exclude_position=q if same_set else None,
        )
        icds = [support.sample(p) for p in icd_pos]
        if not plain:
            icds, query = self.lvlm.task.episode(icds, query, episode_id)
        enc = self.lvlm.encode(self.lvlm.assemble_prompt(icds, query, with_answer=True))
        images = [("support", self.support_row[int(support.image_ids[p])]) for p in icd_pos]
        images.append(("data", self.pixel_row[int(data.image_ids[q])]))
        return enc.input_ids, images, enc.answer_start

    def collate(
        self, episodes: Sequence[tuple[list[int], list[tuple[str, int]], int]]
    ) -> dict[str, Any]:
        """Pad a list of episodes; gather each image's pixels once (row order = first use)."""
        from leverlm.lvlm.base import pad_right

        ids, attn = pad_right([e[0] for e in episodes], self.lvlm.tok.pad_id)
        order: dict[tuple[str, int], int] = {}
        image_index = []
        for _, images, _ in episodes:
            for img in images:
                image_index.append(order.setdefault(img, len(order)))
        pix = [
            (self.support_pixels if src == "support" else self.pixels)[row] for src, row in order
        ]
        return {
            "input_ids": ids,
            "attention_mask": attn,
            "pixels": torch.stack(pix) if pix else torch.zeros(0),
            "image_index": torch.tensor(image_index, dtype=torch.long),
            "answer_start": torch.tensor([e[2] for e in episodes]),
        }

    def weights(self, targets: Any, attn: Any, text_weight: float) -> Any:
        """Loss weight of each target token: 1 on answers (nonce or, in plain episodes, real),
        ``text_weight`` on other text, 0 on special/image tokens and padding."""
        is_nonce = torch.isin(targets, self.answer_ids)
        is_special = torch.isin(targets, self.special_ids)
        w = torch.where(is_nonce, 1.0, torch.where(is_special, 0.0, text_weight))
        return w * attn.float()


def shot_cap(step: int, config: LVLMTrainConfig) -> int:
    """The most demonstrations an episode of ``step`` may have (the curriculum)."""
    ramp = config.curriculum * config.steps
    if ramp <= 0 or step >= ramp:
        return config.max_shots
    low = min(2, config.max_shots)
    return low + int((config.max_shots - low) * step / ramp)


def forward_logits(model: Any, batch: dict[str, Any], image_token_id: int) -> Any:
    """Logits ``[B, T, V]`` of a collated batch: each distinct image through the vision tower
    once, its features written at its placeholder tokens (as the adapter's fast path does)."""
    model_inner = model.model
    text_model = model_inner.text_model
    ids = batch["input_ids"]
    embeds = text_model.get_input_embeddings()(ids)
    if batch["pixels"].numel():
        feats = model_inner.get_image_features(pixel_values=batch["pixels"][:, None])
        stacked = torch.stack(list(feats.pooler_output))  # [distinct images, tokens, hidden]
        # Row-major fill: each episode's images in prompt order, episode after episode.
        placed = stacked[batch["image_index"]].reshape(-1, stacked.shape[-1])
        mask = (ids == image_token_id)[..., None]
        embeds = embeds.masked_scatter(mask, placed.to(embeds.dtype))
    hidden = text_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    return model.lm_head(hidden.last_hidden_state)


def _pixels_of(processor: Any, data: VQAData, chunk: int = 256) -> tuple[Any, dict[int, int]]:
    """Every image of ``data`` through the processor (exactly what inference feeds the model)."""
    image_ids = sorted(data.images)
    parts = []
    for s in range(0, len(image_ids), chunk):
        imgs = [[data.images[i]] for i in image_ids[s : s + chunk]]
        parts.append(processor.image_processor(imgs, return_tensors="pt")["pixel_values"][:, 0])
    return torch.cat(parts), {image_id: row for row, image_id in enumerate(image_ids)}


def _query_accuracy(logits: Any, batch: dict[str, Any]) -> Any:
    """Per episode: is the argmax at the query's answer position its (nonce) answer token."""
    rows = torch.arange(logits.shape[0])
    start = batch["answer_start"]
    pred = logits[rows, start - 1].argmax(-1)
    return (pred == batch["input_ids"][rows, start]).float()


def validate(
    model: Any,
    batcher: EpisodeBatcher,
    episodes: int,
    seed: int,
    shots: int = 2,
    batch_size: int = 32,
) -> dict[str, float]:
    """Teacher-forced query-answer accuracy on held-out episodes (query key seeds the map):
    ``shots`` random demonstrations, and the same with one demonstration of the query's answer."""
    out = {}
    model.eval()
    with torch.inference_mode():
        for name, match in (("random", False), ("oracle", True)):
            rng = np.random.default_rng([seed, 7919, int(match)])
            hits = []
            for s in range(0, episodes, batch_size):
                eps = [
                    batcher.episode(rng, shots, match, None)
                    for _ in range(min(batch_size, episodes - s))
                ]
                batch = batcher.collate(eps)
                logits = forward_logits(model, batch, batcher.image_token_id)
                hits.append(_query_accuracy(logits, batch))
            out[f"{shots}shot_{name}"] = float(torch.cat(hits).mean())
    model.train()
    return out


def train_lvlm(
    train: VQAData,
    test: VQAData,
    out_dir: str | Path,
    work_dir: str | Path,
    config: LVLMTrainConfig = LVLMTrainConfig(),
    arch: LVLMArch = LVLMArch(),
    log_every: int = 50,
) -> dict[str, Any]:
    """Train the demo LVLM and ``save_pretrained`` it (+ ``training.json``) into ``out_dir``.

    Resumes from ``work_dir/lvlm.ckpt`` when it holds a checkpoint of the same settings.
    """
    from leverlm.lvlm.hf_interleaved import Idefics3LVLM

    if config.steps < 1 or config.tokens_per_step < 1 or not 0 <= config.max_shots <= 16:
        raise DemoModelsError(
            f"LVLM training needs steps >= 1, tokens_per_step >= 1 and 0 <= max_shots <= 16; "
            f"got {config.steps}, {config.tokens_per_step}, {config.max_shots}"
        )
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    start_time = time.perf_counter()
    questions = [f["question"] for f in train.fields]
    model, processor = build_model(arch, questions, config.seed)
    task = get_task(TASK)
    lvlm = Idefics3LVLM(model, processor, task)
    # The adapter froze the model (it is an inference wrapper); here it is trained, and the
    # adapter only builds and tokenises prompts.
    model.train()
    model.requires_grad_(True)
    pixels, pixel_row = _pixels_of(processor, train)
    test_pixels, test_row = _pixels_of(processor, test)
    batcher = EpisodeBatcher(lvlm, train, pixels, pixel_row)
    val_batcher = EpisodeBatcher(lvlm, test, test_pixels, test_row, train, pixels, pixel_row)
    opt = adamw(model, config, "embed")
    cfg = {"train": asdict(config), "arch": asdict(arch), "num_train_samples": len(train)}
    ckpt_path = work_dir / "lvlm.ckpt"
    state = resume(ckpt_path, cfg, model, opt, "lvlm")
    start, history = int(state["step"]), list(state.get("history", []))
    n_params = sum(p.numel() for p in model.parameters())
    say("lvlm", f"Idefics3 with {n_params / 1e6:.2f}M parameters")
    losses: list[float] = []
    accs: list[float] = []
    for step in range(start, config.steps):
        # Everything random about a step is a function of (seed, step): resumable exactly.
        rng = np.random.default_rng([config.seed, step])
        shots = int(rng.integers(shot_cap(step, config) + 1))
        batch_size = max(1, config.tokens_per_step // (batcher.item_tokens * (shots + 1)))
        eps = []
        for b in range(batch_size):
            match = shots > 0 and bool(rng.random() < config.match_prob)
            plain = (
                shots > 0
                and step < config.plain_until * config.steps
                and bool(rng.random() < config.plain_prob)
            )
            balanced = bool(rng.random() < config.balance_answers)
            episode_id = f"train-{config.seed}-{step}-{b}"
            eps.append(batcher.episode(rng, shots, match, episode_id, None, plain, balanced))
        batch = batcher.collate(eps)
        logits = forward_logits(model, batch, batcher.image_token_id)
        targets = batch["input_ids"][:, 1:]
        w = batcher.weights(targets, batch["attention_mask"][:, 1:], config.text_loss_weight)
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none"
        )
        loss = (ce * w.flatten()).sum() / w.sum()
        optimizer_step(opt, model, loss, step, config)
        losses.append(float(loss.detach()))
        accs.append(float(_query_accuracy(logits.detach(), batch).mean()))
        done = step + 1
        if done % log_every == 0 or done == config.steps:
            say(
                "lvlm",
                f"step {done}/{config.steps} loss {np.mean(losses[-log_every:]):.4f} query acc "
                f"{np.mean(accs[-log_every:]):.3f} ({time.perf_counter() - start_time:.0f}s)",
            )
        if config.val_every and (done % config.val_every == 0 or done == config.steps):
            val = validate(model, val_batcher, config.val_episodes, config.seed)
            history.append({"step": done, **val})
            say("lvlm", f"step {done} held-out (teacher-forced): {val}")
        if done % config.checkpoint_every == 0 and done < config.steps:
            save_state(ckpt_path, cfg, done, model, opt, history=history)
    train_seconds = time.perf_counter() - start_time
    model.eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    result = {
        "model_type": LVLM_TYPE,
        "task": TASK,
        "parameters": int(n_params),
        "config": cfg,
        "final_train_loss": float(np.mean(losses[-log_every:])) if losses else None,
        "final_train_query_accuracy": float(np.mean(accs[-log_every:])) if accs else None,
        "train_seconds": round(train_seconds, 1),
        "validation": history,
    }
    atomic_write_json(tmp / "training.json", result)
    atomic_replace_dir(tmp, out_dir)
    say("lvlm", f"saved {out_dir} ({json.dumps(result['validation'][-1:])})")
    return result


# --------------------------------------------------------------------------------------------
# evaluation through the real adapter
# --------------------------------------------------------------------------------------------

#: the conditions :func:`evaluate_lvlm` measures: name -> (shots, one demonstration of the
#: query's answer or not).
EVAL_CONDITIONS: dict[str, tuple[int, bool]] = {
    "zero_shot": (0, False),
    "random_2": (2, False),
    "oracle_2": (2, True),
}


def answer_kind(answer: str) -> str:
    """``yes/no``, ``shape`` or ``color`` (easy-vqa's three kinds of answer)."""
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in SHAPES else "color"


def evaluate_lvlm(
    lvlm_path: str | Path,
    support: VQAData,
    queries: VQAData,
    num_queries: int = 300,
    seed: int = 0,
    conditions: dict[str, tuple[int, bool]] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """VQA accuracy (%) of the saved LVLM through ``load_lvlm(...).generate``.

    A seeded sample of ``num_queries`` queries; demonstrations from ``support``: none, random,
    or ("oracle") one with the query's answer + random ones, at a random slot. Predictions are
    scored by :func:`leverlm.metrics.vqa_accuracy_batch` against the query's references as
    the task shows them (``task.episode``: the nonce words of the query's own map).
    """
    from leverlm.lvlm import load_lvlm
    from leverlm.metrics import vqa_accuracy_batch

    conditions = conditions or EVAL_CONDITIONS
    task = get_task(TASK)
    lvlm = load_lvlm(LVLM_TYPE, str(lvlm_path), task=task)
    rng = np.random.default_rng([seed, 104729])
    n = min(num_queries, len(queries))
    picked = sorted(int(p) for p in rng.choice(len(queries), n, replace=False))
    query_samples = [queries.sample(p) for p in picked]
    references = [task.episode([], q)[1]["answers"] for q in query_samples]
    query_kinds = [answer_kind(str(q["answer"])) for q in query_samples]
    kinds = sorted(set(query_kinds))
    results: dict[str, Any] = {
        "num_queries": n,
        "seed": seed,
        "accuracy": {},
        "queries_by_answer_kind": {k: query_kinds.count(k) for k in kinds},
        "by_answer_kind": {k: {} for k in kinds},
    }
    start = time.perf_counter()
    for name, (shots, match) in conditions.items():
        crng = np.random.default_rng([seed, shots, int(match)])
        icd_seqs = [
            [
                support.sample(p)
                for p in draw_icds(support, crng, shots, str(q["answer"]) if match else None)
            ]
            for q in query_samples
        ]
        predictions: list[str] = []
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                predictions += lvlm.generate(
                    icd_seqs[s : s + batch_size], query_samples[s : s + batch_size]
                )
        results["accuracy"][name] = round(vqa_accuracy_batch(predictions, references), 2)
        for kind in kinds:
            rows = [i for i, k in enumerate(query_kinds) if k == kind]
            results["by_answer_kind"][kind][name] = round(
                vqa_accuracy_batch([predictions[i] for i in rows], [references[i] for i in rows]),
                2,
            )
        say("eval", f"{name}: {results['accuracy'][name]:.2f}%")
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results
