"""Adapters of different kinds side by side on one model: LoRA on attention and a bottleneck
adapter (series, AdapterP or parallel) on the MLP, each a named adapter with PEFT's API:
add / set (one or several active) / disable / delete, only the active ones train, save and load
in PEFT's multi-adapter layout, Trainer's resume, and bad input refused with the model
untouched."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import nf4_linear, perturb, tiny_batch, tiny_model

import llm_adapters as la
from llm_adapters.layers import BottleneckAdapter

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
KINDS = {
    "series": dict(bottleneck_size=6),  # the family default: gate/up (input), down (output)
    "adapterp": dict(bottleneck_size=6, use_adapterp=True),
    "parallel": dict(bottleneck_size=5, use_parallel_adapter=True,
                     target_modules=["up_proj", "down_proj"], use_bias=True),
}
EXACT = dict(rtol=0, atol=0)


def _perturb(model, seed=0):  # non-zero values for every adapter parameter (LoRA's B is 0)
    perturb(model, seed, names=("lora_A", "lora_B", "adapter_"))


def _lora_then_bottleneck(kind):
    model = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(**LORA))
    model.add_adapter("mlp", la.BottleneckConfig(**KINDS[kind]))
    _perturb(model)
    return model


def _copy_layers(src, dst):
    """Copy into `dst`'s adapter layers the parameters of `src`'s layers of the same name."""
    theirs = dict(dst.named_modules())
    kinds = (la.LoraLinear, BottleneckAdapter)
    with torch.no_grad():
        for name, layer in src.named_modules():
            if isinstance(layer, kinds) and isinstance(theirs.get(name), kinds):
                for pname, p in layer.named_parameters():
                    if not pname.startswith(("base_layer.", "lora_extra")):
                        theirs[name].get_parameter(pname).copy_(p)


def _hand_built(model, kinds):
    """The model `model` should run as with `kinds` active, built without the registry: a
    fresh base with the same adapter layers put in place by hand (LoraLinear / BottleneckAdapter
    constructed directly), holding copies of `model`'s weights."""
    ref = tiny_model("llama")
    modules = dict(ref.named_modules())
    for name, layer in model.get_base_model().named_modules():
        lora = isinstance(layer, la.LoraLinear) and layer.has_default
        bottleneck = isinstance(layer, BottleneckAdapter)
        if (lora and "lora" in kinds) or (bottleneck and "bottleneck" in kinds):
            parent, _, attr = name.rpartition(".")
            base = modules[name]
            if lora:
                new = la.LoraLinear(base, layer.r, layer.lora_alpha, 0.0)
            else:
                new = BottleneckAdapter(
                    base, layer.adapter_down.out_features, layer.placement,
                    layer.non_linearity, use_bias=layer.adapter_down.bias is not None,
                )
            setattr(modules[parent], attr, new)
    _copy_layers(model.get_base_model(), ref)
    return ref.eval()


def _logits(model, batch=None):
    batch = batch or tiny_batch()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_switching_disabling_and_deleting_give_the_hand_built_models(kind):
    model = _lora_then_bottleneck(kind)
    layers = [m for m in model.get_base_model().modules() if isinstance(m, BottleneckAdapter)]
    assert layers and all(m.adapter_name == "mlp" for m in layers)
    assert set(model.peft_config) == {"default", "mlp"}
    base = _logits(tiny_model("llama"))
    only_lora, only_mlp = _hand_built(model, {"lora"}), _hand_built(model, {"bottleneck"})
    both = _hand_built(model, {"lora", "bottleneck"})
    # the new adapter is not active: the model runs its LoRA alone
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(_logits(model), _logits(only_lora), **EXACT)
    model.set_adapter("mlp")
    torch.testing.assert_close(_logits(model), _logits(only_mlp), **EXACT)
    model.set_adapter(["default", "mlp"])
    assert model.active_adapter == ["default", "mlp"]
    out = _logits(model)
    torch.testing.assert_close(out, _logits(both), **EXACT)
    assert (out - _logits(only_lora)).abs().max() > 1e-3  # each kind changes the output
    assert (out - _logits(only_mlp)).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base, **EXACT)
    torch.testing.assert_close(_logits(model), out, **EXACT)
    model.disable_adapters()
    torch.testing.assert_close(_logits(model), base, **EXACT)
    model.enable_adapters()
    model.delete_adapter("mlp")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert not any(isinstance(m, BottleneckAdapter) for m in model.modules())
    mlp = model.get_base_model().model.layers[0].mlp
    assert all(type(getattr(mlp, n)) is torch.nn.Linear for n in ("gate_proj", "up_proj"))
    torch.testing.assert_close(_logits(model), _logits(only_lora), **EXACT)


