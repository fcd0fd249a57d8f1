"""Several active LoRA adapters at once (PEFT's `set_adapter([...])`): every LoRA layer adds
the update of each active adapter it holds, their parameters train, the output and every
gradient match a float64 reference and PEFT's LoraModel; bad input is refused with the model
untouched; `accelerate_peft` runs a PEFT model with several active adapters on our ops."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from tiny_models import (
    adapter_state,
    assert_adapter_state,
    count_calls,
    nf4_linear,
    tiny_batch,
    tiny_model,
)

import llm_adapters as la
from llm_adapters import ops
from llm_adapters.layers.lora import LoraBranch
from llm_adapters.models.peft_interop import acceleration_report

DEFAULT = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
OTHER = dict(r=2, lora_alpha=6, target_modules=["v_proj", "o_proj"])  # overlaps on v_proj
BOTH = ["default", "other"]
TOL = dict(rtol=1e-5, atol=1e-5)


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _two_adapters(default=None, other=None):
    model = la.get_adapter_model(
        tiny_model("llama"), la.LoraConfig(**{**DEFAULT, **(default or {})})
    )
    model.add_adapter("other", la.LoraConfig(**{**OTHER, **(other or {})}))
    _perturb(model)
    return model


def _logits(model, batch=None):
    batch = batch or tiny_batch()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


_snapshot, _same = adapter_state, assert_adapter_state


def _peft_name(ours: str) -> str:
    """PEFT's name of our parameter (lora_A.<adapter>.weight, one more `model.`)."""
    name = "base_model.model." + ours[len("base_model."):]
    name = re.sub(r"lora_extra\.(\w+)\.lora_([AB])\.", r"lora_\2.\1.", name)
    name = re.sub(r"lora_extra\.(\w+)\.lora_magnitude_vector$", r"lora_magnitude_vector.\1.weight",
                  name)
    name = re.sub(r"lora_magnitude_vector$", "lora_magnitude_vector.default.weight", name)
    return re.sub(r"lora_([AB])\.weight$", r"lora_\1.default.weight", name)


def _peft_twin(model, peft, default=None, other=None, active=BOTH):
    """PEFT's LoraModel with `model`'s two adapters (same weights), `active` the active ones
    (both, in this order, unless told)."""
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        **{**DEFAULT, **(default or {})}, task_type="CAUSAL_LM"))
    theirs.add_adapter("other", peft.LoraConfig(**{**OTHER, **(other or {})},
                                                task_type="CAUSAL_LM"))
    mine = {_peft_name(n): p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(mine.pop(n))
    assert not mine
    theirs.base_model.set_adapter(active)  # PeftModel.set_adapter takes one name only
    return theirs.train(model.training)


def _close_grad(got, want, name):
    """float32 gradients of the same sum taken in another order: within 1e-5 of the largest."""
    scale = float(want.abs().max())
    assert scale > 0, name
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale, msg=name)


# ---- one layer against float64 ------------------------------------------------------------
def _layer64(k=13, n=11):
    torch.manual_seed(3)
    base = torch.nn.Linear(k, n, dtype=torch.float64)
    layer = la.LoraLinear(base, 4, 8.0, init_lora_weights=False)
    layer.add_branch("b", LoraBranch(k, n, 2, 6.0, init_lora_weights=False,
                                     factory=dict(dtype=torch.float64)))
    layer.add_branch("c", LoraBranch(k, n, 3, 5.0, use_rslora=True, init_lora_weights=False,
                                     factory=dict(dtype=torch.float64)))
    for p in base.parameters():
        p.requires_grad_(False)
    return layer


def test_layer_output_and_every_gradient_match_float64(monkeypatch):
    layer = _layer64()
    calls = count_calls(monkeypatch, ops, ("lora_linear", "lora_add"))
    x = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 11, dtype=torch.float64)
    active = ["c", "default", "b", "missing"]  # "missing": a name this layer lacks, skipped
    layer.active_adapter = active
    assert layer.active_adapters == active and layer.active_adapter == "c"
    y = layer(x)
    assert calls == ["lora_linear", "lora_add", "lora_add"]  # the first fused, others added
    params = [p for p in layer.parameters() if p.requires_grad]
    got = torch.autograd.grad(y, [x, *params], g)
    ref = layer.base_layer(x)
    for name in active[:3]:
        br = layer.branch(name)
        ref = ref + br.scaling * (x @ br.lora_A.weight.t()) @ br.lora_B.weight.t()
    assert layer.branch("c").scaling == pytest.approx(5.0 / math.sqrt(3))
    want = torch.autograd.grad(ref, [x, *params], g)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    layer.active_adapter = "b"  # back to one: that adapter alone
    br = layer.branch("b")
    alone = layer.base_layer(x) + br.scaling * (x @ br.lora_A.weight.t()) @ br.lora_B.weight.t()
    torch.testing.assert_close(layer(x), alone, rtol=1e-12, atol=1e-12)
    layer.active_adapter = ["missing"]
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one active adapter"):
        layer.active_adapter = []


