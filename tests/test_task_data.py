"""tools/make_task_data.py: reproducible splits, correct answers, the exact-match scorer."""

from __future__ import annotations

import datetime
import importlib.util
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from tiny import train_tokenizer

_SPEC = importlib.util.spec_from_file_location("make_task_data", Path(__file__).resolve().parent.parent / "tools" / "make_task_data.py")
task = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(task)


@pytest.fixture(scope="module")
def splits():
    return task.make_examples(train=500, heldout=100, seed=7)


def test_same_seed_same_files_other_seed_other_files(tmp_path, splits):
    first = task.write_task(tmp_path / "a", train=500, heldout=100, seed=7)
    second = task.write_task(tmp_path / "b", train=500, heldout=100, seed=7)
    for split in ("train", "heldout"):
        assert first[split].read_bytes() == second[split].read_bytes()
    assert task.read_jsonl(first["heldout"]) == splits[1]
    assert task.make_examples(train=500, heldout=100, seed=8)[1] != splits[1]


def test_splits_are_disjoint_and_balanced(splits):
    train, heldout = splits
    assert len(train) == 500 and len(heldout) == 100
    prompts = [record["messages"][0]["content"] for record in heldout]
    assert len(set(prompts)) == 100
    assert not set(prompts) & {record["messages"][0]["content"] for record in train}
    for family in task.FAMILIES:
        assert sum(record["family"] == family for record in heldout) == 20
        assert sum(record["family"] == family for record in train) == 100


def test_every_record_is_one_chat_turn_with_its_answer(splits):
    for record in splits[0] + splits[1]:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == record["answer"]


def _recomputed(family: str, prompt: str) -> str:
    """The answer from the prompt, computed independently of the generator."""
    if family == "date":
        written = re.match(r"Write (.+) in YYYY-MM-DD format", prompt).group(1)
        written = re.sub(r"^the (\d+)(st|nd|rd|th) of ", r"\1 ", written)
        for pattern in ("%B %d, %Y", "%d %B %Y", "%b %d %Y"):
            try:
                return datetime.datetime.strptime(written, pattern).date().isoformat()
            except ValueError:
                pass
        raise AssertionError(f"unparsed date: {written}")
    if family == "units":
        value, unit, target = re.match(r"Convert ([\d.]+) (\w+) to (\w+)\.", prompt).groups()
        factor = {("km", "m"): 1000, ("kg", "g"): 1000, ("L", "mL"): 1000, ("m", "cm"): 100, ("cm", "mm"): 10}[(unit, target)]
        result = Decimal(value) * factor
        assert result == result.to_integral_value()
        return str(int(result))
    if family == "addition":
        return str(sum(int(n) for n in re.findall(r"\d+", prompt)))
    return None  # number_words: test_number_words; json: checked field by field below


def test_answers_are_right(splits):
    checked = set()
    for record in splits[0] + splits[1]:
        expected = _recomputed(record["family"], record["messages"][0]["content"])
        if expected is not None:
            assert record["answer"] == expected, record
            checked.add(record["family"])
        if record["family"] == "json":
            fields = json.loads(record["answer"])
            assert list(fields) == ["name", "age", "city"]
            prompt = record["messages"][0]["content"]
            assert fields["name"] in prompt and str(fields["age"]) in prompt and fields["city"] in prompt
    assert checked == {"date", "units", "addition"}


@pytest.mark.parametrize(
    "n, words",
    [(0, "zero"), (15, "fifteen"), (40, "forty"), (73, "seventy-three"), (105, "one hundred and five"),
     (990, "nine hundred and ninety"), (2014, "two thousand and fourteen"), (3000, "three thousand"),
     (9999, "nine thousand nine hundred and ninety-nine")],
)
def test_number_words(n, words):
    assert task.number_words(n) == words


def test_exact_match_is_strict_but_ignores_surrounding_space_and_json_layout():
    assert task.exact_match("addition", " 85\n", "85")
    assert not task.exact_match("addition", "85.", "85")
    assert not task.exact_match("addition", "The answer is 85", "85")
    answer = json.dumps({"name": "Ana Silva", "age": 34, "city": "Lisbon"})
    assert task.exact_match("json", '{\n  "city": "Lisbon", "age": 34,\n "name": "Ana Silva"}', answer)
    assert not task.exact_match("json", '{"name": "Ana Silva", "age": "34", "city": "Lisbon"}', answer)
    assert not task.exact_match("json", '{"name": "Ana Silva", "age": 34', answer)


def test_answer_found_accepts_the_answer_inside_other_words_only():
    assert task.answer_found("addition", "The answer is 85.", "85")
    assert not task.answer_found("addition", "The answer is 850.", "85")
    assert not task.answer_found("addition", "8.85", "85")
    assert task.answer_found("units", "That is 1,250 mm", "1250")
    assert task.answer_found("date", "It is 2021-03-05.", "2021-03-05")
    answer = json.dumps({"name": "Ana Silva", "age": 34, "city": "Lisbon"})
    assert task.answer_found("json", "name: Ana Silva, age: 34, city: Lisbon", answer)
    assert not task.answer_found("json", "name: Ana Silva, age: 34", answer)


def test_the_trainer_stream_reads_the_files_with_loss_on_replies_only(tmp_path):
    from lorasp_edge.train.data import PackedStream

    paths = task.write_task(tmp_path, train=20, heldout=10, seed=3)
    tokenizer = train_tokenizer()
    stream = PackedStream(paths["heldout"], tokenizer, seq_len=64, epochs=1)
    blocks = list(stream)
    stream.close()
    trained = [int(token) for block in blocks for token in block["labels"] if token != -100]
    text = tokenizer.decode(trained)
    answers = [record["answer"] for record in task.read_jsonl(paths["heldout"])]
    assert answers[1] in text and answers[2] in text
    assert "Reply with" not in text and "Extract the" not in text
