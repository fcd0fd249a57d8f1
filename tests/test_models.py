"""Adapters injected into tiny random models of every supported family."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, tiny_batch, tiny_model

import llm_adapters as la

KINDS = {
    "lora": lambda: la.LoraConfig(r=4, lora_alpha=8),
    "series": lambda: la.BottleneckConfig(bottleneck_size=8),
    "adapterp": lambda: la.BottleneckConfig(bottleneck_size=8, use_adapterp=True),
    "parallel": lambda: la.BottleneckConfig(bottleneck_size=8, use_parallel_adapter=True),
    "prefix": lambda: la.PrefixTuningConfig(num_virtual_tokens=3),
    "prompt": lambda: la.PromptTuningConfig(num_virtual_tokens=3),
}


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _structure(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {
        n: p.requires_grad for n, p in model.named_parameters()
    }


def _perturb(wrapper):
    """Give the adapters non-trivial values (LoRA's B starts at zero)."""
    with torch.no_grad():
        for p in wrapper.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_lifecycle(family, tmp_path):
    batch = tiny_batch()
    base = tiny_model(family)
    with torch.no_grad():
        ref = base(**batch).logits
    before = _snapshot(base)
    model = la.get_adapter_model(base, la.LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=0)

    # one optimizer step changes adapter parameters only
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    opt.step()
    model.eval()
    trainable = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    for name, value in model.base_model.state_dict().items():
        original = name.replace(".base_layer.", ".")
        if ".lora_" in name:
            continue
        assert torch.equal(value, before[original]), name
    assert any(
        not torch.equal(p, torch.zeros_like(p))
        for n, p in model.named_parameters() if "lora_B" in n
    )

    with torch.no_grad():
        adapted = model(**batch).logits
    assert not torch.allclose(adapted, ref)

    # save -> load into a fresh base model: identical outputs
    la.save_adapter(model, str(tmp_path))
    loaded = la.load_adapter(tiny_model(family), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, adapted, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())

    # merged output equals unmerged; unmerge restores the base weights
    weights = {n: p.detach().clone() for n, p in model.base_model.named_parameters()
               if n.endswith("base_layer.weight")}
    la.merge_adapter(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, adapted, rtol=1e-4, atol=1e-5)
    la.unmerge_adapter(model)
    for n, p in model.base_model.named_parameters():
        if n in weights:
            ulp = torch.finfo(torch.float32).eps * weights[n].abs().max().item()
            torch.testing.assert_close(p, weights[n], rtol=0, atol=4 * ulp)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["series", "adapterp", "parallel", "prefix", "prompt"])
def test_other_kinds_train_save_and_load(family, kind, tmp_path):
    batch = tiny_batch()
    base = tiny_model(family)
    with torch.no_grad():
        ref = base(**batch).logits
    model = la.get_adapter_model(base, KINDS[kind]())
    _perturb(model)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, n
    model.eval()
    with torch.no_grad():
        out = model(**batch).logits
    if kind == "prompt":  # logits of the virtual tokens come first, as in PEFT
        assert out.shape[1] == ref.shape[1] + 3
    assert out[:, -ref.shape[1]:].shape == ref.shape
    assert not torch.allclose(out[:, -ref.shape[1]:], ref)
    la.save_adapter(model, str(tmp_path))
    loaded = la.load_adapter(tiny_model(family), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, out, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_trains_on_llama(kind):
    torch.manual_seed(0)
    model = la.get_adapter_model(tiny_model("llama"), KINDS[kind]())
    model.train()
    batch = tiny_batch(batch=4, length=12)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # a random tiny model starts near uniform (loss ~ log 96): falling steadily is the signal
    assert losses[-1] < losses[0] - 0.03, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 20, losses


def test_series_placement_follows_llm_adapters():
    model = la.get_adapter_model(tiny_model("llama"), la.BottleneckConfig(bottleneck_size=8))
    mlp = model.get_base_model().model.layers[0].mlp
    assert mlp.gate_proj.placement == "input" and mlp.up_proj.placement == "input"
    assert mlp.down_proj.placement == "output"
    assert mlp.gate_proj.adapter_down.weight.shape == (8, 32)  # on the 32-wide input side
    assert mlp.down_proj.adapter_up.weight.shape == (32, 8)  # on the 32-wide output side
    p = la.get_adapter_model(tiny_model("llama"), la.BottleneckConfig(8, use_adapterp=True))
    adapted = [n for n, m in p.named_modules() if isinstance(m, la.BottleneckAdapter)]
    assert adapted and all(n.endswith("mlp.down_proj") for n in adapted)


def test_learned_scaling_and_zero_up_init():
    base = tiny_model("llama")
    batch = tiny_batch()
    with torch.no_grad():
        ref = base(**batch).logits
    cfg = la.BottleneckConfig(bottleneck_size=8, scaling="learned", init_weights="zero_up")
    model = la.get_adapter_model(base, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=0)
    model.train()
    _perturb(model)
    model(**batch).loss.backward()
    scales = [m.adapter_scale for m in model.modules() if isinstance(m, la.BottleneckAdapter)]
    assert scales and all(s.grad is not None and s.grad.abs() > 0 for s in scales)


def test_lora_bias_all_trains_biases_and_round_trips(tmp_path):
    cfg = la.LoraConfig(r=4, bias="all")
    model = la.get_adapter_model(tiny_model("qwen2"), cfg)  # qwen2 has q/k/v biases
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith("base_layer.bias") for n in trainable)
    assert any(n.endswith("k_proj.bias") for n in trainable)
    _perturb(model)
    model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(**batch).logits
    la.save_adapter(model, str(tmp_path))
    loaded = la.load_adapter(tiny_model("qwen2"), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, out, rtol=0, atol=0)


