"""Several active adapters with DoRA ones among them, as PEFT's LoraModel runs them: each
further DoRA adapter takes the output so far as its base result (without dropout
y ← c ⊙ (y − b + s·B A x) + b, so it rescales the earlier adapters' updates too; under dropout
y ← y + (c − 1) ⊙ D(x) Wᵀ + c ⊙ s·B A D(x), its own D of the layer's input). Checked against a
float64 formula (forward and every gradient, dropout on and off, a quantized base), PEFT's
logits and gradients in both orders, torch.compile, and `accelerate_peft`."""

from __future__ import annotations

import pytest
import torch
from test_multi_active import (
    BOTH,
    TOL,
    _accelerated_like_peft,
    _close_grad,
    _compiled_like_eager,
    _logits,
    _peft_name,
    _peft_twin,
    _two_adapters,
)
from tiny_models import count_calls, nf4_linear, tiny_batch

import llm_adapters as la
from llm_adapters import ops
from llm_adapters._numerics import dropout_threshold
from llm_adapters.layers import lora as lora_module
from llm_adapters.layers.lora import LoraBranch

K, N = 13, 11
F64 = dict(dtype=torch.float64)


def _layer64(dropout=0.0, seed=3):
    """A float64 layer: a plain LoRA default adapter, DoRA "b" and DoRA rsLoRA "c", the
    magnitudes moved off their init so that c ≠ 1."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(K, N, **F64)
    base.requires_grad_(False)
    layer = la.LoraLinear(base, 4, 8.0, lora_dropout=dropout, init_lora_weights=False)
    for name, r, alpha, rs in (("b", 2, 6.0, False), ("c", 3, 5.0, True)):
        br = LoraBranch(K, N, r, alpha, lora_dropout=dropout, use_rslora=rs,
                        init_lora_weights=False, factory=F64, use_dora=True)
        layer.init_branch_magnitude(br)
        with torch.no_grad():
            br.lora_magnitude_vector.mul_(1.0 + 0.3 * torch.rand(N, **F64))
        layer.add_branch(name, br)
    return layer


def _formula64(layer, x, active, w=None, keep=None):
    """PEFT's loop over the active adapters, in float64 from the parameters: y = base(x), then
    for each adapter LoRA y + s·B A D(x), DoRA y + (c − 1) ⊙ (y − b, or D(x) Wᵀ under
    dropout) + c ⊙ s·B A D(x), c = m / ‖W + s·B A‖ (detached). `keep[name]`: that adapter's
    scaled dropout mask (None: no dropout)."""
    base = layer.base_layer
    w = base.weight if w is None else w
    bias = base.bias
    y = base(x)
    for name in active:
        br = layer.branch(name)
        xd = x if keep is None else x * keep[name]
        lora = br.scaling * (xd @ br.lora_A.weight.t()) @ br.lora_B.weight.t()
        if not br.use_dora:
            y = y + lora
            continue
        wn = (w + br.scaling * br.lora_B.weight @ br.lora_A.weight).norm(dim=1).detach()
        c = br.lora_magnitude_vector / wn
        rest = (y - bias) if keep is None else xd @ w.t()
        y = y + (c - 1) * rest + c * lora
    return y


def _check_grads(layer, x, y, want, active):
    g = torch.randn_like(y)
    params = [p for name in active for p in layer.branch_parameters(name)]
    assert len(params) == sum(3 if layer.is_dora(n) else 2 for n in active)  # A, B (, m)
    got = torch.autograd.grad(y, [x, *params], g)
    ref = torch.autograd.grad(want, [x, *params], g)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, ref):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("active", [
    ["default", "b", "c"],  # LoRA first, two DoRA after it
    ["b", "default", "c"],  # DoRA first (the fused op), LoRA, then DoRA on both
    ["c", "b"],             # two DoRA adapters
])
def test_layer_matches_peft_formula_in_float64(active, monkeypatch):
    layer = _layer64()
    calls = count_calls(monkeypatch, lora_module, ("dora_add",))
    layer.active_adapter = active
    x = torch.randn(2, 5, K, **F64, requires_grad=True)
    y = layer(x)
    assert calls == ["dora_add"] * sum(layer.is_dora(n) for n in active[1:])
    _check_grads(layer, x, y, _formula64(layer, x, active), active)
    # the order matters: a later DoRA adapter rescales what came before it
    layer.active_adapter = active[::-1]
    other = layer(x)
    torch.testing.assert_close(other, _formula64(layer, x, active[::-1]), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(other, y)


def _seeded(monkeypatch, seeds):
    """Every further branch's op gets a seed recorded in `seeds` (as (p, seed), in call
    order); the first one's fused op too."""
    def wrap(holder, name):
        real = getattr(holder, name)

        def call(*a, dropout_p=0.0, seed=None, **kw):
            seed = ops.new_seed()
            seeds.append((dropout_p, seed))
            return real(*a, dropout_p=dropout_p, seed=seed, **kw)
        monkeypatch.setattr(holder, name, call)
    for holder, name in ((ops, "lora_linear"), (ops, "lora_add"), (ops, "dora_linear"),
                         (lora_module, "dora_add")):
        wrap(holder, name)


