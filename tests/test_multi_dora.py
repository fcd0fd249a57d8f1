"""A named adapter other than "default" may be DoRA (`add_adapter(name, LoraConfig(use_dora=
True))`): its magnitude starts as PEFT's, active alone it gives the logits and every gradient
of a model built with that DoRA adapter alone (dropout included) and of a float64 reference,
it trains only when active, deletes cleanly, round-trips PEFT's multi-adapter layout both
ways, runs on our ops under `accelerate_peft`; bad input is refused with the model untouched.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from tiny_models import adapter_state, assert_adapter_state, perturb, tiny_batch, tiny_model

import llm_adapters as la
from llm_adapters import ops
from llm_adapters.layers.lora import LoraBranch

TARGETS = {  # (the default adapter's, the DoRA adapter "b"'s): they overlap on one layer
    "llama": (["q_proj", "v_proj"], ["v_proj", "o_proj"]),
    "gpt2": (["c_attn"], ["c_attn", "c_fc"]),  # GPT-2 Conv1D: the weight stored [K, N]
}
TOL = dict(rtol=1e-6, atol=1e-6)
PEFT_TOL = dict(rtol=1e-5, atol=1e-5)


def _default_fields(family, **fields):
    return dict(r=4, lora_alpha=8, target_modules=TARGETS[family][0], **fields)


def _b_fields(family, **fields):
    return dict(r=2, lora_alpha=6, target_modules=TARGETS[family][1], use_dora=True, **fields)


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for GPT-2's Conv1D
        return make()


def _model(family="llama", default=None, b=None, trained=True):
    model = la.get_adapter_model(
        tiny_model(family), la.LoraConfig(**_default_fields(family, **(default or {})))
    )
    model.add_adapter("b", la.LoraConfig(**_b_fields(family, **(b or {}))))
    if trained:
        perturb(model)
    return model


def _alone(model, family, config):
    """A model built with only `config` as its default adapter, holding `model`'s adapter
    "b" (A, B and magnitude) as its own."""
    ref = la.get_adapter_model(tiny_model(family), config)
    layers = dict(model.get_base_model().named_modules())
    with torch.no_grad():
        for name, layer in ref.get_base_model().named_modules():
            if isinstance(layer, la.LoraLinear):
                branch = layers[name].branch("b")
                assert branch is not None and branch.use_dora and layer.use_dora
                layer.lora_A.weight.copy_(branch.lora_A.weight)
                layer.lora_B.weight.copy_(branch.lora_B.weight)
                layer.lora_magnitude_vector.copy_(branch.lora_magnitude_vector)
    return ref


def _logits(model, batch=None):
    batch = batch or tiny_batch()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _grads(model, seed=5):
    """Gradients of a training step, keyed by the name a single-adapter model gives them."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(**tiny_batch()).loss
    loss.backward()
    model.eval()
    return loss.detach(), {
        n.replace(".lora_extra.b.", "."): p.grad for n, p in model.named_parameters()
        if p.grad is not None
    }


_snapshot, _same = adapter_state, assert_adapter_state


def _files(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


# ---- the named DoRA adapter is the DoRA model alone ----------------------------------------
@pytest.mark.parametrize("family,default_dora", [("llama", False), ("llama", True),
                                                 ("gpt2", False)])
def test_named_dora_adapter_gives_the_dora_model_alone(family, default_dora):
    model = _model(family, default=dict(use_dora=default_dora))
    batch = tiny_batch()
    want_default = _logits(model, batch)
    ref = _alone(model, family, la.LoraConfig(**_b_fields(family)))
    want = _logits(ref, batch)
    assert not torch.allclose(want, want_default, atol=1e-3)
    assert not torch.allclose(want, _logits(tiny_model(family), batch), atol=1e-3)
    model.set_adapter("b")
    assert model.active_adapter == "b"
    torch.testing.assert_close(_logits(model, batch), want, **TOL)
    # a training step: the loss and every gradient (A, B, magnitude of each layer) as the
    # single-adapter model's; nothing of the default adapter gets one
    loss, grads = _grads(model)
    ref_loss, ref_grads = _grads(ref)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert set(grads) == set(ref_grads)
    assert sum(n.endswith("lora_magnitude_vector") for n in grads) == 4
    for n, g in ref_grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(grads[n], g, **TOL, msg=n)
    gen = dict(input_ids=batch["input_ids"], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**gen), ref.generate(**gen))
    # back to the default adapter: its logits as before
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, batch), want_default, rtol=0, atol=0)


