"""DoRA (`LoraConfig(use_dora=True)`): the op against a float64 reference of PEFT's formula,
forward and every gradient, with and without dropout, on the torch backend and the Triton
kernels (interpreter); the layer and PEFT's file format both ways on tiny llama and gpt2;
merge / unmerge; bad input.
"""

import warnings

import pytest
import torch
from tiny_models import nf4_linear, perturb, tiny_batch, tiny_model

import llm_adapters as la
from llm_adapters import ops
from llm_adapters._numerics import dropout_threshold
from llm_adapters.bench import parity
from llm_adapters.ops.dora import dora_weight_norm, weight_row_norm_sq

peft = pytest.importorskip("peft")

NAMES = ("x", "lora_a", "lora_b", "magnitude", "bias")


def peft_dora_reference(x, weight, bias, lora_a, lora_b, magnitude, scaling, keep=None,
                        inv_keep=1.0):
    """PEFT 0.21's DoRA Linear forward, written plainly in x's dtype (the magnitude in its own):
    base(x) + (c − 1)·base_result + c·s·B A D(x), with base_result the base output less its bias
    without dropout and D(x) Wᵀ with it; c = m / ‖W + s·B A‖ (detached)."""
    dt = x.dtype
    w, a, b = weight.to(dt), lora_a.to(dt), lora_b.to(dt)
    x2 = x.reshape(-1, x.shape[-1])
    weight_norm = torch.linalg.norm(w + scaling * (b @ a), dim=1).detach()
    c = magnitude / weight_norm
    base = x2 @ w.t() + (0 if bias is None else bias)
    xd = x2 if keep is None else x2 * keep.to(dt) * inv_keep
    base_result = base - (0 if bias is None else bias) if keep is None else xd @ w.t()
    y = base + (c - 1) * base_result + c * (scaling * ((xd @ a.t()) @ b.t()))
    return y.to(dt).reshape(*x.shape[:-1], -1)


