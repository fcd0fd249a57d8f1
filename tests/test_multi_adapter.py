"""Several named LoRA adapters on one model, PEFT's API: add / set / delete / disable, only the
active one trains, PEFT's multi-adapter save layout both ways, and bad input refused with the
model untouched."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from tiny_models import nf4_linear, tiny_batch, tiny_model

import llm_adapters as la

DEFAULT = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
OTHER = dict(r=2, lora_alpha=6, target_modules=["v_proj", "o_proj"])  # other rank, other layers
TOL = dict(rtol=1e-6, atol=1e-6)


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _two_adapters(**default):
    model = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(**{**DEFAULT, **default}))
    model.add_adapter("other", la.LoraConfig(**OTHER))
    _perturb(model)
    return model


def _alone(model, adapter_name, config):
    """A model built with only `config`, holding `model`'s adapter `adapter_name` as its own."""
    ref = la.get_adapter_model(tiny_model("llama"), config)
    layers = dict(model.get_base_model().named_modules())
    with torch.no_grad():
        for name, layer in ref.get_base_model().named_modules():
            if isinstance(layer, la.LoraLinear):
                branch = layers[name].branch(adapter_name)
                layer.lora_A.weight.copy_(branch.lora_A.weight)
                layer.lora_B.weight.copy_(branch.lora_B.weight)
                if layer.use_dora:
                    layer.lora_magnitude_vector.copy_(branch.lora_magnitude_vector)
    return ref


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        n: p.requires_grad for n, p in model.named_parameters()
    }, model.active_adapter, list(model.peft_config)


def _same(before, model):
    state, grads, active, names = before
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert model.active_adapter == active and list(model.peft_config) == names


@pytest.mark.parametrize("dora", [False, True])
def test_switching_disabling_and_deleting_give_the_single_adapter_models(dora):
    model = _two_adapters(use_dora=dora)
    batch = tiny_batch()
    base_logits = _logits(tiny_model("llama"), batch)
    ref_default = _alone(model, "default", la.LoraConfig(**DEFAULT, use_dora=dora))
    ref_other = _alone(model, "other", la.LoraConfig(**OTHER))
    want_default, want_other = _logits(ref_default, batch), _logits(ref_other, batch)
    assert not torch.allclose(want_default, want_other)
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    torch.testing.assert_close(_logits(model, batch), want_default, **TOL)
    model.set_adapter("other")
    assert model.active_adapter == "other" and model.active_adapters == ["other"]
    torch.testing.assert_close(_logits(model, batch), want_other, **TOL)
    gen = dict(input_ids=batch["input_ids"], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**gen), ref_other.generate(**gen))
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, batch), base_logits, **TOL)
    torch.testing.assert_close(_logits(model, batch), want_other, **TOL)
    model.disable_adapters()
    torch.testing.assert_close(_logits(model, batch), base_logits, **TOL)
    model.enable_adapters()
    torch.testing.assert_close(_logits(model, batch), want_other, **TOL)
    model.set_adapter(["default"])  # a list of one, as PEFT takes it
    torch.testing.assert_close(_logits(model, batch), want_default, **TOL)
    model.set_adapter("other")
    with pytest.warns(UserWarning, match="'other' was active.*now 'default'"):
        model.delete_adapter("other")  # PEFT: deleting the active one activates another
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    torch.testing.assert_close(_logits(model, batch), want_default, **TOL)
    # the model is again exactly the single-adapter one: same modules, names and tensors
    assert list(model.state_dict()) == list(ref_default.state_dict())
    assert not any(isinstance(m, la.LoraLinear) and not m.has_default
                   for m in model.get_base_model().modules())


def test_only_the_active_adapter_trains():
    model = _two_adapters()
    names = {n for n, _ in model.named_parameters()}
    other = {n for n in names if ".lora_extra.other." in n}
    default = {n for n in names if "lora_" in n and n not in other}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == default  # added, not active: frozen (PEFT)
    model.set_adapter("other")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == other
    model.train()
    batch = tiny_batch()
    model(**batch).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == other and all(
        p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in other
        and n.endswith("lora_B.weight")
    )
    model.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_adapter("default")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == default


def _files(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_save_writes_peft_layout_and_loads_back(tmp_path):
    model = _two_adapters()
    batch = tiny_batch()
    la.save_adapter(model, str(tmp_path))
    # the default adapter's files are what a single-adapter model writes
    single = _alone(model, "default", la.LoraConfig(**DEFAULT))
    la.save_adapter(single, str(tmp_path / "single"))
    top, alone = _files(tmp_path), _files(tmp_path / "single")
    assert list(top) == list(alone) and all(torch.equal(top[k], alone[k]) for k in top)
    sub = _files(tmp_path / "other")
    assert sorted(sub) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{x}.weight"
        for i in range(2) for m in ("v_proj", "o_proj") for x in "AB"
    )
    loaded = la.load_adapter(tiny_model("llama"), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    assert list(loaded.peft_config) == ["default", "other"] and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)
    loaded.set_adapter("other")
    model.set_adapter("other")
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)
    # what Trainer's save passes: a gathered state dict (the other adapters are taken as held)
    model.save_pretrained(str(tmp_path / "trainer"), state_dict=model.state_dict())
    for sub in ("", "other"):
        a, b = _files(tmp_path / "trainer" / sub), _files(tmp_path / sub)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = la.load_adapter(tiny_model("llama"), str(tmp_path))
    la.load_adapter(again, str(tmp_path / "other"), adapter_name="other", is_trainable=True)
    again.set_adapter("other")
    torch.testing.assert_close(_logits(again, batch), _logits(model, batch), rtol=0, atol=0)


