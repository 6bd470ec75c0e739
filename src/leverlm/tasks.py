"""What a task is: which sample fields make a prompt, what is answered, how it is scored.

A *sample* everywhere in leverlm is a plain dict as returned by ``Collection[pos]``:
``{"__key__": str, "position": int, "image": PIL.Image.Image, <json fields>...}``.
A task turns samples into the text parts of an interleaved prompt; the LVLM adapters
(``leverlm.lvlm``) put the images in and tokenise.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from leverlm.errors import LeverError

Sample = dict[str, Any]

# The paper's IDEFICS instruction line for VQA.
IDEFICS_VQA_INSTRUCTION = (
    "Instruction: provide an answer to the question. Use the image to answer.\n"
)


# The 13 answers of easy-vqa (yes/no, its 3 shapes, its 8 colours).
EASYVQA_ANSWERS: tuple[str, ...] = (
    "yes", "no", "circle", "rectangle", "triangle",
    "black", "blue", "brown", "gray", "green", "red", "teal", "yellow",
)  # fmt: skip

# Made-up answer words for "fast binding" episodes: no English meaning, unchanged by the VQA
# answer normalisation (no articles, number words or punctuation), distinct from every answer.
NONCE_WORDS: tuple[str, ...] = (
    "dax", "wug", "blick", "fep", "zup", "toma", "kiki", "lorp",
    "snib", "vorn", "mib", "jop", "taz", "nerk", "plim", "gorp",
)  # fmt: skip


class TaskError(LeverError):
    """A sample or config does not fit the task (names the field and the sample key)."""


class EpisodeTransform(Protocol):
    """Maps an episode (ICD samples + query sample) to the samples the prompt shows."""

    def __call__(
        self, icds: Sequence[Sample], query: Sample, episode_id: str
    ) -> tuple[list[Sample], Sample]: ...


@dataclass(frozen=True)
class NonceAnswers:
    """Fast binding: within an episode, every answer is replaced by a nonce word.

    The map (an injection ``answers -> words``) is drawn per episode and shared by the ICDs and
    the query, so a model can answer only by finding a demonstration that shows the binding it
    needs. The draw is a pure function of ``(seed, episode_id)`` (SHA-256 driven Fisher-Yates,
    the same on every Python version and process); :meth:`Task.episode` uses the query's
    ``__key__`` as the episode id, so scoring, generation and the metric's references agree for
    a query whatever its ICDs are, and a KV-cached prompt prefix stays valid for it.

    Both ``answer_field`` and the ``answers`` list (the VQA-accuracy references) are remapped.

    Args:
        answers: the answer vocabulary; an answer outside it is a :class:`TaskError`.
        words: the nonce words (at least as many as ``answers``).
        seed: selects a different family of maps.
        answer_field: the sample field holding the answer shown/scored.
    """

    answers: tuple[str, ...] = EASYVQA_ANSWERS
    words: tuple[str, ...] = NONCE_WORDS
    seed: int = 0
    answer_field: str = "answer"

    def __post_init__(self) -> None:
        if len(set(self.words)) != len(self.words) or len(set(self.answers)) != len(self.answers):
            raise TaskError("NonceAnswers: answers and words must not repeat")
        if len(self.words) < len(self.answers):
            raise TaskError(
                f"NonceAnswers: {len(self.words)} nonce words cannot encode "
                f"{len(self.answers)} answers injectively"
            )
        clash = sorted(set(self.words) & set(self.answers))
        if clash:
            raise TaskError(f"NonceAnswers: nonce words {clash} are also answers")

    def _draw(self, episode_id: str, i: int) -> int:
        digest = hashlib.sha256(f"{self.seed}\x00{episode_id}\x00{i}".encode()).digest()
        return int.from_bytes(digest[:8], "big")

    def mapping(self, episode_id: str) -> dict[str, str]:
        """The episode's ``answer -> nonce word`` map."""
        words = list(self.words)
        for i in range(len(words) - 1, 0, -1):  # Fisher-Yates, one hash draw per swap
            j = self._draw(episode_id, i) % (i + 1)
            words[i], words[j] = words[j], words[i]
        return dict(zip(self.answers, words, strict=False))

    def remap(self, sample: Sample, mapping: dict[str, str]) -> Sample:
        """A shallow copy of ``sample`` with its answer (and ``answers``) mapped."""
        key = sample.get("__key__", "?")

        def one(value: Any, field_name: str) -> str:
            word = mapping.get(str(value).strip()) if isinstance(value, str) else None
            if word is None:
                raise TaskError(
                    f"sample {key!r}: {field_name} {value!r} is not in the nonce task's answer "
                    f"vocabulary {list(self.answers)}"
                )
            return word

        if self.answer_field not in sample or sample[self.answer_field] is None:
            raise TaskError(f"sample {key!r} has no field {self.answer_field!r} to remap")
        out = dict(sample)
        out[self.answer_field] = one(sample[self.answer_field], self.answer_field)
        answers = sample.get("answers")
        if answers is not None:
            if not isinstance(answers, list | tuple):
                raise TaskError(f"sample {key!r}: field 'answers' is not a list: {answers!r}")
            out["answers"] = [one(a, f"answers[{i}]") for i, a in enumerate(answers)]
        return out

    def __call__(
        self, icds: Sequence[Sample], query: Sample, episode_id: str
    ) -> tuple[list[Sample], Sample]:
        mapping = self.mapping(episode_id)
        return [self.remap(d, mapping) for d in icds], self.remap(query, mapping)


