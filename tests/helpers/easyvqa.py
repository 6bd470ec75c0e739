"""Real easy-vqa samples (the package ships the images) in the collection sample format."""

from __future__ import annotations

import easy_vqa
from PIL import Image


def easyvqa_sample(i: int) -> dict:
    """Real easy-vqa test question ``i`` in the collection sample format."""
    questions, answers, image_ids = easy_vqa.get_test_questions()
    path = easy_vqa.get_test_image_paths()[image_ids[i]]
    return {
        "__key__": f"easyvqa-test-q{i:06d}",
        "position": i,
        "image": Image.open(path).convert("RGB"),
        "question": questions[i],
        "answer": answers[i],
        "answers": [answers[i]] * 10,
        "image_id": image_ids[i],
    }


def easyvqa_samples(n: int, offset: int = 0) -> list[dict]:
    """``n`` consecutive real easy-vqa test samples."""
    return [easyvqa_sample(i) for i in range(offset, offset + n)]
