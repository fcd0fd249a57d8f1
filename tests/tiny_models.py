"""Tiny random Hugging Face causal LMs, one per supported family (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
_LLAMA = dict(_COMMON, intermediate_size=48, num_key_value_heads=2, max_position_embeddings=128)

FAMILY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_LLAMA),
    "mistral": lambda: tf.MistralConfig(**_LLAMA),
    "qwen2": lambda: tf.Qwen2Config(**_LLAMA),
    "qwen3": lambda: tf.Qwen3Config(**_LLAMA, head_dim=8),
    "gemma": lambda: tf.GemmaConfig(**_LLAMA, head_dim=8),
    "phi3": lambda: tf.Phi3Config(**_LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    "falcon": lambda: tf.FalconConfig(**_COMMON),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_COMMON, intermediate_size=48),
    "gptj": lambda: tf.GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128
    ),
    "gpt_neo": lambda: tf.GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=128, window_size=16,
    ),
    "opt": lambda: tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=128,
    ),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128
    ),
}
FAMILIES = sorted(FAMILY_CONFIGS)


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A float32 causal LM of `family` with random weights, in eval mode."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family]())
    return model.eval()


def tiny_batch(batch: int = 2, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """input_ids, an attention mask with left padding on the first row, and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def adapter_state(model):
    """What a refused call must leave as it was: the state dict, which parameters train, the
    active adapters, the adapters, and each LoRA layer's active list and merged flag."""
    from llm_adapters import LoraLinear

    return {k: v.clone() for k, v in model.state_dict().items()}, {
        n: p.requires_grad for n, p in model.named_parameters()
    }, model.active_adapters, list(model.peft_config), [
        (m.active_adapters, m.merged) for m in model.get_base_model().modules()
        if isinstance(m, LoraLinear)
    ]


def assert_adapter_state(before, model):
    """`model` is in the state `adapter_state` recorded as `before`, tensors bit for bit."""
    assert adapter_state(model)[1:] == before[1:]
    now = model.state_dict()
    assert list(now) == list(before[0])
    assert all(torch.equal(now[k], v) for k, v in before[0].items())


def nf4_linear(k: int = 72, n: int = 40, seed: int = 0) -> torch.nn.Module:
    """A bitsandbytes NF4 Linear4bit [n, k] with a bias (float32 compute), quantized from a
    seeded nn.Linear, frozen, on CPU; the caller skips when bitsandbytes is missing."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    q = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def count_calls(monkeypatch, holder, names) -> list[str]:
    """Replace each function `holder.<name>` for `name` in `names` by one that records its
    name in the returned list, in call order, and then calls the original."""
    calls: list[str] = []
    for name in names:
        real = getattr(holder, name)
        monkeypatch.setattr(
            holder, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw)
        )
    return calls


def perturb(model, seed: int = 0, names=("lora_A", "lora_B")) -> None:
    """Trained-looking adapter weights, in place: each parameter whose name contains one of
    `names` drawn N(0, 0.2²), each DoRA magnitude scaled by 1 + 0.3·N(0, 1) (off its init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in names):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
