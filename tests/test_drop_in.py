"""Our models where PEFT models go: transformers.Trainer and TRL's SFTTrainer save and resume
them as adapters, PEFT's names (get_base_model, base_model, peft_config, disable_adapter,
merge_and_unload, from_pretrained) mean what they mean there, and stacking is refused."""

import os

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import llm_adapters as la
from llm_adapters.models.hf_trainer import _keyed_adapter_parameters

transformers = pytest.importorskip("transformers")

KINDS = {
    "lora": lambda: la.LoraConfig(r=4, lora_alpha=8),
    "series": lambda: la.BottleneckConfig(bottleneck_size=8),
    "adapterp": lambda: la.BottleneckConfig(bottleneck_size=8, use_adapterp=True),
    "parallel": lambda: la.BottleneckConfig(bottleneck_size=8, use_parallel_adapter=True),
    "prefix": lambda: la.PrefixTuningConfig(num_virtual_tokens=3),
    "prompt": lambda: la.PromptTuningConfig(num_virtual_tokens=3),
}
MODEL_FILES = {"adapter_config.json", "adapter_model.safetensors"}
# what Trainer writes beside any model it saves (PEFT's checkpoints have them too)
TRAINER_EXTRAS = {"training_args.bin"}


def _perturb(model, scale=0.1):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def _adapter_state(model):
    return {k: p.detach().clone() for k, p in _keyed_adapter_parameters(model).items()}


def _structure(model):
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
    )


def _same_structure(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name, (grad, value) in a[1].items():
        assert b[1][name][0] == grad and torch.equal(b[1][name][1], value), name


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, length=9):
        self.batch = tiny_batch(batch=n, length=length, seed=3)
        self.batch["attention_mask"][:] = 1
        self.batch["labels"] = self.batch["input_ids"].clone()

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def _args(out, **kw):
    base = dict(
        output_dir=str(out), per_device_train_batch_size=2, learning_rate=5e-2, max_steps=2,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=100,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, lr_scheduler_type="constant",
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _model_files(directory):
    return set(os.listdir(directory)) - TRAINER_EXTRAS


# ---- transformers.Trainer ---------------------------------------------------------------------
def test_trainer_save_model_writes_the_adapter_that_we_and_peft_load(tmp_path):
    peft = pytest.importorskip("peft")
    model = la.get_adapter_model(tiny_model("llama"), KINDS["lora"]())
    before = _adapter_state(model)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "run"),
                                   train_dataset=_Rows())
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in _adapter_state(model).items())
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert _model_files(out) == MODEL_FILES  # no model.safetensors, no base weights
    model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        want = model(**batch).logits
        ours = la.load_adapter(tiny_model("llama"), str(out))
        torch.testing.assert_close(ours(**batch).logits, want, rtol=0, atol=0)
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(out)).eval()
        torch.testing.assert_close(theirs(**batch).logits, want, rtol=1e-5, atol=1e-5)


class _StateAtBegin(transformers.TrainerCallback):
    """The adapter's tensors when training (re)starts, after any checkpoint has loaded."""

    def __init__(self, model):
        self.model, self.state = model, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = _adapter_state(self.model)


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_trainer_checkpoints_hold_the_adapter_and_resume_restores_it(kind, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    model = la.get_adapter_model(tiny_model("llama"), KINDS[kind]())
    transformers.Trainer(
        model=model, args=_args(out, save_strategy="steps", save_steps=2), train_dataset=_Rows()
    ).train()
    ckpt = out / "checkpoint-2"
    assert MODEL_FILES <= set(os.listdir(ckpt))
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(ckpt))
    saved = load_file(str(ckpt / "adapter_model.safetensors"))

    torch.manual_seed(123)  # another starting point, which the resume must overwrite
    fresh = la.get_adapter_model(tiny_model("llama"), KINDS[kind]())
    _perturb(fresh)
    assert any(not torch.equal(saved[k], v) for k, v in _adapter_state(fresh).items())
    probe = _StateAtBegin(fresh)
    trainer = transformers.Trainer(
        model=fresh, args=_args(out, max_steps=3), train_dataset=_Rows(), callbacks=[probe]
    )
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert probe.state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(probe.state[key], value), key
    assert trainer.state.global_step == 3
    assert all(p.requires_grad for p in _keyed_adapter_parameters(fresh).values())
    assert any(not torch.equal(saved[k], v) for k, v in _adapter_state(fresh).items())


