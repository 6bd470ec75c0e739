"""VQA accuracy (official rules) and CIDEr (pycocoevalcap) metrics."""

from __future__ import annotations

import random

import pytest

from leverlm import metrics
from leverlm.metrics import (
    VQA_CONTRACTIONS,
    VQA_NUMBER_WORDS,
    MetricError,
    cider,
    compute_metric,
    java_available,
    normalize_vqa_answer,
    python_ptb_tokenize,
    tokenize_captions,
    vqa_accuracy,
    vqa_accuracy_batch,
    vqa_accuracy_reference,
)

# ------------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),  # number word -> digit, lower case
        ("yes.", "yes"),  # a period not followed by a digit is removed
        ("3.5", "3.5"),  # decimal point kept
        ("A dog", "dog"),  # articles dropped
        ("the Three bears", "3 bears"),
        ("dont", "don't"),  # contraction restored
        ("isnt", "isn't"),
        ("black/white", "black white"),  # punctuation without spaces around -> space
        ("hello , world", "hello world"),  # punctuation touching a space -> removed
        ("100,978", "100978"),  # a comma between digits -> every mark removed
        ("none", "0"),
        ("girl's", "girl's"),  # apostrophes are not punctuation here
        ("2:30", "2:30"),  # nor colons
        ("  Red\tcar\n", "red car"),
    ],
)
def test_normalize_vqa_answer_official_rules(raw: str, normalised: str) -> None:
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_hand_computed() -> None:
    assert vqa_accuracy("Two", ["2"] * 10, variant="authors") == 1.0
    # k of 10 humans: leaving out one of the k matching answers leaves k-1, else k.
    for k in range(11):
        expected = (k * min(1.0, (k - 1) / 3) + (10 - k) * min(1.0, k / 3)) / 10
        answers = ["cat"] * k + ["dog"] * (10 - k)
        assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; 1 of 10: 0.3; 3 of 10: 0.9
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6, abs=1e-12)
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3, abs=1e-12)
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9, abs=1e-12)
    assert vqa_accuracy("bird", ["cat"] * 10) == 0.0


def test_vqa_accuracy_batch_is_percent_mean() -> None:
    preds = ["Two", "cat", "no"]
    answers = [["2"] * 10, ["cat"] * 2 + ["dog"] * 8, ["yes"] * 10]
    assert vqa_accuracy_batch(preds, answers) == pytest.approx(100 * (0.0 + 0.6 + 0.0) / 3)
    both = vqa_accuracy_batch(preds, answers, variant="authors")
    assert both == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)
    assert vqa_accuracy_batch(["Two"], [["2"] * 10], variant="authors") == 100.0


@pytest.mark.parametrize(
    ("answers", "prediction", "official", "authors"),
    [
        (["yes"] * 10, "Yes", 0.0, 1.0),  # unanimous: the official script compares raw text
        (["yes"] * 10, "yes.", 0.0, 1.0),
        (["2"] * 10, "two", 0.0, 1.0),
        (["a dog"] * 10, "dog", 0.0, 1.0),
        (["yes"] * 9 + ["yeah"], "Yes", 1.0, 1.0),  # disagreement: both normalise
        (["dog"] * 9 + ["Dog"], "the dog", 1.0, 1.0),
        (["yes"] * 10, "  yes\n", 1.0, 1.0),  # whitespace is always trimmed
    ],
)
def test_vqa_variants_official_script_and_authors(answers, prediction, official, authors) -> None:
    assert vqa_accuracy(prediction, answers) == official  # the default is the official script
    assert vqa_accuracy(prediction, answers, variant="authors") == authors
    with pytest.raises(MetricError, match="unknown VQA accuracy variant 'x'"):
        vqa_accuracy(prediction, answers, variant="x")


def _official_vqa_eval(prediction: str, answers: list[str]) -> float:
    """One question of GT-Vision-Lab/VQA ``vqaEval.py`` (2021), transcribed for this test."""
    import re as _re

    punct = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
             "@", "`", ",", "?", "!"]  # fmt: skip
    comma_strip = _re.compile(r"(\d)(\,)(\d)")
    period_strip = _re.compile(r"(?!<=\d)(\.)(?!\d)")

    def process_punctuation(in_text: str) -> str:
        out_text = in_text
        for p in punct:
            if (p + " " in in_text or " " + p in in_text) or (
                _re.search(comma_strip, in_text) is not None
            ):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        return period_strip.sub("", out_text, _re.UNICODE)

    manual_map = dict(VQA_NUMBER_WORDS)

    def process_digit_article(in_text: str) -> str:
        out = []
        for word in in_text.lower().split():
            word = manual_map.setdefault(word, word)
            if word not in ("a", "an", "the"):
                out.append(word)
        return " ".join(VQA_CONTRACTIONS.get(w, w) for w in out)

    gts = [{"answer": a.replace("\n", " ").replace("\t", " ").strip(), "answer_id": i + 1}
           for i, a in enumerate(answers)]  # fmt: skip
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len({g["answer"] for g in gts}) > 1:
        for g in gts:
            g["answer"] = process_digit_article(process_punctuation(g["answer"]))
        res = process_digit_article(process_punctuation(res))
    accs = []
    for g in gts:
        others = [item for item in gts if item != g]
        accs.append(min(1, len([item for item in others if item["answer"] == res]) / 3))
    return sum(accs) / len(accs)


