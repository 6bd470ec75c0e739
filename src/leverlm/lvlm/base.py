"""The LVLM template: prompts, tokens, caches, scoring and generation for every model family.

The base class :class:`LVLM` owns everything that is the same for all families:

* **prompts** (:meth:`LVLM.build_prompt`): the task's episode transform (``task.episode``),
  then the instruction, each ICD (image + ``task.icd_text``) and the query (image +
  ``task.query_text``), joined by ``task.icd_join``; the scored answer is kept apart;
* **tokens** (:meth:`LVLM.encode`): text between images tokenised chunk by chunk (cached),
  image placeholders from the adapter, the answer tokens identified exactly;
* **vision features** (:meth:`LVLM.image_features`): once per distinct image (LRU), each new
  image encoded in a canonical batch, so its features never depend on what shares its batch,
  what was cached before, the process or the run (see :meth:`LVLM.encode_images`);
* **scoring**: :meth:`LVLM.score` (right padding, ``lm_head`` at answer positions only),
  :meth:`LVLM.score_with_prefix` (the shared instruction + ICD prefix encoded once, its KV
  cache kept in an LRU and expanded over the batch) and :meth:`LVLM.score_reference` (one
  prompt at a time, the model's plain forward, full logits: what the fast paths must equal);
* **generation** (:meth:`LVLM.generate`): left padding, the task's settings, decoding.

An adapter supplies only its family's forward pieces: :meth:`LVLM.vision_features` (one
vision forward), :meth:`LVLM.hidden_states` (last hidden states of a :class:`Span` of tokens,
with its images and an optional prefix KV cache), :meth:`LVLM.reference_logits`,
:meth:`LVLM.generate_inputs`, the image placeholder ids and, where they differ, position ids,
the LM head and the KV cache config.

Loading: :class:`LVLMSpec` (typed settings) or :func:`load_lvlm` through a registry
``model_type -> "module:function"`` whose modules are imported lazily; the loader is called as
``loader(model_type=..., path=..., task=..., dtype=..., device=..., attn_implementation=...,
**kwargs) -> LVLM``.

A sample is the dict of ``docs/architecture.md``: ``{"__key__", "position", "image", **fields}``.
An ICD sequence is given in prompt order: ``icds[0]`` is farthest from the query.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import importlib
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

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
    "idefics": "leverlm.lvlm.hf_interleaved:load",
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
        kwargs: adapter options (:class:`LVLM`'s and the family's), passed to the loader.
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


@dataclass(frozen=True)
class LVLMSpec:
    """Which LVLM a job uses and how it is loaded (the ``model.lvlm`` section of the gt and eval
    jobs; ``conf/lvlm/*.yaml`` are such specs). The task is the job's, given to :meth:`load`.

    Args:
        model_type: one of :func:`known_model_types` (or any name when ``loader`` is given).
        path: checkpoint folder or hub id.
        loader: ``"module:function"`` registered for ``model_type`` before loading.
        kwargs: adapter options (``vision_batch_size``, ``template``, cache sizes, ...).
    """

    model_type: str
    path: str
    dtype: str = "float32"
    attn_implementation: str | None = None
    image_cache_size: int = 4096
    loader: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LVLMSpec:
        """A spec from a config mapping; unknown keys are refused by name."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise LVLMError(f"unknown LVLM setting(s) {unknown}; known: {', '.join(names)}")
        return cls(**values)

    @classmethod
    def checked(cls, values: Any, where: str = "model.lvlm") -> LVLMSpec:
        """A spec from a job's config section, checked; errors start with ``where``."""
        try:
            spec = values if isinstance(values, cls) else cls.from_dict(dict(values or {}))
            return spec.check()
        except (LVLMError, TypeError) as err:
            raise LVLMError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> LVLMSpec:
        """Validate without loading (type, dtype, the folder and the family it holds); returns
        the spec with a local ``path`` made absolute. Errors name the field."""
        if not self.loader and self.model_type not in known_model_types():
            raise LVLMError(
                f"model_type={self.model_type!r}; known: {', '.join(known_model_types())}"
            )
        if self.loader and ":" not in self.loader:
            raise LVLMError(f"loader={self.loader!r} must be 'module:function'")
        try:
            resolve_dtype(self.dtype)
        except LVLMError as err:
            raise LVLMError(f"dtype: {err}") from err
        if self.image_cache_size < 0:
            raise LVLMError(f"image_cache_size must be >= 0, got {self.image_cache_size}")
        if not self.path:
            raise LVLMError("path is empty: give the LVLM checkpoint folder")
        path = str(self.path)
        if is_local_path(path):
            try:
                folder = check_checkpoint_dir(path).resolve()
            except LVLMError as err:
                raise LVLMError(f"path: {err}") from err
            held = _folder_model_type(folder)
            if (
                held
                and not self.loader
                and held != self.model_type
                and self.model_type != "flamingo"
            ):
                raise LVLMError(
                    f"path: checkpoint {str(folder)!r} holds a {held!r} model, not "
                    f"model_type={self.model_type!r}"
                )
            path = str(folder)
        return dataclasses.replace(self, path=path)

    def load(self, task: Task | str, device: str | torch.device = "cpu") -> LVLM:
        """The frozen adapter for ``task`` on ``device``."""
        if self.loader:
            register_lvlm(self.model_type, self.loader)
        return load_lvlm(
            self.model_type,
            self.path,
            task,
            dtype=self.dtype,
            device=device,
            attn_implementation=self.attn_implementation,
            image_cache_size=self.image_cache_size,
            **self.kwargs,
        )


def _folder_model_type(folder: Path) -> str | None:
    """The ``model_type`` a transformers checkpoint folder declares (None if it declares none)."""
    import json

    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: the LVLM is never trained here."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MISSING: Any = object()


class LRU(Generic[K, V]):
    """A least-recently-used map of at most ``capacity`` entries (0: keeps nothing)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise LVLMError(f"a cache capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self._data: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()

    def get(self, key: K, default: Any = None) -> Any:
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            self.misses += 1
            return default
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V) -> None:
        if self.capacity == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def cached(self, key: K, compute: Callable[[], V]) -> V:
        """The value of ``key``, computed (and kept) on a miss."""
        value = self.get(key, _MISSING)
        if value is _MISSING:
            value = compute()
            self.put(key, value)
        return value


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
    return _pad(seqs, pad_id, device, left=False)


def pad_left(
    seqs: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists (for generation) -> ``(ids [B, T], attention_mask [B, T])``."""
    return _pad(seqs, pad_id, device, left=True)


def _pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: str | torch.device, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = int(lengths.max()) if len(seqs) else 0
    t = torch.arange(width)[None, :]
    mask = t >= (width - lengths)[:, None] if left else t < lengths[:, None]
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    ids[mask] = torch.tensor([x for s in seqs for x in s], dtype=torch.long)  # row-major fill
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
# the template
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizerInfo:
    """What prompt encoding needs from a tokenizer (filled in by the adapter)."""

    pad_id: int
    bos_ids: list[int] = field(default_factory=list)
    eos_id: int | None = None


@dataclass
class Span:
    """One text-model forward: tokens of right-padded prompts, after an optional cached prefix.

    Attributes:
        ids: ``[B, T]`` the span's token ids.
        attention_mask: ``[B, P + T]``: the ``P`` cached prefix tokens, then the span's.
        position_ids: what the family's text model takes (``[B, T]``; Qwen: ``[3, B, T]``).
        images: each row's images whose placeholders are in the span, in order.
        before: each row's last image before the span (``None`` at the prompt start).
        keys: each row's query key (for error messages).
        cache: a ``DynamicCache`` holding the prefix (filled in place for a prefix forward).
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    images: list[list[PromptImage]]
    before: list[PromptImage | None]
    keys: list[str]
    cache: Any = None


class LVLM(abc.ABC):
    """A frozen vision-language model behind one interface (see the module docstring).

    Args:
        image_cache_size: images whose vision features are kept (LRU).
        vision_batch_size: images per vision forward. Every vision forward gets exactly this
            many images of one input shape (the last batch padded with copies), so an image's
            features never depend on its batch. 1 (each image alone) is the cheapest on a
            CPU; accelerators gain from more.
        prefix_cache_size: shared-prefix KV caches kept (LRU) across ``score_with_prefix``
            calls (a beam step scores one prefix's candidates in several batches).
        token_cache_size, layout_cache_size: tokenised text chunks and image placeholder
            layouts kept (LRU).
    """

    model_type: str = ""
    #: text the processor puts in place of one image (the context of the next text chunk).
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
        vision_batch_size: int = 1,
        prefix_cache_size: int = 8,
        token_cache_size: int = 65536,
        layout_cache_size: int = 65536,
    ) -> None:
        if vision_batch_size < 1:
            raise LVLMError(f"vision_batch_size must be >= 1, got {vision_batch_size}")
        self.model = freeze(model)
        self.tokenizer = tokenizer
        self.processor = processor
        self.task = task
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.max_length = max_length
        self.vision_batch_size = int(vision_batch_size)
        self.feature_cache: LRU[tuple, torch.Tensor] = LRU(image_cache_size)
        self.prefix_cache: LRU[tuple, list] = LRU(prefix_cache_size)
        self.token_cache: LRU[tuple[str, str], list[int]] = LRU(token_cache_size)
        self.layout_cache: LRU[tuple, Any] = LRU(layout_cache_size)
        self.tok = self.tokenizer_info()

    # -- adapter hooks ----------------------------------------------------------------------
    @abc.abstractmethod
    def vision_features(self, images: list[PromptImage]) -> list[torch.Tensor]:
        """One vision forward over ``images``: each image's features as the LM consumes them."""

    @abc.abstractmethod
    def hidden_states(self, span: Span) -> torch.Tensor:
        """Last hidden states ``[B, T, H]`` (after the final norm) of a span of tokens."""

    @abc.abstractmethod
    def reference_logits(self, enc: EncodedPrompt) -> torch.Tensor:
        """Full-vocabulary logits ``[T, V]`` of one prompt: the model's plain forward, batch 1,
        raw pixels, no caches. The reference every fast path is checked against."""

    @abc.abstractmethod
    def generate_inputs(
        self, ids: torch.Tensor, encs: Sequence[EncodedPrompt], reference: bool = False
    ) -> dict[str, Any]:
        """Image inputs of ``model.generate`` for left-padded ``ids`` (``reference``: raw
        pixels rather than cached features, where the family has both)."""

    def vision_shape(self, image: PromptImage) -> Hashable:
        """What an image's vision input shape depends on: only images with equal keys share a
        vision forward. Default: the source size and mode (processors map equal sizes to equal
        shapes); families that resize every image to one size return a constant."""
        return image.image.size, image.image.mode

    def layout(self, image: PromptImage) -> Any:
        """What an image's placeholder run depends on (tiles, grid); hashable, cached."""
        return None

    def image_ids(self, image: PromptImage) -> list[int]:
        """Token ids standing for one image in the text stream."""
        return self.text_ids(self.image_text, "")

    def position_ids(self, encs: Sequence[EncodedPrompt], width: int, start: int = 0) -> Any:
        """Position ids of right-padded prompts, tokens ``start:start + width`` of each."""
        pos = start + torch.arange(width, device=self.device)
        return pos[None].expand(len(encs), -1)

    def can_split(self, enc: EncodedPrompt) -> bool:
        """Whether ``enc`` may be scored as a cached prefix (``:prefix_len``) + a suffix."""
        return True

    @property
    def lm_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.model.get_output_embeddings()

    @property
    def kv_config(self) -> Any:
        """The config a ``DynamicCache`` of the text model is built with."""
        return self.model.config

    @property
    def generation_model(self) -> Any:
        """The module whose ``generate`` :meth:`generate_ids` calls."""
        return self.model

    def tokenizer_info(self) -> TokenizerInfo:
        """Pad/BOS/EOS ids. Default: the tokenizer's own, BOS prepended when it has one."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return TokenizerInfo(pad_id=int(pad), bos_ids=bos, eos_id=tok.eos_token_id)

    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """``task.generation_kwargs`` updated with ``overrides`` (adapters add their rules)."""
        kw = dict(self.task.generation_kwargs)
        kw.update(overrides)
        return kw

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

        The task's episode transform (e.g. nonce answers) is applied first, so scoring and
        generation show the same remapped samples.
        """
        icds, query = self.task.episode(icds, query)
        return self.assemble_prompt(icds, query, with_answer)

    def assemble_prompt(
        self, icds: Sequence[Sample], query: Sample, with_answer: bool = True
    ) -> Prompt:
        """The prompt of samples that already went through ``task.episode`` (no transform)."""
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
        tokenising the whole prompt at once gives.
        """

        def compute() -> list[int]:
            ctx = self._encode_raw(context) if context else []
            full = self._encode_raw(context + text)
            if full[: len(ctx)] == ctx:
                return full[len(ctx) :]
            return self._encode_raw(text)  # the context merged with the text

        return self.token_cache.cached((context, text), compute)

    def _encode_raw(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def cached_layout(self, image: PromptImage) -> Any:
        return self.layout_cache.cached(image.ident, lambda: self.layout(image))

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
        split_image: int | None = None,
    ) -> list[EncodedPrompt]:
        """Build and tokenise every (ICDs, query) pair; all errors surface before any forward."""
        if len(icd_seqs) != len(queries):
            raise LVLMError(
                f"got {len(icd_seqs)} ICD sequences but {len(queries)} queries; they pair up"
            )
        encs = []
        for icds, query in zip(icd_seqs, queries, strict=True):
            enc = self.encode(self.build_prompt(icds, query, with_answer), split_image)
            if with_answer and enc.num_answer_tokens == 0:
                raise LVLMError(f"query {enc.query_key!r} has an answer with no tokens")
            self.check_length(enc, extra_tokens)
            encs.append(enc)
        return encs

    # -- vision features --------------------------------------------------------------------
    def image_features(self, images: Sequence[PromptImage]) -> list[torch.Tensor]:
        """Each image's features in request order: cached ones reused, new ones encoded once
        (duplicates within a call included) by :meth:`encode_images`."""
        found: dict[tuple, torch.Tensor] = {}
        missing: dict[tuple, PromptImage] = {}
        for img in images:
            ident = img.ident
            if ident in found or ident in missing:
                continue
            hit = self.feature_cache.get(ident)
            if hit is None:
                missing[ident] = img
            else:
                found[ident] = hit
        if missing:
            feats = self.encode_images(list(missing.values()))
            for ident, feat in zip(missing, feats, strict=True):
                found[ident] = feat
                self.feature_cache.put(ident, feat)
        return [found[img.ident] for img in images]

    def encode_images(self, images: list[PromptImage]) -> list[torch.Tensor]:
        """Vision features of ``images``, each computed in a canonical batch.

        Images are grouped by :meth:`vision_shape`; every vision forward gets exactly
        ``vision_batch_size`` images of one group (the last batch padded with copies of its
        last image). Kernels then see the same shapes whatever else is encoded, so an image's
        features are bitwise the same alone, in any batch, after any cache history, in any
        process, on one machine and thread count (the tests check every family, batch slots
        included, on the CPU; on an accelerator this needs kernels deterministic for a shape).
        """
        groups: dict[Hashable, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.vision_shape(img), []).append(i)
        out: list[torch.Tensor] = [torch.empty(0)] * len(images)
        n = self.vision_batch_size
        for members in groups.values():
            for start in range(0, len(members), n):
                chunk = members[start : start + n]
                batch = [images[i] for i in chunk]
                feats = self.vision_features(batch + [batch[-1]] * (n - len(batch)))
                for i, feat in zip(chunk, feats, strict=False):
                    # a copy: a view would keep the whole batch (and its padding) alive
                    out[i] = feat.clone()
        return out

    def stacked_features(
        self, rows: Sequence[Sequence[PromptImage]], empty: torch.Tensor
    ) -> torch.Tensor:
        """``[B, N, ...]`` features of each row's images, zero-padded to ``N = max(1, rows)``
        images; ``empty`` (one image's shape) when no row has an image."""
        feats = self.image_features([im for row in rows for im in row])
        proto = feats[0] if feats else empty
        n = max(1, max((len(r) for r in rows), default=0))
        out = proto.new_zeros((len(rows), n, *proto.shape))
        i = 0
        for b, row in enumerate(rows):
            if row:
                out[b, : len(row)] = torch.stack(feats[i : i + len(row)])
                i += len(row)
        return out

    # -- scoring ----------------------------------------------------------------------------
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

    def score(self, icd_seqs: Sequence[Sequence[Sample]], queries: Sequence[Sample]) -> ScoreResult:
        """Answer log-likelihoods of a batch of (ICD sequence, query) pairs: the fast path.

        Equals :meth:`score_reference` (within 1e-4 in fp32). Results are on the CPU.
        """
        encs = self.encode_pairs(icd_seqs, queries)
        if not encs:
            return ScoreResult.cat([])
        with torch.inference_mode(), self.autocast():
            return self._score_encoded(encs)

    def score_with_prefix(
        self,
        prefix_icds: Sequence[Sample],
        suffix_icd_seqs: Sequence[Sequence[Sample]],
        queries: Sequence[Sample],
    ) -> ScoreResult:
        """Score ``prefix_icds + suffix_icd_seqs[i]`` for query ``queries[i]``.

        The instruction + ``prefix_icds`` part is the same for every row: it is encoded once
        (KV cache, LRU-kept across calls) and each row runs only its own suffix.
        """
        if not prefix_icds:
            return self.score(suffix_icd_seqs, queries)
        seqs = [list(prefix_icds) + list(s) for s in suffix_icd_seqs]
        encs = self.encode_pairs(seqs, queries, split_image=len(prefix_icds))
        if not encs:
            return ScoreResult.cat([])
        p, k = encs[0].prefix_len, encs[0].prefix_images
        prefix_ids = encs[0].input_ids[:p]
        with torch.inference_mode(), self.autocast():
            if p == 0 or any(
                e.prefix_len != p or e.input_ids[:p] != prefix_ids or not self.can_split(e)
                for e in encs
            ):
                # No token-aligned shared prefix (a tokenizer or template that merges across it).
                return self._score_encoded(encs)
            return self._score_encoded(encs, p, k, self._prefix_kv(encs[0], p, k))

    def _prefix_kv(self, enc: EncodedPrompt, p: int, k: int) -> list:
        """Per-layer KV of tokens ``:p`` (holding the first ``k`` images), batch 1, cached."""

        def compute() -> list:
            from transformers import DynamicCache

            ids = torch.tensor([enc.input_ids[:p]], device=self.device)
            cache = DynamicCache(config=self.kv_config)
            span = Span(
                ids,
                torch.ones_like(ids),
                self.position_ids([enc], p),
                [enc.images[:k]],
                [None],
                [enc.query_key],
                cache,
            )
            self.hidden_states(span)
            return kv_cache_tensors(cache)

        key = (tuple(enc.input_ids[:p]), tuple(im.ident for im in enc.images[:k]))
        return self.prefix_cache.cached(key, compute)

    def _score_encoded(
        self, encs: Sequence[EncodedPrompt], p: int = 0, k: int = 0, prefix_kv: Any = None
    ) -> ScoreResult:
        """Score prompts from token ``p`` / image ``k`` on, after ``prefix_kv`` (if any)."""
        b = len(encs)
        ids, attn = pad_right([e.input_ids[p:] for e in encs], self.tok.pad_id, self.device)
        span = Span(
            ids,
            torch.cat([attn.new_ones(b, p), attn], dim=1),
            self.position_ids(encs, ids.shape[1], p),
            [e.images[k:] for e in encs],
            # the shared prefix's last image: one object, so its identity is hashed once
            [encs[0].images[k - 1] if k else None] * b,
            [e.query_key for e in encs],
            None if prefix_kv is None else expand_kv_cache(prefix_kv, b, self.kv_config),
        )
        hidden = self.hidden_states(span)
        starts = torch.tensor([e.answer_start - p for e in encs], device=self.device)
        answer_mask = span_mask(starts, attn.sum(-1), ids.shape[1])
        lp = answer_token_logprobs(hidden, ids, answer_mask, self.lm_head)
        return ScoreResult.from_token_logprobs(lp, answer_mask).to("cpu")

    # -- generation -------------------------------------------------------------------------
    def generate(
        self,
        icd_seqs: Sequence[Sequence[Sample]],
        queries: Sequence[Sample],
        **generation_kwargs: Any,
    ) -> list[str]:
        """Batched greedy/beam generation with ``task.generation_kwargs`` (overridable),
        decoded and post-processed by the task."""
        return self.decode(self.generate_ids(icd_seqs, queries, **generation_kwargs))

    def generate_ids(
        self,
        icd_seqs: Sequence[Sequence[Sample]],
        queries: Sequence[Sample],
        *,
        reference: bool = False,
        **generation_kwargs: Any,
    ) -> list[list[int]]:
        """New token ids per query, up to (not including) the end token (``reference``: the
        model's own image inputs rather than cached features, see :meth:`generate_inputs`)."""
        kw = self.generation_kwargs(**generation_kwargs)
        kw.setdefault("eos_token_id", self.tok.eos_id)
        encs = self.encode_pairs(
            icd_seqs, queries, with_answer=False, extra_tokens=int(kw["max_new_tokens"])
        )
        if not encs:
            return []
        ids, attn = pad_left([e.input_ids for e in encs], self.tok.pad_id, self.device)
        with torch.inference_mode(), self.autocast(), self.generation_context(encs, kw):
            out = self.generation_model.generate(
                input_ids=ids,
                attention_mask=attn,
                pad_token_id=self.tok.pad_id,
                do_sample=False,
                **self.generate_inputs(ids, encs, reference),
                **kw,
            )
        eos = kw["eos_token_id"]
        stops = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        result = []
        for row in out[:, ids.shape[1] :].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            result.append(row[:end])
        return result

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Generated ids -> the task's post-processed texts."""
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [self.task.postprocess(t) for t in texts]

    def generation_context(
        self, encs: Sequence[EncodedPrompt], kw: dict[str, Any]
    ) -> contextlib.AbstractContextManager:
        """Held around ``generate`` (Flamingo conditions its layers on the images here)."""
        return contextlib.nullcontext()

    # -- runtime helpers --------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on accelerators; a no-op on CPU and in fp32."""
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
