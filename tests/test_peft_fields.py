"""Every field of PEFT's LoraConfig: honoured with PEFT's logits, both ways, or refused by name.

No silent wrong result: each honoured field (and combinations) is built with PEFT, saved,
loaded by us and compared; built by us, saved, loaded by PEFT and compared. Each refused field
is an error naming it, with the base model untouched.
"""

import copy
import dataclasses
import json
import os
import re
import shutil
import warnings

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import llm_adapters as la
from llm_adapters import ops
from llm_adapters.config import HONOURED, METADATA, PEFT_LORA_FIELDS, REFUSED, config_from_dict
from llm_adapters.models.peft_interop import acceleration_report

peft = pytest.importorskip("peft")

QV = ["q_proj", "v_proj"]
# PEFT LoraConfig fields -> values; each is honoured: equal logits with PEFT, both ways
HONOURED_CASES = {
    "alpha_pattern": dict(alpha_pattern={"v_proj": 64}),
    "rank_pattern": dict(rank_pattern={"v_proj": 2, "q_proj": 6}),
    "pattern_regex_keys": dict(
        rank_pattern={r"model\.layers\.0\.self_attn\.q_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.(q|v)_proj": 3},
    ),
    "rslora_patterns": dict(use_rslora=True, rank_pattern={"v_proj": 2},
                            alpha_pattern={"q_proj": 32}),
    "layers_to_transform": dict(layers_to_transform=[1]),
    "layers_to_transform_int_pattern": dict(layers_to_transform=0, layers_pattern="layers"),
    "modules_to_save": dict(modules_to_save=["lm_head"]),
    "target_regex": dict(target_modules=r".*\.(q_proj|o_proj)"),
    "all_linear": dict(target_modules="all-linear"),
    "exclude_list": dict(target_modules=["q_proj", "k_proj", "v_proj"],
                         exclude_modules=["k_proj"]),
    "exclude_regex": dict(target_modules=["q_proj", "down_proj"],
                          exclude_modules=r".*layers\.0\..*"),
    "init_false": dict(init_lora_weights=False),
    "init_gaussian": dict(init_lora_weights="gaussian"),
    "init_orthogonal": dict(init_lora_weights="orthogonal"),
    "use_dora": dict(use_dora=True),
    "dora_rslora_patterns": dict(use_dora=True, use_rslora=True, rank_pattern={"v_proj": 2},
                                 init_lora_weights=False),
    "metadata": dict(inference_mode=False, revision="main"),
    "combination": dict(
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], exclude_modules=["k_proj"],
        rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 20}, layers_to_transform=[0, 1],
        layers_pattern="layers", modules_to_save=["lm_head"], use_rslora=True,
    ),
}

# refused PEFT LoraConfig fields -> a value that turns them on
REFUSED_VALUES = {
    "lora_bias": True,
    "target_parameters": ["mlp.gate_proj.weight"],
    "trainable_token_indices": [1, 2],
    "layer_replication": [[0, 1]],
    "megatron_config": {"num_layers": 2},
    "loftq_config": {"loftq_bits": 4},
    "corda_config": {"corda_method": "ipm"},
    "lora_ga_config": {"direction": "ArBr"},
    "velora_config": {"rank": 2},
    "alora_invocation_tokens": [5, 6],
    "use_qalora": True,
    "monteclora_config": {"n_samples": 2},
    "use_bdlora": {"nblocks": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"beta": 0.1},
    "ensure_weight_tying": True,
}
REFUSED_OTHER = {  # honoured fields with values we refuse
    "task_type": "SEQ_CLS",
    "init_lora_weights": ["pissa", "pissa_niter_4", "olora", "corda", "lora_ga", "loftq", "mica"],
}


