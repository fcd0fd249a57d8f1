"""PEFT QLoRA interop: accelerate_peft on PEFT's bitsandbytes LoRA layers, adapters crossing
between PEFT and us on the same quantized base, and training loss curves against PEFT's.

The base is a tiny random LLaMA loaded through transformers' BitsAndBytesConfig (NF4 with
double quantization, or LLM.int8), as users load one. "Equal" is measured, never assumed:
each comparison's floor is the same computation done twice by PEFT on fresh models (the
base kernel's own run-to-run difference; 0 on bitsandbytes' CPU kernels), and the tolerance
is twice that plus a float32 rounding allowance for the branch being added in another order
(one addmm into the base output instead of PEFT's separate product and sum). Each test prints
what it measured (pytest -s).
"""

import warnings

import pytest
import torch

import llm_adapters as la
from llm_adapters import ops
from llm_adapters._numerics import dropout_threshold
from llm_adapters.models import peft_interop
from llm_adapters.models.peft_interop import acceleration_report

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # bitsandbytes' cast notices

TARGETS = ["q_proj", "v_proj", "down_proj"]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer LLaMA with widths bitsandbytes' CPU 4-bit inference path accepts (in_features
    % 64 == 0, out_features % 32 == 0), saved as a checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qllama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def quantized(model_dir, fmt, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if fmt == "nf4":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    else:
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg,
                                                    dtype=dtype)


def peft_qlora(model_dir, fmt, seed=0, dtype=torch.float32, **fields):
    fields = {"lora_dropout": 0.0, **fields}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                          **fields)
    model = peft.get_peft_model(quantized(model_dir, fmt, dtype), cfg)
    randomise(model, seed)
    return model


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def batch(seed=1, rows=2, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (rows, length), generator=g)
    return {"input_ids": ids, "labels": ids}


def tolerance(floor: float, ref: torch.Tensor) -> float:
    return 2 * floor + 8 * EPS32 * float(ref.abs().max())


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def train_step(model, data):
    model.zero_grad()
    out = model(**data)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def count_lora_add(monkeypatch):
    calls = []
    real = ops.lora_add

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_interop.ops, "lora_add", counted)
    return calls


# ---- accelerate_peft on PEFT's bitsandbytes LoRA layers ----------------------------------------
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_accelerate_peft_on_qlora_equal_logits_and_gradients(model_dir, fmt, monkeypatch):
    data = batch()
    twice = peft_qlora(model_dir, fmt).train()
    floor_logits, floor_grads = train_step(twice, data)
    model = peft_qlora(model_dir, fmt).train()
    want_logits, want_grads = train_step(model, data)
    floor = diff(want_logits, floor_logits)
    floor_g = max(diff(want_grads[n], floor_grads[n]) for n in want_grads)

    la.accelerate_peft(model)
    report = acceleration_report(model)
    assert len(report.accelerated) == 2 * len(TARGETS) and not report.left_on_peft
    calls = count_lora_add(monkeypatch)
    got_logits, got_grads = train_step(model, data)
    assert len(calls) == 2 * len(TARGETS)  # every LoRA layer ran on our op
    d = diff(got_logits, want_logits)
    dg = max(diff(got_grads[n], want_grads[n]) / float(want_grads[n].abs().max())
             for n in want_grads)
    print(f"\n{fmt}: accelerated vs PEFT: logits {d:.3g} (PEFT twice {floor:.3g}), "
          f"gradients {dg:.3g} relative (PEFT twice {floor_g:.3g})")
    assert d <= tolerance(floor, want_logits)
    for n in want_grads:
        assert diff(got_grads[n], want_grads[n]) <= tolerance(floor_g, want_grads[n]), n
    model.eval()
    with torch.no_grad():
        fast = model(**data).logits
        la.restore_peft(model)
        slow = model(**data).logits
    assert diff(fast, slow) <= tolerance(0.0, slow)


def _qdora_or_several(model_dir, fmt, kind):
    """PEFT's QLoRA model with DoRA ("dora": the default adapter), or two active adapters
    ("lora+lora"; "lora+dora": the second DoRA, "dora+lora": the first)."""
    model = peft_qlora(model_dir, fmt, use_dora=kind.startswith("dora"))
    if kind != "dora":
        model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS,
                                                   use_dora=kind.endswith("+dora")))
        randomise(model, 3)
        model.base_model.set_adapter(["default", "other"])
    return model.train()


# PEFT's own DoRA forward fails in training mode on bitsandbytes' CPU LLM.int8 layers (an
# AttributeError inside bitsandbytes' int8 matmul), so DoRA is compared on NF4 only
@pytest.mark.parametrize("fmt,kind", [("nf4", "dora"), ("nf4", "lora+dora"), ("nf4", "dora+lora"),
                                      ("nf4", "lora+lora"), ("int8", "lora+lora")])
