"""The parity helper itself (llm_adapters/bench/parity.py): its references are the ops' math,
and its rule fails on wrong results, says where, and never demands an exact kernel."""

from __future__ import annotations

import math

import pytest
import torch

from llm_adapters.bench import parity

F64 = torch.float64


def _lora_inputs(m=7, k=9, n=6, r=3, lead=()):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    return {"x": randn(*lead, m, k), "weight": randn(n, k), "bias": randn(n),
            "lora_a": randn(r, k), "lora_b": randn(n, r), "lora_a_bias": randn(r),
            "lora_b_bias": randn(n)}


def test_lora_reference_is_the_formula():
    t = _lora_inputs(lead=(2,))
    keep = torch.rand(14, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    y = parity.lora_reference(**t, scaling=torch.tensor(0.7, dtype=F64), activation="tanh",
                              keep=keep, inv_keep=1 / 0.7)
    x2 = t["x"].reshape(14, 9)
    s = (x2 * keep / 0.7) @ t["lora_a"].t() + t["lora_a_bias"]
    want = (x2 @ t["weight"].t() + t["bias"] + 0.7 * torch.tanh(s) @ t["lora_b"].t()
            + t["lora_b_bias"])
    assert y.shape == (2, 7, 6)
    torch.testing.assert_close(y.reshape(14, 6), want, rtol=1e-12, atol=1e-12)


def test_series_reference_is_the_formula_and_checks_the_mask():
    gen = torch.Generator().manual_seed(2)
    h, down, up = (torch.randn(5, 8, generator=gen, dtype=F64),
                   torch.randn(3, 8, generator=gen, dtype=F64),
                   torch.randn(8, 3, generator=gen, dtype=F64))
    ub = torch.randn(8, generator=gen, dtype=F64)
    z = parity.series_reference(h, down, up, scaling=2.0, activation="relu", up_bias=ub)
    torch.testing.assert_close(z, h + 2.0 * torch.relu(h @ down.t()) @ up.t() + ub)
    with pytest.raises(ValueError, match="keep-mask has shape"):
        parity.series_reference(h, down, up, keep=torch.ones(5, 7, dtype=torch.bool))


def test_forward_and_grads_returns_every_gradient():
    t = parity.leaves(_lora_inputs(), wrt=("x", "lora_a", "lora_b", "bias"))
    out, grads = parity.forward_and_grads(
        lambda **kw: parity.lora_reference(**kw, activation="gelu"), t, torch.ones(7, 6, dtype=F64))
    assert set(grads) == {"x", "lora_a", "lora_b", "bias"}
    assert not out.requires_grad
    torch.testing.assert_close(grads["bias"], torch.full((6,), 7.0, dtype=F64))


def test_assert_parity_fails_on_a_wrong_result_and_says_where():
    ref = torch.linspace(-1, 1, 12, dtype=F64).reshape(3, 4)
    same = (ref.float() + 1e-6).double()  # a same-dtype error of 1e-6
    wrong = ref.clone()
    wrong[2, 1] += 1e-4
    with pytest.raises(AssertionError, match=r"dy: max error 1\.000e-04 at \(2, 1\)"):
        parity.assert_parity("dy", wrong.float(), ref, same.float(), rel_floor=1e-7)
    parity.assert_parity("dy", (ref + 1.9e-6).float(), ref, same.float(), rel_floor=1e-7)
    # an exact same-dtype result does not demand an exact kernel: the floor allows a rounding
    parity.assert_parity("y", (ref * (1 + 2**-24)).float(), ref, ref.float(),
                         rel_floor=torch.finfo(torch.float32).eps)
    with pytest.raises(AssertionError, match="non-finite"):
        parity.assert_parity("y", torch.full((3, 4), math.nan), ref, same, rel_floor=1.0)
    with pytest.raises(AssertionError, match="shape"):
        parity.assert_parity("y", ref[:2], ref, same, rel_floor=1.0)
    with pytest.raises(AssertionError, match="no result"):
        parity.assert_parity("dA", None, ref, same, rel_floor=1.0)
    with pytest.raises(AssertionError, match="dtype"):
        parity.assert_parity("y", ref, ref, ref.float(), rel_floor=1.0, check_dtype=True)


def test_magnitude_sets_the_floor_of_a_cancelling_sum():
    ref = torch.tensor(1e-3, dtype=F64)
    got = torch.tensor(1e-3 + 5e-7, dtype=F64)
    with pytest.raises(AssertionError):
        parity.assert_parity("dscale", got, ref, ref, rel_floor=1e-6)
    parity.assert_parity("dscale", got, ref, ref, rel_floor=1e-6, magnitude=1.0)


def test_scalar_magnitudes_are_the_sums_of_absolute_terms():
    """With every term of the same sign nothing cancels, so each magnitude is |the gradient|;
    with mixed signs it is larger than |the gradient|."""
    t = {k: v.abs() for k, v in _lora_inputs(r=1).items()}
    scale = torch.tensor(0.7, dtype=F64, requires_grad=True)
    leaves = {k: v.clone().requires_grad_(k == "lora_a_bias") for k, v in t.items()}
    keep = torch.rand(7, 9, generator=torch.Generator().manual_seed(1)) > 0.3

    def grads(g, act):
        y = parity.lora_reference(**leaves, scaling=scale, activation=act, keep=keep,
                                  inv_keep=1.25)
        return torch.autograd.grad(y, [scale, leaves["lora_a_bias"]], g)

    for act, g in (("silu", torch.ones(7, 6, dtype=F64)),
                   ("tanh", torch.randn(7, 6, generator=torch.Generator().manual_seed(2),
                                        dtype=F64))):
        d_scale, d_a_bias = grads(g, act)
        mags = parity.lora_scalar_magnitudes({**t, "scale": scale}, g, activation=act,
                                             keep=keep, inv_keep=1.25)
        if act == "silu":  # S > 0: silu and silu' positive
            assert mags["scale"] == pytest.approx(d_scale.item(), rel=1e-12)
            assert mags["lora_a_bias"] == pytest.approx(d_a_bias.item(), rel=1e-12)
        else:
            assert mags["scale"] > abs(d_scale.item()) * (1 + 1e-6)
            assert mags["lora_a_bias"] > abs(d_a_bias.item()) * (1 + 1e-6)


def test_verdict_is_capped():
    ok, tol = parity.parity_verdict({"out": 0.3}, {"out": 0.4}, torch.float32)
    assert not ok and tol["out"] == pytest.approx(1000 * torch.finfo(torch.float32).eps)
    ok, tol = parity.parity_verdict({"out": 3e-7}, {"out": 1e-7}, torch.float32)
    assert ok and tol["out"] == pytest.approx(2e-7 + torch.finfo(torch.float32).eps)
    assert parity.rel_error(None, torch.ones(2)) == math.inf
    assert parity.rel_error(torch.ones(2), torch.ones(2)) == 0.0
