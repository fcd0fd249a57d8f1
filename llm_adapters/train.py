"""`llm-adapters finetune`: LLM-Adapters' finetune.py on our adapters and the HF Trainer.

Same flags and defaults as LLM-Adapters (underscore spellings work too), a local base model
and local JSON data. Differences, each on purpose:
- everything is checked before the model loads: the data file and its records, the adapter
  flags, the batch arithmetic, the target modules against the model family;
- the validation split is seeded and the training set is shuffled by the Trainer's seeded
  sampler (LLM-Adapters' extra `.shuffle()` was unseeded);
- train_on_inputs=False masks exactly the tokens of the prompt (see `data.tokenize_record`);
- training batches are padded on the right (positions then start at 0 for every sequence);
- checkpoints hold the adapter (`la.save_adapter`), not a copy of the base model, and the end
  of the run saves the adapter to --output-dir and reports tokens/s.
Runs under `torchrun` / `accelerate launch` unchanged: the Trainer reads the process group
from the environment and the gradient accumulation is divided by the world size.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from typing import Any, Optional

from .data import (
    IGNORE_INDEX,
    PROMPT_STYLES,
    DataError,
    load_records,
    split_train_val,
    tokenize_records,
)

ADAPTER_NAMES = ("lora", "bottleneck", "prefix-tuning", "prompt-tuning")
WEIGHTS_NAME = "adapter_model.safetensors"  # a checkpoint holds the adapter files
TRAIN_LOG = "train_log.json"
QUANT_TYPES = ("nf4", "fp4")  # models.kbit's, spelled here so --help imports no torch
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")


class UsageError(ValueError):
    """A bad flag or input, reported before any model is loaded."""


# ---- argument parsing ------------------------------------------------------------------------
def str2bool(value: str) -> bool:
    """fire-style booleans: --flag, --flag True, --flag=false, --flag 0."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def parse_modules(values: Optional[list[str] | str]) -> Optional[list[str]]:
    """Target modules as users paste them: '["q_proj","v_proj"]', "[q_proj,v_proj]",
    "q_proj,v_proj" or several arguments "q_proj v_proj". None/empty: the family default."""
    if values is None:
        return None
    text = " ".join(values) if isinstance(values, (list, tuple)) else str(values)
    text = text.strip()
    if not text:
        return None
    if text.startswith(("[", "(")):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)) and all(isinstance(x, str) for x in parsed):
            names = [x.strip() for x in parsed]
        else:
            names = text.strip("[]()").replace(",", " ").split()
    else:
        names = text.replace(",", " ").split()
    names = [n.strip().strip("'\"") for n in names]
    names = [n for n in names if n]
    if not names:
        raise UsageError(f"no module names in {text!r}")
    return names


def parse_scaling(value: str) -> float | str:
    if isinstance(value, (int, float)):
        return float(value)
    if value.strip().lower() == "learned":
        return "learned"
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"scaling must be a number or 'learned', got {value!r}"
        ) from None