def test_accelerate_peft_on_qdora_and_several_active_adapters(model_dir, fmt, kind,
                                                              monkeypatch):
    data = batch()
    floor_logits, floor_grads = train_step(_qdora_or_several(model_dir, fmt, kind), data)
    model = _qdora_or_several(model_dir, fmt, kind)
    want_logits, want_grads = train_step(model, data)
    floor = diff(want_logits, floor_logits)
    floor_g = max(diff(want_grads[n], floor_grads[n]) for n in want_grads)
    assert any("lora_magnitude_vector" in n for n in want_grads) == ("dora" in kind)

    la.accelerate_peft(model)
    report = acceleration_report(model)
    assert len(report.accelerated) == 2 * len(TARGETS) and not report.left_on_peft
    calls = []
    for op in ("lora_add", "dora_add"):
        real = getattr(ops, op)
        monkeypatch.setattr(peft_interop.ops, op,
                            lambda *a, _r=real, _o=op, **kw: calls.append(_o) or _r(*a, **kw))
    got_logits, got_grads = train_step(model, data)
    layers = 2 * len(TARGETS)  # every LoRA layer ran on our ops, each active adapter once
    want_calls = [f"{k}_add" for k in kind.split("+")] * layers
    assert sorted(calls) == sorted(want_calls)
    d = diff(got_logits, want_logits)
    dg = max(diff(got_grads[n], want_grads[n]) / float(want_grads[n].abs().max())
             for n in want_grads)
    print(f"\n{fmt} {kind}: accelerated vs PEFT: logits {d:.3g} (PEFT twice {floor:.3g}), "
          f"gradients {dg:.3g} relative (PEFT twice {floor_g:.3g})")
    # every layer sums in another float32 order than PEFT here (each further branch added into
    # the output by one addmm; DoRA's row norm from ‖W‖² and rank-sized products rather than
    # the norm of W + s·B A), and the first layers' gradients pass through all of them: eight
    # times the rounding allowance of one reordered branch (measured: up to 3.3e-6 relative)
    ulps = 8
    assert d <= 2 * floor + ulps * 8 * EPS32 * float(want_logits.abs().max())
    for n in want_grads:
        ref = want_grads[n]
        assert float(ref.abs().max()) > 0, n
        assert diff(got_grads[n], ref) <= 2 * floor_g + ulps * 8 * EPS32 * float(ref.abs().max()), n


def test_accelerate_peft_on_qlora_leaves_lora_bias_on_peft(model_dir):
    reason = "lora_bias"
    model = peft_qlora(model_dir, "nf4", lora_bias=True)
    model.eval()
    data = batch()
    with torch.no_grad():
        want = model(**data).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.accelerate_peft(model)
    report = acceleration_report(model)
    assert not report.accelerated and len(report.left_on_peft) == 2 * len(TARGETS)
    assert all(reason in why for why in report.left_on_peft.values())
    assert any(reason in str(w.message) for w in caught)
    with torch.no_grad():
        assert torch.equal(model(**data).logits, want)


def _one_layer(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("fmt,xdtype", [("nf4", torch.bfloat16), ("nf4", torch.float16),
                                         ("int8", torch.float16)])
def test_accelerated_qlora_layer_dtypes_as_peft(model_dir, fmt, xdtype):
    """Half-precision activations, float32 adapter weights: PEFT casts x to lora_A's dtype and
    its branch back to the base output's; ours returns that dtype too, and is at least about
    as close to float64 as PEFT (the project's parity rule), output and adapter gradients."""
    model = peft_qlora(model_dir, fmt, dtype=xdtype).train()
    layer = _one_layer(model)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    torch.manual_seed(4)
    x = torch.randn(2, 5, 64, dtype=xdtype)
    g = torch.randn(2, 5, 64, dtype=xdtype)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def run():
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(g)
        return y.detach(), xi.grad, a.grad.clone(), b.grad.clone()

    with torch.no_grad():
        y0 = layer.get_base_layer()(x).double()
    s = float(layer.scaling["default"])
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (a, b))
    x64 = x.double()
    ref = y0 + s * (x64 @ a64.t()) @ b64.t()
    ref.backward(g.double())
    theirs = run()
    la.accelerate_peft(model)
    ours = run()
    assert ours[0].dtype == theirs[0].dtype == xdtype and ours[1].dtype == xdtype
    for name, o, t, r in zip(("y", "dA", "dB"), (ours[0], ours[2], ours[3]),
                             (theirs[0], theirs[2], theirs[3]), (ref, a64.grad, b64.grad)):
        err_o, err_t = diff(o, r), diff(t, r)
        print(f"\n{fmt} {xdtype} {name}: ours {err_o:.3g}, PEFT {err_t:.3g} from float64")
        assert err_o <= 2 * err_t + 4 * EPS32 * float(r.abs().max()), name