def test_peft_loads_our_multi_adapter_save(tmp_path):
    peft = pytest.importorskip("peft")
    model = _two_adapters()
    batch = tiny_batch()
    model.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for name in ("default", "other"):
        model.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(_logits(theirs, batch), _logits(model, batch),
                                   rtol=1e-5, atol=1e-5)


def test_we_load_peft_multi_adapter_save(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(**DEFAULT, task_type="CAUSAL_LM")
    )
    theirs.add_adapter("other", peft.LoraConfig(**OTHER, task_type="CAUSAL_LM"))
    _perturb(theirs)
    theirs.save_pretrained(str(tmp_path))
    assert os.path.isdir(tmp_path / "other")  # PEFT's layout: a sub-folder per other adapter
    ours = la.load_adapter(tiny_model("llama"), str(tmp_path))
    la.load_adapter(ours, str(tmp_path / "other"), adapter_name="other")
    batch = tiny_batch()
    for name in ("default", "other"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(_logits(ours, batch), _logits(theirs, batch),
                                   rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_and_the_model_untouched(tmp_path):
    model = _two_adapters()
    model.set_adapter("other")
    before = _snapshot(model)
    cases = [
        (lambda: model.set_adapter("nope"), ValueError, "'nope' not found"),
        (lambda: model.set_adapter(["default", "nope"]), ValueError, "'nope' not found"),
        (lambda: model.delete_adapter("nope"), ValueError, "'nope' does not exist"),
        (lambda: model.delete_adapter("default"), ValueError, "'default' adapter cannot be"),
        (lambda: model.add_adapter("other", la.LoraConfig(r=2)), ValueError, "already exists"),
        (lambda: model.add_adapter("default", la.LoraConfig(r=2)), ValueError,
         "already exists"),
        (lambda: model.add_adapter("a.b", la.LoraConfig(r=2)), ValueError, "identifier"),
        (lambda: model.add_adapter("x", la.LoraConfig(r=2, modules_to_save=["lm_head"])),
         ValueError, "modules_to_save is not supported for an adapter other than 'default'"),
        (lambda: model.add_adapter("x", la.LoraConfig(r=2, target_modules=["nope"])),
         ValueError, "not found"),
        (lambda: model.add_adapter("x", la.BottleneckConfig(target_modules=["v_proj"])),
         ValueError, r"'model.layers.0.self_attn.v_proj' already holds LoRA adapter\(s\)"),
        (lambda: model.add_adapter("x", la.PrefixTuningConfig(num_virtual_tokens=2)),
         ValueError, "prefix tuning adapter cannot be added.*LoRA and bottleneck adapters"),
        (lambda: model.add_adapter("x", la.PromptTuningConfig(num_virtual_tokens=2)),
         ValueError, "prompt tuning adapter cannot be added.*LoRA and bottleneck adapters"),
        (lambda: la.merge_adapter(model), RuntimeError, "active adapter is 'other'"),
        (lambda: la.load_adapter(model, str(tmp_path / "none"), adapter_name="other"),
         ValueError, "already exists"),
        (lambda: model(**tiny_batch(), adapter_names=["default", "nope"]),
         ValueError, r"unknown adapter\(s\) \['nope'\]"),
        (lambda: model(**tiny_batch(), adapter_names=["default"]),
         ValueError, "1 entries but the batch has 2 rows"),
        (lambda: model.train()(**tiny_batch(), adapter_names=["default", "__base__"]),
         ValueError, "for inference: call model.eval"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
        model.eval()
        _same(before, model)
    # a saved adapter that does not fit: checked before anything is added
    other = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(r=3, target_modules=["k_proj"]))
    la.save_adapter(other, str(tmp_path / "k"))
    with torch.no_grad():
        other.get_base_model().model.layers[0].self_attn.k_proj.lora_A.weight.zero_()
    bad = tmp_path / "k"
    state = _files(bad)
    state.pop(next(iter(state)))
    from safetensors.torch import save_file

    save_file(state, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not match this model: missing"):
        la.load_adapter(model, str(bad), adapter_name="k")
    _same(before, model)
    # a first adapter under another name, and a non-LoRA default
    with pytest.raises(ValueError, match="first adapter is named 'default'"):
        la.load_adapter(tiny_model("llama"), str(tmp_path / "k"), adapter_name="k")
    prompt = la.get_adapter_model(tiny_model("llama"), la.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="default adapter is prompt tuning.*not beside"):
        prompt.add_adapter("x", la.LoraConfig(r=2))
    assert list(prompt.peft_config) == ["default"]


def test_merge_with_the_default_active_and_a_merged_model_switches():
    model = _two_adapters()
    batch = tiny_batch()
    want_default = _logits(model, batch)
    model.set_adapter("other")
    want_other = _logits(model, batch)
    model.set_adapter("default")
    la.merge_adapter(model)
    torch.testing.assert_close(_logits(model, batch), want_default, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.set_adapter("other")  # PEFT: unmerged first, with a warning
    assert any("unmerging" in str(w.message) for w in caught)
    torch.testing.assert_close(_logits(model, batch), want_other, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beams", [1, 2])
def test_mixed_adapter_batch_rows_match_each_adapter_alone(beams):
    model = _two_adapters().eval()
    batch = tiny_batch(batch=3, length=7)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = ["other", "__base__", "default"]
    want = []
    for i, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapter():
                want.append(_logits(model, {"input_ids": ids, "attention_mask": mask})[i])
        else:
            model.set_adapter(name)
            want.append(_logits(model, {"input_ids": ids, "attention_mask": mask})[i])
    model.set_adapter("default")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
    assert all("row_adapters" not in vars(m) for m in model.get_base_model().modules())
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, num_beams=beams,
               num_return_sequences=beams)
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, **gen)
    for i, name in enumerate(rows):
        one = dict(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **gen)
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(**one)
        else:
            model.set_adapter(name)
            alone = model.generate(**one)
        assert torch.equal(out[i * beams:(i + 1) * beams], alone)


def test_merge_and_unload_with_other_adapters_folds_the_default_one():
    model = _two_adapters()
    batch = tiny_batch()
    want = _logits(model, batch)
    hf = model.merge_and_unload()
    assert not any(isinstance(m, la.LoraLinear) for m in hf.modules())
    assert list(hf.state_dict()) == list(tiny_model("llama").state_dict())
    torch.testing.assert_close(_logits(hf, batch), want, rtol=1e-5, atol=1e-5)


def test_mixed_batch_matches_peft():
    peft = pytest.importorskip("peft")
    model = _two_adapters().eval()
    theirs = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(**DEFAULT, task_type="CAUSAL_LM")
    )
    theirs.add_adapter("other", peft.LoraConfig(**OTHER, task_type="CAUSAL_LM"))
    ours = dict(model.named_parameters())
    with torch.no_grad():  # PEFT's names: lora_A.<adapter>.weight
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                mine = n.replace("lora_A.default.", "lora_A.").replace("lora_B.default.", "lora_B.")
                for x in "AB":
                    mine = mine.replace(f"lora_{x}.other.", f"lora_extra.other.lora_{x}.")
                p.copy_(ours[mine.replace("base_model.model.", "base_model.", 1)])
    theirs.eval()
    batch = tiny_batch(batch=3, length=6)
    rows = ["__base__", "other", "default"]
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              adapter_names=rows)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, theirs(**kw).logits, rtol=1e-5, atol=1e-5)


def test_other_adapter_on_a_quantized_base():
    pytest.importorskip("bitsandbytes")
    base = nf4_linear()
    layer = la.LoraLinear(base, 4, 8.0)
    branch = la.layers.lora.LoraBranch(72, 40, 2, 6.0, init_lora_weights=False)
    layer.add_branch("other", branch)
    alone = la.LoraLinear(base, 2, 6.0)
    with torch.no_grad():
        alone.lora_A.weight.copy_(branch.lora_A.weight)
        alone.lora_B.weight.copy_(branch.lora_B.weight)
    x = torch.randn(3, 5, 72)
    layer.active_adapter = "other"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), alone(x), rtol=1e-6, atol=1e-6)
        rows = ["other", "__base__", "default"]
        layer.row_adapters = rows
        mixed = layer(x)
        del layer.row_adapters
        for i, name in enumerate(rows):
            layer.active_adapter = name if name != "__base__" else "other"
            layer.disable_adapters = name == "__base__"
            torch.testing.assert_close(mixed[i], layer(x)[i], rtol=1e-5, atol=1e-5)


def test_checkpoint_resume_restores_every_adapter(tmp_path):
    """Trainer's resume (`load_weights_in_place`) copies the default adapter and each other
    named one from its sub-folder; a checkpoint missing one is refused before any copy."""
    from llm_adapters.models.hf_trainer import load_weights_in_place

    model = _two_adapters()
    la.save_adapter(model, str(tmp_path))
    fresh = _two_adapters()
    _perturb(fresh, seed=7)
    before = _snapshot(fresh)
    os.rename(tmp_path / "other", tmp_path / "moved")
    with pytest.raises(ValueError, match="no folder for adapter 'other'"):
        load_weights_in_place(fresh, str(tmp_path))
    _same(before, fresh)
    os.rename(tmp_path / "moved", tmp_path / "other")
    load_weights_in_place(fresh, str(tmp_path))
    batch = tiny_batch()
    for name in ("default", "other"):
        model.set_adapter(name)
        fresh.set_adapter(name)
        torch.testing.assert_close(_logits(fresh, batch), _logits(model, batch), rtol=0, atol=0)