def _perturb(model, seed=0):
    """Non-trivial adapter weights: random LoRA A/B, and the trained copies moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _logits(model):
    with torch.no_grad():
        return model(**tiny_batch()).logits


def _peft_model(fields):
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": QV,
                             "task_type": "CAUSAL_LM", **fields})
    model = peft.get_peft_model(tiny_model("llama"), cfg)
    _perturb(model)
    return model.eval()


def _fingerprint(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
    )


def _assert_untouched(model, before):
    state, types = before
    after_state, after_types = _fingerprint(model)
    assert after_types == types
    assert after_state.keys() == state.keys()
    for k in state:
        assert torch.equal(after_state[k], state[k]), k


def _ranks(model):
    return {n.removeprefix("base_model.model."): m.lora_A["default"].weight.shape[0]
            if isinstance(m.lora_A, torch.nn.ModuleDict) else m.lora_A.weight.shape[0]
            for n, m in model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("case", sorted(HONOURED_CASES))
def test_we_load_peft_field_with_equal_logits(case, tmp_path):
    theirs = _peft_model(HONOURED_CASES[case])
    want = _logits(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = la.load_adapter(tiny_model("llama"), str(tmp_path))
    assert _ranks(ours.base_model) == _ranks(theirs)
    torch.testing.assert_close(_logits(ours), want, rtol=1e-5, atol=1e-5)
    # the fields changed the result: the same adapter without them would not pass
    assert not torch.allclose(_logits(tiny_model("llama")), want, atol=1e-3)


@pytest.mark.parametrize("case", sorted(HONOURED_CASES))
def test_peft_loads_our_field_with_equal_logits(case, tmp_path):
    fields = {"r": 4, "lora_alpha": 8, "target_modules": QV, "task_type": "CAUSAL_LM",
              **HONOURED_CASES[case]}
    ours = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(**fields))
    reference = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**fields))
    assert _ranks(ours.base_model) == _ranks(reference)
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    # PEFT's in-memory DoRA name `lora_magnitude_vector.default.weight` is ours (and both
    # files') `lora_magnitude_vector`
    peft_trainable = {n.removeprefix("base_model.model.").replace(".default.", ".")
                      .replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
                      for n, p in reference.named_parameters() if p.requires_grad}
    assert {n.removeprefix("base_model.").replace(".default.", ".")
            for n in ours_trainable} == peft_trainable
    _perturb(ours)
    ours.eval()
    want = _logits(ours)
    la.save_adapter(ours, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), want, rtol=1e-5, atol=1e-5)
    again = la.load_adapter(tiny_model("llama"), str(tmp_path))
    torch.testing.assert_close(_logits(again), want, rtol=1e-5, atol=1e-5)


def test_alpha_pattern_changes_the_scaling():
    ours = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(
        r=4, lora_alpha=8, target_modules=QV, alpha_pattern={"v_proj": 64}))
    scales = {n.rsplit(".", 1)[-1]: m.scaling for n, m in ours.base_model.named_modules()
              if isinstance(m, la.layers.LoraLinear)}
    assert scales == {"q_proj": 2.0, "v_proj": 16.0}


def test_modules_to_save_trains_a_copy_and_uses_peft_keys(tmp_path):
    base = tiny_model("llama")
    original = base.lm_head.weight.detach().clone()
    ours = la.get_adapter_model(base, la.LoraConfig(r=4, target_modules=QV,
                                                    modules_to_save=["lm_head"]))
    _perturb(ours)
    la.save_adapter(ours, str(tmp_path))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert "base_model.model.lm_head.weight" in keys
    merged = la.unload_adapter(ours, merge=True)
    assert isinstance(merged.lm_head, torch.nn.Linear)
    assert not torch.equal(merged.lm_head.weight, original)
    plain = la.unload_adapter(la.load_adapter(tiny_model("llama"), str(tmp_path)))
    torch.testing.assert_close(plain.lm_head.weight, original)


def test_init_variants_only_change_the_initial_weights():
    for init in ("gaussian", "orthogonal", True):
        ours = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(
            r=4, target_modules=QV, init_lora_weights=init))
        torch.testing.assert_close(_logits(ours), _logits(tiny_model("llama")))
        layer = dict(ours.named_modules())["base_model.model.layers.0.self_attn.q_proj"]
        if init == "gaussian":
            assert abs(layer.lora_A.weight.std().item() - 1 / 4) < 0.05
        if init == "orthogonal":
            assert layer.lora_B.weight.abs().max() > 0


# ---- every PEFT field classified; refused ones named ---------------------------------------
def test_every_peft_lora_field_is_classified():
    names = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unclassified = sorted(names - set(PEFT_LORA_FIELDS))
    assert not unclassified, f"PEFT LoraConfig fields not classified: {unclassified}"
    ours = {f.name for f in dataclasses.fields(la.LoraConfig)}
    assert names <= ours, f"la.LoraConfig does not accept {sorted(names - ours)}"
    refused = {n for n, kind in PEFT_LORA_FIELDS.items() if kind == REFUSED}
    assert refused == set(REFUSED_VALUES)
    assert set(PEFT_LORA_FIELDS.values()) == {HONOURED, METADATA, REFUSED}


def test_peft_config_dict_reads_as_ours():
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, task_type="CAUSAL_LM",
                          rank_pattern={"v_proj": 2}, modules_to_save=["lm_head"])
    ours = config_from_dict(cfg.to_dict())
    assert ours.r == 4 and ours.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert ours.modules_to_save == ["lm_head"] and ours.task_type == "CAUSAL_LM"
    assert la.LoraConfig(task_type=peft.TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"


def _refusals():
    yield from REFUSED_VALUES.items()
    yield "task_type", REFUSED_OTHER["task_type"]
    for init in REFUSED_OTHER["init_lora_weights"]:
        yield "init_lora_weights", init


@pytest.mark.parametrize("name,value", list(_refusals()))
def test_refused_field_is_named_in_config(name, value):
    with pytest.raises(ValueError, match=re.escape(name)):
        la.LoraConfig(r=4, target_modules=QV, **{name: value})


@pytest.fixture(scope="module")
def plain_peft_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    _peft_model({}).save_pretrained(str(path))
    return path


def _with_field(src, dst, **fields):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg_path = os.path.join(dst, "adapter_config.json")
    with open(cfg_path) as f:
        data = json.load(f)
    data.update(fields)
    with open(cfg_path, "w") as f:
        json.dump(data, f)
    return str(dst)


@pytest.mark.parametrize("name,value", list(_refusals()) + [("future_field", 3)])
def test_refused_field_in_adapter_file_leaves_model_untouched(name, value, plain_peft_dir,
                                                              tmp_path):
    path = _with_field(plain_peft_dir, tmp_path / "a", **{name: value})
    model = tiny_model("llama")
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=re.escape(name)):
        la.load_adapter(model, path)
    with pytest.raises(ValueError, match=re.escape(name)):
        la.read_adapter_config(path)
    _assert_untouched(model, before)


def test_eva_adapter_loads_but_eva_init_is_refused(plain_peft_dir, tmp_path):
    path = _with_field(plain_peft_dir, tmp_path / "eva", init_lora_weights="eva")
    want = la.load_adapter(tiny_model("llama"), str(plain_peft_dir))
    got = la.load_adapter(tiny_model("llama"), path)
    torch.testing.assert_close(_logits(got), _logits(want))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        la.get_adapter_model(tiny_model("llama"), la.LoraConfig(init_lora_weights="eva"))


@pytest.mark.parametrize("fields,named", [
    (dict(lora_bias=True), "lora_bias"),
    (dict(target_modules=["embed_tokens", "q_proj"]), "embed_tokens"),
    (dict(target_modules=[], target_parameters=["mlp.gate_proj.weight"]), "target_parameters"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
])
def test_real_peft_files_with_refused_features(fields, named, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _peft_model(fields).save_pretrained(str(tmp_path))
    model = tiny_model("llama")
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=re.escape(named)):
        la.load_adapter(model, str(tmp_path))
    _assert_untouched(model, before)


def test_embedding_target_named_when_creating():
    model = tiny_model("llama")
    before = _fingerprint(model)
    with pytest.raises(ValueError, match="target_modules.*embed_tokens.*Embedding"):
        la.get_adapter_model(model, la.LoraConfig(target_modules=["embed_tokens"]))
    _assert_untouched(model, before)


# ---- corrupt files ----------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(damage, plain_peft_dir, tmp_path):
    path = _with_field(plain_peft_dir, tmp_path / "bad")
    weights = os.path.join(path, "adapter_model.safetensors")
    data = open(weights, "rb").read()
    new = {"truncate": data[: len(data) - 100], "garbage": b"\xff" * 64, "empty": b""}[damage]
    with open(weights, "wb") as f:
        f.write(new)
    model = tiny_model("llama")
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=re.escape(weights) + ".*corrupt or truncated"):
        la.load_adapter(model, path)
    _assert_untouched(model, before)


def test_corrupt_bin_names_the_file(plain_peft_dir, tmp_path):
    path = _with_field(plain_peft_dir, tmp_path / "bin")
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    legacy = os.path.join(path, "adapter_model.bin")
    state = {"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}
    torch.save(state, legacy)
    data = open(legacy, "rb").read()
    with open(legacy, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(legacy) + ".*corrupt or truncated"):
        la.load_adapter(tiny_model("llama"), path)


# ---- accelerate_peft reports what it leaves on PEFT ---------------------------------------
def _accelerate(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.accelerate_peft(model)
    return acceleration_report(model), " ".join(str(w.message) for w in caught)


@pytest.mark.parametrize("fields,reason", [
    (dict(lora_bias=True), "lora_bias"),
])
def test_accelerate_peft_reports_variants_by_name(fields, reason):
    model = _peft_model(fields)
    want = _logits(model)
    report, message = _accelerate(model)
    assert not report.accelerated and len(report.left_on_peft) == 4
    assert all(reason in why for why in report.left_on_peft.values())
    assert "0 of 4 LoRA layers run on llm_adapters ops; 4 left on PEFT" in message
    assert "model.layers.0.self_attn.q_proj" in message and reason in message
    torch.testing.assert_close(_logits(model), want)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("fields", [dict(use_dora=True),
                                    dict(use_dora=True, use_rslora=True, lora_dropout=0.1)])
def test_accelerate_peft_runs_dora_on_our_op(family, fields, monkeypatch):
    """A PEFT DoRA model runs on ops.dora_linear: PEFT's logits and every adapter gradient
    (A, B, magnitude) in eval mode, and in training mode without dropout."""
    targets = QV if family == "llama" else ["c_attn"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **fields)
    peft_model = peft.get_peft_model(tiny_model(family), cfg)
    _perturb(peft_model)
    peft_model.eval()
    ours = copy.deepcopy(peft_model)
    calls = []
    real = ops.dora_linear
    monkeypatch.setattr(ops, "dora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    report, message = _accelerate(ours)
    assert report.accelerated and not report.left_on_peft

    def step(model, train):
        model.train(train)
        model.zero_grad(set_to_none=True)
        out = model(**tiny_batch())
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()
                                     if p.requires_grad}

    # training mode compared where nothing else draws random numbers (GPT-2 has its own dropout)
    modes = [False] + ([True] if not fields.get("lora_dropout") and family == "llama" else [])
    for train in modes:
        want, want_grads = step(peft_model, train)
        got, got_grads = step(ours, train)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got_grads.keys() == want_grads.keys()
        assert any("lora_magnitude_vector" in n for n in got_grads)
        for n, g in want_grads.items():
            torch.testing.assert_close(got_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert len(calls) == len(modes) * len(report.accelerated)
    if fields.get("lora_dropout"):  # our mask: a training step runs, every adapter learns
        _, grads = step(ours, True)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_accelerate_peft_mixed_model_reports_each_layer():
    model = _peft_model(dict(target_modules=["q_proj", "v_proj", "embed_tokens"]))
    want = _logits(model)
    report, message = _accelerate(model)
    assert len(report.accelerated) == 4 and len(report.left_on_peft) == 1
    (name, why), = report.left_on_peft.items()
    assert name.endswith("embed_tokens") and "Embedding" in why
    assert "4 of 5 LoRA layers run on llm_adapters ops; 1 left on PEFT" in message
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)


def test_accelerate_peft_twice_says_already_accelerated():
    model = _peft_model({})
    report, message = _accelerate(model)
    assert len(report.accelerated) == 4 and not message
    report, message = _accelerate(model)
    assert not report.accelerated and len(report.already_accelerated) == 4
    assert "already accelerated" in message and "no PEFT LoRA" not in message


def _bnb_4bit_llama():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_model("llama")
    for layer in model.model.layers:
        for name in QV:
            old = getattr(layer.self_attn, name)
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False,
                                    compute_dtype=torch.float32, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(old.weight.data.clone(), requires_grad=False,
                                           quant_type="nf4")
            setattr(layer.self_attn, name, new.to("cpu"))
    model.is_loaded_in_4bit = True
    return model


def test_accelerate_peft_on_qlora_runs_our_op():
    # PEFT's bitsandbytes LoRA layers: the base keeps its product, our op adds the branch
    # (tests/test_qlora_peft.py compares logits, gradients, dtypes and dropout in detail)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_bnb_4bit_llama(), peft.LoraConfig(
            r=4, target_modules=QV, task_type="CAUSAL_LM"))
    _perturb(model)
    # train mode (no dropout here): on CPUs with AVX512-BF16, bitsandbytes' eval-mode no_grad
    # 4-bit path repacks the weight and needs in_features % 64 == 0, which width 32 is not
    want = _logits(model.train())
    report, message = _accelerate(model)
    assert len(report.accelerated) == 4 and not report.left_on_peft and not message
    _, again = _accelerate(model)
    assert "already accelerated" in again
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)


def test_accelerate_peft_on_a_model_without_lora_says_so():
    with pytest.raises(ValueError, match="no PEFT LoRA"):
        la.accelerate_peft(tiny_model("llama"))


def test_accelerate_peft_keeps_several_adapters_and_the_active_one(monkeypatch):
    """A PEFT model with two LoRA adapters: accelerated, it keeps both and the active one, and
    switching adapters afterwards gives PEFT's logits (our op runs whichever is active)."""
    model = _peft_model({})
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=QV))
    _perturb(model, seed=3)
    model.set_adapter("other")
    model.eval()
    want = {name: None for name in ("other", "default")}
    for name in want:
        model.set_adapter(name)
        want[name] = _logits(model)
    model.set_adapter("other")
    report, _ = _accelerate(model)
    assert len(report.accelerated) == 4 and not report.left_on_peft
    assert model.active_adapter == "other" and set(model.peft_config) == {"default", "other"}
    calls = []
    real = ops.lora_linear
    monkeypatch.setattr(ops, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name in ("other", "default"):
        model.set_adapter(name)
        torch.testing.assert_close(_logits(model), want[name], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want["other"], want["default"])
    assert len(calls) == 2 * len(report.accelerated)  # our op ran for both adapters
