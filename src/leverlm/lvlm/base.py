"""The LVLM protocol: interleaved prompts, answer scoring, generation, loading.

Every model family implements one :class:`LVLM` subclass (an *adapter*). The base class owns
everything that is the same for all of them:

* **prompt building** for a :class:`~leverlm.tasks.Task` (:meth:`LVLM.build_prompt`): the
  task's episode transform (``task.episode``: identity, or e.g. nonce answers), then the
  instruction, each ICD (image + ``task.icd_text``) and the query (image +
  ``task.query_text``), joined by ``task.icd_join``; the scored answer
  (``task.query_answer_text``) is kept apart;
* **tokenisation** (:meth:`LVLM.encode`): text between images is tokenised chunk by chunk
  (cached), image placeholders come from the adapter, and the answer tokens are identified
  exactly (see :meth:`LVLM.answer_ids`), identically for the fast and the reference path;
* the **reference scorer** (:meth:`LVLM.score_reference`): one sequence at a time, a full
  forward (adapter hook :meth:`LVLM.reference_logits`) and full-vocabulary logits;
* shared tensor helpers for the fast paths: right padding, answer masks,
  :func:`answer_token_logprobs` (``lm_head`` applied at answer positions only),
  :class:`FeatureCache` (vision features per distinct image, LRU) and
  :func:`expand_kv_cache` (one encoded prefix reused over a batch);
* **loading** (:func:`load_lvlm`): a registry ``model_type -> "module:function"`` whose
  modules are imported lazily; the loader is called as
  ``loader(model_type=..., path=..., task=..., dtype=..., device=..., attn_implementation=...,
  image_cache_size=..., **kwargs) -> LVLM``.

A sample is the dict of ``docs/architecture.md``: ``{"__key__", "position", "image", **fields}``.
An ICD sequence is given in prompt order: ``icds[0]`` is farthest from the query.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from leverlm.errors import LeverError
from leverlm.tasks import Task, TaskError, get_task

if TYPE_CHECKING:
    from PIL import Image

Sample = dict[str, Any]


class LVLMError(LeverError):
    """Bad model type, checkpoint folder, prompt or argument (names the offending value)."""


# --------------------------------------------------------------------------------------------
# registry and loading
# --------------------------------------------------------------------------------------------

# model_type -> "module:function"; modules are imported only when that type is loaded, so
# optional dependencies (open_flamingo) are needed only by the types that use them.
_LOADERS: dict[str, str] = {
    "idefics": "leverlm.lvlm.idefics:load",
    "idefics2": "leverlm.lvlm.hf_interleaved:load",
    "idefics3": "leverlm.lvlm.hf_interleaved:load",
    "qwen2_vl": "leverlm.lvlm.hf_interleaved:load",
    "qwen2_5_vl": "leverlm.lvlm.hf_interleaved:load",
    "flamingo": "leverlm.lvlm.flamingo:load",
}

# Files whose presence means a folder holds weights (HF shards/indices, torch checkpoints).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "bf16-mixed": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "16": "float16",
    "half": "float16",
}


def register_lvlm(model_type: str, target: str) -> None:
    """Register (or replace) the loader ``"module:function"`` for ``model_type``."""
    if ":" not in target:
        raise LVLMError(f"loader target {target!r} for {model_type!r} must be 'module:function'")
    _LOADERS[model_type] = target


def known_model_types() -> list[str]:
    """The model types :func:`load_lvlm` accepts."""
    return sorted(_LOADERS)


def resolve_loader(model_type: str) -> Callable[..., LVLM]:
    """The loader function of ``model_type`` (imports its module)."""
    if model_type not in _LOADERS:
        raise LVLMError(
            f"unknown model_type {model_type!r}; known model types: {', '.join(known_model_types())}"
        )
    module_name, func_name = _LOADERS[model_type].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, func_name)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"|"fp32"|"bfloat16"|"bf16"|"float16"|"fp16"`` (or a torch dtype) -> dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise LVLMError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return getattr(torch, name)


def is_local_path(path: str | Path) -> bool:
    """True when ``path`` names a local folder rather than a hub id like ``org/name``."""
    text = str(path)
    return (
        Path(text).exists()
        or text.startswith(("/", "./", "../", "~"))
        or text.count("/") != 1
        or "\\" in text
    )


def check_checkpoint_dir(path: str | Path) -> Path:
    """Fail early, naming the folder, when a local checkpoint folder is missing or has no weights."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LVLMError(f"checkpoint folder {str(folder)!r} does not exist")
    has_weights = any(
        p.is_file() and (p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"))
        for p in folder.iterdir()
    )
    if not has_weights:
        raise LVLMError(
            f"checkpoint folder {str(folder)!r} has no weights "
            f"(expected *.safetensors, *.bin or a *.index.json); "
            f"files: {sorted(p.name for p in folder.iterdir())[:20]}"
        )
    return folder


def load_lvlm(
    model_type: str,
    path: str | Path,
    task: Task | str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    image_cache_size: int = 4096,
    **kwargs: Any,
) -> LVLM:
    """Load a frozen LVLM adapter from a local folder (or hub id) via ``from_pretrained``.

    Args:
        model_type: one of :func:`known_model_types`.
        path: a folder written by ``save_pretrained`` (or by :func:`leverlm.lvlm.tiny.build_tiny`)
            or a hub id (resolved offline from the local cache when ``HF_HUB_OFFLINE=1``).
        task: a :class:`Task` or a task name for :func:`leverlm.tasks.get_task`.
        image_cache_size: how many images' vision features the fast path keeps (LRU).
        kwargs: adapter-specific options, passed through to the loader.
    """
    loader = resolve_loader(model_type)  # unknown type fails before touching the disk
    if isinstance(task, str):
        task = get_task(task)
    resolve_dtype(dtype)
    if image_cache_size < 0:
        raise LVLMError(f"image_cache_size must be >= 0, got {image_cache_size}")
    local = is_local_path(path)
    if local:
        path = check_checkpoint_dir(path)
    try:
        return loader(
            model_type=model_type,
            path=str(path),
            task=task,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            image_cache_size=image_cache_size,
            **kwargs,
        )
    except OSError as err:
        if local:
            raise
        raise LVLMError(
            f"{str(path)!r} is neither a local folder nor a model in the local Hugging Face "
            f"cache (runs are offline): {err}"
        ) from err


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: the LVLM is never trained here."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------


class PromptImage:
    """An image in a prompt, with the identity the feature cache keys it by.

    Identity = the sample's ``__key__`` + size, mode and a CRC of the pixels, so two samples that
    share a key but not pixels (another collection, an edited image) never share features.
    """

    __slots__ = ("key", "image", "_ident")

    def __init__(self, key: str, image: Image.Image) -> None:
        self.key = key
        self.image = image
        self._ident: tuple | None = None

    @classmethod
    def of(cls, sample: Sample, role: str = "sample") -> PromptImage:
        """The image of a sample (``TaskError`` naming the key when it has none)."""
        image = sample.get("image")
        key = str(sample.get("__key__", "?"))
        if image is None or not hasattr(image, "size") or not hasattr(image, "tobytes"):
            raise TaskError(f"{role} {key!r} has no field 'image' holding a PIL image")
        return cls(key, image)

    @property
    def ident(self) -> tuple:
        if self._ident is None:
            img = self.image
            self._ident = (self.key, img.size, img.mode, zlib.crc32(img.tobytes()))
        return self._ident

    def __repr__(self) -> str:
        return f"PromptImage({self.key!r})"


# An item of an interleaved prompt: text or an image.
PromptItem = str | PromptImage


@dataclass
class Prompt:
    """An interleaved prompt: ``items`` up to and including the query's split token, and the
    scored ``answer`` continuation (``""`` when generating)."""

    items: list[PromptItem]
    answer: str
    query_key: str


@dataclass
class EncodedPrompt:
    """Token ids of one prompt (+ answer) and its images in order of appearance.

    ``input_ids[answer_start:]`` are exactly the answer tokens; ``prefix_len`` marks where the
    ICDs end and a shared-prefix split is valid (set by :meth:`LVLM.encode` on request).
    """

    input_ids: list[int]
    images: list[PromptImage]
    answer_start: int
    query_key: str
    prefix_len: int = 0
    prefix_images: int = 0

    @property
    def num_answer_tokens(self) -> int:
        return len(self.input_ids) - self.answer_start


# --------------------------------------------------------------------------------------------
# results and tensor helpers (pure functions, unit-tested without models)
# --------------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """Log-likelihood of each query's answer tokens: per-sequence sum, mean and token count."""

    sum_logprob: torch.Tensor
    mean_logprob: torch.Tensor
    num_tokens: torch.Tensor

    @classmethod
    def from_token_logprobs(cls, token_logprobs: torch.Tensor, mask: torch.Tensor) -> ScoreResult:
        """Reduce ``[B, T]`` token log-probs over ``mask`` (``[B, T]`` bool); padding-safe."""
        lp = token_logprobs.float().masked_fill(~mask, 0.0)
        n = mask.sum(-1)
        total = lp.sum(-1)
        return cls(total, total / n.clamp(min=1), n)

    @classmethod
    def cat(cls, parts: Sequence[ScoreResult]) -> ScoreResult:
        if not parts:
            empty = torch.zeros(0)
            return cls(empty, empty, torch.zeros(0, dtype=torch.long))
        return cls(
            torch.cat([p.sum_logprob for p in parts]),
            torch.cat([p.mean_logprob for p in parts]),
            torch.cat([p.num_tokens for p in parts]),
        )

    def __len__(self) -> int:
        return int(self.sum_logprob.shape[0])

    def to(self, device: str | torch.device) -> ScoreResult:
        return ScoreResult(
            self.sum_logprob.to(device), self.mean_logprob.to(device), self.num_tokens.to(device)
        )

    @property
    def prob(self) -> torch.Tensor:
        """The paper's P(y | prompt) = exp(-mean token cross-entropy) = exp(mean log-prob)."""
        return self.mean_logprob.exp()


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists -> ``(ids [B, T] long, attention_mask [B, T] long)``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = int(lengths.max()) if len(seqs) else 0
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    ids[mask] = flat  # row-major boolean assignment == concatenated sequences
    return ids.to(device), mask.long().to(device)


def pad_left(
    seqs: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists (for generation) -> ``(ids [B, T], attention_mask [B, T])``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = int(lengths.max()) if len(seqs) else 0
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    ids[mask] = flat
    return ids.to(device), mask.long().to(device)


def span_mask(starts: torch.Tensor, ends: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` bool, True at ``starts[b] <= t < ends[b]``."""
    t = torch.arange(width, device=starts.device)[None, :]
    return (t >= starts[:, None]) & (t < ends[:, None])


def answer_token_logprobs(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Log-probs of the answer tokens, with ``lm_head`` applied at answer positions only.

    Token ``t`` is predicted from the hidden state at ``t - 1``, so ``answer_mask[:, 0]`` must be
    False. Returns ``[B, T]`` float32, zero outside ``answer_mask``.

    Args:
        hidden: last hidden states ``[B, T, H]`` (after the final norm).
        input_ids: ``[B, T]``; ``answer_mask``: ``[B, T]`` bool over the scored tokens.
    """
    if bool(answer_mask[:, :1].any()):
        raise LVLMError("an answer token at position 0 has no preceding context to predict it")
    rows, cols = answer_mask.nonzero(as_tuple=True)
    logits = lm_head(hidden[rows, cols - 1]).float()  # [N, V]: never the full sequence
    lp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[rows, cols][:, None])[:, 0]
    out = torch.zeros(answer_mask.shape, dtype=torch.float32, device=hidden.device)
    out[rows, cols] = lp
    return out


def full_logits_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Reference: ``[T]`` log-prob of each token given the full-sequence logits ``[T, V]``.

    Position 0 (no context) gets 0.
    """
    lp = torch.log_softmax(logits[:-1].float(), dim=-1).gather(-1, input_ids[1:, None])[:, 0]
    return torch.cat([lp.new_zeros(1), lp])


class FeatureCache:
    """LRU cache of per-image vision features, sized in images.

    :meth:`get` computes all misses of a call in one batch through ``compute`` and returns the
    features in request order; duplicates within a call are computed once.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._store: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def get(
        self,
        images: Sequence[PromptImage],
        compute: Callable[[list[PromptImage]], Sequence[torch.Tensor]],
    ) -> list[torch.Tensor]:
        found: dict[tuple, torch.Tensor] = {}
        missing: dict[tuple, PromptImage] = {}
        for img in images:
            ident = img.ident
            if ident in found or ident in missing:
                continue
            hit = self._store.get(ident)
            if hit is not None:
                self._store.move_to_end(ident)
                found[ident] = hit
                self.hits += 1
            else:
                missing[ident] = img
                self.misses += 1
        if missing:
            feats = compute(list(missing.values()))
            for ident, feat in zip(missing, feats, strict=True):
                found[ident] = feat
                if self.capacity > 0:
                    self._store[ident] = feat
                    self._store.move_to_end(ident)
            while len(self._store) > self.capacity:
                self._store.popitem(last=False)
        return [found[img.ident] for img in images]


def kv_cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer ``(keys, values)`` of a transformers ``DynamicCache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def expand_kv_cache(
    prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], batch_size: int, config: Any = None
) -> Any:
    """A fresh ``DynamicCache`` holding a batch-1 prefix's keys/values repeated over a batch.

    A new cache per batch: ``DynamicCache.update`` concatenates in place, so one cache object
    must not be shared by two forwards.
    """
    from transformers import DynamicCache

    data = [
        (k.expand(batch_size, *k.shape[1:]), v.expand(batch_size, *v.shape[1:]))
        for k, v in prefix_kv
    ]
    return DynamicCache(data, config=config)


# --------------------------------------------------------------------------------------------
# the protocol
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizerInfo:
    """What prompt encoding needs from a tokenizer (filled in by the adapter)."""

    pad_id: int
    bos_ids: list[int] = field(default_factory=list)
    eos_id: int | None = None


class LVLM(abc.ABC):
    """A frozen vision-language model behind one interface (see the module docstring).

    Subclasses set ``image_text`` (the placeholder string the model's processor inserts for one
    image, e.g. IDEFICS' ``<fake_token_around_image><image><fake_token_around_image>``) or
    override :meth:`image_ids`, and implement :meth:`reference_logits`, :meth:`score` and
    :meth:`generate`. They may override :meth:`score_with_prefix` with a KV-cache fast path.
    """

    model_type: str = ""
    #: text the processor puts in place of one image; tokenised once.
    image_text: str = "<image>"
    #: text appended after each ICD's text before the join (e.g. OpenFlamingo's <|endofchunk|>).
    icd_end_text: str = ""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Task,
        *,
        processor: Any = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_length: int | None = None,
        image_cache_size: int = 4096,
        token_cache_size: int = 65536,
    ) -> None:
        self.model = freeze(model)
        self.tokenizer = tokenizer
        self.processor = processor
        self.task = task
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.max_length = max_length
        self.feature_cache = FeatureCache(image_cache_size)
        self._token_cache: OrderedDict[tuple[str, str], list[int]] = OrderedDict()
        self._token_cache_size = token_cache_size
        self.tok = self.tokenizer_info()

    # -- tokenizer facts --------------------------------------------------------------------
    def tokenizer_info(self) -> TokenizerInfo:
        """Pad/BOS/EOS ids. Default: the tokenizer's own, BOS prepended when it has one."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return TokenizerInfo(pad_id=int(pad), bos_ids=bos, eos_id=tok.eos_token_id)

    # -- prompt building --------------------------------------------------------------------
    def icd_items(self, icd: Sample) -> list[PromptItem]:
        """One demonstration: its image, then its text with the answer."""
        return [PromptImage.of(icd, "ICD"), self.task.icd_text(icd) + self.icd_end_text]

    def query_items(self, query: Sample) -> list[PromptItem]:
        """The query: its image, then its text up to and including the split token."""
        return [PromptImage.of(query, "query"), self.task.query_text(query)]

    def build_prompt(
        self, icds: Sequence[Sample], query: Sample, with_answer: bool = True
    ) -> Prompt:
        """The paper's interleaved prompt: instruction, ICDs joined by ``task.icd_join``, query.

        ``icds`` are in prompt order (``icds[0]`` farthest from the query). The task's episode
        transform (:meth:`~leverlm.tasks.Task.episode`, e.g. nonce answers) is applied first,
        so scoring and generation show the same remapped samples.
        """
        icds, query = self.task.episode(icds, query)
        return self.assemble_prompt(icds, query, with_answer)

    def assemble_prompt(
        self, icds: Sequence[Sample], query: Sample, with_answer: bool = True
    ) -> Prompt:
        """The prompt of samples that already went through ``task.episode`` (no transform).

        :meth:`build_prompt` is this after the transform; training code that draws its own
        episode ids calls it directly so its prompts are built by the same code.
        """
        items: list[PromptItem] = []
        if self.task.instruction:
            items.append(self.task.instruction)
        for icd in icds:
            items += self.icd_items(icd)
            items.append(self.task.icd_join)
        items += self.query_items(query)
        answer = self.task.query_answer_text(query) if with_answer else ""
        return Prompt(_merge_text(items), answer, str(query.get("__key__", "?")))

    # -- tokenisation -----------------------------------------------------------------------
    def text_ids(self, text: str, context: str) -> list[int]:
        """Ids of ``text`` as the tokenizer produces them right after the string ``context``.

        Tokenises ``context + text`` and strips the context's ids, so a chunk after an image
        placeholder (a special token) or at the start of the prompt gets the ids that
        tokenising the whole prompt at once gives. Cached by ``(context, text)``.
        """
        key = (context, text)
        hit = self._token_cache.get(key)
        if hit is not None:
            self._token_cache.move_to_end(key)
            return hit
        ctx = self._encode_raw(context) if context else []
        full = self._encode_raw(context + text)
        if full[: len(ctx)] == ctx:
            ids = full[len(ctx) :]
        else:  # the context merged with the text: fall back to tokenising the text alone
            ids = self._encode_raw(text)
        self._token_cache[key] = ids
        if len(self._token_cache) > self._token_cache_size:
            self._token_cache.popitem(last=False)
        return ids

    def _encode_raw(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def image_ids(self, image: PromptImage) -> list[int]:
        """Token ids standing for one image in the text stream."""
        return self.text_ids(self.image_text, "")

    def bos_text(self) -> str:
        """The string form of the BOS prefix (context for the first text chunk)."""
        tok = self.tokenizer
        return tok.bos_token if self.tok.bos_ids and tok.bos_token else ""

    def answer_ids(self, query_text: str, answer: str, context: str) -> list[int]:
        """Ids of the answer exactly as they follow the query's last chunk.

        Tokenises ``query_text + answer`` after ``context`` and keeps the part after the query
        text's own ids; when the tokenizer merges across that boundary, the answer is tokenised
        on its own (so the answer tokens are always exactly identified).
        """
        if not answer:
            return []
        q = self.text_ids(query_text, context)
        qa = self.text_ids(query_text + answer, context)
        if qa[: len(q)] == q and len(qa) > len(q):
            return qa[len(q) :]
        return self.text_ids(answer, "")

    def encode(self, prompt: Prompt, split_image: int | None = None) -> EncodedPrompt:
        """Tokenise a prompt: BOS, then items (text chunks, image placeholders), then answer.

        Args:
            split_image: when given, record in ``prefix_len``/``prefix_images`` where the
                prompt stands just before its ``split_image``-th image (0-based): the shared
                prefix (instruction + the first ``split_image`` ICDs) of a KV-cache fast path.
        """
        if not prompt.items or not isinstance(prompt.items[-1], str):
            raise LVLMError(f"prompt for query {prompt.query_key!r} does not end with text")
        ids: list[int] = list(self.tok.bos_ids)
        images: list[PromptImage] = []
        context = self.bos_text()
        prefix_len = prefix_images = 0
        answer_start = 0
        last = len(prompt.items) - 1
        for i, item in enumerate(prompt.items):
            if isinstance(item, PromptImage):
                if split_image is not None and len(images) == split_image:
                    prefix_len, prefix_images = len(ids), len(images)
                ids += self.image_ids(item)
                images.append(item)
                context = self.image_text
            else:
                ids += self.text_ids(item, context)
                if i == last:
                    answer_start = len(ids)
                    ids += self.answer_ids(item, prompt.answer, context)
                context = ""
        return EncodedPrompt(ids, images, answer_start, prompt.query_key, prefix_len, prefix_images)

    def check_length(self, enc: EncodedPrompt, extra: int = 0) -> None:
        """Raise when a prompt (+ ``extra`` tokens to generate) exceeds the model's context."""
        if self.max_length is not None and len(enc.input_ids) + extra > self.max_length:
            more = f" (+{extra} tokens to generate)" if extra else ""
            raise LVLMError(
                f"prompt for query {enc.query_key!r} has {len(enc.input_ids)} tokens{more}, "
                f"more than the model's context limit of {self.max_length} tokens"
            )

    def encode_pairs(
        self,
        icd_seqs: Sequence[Sequence[Sample]],
        queries: Sequence[Sample],
        with_answer: bool = True,
        extra_tokens: int = 0,
    ) -> list[EncodedPrompt]:
        """Build and tokenise every (ICDs, query) pair; all errors surface before any forward."""
        if len(icd_seqs) != len(queries):
            raise LVLMError(
                f"got {len(icd_seqs)} ICD sequences but {len(queries)} queries; they pair up"
            )
        encs = []
        for icds, query in zip(icd_seqs, queries, strict=True):
            enc = self.encode(self.build_prompt(icds, query, with_answer))
            if with_answer and enc.num_answer_tokens == 0:
                raise LVLMError(f"query {enc.query_key!r} has an answer with no tokens")
            self.check_length(enc, extra_tokens)
            encs.append(enc)
        return encs

    # -- scoring ----------------------------------------------------------------------------
    @abc.abstractmethod
    def reference_logits(self, enc: EncodedPrompt) -> torch.Tensor:
        """Full-vocabulary logits ``[T, V]`` of one prompt: the model's plain forward, batch 1,
        raw pixels, no caches. The reference every fast path is checked against."""

    def score_reference(
        self, icd_seqs: Sequence[Sequence[Sample]], queries: Sequence[Sample]
    ) -> ScoreResult:
        """Answer log-likelihoods the straightforward way: one sequence at a time, full logits."""
        encs = self.encode_pairs(icd_seqs, queries)
        sums, means, counts = [], [], []
        with torch.inference_mode(), self.autocast():
            for enc in encs:
                ids = torch.tensor(enc.input_ids, device=self.device)
                lp = full_logits_token_logprobs(self.reference_logits(enc), ids)
                ans = lp[enc.answer_start :]
                sums.append(ans.sum())
                means.append(ans.mean())
                counts.append(enc.num_answer_tokens)
        if not encs:
            return ScoreResult.cat([])
        return ScoreResult(
            torch.stack(sums).float().cpu(),
            torch.stack(means).float().cpu(),
            torch.tensor(counts, dtype=torch.long),
        )

    @abc.abstractmethod
    def score(self, icd_seqs: Sequence[Sequence[Sample]], queries: Sequence[Sample]) -> ScoreResult:
        """Answer log-likelihoods of a batch of (ICD sequence, query) pairs: the fast path.

        Must equal :meth:`score_reference` (within 1e-4 in fp32). Results are on the CPU.
        """

    def score_with_prefix(
        self,
        prefix_icds: Sequence[Sample],
        suffix_icd_seqs: Sequence[Sequence[Sample]],
        queries: Sequence[Sample],
    ) -> ScoreResult:
        """Score ``prefix_icds + suffix_icd_seqs[i]`` for query ``queries[i]``.

        The instruction + ``prefix_icds`` part is the same for every row; adapters with a KV
        cache encode it once. This default simply concatenates.
        """
        return self.score([list(prefix_icds) + list(s) for s in suffix_icd_seqs], queries)

    # -- generation -------------------------------------------------------------------------
    @abc.abstractmethod
    def generate(
        self,
        icd_seqs: Sequence[Sequence[Sample]],
        queries: Sequence[Sample],
        **generation_kwargs: Any,
    ) -> list[str]:
        """Batched generation with ``task.generation_kwargs`` (overridable), post-processed."""

    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        kw = dict(self.task.generation_kwargs)
        kw.update(overrides)
        return kw

    # -- runtime helpers --------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on accelerators; a no-op on CPU and in fp32 (a context manager
        in every case)."""
        if self.device.type != "cpu" and self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task.name!r}, device={self.device}, dtype={self.dtype})"


def _merge_text(items: list[PromptItem]) -> list[PromptItem]:
    """Join adjacent text items, drop empty ones: text between two images is one chunk."""
    out: list[PromptItem] = []
    for item in items:
        if isinstance(item, str):
            if not item:
                continue
            if out and isinstance(out[-1], str):
                out[-1] = out[-1] + item
                continue
        out.append(item)
    return out
