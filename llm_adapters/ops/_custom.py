"""The op factory: one spec per op drives both autograd wrappers around a backend.

From an `OpSpec` (argument names and schema types, which arguments are differentiable, the
shapes of outputs and gradients, where the seed sits, the backend's forward/backward names)
`BoundOp(spec, backend)` builds
- a `torch.library` custom op pair (`custom_op` + `register_fake` + `register_autograd`),
  opaque to `torch.compile` (no graph breaks, traced by shape) and checkable by
  `torch.library.opcheck`;
- an eager path, a plain autograd.Function with the same setup and backward code. The custom
  op's Python dispatch costs about 0.3 ms a forward+backward on a CPU, which at small M would
  eat what fusion gains, so eager calls skip it.
Ops are created when a backend is first loaded, so importing the package never imports Triton
or loads the CUDA extension. The backend contract itself is `_backend.Backend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._numerics import acc_dtype
from ._backend import Backend


@dataclass(frozen=True)
class OpSpec:
    """What the factory needs to know about one op.

    inputs: (name, torch schema type) in call order, as the backend's forward takes them
    grads: the differentiable inputs, in the order of backward's `needs` and results; the first
        is the activation input (its gradient comes back in g's dtype, the others in the
        accumulation dtype)
    saved: the inputs backward takes after g (then s_pre, mask, needs)
    dims: a letter per dimension -> (input, axis); every input named here must be in `saved`
    shapes: "out", "s_pre", "mask" and each gradient's input -> its shape in `dims` letters
    seed: the int64 tensor input the backend receives as a Python int
    passthrough: an input whose gradient is g itself (the base output y0 that `lora_add` adds
        into); the backend's backward does not return it, the wrapper hands g on
    extra_out: a further forward output kept for backward after s_pre and mask (DoRA's
        unscaled output T, shape `shapes[extra_out]`, in the activation dtype), materialised
        only when the bool input `extra_flag` is true (else an empty [0] tensor)
    act_grads: gradients besides the first that come back in g's dtype (DoRA's dy0)
    """

    name: str
    forward: str
    backward: str
    inputs: tuple[tuple[str, str], ...]
    grads: tuple[str, ...]
    saved: tuple[str, ...]
    dims: dict[str, tuple[str, int]]
    shapes: dict[str, str]
    seed: str = "seed"
    dropout: str = "dropout_p"
    passthrough: str = ""
    extra_out: str = ""
    extra_flag: str = ""
    act_grads: tuple[str, ...] = ()
    # index tables derived from the names above, computed once
    at: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        at = {n: i for i, (n, _) in enumerate(self.inputs)}
        object.__setattr__(self, "at", at)
        for name in (*self.grads, *self.saved, self.seed, self.dropout, *self.act_grads,
                     *((self.passthrough,) if self.passthrough else ()),
                     *((self.extra_flag,) if self.extra_flag else ())):
            if name not in at:
                raise ValueError(f"{self.name}: {name!r} is not an input")
        for name, _ in self.dims.values():
            if name not in self.saved:
                raise ValueError(f"{self.name}: dimension source {name!r} is not saved")

    @property
    def outputs(self) -> tuple[str, ...]:
        """The forward's outputs: out, then what backward keeps (non-differentiable)."""
        return ("out", "s_pre", "mask", *((self.extra_out,) if self.extra_out else ()))

    def shape(self, what: str, values: dict[str, Any]) -> tuple[int, ...]:
        """The shape of `what` (an output or an input) given named tensors."""
        return tuple(values[n].shape[axis] for n, axis in
                     (self.dims[d] for d in self.shapes[what].split()))


LORA = OpSpec(
    name="lora_linear",
    forward="lora_forward",
    backward="lora_backward",
    inputs=(
        ("x", "Tensor"), ("weight", "Tensor"), ("bias", "Tensor?"), ("a", "Tensor"),
        ("b", "Tensor"), ("a_bias", "Tensor?"), ("b_bias", "Tensor?"), ("scale_t", "Tensor?"),
        ("scaling", "float"), ("dropout_p", "float"), ("seed", "Tensor"), ("activation", "str"),
    ),
    grads=("x", "bias", "a", "b", "a_bias", "b_bias", "scale_t"),
    saved=("x", "weight", "a", "b", "scale_t", "scaling", "dropout_p", "seed", "activation"),
    dims={"m": ("x", 0), "k": ("x", 1), "n": ("b", 0), "r": ("b", 1)},
    shapes={"out": "m n", "s_pre": "m r", "mask": "m k", "x": "m k", "bias": "n", "a": "r k",
            "b": "n r", "a_bias": "r", "b_bias": "n", "scale_t": ""},
)