def _flag_bool(p: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    p.add_argument(
        name, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune an adapter on LLM-Adapters JSON data (LLM-Adapters' finetune.py)",
        description=__doc__.split("\n\n")[0],
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--base-model", required=True, help="local Hugging Face model directory")
    g.add_argument(
        "--data-path",
        required=True,
        help="JSON list of {instruction, input, output} (or a dir with train.json)",
    )
    g.add_argument(
        "--output-dir", default="./lora-alpaca", help="where checkpoints and the adapter go"
    )
    g.add_argument("--adapter-name", default="lora", choices=ADAPTER_NAMES)
    g.add_argument(
        "--prompt-style",
        default="llm-adapters",
        choices=tuple(PROMPT_STYLES),
        help="llm-adapters: finetune.py's template verbatim; alpaca: the unindented original",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="base weights; auto: bfloat16 (or float16) mixed precision on GPU, float32 on CPU",
    )

    g = p.add_argument_group("training (LLM-Adapters defaults)")
    g.add_argument(
        "--batch-size", type=int, default=128, help="global batch (gradient accumulation fills it)"
    )
    g.add_argument("--micro-batch-size", type=int, default=4, help="per-device batch")
    g.add_argument("--num-epochs", type=float, default=3)
    g.add_argument("--learning-rate", type=float, default=3e-4)
    g.add_argument("--cutoff-len", type=int, default=256)
    g.add_argument("--val-set-size", type=int, default=2000)
    _flag_bool(g, "--use-gradient-checkpointing", False, "activation checkpointing")
    g.add_argument("--eval-step", type=int, default=200)
    g.add_argument("--save-step", type=int, default=200)
    _flag_bool(g, "--train-on-inputs", True, "False: the loss skips the prompt tokens")
    _flag_bool(g, "--group-by-length", False, "batch similar lengths together")
    g.add_argument(
        "--resume-from-checkpoint",
        default=None,
        help="a Trainer checkpoint (checkpoint-N) or a saved adapter directory",
    )
    g.add_argument("--warmup-steps", type=int, default=100)
    g.add_argument("--logging-steps", type=int, default=10)
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    g.add_argument("--save-total-limit", type=int, default=3)
    g.add_argument("--seed", type=int, default=42)

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help='e.g. \'["q_proj","v_proj"]\' or q_proj,v_proj (default: the family\'s)',
    )

    g = p.add_argument_group("bottleneck adapters")
    g.add_argument("--bottleneck-size", type=int, default=256)
    g.add_argument("--non-linearity", default="tanh")
    g.add_argument("--adapter-dropout", type=float, default=0.0)
    _flag_bool(g, "--use-parallel-adapter", False, "parallel placement")
    _flag_bool(g, "--use-adapterp", False, "AdapterP placement (MLP output only)")
    g.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help="modules to adapt (LoRA too, when --lora-target-modules is not given)",
    )
    g.add_argument("--scaling", type=parse_scaling, default=1.0, help="a number or 'learned'")

    g = p.add_argument_group("prefix / prompt tuning")
    g.add_argument("--num-virtual-tokens", type=int, default=30)
    _flag_bool(g, "--prefix-projection", False, "prefix tuning through a 2-layer MLP")

    g = p.add_argument_group("wandb (as LLM-Adapters)")
    g.add_argument("--wandb-project", default="")
    g.add_argument("--wandb-run-name", default="")
    g.add_argument("--wandb-watch", default="")
    g.add_argument("--wandb-log-model", default="")
    add_quantization_flags(p)
    p.set_defaults(func=run)
    return p


def add_quantization_flags(p: argparse.ArgumentParser) -> None:
    """--load-8bit (LLM-Adapters' flag) and --load-4bit with QLoRA's options; `finetune` and
    `evaluate` share them."""
    g = p.add_argument_group(
        'quantized base (bitsandbytes; pip install "llm_adapters[qlora]")'
    )
    _flag_bool(g, "--load-8bit", False, "load the base model's Linear layers in 8 bits (LLM.int8)")
    _flag_bool(g, "--load-4bit", False, "load them in 4 bits (QLoRA)")
    g.add_argument(
        "--bnb-4bit-quant-type", choices=QUANT_TYPES, default=None,
        help="with --load-4bit: the 4-bit data type (default nf4)",
    )
    g.add_argument(
        "--bnb-4bit-compute-dtype", choices=COMPUTE_DTYPES, default=None,
        help="with --load-4bit: the dtype its matmul runs in (default: that of --dtype)",
    )
    _flag_bool(g, "--double-quant", None,
               "with --load-4bit: quantize the quantization constants too (default True)")


def quantization_config(args: argparse.Namespace, dtype):
    """The BitsAndBytesConfig the flags ask for (None: load in `dtype`); flag errors and a
    missing bitsandbytes are a UsageError before anything loads."""
    four = [f for f in ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "double_quant")
            if getattr(args, f) is not None]
    if args.load_4bit and args.load_8bit:
        raise UsageError("--load-4bit and --load-8bit exclude each other: pick one")
    if four and not args.load_4bit:
        raise UsageError(f"--{four[0].replace('_', '-')} goes with --load-4bit")
    if not (args.load_4bit or args.load_8bit):
        return None
    import torch

    from .models import kbit

    if args.bnb_4bit_compute_dtype is not None:
        compute = kbit.COMPUTE_DTYPES[args.bnb_4bit_compute_dtype]
    else:
        compute = dtype if dtype in kbit.COMPUTE_DTYPES.values() else torch.float32
    flag = "--load-4bit" if args.load_4bit else "--load-8bit"
    try:
        return kbit.bnb_quantization_config(
            4 if args.load_4bit else 8,
            quant_type=args.bnb_4bit_quant_type or "nf4",
            compute_dtype=compute,
            double_quant=True if args.double_quant is None else args.double_quant,
        )
    except ImportError as exc:
        raise UsageError(f"{flag}: {exc}") from None