def test_named_dora_adapter_with_dropout_trains_as_the_dora_model_alone():
    """lora_dropout on the DoRA adapter: the masks are drawn in the same order as the model
    alone draws them, so the loss and the gradients are the same; and dropout does act."""
    model = _model(b=dict(lora_dropout=0.3))
    ref = _alone(model, "llama", la.LoraConfig(**_b_fields("llama", lora_dropout=0.3)))
    model.set_adapter("b")
    loss, grads = _grads(model, seed=11)
    ref_loss, ref_grads = _grads(ref, seed=11)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, **TOL, msg=n)
    again, _ = _grads(model, seed=12)
    batch = tiny_batch()
    with torch.no_grad():
        eval_loss = model(**batch).loss
    assert not torch.isclose(again, loss) and not torch.isclose(loss, eval_loss)


def _formula64(x, w, bias, a, b, m, s):
    """PEFT's DoRA forward (no dropout) in float64: c ⊙ (x (W + s·B A)ᵀ) + bias, with
    c = m / ‖W + s·B A‖ detached."""
    merged = w + s * (b @ a)
    c = m / torch.linalg.norm(merged, dim=1).detach()
    return c * (x @ merged.t()) + bias


def _branch_layer(base, init_lora_weights=False, seed=3):
    """A LoraLinear over `base` with a plain default adapter and a DoRA branch "b", active."""
    layer = la.LoraLinear(base, 4, 8.0)
    k, n = layer.in_features, layer.out_features
    torch.manual_seed(seed)
    branch = LoraBranch(k, n, 3, 7.0, init_lora_weights=init_lora_weights, use_dora=True)
    layer.init_branch_magnitude(branch)
    layer.add_branch("b", branch)
    layer.active_adapter = "b"
    return layer, branch