# ---- TRL ----------------------------------------------------------------------------------------
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "one two three four five"] * 3


def _tokenizer_and_model():
    from helpers_tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(TEXTS, 300)
    return tokenizer, build_model(len(tokenizer))


def _sft(model, tokenizer, out, **kw):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    args = trl.SFTConfig(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=3, learning_rate=5e-2,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=100,
        disable_tqdm=True, max_length=32, dataloader_num_workers=0,
    )
    return trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer, **kw,
    )


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_sft_trainer_trains_and_saves_our_model(kind, tmp_path):
    tokenizer, hf = _tokenizer_and_model()
    model = la.get_adapter_model(hf, KINDS[kind]())
    before = _adapter_state(model)
    trainer = _sft(model, tokenizer, tmp_path / "run")
    trainer.train()
    after = _adapter_state(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    trainer.save_model(str(tmp_path / "saved"))
    assert MODEL_FILES <= set(os.listdir(tmp_path / "saved"))
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(tmp_path / "saved"))
    loaded = la.load_adapter(_tokenizer_and_model()[1], str(tmp_path / "saved"))
    assert _adapter_state(loaded).keys() == after.keys()
    for key, value in after.items():
        assert torch.equal(_adapter_state(loaded)[key], value), key


def test_sft_trainer_with_peft_config_runs_on_our_op(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    from llm_adapters import ops

    calls = []
    original = ops.lora_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "lora_linear", counting)
    tokenizer, hf = _tokenizer_and_model()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM")
    trainer = _sft(hf, tokenizer, tmp_path / "run", peft_config=config)
    la.accelerate_peft(trainer.model)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if "lora_B" in n}
    trainer.train()
    assert len(calls) >= 2 * 2 * 2  # 2 steps x 2 layers x (q, v), forward alone
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()
               if n in before)
    trainer.save_model(str(tmp_path / "saved"))
    assert MODEL_FILES <= set(os.listdir(tmp_path / "saved"))
    assert "model.safetensors" not in os.listdir(tmp_path / "saved")