def _inputs(m, k, n, r, dtype, lead=(), bias=True, transposed=False):
    g = torch.Generator().manual_seed(m * 1000 + k + n + r)
    w = torch.randn(n, k, generator=g) / k**0.5
    if transposed:  # GPT-2 Conv1D stores [K, N]; the op sees its transposed view
        w = w.t().contiguous().t()
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) * 0.3
    mag = torch.linalg.norm(w + 0.7 * b @ a, dim=1) * (1 + 0.3 * torch.randn(n, generator=g))
    return {
        "x": torch.randn(*lead, m, k, generator=g).to(dtype),
        "weight": w.to(dtype),
        "bias": (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None,
        "lora_a": a, "lora_b": b, "magnitude": mag,  # adapter weights float32, as the layer's
    }


def _leaves(t, dtype=None):
    out = {}
    for name, v in t.items():
        if v is None:
            out[name] = None
            continue
        v = v.detach()
        if dtype is not None:
            v = v.to(dtype)
        if name == "weight":
            out[name] = v
        else:
            out[name] = v.requires_grad_()
    return out


def _grads(y, lv, g):
    names = [n for n in NAMES if lv[n] is not None]
    got = torch.autograd.grad(y, [lv[n] for n in names], g.to(y.dtype))
    return dict(zip(names, got, strict=True))


def _floor(dtype):
    return torch.finfo(dtype).eps if dtype != torch.float32 else 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("backend,m,k,n,r,dtype,p,lead,transposed,bias", [
    ("torch", 7, 24, 40, 1, torch.float32, 0.0, (), False, True),
    ("torch", 13, 24, 40, 5, torch.float32, 0.25, (), False, True),
    ("torch", 7, 24, 40, 5, torch.float32, 0.1, (2,), True, False),  # 3-D x, Conv1D view
    ("torch", 13, 24, 40, 5, torch.float16, 0.0, (), False, True),
    ("triton", 7, 24, 40, 5, torch.float32, 0.0, (), False, True),
    ("triton", 13, 24, 40, 1, torch.float32, 0.25, (), True, True),
    ("triton", 7, 24, 40, 5, torch.float16, 0.25, (), False, True),
])
def test_dora_op_matches_float64_peft_formula(backend, m, k, n, r, dtype, p, lead, transposed,
                                              bias):
    t = _inputs(m, k, n, r, dtype, lead, bias, transposed)
    s, seed = 0.7, 4321
    rows = t["x"].numel() // k
    keep = ops.dropout_mask((rows, k), p, seed, backend=backend) if p else None
    inv = dropout_threshold(p)[1] if p else 1.0
    g = torch.randn(*lead, m, n).to(dtype)

    lv = _leaves(t)
    y = ops.dora_linear(lv["x"], lv["weight"], lv["bias"], lv["lora_a"], lv["lora_b"],
                        lv["magnitude"], scaling=s, dropout_p=p, seed=seed, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, m, n)
    ours = _grads(y, lv, g)
    ref_lv = _leaves(t, torch.float64)
    y_ref = peft_dora_reference(**ref_lv, scaling=s, keep=keep, inv_keep=inv)
    refs = _grads(y_ref, ref_lv, g.double())
    same_lv = _leaves(t)
    y_same = peft_dora_reference(**same_lv, scaling=s, keep=keep, inv_keep=inv)
    sames = _grads(y_same, same_lv, g)

    floor = _floor(dtype)
    parity.assert_parity("y", y, y_ref, y_same, rel_floor=floor, check_dtype=True)
    for name in ours:
        mag = None
        if name == "magnitude":  # dm = Σ_rows g ⊙ T / wn cancels: floor at Σ |terms|
            u = (y_ref - ref_lv["bias"] if bias else y_ref).detach().reshape(-1, n)
            wn = torch.linalg.norm(ref_lv["weight"] + s * ref_lv["lora_b"] @ ref_lv["lora_a"],
                                   dim=1)
            mag = ((g.double().reshape(-1, n) * u).abs().sum(0) / wn).max().item()
        parity.assert_parity(f"d{name}", ours[name], refs[name], sames[name],
                             rel_floor=floor, magnitude=mag)
        assert ours[name].dtype == t[name].dtype, name


@pytest.mark.parametrize("backend,dtype,p,bias", [
    ("torch", torch.float32, 0.0, True),
    ("torch", torch.float32, 0.25, False),
    ("triton", torch.float32, 0.25, True),
    ("triton", torch.float16, 0.0, True),
])
def test_dora_add_matches_float64_peft_formula(backend, dtype, p, bias):
    """dora_add on a base output y0 = x Wᵀ + b computed outside: PEFT's formula on W in
    float64, forward and the gradients of x (through y0 and the branch), A, B and m."""
    from llm_adapters.ops.dora import dora_add

    m, k, n, r, s, seed = 11, 24, 40, 5, 0.7, 77
    t = _inputs(m, k, n, r, dtype, bias=bias)
    keep = ops.dropout_mask((m, k), p, seed, backend=backend) if p else None
    inv = dropout_threshold(p)[1] if p else 1.0
    g = torch.randn(m, n).to(dtype)

    def run(lv, ref):
        if ref:
            return peft_dora_reference(**lv, scaling=s, keep=keep, inv_keep=inv)
        y0 = lv["x"] @ lv["weight"].t() + (0 if lv["bias"] is None else lv["bias"])
        return dora_add(y0, lv["x"], lv["weight"], lv["bias"], lv["lora_a"], lv["lora_b"],
                        lv["magnitude"], s, dropout_p=p, seed=seed, backend=backend)

    names = ("x", "lora_a", "lora_b", "magnitude")
    results = []
    for dt, ref in ((None, False), (torch.float64, True), (None, True)):
        lv = _leaves(t, dt)
        if lv["bias"] is not None:
            lv["bias"] = lv["bias"].detach()  # a frozen base's bias
        y = run(lv, ref)
        gy = g.to(y.dtype)
        results.append((y, torch.autograd.grad(y, [lv[n_] for n_ in names], gy)))
    (y, ours), (y_ref, refs), (y_same, sames) = results
    floor = _floor(dtype)
    parity.assert_parity("y", y, y_ref, y_same, rel_floor=floor, check_dtype=True)
    for name, o, rf, sm in zip(names, ours, refs, sames, strict=True):
        mag = None
        if name == "magnitude":
            wn = torch.linalg.norm(t["weight"].double() + s * t["lora_b"].double()
                                   @ t["lora_a"].double(), dim=1)
            mag = ((g.double() * y_ref.detach()).abs().sum(0) / wn).max().item() * 2
        parity.assert_parity(f"d{name}", o, rf, sm, rel_floor=floor, magnitude=mag)


def test_dora_custom_ops_pass_opcheck_and_compile_like_eager():
    """The "dora" and "dora_add" custom ops (schema, fake tensors, autograd registration) on
    the torch backend, T kept and not; and dora_linear under torch.compile(fullgraph) gives
    eager's output and gradients, dropout included."""
    from torch.library import opcheck

    from llm_adapters.ops._custom import bound_op
    from llm_adapters.ops._dispatch import resolve_backend

    impl = resolve_backend("dora", torch.device("cpu"), "torch")
    x = torch.randn(5, 8, requires_grad=True)
    a = torch.randn(3, 8, requires_grad=True)
    b = torch.randn(6, 3, requires_grad=True)
    c = torch.rand(6, requires_grad=True)
    for save_t, p in ((True, 0.2), (False, 0.0)):
        c = c.detach().requires_grad_(save_t)  # without T the column scale has no gradient
        opcheck(bound_op("dora", impl).custom,
                (x, torch.randn(6, 8), torch.randn(6), a, b, c, 2.0, p, torch.tensor(4), save_t))
        opcheck(bound_op("dora_add", impl).custom,
                (x, torch.randn(5, 6, requires_grad=True), a, b, torch.randn(6), c, 2.0, p,
                 torch.tensor(4), save_t))

    t = _inputs(4, 8, 6, 3, torch.float32, lead=(2,))
    lv = _leaves(t)

    def f(x, a, b, m):
        return (ops.dora_linear(x, t["weight"], t["bias"], a, b, m, scaling=0.5, dropout_p=0.1,
                                seed=3, backend="torch") ** 2).sum()

    leaves = (lv["x"], lv["lora_a"], lv["lora_b"], lv["magnitude"])
    eager = torch.autograd.grad(f(*leaves), leaves)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for gc_, ge in zip(got, eager, strict=True):
        torch.testing.assert_close(gc_, ge)


def test_dora_op_without_x_grad_and_norm_formula():
    t = _inputs(7, 24, 40, 5, torch.float64)
    w, a, b = t["weight"], t["lora_a"].double(), t["lora_b"].double()
    direct = torch.linalg.norm(w + 0.7 * b @ a, dim=1)
    torch.testing.assert_close(dora_weight_norm(w, a, b, 0.7), direct, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        dora_weight_norm(w, a, b, 0.7, weight_row_norm_sq(w)), direct, rtol=1e-12, atol=0)
    mag = t["magnitude"].double().requires_grad_()
    y = ops.dora_linear(t["x"].double(), w, None, a, b, mag, 0.7, backend="torch")
    (dm,) = torch.autograd.grad(y.sum(), [mag])
    assert dm.shape == (40,) and torch.isfinite(dm).all()


@pytest.mark.parametrize("add", [False, True], ids=["dora_linear", "dora_add"])
def test_dropout_saves_no_mask_for_backward(add):
    """Under dropout the correction term draws the keep-mask again in backward instead of
    holding a bool [M, K] tensor per layer: the one mask saved is the torch backend's own (its
    shrink keeps it, as its LoRA does; the kernels keep none), nothing else [M, K] but x."""
    t = _inputs(9, 24, 40, 5, torch.float32)
    x = t["x"].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        if add:
            y0 = torch.addmm(t["bias"], x, t["weight"].t())  # base(x), as a layer's
            y = ops.dora_add(y0, x, t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                             t["magnitude"], 0.7, dropout_p=0.3, seed=5, backend="torch")
        else:
            y = ops.dora_linear(x, t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                                t["magnitude"], 0.7, dropout_p=0.3, seed=5, backend="torch")
    masks = [s for s in saved if s.dtype == torch.bool]
    assert len(masks) == 1 and masks[0].shape == x.shape
    assert all(s.data_ptr() == x.data_ptr() or s is masks[0] or s.shape != x.shape
               for s in saved)  # x itself (as a view of it), the mask, smaller tensors
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, [x], g)
    # the same gradient as the float64 formula with the mask the seed gives
    keep = ops.dropout_mask((9, 24), 0.3, 5, backend="torch")
    x64 = x.detach().double().requires_grad_()
    ref = peft_dora_reference(x64, t["weight"].double(), t["bias"].double(),
                              t["lora_a"].double(), t["lora_b"].double(),
                              t["magnitude"].double(), 0.7, keep, dropout_threshold(0.3)[1])
    (want,) = torch.autograd.grad(ref, [x64], g.double())
    torch.testing.assert_close(dx.double(), want, rtol=1e-4, atol=1e-5)


