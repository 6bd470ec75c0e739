"""Evaluation metrics: VQA accuracy (official VQA rules) and CIDEr-D (COCO caption evaluation).

VQA accuracy scores ``min(#humans who gave the answer / 3, 1)``, averaged over the
leave-one-out subsets of the human answers, after normalisation (punctuation, number words,
articles, contractions). Two variants (:data:`VQA_VARIANTS`):

* ``official`` (default): exactly the official script (``vqaEval.py`` of GT-Vision-Lab/VQA since
  2021): prediction and answers are normalised only when the humans disagree; with unanimous
  answers the raw (whitespace-trimmed) prediction must equal them.
* ``authors``: the Lever-LM authors' (= open_flamingo's) copy, which always normalises both
  sides; the paper's numbers were computed with it.
 CIDEr goes through ``pycocoevalcap`` exactly as the COCO caption evaluation calls it,
after PTB tokenisation (Stanford tokenizer, needs ``java``); without Java a pure-Python
tokenizer that mimics it is used and the result says so.

Only the standard library is imported at module level; ``pycocoevalcap`` is imported when
CIDEr is computed.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from leverlm.errors import LeverError

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

METRICS = ("vqa_accuracy", "cider")


class MetricError(LeverError):
    """Inputs a metric cannot score (names the key/field/value at fault)."""


# ---------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------

# The official contractions map (vqaEval.py), applied word by word after lower-casing. Keys with
# capitals ("Im", "Ive", "Id've", "I'dve") can never match lower-cased words; kept as the
# official script has them so the results are the official ones.
VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

# Number words -> digits (the official "manualMap": none..ten).
VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

VQA_ARTICLES = frozenset({"a", "an", "the"})

# The official punctuation list. Apostrophes and colons are not in it on purpose ("girl's",
# "2:50"); periods are handled separately.
VQA_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)  # fmt: skip

# The official period rule is written "(?!<=\d)(\.)(?!\d)": its look-behind is mistyped as a
# negative look-ahead for the literal "<=digit", so in effect a period is removed unless a digit
# follows it ("3.5" and ".5" keep theirs, "yes." loses it); and its re.UNICODE lands in sub()'s
# count argument, so at most 32 periods go. Reproduced as it behaves.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32  # re.UNICODE, passed as the count
VQA_VARIANTS = ("official", "authors")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")


def vqa_process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: strip or space out punctuation, drop periods.

    Each punctuation mark is deleted when it touches a space somewhere in the text (or when the
    text has a comma between digits anywhere: "100,978" -> "100978"), otherwise replaced by a
    space ("black/white" -> "black white"). The decision looks at the original text, as the
    official script does.
    """
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in VQA_PUNCTUATION:
        if has_digit_comma or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, drop articles,
    restore apostrophes of common contractions ("dont" -> "don't")."""
    words = []
    for word in text.lower().split():
        word = VQA_NUMBER_WORDS.get(word, word)
        if word not in VQA_ARTICLES:
            words.append(word)
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """An answer as the VQA evaluation normalises it before matching."""
    return vqa_process_digit_article(vqa_process_punctuation(_clean(text)))


def _check_strings(values: Sequence[str], where: str, what: str = "answers") -> None:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise MetricError(f"{where}: {what} must be a list of strings, got {values!r}")
    if len(values) == 0:
        raise MetricError(f"{where}: {what} is empty (need at least 1)")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise MetricError(f"{where}: {what}[{i}] = {value!r} is not a string")


def _check_variant(variant: str) -> None:
    if variant not in VQA_VARIANTS:
        raise MetricError(f"unknown VQA accuracy variant {variant!r}; choose one of {VQA_VARIANTS}")


def _vqa_sides(prediction: str, answers: Sequence[str], variant: str) -> tuple[str, list[str]]:
    """Prediction and references as the variant compares them."""
    pred, refs = _clean(prediction), [_clean(a) for a in answers]
    if variant == "authors" or len(set(refs)) > 1:
        return vqa_process_digit_article(vqa_process_punctuation(pred)), [
            vqa_process_digit_article(vqa_process_punctuation(r)) for r in refs
        ]
    return pred, refs


def vqa_accuracy(prediction: str, answers: Sequence[str], *, variant: str = "official") -> float:
    """VQA accuracy of one prediction in [0, 1] (see the module docstring for ``variant``).

    With VQAv2's 10 answers this is exactly the official score (e.g. 2 of 10 matching ->
    (2 * 1/3 + 8 * 2/3) / 10 = 0.6). With ``n < 10`` answers the same leave-one-out average is
    taken over the ``n`` subsets of ``n - 1`` answers, with the "3 humans" threshold lowered to
    ``n - 1`` when fewer than 3 others remain, so that a unanimous answer always scores 1;
    a single answer (``n == 1``) is an exact match.
    """
    if not isinstance(prediction, str):
        raise MetricError(f"vqa_accuracy: prediction {prediction!r} is not a string")
    _check_strings(answers, "vqa_accuracy")
    _check_variant(variant)
    pred, refs = _vqa_sides(prediction, answers, variant)
    n = len(refs)
    matches = sum(ref == pred for ref in refs)
    if n == 1:
        return float(matches)
    threshold = min(3, n - 1)
    # Leaving out a matching answer leaves matches - 1 others; leaving out another leaves all.
    total = matches * min(1.0, (matches - 1) / threshold) + (n - matches) * min(
        1.0, matches / threshold
    )
    return total / n


def vqa_accuracy_reference(
    prediction: str, answers: Sequence[str], *, variant: str = "official"
) -> float:
    """The official script's loop, written out (10 answers): for each human answer left out,
    ``min(1, #other answers equal to the prediction / 3)``; the mean."""
    _check_strings(answers, "vqa_accuracy_reference")
    pred, refs = _vqa_sides(prediction, answers, variant)
    scores = []
    for left_out in range(len(refs)):
        others = [ref for i, ref in enumerate(refs) if i != left_out]
        scores.append(min(1.0, sum(ref == pred for ref in others) / 3))
    return sum(scores) / len(scores)


def vqa_accuracy_batch(
    predictions: Sequence[str],
    answers_list: Sequence[Sequence[str]],
    *,
    variant: str = "official",
) -> float:
    """Mean VQA accuracy in percent (0-100, as in the paper's tables)."""
    if len(predictions) != len(answers_list):
        raise MetricError(
            f"vqa_accuracy_batch: {len(predictions)} predictions but {len(answers_list)} "
            "answer lists"
        )
    if len(predictions) == 0:
        raise MetricError("vqa_accuracy_batch: no predictions to score")
    total = 0.0
    for i, (pred, answers) in enumerate(zip(predictions, answers_list)):
        try:
            total += vqa_accuracy(pred, answers, variant=variant)
        except MetricError as err:
            raise MetricError(f"sample {i}: {err}") from None
    return 100.0 * total / len(predictions)


# ---------------------------------------------------------------------------------------------
# CIDEr
# ---------------------------------------------------------------------------------------------

TokenizerName = Literal["ptb", "python"]

# Tokens the COCO evaluation drops after PTB tokenisation (pycocoevalcap's PUNCTUATIONS).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
     "--", "...", ";"]
)  # fmt: skip