def test_layer_with_a_dora_branch_matches_float64_and_peft_init():
    from peft.tuners.lora.dora import DoraLinearLayer

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40).requires_grad_(False)
    layer, branch = _branch_layer(base)
    # the initial magnitude: ‖W + s·B A‖ per row (B random here), as PEFT initialises it
    w64 = base.weight.double()
    a, b = branch.lora_A.weight, branch.lora_B.weight
    want_m = torch.linalg.norm(w64 + branch.scaling * b.double() @ a.double(), dim=1)
    torch.testing.assert_close(branch.lora_magnitude_vector.double(), want_m, rtol=1e-6,
                               atol=1e-7)
    theirs = DoraLinearLayer(fan_in_fan_out=False)
    theirs.update_layer(base_layer=base, lora_A=a, lora_B=b, scaling=branch.scaling)
    torch.testing.assert_close(branch.lora_magnitude_vector, theirs.weight, **TOL)
    with torch.no_grad():
        branch.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn(40))
    x = torch.randn(2, 7, 24, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    leaves = (x, a, b, branch.lora_magnitude_vector)
    ours = torch.autograd.grad(y, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y64 = _formula64(ref_leaves[0], w64, base.bias.double(), *ref_leaves[1:], branch.scaling)
    refs = torch.autograd.grad(y64, ref_leaves, g.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for name, got, ref in zip(("x", "A", "B", "m"), ours, refs, strict=True):
        floor = 1e-5 * ref.abs().max().item() + 1e-6
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=floor, msg=name)
    # the cached ‖W‖² is the layer's (the base's only): the default adapter shares it
    assert layer._wsq is not None
    torch.testing.assert_close(layer._wsq.double(), (w64**2).sum(1), rtol=1e-6, atol=1e-6)


def test_dora_branch_on_a_quantized_base_is_the_dora_layer_alone():
    from llm_adapters.layers import _quant

    try:
        to_nf4 = _quant.require_torchao()
    except ImportError:
        pytest.skip("torchao is not installed")
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 40, bias=False)
    base.weight = torch.nn.Parameter(to_nf4(base.weight.data, 32, 1), requires_grad=False)
    layer, branch = _branch_layer(base)
    alone = la.LoraLinear(base, 3, 7.0, use_dora=True)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(alone, name).weight.copy_(getattr(branch, name).weight)
        alone.reset_magnitude()
    torch.testing.assert_close(branch.lora_magnitude_vector, alone.lora_magnitude_vector,
                               rtol=0, atol=0)
    with torch.no_grad():
        scale = 1 + 0.3 * torch.randn(40)
        branch.lora_magnitude_vector.mul_(scale)
        alone.lora_magnitude_vector.mul_(scale)
    x = torch.randn(5, 64)
    g = torch.randn(5, 40)
    results = []
    for lay, own in ((layer, branch), (alone, alone)):
        xl = x.clone().requires_grad_()
        y = lay(xl)
        leaves = (xl, own.lora_A.weight, own.lora_B.weight, own.lora_magnitude_vector)
        results.append((y, torch.autograd.grad(y, leaves, g)))
    (y, ours), (y_ref, refs) = results
    torch.testing.assert_close(y, y_ref, **TOL)
    for got, ref in zip(ours, refs, strict=True):
        torch.testing.assert_close(got, ref, **TOL)


def test_a_new_named_dora_adapter_starts_as_the_model_without_it():
    """PEFT's init (B = 0, m = ‖W‖): the adapter "b" active gives the default adapter's
    model without "b" (the base on b's own layers)."""
    model = _model(trained=False)
    base = _logits(tiny_model("llama"))
    model.set_adapter("b")
    torch.testing.assert_close(_logits(model), base, **TOL)
    layer = model.get_base_model().model.layers[0].self_attn.o_proj
    torch.testing.assert_close(layer.branch("b").lora_magnitude_vector,
                               torch.linalg.norm(layer.base_layer.weight, dim=1), **TOL)


def test_only_the_active_adapter_trains_and_delete_removes_it():
    model = _model()
    names = {n for n, _ in model.named_parameters()}
    b = {n for n in names if ".lora_extra.b." in n}
    default = {n for n in names if "lora_" in n and n not in b}
    assert sum(n.endswith(".lora_extra.b.lora_magnitude_vector") for n in b) == 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == default
    model.set_adapter("b")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == b
    model.set_adapter("b", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_adapter("default")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == default
    alone = la.get_adapter_model(tiny_model("llama"),
                                 la.LoraConfig(**_default_fields("llama")))
    want = _logits(model)
    model.delete_adapter("b")
    assert list(model.peft_config) == ["default"]
    assert list(model.state_dict()) == list(alone.state_dict())
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


# ---- PEFT's layout both ways ----------------------------------------------------------------
def _peft_keys_of_b(family, peft, tmp_path):
    """The file keys PEFT writes for a named DoRA adapter "b" (sub-folder b/)."""
    theirs = _quiet(lambda: peft.get_peft_model(tiny_model(family), peft.LoraConfig(
        **_default_fields(family), task_type="CAUSAL_LM")))
    theirs.add_adapter("b", peft.LoraConfig(**_b_fields(family), task_type="CAUSAL_LM"))
    theirs.save_pretrained(str(tmp_path / "peft_keys"))
    return set(_files(tmp_path / "peft_keys" / "b"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_loads_our_named_dora_adapter(family, tmp_path):
    peft = pytest.importorskip("peft")
    model = _model(family)
    batch = tiny_batch()
    model.save_pretrained(str(tmp_path))
    keys = set(_files(tmp_path / "b"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == 4
    assert keys == _peft_keys_of_b(family, peft, tmp_path)
    theirs = _quiet(lambda: peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path)))
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    for name in ("default", "b"):
        model.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(_logits(theirs.eval(), batch), _logits(model, batch),
                                   **PEFT_TOL)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_we_load_peft_named_dora_adapter_and_save_it_back(family, tmp_path):
    peft = pytest.importorskip("peft")
    theirs = _quiet(lambda: peft.get_peft_model(tiny_model(family), peft.LoraConfig(
        **_default_fields(family), task_type="CAUSAL_LM")))
    theirs.add_adapter("b", peft.LoraConfig(**_b_fields(family), task_type="CAUSAL_LM"))
    perturb(theirs)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = la.load_adapter(tiny_model(family), str(tmp_path / "peft"))
    la.load_adapter(ours, str(tmp_path / "peft" / "b"), adapter_name="b")
    assert ours.peft_config["b"].use_dora and not ours.training
    assert not any(p.requires_grad for p in ours.parameters())
    batch = tiny_batch()
    for name in ("default", "b"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(_logits(ours, batch), _logits(theirs, batch), **PEFT_TOL)
    assert not torch.allclose(_logits(ours, batch), _logits(tiny_model(family), batch),
                              atol=1e-3)
    la.save_adapter(ours, str(tmp_path / "ours"))
    for sub in ("", "b"):
        a, b = _files(tmp_path / "ours" / sub), _files(tmp_path / "peft" / sub)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_our_save_loads_back_and_a_checkpoint_resume_restores_the_magnitude(tmp_path):
    from llm_adapters.models.hf_trainer import load_weights_in_place

    model = _model()
    model.set_adapter("b")
    want = _logits(model)
    la.save_adapter(model, str(tmp_path))
    loaded = la.load_adapter(tiny_model("llama"), str(tmp_path))
    la.load_adapter(loaded, str(tmp_path / "b"), adapter_name="b", is_trainable=True)
    loaded.set_adapter("b")
    assert any(p.requires_grad for n, p in loaded.named_parameters()
               if n.endswith("b.lora_magnitude_vector"))
    torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=0)
    fresh = _model()
    perturb(fresh, seed=9)
    fresh.set_adapter("b")
    load_weights_in_place(fresh, str(tmp_path))
    torch.testing.assert_close(_logits(fresh), want, rtol=0, atol=0)


def test_accelerate_peft_runs_an_active_named_dora_adapter_on_our_ops(monkeypatch):
    peft = pytest.importorskip("peft")
    from llm_adapters.models.peft_interop import acceleration_report

    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        **_default_fields("llama"), task_type="CAUSAL_LM"))
    theirs.add_adapter("b", peft.LoraConfig(**_b_fields("llama"), task_type="CAUSAL_LM"))
    perturb(theirs)
    theirs.set_adapter("b")
    batch = tiny_batch()
    want = _logits(theirs.eval(), batch)
    theirs.train()(**batch).loss.backward()
    want_grads = {n: p.grad.clone() for n, p in theirs.named_parameters() if p.grad is not None}
    assert sum(".lora_magnitude_vector.b." in n for n in want_grads) == 4
    theirs.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left on PEFT's path: no warning
        la.accelerate_peft(theirs)
    report = acceleration_report(theirs)
    assert len(report.accelerated) == 6 and not report.left_on_peft
    calls = []
    for op in ("dora_linear", "lora_linear"):
        real = getattr(ops, op)
        monkeypatch.setattr(
            ops, op, lambda *a, _r=real, _o=op, **kw: calls.append(_o) or _r(*a, **kw)
        )
    torch.testing.assert_close(_logits(theirs.eval(), batch), want, **PEFT_TOL)
    assert calls == ["dora_linear"] * 4  # v_proj and o_proj of each layer; q_proj lacks b
    theirs.train()(**batch).loss.backward()
    for n, p in theirs.named_parameters():
        if n in want_grads:
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    la.restore_peft(theirs)


# ---- bad input ----------------------------------------------------------------------------
def test_bad_input_is_refused_and_the_model_untouched(tmp_path):
    model = _model()
    model.add_adapter("other", la.LoraConfig(r=2, target_modules=["k_proj", "v_proj"]))
    perturb(model, seed=1)
    model.set_adapter("b")
    model.eval()
    before = _snapshot(model)
    rows = tiny_batch()
    cases = [
        (lambda: model(**rows, adapter_names=["b", "default"]), NotImplementedError,
         r"adapter_names= with DoRA adapter\(s\) \['b'\] is not supported"),
        (lambda: model(**rows, adapter_names=["other", "b"]), NotImplementedError,
         r"DoRA adapter\(s\) \['b'\]"),
        (lambda: model.add_adapter("x", la.LoraConfig(
            r=2, use_dora=True, target_modules=["embed_tokens"])), ValueError,
         "embed_tokens.*only nn.Linear and GPT-2 Conv1D"),
        (lambda: model.add_adapter("x", la.LoraConfig(r=2, use_dora=True, bias="all")),
         ValueError, "bias='all' is not supported for an adapter other than 'default'"),
        (lambda: la.merge_adapter(model), RuntimeError, "active adapter is 'b'"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
        _same(before, model)
    # a mixed batch without the DoRA adapter in it still runs (plain LoRA rows only)
    with torch.no_grad():
        mixed = model(**rows, adapter_names=["other", "__base__"]).logits
    model.set_adapter("other")
    torch.testing.assert_close(mixed[0], _logits(model, rows)[0], rtol=1e-5, atol=1e-5)
    model.set_adapter("b")
    _same(before, model)
    # a saved DoRA adapter whose file lacks a magnitude: refused before anything is added
    la.save_adapter(model, str(tmp_path / "save"))
    state = _files(tmp_path / "save" / "b")
    state.pop(next(k for k in state if k.endswith("lora_magnitude_vector")))
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "save" / "b" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not match this model: missing.*magnitude"):
        la.load_adapter(model, str(tmp_path / "save" / "b"), adapter_name="c")
    _same(before, model)
    # a new DoRA adapter on a merged model: its magnitude needs the unmerged base weight
    merged = _model(trained=True)
    la.merge_adapter(merged)
    before = _snapshot(merged)
    with pytest.raises(ValueError, match="default adapter is merged.*unmerge it first"):
        merged.add_adapter("c", la.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    _same(before, merged)