def test_layer_dropout_per_branch_is_seeded_and_unbiased():
    layer = _layer64(k=16, n=8)
    layer.lora_dropout = 0.0
    layer.branch("b").lora_dropout = 0.5
    layer.active_adapter = ["default", "b"]
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        layer.eval()
        clean = layer(x)
        layer.train()
        torch.manual_seed(11)
        one = layer(x)
        torch.manual_seed(11)
        assert torch.equal(layer(x), one)  # reproducible under a seed
        assert not torch.allclose(one, clean)
        # E[D(x)] = x: over many masks the mean is the output without dropout
        mean = torch.stack([layer(x) for _ in range(2000)]).mean(0)
    br = layer.branch("b")
    spread = (br.scaling * (x @ br.lora_A.weight.t()) @ br.lora_B.weight.t()).abs().max()
    assert (mean - clean).abs().max() < 0.1 * spread


def test_two_active_adapters_compile_in_one_graph_like_eager():
    torch.manual_seed(0)
    base = torch.nn.Linear(13, 11)
    layer = la.LoraLinear(base, 4, 8.0, init_lora_weights=False)
    layer.add_branch("b", LoraBranch(13, 11, 2, 6.0, init_lora_weights=False))
    base.requires_grad_(False)
    layer.active_adapter = ["b", "default"]
    _compiled_like_eager(layer, torch.randn(2, 5, 13, requires_grad=True))


def _compiled_like_eager(layer, x, grad_atol=1e-6):
    """`layer` under torch.compile (fullgraph, aot_eager) gives eager's output and gradients
    (x and every trained parameter)."""
    def run(fn):
        y = fn(x)
        leaves = [x] + [p for p in layer.parameters() if p.requires_grad]
        return y, torch.autograd.grad(y.square().sum(), leaves)

    (y, grads), (want, want_grads) = run(
        torch.compile(layer, backend="aot_eager", fullgraph=True)), run(layer)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=grad_atol)


def test_quantized_base_with_two_active_adapters():
    pytest.importorskip("bitsandbytes")
    base = nf4_linear()
    layer = la.LoraLinear(base, 4, 8.0, init_lora_weights=False)
    layer.add_branch("other", LoraBranch(72, 40, 2, 6.0, init_lora_weights=False))
    layer.active_adapter = BOTH
    x = torch.randn(3, 5, 72)
    with torch.no_grad():
        want = base(x)
        for name in BOTH:
            br = layer.branch(name)
            want = want + br.scaling * (x @ br.lora_A.weight.t()) @ br.lora_B.weight.t()
        torch.testing.assert_close(layer(x), want, **TOL)


# ---- a model against PEFT -------------------------------------------------------------------
def test_two_active_adapters_give_peft_logits_and_the_single_ones_after(tmp_path):
    peft = pytest.importorskip("peft")
    model = _two_adapters()
    single = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        single[name] = _logits(model)
    model.set_adapter(BOTH)
    assert model.active_adapters == BOTH and model.active_adapter == BOTH
    theirs = _peft_twin(model, peft).eval()
    assert theirs.base_model.active_adapter == BOTH  # what PEFT's LoraModel returns too
    want = _logits(theirs)
    got = _logits(model)
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, single["default"], **TOL)
    assert not torch.allclose(got, single["other"], **TOL)
    # our save (both active) read by PEFT, both active there: the same logits
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    loaded.base_model.set_adapter(BOTH)
    torch.testing.assert_close(_logits(loaded), want, **TOL)
    # the other order: the same sum
    model.set_adapter(BOTH[::-1])
    assert model.active_adapter == BOTH[::-1]
    torch.testing.assert_close(_logits(model), want, **TOL)
    # back to one (a list of one is one name, as before)
    model.set_adapter(["other"])
    assert model.active_adapter == "other" and model.active_adapters == ["other"]
    torch.testing.assert_close(_logits(model), single["other"], rtol=0, atol=0)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model), single["default"], rtol=0, atol=0)


