"""Mixed-adapter LoRA batches (`ops.grouped.lora_grouped_add`): every row equals the same row run
alone with its own adapter, against float64, on the torch backend and on the triton kernels
(under the interpreter without a GPU); bad input, the autograd refusal, the backend choice."""

from __future__ import annotations

import pytest
import torch

from llm_adapters.bench.parity import assert_parity
from llm_adapters.ops._dispatch import BackendUnavailableError
from llm_adapters.ops.grouped import lora_grouped_add
from llm_adapters.triton_kernels import grouped as kernels

M, K, N = 13, 24, 20  # odd M, K and N not powers of two


def _case(g: int, dtype: torch.dtype, device="cpu"):
    gen = torch.Generator().manual_seed(1234 + g)
    ranks = [8] if g == 1 else [4, 16, 8]
    x = torch.randn(M, K, generator=gen).to(dtype)
    y0 = torch.randn(M, N, generator=gen).to(dtype)
    # adapter weights in float32 whatever x is: the op casts them to x's dtype
    lora_as = [torch.randn(r, K, generator=gen) / K**0.5 for r in ranks]
    lora_bs = [torch.randn(N, r, generator=gen) / r**0.5 for r in ranks]
    scalings = [2.0] if g == 1 else [0.5, 2.0, 1.25]
    if g == 1:
        index = [0, -1, 0, 0, -1, 0, 0, 0, -1, 0, 0, 0, 0]
    else:  # adapter 1 (rank 16) has no rows: an empty segment between two others
        index = [2, 0, -1, 2, 0, 0, -1, 2, 2, 0, 2, -1, 0]
    index = torch.tensor(index, dtype=torch.int64)
    to = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    return x.to(device), y0.to(device), index.to(device), to(lora_as), to(lora_bs), scalings


def _row_alone(y0, x, index, lora_as, lora_bs, scalings, dtype):
    """Each row run alone with its adapter, in `dtype` (weights cast to x's dtype first, as the
    op does, then to `dtype`)."""
    out = y0.to(dtype).clone()
    for i in range(x.shape[0]):
        a = int(index[i])
        if a < 0:
            continue
        xa = x[i : i + 1].to(dtype)
        wa = lora_as[a].to(x.dtype).to(dtype)
        wb = lora_bs[a].to(x.dtype).to(dtype)
        out[i : i + 1] += scalings[a] * ((xa @ wa.t()) @ wb.t())
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("g", [1, 3])
def test_rows_match_each_adapter_alone(backend, dtype, g):
    x, y0, index, lora_as, lora_bs, scalings = _case(g, dtype)
    base = y0.clone()
    ref = _row_alone(y0, x, index, lora_as, lora_bs, scalings, torch.float64)
    same = _row_alone(y0, x, index, lora_as, lora_bs, scalings, dtype)
    y = lora_grouped_add(y0, x, index, lora_as, lora_bs, scalings, backend=backend)
    assert y is y0 and y.dtype == dtype  # in place
    rel = 2 * torch.finfo(dtype).eps  # a rounding or so at the magnitude
    assert_parity(f"y ({backend}, {dtype}, G={g})", y, ref, same, rel_floor=rel)
    base_rows = index < 0
    assert torch.equal(y[base_rows], base[base_rows])  # "__base__" rows untouched, bit for bit
    assert not torch.equal(y[~base_rows], base[~base_rows])


def test_backends_agree_on_a_batch_of_one_adapter_per_row():
    # every row its own segment boundary: G = 3 adapters cycling, ranks 4/16/8
    x, y0, _, lora_as, lora_bs, scalings = _case(3, torch.float32)
    index = torch.arange(M, dtype=torch.int64) % 4 - 1
    ref = _row_alone(y0, x, index, lora_as, lora_bs, scalings, torch.float64)
    same = _row_alone(y0, x, index, lora_as, lora_bs, scalings, torch.float32)
    for backend in ("torch", "triton"):
        y = lora_grouped_add(y0.clone(), x, index, lora_as, lora_bs, scalings, backend=backend)
        assert_parity(f"y ({backend})", y, ref, same, rel_floor=2 * torch.finfo().eps)


def test_all_base_rows_and_empty_batch():
    x, y0, index, lora_as, lora_bs, scalings = _case(3, torch.float32)
    base = y0.clone()
    for backend in ("torch", "triton"):
        y = lora_grouped_add(y0, x, torch.full_like(index, -1), lora_as, lora_bs, scalings,
                             backend=backend)
        assert torch.equal(y, base)
        empty = lora_grouped_add(y0[:0], x[:0], index[:0], lora_as, lora_bs, scalings,
                                 backend=backend)
        assert empty.shape == (0, N)


