"""LLM-Adapters data: JSON records, the Alpaca prompt, tokenisation for causal-LM fine-tuning.

A record is a dict {"instruction", "input", "output", "answer"} as in LLM-Adapters'
`ft-training_set/*.json` and `dataset/<name>/{train,test}.json`. Training needs `instruction`
and `output`; evaluation needs `instruction` and `answer`; `input` may be absent or empty.
Everything is checked when the file is read, so a bad file stops a run before a model loads.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100  # label value the causal-LM loss skips

# The response marker every template ends its prompt with; generations are read after it.
RESPONSE_MARKER = "### Response:"

# LLM-Adapters' finetune.py template, byte for byte (its 16-space indentation and trailing
# spaces included), so adapters trained with LLM-Adapters see the prompt they were trained on.
# LLM-Adapters evaluates with a slightly different whitespace variant of it (below, style
# "llm-adapters-eval"); we prompt with the training one in both places by default.
_LLM_ADAPTERS_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "                \n"
    "                ### Input:\n"
    "                {input}\n"
    "                \n"
    "                ### Response:\n"
    "                {output}"
)
_LLM_ADAPTERS_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.  \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "                \n"
    "                ### Response:\n"
    "                {output}"
)
# LLM-Adapters' evaluation template, byte for byte: `generate_prompt` of its evaluate.py and
# commonsense_evaluate.py (the same in both). It differs from the training one in whitespace
# only: after "request." no trailing space (with input) or one (training: one and two), and
# empty lines where training has 16 spaces. Those scripts never pass a record's input, so
# they always prompt with the no-input form (no LLM-Adapters test set has an input).
_LLM_ADAPTERS_EVAL_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "\n"
    "                ### Input:\n"
    "                {input}\n"
    "\n"
    "                ### Response:\n"
    "                {output}"
)
_LLM_ADAPTERS_EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "\n"
    "                ### Response:\n"
    "                {output}"
)
# The original Stanford Alpaca template, without the indentation.
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
PROMPT_STYLES = {
    "llm-adapters": (_LLM_ADAPTERS_WITH_INPUT, _LLM_ADAPTERS_NO_INPUT),
    "llm-adapters-eval": (_LLM_ADAPTERS_EVAL_WITH_INPUT, _LLM_ADAPTERS_EVAL_NO_INPUT),
    "alpaca": (_ALPACA_WITH_INPUT, _ALPACA_NO_INPUT),
}


class DataError(ValueError):
    """A data file that cannot be used: missing, not JSON, or records without needed fields."""


def resolve_data_file(path: str, split: str = "test") -> str:
    """A data file path: `path` itself, or `path/<split>.json` when `path` is a directory."""
    if os.path.isdir(path):
        candidate = os.path.join(path, f"{split}.json")
        if not os.path.isfile(candidate):
            raise DataError(f"{path!r} is a directory without {split}.json")
        return candidate
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    return path


def _read_json_or_jsonl(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if path.endswith(".jsonl"):
            records = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as line_exc:
                    raise DataError(f"{path}:{lineno} is not valid JSON: {line_exc}") from None
            return records
        raise DataError(f"{path} is not valid JSON: {exc}") from None


def load_records(
    path: str, split: str = "test", required: Sequence[str] = ("instruction", "output")
) -> list[dict[str, Any]]:
    """Read and check LLM-Adapters records.

    Args:
        path: a .json file holding a list of records (or a .jsonl file, one record a line), or
            a directory holding `<split>.json`.
        required: fields every record must have. `instruction`, `input`, `output` must be
            strings when present; `answer` a string or a number (stored as a string).

    Returns:
        the records, each with `input` filled in as "" when it was absent or null.
    """
    file = resolve_data_file(path, split)
    data = _read_json_or_jsonl(file)
    if not isinstance(data, list):
        raise DataError(f"{file} must hold a JSON list of records, got {type(data).__name__}")
    if not data:
        raise DataError(f"{file} holds no records")
    records = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{file}: record {i} is a {type(rec).__name__}, not an object")
        missing = [k for k in required if k not in rec or rec[k] is None]
        if missing:
            raise DataError(f"{file}: record {i} has no {', '.join(repr(k) for k in missing)}")
        rec = dict(rec)
        if rec.get("input") is None:
            rec["input"] = ""
        for key in ("instruction", "input", "output"):
            if key in rec and rec[key] is not None and not isinstance(rec[key], str):
                raise DataError(
                    f"{file}: record {i} field {key!r} must be a string, "
                    f"got {type(rec[key]).__name__}"
                )
        if "answer" in rec and rec["answer"] is not None:
            if isinstance(rec["answer"], bool) or not isinstance(rec["answer"], (str, int, float)):
                raise DataError(f"{file}: record {i} field 'answer' must be a string or a number")
            rec["answer"] = str(rec["answer"])
        records.append(rec)
    return records


def generate_prompt(
    record: dict[str, Any], style: str = "llm-adapters", with_output: bool = True
) -> str:
    """The Alpaca-style prompt for one record; with `with_output=False`, the prompt the model
    is given at evaluation (ending right after the response marker and its indentation)."""
    try:
        with_input, no_input = PROMPT_STYLES[style]
    except KeyError:
        raise ValueError(
            f"prompt style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}"
        ) from None
    output = (record.get("output") or "") if with_output else ""
    template = with_input if record.get("input") else no_input
    return template.format(
        instruction=record["instruction"], input=record.get("input"), output=output
    )


def tokenize_record(
    tokenizer,
    record: dict[str, Any],
    cutoff_len: int = 256,
    train_on_inputs: bool = True,
    style: str = "llm-adapters",
) -> dict[str, list[int]]:
    """Tokenise one training record (LLM-Adapters' rules).

    The full prompt (with the output) is truncated to `cutoff_len` tokens; EOS is appended when
    the sequence is shorter than `cutoff_len` and does not already end with it (so a truncated
    sequence gets none: the answer was cut, the model must not learn to stop there).
    `train_on_inputs=False` sets the labels of the prompt tokens to -100: the tokens that lie
    wholly inside the prompt text, found from the tokenizer's character offsets (fast
    tokenizers), so a token merging the prompt's last characters with the output's first is
    still learned. Slow tokenizers fall back to LLM-Adapters' rule (the length of the prompt
    tokenised alone).

    Returns:
        {"input_ids": [T], "attention_mask": [T], "labels": [T]} with T <= cutoff_len.
    """
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be at least 2, got {cutoff_len}")
    full = generate_prompt(record, style)
    want_offsets = not train_on_inputs and getattr(tokenizer, "is_fast", False)
    enc = tokenizer(
        full,
        truncation=True,
        max_length=cutoff_len,
        padding=False,
        return_offsets_mapping=want_offsets,
    )
    input_ids = list(enc["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: set one before fine-tuning")
    if len(input_ids) < cutoff_len and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
    labels = list(input_ids)
    if not train_on_inputs:
        prompt = generate_prompt(record, style, with_output=False)
        if want_offsets:
            # a token is prompt when it ends inside the prompt text; special tokens (BOS) have
            # the empty span (0, 0) and count as prompt too
            n_prompt = sum(1 for start, end in enc["offset_mapping"] if end <= len(prompt))
        else:
            n_prompt = len(tokenizer(prompt, truncation=True, max_length=cutoff_len)["input_ids"])
        n_prompt = min(n_prompt, len(labels))
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def split_train_val(
    records: Sequence[dict[str, Any]], val_set_size: int, seed: int = 42
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle with a fixed seed and hold out `val_set_size` records for validation."""
    if val_set_size < 0:
        raise ValueError(f"val_set_size must be >= 0, got {val_set_size}")
    if val_set_size >= len(records):
        raise ValueError(
            f"val_set_size={val_set_size} leaves no training data: the file has "
            f"{len(records)} records (LLM-Adapters' default is 2000; pass a smaller value or 0)"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val = [records[i] for i in order[:val_set_size]]
    train = [records[i] for i in order[val_set_size:]]
    return train, val


class TokenizedDataset:
    """A list of tokenised examples the HF Trainer can index (and group by length)."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def tokenize_records(
    tokenizer,
    records: Sequence[dict[str, Any]],
    cutoff_len: int = 256,
    train_on_inputs: bool = True,
    style: str = "llm-adapters",
) -> tuple[TokenizedDataset, int]:
    """Tokenise records; returns the dataset and how many were dropped because every label was
    masked (a prompt that fills the whole cutoff leaves nothing to learn and a NaN loss)."""
    examples, dropped = [], 0
    for rec in records:
        ex = tokenize_record(tokenizer, rec, cutoff_len, train_on_inputs, style)
        if all(v == IGNORE_INDEX for v in ex["labels"]):
            dropped += 1
            continue
        examples.append(ex)
    return TokenizedDataset(examples), dropped