SERIES = OpSpec(
    name="series_adapter",
    forward="series_forward",
    backward="series_backward",
    inputs=(
        ("h", "Tensor"), ("down", "Tensor"), ("up", "Tensor"), ("down_bias", "Tensor?"),
        ("up_bias", "Tensor?"), ("scale_t", "Tensor?"), ("scaling", "float"),
        ("dropout_p", "float"), ("seed", "Tensor"), ("activation", "str"),
    ),
    grads=("h", "down", "up", "down_bias", "up_bias", "scale_t"),
    saved=("h", "down", "up", "scale_t", "scaling", "dropout_p", "seed", "activation"),
    dims={"m": ("h", 0), "n": ("h", 1), "r": ("down", 0)},
    shapes={"out": "m n", "s_pre": "m r", "mask": "m n", "h": "m n", "down": "r n",
            "up": "n r", "down_bias": "r", "up_bias": "n", "scale_t": ""},
)

# y = y0 + s·φ(D(x) Aᵀ + a_b) Bᵀ + b_b: the LoRA / parallel branch added into a base output y0
# that the caller computed (a quantized layer's own product, differentiated by autograd through
# that layer); dx here is the branch's term D'(dS A) only, dy0 = g.
LORA_ADD = OpSpec(
    name="lora_add",
    forward="lora_add_forward",
    backward="lora_add_backward",
    inputs=(
        ("x", "Tensor"), ("y0", "Tensor"), ("a", "Tensor"), ("b", "Tensor"),
        ("a_bias", "Tensor?"), ("b_bias", "Tensor?"), ("scale_t", "Tensor?"),
        ("scaling", "float"), ("dropout_p", "float"), ("seed", "Tensor"), ("activation", "str"),
    ),
    grads=("x", "a", "b", "a_bias", "b_bias", "scale_t"),
    saved=("x", "a", "b", "scale_t", "scaling", "dropout_p", "seed", "activation"),
    dims={"m": ("x", 0), "k": ("x", 1), "n": ("b", 0), "r": ("b", 1)},
    shapes={"out": "m n", "s_pre": "m r", "mask": "m k", "x": "m k", "a": "r k", "b": "n r",
            "a_bias": "r", "b_bias": "n", "scale_t": ""},
    passthrough="y0",
)

# DoRA: y = c ⊙ T + b with T = x Wᵀ + s·(D(x) Aᵀ) Bᵀ and c = m / ‖W + s·B A‖ per output
# column (ops/dora.py computes c, differentiably in m); T is kept for dc = Σ_rows g ⊙ T when
# save_t (c needs a gradient).
DORA = OpSpec(
    name="dora_linear",
    forward="dora_forward",
    backward="dora_backward",
    inputs=(
        ("x", "Tensor"), ("weight", "Tensor"), ("bias", "Tensor?"), ("a", "Tensor"),
        ("b", "Tensor"), ("col_scale", "Tensor"), ("scaling", "float"), ("dropout_p", "float"),
        ("seed", "Tensor"), ("save_t", "bool"),
    ),
    grads=("x", "bias", "a", "b", "col_scale"),
    saved=("x", "weight", "a", "b", "col_scale", "scaling", "dropout_p", "seed"),
    dims={"m": ("x", 0), "k": ("x", 1), "n": ("b", 0), "r": ("b", 1)},
    shapes={"out": "m n", "s_pre": "m r", "mask": "m k", "t": "m n", "x": "m k", "bias": "n",
            "a": "r k", "b": "n r", "col_scale": "n"},
    extra_out="t",
    extra_flag="save_t",
)

# DoRA on a base output y0 (less its bias) computed elsewhere: T = y0 + s·(D(x) Aᵀ) Bᵀ,
# y = c ⊙ T + b; dy0 = c ⊙ g (in g's dtype), dx the branch's term only.
DORA_ADD = OpSpec(
    name="dora_add",
    forward="dora_add_forward",
    backward="dora_add_backward",
    inputs=(
        ("x", "Tensor"), ("y0", "Tensor"), ("a", "Tensor"), ("b", "Tensor"), ("bias", "Tensor?"),
        ("col_scale", "Tensor"), ("scaling", "float"), ("dropout_p", "float"), ("seed", "Tensor"),
        ("save_t", "bool"),
    ),
    grads=("x", "y0", "a", "b", "bias", "col_scale"),
    saved=("x", "a", "b", "col_scale", "scaling", "dropout_p", "seed"),
    dims={"m": ("x", 0), "k": ("x", 1), "n": ("b", 0), "r": ("b", 1)},
    shapes={"out": "m n", "s_pre": "m r", "mask": "m k", "t": "m n", "x": "m k", "y0": "m n",
            "a": "r k", "b": "n r", "bias": "n", "col_scale": "n"},
    extra_out="t",
    extra_flag="save_t",
    act_grads=("y0",),
)

