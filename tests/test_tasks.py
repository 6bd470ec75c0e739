import pytest

from leverlm.tasks import TaskError, get_task


def test_vqa_prompt_parts_follow_the_paper():
    task = get_task("vqa")
    s = {"__key__": "k1", "question": "What color is the shape?", "answer": "blue"}
    assert task.icd_text(s) == "Question:What color is the shape? Short answer:blue"
    assert task.query_text(s) == "Question:What color is the shape? Short answer:"
    assert task.query_text(s) + task.query_answer_text(s) == task.icd_text(s)
    assert task.generation_kwargs["max_new_tokens"] == 5


def test_idefics_vqa_has_instruction_and_caption_keeps_space():
    assert get_task("vqa_idefics").instruction.startswith("Instruction: provide an answer")
    cap = get_task("caption")
    s = {"__key__": "c", "caption": "a red circle"}
    assert cap.icd_text(s) == "Caption: a red circle"
    assert cap.query_answer_text(s) == " a red circle"


def test_missing_field_names_field_and_key():
    task = get_task("vqa")
    with pytest.raises(TaskError, match=r"'k9'.*'question'"):
        task.query_text({"__key__": "k9", "answer": "yes"})
    with pytest.raises(TaskError, match="unknown task"):
        get_task("nope")


def test_postprocess_cuts_at_next_demonstration():
    task = get_task("vqa")
    assert task.postprocess(" yes\nQuestion: is it") == "yes"
    assert task.postprocess("red Question:") == "red"


def test_atomic_write_json_gives_normal_permissions_and_no_temp(tmp_path):
    import json
    import os

    from leverlm.utils import atomic_open, atomic_write_json

    target = tmp_path / "out.json"
    atomic_write_json(target, {"b": 1, "a": 2})
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    try:
        with atomic_open(target) as fh:
            fh.write("half")
            raise RuntimeError("crash")
    except RuntimeError:
        pass
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