def test_dora_op_bad_input_names_the_problem():
    t = _inputs(7, 24, 40, 5, torch.float32)
    args = dict(x=t["x"], weight=t["weight"], bias=t["bias"], lora_a=t["lora_a"],
                lora_b=t["lora_b"], magnitude=t["magnitude"])
    cases = [
        (dict(magnitude=torch.ones(39)), ValueError, "magnitude has shape"),
        (dict(lora_b=torch.ones(40, 4)), ValueError, "lora_b has shape"),
        (dict(weight=torch.ones(40, 23)), ValueError, "x has 24 features"),
        (dict(bias=torch.ones(40, dtype=torch.float64)), TypeError, "bias dtype"),
        (dict(magnitude=torch.ones(40, dtype=torch.long)), TypeError, "magnitude has dtype"),
    ]
    for change, exc, match in cases:
        with pytest.raises(exc, match=match):
            ops.dora_linear(**{**args, **change}, scaling=2.0, backend="torch")
    with pytest.raises(TypeError, match="scaling must be a float"):
        ops.dora_linear(**args, scaling=torch.tensor(2.0), backend="torch")
    with pytest.raises(ValueError, match="dropout_p"):
        ops.dora_linear(**args, scaling=2.0, dropout_p=1.0, backend="torch")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.dora_linear(**args, scaling=2.0, backend="nope")
    frozen = t["weight"].clone().requires_grad_()
    with pytest.raises(ValueError, match="frozen"):
        ops.dora_linear(**{**args, "weight": frozen}, scaling=2.0, backend="torch")


