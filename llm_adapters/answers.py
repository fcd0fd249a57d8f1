"""Answer extraction for LLM-Adapters' evaluation sets.

Each function reads a model's generation (the text after the prompt's "### Response:") and
returns the predicted answer, following LLM-Adapters' evaluate.py / commonsense_evaluate.py:

- arithmetic (gsm8k, SVAMP, AddSub, MultiArith, SingleEq, mawps): the last number in the text,
  commas removed; correct when |prediction - label| <= 0.001. No number: +inf (never correct).
- multiple choice by letter (AQuA, mathqa): LLM-Adapters takes the first capital A-E anywhere in
  the text, so "Answer: C" reads as "A". `extract_letter` first reads the letter after
  "answer is" and falls back to that rule only when there is none; the summary reports both.
  A lowercase letter after "answer is" counts only where it stands alone, so "The answer is a
  little unclear; maybe C." reads C, as LLM-Adapters reads it.
- commonsense: the first option word of the dataset's answer format in the text (true/false,
  solution1/2, answer1-5, ending1-4, option1/2), case-sensitive as in LLM-Adapters;
  "" when there is none.
"""

from __future__ import annotations

import math
import re
from typing import Any

ARITHMETIC = ("gsm8k", "SVAMP", "AddSub", "MultiArith", "SingleEq", "mawps")
LETTER = ("AQuA", "mathqa")
_ANSWER_WORDS = tuple(f"answer{i}" for i in range(1, 6))
COMMONSENSE: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _ANSWER_WORDS,
    "ARC-Easy": _ANSWER_WORDS,
    "ARC-Challenge": _ANSWER_WORDS,
    "openbookqa": _ANSWER_WORDS,
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
}
DATASETS = ARITHMETIC + LETTER + tuple(COMMONSENSE)
NUMBER_TOLERANCE = 1e-3  # LLM-Adapters' `miss`

_NUMBER = re.compile(r"-?\d+\.?\d*")
_FIRST_LETTER = re.compile(r"[A-E]")
# After "answer is" (any case, optional ":" and "option"): a capital A-E not followed by a letter
# ("the answer is C", "answer is (C)", "Answer is C)"), or a lowercase a-e that stands alone:
# in parentheses, at the end of the text or line, or before punctuation that ends it ("the
# answer is b", "answer is: c", "the answer is a."). A lowercase letter followed by a word is
# a word of the sentence ("the answer is a little unclear"), not an answer.
_ANSWER_IS_LETTER = re.compile(
    r"""(?i:answer\s+is)\s*:?\s*(?i:option\s*)?
    (?:
        \(?([A-E])(?![A-Za-z])                    # capital, optionally after "("
      | \(([a-e])\)                               # lowercase in parentheses
      | ([a-e])(?=[.,;:!?)]*[ \t]*(?:\n|$))        # lowercase, then only punctuation to the end
      | ([a-e])(?=[.,;:!?)]+\s)                    # lowercase, then punctuation and a space
    )""",
    re.X,
)


def canonical_dataset(name: str) -> str:
    """The dataset's canonical name (case-insensitive match), or a ValueError listing them."""
    by_lower = {d.lower(): d for d in DATASETS}
    try:
        return by_lower[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def dataset_kind(name: str) -> str:
    """'arithmetic', 'letter' or 'commonsense'."""
    name = canonical_dataset(name)
    if name in ARITHMETIC:
        return "arithmetic"
    return "letter" if name in LETTER else "commonsense"


def extract_number(text: str) -> float:
    """The last number in `text` (commas dropped, so 1,000 is 1000); +inf when there is none."""
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return math.inf
    try:
        return float(found[-1])
    except ValueError:  # pragma: no cover - the pattern only matches float syntax
        return math.inf


def numbers_match(pred: float, label: Any, tol: float = NUMBER_TOLERANCE) -> bool:
    """LLM-Adapters' rule: |pred - float(label)| <= 0.001."""
    return abs(float(label) - pred) <= tol


def extract_letter_llm_adapters(text: str) -> str:
    """LLM-Adapters' letter rule: the first capital A-E anywhere in the text, "" if none."""
    m = _FIRST_LETTER.search(text.strip())
    return m.group(0) if m else ""


def extract_letter(text: str) -> str:
    """The option letter after the last "answer is" (optional "(" / ":" / "option"): a capital
    A-E, or a lowercase a-e only where it stands alone ("the answer is b", "answer is (c)", "the
    answer is a.", never the "a" of "the answer is a little..."); LLM-Adapters' first-capital
    rule when the text never says it."""
    found = [next(g for g in groups if g) for groups in _ANSWER_IS_LETTER.findall(text)]
    if found:
        return found[-1].upper()
    return extract_letter_llm_adapters(text)


def extract_option(text: str, options: tuple[str, ...]) -> str:
    """The first of `options` that occurs in the text (LLM-Adapters' alternation), "" if none."""
    pattern = re.compile("|".join(re.escape(o) for o in options))
    m = pattern.search(text.strip())
    return m.group(0) if m else ""


def score(dataset: str, generation: str, label: Any) -> dict[str, Any]:
    """Extract the answer from one generation and judge it.

    Returns:
        {"prediction", "correct"} and, for the letter datasets, "prediction_llm_adapters" and
        "correct_llm_adapters" (LLM-Adapters' first-capital rule, for comparison).
    """
    name = canonical_dataset(dataset)
    kind = dataset_kind(name)
    if kind == "arithmetic":
        pred = extract_number(generation)
        return {
            "prediction": pred if math.isfinite(pred) else None,
            "correct": numbers_match(pred, label),
        }
    if kind == "letter":
        pred = extract_letter(generation)
        ref = extract_letter_llm_adapters(generation)
        return {
            "prediction": pred,
            "correct": pred == str(label),
            "prediction_llm_adapters": ref,
            "correct_llm_adapters": ref == str(label),
        }
    pred = extract_option(generation, COMMONSENSE[name])
    return {"prediction": pred, "correct": pred == str(label)}