# The Stanford tokenizer turns brackets into these escapes; with -lowerCase they come out lower
# case and so survive the (upper-case) punctuation filter above, as in the COCO evaluation.
_PTB_BRACKETS = {
    "(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ",
    "}": " -rcb- ",
}  # fmt: skip
# "u.s." / "e.g." and a few titles keep their final period, as the Stanford tokenizer's
# abbreviation list does.
_PTB_ABBREVIATION = re.compile(r"^(?:(?:[a-z]\.){2,}|mr\.|mrs\.|ms\.|dr\.|st\.|jr\.|vs\.)$")
_PTB_NUMBER = re.compile(r"^[+-]?\d[\d,]*(?:\.\d+)?$")
_PTB_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_PTB_SYMBOLS = re.compile(r"([$%#&+=@*^~|<>])")
_PTB_EDGE_PUNCT = ",;:!?\"'`."


def _python_ptb_word(word: str) -> list[str]:
    """Split one whitespace-free chunk the way the PTB tokenizer does (approximately)."""
    lead: list[str] = []
    trail: list[str] = []
    while word and word[0] in _PTB_EDGE_PUNCT and not _PTB_NUMBER.match(word):
        lead.append(word[0])
        word = word[1:]
    while word and word[-1] in _PTB_EDGE_PUNCT:
        if word[-1] == "." and _PTB_ABBREVIATION.match(word):
            break
        if word.endswith("..."):
            trail.insert(0, "...")
            word = word[:-3]
            continue
        trail.insert(0, word[-1])
        word = word[:-1]
    core: list[str] = []
    if word:
        if "," in word and not _PTB_NUMBER.match(word):
            parts = [p for part in word.split(",") for p in (part, ",")][:-1]
            for part in parts:
                core.extend(_python_ptb_word(part) if part != "," else [","])
        elif (m := _PTB_CLITIC.match(word)) and m.group(1).isalpha():
            stem, clitic = m.group(1), m.group(2)
            # "can't" -> "ca n't", "won't" -> "wo n't": the stem keeps everything before n't.
            core.extend([stem, clitic])
        else:
            core.append(word)
    return lead + core + trail