def test_accelerated_qlora_dropout_is_on_the_branch_input(model_dir):
    """Dropout > 0: our mask is our own, so the reference is PEFT's forward with its dropout
    module applying that same mask (inverted, 1 / realised keep probability)."""
    model = peft_qlora(model_dir, "nf4", lora_dropout=0.3).train()
    layer = _one_layer(model)
    la.accelerate_peft(model)
    torch.manual_seed(5)
    x = torch.randn(3, 7, 64)
    g = torch.randn(3, 7, 64)

    def run(forward):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = forward(xi)
        y.backward(g)
        return y.detach(), xi.grad, *(p.grad.clone() for p in (
            layer.lora_A["default"].weight, layer.lora_B["default"].weight))

    torch.manual_seed(9)
    seed = int(ops.new_seed())
    torch.manual_seed(9)
    ours = run(layer)
    mask = ops.dropout_mask((21, 64), 0.3, seed, backend="torch").view(3, 7, 64)
    scale = dropout_threshold(0.3)[1]
    original = vars(layer)[peft_interop._ORIGINAL]
    dropout = layer.lora_dropout["default"]
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.3
    try:
        layer.lora_dropout["default"] = _Masked(mask, scale)
        theirs = run(original)
        layer.lora_dropout["default"] = torch.nn.Identity()
        undropped = run(original)
    finally:
        layer.lora_dropout["default"] = dropout
    for name, o, t in zip(("y", "dx", "dA", "dB"), ours, theirs):
        assert diff(o, t) <= tolerance(0.0, t), name
    assert diff(ours[0], undropped[0]) > 1e-3  # the mask did something


class _Masked(torch.nn.Module):
    def __init__(self, mask, scale):
        super().__init__()
        self.mask, self.scale = mask, scale

    def forward(self, x):
        return x * self.mask * self.scale


def test_prepare_keeps_4bit_layers_trainable_after_an_evaluation(model_dir):
    """bitsandbytes' CPU inference repacking (AVX512-BF16 machines) cuts the gradient through
    a Linear4bit once it has run in eval mode under no_grad; prepare_model_for_kbit_training
    undoes and prevents it, so training after an evaluation matches training without one, up
    to what the repacking changed for good (it rounds the absmax to bfloat16: measured here as
    the relative change of the dequantized weights, the tolerance a multiple of it)."""
    from llm_adapters.layers._quant import BNB_4BIT, dequantized_weight
    from llm_adapters.models.kbit import keep_4bit_training_kernels

    data = batch()

    def grads(model):
        model = la.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = la.get_adapter_model(model, la.LoraConfig(r=4, lora_alpha=8,
                                                          target_modules=["q_proj"]))
        randomise(model, 5)
        model.train()
        model(**data).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh = quantized(model_dir, "nf4")
    weights = {n: dequantized_weight(m, BNB_4BIT) for n, m in fresh.named_modules()
               if type(m).__name__ == "Linear4bit"}
    want = grads(fresh)
    evaluated = quantized(model_dir, "nf4").eval()
    with torch.no_grad():
        evaluated(**data)
    layers = [m for m in evaluated.modules() if type(m).__name__ == "Linear4bit"]
    repacked = sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
                   for m in layers)
    print(f"\n{repacked} of {len(layers)} Linear4bit layers repacked by an evaluation")
    on = sum(bool(getattr(m, "support_avx512bf16_for_cpu", False)) for m in layers)
    assert keep_4bit_training_kernels(evaluated) == on  # what prepare calls first
    modules = dict(evaluated.named_modules())
    changed = max(diff(dequantized_weight(modules[n], BNB_4BIT), w) / float(w.abs().max())
                  for n, w in weights.items())
    got = grads(evaluated)
    assert keep_4bit_training_kernels(evaluated) == 0  # nothing left to change
    rel = max(diff(got[n], want[n]) / float(want[n].abs().max()) for n in want)
    print(f"  gradients after an evaluation vs without: {rel:.3g} relative; the evaluation "
          f"changed the dequantized weights by {changed:.3g} relative")
    assert all(got[n].abs().sum() > 0 for n in got)  # without the fix: all zero
    assert rel <= 10 * max(changed, EPS32)