SPECS = {"lora": LORA, "series": SERIES, "lora_add": LORA_ADD, "dora": DORA,
         "dora_add": DORA_ADD}


class _Plan:
    """The spec as index tables: what setup and backward look up per call."""

    def __init__(self, spec: OpSpec) -> None:
        at = spec.at
        types = dict(spec.inputs)
        self.n_inputs = len(spec.inputs)
        self.seed_at = at[spec.seed]
        self.grad_at = tuple(at[n] for n in spec.grads)
        tensors = [n for n in spec.saved if types[n].startswith("Tensor")]
        others = [n for n in spec.saved if not types[n].startswith("Tensor")]
        self.saved_tensor_at = tuple(at[n] for n in tensors)
        self.saved_other_at = tuple(at[n] for n in others)
        # backward's arguments after g, rebuilt from (saved tensors, other values)
        self.pick = tuple((True, tensors.index(n)) if n in tensors else (False, others.index(n))
                          for n in spec.saved)
        self.seed_in_backward = 1 + spec.saved.index(spec.seed)  # g comes first
        self.passthrough_at = spec.at[spec.passthrough] if spec.passthrough else None
        self.n_kept = len(spec.outputs) - 1  # outputs kept for backward (s_pre, mask, ...)


def _setup(plan: _Plan, ctx, args, output) -> None:
    ctx.save_for_backward(*[args[i] for i in plan.saved_tensor_at], *output[1:])
    ctx.others = [args[i] for i in plan.saved_other_at]
    ctx.refs = [None if (t := args[i]) is None else (t.dtype, t.shape) for i in plan.grad_at]


def _backward_args(plan: _Plan, ctx, g: Tensor) -> tuple[list, list[bool]]:
    """(g, the saved inputs, s_pre, mask[, extra], needs) for the backend's backward, and
    `needs`."""
    saved = ctx.saved_tensors
    tensors, kept = saved[:-plan.n_kept], saved[-plan.n_kept:]
    others = ctx.others
    ni = ctx.needs_input_grad
    needs = [bool(ni[i]) for i in plan.grad_at]
    args = [g.contiguous()]
    args += [tensors[j] if is_tensor else others[j] for is_tensor, j in plan.pick]
    args += (*kept, needs)
    return args, needs


def _input_grads(plan: _Plan, ctx, grads, needs, g: Tensor) -> list:
    """The backend's gradients placed at their inputs, cast to each input's dtype and shape;
    g itself at the passthrough input."""
    out = [None] * plan.n_inputs
    at = plan.passthrough_at
    if at is not None and ctx.needs_input_grad[at]:
        out[at] = g
    for i, g, need, ref in zip(plan.grad_at, grads, needs, ctx.refs):
        if need and ref is not None:
            dtype, shape = ref
            if g.dtype != dtype:
                g = g.to(dtype)
            out[i] = g if g.shape == shape else g.reshape(shape)
    return out


class _Eager(torch.autograd.Function):
    # inputs: the op's arguments, then the BoundOp (not differentiable: needs_input_grad False)
    @staticmethod
    def forward(ctx, *inputs):
        args = list(inputs)
        op = args.pop()
        plan = op.plan
        at = plan.seed_at
        seed = args[at]
        args[at] = int(seed)
        output = getattr(op.backend, op.forward_name)(*args)
        args[at] = seed
        _setup(plan, ctx, args, output)
        ctx.op = op
        return output[0]

    @staticmethod
    def backward(ctx, g):
        op = ctx.op
        plan = op.plan
        args, needs = _backward_args(plan, ctx, g)
        args[plan.seed_in_backward] = int(args[plan.seed_in_backward])
        grads = getattr(op.backend, op.backward_name)(*args)
        return (*_input_grads(plan, ctx, grads, needs, g), None)


def _schema(args, n_out: int) -> str:
    return "(" + ", ".join(f"{t} {n}" for n, t in args) + ") -> (" + ", ".join(
        ["Tensor"] * n_out) + ")"