def test_prefix_tuning_is_exactly_a_key_value_prefix():
    """A prefix holding the keys/values of real tokens reproduces running those tokens."""
    base = tiny_model("llama")
    ids = tiny_batch(batch=2, length=10)["input_ids"]
    n = 4
    with torch.no_grad():
        full = base(input_ids=ids[:1].repeat(2, 1), use_cache=True)
        cache = full.past_key_values if hasattr(full, "past_key_values") else full.cache
    model = la.get_adapter_model(base, la.PrefixTuningConfig(num_virtual_tokens=n))
    enc = model.prefix_encoder
    layers = []
    for i in range(enc.num_layers):
        layer = cache.layers[i] if hasattr(cache, "layers") else None
        k = layer.keys if layer is not None else cache[i][0]
        v = layer.values if layer is not None else cache[i][1]
        layers += [k[0, :, :n], v[0, :, :n]]  # [H, P, D] each
    table = torch.stack(layers).permute(2, 0, 1, 3).reshape(n, -1)
    with torch.no_grad():
        enc.embedding.weight.copy_(table)
        rest = ids[:1, n:].repeat(2, 1)
        mask = torch.ones_like(rest)
        got = model(input_ids=rest, attention_mask=mask).logits
    torch.testing.assert_close(got, full.logits[:, n:], rtol=1e-4, atol=1e-5)


