"""Answer extraction, checked on LLM-Adapters' real test sets (skipped when they are absent)."""

import json
import math
from pathlib import Path

import pytest

from llm_adapters import answers

DATASET_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters" / "dataset"


def _records(name):
    path = DATASET_DIR / name / "test.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(answers.COMMONSENSE))
def test_commonsense_gold_outputs_extract_to_answer(name):
    records = _records(name)
    options = answers.COMMONSENSE[name]
    wrong = []
    for i, rec in enumerate(records):
        assert rec["answer"] in options, f"record {i}: answer {rec['answer']!r} not an option"
        got = answers.score(name, rec["output"], rec["answer"])
        if not got["correct"] or got["prediction"] != rec["answer"]:
            wrong.append((i, rec["output"], rec["answer"], got["prediction"]))
    assert not wrong, f"{len(wrong)} of {len(records)} gold outputs misread, first: {wrong[:3]}"


@pytest.mark.parametrize("name", answers.ARITHMETIC)
def test_arithmetic_answer_sentence_extracts_to_answer(name):
    records = _records(name)
    wrong = []
    for i, rec in enumerate(records):
        label = rec["answer"]
        got = answers.score(name, f"The answer is {label}.", label)
        if not got["correct"] or got["prediction"] != float(label):
            wrong.append((i, label, got["prediction"]))
    assert not wrong, f"{len(wrong)} of {len(records)} answers misread, first: {wrong[:3]}"


@pytest.mark.parametrize("name", answers.LETTER)
def test_letter_answer_sentence_extracts_to_answer(name):
    records = _records(name)
    wrong = []
    for i, rec in enumerate(records):
        label = rec["answer"]
        assert label in "ABCDE" and len(label) == 1, f"record {i}: answer {label!r}"
        for text in (f"The answer is {label}.", f"Answer: the answer is ({label})."):
            got = answers.score(name, text, label)
            if not got["correct"]:
                wrong.append((i, text, got["prediction"]))
    assert not wrong, f"{len(wrong)} misread, first: {wrong[:3]}"


def test_number_rule():
    assert answers.extract_number("so 1,234.5 apples") == 1234.5
    assert answers.extract_number("4 - 7 = -3") == -3.0
    assert answers.extract_number("The answer is 4.") == 4.0
    assert answers.extract_number("no digits") == math.inf
    # LLM-Adapters' tolerance is inclusive at 1e-3 and no wider
    assert answers.numbers_match(2.001, "2")
    assert not answers.numbers_match(2.0011, "2")
    assert not answers.numbers_match(math.inf, "2")
    assert answers.score("gsm8k", "nothing", "3") == {"prediction": None, "correct": False}


def test_letter_rules():
    # LLM-Adapters' rule reads the "A" of "Answer"; the strict one reads the stated letter
    text = "Answer: 12 apples. The answer is (C)."
    assert answers.extract_letter_llm_adapters(text) == "A"
    assert answers.extract_letter(text) == "C"
    got = answers.score("AQuA", text, "C")
    assert got["correct"] and not got["correct_llm_adapters"]
    assert answers.extract_letter("the answer is: option d") == "D"
    # the last statement wins; no statement falls back to the first capital A-E
    assert answers.extract_letter("answer is B, no wait, the answer is E") == "E"
    assert answers.extract_letter("I pick (D)") == "D"
    assert answers.extract_letter("the answer is Blue") == "B"  # fallback: "Blue" is no letter
    assert answers.extract_letter("nothing here") == ""


def test_option_rules():
    assert answers.score("boolq", "the correct answer is true", "true")["correct"]
    # first occurrence, case-sensitive, as LLM-Adapters
    assert (
        answers.extract_option("answer2 or answer1", answers.COMMONSENSE["ARC-Easy"]) == "answer2"
    )
    assert answers.extract_option("Answer2", answers.COMMONSENSE["ARC-Easy"]) == ""
    assert answers.score("hellaswag", "ending3", "ending3")["correct"]
    assert answers.score("winogrande", "", "option1") == {"prediction": "", "correct": False}


def test_dataset_names():
    assert answers.canonical_dataset("arc-easy") == "ARC-Easy"
    assert answers.dataset_kind("MAWPS") == "arithmetic"
    assert answers.dataset_kind("mathqa") == "letter"
    assert answers.dataset_kind("piqa") == "commonsense"
    assert len(answers.DATASETS) == 16
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        answers.canonical_dataset("nope")


@pytest.mark.parametrize(
    "text, strict, theirs",
    [
        # a lowercase letter followed by a word is a word of the sentence: no statement, so the
        # first capital, as LLM-Adapters reads it
        ("The answer is a little unclear; maybe C.", "C", "C"),
        ("the answer is a good guess, say D", "D", "D"),
        ("the answer is b because of x", "", ""),
        # a lowercase letter that stands alone is the answer
        ("the answer is b", "B", ""),
        ("the answer is a.", "A", ""),
        ("answer is: c", "C", ""),
        ("the answer is (d) because", "D", ""),
        ("the answer is e!\nSo we stop.", "E", ""),
        ("the answer is c. The rest is noise", "C", ""),
        ("the answer is e.g. 5, or D", "D", "D"),  # "e." of "e.g." is no answer
        # capitals, with and without parentheses, colon or "option"
        ("Blah. The answer is (B).", "B", "B"),
        ("The Answer Is: D", "D", "A"),
        ("the answer is: option E", "E", "E"),
        ("The answer is A little unclear", "A", "A"),  # a capital is always read
        ("so the answer is C) 12", "C", "C"),
    ],
)
def test_letter_lowercase_only_when_it_stands_alone(text, strict, theirs):
    assert answers.extract_letter(text) == strict
    assert answers.extract_letter_llm_adapters(text) == theirs
    got = answers.score("AQuA", text, strict or "A")
    assert got["prediction"] == strict and got["prediction_llm_adapters"] == theirs
