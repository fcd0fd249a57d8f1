"""Data loading, prompt template and tokenisation rules of the LLM-Adapters workflow."""

import json

import pytest
from helpers_tiny import build_tokenizer

from llm_adapters import data
from llm_adapters.data import IGNORE_INDEX, DataError

RECORDS = [
    {
        "instruction": "Please answer the following question with true or false, question: "
        f"is {w} a colour?\n\nAnswer format: true/false",
        "input": "",
        "output": f"the correct answer is {a}",
        "answer": a,
    }
    for w, a in [("red", "true"), ("seven", "false"), ("blue", "true"), ("dog", "false")] * 5
]
WITH_INPUT = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "answer": "5"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([data.generate_prompt(r) for r in RECORDS + [WITH_INPUT]], 300)


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


# ---- loading ---------------------------------------------------------------------------------


def test_load_file_and_directory(tmp_path):
    f = _write(tmp_path / "train.json", RECORDS)
    assert data.load_records(f) == RECORDS
    _write(tmp_path / "test.json", RECORDS[:3])
    assert len(data.load_records(str(tmp_path))) == 3  # a directory means <dir>/test.json
    assert len(data.load_records(str(tmp_path), split="train")) == len(RECORDS)
    # absent/null input becomes "", a numeric answer a string
    rec = data.load_records(
        _write(tmp_path / "x.json", [{"instruction": "i", "output": "o", "answer": 4}])
    )
    assert rec == [{"instruction": "i", "output": "o", "answer": "4", "input": ""}]


def test_load_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n")
    assert data.load_records(str(p)) == RECORDS[:2]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("[{", "not valid JSON"),
        ('{"instruction": "x"}', "must hold a JSON list"),
        ("[]", "holds no records"),
        ('["text"]', "record 0 is a str"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', "record 1 has no 'output'"),
        ('[{"instruction": null, "output": "b"}]', "record 0 has no 'instruction'"),
        ('[{"instruction": 3, "output": "b"}]', "field 'instruction' must be a string"),
        ('[{"instruction": "a", "output": "b", "answer": [1]}]', "'answer' must be a string"),
    ],
)
def test_bad_files(tmp_path, content, message):
    p = tmp_path / "d.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(DataError, match=message):
        data.load_records(str(p))


def test_bad_directory_and_required(tmp_path):
    with pytest.raises(DataError, match="without test.json"):
        data.load_records(str(tmp_path))
    f = _write(tmp_path / "d.json", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="record 0 has no 'answer'"):
        data.load_records(f, required=("instruction", "answer"))


# ---- prompt ----------------------------------------------------------------------------------


def test_prompt_is_llm_adapters_template():
    indent = " " * 16
    no_input = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        f"completes the request.  \n\n{indent}### Instruction:\n{indent}Say hi.\n{indent}\n"
        f"{indent}### Response:\n{indent}hi"
    )
    rec = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert data.generate_prompt(rec) == no_input
    assert data.generate_prompt(rec, with_output=False) == no_input[: -len("hi")]
    with_input = (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request. \n\n"
        f"{indent}### Instruction:\n{indent}Add the numbers.\n{indent}\n{indent}### Input:\n"
        f"{indent}2 and 3\n{indent}\n{indent}### Response:\n{indent}5"
    )
    assert data.generate_prompt(WITH_INPUT) == with_input
    alpaca = data.generate_prompt(WITH_INPUT, style="alpaca")
    assert alpaca.endswith("### Input:\n2 and 3\n\n### Response:\n5")
    with pytest.raises(ValueError, match="prompt style must be one of"):
        data.generate_prompt(rec, style="chat")


# ---- tokenisation ----------------------------------------------------------------------------


