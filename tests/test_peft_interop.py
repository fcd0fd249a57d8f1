"""PEFT compatibility: file format both ways, and accelerate_peft on a PEFT model."""

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import llm_adapters as la

peft = pytest.importorskip("peft")

FAMILIES = ["llama", "gpt2", "bloom", "opt"]


def _randomise_lora(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_ours_with_equal_logits(family, tmp_path):
    ours = la.get_adapter_model(tiny_model(family), la.LoraConfig(r=4, lora_alpha=8))
    _randomise_lora(ours)
    ours.eval()
    batch = tiny_batch()
    with torch.no_grad():
        want = ours(**batch).logits
    la.save_adapter(ours, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path)).eval()
    with torch.no_grad():
        got = theirs(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rslora", [False, True])
def test_we_load_peft_with_equal_logits(family, rslora, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=rslora, task_type="CAUSAL_LM",
                          fan_in_fan_out=family == "gpt2")
    theirs = peft.get_peft_model(tiny_model(family), cfg)
    _randomise_lora(theirs)
    theirs.eval()
    batch = tiny_batch()
    with torch.no_grad():
        want = theirs(**batch).logits
    theirs.save_pretrained(str(tmp_path))
    ours = la.load_adapter(tiny_model(family), str(tmp_path)).eval()
    with torch.no_grad():
        got = ours(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_accelerate_peft_equal_logits_and_gradients(family):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", lora_dropout=0.0,
                          fan_in_fan_out=family == "gpt2")
    model = peft.get_peft_model(tiny_model(family), cfg)
    _randomise_lora(model)
    model.train()
    batch = tiny_batch()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    def run():
        torch.manual_seed(0)  # GPT-2 has dropout of its own in train mode
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.logits.detach(), grads

    want_logits, want_grads = run()
    la.accelerate_peft(model)
    patched = [m for m in model.modules() if "_llm_adapters_original_forward" in vars(m)]
    assert patched
    got_logits, got_grads = run()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6)
    la.restore_peft(model)
    assert not any("_llm_adapters_original_forward" in vars(m) for m in model.modules())


def test_accelerate_peft_needs_lora_layers():
    with pytest.raises(ValueError, match="no PEFT LoRA Linear"):
        la.accelerate_peft(tiny_model("llama"))


def test_our_config_file_is_peft_readable(tmp_path):
    ours = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(r=4, lora_alpha=8,
                                                                   use_rslora=True))
    la.save_adapter(ours, str(tmp_path))
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert cfg.peft_type == peft.PeftType.LORA and cfg.r == 4 and cfg.use_rslora
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