def test_auto_takes_triton_under_the_interpreter_and_torch_without(monkeypatch):
    x, y0, index, lora_as, lora_bs, scalings = _case(1, torch.float32)
    calls = []
    real = kernels.grouped_lora_add

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(kernels, "grouped_lora_add", spy)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lora_grouped_add(y0.clone(), x, index, lora_as, lora_bs, scalings, backend="auto")
    assert calls == [1]
    monkeypatch.delenv("TRITON_INTERPRET")
    lora_grouped_add(y0.clone(), x, index, lora_as, lora_bs, scalings, backend="auto")
    assert calls == [1]  # torch on CPU tensors


def test_the_triton_buffers_pad_ranks_with_zeros_and_segment_rows():
    _, _, index, lora_as, lora_bs, _ = _case(3, torch.float32)
    a_all, b_all = kernels.stack_adapters(lora_as, lora_bs, torch.float16)
    assert a_all.shape == (3, 16, K) and b_all.shape == (3, N, 16)
    assert a_all.dtype == b_all.dtype == torch.float16
    assert torch.equal(a_all[0, 4:], torch.zeros(12, K, dtype=torch.float16))
    assert torch.equal(b_all[2, :, 8:], torch.zeros(N, 8, dtype=torch.float16))
    order, seg = kernels.sort_rows(index, 3)
    assert seg.tolist() == [3, 8, 8, 13]  # 3 base rows, 5 of adapter 0, none of 1, 5 of 2
    assert torch.equal(index[order], torch.sort(index).values)


def test_refuses_autograd():
    x, y0, index, lora_as, lora_bs, scalings = _case(1, torch.float32)
    lora_as[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="mixed-adapter batches are inference only"):
        lora_grouped_add(y0, x, index, lora_as, lora_bs, scalings, backend="torch")
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="mixed-adapter batches are inference only"):
        lora_grouped_add(y0, x, index, lora_as, lora_bs, scalings, backend="triton")
    with torch.no_grad():  # no grad mode: the same inputs run
        lora_grouped_add(y0, x, index, lora_as, lora_bs, scalings, backend="torch")


def _bad(name):
    x, y0, index, lora_as, lora_bs, scalings = _case(3, torch.float32)
    args = dict(y0=y0, x=x, adapter_index=index, lora_as=lora_as, lora_bs=lora_bs,
                scalings=scalings)
    if name == "index_high":
        index[4] = 3
    elif name == "index_low":
        index[4] = -2
    elif name == "index_dtype":
        args["adapter_index"] = index.to(torch.int32)
    elif name == "index_len":
        args["adapter_index"] = index[:-1]
    elif name == "lengths":
        args["lora_bs"] = lora_bs[:2]
    elif name == "scalings_len":
        args["scalings"] = scalings[:1]
    elif name == "a_shape":
        lora_as[1] = torch.randn(16, K + 1)
    elif name == "b_rank":
        lora_bs[2] = torch.randn(N, 4)
    elif name == "y0_rows":
        args["y0"] = y0[:-1]
    elif name == "y0_dtype":
        args["y0"] = y0.double()
    elif name == "x_dtype":
        args["x"] = x.to(torch.int32)
    elif name == "x_dim":
        args["x"] = x[None]
    elif name == "a_dtype":
        lora_as[0] = lora_as[0].to(torch.int64)
    elif name == "scaling_type":
        args["scalings"] = [0.5, "2", 1.0]
    elif name == "not_list":
        args["lora_as"] = lora_as[0]
    return args