# ---- the layer, and PEFT's format both ways --------------------------------------------------
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_proj"]}


def _logits(model):
    with torch.no_grad():
        return model(**tiny_batch()).logits


def _config(family, **fields):
    return dict(r=4, lora_alpha=8, target_modules=TARGETS[family], use_dora=True,
                task_type="CAUSAL_LM", **fields)


def _file_keys(path):
    from safetensors.torch import load_file

    return set(load_file(str(path / "adapter_model.safetensors")))


@pytest.mark.parametrize("family,rslora", [("llama", False), ("llama", True), ("gpt2", True)])
def test_peft_dora_adapter_loads_with_equal_logits_and_back(family, rslora, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        theirs = peft.get_peft_model(tiny_model(family),
                                     peft.LoraConfig(**_config(family, use_rslora=rslora)))
    perturb(theirs)
    theirs.eval()
    want = _logits(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    keys = _file_keys(tmp_path / "peft")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    ours = la.load_adapter(tiny_model(family), str(tmp_path / "peft"))
    torch.testing.assert_close(_logits(ours), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(tiny_model(family)), want, atol=1e-3)
    # and ours written back: the same keys as PEFT's file, PEFT reads it with equal logits
    la.save_adapter(ours, str(tmp_path / "ours"))
    assert _file_keys(tmp_path / "ours") == keys
    again = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(again), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_our_dora_adapter_loads_in_peft_and_trains_like_it(family, tmp_path):
    fields = _config(family, init_lora_weights=False)  # B random: m = ‖W + s·B A‖ ≠ ‖W‖
    ours = la.get_adapter_model(tiny_model(family), la.LoraConfig(**fields))
    mine = {n.removeprefix("base_model."): p for n, p in ours.named_parameters()
            if p.requires_grad}
    # the initial magnitude is what PEFT's own DoRA initialisation gives for these A, B
    from peft.tuners.lora.dora import DoraLinearLayer

    layers = [m for m in ours.modules() if isinstance(m, la.layers.LoraLinear)]
    for layer in layers:
        theirs_init = DoraLinearLayer(fan_in_fan_out=layer.fan_in_fan_out)
        theirs_init.update_layer(base_layer=layer.base_layer, lora_A=layer.lora_A.weight,
                                 lora_B=layer.lora_B.weight, scaling=layer.scaling)
        torch.testing.assert_close(layer.lora_magnitude_vector, theirs_init.weight,
                                   rtol=1e-6, atol=1e-6)
    # training step, dropout inactive: every adapter gradient as PEFT's
    perturb(ours, seed=3)
    la.save_adapter(ours, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path),
                                                is_trainable=True)
    ours.train()
    theirs.train()
    for model in (ours, theirs):  # gpt2's own dropouts draw the same masks in both
        torch.manual_seed(5)
        model(**tiny_batch()).loss.backward()
    theirs_grads = {n.removeprefix("base_model.model.").replace(".default", "")
                    .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(theirs_grads) == set(mine)
    for n, p in mine.items():
        torch.testing.assert_close(p.grad, theirs_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_dora_init_is_the_base_model_and_merge_unmerge_round_trip():
    base_logits = _logits(tiny_model("gpt2"))
    model = la.get_adapter_model(tiny_model("gpt2"), la.LoraConfig(**_config("gpt2")))
    torch.testing.assert_close(_logits(model), base_logits, rtol=1e-6, atol=1e-6)
    perturb(model)
    want = _logits(model)
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    w0 = layer.base_layer.weight.detach().clone()
    la.merge_adapter(model)
    assert layer.merged and not torch.allclose(layer.base_layer.weight, w0)
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
    la.unmerge_adapter(model)
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
    merged = la.unload_adapter(model, merge=True)
    torch.testing.assert_close(_logits(merged), want, rtol=1e-5, atol=1e-5)


def test_weight_norm_cache_follows_the_base_weight():
    model = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(**_config("llama")))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight
    first = layer._weight_norm_sq(w)
    assert layer._weight_norm_sq(w) is first  # cached
    with torch.no_grad():
        w.mul_(2.0)  # an in-place change bumps the version counter
    second = layer._weight_norm_sq(w)
    torch.testing.assert_close(second, 4 * first)
    perturb(model)
    x = torch.randn(3, 32)
    ref = peft_dora_reference(x, w, None, layer.lora_A.weight, layer.lora_B.weight,
                              layer.lora_magnitude_vector, layer.scaling)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)


def test_dora_bad_configs_leave_the_model_untouched(tmp_path):
    with pytest.raises(ValueError, match="use_dora"):
        la.LoraConfig(use_dora="yes")
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="embed_tokens"):
        la.get_adapter_model(model, la.LoraConfig(target_modules=["embed_tokens"], use_dora=True))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, la.layers.LoraLinear) for m in model.modules())
    ours = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(**_config("llama")))
    with pytest.raises(ValueError, match="llm-adapters.*DoRA"):
        la.save_adapter(ours, str(tmp_path / "x"), format="llm-adapters")
    assert not (tmp_path / "x").exists()


