"""Every name of transformers' ACT2FN as the adapters' non-linearity, as LLM-Adapters accepts it.

The fused names (and their aliases) run on the kernels; every other name runs on the torch
backend with transformers' module and autograd. Each is checked against a float64 reference
written here with ACT2FN itself (forward and every gradient, dropout on, the exact keep-mask),
aliases are checked to be the fused function, and a backend that lacks an activation says so.
The bottleneck initialisations (LLM-Adapters' bert and mam_adapter, our zero_up) are here too.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2CLS, ACT2FN

from llm_adapters import BottleneckConfig, ops
from llm_adapters._numerics import ACTIVATION_ALIASES, dropout_threshold
from llm_adapters.bench import parity
from llm_adapters.layers.bottleneck import BottleneckAdapter, init_bottleneck
from llm_adapters.ops import _dispatch

NAMES = sorted(ACT2CLS)
F64, F32 = torch.float64, torch.float32
P = 0.25
SEED = 7
# a few float32 roundings at the result's magnitude: the fused order (mask by torch.where,
# dropout scale after the GEMM) rounds differently from the plain reference
FLOOR = 8 * torch.finfo(torch.float32).eps


def _act_reference(name):
    """φ = transformers' ACT2FN[name], a fresh instance (parameters of prelu / xielu at their
    initial values, as LLM-Adapters leaves them: it trains only `adapter_*` parameters)."""
    module = ACT2FN[name]
    if name == "prelu":
        return lambda s: F.prelu(s, module.weight.detach().to(s.dtype))
    return lambda s: module(s)


def _branch(phi, x, down, up, down_bias, keep, inv_keep):
    dt = x.dtype
    return phi((x * keep.to(dt) * inv_keep) @ down.to(dt).t() + down_bias.to(dt)) @ up.to(dt).t()


def _series_ref(phi, h, down, up, down_bias, up_bias, scale, keep, inv_keep):
    branch = _branch(phi, h, down, up, down_bias, keep, inv_keep)
    return h + scale.to(h.dtype) * branch + up_bias.to(h.dtype)


def _lora_ref(phi, x, weight, down, up, down_bias, up_bias, scale, keep, inv_keep):
    branch = _branch(phi, x, down, up, down_bias, keep, inv_keep)
    return x @ weight.to(x.dtype).t() + scale.to(x.dtype) * branch + up_bias.to(x.dtype)


def _scale_magnitude(phi, g, x, down, up, down_bias, keep, inv_keep):
    """Σ |g ⊙ branch|: the size of the terms d(scale) sums (the result itself may cancel)."""
    branch = _branch(phi, x.double(), down.double(), up.double(), down_bias.double(), keep,
                     inv_keep)
    return (g.double() * branch).abs().sum().item()


def _check(name, got, want64, same32, grads, grads64, grads32):
    parity.assert_parity(f"{name} out", got, want64, same32, rel_floor=FLOOR)
    for key in grads64:
        mag = None
        if key == "scale":  # one scalar summed over every element: its terms' magnitude
            mag = grads64["scale_terms"]
        if key == "scale_terms":
            continue
        parity.assert_parity(f"{name} d{key}", grads[key], grads64[key], grads32[key],
                             rel_floor=FLOOR, magnitude=mag)


def _inputs(*shapes):
    return [torch.randn(*s, dtype=F32) * 0.7 for s in shapes]


@pytest.mark.parametrize("name", NAMES)
def test_series_every_act2fn_name_on_torch(name):
    m, n, r = 9, 10, 3
    h, down, up, db, ub = _inputs((m, n), (r, n), (n, r), (r,), (n,))
    scale = torch.tensor(0.8)
    keep = ops.dropout_mask((m, n), P, SEED, backend="torch")
    _, inv_keep = dropout_threshold(P)
    g = torch.randn(m, n)
    leaves = dict(h=h, down=down, up=up, down_bias=db, up_bias=ub, scale=scale)
    ours = parity.leaves(leaves, wrt=list(leaves))
    z = ops.series_adapter(
        ours["h"], ours["down"], ours["up"], scaling=ours["scale"], activation=name,
        dropout_p=P, seed=SEED, down_bias=ours["down_bias"], up_bias=ours["up_bias"],
        backend="torch",
    )
    grads = dict(zip(leaves, torch.autograd.grad(z, list(ours.values()), g)))
    phi = _act_reference(name)

    def ref(dtype):
        t = parity.leaves(leaves, dtype, list(leaves))
        out = _series_ref(phi, t["h"], t["down"], t["up"], t["down_bias"], t["up_bias"],
                          t["scale"], keep, inv_keep)
        return out, dict(zip(leaves, torch.autograd.grad(out, list(t.values()), g.to(dtype))))

    want64, grads64 = ref(F64)
    same32, grads32 = ref(F32)
    grads64["scale_terms"] = _scale_magnitude(phi, g, h, down, up, db, keep, inv_keep)
    assert z.dtype == F32 and grads["down"].dtype == F32
    _check(name, z, want64, same32, grads, grads64, grads32)


@pytest.mark.parametrize("name", NAMES)
def test_parallel_every_act2fn_name_on_torch(name):
    m, k, n, r = 7, 9, 11, 3
    x, w, down, up, db, ub = _inputs((m, k), (n, k), (r, k), (n, r), (r,), (n,))
    scale = torch.tensor(1.3)
    keep = ops.dropout_mask((m, k), P, SEED, backend="torch")
    _, inv_keep = dropout_threshold(P)
    g = torch.randn(m, n)
    leaves = dict(x=x, down=down, up=up, down_bias=db, up_bias=ub, scale=scale)
    ours = parity.leaves(leaves, wrt=list(leaves))
    y = ops.lora_linear(
        ours["x"], w, None, ours["down"], ours["up"], scaling=ours["scale"], activation=name,
        dropout_p=P, seed=SEED, lora_a_bias=ours["down_bias"], lora_b_bias=ours["up_bias"],
        backend="torch",
    )
    grads = dict(zip(leaves, torch.autograd.grad(y, list(ours.values()), g)))
    phi = _act_reference(name)

    def ref(dtype):
        t = parity.leaves(leaves, dtype, list(leaves))
        out = _lora_ref(phi, t["x"], w, t["down"], t["up"], t["down_bias"], t["up_bias"],
                        t["scale"], keep, inv_keep)
        return out, dict(zip(leaves, torch.autograd.grad(out, list(t.values()), g.to(dtype))))

    want64, grads64 = ref(F64)
    same32, grads32 = ref(F32)
    grads64["scale_terms"] = _scale_magnitude(phi, g, x, down, up, db, keep, inv_keep)
    _check(name, y, want64, same32, grads, grads64, grads32)


def test_the_check_can_fail():
    # the reference of another activation must fail the same comparison
    m, n, r = 9, 10, 3
    h, down, up = _inputs((m, n), (r, n), (n, r))
    z = ops.series_adapter(h, down, up, activation="mish", backend="torch")
    zeros_r, zeros_n = torch.zeros(r), torch.zeros(n)
    keep = torch.ones(m, n, dtype=torch.bool)
    args = (down, up, zeros_r, zeros_n, torch.tensor(1.0), keep, 1.0)
    want64 = _series_ref(_act_reference("gelu_new"), h.double(), *args)
    same32 = _series_ref(_act_reference("gelu_new"), h, *args)
    with pytest.raises(AssertionError, match="max error"):
        parity.assert_parity("mish vs gelu_new", z, want64, same32, rel_floor=FLOOR)


# ---- aliases: the same function as the fused code --------------------------------------------
@pytest.mark.parametrize("alias", sorted(ACTIVATION_ALIASES))
def test_alias_is_the_fused_function(alias):
    fused = ACTIVATION_ALIASES[alias]
    s = torch.linspace(-8, 8, 2001, dtype=F64, requires_grad=True)
    theirs, ours = ACT2FN[alias](s), parity.ACTIVATION_FNS[fused](s)
    torch.testing.assert_close(theirs, ours, rtol=1e-15, atol=1e-15)
    d_theirs, d_ours = (torch.autograd.grad(t.sum(), s)[0] for t in (theirs, ours))
    torch.testing.assert_close(d_theirs, d_ours, rtol=1e-14, atol=1e-14)
    assert ops.canonical_activation(alias) == fused


@pytest.mark.parametrize("name", ["gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh",
                                  "gelu_fast", "gelu_accurate", "quick_gelu"])
def test_gelu_approximations_are_not_erf_gelu(name):
    # why they are no alias of the fused (erf) gelu: they differ by far more than rounding
    s = torch.linspace(-4, 4, 801, dtype=F64)
    assert (ACT2FN[name](s) - F.gelu(s)).abs().max() > 1e-5
    assert ops.canonical_activation(name) == name


def test_aliases_run_the_fused_triton_kernel():
    # TRITON_INTERPRET=1 (conftest, no GPU): "swish" and "linear" reach the kernels as silu and
    # identity, with the same result bit for bit
    m, n, r = 33, 24, 5
    h, down, up = _inputs((m, n), (r, n), (n, r))
    if _dispatch.backend_status("triton") is not None or not _runs_triton(h):
        pytest.skip("triton backend not usable here")
    for alias, fused in (("swish", "silu"), ("linear", "identity"), ("gelu_python", "gelu")):
        a = ops.series_adapter(h, down, up, activation=alias, dropout_p=0.1, seed=3,
                               backend="triton")
        b = ops.series_adapter(h, down, up, activation=fused, dropout_p=0.1, seed=3,
                               backend="triton")
        assert torch.equal(a, b), alias


def _runs_triton(t):
    return _dispatch.loaded_backend("triton").supports_device(t.device) is None


# ---- which backend runs what --------------------------------------------------------------------
def test_explicit_backend_without_the_activation_is_a_clear_error():
    h, down, up = _inputs((4, 8), (2, 8), (8, 2))
    if _dispatch.backend_status("triton") is not None or not _runs_triton(h):
        pytest.skip("triton backend not usable here")
    with pytest.raises(ops.BackendUnavailableError) as exc:
        ops.series_adapter(h, down, up, activation="sigmoid", backend="triton")
    msg = str(exc.value)
    assert "'triton' has no kernel for activation 'sigmoid'" in msg
    assert "identity, tanh, relu, gelu, silu" in msg and "swish = silu" in msg
    assert "torch backend runs every name of transformers' ACT2FN" in msg
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ops.BackendUnavailableError, match="no kernel for activation 'mish'"):
        ops.lora_linear(x, w, None, down, torch.randn(6, 2), activation="mish",
                        backend="triton")
    # a fused alias is fine there
    ops.series_adapter(h, down, up, activation="swish", backend="triton")


def test_auto_picks_a_backend_that_runs_the_activation(monkeypatch):
    monkeypatch.delenv("LLM_ADAPTERS_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert _dispatch.resolve_backend("series", cpu, None, activation="sigmoid").name == "torch"
    # on a GPU (the CPU standing in for one) auto takes triton for a fused name, torch otherwise
    monkeypatch.setattr(_dispatch, "_on_gpu", lambda device: True)
    if not _dispatch.gpu_candidates("series", cpu):
        pytest.skip("no GPU backend usable here")
    assert _dispatch.resolve_backend("series", cpu, None, activation="silu").name != "torch"
    for name in ("sigmoid", "gelu_new", "xielu"):
        assert _dispatch.resolve_backend("series", cpu, None, activation=name).name == "torch"


def test_unknown_activation_names_the_choices():
    h, down, up = _inputs((4, 8), (2, 8), (8, 2))
    with pytest.raises(ValueError, match="unknown activation 'swishy'.*gelu_new"):
        ops.series_adapter(h, down, up, activation="swishy")
    with pytest.raises(ValueError, match="non_linearity: unknown activation 'Tanh'"):
        BottleneckConfig(non_linearity="Tanh")
    assert set(ops.all_activations()) == set(NAMES) | {"identity"}


# ---- the module and its config ---------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_name_is_a_valid_non_linearity(name):
    assert BottleneckConfig(non_linearity=name).non_linearity == name


def test_layer_with_an_unfused_activation_matches_llm_adapters_formula():
    base = torch.nn.Linear(12, 10)
    base.requires_grad_(False)
    layer = BottleneckAdapter(base, 4, "output", non_linearity="gelu_new")
    x = torch.randn(2, 3, 12)
    h = base(x)
    act = ACT2FN["gelu_new"]
    want = h + layer.adapter_up(act(layer.adapter_down(h)))  # their output_adapter forward
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)


def test_mam_adapter_init_is_llm_adapters():
    # their reset_parameters: kaiming_uniform_(down, a=sqrt(5)) and zeros_(up); no biases there,
    # ours (use_bias) start at 0
    torch.manual_seed(1)
    base = torch.nn.Linear(400, 300).requires_grad_(False)
    layer = BottleneckAdapter(base, 64, "parallel", init_weights="mam_adapter", use_bias=True)
    down = layer.adapter_down.weight
    bound = 1.0 / math.sqrt(400)  # gain sqrt(2 / (1 + 5)) · sqrt(3 / fan_in)
    assert down.abs().max() <= bound and down.abs().max() > 0.99 * bound
    assert abs(down.std().item() - bound / math.sqrt(3)) < 0.02 * bound  # uniform's sd
    assert torch.count_nonzero(layer.adapter_up.weight) == 0
    assert torch.count_nonzero(layer.adapter_down.bias) == 0
    assert torch.count_nonzero(layer.adapter_up.bias) == 0
    down2, up2 = torch.nn.Linear(400, 64, bias=False), torch.nn.Linear(64, 300, bias=False)
    torch.manual_seed(2)
    init_bottleneck(down2, up2, "mam_adapter")
    torch.manual_seed(2)
    want = torch.empty(64, 400)
    torch.nn.init.kaiming_uniform_(want, a=math.sqrt(5))
    assert torch.equal(down2.weight, want)  # their call, the same draw for the same seed
    x = torch.randn(5, 400)
    torch.testing.assert_close(layer(x), base(x))  # starts as the base layer


@pytest.mark.parametrize("init, up_zero", [("bert", False), ("zero_up", True)])
def test_bert_and_zero_up_init(init, up_zero):
    layer = BottleneckAdapter(torch.nn.Linear(400, 300), 64, "output", init_weights=init)
    assert abs(layer.adapter_down.weight.std().item() - 0.02) < 0.001
    up = layer.adapter_up.weight
    if up_zero:
        assert torch.count_nonzero(up) == 0
    else:
        assert abs(up.std().item() - 0.02) < 0.001


def test_init_names():
    for name in ("bert", "mam_adapter", "zero_up"):
        assert BottleneckConfig(init_weights=name).init_weights == name
    with pytest.raises(ValueError, match="init_weights must be one of 'bert', 'mam_adapter'"):
        BottleneckConfig(init_weights="kaiming")