@pytest.mark.parametrize("active", [["default", "b", "c"], ["b", "c", "default"]])
def test_layer_under_dropout_matches_peft_formula_with_the_same_masks(active, monkeypatch):
    p = 0.3
    layer = _layer64(dropout=p).train()
    seeds = []
    _seeded(monkeypatch, seeds)
    layer.active_adapter = active
    x = torch.randn(3, 4, K, **F64, requires_grad=True)
    y = layer(x)
    assert [q for q, _ in seeds] == [p] * 3
    inv_keep = dropout_threshold(p)[1]
    keep = {  # each adapter its own mask of the layer's input
        name: ops.dropout_mask((12, K), p, seed, backend="torch").view(3, 4, K).double() * inv_keep
        for name, (_, seed) in zip(active, seeds)
    }
    assert not torch.equal(keep[active[0]], keep[active[1]])
    _check_grads(layer, x, y, _formula64(layer, x, active, keep=keep), active)


def test_quantized_base_with_a_dora_adapter_among_several():
    pytest.importorskip("bitsandbytes")
    base = nf4_linear()
    layer = la.LoraLinear(base, 4, 8.0, init_lora_weights=False)
    br = LoraBranch(72, 40, 2, 6.0, init_lora_weights=False, use_dora=True)
    layer.init_branch_magnitude(br)
    with torch.no_grad():
        br.lora_magnitude_vector.mul_(1.0 + 0.3 * torch.rand(40))
    layer.add_branch("other", br)
    w = layer._base_nk().float()  # the dequantized weight PEFT's DoRA reads
    x = torch.randn(3, 5, 72)
    with torch.no_grad():
        for active in (BOTH, BOTH[::-1]):
            layer.active_adapter = active
            torch.testing.assert_close(layer(x), _formula64(layer, x, active, w=w), **TOL)


def test_dora_among_several_compiles_in_one_graph_like_eager():
    layer = _layer64()
    layer.float()
    layer.active_adapter = ["default", "b", "c"]
    _compiled_like_eager(layer, torch.randn(2, 5, K, requires_grad=True), grad_atol=1e-5)


# ---- a model against PEFT -------------------------------------------------------------------
CASES = [  # (our default adapter's fields, the other's): DoRA default, DoRA other, both
    (dict(use_dora=True), None),
    (None, dict(use_dora=True)),
    (dict(use_dora=True), dict(use_dora=True, use_rslora=True)),
]


@pytest.mark.parametrize("default,other", CASES)
def test_peft_logits_and_gradients_in_both_orders(default, other):
    peft = pytest.importorskip("peft")
    model = _two_adapters(default=default, other=other)
    singles = []
    for name in BOTH:
        model.set_adapter(name)
        singles.append(_logits(model))
    batch = tiny_batch()
    for active in (BOTH, BOTH[::-1]):
        model.set_adapter(active)
        theirs = _peft_twin(model, peft, default=default, other=other, active=active)
        want = _logits(theirs.eval())
        got = _logits(model.eval())
        torch.testing.assert_close(got, want, **TOL)
        assert all(not torch.allclose(got, one, **TOL) for one in singles)
        model.zero_grad()
        model.train()(**batch).loss.backward()
        theirs.train()(**batch).loss.backward()
        grads = dict(theirs.named_parameters())
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert len(trained) == 16 + 4 * sum(bool(f) for f in (default, other))  # + m
        for n, p in trained:
            want_grad = grads[_peft_name(n)].grad
            assert float(want_grad.abs().max()) > 0, n
            _close_grad(p.grad, want_grad, n)
    # back to one adapter: exactly the single adapter's output again
    model.set_adapter("other")
    torch.testing.assert_close(_logits(model.eval()), singles[1], rtol=0, atol=0)


def test_merged_dora_default_unmerges_for_several_active():
    model = _two_adapters(default=dict(use_dora=True))
    model.set_adapter(BOTH)
    want = _logits(model)
    model.set_adapter("default")
    la.merge_adapter(model)
    with pytest.warns(UserWarning, match="unmerging"):
        model.set_adapter(BOTH)
    torch.testing.assert_close(_logits(model), want, **TOL)


def test_accelerate_peft_runs_dora_among_several_active_on_our_ops(monkeypatch):
    peft = pytest.importorskip("peft")
    default, other = dict(use_dora=True), dict(use_dora=True)
    theirs = _peft_twin(_two_adapters(default=default, other=other), peft, default=default,
                        other=other)
    # q_proj and o_proj hold one of the two, v_proj both: 6 fused calls, 2 added on them;
    # every adapter's A, B and magnitude in 8 layers train
    _accelerated_like_peft(theirs, monkeypatch, ("dora_linear", "dora_add"),
                           ["dora_add"] * 2 + ["dora_linear"] * 6, n_grads=16 + 8)
