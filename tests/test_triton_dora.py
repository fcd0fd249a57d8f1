"""The `triton` backend's DoRA functions (dora_forward / dora_backward, dora_add_forward /
dora_add_backward of ops/_backend.py) against a float64 reference written from the contract's
formulas, with the kernels' own Philox keep-mask.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest) in
fp32 and fp16 (bf16 `tl.dot` is wrong under the interpreter; bf16 runs on a GPU only). Shapes
are odd: M not a multiple of the 32-row block, K and N over one block and not powers of two.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from llm_adapters._numerics import dropout_threshold
from llm_adapters.ops import triton_backend as tb
from llm_adapters.triton_kernels.dropout import keep_mask

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
# max |got - ref| / max |ref| per tensor; half precision rounds the operands the kernels feed
# to tl.dot (s·S, c ⊙ B, c ⊙ g) and the outputs, fp32 only the accumulation order
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SCALING = 1.7
SEED = 2**40 + 12345


def _make(m, k, n, r, dtype, bias, strided):
    w = torch.randn(n, k, device=DEV) / k**0.5
    if strided:  # weight in [K, N] storage, y0 a column slice: any strides
        w = w.t().contiguous().t()
    return {
        "x": torch.randn(m, k, device=DEV).to(dtype),
        "weight": w.to(dtype),
        "y0": torch.randn(m, n + 3, device=DEV).to(dtype)[:, 2:n + 2] if strided
        else torch.randn(m, n, device=DEV).to(dtype),
        "bias": (torch.randn(n, device=DEV) * 0.5).to(dtype) if bias else None,
        "a": (torch.randn(r, k, device=DEV) / k**0.5).to(dtype),
        "b": (torch.randn(n, r, device=DEV) / r**0.5).to(dtype),
        # m / ‖W + s·B A‖: positive, far enough from 1 that a misplaced scale shows
        "c": torch.rand(n, device=DEV) * 1.5 + 0.25,
        "g": torch.randn(m, n, device=DEV).to(dtype),
    }


def _reference(v, p, seed, add):
    """Every output of the contract in float64: y, T, dx, dbias, da, db, dcol (, dy0)."""
    d = {nm: (t.double() if t is not None else None) for nm, t in v.items()}
    x, a, b, c, g = d["x"], d["a"], d["b"], d["c"], d["g"]
    if p > 0.0:
        dmask = keep_mask(tuple(x.shape), p, seed, x.device).double() * dropout_threshold(p)[1]
    else:
        dmask = torch.ones_like(x)
    xd = x * dmask
    s_pre = xd @ a.t()
    base = d["y0"] if add else x @ d["weight"].t()
    t = base + SCALING * s_pre @ b.t()
    y = c * t + (d["bias"] if d["bias"] is not None else 0.0)
    gc = c * g
    gcb = gc @ b
    dx_branch = SCALING * (gcb @ a) * dmask
    out = {
        "y": y, "t": t, "s_pre": s_pre,
        "dx": dx_branch if add else gc @ d["weight"] + dx_branch,
        "dbias": g.sum(0), "da": SCALING * gcb.t() @ xd, "db": SCALING * gc.t() @ s_pre,
        "dcol": (g * t).sum(0),
    }
    if add:
        out["dy0"] = gc
    return out


def _err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _check(name, got, ref, dtype, out_dtype):
    assert got.dtype == out_dtype, (name, got.dtype, out_dtype)
    assert got.shape == ref.shape, (name, tuple(got.shape), tuple(ref.shape))
    err = _err(got, ref)
    assert err <= TOL[dtype], f"{name}: relative error {err:.2e} over {TOL[dtype]:.0e}"


def _run(v, p, seed, save_t, add, tb=tb):
    """The backend's (`tb`'s) forward then backward, every gradient asked for."""
    if add:
        y, s_pre, mask, t = tb.dora_add_forward(v["x"], v["y0"], v["a"], v["b"], v["bias"],
                                                v["c"], SCALING, p, seed, save_t)
        grads = tb.dora_add_backward(v["g"], v["x"], v["a"], v["b"], v["c"], SCALING, p, seed,
                                     s_pre, mask, t, (True, True, True, True, True, save_t))
        names = ("dx", "dy0", "da", "db", "dbias", "dcol")
    else:
        y, s_pre, mask, t = tb.dora_forward(v["x"], v["weight"], v["bias"], v["a"], v["b"],
                                            v["c"], SCALING, p, seed, save_t)
        grads = tb.dora_backward(v["g"], v["x"], v["weight"], v["a"], v["b"], v["c"], SCALING,
                                 p, seed, s_pre, mask, t, (True, True, True, True, save_t))
        names = ("dx", "dbias", "da", "db", "dcol")
    return {"y": y, "s_pre": s_pre, "mask": mask, "t": t, **dict(zip(names, grads))}


CASES = [
    # (r, p, bias, save_t, strided)
    (r, p, bias, save_t, (r, p, bias, save_t).count(True) % 2 == 1)
    for r, p, bias, save_t in itertools.product((3, 8), (0.0, 0.25), (False, True), (False, True))
]


@pytest.mark.parametrize("add", [False, True], ids=["dora", "dora_add"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("r,p,bias,save_t,strided", CASES)
def test_matches_float64_reference(add, dtype, r, p, bias, save_t, strided):
    m, k, n = 37, 45, 29
    v = _make(m, k, n, r, dtype, bias, strided)
    got = _run(v, p, SEED, save_t, add)
    ref = _reference(v, p, SEED, add)
    acc = torch.float32
    _check("y", got["y"], ref["y"], dtype, dtype)
    _check("s_pre", got["s_pre"], ref["s_pre"], dtype, acc)
    assert got["mask"].dtype == torch.bool and got["mask"].numel() == 0
    if save_t:
        _check("t", got["t"], ref["t"], dtype, dtype)
        _check("dcol", got["dcol"], ref["dcol"], dtype, acc)
    else:
        assert got["t"].numel() == 0 and got["t"].dtype == dtype
        assert got["dcol"].numel() == 0
    _check("dx", got["dx"], ref["dx"], dtype, dtype)
    _check("dbias", got["dbias"], ref["dbias"], dtype, acc)
    _check("da", got["da"], ref["da"], dtype, acc)
    _check("db", got["db"], ref["db"], dtype, acc)
    if add:
        _check("dy0", got["dy0"], ref["dy0"], dtype, dtype)
        assert v["y0"].equal(v["y0"].clone())  # read only: still the caller's tensor


def test_y0_is_not_written():
    v = _make(37, 45, 29, 3, torch.float32, True, True)
    before = v["y0"].clone()
    tb.dora_add_forward(v["x"], v["y0"], v["a"], v["b"], v["bias"], v["c"], SCALING, 0.1, 5,
                        True)
    assert v["y0"].equal(before)


def test_needs_leave_the_rest_empty():
    v = _make(37, 45, 29, 8, torch.float32, True, False)
    y, s_pre, mask, t = tb.dora_forward(v["x"], v["weight"], v["bias"], v["a"], v["b"], v["c"],
                                        SCALING, 0.25, SEED, True)
    ref = _reference(v, 0.25, SEED, False)
    out = tb.dora_backward(v["g"], v["x"], v["weight"], v["a"], v["b"], v["c"], SCALING, 0.25,
                           SEED, s_pre, mask, t, (False, False, False, True, True))
    assert [o.numel() for o in out[:3]] == [0, 0, 0]
    _check("db", out[3], ref["db"], torch.float32, torch.float32)
    _check("dcol", out[4], ref["dcol"], torch.float32, torch.float32)
    out = tb.dora_add_backward(v["g"], v["x"], v["a"], v["b"], v["c"], SCALING, 0.25, SEED,
                               s_pre, mask, t, (True, False, False, False, False, False))
    assert [o.numel() for o in out[1:]] == [0] * 5
    ref = _reference(v, 0.25, SEED, True)
    _check("dx", out[0], ref["dx"], torch.float32, torch.float32)


def test_empty_rows():
    v = _make(0, 45, 29, 3, torch.float32, True, False)
    y, s_pre, mask, t = tb.dora_forward(v["x"], v["weight"], v["bias"], v["a"], v["b"], v["c"],
                                        SCALING, 0.1, 1, True)
    assert y.shape == (0, 29) and t.shape == (0, 29) and s_pre.shape == (0, 3)
    dx, dbias, da, db, dcol = tb.dora_backward(v["g"], v["x"], v["weight"], v["a"], v["b"],
                                               v["c"], SCALING, 0.1, 1, s_pre, mask, t,
                                               (True, True, True, True, True))
    assert dx.shape == (0, 45) and da.abs().sum() == 0 and db.abs().sum() == 0
    assert dbias.abs().sum() == 0 and dcol.abs().sum() == 0


def test_the_check_catches_the_scale_after_the_bias():
    """The comparison can fail: y = c ⊙ (T + bias) (the column scale applied after the bias,
    a plausible epilogue mistake) is far outside the fp32 tolerance of the right answer."""
    v = _make(37, 45, 29, 3, torch.float32, True, False)
    ref = _reference(v, 0.0, SEED, False)
    wrong = v["c"].double() * (ref["t"] + v["bias"].double())
    assert _err(wrong, ref["y"]) > 100 * TOL[torch.float32]


def test_float64_runs_in_pytorch_with_the_philox_mask():
    """float64 goes to the torch backend's functions with the kernels' keep-mask: the same
    contract, so the same reference holds to float64 rounding."""
    if not hasattr(tb.torch_backend, "dora_forward"):
        pytest.skip("the torch backend has no dora_forward")
    v = _make(7, 9, 6, 3, torch.float32, True, False)
    v = {nm: t.double() if t is not None else None for nm, t in v.items()}
    for add in (False, True):
        got = _run(v, 0.3, 11, True, add)
        ref = _reference(v, 0.3, 11, add)
        for name, value in got.items():
            if name == "mask":
                assert value.numel() == 0
                continue
            assert _err(value, ref[name]) < 1e-12, name


@pytest.mark.gpu
@pytest.mark.parametrize("add", [False, True], ids=["dora", "dora_add"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_llama_shapes(add, dtype):
    """A LLaMA-7B projection (K = N = 4096, r = 16) and a ragged shape, dropout on, T kept:
    the compiled kernels (not the interpreter) against the float64 reference."""
    for m, k, n, r in ((2048, 4096, 4096, 16), (1000, 1000, 3000, 24)):
        v = _make(m, k, n, r, dtype, True, False)
        got = _run(v, 0.1, SEED, True, add)
        ref = _reference(v, 0.1, SEED, add)
        for name in ("y", "t", "dx", "dbias", "da", "db", "dcol", *(("dy0",) if add else ())):
            out_dtype = dtype if name in ("y", "t", "dx", "dy0") else torch.float32
            _check(name, got[name], ref[name], dtype, out_dtype)