def _bnb4_layer(k=72, n=40):
    """A DoRA LoraLinear on a bitsandbytes NF4 base with a bias; trained-looking weights."""
    pytest.importorskip("bitsandbytes")
    layer = la.layers.LoraLinear(nf4_linear(k, n), r=5, lora_alpha=10, lora_dropout=0.25,
                                 use_dora=True)
    perturb(layer)
    return layer


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_dora_on_a_quantized_base_matches_peft_formula_on_the_dequantized_weight(p):
    """PEFT runs DoRA on bitsandbytes bases with the layer's own product and the dequantized
    weight for the norms (and for D(x) Wᵀ under dropout); so do we. The reference is float64
    on the dequantized weight; the tolerance is the base product's own quantized-vs-float64
    error, times the largest column scale, plus a float32 floor."""
    from llm_adapters.layers._quant import dequantized_weight
    from llm_adapters.ops.dora import dora_add

    layer = _bnb4_layer()
    base = layer.base_layer
    w = dequantized_weight(base, layer.quant)
    x = torch.randn(13, 72, requires_grad=True)
    seed = 99
    y0 = base(x)
    y = dora_add(y0, x, w, base.bias, layer.lora_A.weight, layer.lora_B.weight,
                 layer.lora_magnitude_vector, layer.scaling, dropout_p=p, seed=seed)
    if p == 0:  # the layer's own forward (eval) is this
        layer.eval()
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    g = torch.randn(13, 40)
    names = ("x", "lora_a", "lora_b", "magnitude")
    leaves = (x, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector)
    ours = torch.autograd.grad(y, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    keep = ops.dropout_mask((13, 72), p, seed, backend="torch") if p else None
    inv = dropout_threshold(p)[1] if p else 1.0
    y_ref = peft_dora_reference(ref_leaves[0], w.double(), base.bias.double(), ref_leaves[1],
                                ref_leaves[2], ref_leaves[3], layer.scaling, keep, inv)
    refs = torch.autograd.grad(y_ref, ref_leaves, g.double())
    base_err = (y0.detach().double() - (x.double() @ w.double().t() + base.bias.double()))
    c = layer.lora_magnitude_vector.double() / torch.linalg.norm(
        w.double() + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double(),
        dim=1)
    tol = 4 * base_err.abs().max().item() * max(c.abs().max().item(), 1.0)
    tol += 1e-5 * y_ref.abs().max().item()
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=tol)
    for name, got, ref in zip(names, ours, refs, strict=True):
        floor = 1e-5 * ref.abs().max().item() + 1e-6
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=floor, msg=name)


def test_dora_merge_on_a_quantized_base_requantizes_with_a_warning():
    """The merged base holds c ⊙ (W + s·B A) quantized in the base's own format: its
    dequantized weight is exactly what bitsandbytes makes of that float weight."""
    bnb = pytest.importorskip("bitsandbytes")
    from llm_adapters.layers._quant import dequantized_weight

    layer = _bnb4_layer().eval()
    w = dequantized_weight(layer.base_layer, layer.quant).double()
    a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    w_new = w + layer.scaling * b @ a
    w_new = (layer.lora_magnitude_vector.double() / torch.linalg.norm(w_new, dim=1))[:, None] * (
        w_new)
    q = bnb.nn.Params4bit(w_new.float(), requires_grad=False, quant_type="nf4").to("cpu")
    expected = bnb.functional.dequantize_4bit(q.data, q.quant_state)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    assert layer.merged and type(layer.base_layer.weight).__name__ == "Params4bit"
    got = dequantized_weight(layer.base_layer, layer.quant)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    x = torch.randn(5, 72)
    torch.testing.assert_close(layer(x), x @ got.t() + layer.base_layer.bias, rtol=1e-5,
                               atol=1e-5)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.unmerge()
    assert not layer.merged and layer._merged_norm is None