def test_a_bottleneck_default_with_a_lora_adapter_beside_it():
    model = la.get_adapter_model(tiny_model("llama"), la.BottleneckConfig(bottleneck_size=6))
    model.add_adapter("attn", la.LoraConfig(**LORA))
    _perturb(model)
    model.set_adapter(["attn", "default"])
    bottleneck = _hand_built(model, {"bottleneck"})
    ref = _hand_built(model, {"bottleneck"})
    # the LoRA adapter is a named one here (no default branch): put it in by hand too
    modules = dict(ref.named_modules())
    for name, layer in model.get_base_model().named_modules():
        if isinstance(layer, la.LoraLinear):
            branch = layer.branch("attn")
            parent, _, attr = name.rpartition(".")
            new = la.LoraLinear(modules[name], branch.r, branch.lora_alpha, 0.0)
            with torch.no_grad():
                new.lora_A.weight.copy_(branch.lora_A.weight)
                new.lora_B.weight.copy_(branch.lora_B.weight)
            setattr(modules[parent], attr, new)
    torch.testing.assert_close(_logits(model), _logits(ref), **EXACT)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model), _logits(bottleneck), **EXACT)
    model.delete_adapter("attn")
    assert not any(isinstance(m, la.LoraLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model), _logits(bottleneck), **EXACT)
    model.add_adapter("attn", la.LoraConfig(**LORA))
    plain = model.unload()  # every adapter layer of both kinds goes
    assert not any(isinstance(m, (la.LoraLinear, BottleneckAdapter)) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), _logits(tiny_model("llama")), **EXACT)


def test_only_the_active_adapters_train():
    model = _lora_then_bottleneck("series")
    model.train()

    def grads_after_step():
        for p in model.parameters():
            p.grad = None
        model(**tiny_batch()).loss.backward()
        return {n for n, p in model.named_parameters() if p.grad is not None}

    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    mlp = {n for n, _ in model.named_parameters() if "adapter_" in n}
    assert lora and mlp
    assert grads_after_step() == lora  # the new adapter starts frozen
    model.set_adapter(["default", "mlp"])
    assert grads_after_step() == lora | mlp
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in lora | mlp)
    model.set_adapter("mlp")
    assert grads_after_step() == mlp
    model.set_adapter(["default", "mlp"], inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())


def test_save_and_load_in_peft_layout_and_peft_reads_the_lora_part(tmp_path):
    model = _lora_then_bottleneck("series")
    model.set_adapter(["default", "mlp"])
    out = _logits(model)
    la.save_adapter(model, str(tmp_path))
    top = json.loads((tmp_path / "adapter_config.json").read_text())
    sub = json.loads((tmp_path / "mlp" / "adapter_config.json").read_text())
    assert top["peft_type"] == "LORA" and "bottleneck_size" in sub
    from safetensors.torch import load_file

    top_keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    sub_keys = set(load_file(str(tmp_path / "mlp" / "adapter_model.safetensors")))
    assert top_keys and all("lora_" in k for k in top_keys)  # the default adapter's only
    assert sub_keys and all("adapter_" in k and "mlp" in k for k in sub_keys)
    loaded = la.load_adapter(tiny_model("llama"), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "mlp"), adapter_name="mlp")
    loaded.set_adapter(["default", "mlp"])
    torch.testing.assert_close(_logits(loaded), out, **EXACT)
    # PEFT reads the LoRA adapter at the top of the folder
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)).eval()
    model.set_adapter("default")
    torch.testing.assert_close(_logits(theirs), _logits(model), rtol=1e-5, atol=1e-5)


