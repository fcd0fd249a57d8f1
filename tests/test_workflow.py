"""`llm-adapters finetune` / `evaluate` end to end on a tiny random LLaMA, offline.

The model (2 layers, width 24) and its byte-level BPE tokenizer are built in a temporary
directory from a slice of LLM-Adapters' boolq data; nothing touches the network (sockets other
than Unix ones are refused while these tests run).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_tiny import DATASET_DIR, build_model, read_json, save_tiny

from llm_adapters import cli
from llm_adapters.train import parse_modules

BOOLQ = DATASET_DIR / "boolq"
pytestmark = pytest.mark.skipif(not (BOOLQ / "train.json").is_file(), reason="boolq data absent")

ADAPTERS = {
    "lora": "--adapter_name lora --lora_r 4 --lora_target_modules".split()
    + ['["q_proj","v_proj"]'],
    "series": "--adapter_name bottleneck --bottleneck_size 8".split(),
    "parallel": (
        "--adapter_name bottleneck --bottleneck_size 8 --use_parallel_adapter --group_by_length "
        "--target_modules q_proj,k_proj,v_proj"
    ).split(),
    "prefix": (
        "--adapter_name prefix-tuning --num_virtual_tokens 4 --use_gradient_checkpointing"
    ).split(),
    "prompt": "--adapter_name prompt-tuning --num_virtual_tokens 4".split(),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: HF offline mode, and any non-Unix socket connection fails loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family != socket.AF_UNIX:
            raise OSError(f"network access attempted during an offline test: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, train file, test dir): 48 boolq training records, 16 test records."""
    root = tmp_path_factory.mktemp("tiny")
    train = read_json(BOOLQ / "train.json")[:48]
    test = read_json(BOOLQ / "test.json")[:16]
    save_tiny(root / "model", train + test)
    (root / "train.json").write_text(json.dumps(train))
    (root / "data" / "boolq").mkdir(parents=True)
    (root / "data" / "boolq" / "test.json").write_text(json.dumps(test))
    return root


def finetune(tiny, out, *extra, steps=3):
    argv = [
        "finetune",
        "--base_model",
        str(tiny / "model"),
        "--data_path",
        str(tiny / "train.json"),
        "--output_dir",
        str(out),
        "--batch_size",
        "4",
        "--micro_batch_size",
        "2",
        "--max_steps",
        str(steps),
        "--val_set_size",
        "8",
        "--eval_step",
        "2",
        "--save_step",
        "2",
        "--cutoff_len",
        "96",
        "--logging_steps",
        "1",
        "--warmup_steps",
        "0",
        "--learning_rate",
        "1e-2",
        *extra,
    ]
    return cli.main(argv)