# ---- checks before anything loads ------------------------------------------------------------
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation(batch_size: int, micro_batch_size: int, world: int) -> int:
    """LLM-Adapters' rule: batch_size // micro_batch_size, divided by the number of processes."""
    if micro_batch_size < 1 or batch_size < 1:
        raise UsageError("batch_size and micro_batch_size must be positive")
    steps = batch_size // micro_batch_size // world
    if steps < 1:
        raise UsageError(
            f"batch_size={batch_size} is smaller than micro_batch_size={micro_batch_size} x "
            f"{world} process(es): raise batch_size or lower micro_batch_size"
        )
    return steps


def build_config(args: argparse.Namespace):
    """The adapter config for the flags; config errors name the bad field."""
    import llm_adapters as la

    name = args.adapter_name
    try:
        if name == "lora":
            targets = parse_modules(args.lora_target_modules) or parse_modules(args.target_modules)
            return la.LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=targets,
                bias="none",
            )
        if name == "bottleneck":
            return la.BottleneckConfig(
                bottleneck_size=args.bottleneck_size,
                non_linearity=args.non_linearity,
                adapter_dropout=args.adapter_dropout,
                use_parallel_adapter=args.use_parallel_adapter,
                use_adapterp=args.use_adapterp,
                target_modules=parse_modules(args.target_modules),
                scaling=args.scaling,
            )
        if name == "prefix-tuning":
            return la.PrefixTuningConfig(
                num_virtual_tokens=args.num_virtual_tokens, prefix_projection=args.prefix_projection
            )
        return la.PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--adapter-name {name}: {exc}") from None


def check_base_model(path: str, config) -> str:
    """The model type of a local model directory; for LoRA/bottleneck without explicit targets,
    checks that the family has defaults. Reads only config.json."""
    from transformers import AutoConfig

    import llm_adapters as la

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--base-model {path!r} is not a local model directory (no config.json)")
    model_type = AutoConfig.from_pretrained(path).model_type
    if isinstance(config, (la.LoraConfig, la.BottleneckConfig)) and config.target_modules is None:
        kind = "lora" if isinstance(config, la.LoraConfig) else config.placement
        try:
            la.default_target_modules(model_type, kind)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return model_type


def pick_dtype(name: str):
    """(weight dtype, Trainer mixed-precision flags)."""
    import torch

    cuda = torch.cuda.is_available()
    if name == "auto":
        if not cuda:
            return torch.float32, {}
        name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    dtype = getattr(torch, name)
    if dtype == torch.bfloat16:
        return dtype, {"bf16": True}
    if dtype == torch.float16:
        if not cuda:
            raise UsageError("float16 training needs a GPU; use float32 or bfloat16 on CPU")
        return dtype, {"fp16": True}
    return dtype, {}