def test_vqa_accuracy_is_the_official_script_on_random_answers() -> None:
    rng = random.Random(1)
    vocab = ["yes", "Yes", "no", "2", "two", "Yes.", "red", "a red", "black/white", "dont",
             "3.5", "the dog", "dog", "1,000", "a.b.c.d", "(left)", "won't", ""]  # fmt: skip
    for _ in range(500):
        answers = [rng.choice(vocab) for _ in range(10)]
        if rng.random() < 0.3:
            answers = [answers[0]] * 10
        pred = rng.choice([*vocab, "blue", " yes ", "." * 40])
        want = _official_vqa_eval(pred, answers)
        assert vqa_accuracy(pred, answers) == pytest.approx(want, abs=1e-12), (pred, answers)
        assert vqa_accuracy_reference(pred, answers) == pytest.approx(want, abs=1e-12)


def test_vqa_closed_form_matches_leave_one_out_loop() -> None:
    rng = random.Random(0)
    vocab = ["yes", "no", "2", "two", "Yes.", "red", "a red", "black/white", "dont", "3.5"]
    for _ in range(300):
        answers = [rng.choice(vocab) for _ in range(10)]
        pred = rng.choice(vocab + ["blue"])
        assert vqa_accuracy(pred, answers) == pytest.approx(
            vqa_accuracy_reference(pred, answers), abs=1e-12
        )


def test_vqa_fewer_than_ten_answers() -> None:
    assert vqa_accuracy("red", ["red"]) == 1.0  # a single answer: exact match
    assert vqa_accuracy("Red", ["red"]) == 0.0  # unanimous: raw text, as the official script
    assert vqa_accuracy("Red", ["red"], variant="authors") == 1.0
    assert vqa_accuracy("blue", ["red"]) == 0.0
    assert vqa_accuracy("red", ["red", "red"]) == 1.0  # unanimous always scores 1
    assert vqa_accuracy("red", ["red"] * 4) == 1.0
    # n=3, threshold 2: leaving out a "blue" leaves 1 blue (1/2), leaving out "red" leaves 2 (1)
    assert vqa_accuracy("blue", ["red", "blue", "blue"]) == pytest.approx((0.5 + 0.5 + 1) / 3)


def test_vqa_bad_input_names_the_problem() -> None:
    with pytest.raises(MetricError, match="empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(MetricError, match=r"answers\[1\] = 3"):
        vqa_accuracy("yes", ["yes", 3])  # type: ignore[list-item]
    with pytest.raises(MetricError, match="list of strings"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(MetricError, match="2 predictions but 1 answer lists"):
        vqa_accuracy_batch(["a", "b"], [["a"]])
    with pytest.raises(MetricError, match="sample 1"):
        vqa_accuracy_batch(["a", "b"], [["a"], []])
    with pytest.raises(MetricError, match="no predictions"):
        vqa_accuracy_batch([], [])


# ------------------------------------------------------------------------------------ CIDEr

CAPTIONS = {
    "img1": ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave."],
    "img2": ["Two dogs play with a red ball in the park.", "Dogs playing in the grass."],
    "img3": ["A plate of food with broccoli and rice.", "A dish of rice, broccoli and meat."],
    "img4": ["A red double-decker bus on a city street.", "A bus driving down the street."],
}
PREDICTIONS = {
    "img1": "a man riding a wave on a surfboard",
    "img2": "two dogs playing with a ball",
    "img3": "a cat sitting on a couch",
    "img4": "a red bus on a street.",
}

# Hand-derived from the Stanford PTB tokenizer's rules + pycocoevalcap's punctuation filter:
# lower case, clitics split ("is n't", "ca n't", "cat 's"), brackets escaped (and kept, since
# the filter only knows upper-case escapes), numbers/abbreviations/hyphenated words kept.
PTB_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("The cat's bowl, isn't it?", "the cat 's bowl is n't it"),
    ("Two dogs' toys (red) aren't here!", "two dogs toys -lrb- red -rrb- are n't here"),
    ("can't won't I'm you're they've", "ca n't wo n't i 'm you 're they 've"),
    ("a black-and-white photo of U.S. 3.5 cars...", "a black-and-white photo of u.s. 3.5 cars"),
    ('He said "hello" -- then left; ok: fine', "he said hello then left ok fine"),
    ("A plate with 1,000 fries.", "a plate with 1,000 fries"),
    ("cost $5 & 10% off", "cost $ 5 & 10 % off"),
    ("It's 5 o'clock", "it 's 5 o'clock"),
    ("", ""),
]


def test_python_tokenizer_mimics_ptb() -> None:
    for text, expected in PTB_CASES:
        assert python_ptb_tokenize(text) == expected, text
    if java_available():
        # The expectations above are the real PTB tokenizer's output.
        tokens, used = tokenize_captions({i: [t] for i, (t, _) in enumerate(PTB_CASES)}, "ptb")
        assert used == "ptb"
        assert [tokens[i][0] for i in range(len(PTB_CASES))] == [e for _, e in PTB_CASES]
    else:
        _, used = tokenize_captions({0: ["a dog."]}, "auto")
        assert used == "python"


def _direct_cider(gts_tok: dict, res_tok: dict) -> tuple[float, list[float]]:
    from pycocoevalcap.cider.cider import Cider

    score, scores = Cider().compute_score(gts_tok, res_tok)
    return 100 * float(score), [100 * float(s) for s in scores]


def test_cider_python_tokenizer_equals_pycocoevalcap() -> None:
    result = cider(PREDICTIONS, CAPTIONS, tokenizer="python")
    assert result.tokenizer == "python"
    keys = sorted(PREDICTIONS)
    gts = {k: [python_ptb_tokenize(c) for c in CAPTIONS[k]] for k in keys}
    res = {k: [python_ptb_tokenize(PREDICTIONS[k])] for k in keys}
    score, scores = _direct_cider(gts, res)
    assert result.score == pytest.approx(score, rel=1e-12)
    assert [result.per_sample[k] for k in keys] == pytest.approx(scores, rel=1e-12)
    assert result.score == pytest.approx(sum(result.per_sample.values()) / len(keys))
    # The unrelated caption scores lowest.
    assert min(result.per_sample, key=result.per_sample.get) == "img3"


def test_cider_default_path_uses_ptb_when_java_exists() -> None:
    result = cider(PREDICTIONS, CAPTIONS)
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        keys = sorted(PREDICTIONS)
        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in CAPTIONS[k]] for k in keys})
        res = tok.tokenize({k: [{"caption": PREDICTIONS[k]}] for k in keys})
        score, _ = _direct_cider(gts, res)
        assert result.tokenizer == "ptb"
        assert result.score == pytest.approx(score, rel=1e-12)
    else:
        assert result.tokenizer == "python"