def python_ptb_tokenize(text: str) -> str:
    """Pure-Python stand-in for the COCO evaluation's PTB tokenisation + punctuation removal.

    Lower-cases; splits off punctuation, symbols ($ % # & + ...), brackets (as -lrb- etc.) and
    clitics ("isn't" -> "is n't", "cat's" -> "cat 's"); keeps numbers ("3.5", "1,000"),
    abbreviations ("u.s.") and hyphenated words; then drops the tokens pycocoevalcap drops.
    Matches the Stanford tokenizer on ordinary captions; rare constructs may differ.
    """
    text = text.replace("\n", " ").lower()
    for bracket, escape in _PTB_BRACKETS.items():
        text = text.replace(bracket, escape)
    text = _PTB_SYMBOLS.sub(r" \1 ", text)
    tokens: list[str] = []
    for chunk in text.split():
        tokens.extend(_python_ptb_word(chunk))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and t != '"')


def java_available() -> bool:
    """Whether the Stanford PTB tokenizer (a Java program) can run here."""
    return shutil.which("java") is not None


def _ptb_tokenize(captions: dict[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    payload = {k: [{"caption": c} for c in caps] for k, caps in captions.items()}
    out = PTBTokenizer().tokenize(payload)
    for k, caps in captions.items():
        # The tokenizer pairs output lines with inputs by position: a lost line would silently
        # shift every later caption, so check the counts.
        if len(out.get(k, [])) != len(caps):
            raise RuntimeError(
                f"PTB tokenizer returned {len(out.get(k, []))} lines for key {k!r}, "
                f"expected {len(caps)}"
            )
    return {k: list(out[k]) for k in captions}


def tokenize_captions(
    captions: Mapping[K, Sequence[str]],
    tokenizer: Literal["auto", "ptb", "python"] = "auto",
) -> tuple[dict[K, list[str]], TokenizerName]:
    """Tokenise captions for CIDEr; returns ``(tokenised, tokenizer used)``.

    ``auto`` uses the PTB tokenizer when ``java`` is on the PATH and the pure-Python tokenizer
    otherwise (or when the Java run fails; a warning is logged). One Java process serves the
    whole mapping, so batch everything into one call.
    """
    if tokenizer not in ("auto", "ptb", "python"):
        raise MetricError(f"unknown tokenizer {tokenizer!r}; choose auto, ptb or python")
    # Newlines would split a caption over two tokenizer lines; they are spaces to PTB anyway.
    clean = {k: [c.replace("\r", " ").replace("\n", " ") for c in v] for k, v in captions.items()}
    if tokenizer == "ptb" or (tokenizer == "auto" and java_available()):
        if not java_available():
            raise MetricError("tokenizer='ptb' needs java on the PATH; use tokenizer='python'")
        try:
            return _ptb_tokenize(clean), "ptb"
        except (OSError, RuntimeError) as err:
            if tokenizer == "ptb":
                raise
            log.warning("PTB tokenizer failed (%s); using the Python tokenizer", err)
    return {k: [python_ptb_tokenize(c) for c in v] for k, v in clean.items()}, "python"


@dataclass(frozen=True)
class CiderResult:
    """CIDEr-D of a set of captions, x100 as papers report it.

    ``per_sample`` is on the same scale (``score`` is its mean); ``tokenizer`` says which
    tokenisation produced it ("ptb": Stanford PTB via Java, as the COCO evaluation; "python":
    the pure-Python stand-in, numbers then only approximately comparable to published ones).
    """

    score: float
    per_sample: dict = field(repr=False)
    tokenizer: TokenizerName


def _check_caption_inputs(
    predictions: Mapping[K, str], references: Mapping[K, Sequence[str]]
) -> list[K]:
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise MetricError("cider: predictions and references must be dicts keyed by sample")
    if len(predictions) == 0:
        raise MetricError("cider: no predictions to score")
    keys = _matched_keys(predictions, references, "cider: ")
    for k, pred in predictions.items():
        if not isinstance(pred, str):
            raise MetricError(f"cider: prediction for key {k!r} is not a string: {pred!r}")
        _check_strings(references[k], f"cider: key {k!r}", "references")
    return keys


def _matched_keys(predictions: Mapping, references: Mapping, where: str = "") -> list:
    """The keys of both dicts, sorted: summation order (and so the last bits of a score) never
    depends on how the caller built its dicts. A key on one side only is an error."""
    missing = [k for k in predictions if k not in references]
    extra = [k for k in references if k not in predictions]
    if missing or extra:
        raise MetricError(
            f"{where}keys differ: {len(missing)} predictions without references "
            f"(e.g. {missing[:3]!r}), {len(extra)} references without predictions "
            f"(e.g. {extra[:3]!r})"
        )
    return sorted(predictions, key=lambda k: (type(k).__name__, str(k)))


def cider_from_tokens(
    predictions: Mapping[K, str], references: Mapping[K, Sequence[str]]
) -> tuple[float, dict[K, float]]:
    """CIDEr-D x100 of already tokenised captions via ``pycocoevalcap`` (score, per sample)."""
    from pycocoevalcap.cider.cider import Cider

    keys = _check_caption_inputs(predictions, references)
    ids = {k: i for i, k in enumerate(keys)}
    gts = {ids[k]: list(references[k]) for k in keys}
    res = {ids[k]: [predictions[k]] for k in keys}
    score, scores = Cider().compute_score(gts, res)
    per_sample = {k: 100.0 * float(scores[ids[k]]) for k in keys}
    return 100.0 * float(score), per_sample


def cider(
    predictions: Mapping[K, str],
    references: Mapping[K, Sequence[str]],
    *,
    tokenizer: Literal["auto", "ptb", "python"] = "auto",
) -> CiderResult:
    """CIDEr-D (x100) of predicted captions against their reference captions.

    Both sides are tokenised in one tokenizer run (see :func:`tokenize_captions`), then scored
    by ``pycocoevalcap.cider.Cider`` as the COCO caption evaluation does. CIDEr is a corpus
    metric: its n-gram weights come from the references of the scored set.
    """
    keys = _check_caption_inputs(predictions, references)
    joint: dict[tuple[str, int], list[str]] = {}
    for i, k in enumerate(keys):
        joint[("ref", i)] = list(references[k])
        joint[("pred", i)] = [predictions[k]]
    tokens, used = tokenize_captions(joint, tokenizer)
    score, per = cider_from_tokens(
        {i: tokens[("pred", i)][0] for i in range(len(keys))},
        {i: tokens[("ref", i)] for i in range(len(keys))},
    )
    return CiderResult(
        score=score, per_sample={k: per[i] for i, k in enumerate(keys)}, tokenizer=used
    )


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def _aligned(
    predictions: Mapping | Sequence, references: Mapping | Sequence
) -> tuple[list, list, list]:
    """Predictions and references as parallel lists (keys, preds, refs), sorted by key."""
    if isinstance(predictions, Mapping) != isinstance(references, Mapping):
        raise MetricError("predictions and references must both be dicts or both be lists")
    if isinstance(predictions, Mapping):
        assert isinstance(references, Mapping)
        keys = _matched_keys(predictions, references)
        return keys, [predictions[k] for k in keys], [references[k] for k in keys]
    if len(predictions) != len(references):
        raise MetricError(f"{len(predictions)} predictions but {len(references)} references")
    return list(range(len(predictions))), list(predictions), list(references)


def compute_metric(
    task_metric_name: str,
    predictions: Mapping[K, str] | Sequence[str],
    references: Mapping[K, Sequence[str]] | Sequence[Sequence[str]],
    *,
    vqa_variant: str = "official",
) -> float:
    """A task's metric in percent-like units: ``vqa_accuracy`` (0-100) or ``cider`` (x100).

    ``predictions``/``references`` are dicts keyed by sample or parallel lists.
    """
    if task_metric_name not in METRICS:
        raise MetricError(f"unknown metric {task_metric_name!r}; choose one of {METRICS}")
    keys, preds, refs = _aligned(predictions, references)
    if task_metric_name == "vqa_accuracy":
        return vqa_accuracy_batch(preds, refs, variant=vqa_variant)
    result = cider(dict(zip(keys, preds)), dict(zip(keys, refs)))
    if not math.isfinite(result.score):
        raise MetricError(f"cider: score is not finite ({result.score})")
    return result.score