def evaluate(tiny, out, *extra):
    argv = [
        "evaluate",
        "--base_model",
        str(tiny / "model"),
        "--dataset",
        "boolq",
        "--data_dir",
        str(tiny / "data"),
        "--output_dir",
        str(out),
        "--num_beams",
        "1",
        "--max_new_tokens",
        "6",
        *extra,
    ]
    return cli.main(argv)


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_finetune_then_evaluate(tiny, tmp_path, kind):
    out = tmp_path / "adapter"
    assert finetune(tiny, out, *ADAPTERS[kind], "--train_on_inputs", "False") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (out / "adapter_model.safetensors").is_file()
    assert config.get("adapter_type", config.get("peft_type", "").lower()) in (
        "lora",
        "bottleneck",
        "prefix_tuning",
        "prompt_tuning",
    )
    if kind == "parallel":
        assert config["use_parallel_adapter"] and config["target_modules"] == [
            "q_proj",
            "k_proj",
            "v_proj",
        ]
    log = json.loads((out / "train_log.json").read_text())
    assert log["global_steps"] == 3 and log["tokens_trained"] > 0 and log["tokens_per_second"] > 0
    assert log["gradient_accumulation_steps"] == 2
    assert any("eval_loss" in h for h in log["log_history"])
    assert all(math_finite(h["loss"]) for h in log["log_history"] if "loss" in h)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]

    res = tmp_path / "results"
    beams = "2" if kind in ("lora", "prompt") else "1"
    assert (
        evaluate(tiny, res, "--adapter_path", str(out), "--batch_size", "16", "--num_beams", beams)
        == 0
    )
    rows = json.loads((res / "adapter-boolq.json").read_text())
    # left padding with the attention mask: a prompt padded in a batch of 16 generates what it
    # generates alone
    one = tmp_path / "one"
    assert (
        evaluate(
            tiny,
            one,
            "--adapter_path",
            str(out),
            "--batch_size",
            "1",
            "--limit",
            "4",
            "--num_beams",
            beams,
        )
        == 0
    )
    alone = json.loads((one / "adapter-boolq.json").read_text())
    assert [r["generation"] for r in alone] == [r["generation"] for r in rows[:4]]
    summary = json.loads((res / "adapter-boolq.summary.json").read_text())
    assert len(rows) == 16 and summary["examples"] == 16
    assert summary["accuracy"] == sum(r["correct"] for r in rows) / 16
    assert summary["adapter_path"] == str(out)
    for r in rows:
        assert r["prompt"].endswith("### Response:\n" + " " * 16)
        assert r["prediction"] in ("", "true", "false") and r["label"] in ("true", "false")
    assert not list(res.glob(".tmp-*"))


def test_prefix_tuning_beam_search(tiny, tmp_path):
    out = tmp_path / "prefix"
    assert finetune(tiny, out, *ADAPTERS["prefix"], "--val_set_size", "0", steps=1) == 0
    assert (
        evaluate(
            tiny, tmp_path / "res", "--adapter_path", str(out), "--limit", "2", "--num_beams", "2"
        )
        == 0
    )


def math_finite(x):
    return x == x and abs(x) != float("inf")


def test_bare_model_several_datasets_and_table(tiny, tmp_path, capsys):
    """No adapter; one dataset of each scoring kind in one run, then `--table`."""
    res, data = tmp_path / "res", tmp_path / "data"
    names = []
    for name in ("boolq", "ARC-Easy", "AQuA", "gsm8k"):
        src = DATASET_DIR / name / "test.json"
        if src.is_file():
            (data / name).mkdir(parents=True)
            (data / name / "test.json").write_text(json.dumps(read_json(src)[:3]))
            names.append(name)
    assert (
        evaluate(tiny, res, "--data_dir", str(data), "--batch_size", "2", "--dataset", *names) == 0
    )
    for name in names:
        summary = json.loads((res / f"base-{name}.summary.json").read_text())
        assert summary["examples"] == 3 and summary["adapter_path"] is None
        assert summary["run_name"] == "base"
        rows = json.loads((res / f"base-{name}.json").read_text())
        assert summary["correct"] == sum(r["correct"] for r in rows)
        if name == "AQuA":
            assert "accuracy_llm_adapters" in summary
            assert all("prediction_llm_adapters" in r for r in rows)
        if name == "gsm8k":
            assert all(r["prediction"] is None or isinstance(r["prediction"], float) for r in rows)
    out = capsys.readouterr().out
    if len(names) > 1:
        assert "mean" in out  # the run prints its table
    assert cli.main(["evaluate", "--table", str(res)]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in names) and "accuracy %" in table
    # LLM-Adapters' labels name the files as LLM-Adapters does: <model>-<adapter>-<dataset>.json
    assert evaluate(tiny, res, "--limit", "1", "--model", "LLaMA-7B", "--adapter", "LoRA") == 0
    assert (res / "LLaMA-7B-LoRA-boolq.json").is_file()


