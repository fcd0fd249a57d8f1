"""`llm-adapters finetune / evaluate --load_4bit / --load_8bit` on a tiny local LLaMA, offline.

The model is loaded through transformers' BitsAndBytesConfig (bitsandbytes' CPU kernels),
prepared with prepare_model_for_kbit_training, then given its adapter. Its widths are
multiples of 64: bitsandbytes' CPU inference path for 4-bit weights (taken under no_grad in
eval mode) needs out_features % 32 == 0 and in_features % 64 == 0.
"""

import json
import sys

import pytest
import torch
from helpers_tiny import DATASET_DIR, build_tokenizer, read_json, texts_from
from safetensors.torch import load_file

from llm_adapters import cli
from llm_adapters.models.kbit import quantized_layers
from llm_adapters.train import quantization_config

pytest.importorskip("bitsandbytes")
BOOLQ = DATASET_DIR / "boolq"
pytestmark = [
    pytest.mark.skipif(not (BOOLQ / "train.json").is_file(), reason="boolq data absent"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # bitsandbytes' fp16 cast notices
]

ADAPTERS = {
    "lora": "--adapter_name lora --lora_r 4 --lora_target_modules q_proj,v_proj".split(),
    "series": "--adapter_name bottleneck --bottleneck_size 8".split(),
    "parallel": (
        "--adapter_name bottleneck --bottleneck_size 8 --use_parallel_adapter "
        "--target_modules q_proj,v_proj"
    ).split(),
}
QUANT = {"4bit": ["--load_4bit"], "8bit": ["--load_8bit", "True"]}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root): model/ (a 2-layer LLaMA, hidden 64) with its tokenizer, train.json (24 boolq
    records), data/boolq/test.json (4 records)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("qtiny")
    train = read_json(BOOLQ / "train.json")[:24]
    test = read_json(BOOLQ / "test.json")[:4]
    tokenizer = build_tokenizer(texts_from(train + test), 400)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "train.json").write_text(json.dumps(train))
    (root / "data" / "boolq").mkdir(parents=True)
    (root / "data" / "boolq" / "test.json").write_text(json.dumps(test))
    return root


def finetune(tiny, out, *extra):
    return cli.main([
        "finetune", "--base_model", str(tiny / "model"), "--data_path", str(tiny / "train.json"),
        "--output_dir", str(out), "--batch_size", "2", "--micro_batch_size", "2",
        "--max_steps", "2", "--val_set_size", "0", "--save_step", "2", "--cutoff_len", "64",
        "--logging_steps", "1", "--warmup_steps", "0", "--learning_rate", "1e-2", *extra,
    ])


def evaluate(tiny, out, *extra):
    return cli.main([
        "evaluate", "--base_model", str(tiny / "model"), "--dataset", "boolq",
        "--data_dir", str(tiny / "data"), "--output_dir", str(out), "--num_beams", "1",
        "--max_new_tokens", "4", *extra,
    ])


def load_quantized(tiny, quant):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=True) if quant == "4bit"
           else BitsAndBytesConfig(load_in_8bit=True))
    return AutoModelForCausalLM.from_pretrained(str(tiny / "model"), quantization_config=cfg)


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_finetune_on_a_quantized_base_saves_an_adapter_that_loads(tiny, tmp_path, kind, quant):
    import llm_adapters as la

    out = tmp_path / "adapter"
    assert finetune(tiny, out, *ADAPTERS[kind], *QUANT[quant]) == 0
    log = json.loads((out / "train_log.json").read_text())
    losses = [h["loss"] for h in log["log_history"] if "loss" in h]
    assert log["global_steps"] == 2 and len(losses) == 2
    assert all(torch.isfinite(torch.tensor(losses)))
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all(torch.isfinite(t).all() for t in saved.values())

    base = load_quantized(tiny, quant)
    ids = torch.tensor([[1, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        bare = base(input_ids=ids).logits
    model = la.load_adapter(base, str(out)).eval()
    assert quantized_layers(model.get_base_model())  # still quantized
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k or "adapter" in k}
    assert len(state) == len(saved)
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
    assert torch.isfinite(tuned).all() and not torch.equal(tuned, bare)  # trained, and loaded


def test_evaluate_on_a_4bit_base(tiny, tmp_path):
    out = tmp_path / "adapter"
    # with a validation set evaluated every step: the gradient still flows after each
    # evaluation (bitsandbytes' CPU inference repacking kept off, see models.kbit)
    assert finetune(tiny, out, *ADAPTERS["lora"], "--load_4bit", "--bnb_4bit_quant_type", "fp4",
                    "--double_quant", "False", "--val_set_size", "4", "--eval_step", "1") == 0
    log = json.loads((out / "train_log.json").read_text())["log_history"]
    assert sum("eval_loss" in h for h in log) == 2
    norms = [h["grad_norm"] for h in log if "grad_norm" in h]
    assert len(norms) == 2 and all(n > 0 for n in norms)
    res = tmp_path / "res"
    assert evaluate(tiny, res, "--adapter_path", str(out), "--load_4bit", "--batch_size", "4") == 0
    summary = json.loads((res / "adapter-boolq.summary.json").read_text())
    assert summary["examples"] == 4 and summary["quantization"] == "4bit-nf4"
    rows = json.loads((res / "adapter-boolq.json").read_text())
    assert len(rows) == 4 and all("generation" in r for r in rows)


def _parsed(command, *flags):
    argv = cli._normalise_flags([command, "--base_model", "m", *flags])
    return cli.build_parser(only=command).parse_args(argv)


def test_4bit_flags_reach_the_bitsandbytes_config():
    args = _parsed("finetune", "--load_4bit", "True", "--bnb_4bit_quant_type", "fp4",
                   "--bnb_4bit_compute_dtype", "bf16", "--double_quant", "False",
                   "--data_path", "d")
    cfg = quantization_config(args, torch.float32)
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "fp4" and cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert not cfg.bnb_4bit_use_double_quant
    # defaults: QLoRA's NF4 with double quantization, the matmul in the model's dtype
    cfg = quantization_config(_parsed("evaluate", "--load_4bit"), torch.bfloat16)
    assert cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(_parsed("evaluate", "--load_8bit"), torch.float32).load_in_8bit
    assert quantization_config(_parsed("evaluate"), torch.float32) is None


@pytest.mark.parametrize("flags,message", [
    (["--load_4bit", "--load_8bit"], "--load-4bit and --load-8bit exclude each other"),
    (["--bnb_4bit_quant_type", "fp4"], "--bnb-4bit-quant-type goes with --load-4bit"),
    (["--load_8bit", "--double_quant", "True"], "--double-quant goes with --load-4bit"),
])
def test_bad_quantization_flags_fail_before_loading(tiny, tmp_path, capsys, flags, message):
    assert finetune(tiny, tmp_path / "a", *ADAPTERS["lora"], *flags) == 2
    assert message in capsys.readouterr().err
    assert evaluate(tiny, tmp_path / "r", *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "r").exists()


def test_without_bitsandbytes_the_error_names_the_extra(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    for run, flag in ((finetune, "--load_4bit"), (evaluate, "--load_8bit")):
        extra = ADAPTERS["lora"] if run is finetune else []
        assert run(tiny, tmp_path / "x", *extra, flag) == 2
        err = capsys.readouterr().err
        assert "needs bitsandbytes" in err and 'pip install "llm_adapters[qlora]"' in err