# ---- PEFT's names -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "prefix", "prompt"])
def test_base_model_means_what_peft_and_transformers_mean(kind, tmp_path):
    hf = tiny_model("llama")
    config = KINDS[kind]()
    model = la.get_adapter_model(hf, config)
    _perturb(model)
    assert model.get_base_model() is hf
    view = model.base_model
    assert view.model is hf  # PEFT: peft_model.base_model.model is the HF model
    assert view.config is hf.config and view.lm_head is hf.lm_head  # attributes forwarded
    assert view.layers is hf.model.layers  # then the decoder's, as transformers' base_model
    assert model.peft_config == {"default": model.adapter_config}
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert all(k.startswith(("base_model.", "prefix_encoder.", "prompt_embedding."))
               for k in model.state_dict())
    # called, base_model is the adapted decoder without the head (what TRL's loss calls)
    batch = tiny_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden = view(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        from_hidden = hf.lm_head(hidden.last_hidden_state)
    torch.testing.assert_close(from_hidden, logits[:, -batch["input_ids"].shape[1]:],
                               rtol=1e-5, atol=1e-5)
    # save_pretrained / from_pretrained, PEFT's spelling of save_adapter / load_adapter
    model.save_pretrained(str(tmp_path))
    loaded = type(model).from_pretrained(tiny_model("llama"), str(tmp_path))
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_first_adapter_named_default_and_unknown_names_refused():
    # several LoRA adapters are tested in test_multi_adapter.py
    model = la.get_adapter_model(tiny_model("llama"), KINDS["lora"]())
    model.set_adapter("default")
    with pytest.raises(ValueError, match="'other' not found"):
        model.set_adapter("other")
    with pytest.raises(ValueError, match="'other' does not exist"):
        model.delete_adapter("other")
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        model.load_adapter("somewhere", adapter_name="other")
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_disable_adapter_gives_the_base_output_and_restores(kind):
    hf = tiny_model("llama")
    batch = tiny_batch()
    gen = dict(input_ids=batch["input_ids"], max_new_tokens=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = hf(**batch).logits
    ref_gen = hf.generate(**gen)
    model = la.get_adapter_model(hf, KINDS[kind]())
    _perturb(model)
    with torch.no_grad():
        adapted = model(**batch).logits
        assert not torch.allclose(adapted[:, -ref.shape[1]:], ref)
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=0)
            assert torch.equal(model.generate(**gen), ref_gen)
        torch.testing.assert_close(model(**batch).logits, adapted, rtol=0, atol=0)


def test_disable_adapter_on_merged_lora():
    hf = tiny_model("llama")
    batch = tiny_batch()
    with torch.no_grad():
        ref = hf(**batch).logits
    model = la.get_adapter_model(hf, KINDS["lora"]())
    _perturb(model)
    la.merge_adapter(model)
    with torch.no_grad():
        merged = model(**batch).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(**batch).logits, merged, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_returns_the_merged_hf_model():
    hf = tiny_model("llama")
    model = la.get_adapter_model(hf, KINDS["lora"]())
    _perturb(model)
    batch = tiny_batch()
    with torch.no_grad():
        adapted = model(**batch).logits
    merged = model.merge_and_unload()
    assert merged is hf and not any(isinstance(m, la.LoraLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted, rtol=1e-4, atol=1e-5)


# ---- prompt tuning generate with return_dict_in_generate --------------------------------------
@pytest.mark.parametrize("beams", [1, 2])
def test_prompt_tuning_generate_returns_a_dict_starting_with_the_input(beams):
    model = la.get_adapter_model(tiny_model("llama"), KINDS["prompt"]()).eval()
    _perturb(model, 1.0)
    ids = tiny_batch()["input_ids"]
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=beams, num_return_sequences=beams,
              pad_token_id=0)
    plain = model.generate(input_ids=ids, **kw)
    out = model.generate(input_ids=ids, return_dict_in_generate=True, output_scores=True, **kw)
    assert torch.equal(out.sequences, plain)
    assert out.sequences.shape == (ids.shape[0] * beams, ids.shape[1] + 3)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids.repeat_interleave(beams, 0))
    assert len(out.scores) == 3
    if beams == 1:  # greedy: each new token is the argmax of its step's scores
        picked = torch.stack([s.argmax(-1) for s in out.scores], dim=1)
        assert torch.equal(picked, out.sequences[:, ids.shape[1]:])
    else:
        assert out.sequences_scores.shape == (ids.shape[0] * beams,)


# ---- stacking and PEFT models are refused ---------------------------------------------------
def test_a_second_adapter_is_refused_and_nothing_changes():
    model = la.get_adapter_model(tiny_model("llama"), KINDS["lora"]())
    _perturb(model)
    before = _structure(model)
    for target in (model, model.get_base_model()):
        for config in (KINDS["prefix"](), KINDS["series"](), KINDS["lora"]()):
            with pytest.raises(ValueError, match="already has adapters.*LoRA.*several adapters"):
                la.get_adapter_model(target, config)
    _same_structure(before, _structure(model))


def test_peft_models_are_sent_to_accelerate_peft(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    before = _structure(theirs)
    la.save_adapter(la.get_adapter_model(tiny_model("llama"), KINDS["lora"]()), str(tmp_path))
    with pytest.raises(ValueError, match=r"already a PeftModel.*la.accelerate_peft\(model\)"):
        la.get_adapter_model(theirs, KINDS["lora"]())
    with pytest.raises(ValueError, match=r"already a PeftModel.*la.accelerate_peft\(model\)"):
        la.load_adapter(theirs, str(tmp_path))
    with pytest.raises(ValueError, match="PEFT adapter layers.*accelerate_peft"):
        la.get_adapter_model(theirs.base_model.model, KINDS["prefix"]())
    _same_structure(before, _structure(theirs))