def test_prompt_tuning_is_exactly_prepended_embeddings():
    base = tiny_model("llama")
    ids = tiny_batch(batch=1, length=10)["input_ids"]
    n = 3
    with torch.no_grad():
        full = base(input_ids=ids).logits
    model = la.get_adapter_model(base, la.PromptTuningConfig(num_virtual_tokens=n))
    with torch.no_grad():
        model.prompt_embedding.embedding.weight.copy_(base.get_input_embeddings()(ids[0, :n]))
        got = model(input_ids=ids[:, n:], attention_mask=torch.ones_like(ids[:, n:])).logits
    torch.testing.assert_close(got[:, n:], full[:, n:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "series", "prefix"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    batch = tiny_batch(batch=2, length=8)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = la.get_adapter_model(tiny_model("llama"), KINDS[kind]())
        _perturb(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        loss = model(**batch).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_lora_with_dropout_under_checkpointing_replays_the_same_mask():
    batch = tiny_batch(batch=2, length=8)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(r=4, lora_dropout=0.3))
        _perturb(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(1)
        model(**batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_decoder_layer_matches_eager():
    model = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(r=4, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    _perturb(model)
    layer = model.get_base_model().model.layers[0]
    rotary = model.get_base_model().model.rotary_emb
    x = torch.randn(2, 7, 32, requires_grad=True)
    pos = torch.arange(7).unsqueeze(0).expand(2, -1)
    emb = rotary(x, pos)

    def run(fn):
        out = fn(x, position_embeddings=emb, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        leaves = [x] + [p for p in layer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.square().sum(), leaves)
        return out, grads

    eager_out, eager_grads = run(layer)
    compiled = torch.compile(layer, backend="inductor")
    out, grads = run(compiled)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


# ---- bad input: a clear error, and the model untouched -------------------------------------
@pytest.mark.parametrize(
    "config, message",
    [
        (la.LoraConfig(r=4, target_modules=["q_proj", "qkv"]), r"\['qkv'\] not found"),
        (la.LoraConfig(r=4, target_modules=["mlp"]), "only nn.Linear"),
        (la.BottleneckConfig(8, target_modules=["lm_head", "nope"]), "not found"),
    ],
)
def test_bad_targets_leave_the_model_unchanged(config, message):
    base = tiny_model("llama")
    structure, state = _structure(base), _snapshot(base)
    with pytest.raises(ValueError, match=message):
        la.get_adapter_model(base, config)
    assert _structure(base) == structure
    after = _snapshot(base)
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_unknown_family_needs_explicit_targets():
    base = tiny_model("llama")
    base.config.model_type = "mystery"
    with pytest.raises(ValueError, match="no default target modules for model type 'mystery'"):
        la.get_adapter_model(base, la.LoraConfig(r=4))


def test_config_validation_names_the_field():
    for kwargs, field in [(dict(r=0), "r must"), (dict(lora_dropout=1.5), "lora_dropout"),
                          (dict(bias="some"), "bias must")]:
        with pytest.raises(ValueError, match=field):
            la.LoraConfig(**kwargs)
    with pytest.raises(ValueError, match="non_linearity"):
        la.BottleneckConfig(non_linearity="swishy")
    with pytest.raises(ValueError, match="exclusive"):
        la.BottleneckConfig(use_parallel_adapter=True, use_adapterp=True)
    with pytest.raises(ValueError, match="scaling"):
        la.BottleneckConfig(scaling="big")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        la.PrefixTuningConfig(num_virtual_tokens=0)


def test_adapter_from_another_architecture_or_rank_is_refused(tmp_path):
    src = la.get_adapter_model(tiny_model("gpt2"), la.LoraConfig(r=4))
    la.save_adapter(src, str(tmp_path / "gpt2"))
    target = tiny_model("llama")
    structure = _structure(target)
    with pytest.raises(ValueError, match="trained on a gpt2 model"):
        la.load_adapter(target, str(tmp_path / "gpt2"))
    assert _structure(target) == structure

    src = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(r=4))
    la.save_adapter(src, str(tmp_path / "r4"))
    cfg_path = tmp_path / "r4" / "adapter_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"r": 4', '"r": 8'))
    with pytest.raises(ValueError, match="another rank or architecture"):
        la.load_adapter(target, str(tmp_path / "r4"))
    assert _structure(target) == structure

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        la.load_adapter(target, str(tmp_path / "missing"))


def test_adding_adapters_twice_is_refused_and_unload_restores():
    base = tiny_model("llama")
    structure = _structure(base)
    model = la.get_adapter_model(base, la.LoraConfig(r=4))
    with pytest.raises(ValueError, match="already has adapters"):
        la.get_adapter_model(base, la.LoraConfig(r=4))
    with pytest.raises(ValueError, match="only LoRA adapters can be merged"):
        la.merge_adapter(la.get_adapter_model(tiny_model("llama"), KINDS["series"]()))
    restored = la.unload_adapter(model)
    assert restored is base and _structure(base) == structure


def test_merge_and_unload_keeps_the_adapted_function():
    base = tiny_model("llama")
    model = la.get_adapter_model(base, la.LoraConfig(r=4))
    _perturb(model)
    batch = tiny_batch()
    with torch.no_grad():
        adapted = model(**batch).logits
    merged = la.unload_adapter(model, merge=True)
    assert not any(isinstance(m, la.LoraLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_with_each_kind(beams):
    batch = tiny_batch(batch=2, length=6)
    for kind in KINDS:
        model = la.get_adapter_model(tiny_model("llama"), KINDS[kind]())
        model.eval()
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=beams,
            num_return_sequences=beams,
        )
        assert out.shape == (2 * beams, 10), kind
        prompts = batch["input_ids"].repeat_interleave(beams, 0)
        assert torch.equal(out[:, :6], prompts), kind


def test_prefix_generation_continues_the_forward():
    """Greedy generation's first token is the argmax of the training-path forward."""
    model = la.get_adapter_model(tiny_model("llama"), KINDS["prefix"]())
    _perturb(model)
    model.eval()
    ids = tiny_batch(batch=2, length=6)["input_ids"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out[:, -1], logits[:, -1].argmax(-1))


def test_legacy_bin_adapter_loads(tmp_path):
    src = la.get_adapter_model(tiny_model("llama"), la.LoraConfig(r=4))
    _perturb(src)
    src.eval()
    la.save_adapter(src, str(tmp_path))
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(state, tmp_path / "adapter_model.bin")
    loaded = la.load_adapter(tiny_model("llama"), str(tmp_path))
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, src(**batch).logits, rtol=0, atol=0)


def test_print_trainable_parameters(capsys):
    model = la.get_adapter_model(copy.deepcopy(tiny_model("llama")), la.LoraConfig(r=4))
    model.print_trainable_parameters()
    text = capsys.readouterr().out
    trainable, total = model.trainable_parameters_summary()
    assert f"trainable params: {trainable:,}" in text and f"all params: {total:,}" in text
    assert trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)  # 2 layers: q (32 out), v (16 out)