def test_both_active_adapters_train_with_peft_gradients():
    peft = pytest.importorskip("peft")
    model = _two_adapters()
    model.set_adapter(BOTH)
    theirs = _peft_twin(model, peft)
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora
    assert {_peft_name(n) for n in lora} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    batch = tiny_batch()
    model.train()(**batch).loss.backward()
    theirs.train()(**batch).loss.backward()
    grads = dict(theirs.named_parameters())
    for n, p in model.named_parameters():
        if n in lora:
            want = grads[_peft_name(n)].grad
            assert float(want.abs().max()) > 0, n
            _close_grad(p.grad, want, n)
        else:
            assert p.grad is None, n
    model.set_adapter(BOTH, inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_adapter(["other", "default"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora
    model.set_adapter("other")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in lora if ".lora_extra.other." in n
    }


def test_dropout_with_two_active_adapters_is_reproducible():
    model = _two_adapters(default=dict(lora_dropout=0.2), other=dict(lora_dropout=0.3))
    model.set_adapter(BOTH)
    batch = tiny_batch()
    clean = _logits(model.eval(), batch)
    model.train()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        out = model(**batch)
        out.loss.backward()
        runs.append((out.logits.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }))
        model.zero_grad()
    assert torch.equal(runs[0][0], runs[1][0]) and not torch.allclose(runs[0][0], clean)
    assert runs[0][1].keys() == runs[1][1].keys() and len(runs[0][1]) == 16
    assert all(torch.equal(g, runs[1][1][n]) for n, g in runs[0][1].items())
    torch.manual_seed(8)
    assert not torch.equal(_logits(model, batch), runs[0][0])  # another seed, other masks


def test_bad_input_is_refused_and_the_model_untouched():
    model = _two_adapters()
    model.set_adapter(BOTH)
    before = _snapshot(model)
    cases = [
        (lambda: model.set_adapter(["default", "nope"]), ValueError, "'nope' not found"),
        (lambda: model.set_adapter([]), ValueError, "at least one adapter name"),
        (lambda: model.set_adapter(["other", "default", "other"]), ValueError,
         r"\['other'\] named more than once"),
        (lambda: model.set_adapter(["default", 3]), ValueError, "3 not found"),
        (lambda: la.merge_adapter(model), RuntimeError,
         r"active adapters are \['default', 'other'\].*set_adapter\('default'\) first"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
        _same(before, model)


def test_merged_model_unmerges_deleting_disabling_adding_and_mixed_batches():
    model = _two_adapters()
    batch = tiny_batch()
    base = _logits(tiny_model("llama"), batch)
    model.set_adapter("other")
    want_other = _logits(model, batch)
    model.set_adapter(BOTH)
    want = _logits(model, batch)
    model.set_adapter("default")
    want_default = _logits(model, batch)
    la.merge_adapter(model)
    with pytest.warns(UserWarning, match="unmerging"):
        model.set_adapter(BOTH)
    assert not any(m.merged for m in model._lora_layers())
    torch.testing.assert_close(_logits(model, batch), want, **TOL)
    with model.disable_adapter():  # the base weight merged and unmerged: to rounding
        torch.testing.assert_close(_logits(model, batch), base, **TOL)
    torch.testing.assert_close(_logits(model, batch), want, **TOL)
    model.disable_adapters()
    torch.testing.assert_close(_logits(model, batch), base, **TOL)
    model.enable_adapters()
    # mixed batches: each row its own adapter, whatever is active
    model.eval()
    rows = ["other", "default"]
    with torch.no_grad():
        mixed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      adapter_names=rows).logits
    torch.testing.assert_close(mixed, torch.stack([want_other[0], want_default[1]]), **TOL)
    torch.testing.assert_close(_logits(model, batch), want, **TOL)
    # a new adapter: its layers follow the active list, it is inactive and frozen
    model.add_adapter("third", la.LoraConfig(r=3, target_modules=["k_proj", "v_proj"]))
    assert model.active_adapters == BOTH
    assert all(m.active_adapters == BOTH for m in model._lora_layers())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".third." in n)
    torch.testing.assert_close(_logits(model, batch), want, **TOL)
    model.delete_adapter("third")
    # deleting one of several active: the others stay active, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.delete_adapter("other")
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert all(m.active_adapters == ["default"] for m in model._lora_layers())
    torch.testing.assert_close(_logits(model, batch), want_default, **TOL)


# ---- accelerate_peft ----------------------------------------------------------------------
def _accelerate(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.accelerate_peft(model)
    return acceleration_report(model), " ".join(str(w.message) for w in caught)


def _accelerated_like_peft(theirs, monkeypatch, counted, want_calls, n_grads):
    """accelerate_peft on PEFT's model `theirs` (q_proj, v_proj, o_proj adapted in 2 layers):
    every layer on our ops, the `counted` ops called as `want_calls` (in any order), logits
    and the `n_grads` adapter gradients as PEFT's; restored after."""
    batch = tiny_batch()
    want = _logits(theirs.eval(), batch)
    theirs.train()(**batch).loss.backward()
    want_grads = {n: p.grad.clone() for n, p in theirs.named_parameters() if p.grad is not None}
    assert len(want_grads) == n_grads
    theirs.zero_grad()
    report, message = _accelerate(theirs)
    assert len(report.accelerated) == 6 and not report.left_on_peft and not message
    assert theirs.base_model.active_adapters == BOTH
    calls = count_calls(monkeypatch, ops, counted)
    torch.testing.assert_close(_logits(theirs.eval(), batch), want, **TOL)
    assert sorted(calls) == sorted(want_calls)
    theirs.train()(**batch).loss.backward()
    for n, p in theirs.named_parameters():
        if n in want_grads:
            _close_grad(p.grad, want_grads[n], n)
    la.restore_peft(theirs)


def test_accelerate_peft_runs_two_active_adapters_on_our_ops(monkeypatch):
    peft = pytest.importorskip("peft")
    # q_proj and o_proj hold one of the two, v_proj both: 6 fused calls, 2 added branches
    _accelerated_like_peft(_peft_twin(_two_adapters(), peft), monkeypatch,
                           ("lora_linear", "lora_add"),
                           ["lora_add"] * 2 + ["lora_linear"] * 6, n_grads=16)