def _checkpoint_kind(path: Optional[str]) -> Optional[str]:
    """'trainer' (a checkpoint-N directory), 'adapter' (a saved adapter) or None."""
    if not path:
        return None
    if not os.path.isdir(path):
        raise UsageError(f"--resume-from-checkpoint {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        for name in ("adapter_config.json", WEIGHTS_NAME):
            if not os.path.isfile(os.path.join(path, name)):
                raise UsageError(f"{path!r} is a Trainer checkpoint without {name}")
        return "trainer"
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "adapter"
    raise UsageError(
        f"--resume-from-checkpoint {path!r} holds neither a Trainer checkpoint nor an adapter"
    )


# ---- batching and the Trainer ----------------------------------------------------------------
class PadCollator:
    """Right-pads a list of tokenised examples into tensors (labels padded with -100), to a
    multiple of `multiple` tokens as LLM-Adapters' DataCollatorForSeq2Seq(pad_to_multiple_of=8)."""

    def __init__(self, pad_token_id: int, multiple: int = 8):
        self.pad_token_id = pad_token_id
        self.multiple = multiple

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(e["input_ids"]) for e in examples)
        width = -(-longest // self.multiple) * self.multiple
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            t = len(e["input_ids"])
            input_ids[i, :t] = torch.tensor(e["input_ids"])
            attention_mask[i, :t] = 1
            labels[i, :t] = torch.tensor(e["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_trainer_class():
    """The Trainer, counting trained tokens. Saving and resuming need nothing here: a plain
    `transformers.Trainer` writes our models' checkpoints as adapter files and reloads them
    (`llm_adapters.models.hf_trainer`)."""
    import transformers

    class AdapterTrainer(transformers.Trainer):
        tokens_trained = 0

        def training_step(self, model, inputs, *args, **kwargs):
            # non-pad tokens of this micro-batch (soft-prompt tokens are not counted)
            self.tokens_trained += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    return AdapterTrainer


def _length_grouping(training_args_cls, group: bool) -> dict[str, Any]:
    """The TrainingArguments spelling of group_by_length: newer transformers name it
    train_sampling_strategy="group_by_length"."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(training_args_cls)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length" if group else "random"}
    return {"group_by_length": group}


def _all_reduce_sum(value: int) -> int:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


# ---- the command -----------------------------------------------------------------------------
def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (UsageError, DataError) as exc:
        print(f"llm-adapters finetune: error: {exc}", file=sys.stderr)
        return 2
    finally:
        # Tear the process group down before interpreter exit: left to exit-time destructors,
        # gloo's threads can abort a rank ("terminate called without an active exception")
        # after training has finished.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked first.
    world = world_size()
    grad_acc = gradient_accumulation(args.batch_size, args.micro_batch_size, world)
    if args.cutoff_len < 2:
        raise UsageError(f"cutoff_len must be at least 2, got {args.cutoff_len}")
    for flag in ("eval_step", "save_step", "num_virtual_tokens", "logging_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    if args.val_set_size > 0 and args.save_step % args.eval_step:
        raise UsageError(
            f"with a validation set the best checkpoint is kept, so --save-step ({args.save_step}) "
            f"must be a multiple of --eval-step ({args.eval_step})"
        )
    records = load_records(args.data_path, split="train", required=("instruction", "output"))
    try:
        train_records, val_records = split_train_val(records, args.val_set_size, seed=42)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    config = build_config(args)
    resume_kind = _checkpoint_kind(args.resume_from_checkpoint)
    check_base_model(args.base_model, config)
    dtype, precision = pick_dtype(args.dtype)
    quantization = quantization_config(args, dtype)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llm_adapters as la

    main = _main_process()
    if main:
        print(
            "Finetuning with params:\n"
            + "\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items()) if k != "func")
        )
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of {args.base_model!r} has no EOS token")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # LLM-Adapters pads with unk (id 0), never with EOS
        pad_id = (
            tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
        )
    tok_kw = dict(
        cutoff_len=args.cutoff_len, train_on_inputs=args.train_on_inputs, style=args.prompt_style
    )
    train_data, dropped = tokenize_records(tokenizer, train_records, **tok_kw)
    val_data, val_dropped = (
        tokenize_records(tokenizer, val_records, **tok_kw) if val_records else (None, 0)
    )
    if dropped + val_dropped and main:
        print(
            f"dropped {dropped + val_dropped} examples whose prompt fills "
            f"cutoff_len={args.cutoff_len}: nothing to learn"
        )
    if len(train_data) == 0:
        raise UsageError("no training example left after tokenisation (cutoff_len too small?)")

    os.makedirs(args.output_dir, exist_ok=True)
    use_wandb = bool(args.wandb_project) or bool(os.environ.get("WANDB_PROJECT"))
    for key, value in (
        ("WANDB_PROJECT", args.wandb_project),
        ("WANDB_WATCH", args.wandb_watch),
        ("WANDB_LOG_MODEL", args.wandb_log_model),
    ):
        if value:
            os.environ[key] = value
    has_val = val_data is not None and len(val_data) > 0
    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=grad_acc,
        warmup_steps=args.warmup_steps,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        logging_steps=args.logging_steps,
        optim="adamw_torch",
        eval_strategy="steps" if has_val else "no",
        eval_steps=args.eval_step if has_val else None,
        save_strategy="steps",
        save_steps=args.save_step,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None,
        ddp_find_unused_parameters=False if world > 1 else None,
        ddp_backend=None if torch.cuda.is_available() else ("gloo" if world > 1 else None),
        report_to="wandb" if use_wandb else "none",
        run_name=args.wandb_run_name or None,
        seed=args.seed,
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        **precision,
        **_length_grouping(transformers.TrainingArguments, args.group_by_length),
    )

    load_kw: dict[str, Any] = {"dtype": dtype}
    if torch.cuda.is_available():  # each process loads straight onto its own GPU
        load_kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK") or 0)}
    if quantization is not None:
        load_kw["quantization_config"] = quantization
    model = AutoModelForCausalLM.from_pretrained(args.base_model, **load_kw)
    model.config.use_cache = False
    if quantization is not None:
        # QLoRA's recipe: base frozen, its float parameters in float32, checkpointing ready
        model = la.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.use_gradient_checkpointing
        )
    if resume_kind == "adapter":
        # LLM-Adapters' "final adapter" resume: start from its weights, a fresh optimizer
        try:
            model = la.load_adapter(model, args.resume_from_checkpoint, is_trainable=True)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(f"--resume-from-checkpoint: {exc}") from None
        if main:
            print(f"starting from the adapter in {args.resume_from_checkpoint} (its own config)")
    else:
        try:
            model = la.get_adapter_model(model, config)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.use_gradient_checkpointing and quantization is None:
        model.gradient_checkpointing_enable()
    if main:
        model.print_trainable_parameters()

    trainer = make_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=val_data if has_val else None,
        data_collator=PadCollator(pad_id),
    )
    t0 = time.perf_counter()
    result = trainer.train(
        resume_from_checkpoint=args.resume_from_checkpoint if resume_kind == "trainer" else None
    )
    seconds = result.metrics.get("train_runtime") or (time.perf_counter() - t0)
    tokens = _all_reduce_sum(trainer.tokens_trained)
    tokens_per_second = tokens / seconds if seconds > 0 else float("nan")

    if trainer.is_world_process_zero():
        la.save_adapter(model, args.output_dir)
        log = {
            "tokens_trained": tokens,
            "train_seconds": seconds,
            "tokens_per_second": tokens_per_second,
            "global_steps": trainer.state.global_step,
            "world_size": world,
            "gradient_accumulation_steps": grad_acc,
            "train_examples": len(train_data),
            "val_examples": len(val_data) if has_val else 0,
            "metrics": result.metrics,
            "log_history": trainer.state.log_history,
            "args": {k: v for k, v in vars(args).items() if k != "func"},
        }
        with open(os.path.join(args.output_dir, TRAIN_LOG), "w") as f:
            json.dump(log, f, indent=2, default=str)
        print(
            f"trained {tokens:,} tokens in {seconds:.1f}s: {tokens_per_second:,.0f} tokens/s "
            f"({world} process(es)); adapter saved to {args.output_dir}"
        )
    return 0
