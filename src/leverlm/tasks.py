"""What a task is: which sample fields make a prompt, what is answered, how it is scored.

A *sample* everywhere in leverlm is a plain dict as returned by ``Collection[pos]``:
``{"__key__": str, "position": int, "image": PIL.Image.Image, <json fields>...}``.
A task turns samples into the text parts of an interleaved prompt; the LVLM adapters
(``leverlm.lvlm``) put the images in and tokenise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# The paper's IDEFICS instruction line for VQA.
IDEFICS_VQA_INSTRUCTION = (
    "Instruction: provide an answer to the question. Use the image to answer.\n"
)


class TaskError(ValueError):
    """A sample or config does not fit the task (names the field and the sample key)."""


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

    def __post_init__(self) -> None:
        if not self.query_template.rstrip().endswith(self.split_token.rstrip()):
            raise TaskError(
                f"task {self.name!r}: query_template {self.query_template!r} must end with "
                f"split_token {self.split_token!r}"
            )

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


def get_task(name: str, instruction: str | None = None, **overrides: Any) -> Task:
    """A task by name: ``vqa``, ``vqa_idefics`` (with the IDEFICS instruction) or ``caption``."""
    if name == "vqa":
        return vqa_task(instruction or "", **overrides)
    if name == "vqa_idefics":
        return vqa_task(
            IDEFICS_VQA_INSTRUCTION if instruction is None else instruction, **overrides
        )
    if name == "caption":
        if instruction:
            overrides["instruction"] = instruction
        return caption_task(**overrides)
    raise TaskError(f"unknown task {name!r}; choose one of: vqa, vqa_idefics, caption")
