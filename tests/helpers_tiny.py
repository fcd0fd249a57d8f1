"""A really tiny LLaMA and a tokenizer trained on the spot, saved like a Hugging Face checkpoint.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with `tokenizers` on the texts
given, wrapped in PreTrainedTokenizerFast with <s>/</s>/<pad>/<unk>; the model is a random
2-layer LlamaForCausalLM.
"""

from __future__ import annotations

import json
from pathlib import Path

DATASET_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters" / "dataset"
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer(texts, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # like LLaMA's tokenizer: BOS in front of every sequence, no EOS
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)]),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def build_model(vocab_size: int, hidden: int = 24, layers: int = 2, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def texts_from(records):
    from llm_adapters.data import generate_prompt

    return [generate_prompt(r) for r in records]


def save_tiny(directory, records, vocab_size: int = 400):
    """Train the tokenizer on `records`' prompts, build the model, save both to `directory`."""
    tokenizer = build_tokenizer(texts_from(records), vocab_size)
    model = build_model(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