def test_cider_falls_back_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    assert not java_available()
    result = cider(PREDICTIONS, CAPTIONS)
    assert result.tokenizer == "python"
    assert result.score == pytest.approx(cider(PREDICTIONS, CAPTIONS, tokenizer="python").score)
    with pytest.raises(MetricError, match="java"):
        cider(PREDICTIONS, CAPTIONS, tokenizer="ptb")


def test_cider_newlines_do_not_shift_captions() -> None:
    preds = {"a": "a dog\non grass", "b": "a cat"}
    refs = {"a": ["a dog on grass", "a dog\nlying on grass"], "b": ["a cat", "a cat on a mat"]}
    tokens, _ = tokenize_captions({**{("p", k): [v] for k, v in preds.items()}, **refs})
    assert tokens[("p", "a")] == ["a dog on grass"]
    assert tokens["a"] == ["a dog on grass", "a dog lying on grass"]
    assert tokens["b"] == ["a cat", "a cat on a mat"]


def test_cider_bad_input() -> None:
    with pytest.raises(MetricError, match="img9"):
        cider({**PREDICTIONS, "img9": "x"}, CAPTIONS, tokenizer="python")
    with pytest.raises(MetricError, match="'img1'"):
        cider(PREDICTIONS, {**CAPTIONS, "img1": []}, tokenizer="python")
    with pytest.raises(MetricError, match="no predictions"):
        cider({}, {}, tokenizer="python")
    with pytest.raises(MetricError, match="tokenizer"):
        cider(PREDICTIONS, CAPTIONS, tokenizer="nltk")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- dispatch


def test_compute_metric_dispatch() -> None:
    preds = {"q1": "Two", "q2": "cat"}
    answers = {"q1": ["2"] * 10, "q2": ["cat"] * 2 + ["dog"] * 8}
    expected = vqa_accuracy_batch(["Two", "cat"], [answers["q1"], answers["q2"]])
    assert compute_metric("vqa_accuracy", preds, answers) == pytest.approx(expected)
    assert compute_metric(
        "vqa_accuracy", ["Two", "cat"], [answers["q1"], answers["q2"]]
    ) == pytest.approx(expected)
    assert compute_metric("cider", PREDICTIONS, CAPTIONS) == pytest.approx(
        cider(PREDICTIONS, CAPTIONS).score
    )
    with pytest.raises(MetricError, match="'bleu'"):
        compute_metric("bleu", preds, answers)
    with pytest.raises(MetricError, match="keys differ"):
        compute_metric("vqa_accuracy", preds, {"q1": ["2"] * 10})
    with pytest.raises(MetricError, match="both be dicts or both be lists"):
        compute_metric("vqa_accuracy", preds, [["2"]])