def test_eos_appended_unless_truncated(tokenizer):
    rec = RECORDS[0]
    full = tokenizer(data.generate_prompt(rec))["input_ids"]
    n = len(full)
    ex = data.tokenize_record(tokenizer, rec, cutoff_len=n + 5)
    assert ex["input_ids"] == full + [tokenizer.eos_token_id]
    assert ex["labels"] == ex["input_ids"] and ex["attention_mask"] == [1] * (n + 1)
    # exactly one token of room: the EOS fits
    assert data.tokenize_record(tokenizer, rec, cutoff_len=n + 1)["input_ids"][-1] == 2
    # no room (LLM-Adapters: only when shorter than the cutoff) and truncated: no EOS
    assert data.tokenize_record(tokenizer, rec, cutoff_len=n)["input_ids"] == full
    cut = data.tokenize_record(tokenizer, rec, cutoff_len=10)
    assert cut["input_ids"] == full[:10] and tokenizer.eos_token_id not in cut["input_ids"]


@pytest.mark.parametrize("style", ["llm-adapters", "alpaca"])
@pytest.mark.parametrize("rec", [RECORDS[1], WITH_INPUT])
def test_train_on_inputs_false_masks_exactly_the_prompt(tokenizer, rec, style):
    ex = data.tokenize_record(tokenizer, rec, cutoff_len=256, train_on_inputs=False, style=style)
    ids, labels = ex["input_ids"], ex["labels"]
    n_masked = sum(1 for v in labels if v == IGNORE_INDEX)
    assert labels[:n_masked] == [IGNORE_INDEX] * n_masked  # a prefix
    assert labels[n_masked:] == ids[n_masked:]  # the rest is learned, EOS included
    assert labels[-1] == tokenizer.eos_token_id
    prompt = data.generate_prompt(rec, style, with_output=False)
    # the masked tokens spell a prefix of the prompt; one more token would reach the output
    masked_text = tokenizer.decode(ids[:n_masked], skip_special_tokens=True)
    assert prompt.startswith(masked_text)
    assert not prompt.startswith(tokenizer.decode(ids[: n_masked + 1], skip_special_tokens=True))
    # what is learned is the output (and what the boundary token carries of the prompt)
    learned = tokenizer.decode(ids[n_masked:], skip_special_tokens=True)
    assert learned.endswith(rec["output"]) and len(learned) <= len(rec["output"]) + 16
    # train_on_inputs=True learns everything
    full = data.tokenize_record(tokenizer, rec, cutoff_len=256, train_on_inputs=True, style=style)
    assert full["input_ids"] == ids and full["labels"] == ids


def test_mask_matches_llm_adapters_when_boundary_is_clean(tokenizer):
    # with the plain Alpaca prompt the output starts a new pre-token, so LLM-Adapters' rule
    # (length of the prompt tokenised alone) and the offset rule agree
    rec = RECORDS[2]
    ex = data.tokenize_record(tokenizer, rec, train_on_inputs=False, style="alpaca")
    prompt_ids = tokenizer(data.generate_prompt(rec, "alpaca", with_output=False))["input_ids"]
    assert ex["labels"].count(IGNORE_INDEX) == len(prompt_ids)
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids


def test_prompt_longer_than_cutoff_is_dropped(tokenizer):
    ds, dropped = data.tokenize_records(tokenizer, RECORDS[:4], cutoff_len=8, train_on_inputs=False)
    assert len(ds) == 0 and dropped == 4
    ds, dropped = data.tokenize_records(tokenizer, RECORDS[:4], cutoff_len=8, train_on_inputs=True)
    assert len(ds) == 4 and dropped == 0 and len(ds[0]["input_ids"]) == 8


def test_tokenize_rejects_bad_cutoff_and_missing_eos(tokenizer):
    with pytest.raises(ValueError, match="cutoff_len"):
        data.tokenize_record(tokenizer, RECORDS[0], cutoff_len=1)


# ---- validation split ------------------------------------------------------------------------


def test_split_is_seeded_and_disjoint():
    recs = [{"instruction": str(i), "output": ""} for i in range(50)]
    train, val = data.split_train_val(recs, 7)
    assert len(train) == 43 and len(val) == 7
    assert sorted(r["instruction"] for r in train + val) == sorted(r["instruction"] for r in recs)
    assert data.split_train_val(recs, 7) == (train, val)  # fixed seed
    assert data.split_train_val(recs, 7, seed=1) != (train, val)
    train0, val0 = data.split_train_val(recs, 0)
    assert val0 == [] and len(train0) == 50
    with pytest.raises(ValueError, match="leaves no training data"):
        data.split_train_val(recs, 50)