@pytest.mark.parametrize(
    "name, exc, match",
    [
        ("index_high", ValueError, r"adapter_index holds 3: expected -1 .* or 0\.\.2"),
        ("index_low", ValueError, r"adapter_index holds -2"),
        ("index_dtype", TypeError, r"adapter_index must be int64"),
        ("index_len", ValueError, r"adapter_index must be 1-D with one entry per row"),
        ("lengths", ValueError, r"lora_bs has 2 entries but lora_as has 3"),
        ("scalings_len", ValueError, r"scalings has 1 entries but lora_as has 3"),
        ("a_shape", ValueError, r"lora_as\[1\] must be \[r, K=24\]"),
        ("b_rank", ValueError, r"lora_bs\[2\] must be \[N=20, r=8\]"),
        ("y0_rows", ValueError, r"y0 has 12 rows but x has 13"),
        ("y0_dtype", TypeError, r"y0 dtype torch.float64 does not match x dtype"),
        ("x_dtype", TypeError, r"x has dtype torch.int32"),
        ("x_dim", ValueError, r"x must be 2-D"),
        ("a_dtype", TypeError, r"lora_as\[0\] has dtype torch.int64"),
        ("scaling_type", TypeError, r"scalings\[1\] must be a finite real number"),
        ("not_list", TypeError, r"lora_as must be a list"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_y0(name, exc, match):
    args = _bad(name)
    before = args["y0"].clone()
    with pytest.raises(exc, match=match):
        lora_grouped_add(**args, backend="torch")
    assert torch.equal(args["y0"], before)


def test_backend_errors():
    x, y0, index, lora_as, lora_bs, scalings = _case(1, torch.float32)
    with pytest.raises(TypeError, match="triton backend runs float16, bfloat16 and float32"):
        lora_grouped_add(y0.double(), x.double(), index, lora_as, lora_bs, scalings,
                         backend="triton")
    with pytest.raises(BackendUnavailableError):
        lora_grouped_add(y0, x, index, lora_as, lora_bs, scalings, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        lora_grouped_add(y0, x, index, lora_as, lora_bs, scalings, backend="numpy")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_on_gpu_matches(dtype):
    x, y0, index, lora_as, lora_bs, scalings = _case(3, dtype, "cuda")
    ref = _row_alone(y0, x, index, lora_as, lora_bs, scalings, torch.float64)
    same = _row_alone(y0, x, index, lora_as, lora_bs, scalings, dtype)
    y = lora_grouped_add(y0, x, index, lora_as, lora_bs, scalings, backend="triton")
    assert_parity(f"y ({dtype}, cuda)", y, ref, same, rel_floor=2 * torch.finfo(dtype).eps)


def test_long_segments_high_rank_and_strided_x():
    # a segment over several row blocks, r_max = 72 (the expand's rank loop in two chunks, a
    # ragged tail), x a strided view: the kernels read through its strides
    gen = torch.Generator().manual_seed(7)
    m, ranks = 41, [72, 4]
    x = torch.randn(m, 2 * K, generator=gen)[:, ::2]
    y0 = torch.randn(m, N, generator=gen)
    lora_as = [torch.randn(r, K, generator=gen) / K**0.5 for r in ranks]
    lora_bs = [torch.randn(N, r, generator=gen) / r**0.5 for r in ranks]
    index = torch.tensor([0] * 35 + [1, -1] * 3, dtype=torch.int64)
    index = index[torch.randperm(m, generator=gen)]
    scalings = [0.75, 3.0]
    ref = _row_alone(y0, x, index, lora_as, lora_bs, scalings, torch.float64)
    same = _row_alone(y0, x, index, lora_as, lora_bs, scalings, torch.float32)
    for backend in ("torch", "triton"):
        y = lora_grouped_add(y0.clone(), x, index, lora_as, lora_bs, scalings, backend=backend)
        assert_parity(f"y ({backend})", y, ref, same, rel_floor=2 * torch.finfo().eps)


def test_one_shrink_and_one_expand_launch_on_meta_tensors(monkeypatch):
    # how an ahead-of-time enumeration drives the launcher: meta tensors, launches recorded
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, grid, kwargs))

    for name in ("_grouped_shrink_kernel", "_grouped_expand_kernel"):
        monkeypatch.setattr(kernels, name, Recorder(name))
    meta = lambda *shape: torch.empty(shape, device="meta", dtype=torch.float16)  # noqa: E731
    index = torch.empty(300, dtype=torch.int64, device="meta")
    kernels.grouped_lora_add(meta(300, 96), meta(300, 80), index, [meta(8, 80), meta(40, 80)],
                             [meta(96, 8), meta(96, 40)], [1.0, 2.0])
    assert [c[0] for c in calls] == ["_grouped_shrink_kernel", "_grouped_expand_kernel"]
    (_, shrink_grid, shrink_kw), (_, expand_grid, expand_kw) = calls
    assert shrink_kw == {"IEEE": False, "BLOCK_G": 2, "BLOCK_R": 64}
    assert expand_kw == {"IEEE": False, "BLOCK_G": 2, "BLOCK_R": 64}
    # row blocks of all segments: at most cdiv(M, BLOCK_M) + G
    assert shrink_grid({"BLOCK_M": 64}) == (5 + 2, 1)
    assert expand_grid({"BLOCK_M": 32, "BLOCK_N": 64}) == (10 + 2, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r", [1, 16, 72, 128])
def test_config_prune_fits_shared_memory_and_keeps_a_config(dtype, r):
    import triton

    from llm_adapters.triton_kernels import _limits

    x = torch.empty(0, dtype=dtype)
    for name, configs, block_r in (
        ("_grouped_shrink_kernel", kernels._shrink_configs(False),
         kernels._r_block(r, kernels._MAX_R_SHRINK)),
        ("_grouped_expand_kernel", kernels._expand_configs(False),
         kernels._r_block(r, kernels._MAX_R_CHUNK)),
    ):
        nargs = {"x_ptr": x, "a_ptr": x, "b_ptr": x, "BLOCK_R": block_r,
                 "IEEE": dtype == torch.float32}
        prune = kernels._prune(name)
        for cc, limit in _limits.TARGETS.items():
            kept = prune(configs, nargs, target=(cc, limit), autotune=True)
            assert kept and all(isinstance(c, triton.Config) for c in kept)
            assert all(kernels._smem_model(name, c, nargs, cc) <= limit for c in kept)
            assert all(kernels._fma_fits(name, c, nargs) for c in kept)
        (one,) = prune(configs, nargs, target=(90, _limits.TARGETS[90]), autotune=False)
        assert all(kernels._smem_model(name, one, nargs, cc) <= lim
                   for cc, lim in _limits.TARGETS.items())