def _their_eval_prompt(instruction, input=None):
    # generate_prompt of LLM-Adapters' evaluate.py, copied as it is (commonsense_evaluate.py has
    # the same function); their scripts call it with the instruction only
    if input:
        return f"""Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

                ### Instruction:
                {instruction}

                ### Input:
                {input}

                ### Response:
                """  # noqa: E501
    else:
        return f"""Below is an instruction that describes a task. Write a response that appropriately completes the request. 

                ### Instruction:
                {instruction}

                ### Response:
                """  # noqa: E501, W291


GSM8K_0 = (
    "Mr Boarden is remodeling his bathroom. For every square foot, he needs 24 mosaic tiles. How "
    "many mosaic tiles would Mr Boarden need to cover two thirds of his 36 sq ft bathroom?"
)


def test_llm_adapters_eval_prompt_is_theirs_byte_for_byte(tiny, tmp_path):
    from llm_adapters.data import generate_prompt

    boolq = read_json(tiny / "data" / "boolq" / "test.json")[0]
    for rec in ({"instruction": GSM8K_0, "input": ""}, boolq):  # arithmetic, commonsense
        ours = generate_prompt(rec, "llm-adapters-eval", with_output=False)
        assert ours.encode() == _their_eval_prompt(rec["instruction"]).encode()
        # the training template differs in whitespace only
        train = generate_prompt(rec, "llm-adapters", with_output=False)
        assert train != ours and train.split() == ours.split()
    with_input = {"instruction": "Add them.", "input": "2 and 3"}
    ours = generate_prompt(with_input, "llm-adapters-eval", with_output=False)
    assert ours.encode() == _their_eval_prompt("Add them.", "2 and 3").encode()
    # through the command: the prompt each example was given is recorded with its result
    res = tmp_path / "res"
    assert evaluate(tiny, res, "--limit", "2", "--prompt-style", "llm-adapters-eval") == 0
    rows = json.loads((res / "base-boolq.json").read_text())
    summary = json.loads((res / "base-boolq.summary.json").read_text())
    assert summary["prompt_style"] == "llm-adapters-eval"
    assert [r["prompt"] for r in rows] == [_their_eval_prompt(r["instruction"]) for r in rows]


def test_resume_from_trainer_checkpoint_and_from_adapter(tiny, tmp_path):
    out = tmp_path / "run"
    assert finetune(tiny, out, *ADAPTERS["series"], steps=2) == 0
    first = json.loads((out / "train_log.json").read_text())["log_history"]
    assert (
        finetune(
            tiny,
            out,
            *ADAPTERS["series"],
            "--resume_from_checkpoint",
            str(out / "checkpoint-2"),
            steps=4,
        )
        == 0
    )
    log = json.loads((out / "train_log.json").read_text())
    assert log["global_steps"] == 4
    losses = [(h["step"], h["loss"]) for h in log["log_history"] if "loss" in h]
    # resumed at step 3 with the history of steps 1-2 restored, not restarted
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert losses[:2] == [(h["step"], h["loss"]) for h in first if "loss" in h]
    again = tmp_path / "again"
    assert (
        finetune(tiny, again, *ADAPTERS["lora"], "--resume_from_checkpoint", str(out), steps=2) == 0
    )
    # the adapter's own config (series bottleneck) wins over the LoRA flags
    assert json.loads((again / "adapter_config.json").read_text())["adapter_type"] == "bottleneck"