def test_checkpoint_resume_restores_both_kinds(tmp_path):
    from llm_adapters.models.hf_trainer import load_weights_in_place

    model = _lora_then_bottleneck("parallel")
    la.save_adapter(model, str(tmp_path))
    fresh = _lora_then_bottleneck("parallel")
    _perturb(fresh, seed=7)
    load_weights_in_place(fresh, str(tmp_path))
    for active in (["default", "mlp"], "mlp"):
        model.set_adapter(active)
        fresh.set_adapter(active)
        torch.testing.assert_close(_logits(fresh), _logits(model), **EXACT)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_mixed_batch_rows_match_each_adapter_alone(kind):
    """Each row of a mixed batch runs the one adapter it names (a bottleneck adapter's rows
    only get it, whatever is active), in forward and in greedy generation."""
    model = _lora_then_bottleneck(kind)
    model.add_adapter("other", la.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))
    _perturb(model, seed=3)
    model.eval()
    model.set_adapter(["default", "mlp"])  # what is active does not matter to a mixed batch
    batch = tiny_batch(batch=4)
    rows = ["mlp", "other", "__base__", "default"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, adapter_names=rows,
                             max_new_tokens=4, do_sample=False, pad_token_id=0)
    for i, name in enumerate(rows):
        one = dict(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
        if name == "__base__":
            with model.disable_adapter(), torch.no_grad():
                ref = _logits(model, one)
                ref_gen = model.generate(**one, max_new_tokens=4, do_sample=False, pad_token_id=0)
        else:
            model.set_adapter(name)
            with torch.no_grad():
                ref = _logits(model, one)
                ref_gen = model.generate(**one, max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(gen[i:i + 1], ref_gen), name
    # the rows differ: each adapter changes its row's logits
    with model.disable_adapter(), torch.no_grad():
        base = _logits(model, batch)
    assert all((out[i] - base[i]).abs().max() > 1e-3 for i in (0, 1, 3))


@pytest.mark.parametrize("placement", ["input", "output", "parallel"])
def test_mixed_rows_of_a_bottleneck_layer_on_a_quantized_base(placement):
    pytest.importorskip("bitsandbytes")
    base = nf4_linear()
    k = 72 if placement != "output" else 40
    layer = BottleneckAdapter(base, 6, placement, use_bias=True)
    if placement == "input":  # an input-side adapter's up projection gives K features
        assert layer.adapter_up.out_features == k
    layer.adapter_name = "mlp"
    x = torch.randn(3, 5, 72)
    rows = ["mlp", "__base__", "mlp"]
    with torch.no_grad():
        layer.row_adapters = rows
        mixed = layer(x)
        del layer.row_adapters
        on, off = layer(x), base(x)
    torch.testing.assert_close(mixed[[0, 2]], on[[0, 2]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[1], off[1], rtol=0, atol=0)
    assert (on[1] - off[1]).abs().max() > 1e-3


def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        model.active_adapters, list(model.peft_config),
        [(n, type(m).__name__) for n, m in model.named_modules()],
    )


def _unchanged(before, model):
    after = _state(model)
    assert after[1:] == before[1:]
    assert list(after[0]) == list(before[0])
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())


def test_bad_input_is_refused_and_the_model_untouched(tmp_path):
    model = _lora_then_bottleneck("series")
    model.set_adapter(["default", "mlp"])
    before = _state(model)
    batch = tiny_batch()
    cases = [
        (lambda: model.add_adapter("p", la.BottleneckConfig(use_parallel_adapter=True)),
         "module 'model.layers.0.self_attn.q_proj' already holds LoRA adapter"),
        (lambda: model.add_adapter("s2", la.BottleneckConfig(target_modules=["up_proj"])),
         r"already holds bottleneck adapter 'mlp' \(input placement\); a layer holds adapters "
         "of one kind"),
        (lambda: model.add_adapter("l2", la.LoraConfig(r=2, target_modules=["down_proj"])),
         r"already holds bottleneck adapter 'mlp' \(output placement\); only a LoRA layer"),
        (lambda: model.add_adapter("x", la.PrefixTuningConfig(num_virtual_tokens=2)),
         "prefix tuning adapter cannot be added.*soft prompt is the model's only"),
        (lambda: model.add_adapter("x", la.BottleneckConfig(target_modules=["nope"])),
         r"target module\(s\) \['nope'\] not found"),
        (lambda: la.merge_adapter(model), "only LoRA adapters can be merged"),
        (lambda: model(**batch, adapter_names=["mlp"]), "1 entries but the batch has 2 rows"),
    ]
    model.eval()
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
        _unchanged(before, model)
    with pytest.raises(ValueError, match="default adapter is prompt tuning.*not beside a soft"):
        prompt = la.get_adapter_model(
            tiny_model("llama"), la.PromptTuningConfig(num_virtual_tokens=2)
        )
        prompt.add_adapter("x", la.BottleneckConfig())
    # a saved bottleneck adapter whose file lacks a tensor: refused before anything is added
    model.set_adapter("default")
    la.save_adapter(model, str(tmp_path))
    model.delete_adapter("mlp")
    before = _state(model)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "mlp" / "adapter_model.safetensors"
    state = load_file(str(path))
    state.pop(sorted(state)[0])
    save_file(state, str(path))
    with pytest.raises(ValueError, match="does not match this model: missing"):
        la.load_adapter(model, str(tmp_path / "mlp"), adapter_name="mlp")
    _unchanged(before, model)
    assert os.path.isdir(tmp_path / "mlp")
