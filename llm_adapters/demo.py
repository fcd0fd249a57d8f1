"""`llm-adapters demo`: LoRA on a tiny random LLaMA, a few training steps, save and reload.

A self-contained smoke run of the whole stack (no downloads): inject, train, save in PEFT's
format, load into a fresh base model and check the outputs agree.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def run(steps: int = 20, rank: int = 8, seed: int = 0) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import llm_adapters as la

    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = la.get_adapter_model(
        LlamaForCausalLM(config),
        la.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=targets),
    )
    model.print_trainable_parameters()
    ids = torch.randint(0, config.vocab_size, (8, 64))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    start = time.perf_counter()
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    model.eval()
    with tempfile.TemporaryDirectory() as out:
        la.save_adapter(model, out)
        torch.manual_seed(seed)
        reloaded = la.load_adapter(LlamaForCausalLM(config), out)
        with torch.no_grad():
            diff = (reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
    tokens_per_s = steps * ids.numel() / elapsed
    print(f"{tokens_per_s:,.0f} tokens/s on {ids.device}; reload max |diff| = {diff.item():.2e}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "reload_diff": diff.item()}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="LoRA on a tiny random LLaMA: train, save, reload")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: 0 if run(a.steps, a.rank, a.seed)["reload_diff"] == 0 else 1)