# ---- bad input: a clear error and nothing written ---------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        ({"--data_path": "missing.json"}, "does not exist"),
        ({"--data_path": "bad_records.json"}, "record 1 has no 'output'"),
        ({"--val_set_size": "48"}, "leaves no training data"),
        ({"--batch_size": "1"}, "smaller than micro_batch_size"),
        ({"--base_model": "nowhere"}, "not a local model directory"),
        ({"--lora_target_modules": "wq,wv"}, "not found"),
        ({"--save_step": "3"}, "multiple of --eval-step"),
        ({"--lora_dropout": "1.5"}, "lora_dropout"),
        ({"--load_8bit": "True", "--load_4bit": "True"}, "exclude each other"),
    ],
)
def test_finetune_bad_input(tiny, tmp_path, capsys, change, message):
    (tmp_path / "bad_records.json").write_text(
        json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "input": ""}])
    )
    out = tmp_path / "out"
    argv = [
        "finetune",
        "--base_model",
        str(tiny / "model"),
        "--data_path",
        str(tiny / "train.json"),
        "--output_dir",
        str(out),
        "--batch_size",
        "4",
        "--micro_batch_size",
        "2",
        "--max_steps",
        "1",
        "--val_set_size",
        "8",
        "--eval_step",
        "2",
        "--save_step",
        "2",
    ]
    for flag, value in change.items():
        if flag == "--data_path" or flag == "--base_model":
            value = str(tmp_path / value)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (out / "adapter_model.safetensors").exists()


def test_evaluate_bad_input(tiny, tmp_path, capsys):
    res = tmp_path / "res"
    assert evaluate(tiny, res, "--dataset", "nope") == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert evaluate(tiny, res, "--dataset", "gsm8k") == 2
    assert "gsm8k/test.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "1+1?", "answer": "two"}]))
    assert evaluate(tiny, res, "--dataset", "gsm8k", "--data_path", str(bad)) == 2
    assert "answer 'two' is not a number" in capsys.readouterr().err
    assert evaluate(tiny, res, "--adapter_path", str(tmp_path)) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert evaluate(tiny, res, "--load_8bit", "--bnb_4bit_quant_type", "fp4") == 2
    assert "--bnb-4bit-quant-type goes with --load-4bit" in capsys.readouterr().err
    assert not res.exists() or not list(res.glob("*.json"))


def test_adapter_that_does_not_fit_fails_before_generation(tiny, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert finetune(tiny, out, *ADAPTERS["lora"], steps=1) == 0
    other = tmp_path / "wider"
    vocab = json.loads((tiny / "model" / "config.json").read_text())["vocab_size"]
    model = build_model(vocab_size=vocab, hidden=32)
    model.save_pretrained(other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).write_bytes((tiny / "model" / f).read_bytes())
    res = tmp_path / "res"
    argv = [
        "evaluate",
        "--base_model",
        str(other),
        "--adapter_path",
        str(out),
        "--dataset",
        "boolq",
        "--data_dir",
        str(tiny / "data"),
        "--output_dir",
        str(res),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "shape" in err
    assert not list(res.glob("*.json"))


def test_parse_modules():
    want = ["q_proj", "v_proj"]
    for given in (
        '["q_proj","v_proj"]',
        "['q_proj', 'v_proj']",
        "[q_proj,v_proj]",
        "q_proj,v_proj",
        "q_proj, v_proj",
        ["q_proj", "v_proj"],
        ["[q_proj,", "v_proj]"],
    ):
        assert parse_modules(given) == want, given
    assert parse_modules(None) is None and parse_modules("") is None


@pytest.mark.slow
def test_torchrun_two_processes(tiny, tmp_path):
    """DDP on CPU (gloo): two processes run finetune to the end with no code change."""
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "LLM_ADAPTERS_BACKEND": "torch",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "llm_adapters.cli",
        "finetune",
        "--base_model",
        str(tiny / "model"),
        "--data_path",
        str(tiny / "train.json"),
        "--output_dir",
        str(out),
        "--batch_size",
        "8",
        "--micro_batch_size",
        "2",
        "--max_steps",
        "2",
        "--val_set_size",
        "8",
        "--eval_step",
        "2",
        "--save_step",
        "2",
        "--cutoff_len",
        "64",
        "--lora_r",
        "4",
    ]
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["world_size"] == 2 and log["gradient_accumulation_steps"] == 2
    assert log["global_steps"] == 2 and log["tokens_trained"] > 0
    assert (out / "adapter_model.safetensors").is_file()
    assert "tokens/s (2 process(es))" in proc.stdout


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