class BoundOp:
    """One op on one backend: `custom` is the `torch.library` custom op (what torch.compile
    traces; returns (out, s_pre, mask)), `eager(*args)` the same op without the custom-op
    dispatch (returns out). Both take the spec's inputs in order, the seed as an int64 tensor.
    The custom op is registered on first use of `custom` (the dispatcher does that when it
    loads a backend: torch.compile cannot trace a registration)."""

    def __init__(self, spec: OpSpec, backend: Backend) -> None:
        self.spec = spec
        self.backend = backend
        self.plan = _Plan(spec)
        # the backend's functions are looked up on every call, not bound here: a test (or a
        # profiler) may wrap them on the backend object after the op was created
        self.forward_name = spec.forward
        self.backward_name = spec.backward
        self._custom = None

    def eager(self, *args: Any) -> Tensor:
        """The op's output, through a plain autograd.Function (eager mode only)."""
        return _Eager.apply(*args, self)

    @property
    def custom(self):
        """The `torch.library` custom op `llm_adapters::<op>_<backend>`."""
        return self._custom if self._custom is not None else self.register()

    def register(self):
        """Register the custom op pair (once) and return the forward op."""
        if self._custom is None:
            self._custom = self._custom_op()
        return self._custom

    def _custom_op(self):
        spec, plan, backend = self.spec, self.plan, self.backend
        qualname = f"llm_adapters::{spec.name}_{backend.name}"
        seed_at, seed_b = plan.seed_at, plan.seed_in_backward
        at = spec.at

        def forward(*args):
            args = list(args)
            args[seed_at] = int(args[seed_at])
            return getattr(backend, spec.forward)(*args)

        fwd = torch.library.custom_op(qualname, forward, mutates_args=(),
                                      schema=_schema(spec.inputs, len(spec.outputs)))

        @fwd.register_fake
        def _(*args):
            values = {n: args[i] for n, i in at.items()}
            x = args[0]
            stored = backend.stores_mask and args[at[spec.dropout]] > 0
            out = (
                x.new_empty(spec.shape("out", values)),
                x.new_empty(spec.shape("s_pre", values), dtype=acc_dtype(x.dtype)),
                x.new_empty(spec.shape("mask", values) if stored else (0,), dtype=torch.bool),
            )
            if spec.extra_out:
                kept = args[at[spec.extra_flag]]
                out += (x.new_empty(spec.shape(spec.extra_out, values) if kept else (0,)),)
            return out

        bwd_inputs = (("g", "Tensor"), *((n, dict(spec.inputs)[n]) for n in spec.saved),
                      *((n, "Tensor") for n in spec.outputs[1:]), ("needs", "bool[]"))

        def backward_impl(*args):
            args = list(args)
            args[seed_b] = int(args[seed_b])
            return getattr(backend, spec.backward)(*args)

        bwd = torch.library.custom_op(qualname + "_backward", backward_impl, mutates_args=(),
                                      schema=_schema(bwd_inputs, len(spec.grads)))

        @bwd.register_fake
        def _(*args):
            g, needs = args[0], args[-1]
            values = {n: args[1 + j] for j, n in enumerate(spec.saved)}
            acc = acc_dtype(g.dtype)
            return tuple(
                g.new_empty(spec.shape(n, values) if need else (0,),
                            dtype=g.dtype if j == 0 or n in spec.act_grads else acc)
                for j, (n, need) in enumerate(zip(spec.grads, needs))
            )

        def setup_context(ctx, inputs, output):
            _setup(plan, ctx, inputs, output)
            ctx.mark_non_differentiable(*output[1:])

        def backward(ctx, g, *_kept):
            args, needs = _backward_args(plan, ctx, g)
            return tuple(_input_grads(plan, ctx, bwd(*args), needs, g))

        fwd.register_autograd(backward, setup_context=setup_context)
        return fwd


_bound: dict[tuple[str, str], BoundOp] = {}


def bound_op(op: str, backend: Backend) -> BoundOp:
    """The BoundOp of `op` (a key of SPECS) on `backend`, made once per process."""
    key = (backend.name, op)
    bound = _bound.get(key)
    if bound is None:
        bound = _bound[key] = BoundOp(SPECS[op], backend)
    return bound


def lora_op(backend: Backend):
    """The autograd-aware custom op running `backend`'s LoRA / parallel-adapter kernels."""
    return bound_op("lora", backend).custom


def lora_add_op(backend: Backend):
    """The autograd-aware custom op adding `backend`'s LoRA / parallel branch into y0."""
    return bound_op("lora_add", backend).custom


def series_op(backend: Backend):
    """The autograd-aware custom op running `backend`'s series bottleneck adapter kernels."""
    return bound_op("series", backend).custom