@dataclass(frozen=True)
class Task:
    """A prompt/answer/metric recipe.

    ``icd_template`` and ``query_template`` are ``str.format`` templates over sample fields;
    ``query_template`` must end with ``split_token`` (the text after which the answer starts:
    only the answer tokens after it are scored).
    """

    name: str
    icd_template: str
    query_template: str
    answer_field: str
    split_token: str
    metric: str
    text_field: str
    instruction: str = ""
    icd_join: str = "\n"
    max_new_tokens: int = 5
    num_beams: int = 3
    length_penalty: float = 0.0
    required_fields: tuple[str, ...] = field(default_factory=tuple)
    #: maps an episode to the samples the prompt shows (``None``: shown as they are).
    episode_transform: EpisodeTransform | None = None

    def __post_init__(self) -> None:
        if not self.query_template.rstrip().endswith(self.split_token.rstrip()):
            raise TaskError(
                f"task {self.name!r}: query_template {self.query_template!r} must end with "
                f"split_token {self.split_token!r}"
            )

    # -- episodes ---------------------------------------------------------------------------
    def episode(
        self, icds: Sequence[Sample], query: Sample, episode_id: str | None = None
    ) -> tuple[list[Sample], Sample]:
        """The ICDs and query as this task shows them (e.g. answers remapped to nonce words).

        Every prompt builder (scoring, generation) and the metric's references go through
        this, so they agree. ``episode_id`` defaults to the query's ``__key__`` (deterministic
        per query); training passes a fresh id per episode.
        """
        if self.episode_transform is None:
            return list(icds), query
        if episode_id is None:
            if "__key__" not in query:
                raise TaskError(
                    f"task {self.name!r}: the query has no '__key__' to seed its episode"
                )
            episode_id = str(query["__key__"])
        return self.episode_transform(icds, query, episode_id)

    # -- fields -----------------------------------------------------------------------------
    def _fields(self, sample: dict[str, Any]) -> dict[str, Any]:
        for name in self.required_fields:
            if name not in sample or sample[name] is None:
                raise TaskError(
                    f"task {self.name!r}: sample {sample.get('__key__', '?')!r} has no field "
                    f"{name!r} (fields: {sorted(k for k in sample if not k.startswith('_'))})"
                )
        return sample

    def answer(self, sample: dict[str, Any]) -> str:
        """The ground-truth text shown for an ICD and scored for a query."""
        value = self._fields(sample).get(self.answer_field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise TaskError(
                f"task {self.name!r}: sample {sample.get('__key__', '?')!r} has an empty "
                f"answer field {self.answer_field!r}"
            )
        return str(value).strip()

    def icd_text(self, sample: dict[str, Any]) -> str:
        """Text of one in-context demonstration (its answer included)."""
        fields = dict(self._fields(sample))
        fields[self.answer_field] = self.answer(sample)
        return self.icd_template.format(**fields)

    def query_text(self, sample: dict[str, Any]) -> str:
        """Text of the query up to and including the split token (no answer)."""
        return self.query_template.format(**self._fields(sample))

    def query_answer_text(self, sample: dict[str, Any]) -> str:
        """The scored continuation after ``query_text``: query text + it == ``icd_text``.

        Follows the ICD template exactly, so ``Short answer:{answer}`` scores ``"yes"`` and
        ``Caption: {caption}`` scores ``" a dog ..."`` (leading space included).
        """
        full, prefix = self.icd_text(sample), self.query_text(sample)
        if not full.startswith(prefix):
            raise TaskError(
                f"task {self.name!r}: icd_template {self.icd_template!r} does not start with "
                f"query_template {self.query_template!r} for sample {sample.get('__key__', '?')!r}"
            )
        return full[len(prefix) :]

    def feature_text(self, sample: dict[str, Any]) -> str:
        """The text a CLIP text encoder sees for this sample (caption or question)."""
        return str(self._fields(sample).get(self.text_field, ""))

    def postprocess(self, text: str) -> str:
        """Cut a generation down to the answer: first line, before the next ICD starts."""
        text = text.split("\n")[0]
        for stop in ("Question:", "Caption:", "Short answer:", "<image>"):
            idx = text.find(stop)
            if idx > 0:
                text = text[:idx]
        text = text.strip()
        if self.name == "vqa":
            text = re.sub(r"\s+", " ", text)
        return text

    @property
    def generation_kwargs(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "length_penalty": self.length_penalty,
        }


def vqa_task(instruction: str = "", **overrides: Any) -> Task:
    """VQA with the paper's prompt: ``Question:{q} Short answer:{a}``."""
    kw: dict[str, Any] = dict(
        name="vqa",
        icd_template="Question:{question} Short answer:{answer}",
        query_template="Question:{question} Short answer:",
        answer_field="answer",
        split_token="Short answer:",
        metric="vqa_accuracy",
        text_field="question",
        instruction=instruction,
        max_new_tokens=5,
        num_beams=3,
        length_penalty=0.0,
        required_fields=("question", "answer"),
    )
    kw.update(overrides)
    return Task(**kw)


def caption_task(**overrides: Any) -> Task:
    """Captioning with the paper's prompt: ``Caption: {caption}``; first reference shown."""
    kw: dict[str, Any] = dict(
        name="caption",
        icd_template="Caption: {caption}",
        query_template="Caption:",
        answer_field="caption",
        split_token="Caption:",
        metric="cider",
        text_field="caption",
        max_new_tokens=20,
        num_beams=3,
        length_penalty=1.0,
        required_fields=("caption",),
    )
    kw.update(overrides)
    return Task(**kw)


TASK_NAMES = ("vqa", "vqa_idefics", "vqa_nonce", "caption")


def get_task(name: str, instruction: str | None = None, **overrides: Any) -> Task:
    """A task by name.

    ``vqa``; ``vqa_idefics`` (with the IDEFICS instruction); ``vqa_nonce`` (easy-vqa "fast
    binding": answers remapped per query to nonce words, see :class:`NonceAnswers`; the demo
    world); ``caption``. The VQA variants all have ``name == "vqa"`` (the kind of collection
    they read).
    """
    if name == "vqa":
        return vqa_task(instruction or "", **overrides)
    if name == "vqa_nonce":
        overrides.setdefault("episode_transform", NonceAnswers())
        return vqa_task(instruction or "", **overrides)
    if name == "vqa_idefics":
        return vqa_task(
            IDEFICS_VQA_INSTRUCTION if instruction is None else instruction, **overrides
        )
    if name == "caption":
        if instruction:
            overrides["instruction"] = instruction
        return caption_task(**overrides)
    raise TaskError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