# ---- adapters crossing between PEFT and us on the same quantized base -------------------------
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_peft_qlora_adapter_loads_into_ours(model_dir, fmt, tmp_path):
    data = batch()
    theirs = peft_qlora(model_dir, fmt).eval()
    again = peft_qlora(model_dir, fmt).eval()
    with torch.no_grad():
        want = theirs(**data).logits
        floor = diff(again(**data).logits, want)
    theirs.save_pretrained(str(tmp_path))
    ours = la.load_adapter(quantized(model_dir, fmt), str(tmp_path)).eval()
    with torch.no_grad():
        got = ours(**data).logits
    print(f"\n{fmt}: PEFT's adapter in ours: logits {diff(got, want):.3g} (PEFT twice {floor:.3g})")
    assert diff(got, want) <= tolerance(floor, want)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_our_qlora_adapter_loads_into_peft(model_dir, fmt, tmp_path):
    data = batch()
    cfg = la.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    ours = la.get_adapter_model(quantized(model_dir, fmt), cfg)
    randomise(ours, 3)
    ours.eval()
    with torch.no_grad():
        want = ours(**data).logits
        bare = [quantized(model_dir, fmt)(**data).logits for _ in range(2)]
    floor = diff(*bare)
    la.save_adapter(ours, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(quantized(model_dir, fmt), str(tmp_path)).eval()
    assert "bnb" in type(_one_layer(theirs)).__module__  # PEFT's QLoRA layer
    with torch.no_grad():
        got = theirs(**data).logits
    print(f"\n{fmt}: our adapter in PEFT: logits {diff(got, want):.3g} (base twice {floor:.3g})")
    assert diff(got, want) <= tolerance(floor, want) and diff(got, bare[0]) > 1e-3


# ---- loss curves against PEFT's on a 4-bit base -------------------------------------------------
STEPS = 5


def _loss_curve(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for data in batches:
        opt.zero_grad()
        loss = model(**data).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return torch.tensor(losses, dtype=torch.float64)


def _peft_model_for_training(model_dir):
    base = la.prepare_model_for_kbit_training(quantized(model_dir, "nf4"),
                                              use_gradient_checkpointing=False)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    torch.manual_seed(7)  # PEFT's own initialisation (kaiming A, zero B)
    return peft.get_peft_model(base, cfg)


def test_qlora_loss_curve_matches_peft(model_dir):
    """5 AdamW steps on an NF4 base, two fixed batches in turn, dropout 0 (our dropout mask
    is our own, so curves with dropout > 0 cannot be equal step for step); our LoRA starts
    from PEFT's initial adapter weights, copied layer by layer."""
    batches = [batch(seed=10 + i % 2, rows=2, length=12) for i in range(STEPS)]  # A B A B A
    theirs = _loss_curve(_peft_model_for_training(model_dir), batches)
    floor = diff(_loss_curve(_peft_model_for_training(model_dir), batches), theirs)

    init = _peft_model_for_training(model_dir)
    base = la.prepare_model_for_kbit_training(quantized(model_dir, "nf4"),
                                              use_gradient_checkpointing=False)
    ours = la.get_adapter_model(base, la.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    mine = dict(ours.get_base_model().named_modules())
    copied = 0
    with torch.no_grad():
        for name, module in init.base_model.model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                for part in ("lora_A", "lora_B"):
                    theirs_w = getattr(module, part)["default"].weight
                    getattr(mine[name], part).weight.copy_(theirs_w)
                copied += 1
    assert copied == 2 * 7
    curve = _loss_curve(ours, batches)
    accelerated = _loss_curve(la.accelerate_peft(init), batches)
    tol = 2 * floor + 16 * EPS32 * float(theirs.abs().max())
    d, d_acc = diff(curve, theirs), diff(accelerated, theirs)
    print(f"\nNF4 loss curve over {STEPS} AdamW steps: PEFT {theirs.tolist()}\n"
          f"  ours vs PEFT max |dloss| {d:.3g}, accelerate_peft vs PEFT {d_acc:.3g}, "
          f"PEFT twice {floor:.3g}, tolerance {tol:.3g}")
    assert theirs[4] < theirs[2] < theirs[0]  # it trains: batch A's loss falls
    assert d <= tol and d_acc <= tol


def test_trainer_trains_our_adapter_model_on_a_4bit_base(model_dir, tmp_path):
    """transformers' Trainer refuses a quantized model it sees no adapters on; our model is
    recognised as adapted (no flag for the user to set) and its LoRA weights move."""
    import transformers

    model = la.get_adapter_model(
        la.prepare_model_for_kbit_training(quantized(model_dir, "nf4"),
                                           use_gradient_checkpointing=False),
        la.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = [batch(seed=s, rows=1) for s in range(4)]
    data = [{k: v[0] for k, v in r.items()} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    moved = [n for n, p in model.named_parameters() if p.requires_grad
             and not torch.equal(p.detach(), before[n])]
    assert moved and len(moved) == len(before)
