"""`llm-adapters evaluate`: LLM-Adapters' evaluate.py / commonsense_evaluate.py, fixed.

Generates answers for one or more of the 16 test sets and scores them with LLM-Adapters'
extraction rules (`answers.py`). What differs from LLM-Adapters, on purpose:
- batched generation with left padding *and* the attention mask (LLM-Adapters' commonsense
  script padded without passing the mask, so padded prompts were read as text);
- the model is in eval mode for every dataset, generation runs under torch.no_grad;
- the prompt is the one the adapter was trained on (finetune.py's template with an empty
  output); LLM-Adapters evaluated with a whitespace variant of it, which
  `--prompt-style llm-adapters-eval` reproduces byte for byte;
- MAWPS and mathqa are scored (LLM-Adapters' number extractor rejected them), AQuA/mathqa get
  a stricter letter extractor beside LLM-Adapters' first-capital rule;
- the base model may run bare (no adapter), and an adapter that does not fit it is an error
  before any generation;
- per-example results and the summary are written only once a dataset is complete (to a
  temporary file, then renamed), never as a partial file that looks like a result.

`--table DIR` prints the accuracy of every summary in DIR at once, without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from . import answers
from .data import PROMPT_STYLES, RESPONSE_MARKER, DataError, generate_prompt, load_records
from .train import UsageError as FlagError
from .train import add_quantization_flags, quantization_config

SUMMARY_SUFFIX = ".summary.json"
MAX_NEW_TOKENS = {"arithmetic": 256, "letter": 256, "commonsense": 32}  # LLM-Adapters' values


class UsageError(ValueError):
    """A bad flag, data file or adapter, reported before generation starts."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="generate and score answers on LLM-Adapters' test sets",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--base-model", help="local Hugging Face model directory")
    p.add_argument(
        "--adapter-path",
        "--lora-weights",
        dest="adapter_path",
        default=None,
        help="adapter directory (ours or PEFT LoRA); omit to evaluate the bare model",
    )
    p.add_argument(
        "--dataset",
        nargs="+",
        metavar="NAME",
        help=f"one or more of: {', '.join(answers.DATASETS)}",
    )
    p.add_argument("--data-dir", default="dataset", help="directory holding <name>/test.json")
    p.add_argument(
        "--data-path",
        default=None,
        help="one test file (with a single --dataset, which picks the scoring)",
    )
    p.add_argument("--output-dir", default="experiment", help="where results go")
    p.add_argument(
        "--run-name",
        default=None,
        help="prefix of the result files (default: <model>-<adapter> when both labels are "
        "given, as LLM-Adapters names them, else the adapter directory's name, or 'base')",
    )
    p.add_argument("--model", default=None, help="LLM-Adapters' model label, e.g. LLaMA-7B")
    p.add_argument("--adapter", default=None, help="LLM-Adapters' adapter label, e.g. LoRA")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=4, help="LLM-Adapters: 4; 1 is greedy")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default: 256 for arithmetic and AQuA/mathqa, 32 for commonsense",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument(
        "--prompt-style",
        default="llm-adapters",
        choices=tuple(PROMPT_STYLES),
        help="llm-adapters (default): the template finetune trains with; llm-adapters-eval: "
        "the whitespace variant LLM-Adapters' evaluate.py / commonsense_evaluate.py prompt "
        "with, byte for byte; alpaca: Stanford Alpaca's",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: bfloat16 on GPU (float16 where bf16 is missing), float32 on CPU; "
        "LLM-Adapters evaluated in float16",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--table",
        metavar="DIR",
        default=None,
        help="print the results table of the summaries in DIR and exit",
    )
    add_quantization_flags(p)
    p.set_defaults(func=run)
    return p


# ---- results table ---------------------------------------------------------------------------
def load_summaries(directory: str) -> list[dict[str, Any]]:
    """Every `*.summary.json` in a directory, sorted by run then by LLM-Adapters' dataset order."""
    out = []
    for path in sorted(Path(directory).glob(f"*{SUMMARY_SUFFIX}")):
        with open(path) as f:
            out.append(json.load(f))
    order = {d: i for i, d in enumerate(answers.DATASETS)}
    out.sort(key=lambda s: (s.get("run_name", ""), order.get(s.get("dataset"), 99)))
    return out


def format_table(summaries: list[dict[str, Any]]) -> str:
    """A plain-text table: one row per (run, dataset) with accuracy in percent, and per run the
    mean over its datasets."""
    if not summaries:
        return "(no results)"
    rows = [("run", "dataset", "examples", "accuracy %", "LLM-Adapters rule %")]
    by_run: dict[str, list[float]] = {}
    for s in summaries:
        run = s.get("run_name", "")
        ref = s.get("accuracy_llm_adapters")
        rows.append(
            (
                run,
                s["dataset"],
                str(s["examples"]),
                f"{100 * s['accuracy']:.1f}",
                "" if ref is None else f"{100 * ref:.1f}",
            )
        )
        by_run.setdefault(run, []).append(s["accuracy"])
    for run, accs in by_run.items():
        if len(accs) > 1:
            rows.append((run, "mean", str(len(accs)), f"{100 * sum(accs) / len(accs):.1f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- checks before the model loads ------------------------------------------------------------
def load_dataset_records(name: str, data_dir: str, data_path: Optional[str], limit: Optional[int]):
    """(canonical name, file, records) with labels checked for the dataset's scoring rule."""
    try:
        canonical = answers.canonical_dataset(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    path = data_path or os.path.join(data_dir, canonical)
    if data_path is None and not os.path.isdir(path):
        raise UsageError(f"no directory {path!r}: --data-dir must hold {canonical}/test.json")
    records = load_records(path, split="test", required=("instruction", "answer"))
    if limit is not None:
        records = records[:limit]
    kind = answers.dataset_kind(canonical)
    for i, rec in enumerate(records):
        label = rec["answer"]
        if kind == "arithmetic":
            try:
                float(label)
            except ValueError:
                raise DataError(
                    f"{canonical} record {i}: answer {label!r} is not a number"
                ) from None
        elif kind == "letter" and label not in ("A", "B", "C", "D", "E"):
            raise DataError(f"{canonical} record {i}: answer {label!r} is not a letter A-E")
        elif kind == "commonsense" and label not in answers.COMMONSENSE[canonical]:
            raise DataError(
                f"{canonical} record {i}: answer {label!r} is not one of "
                f"{'/'.join(answers.COMMONSENSE[canonical])}"
            )
    return canonical, path, records


def _write_json_atomic(items: list[tuple[str, Any]]) -> None:
    """Write every (path, object) to a temporary file first, then rename them all: a crash
    leaves either the old files or the new ones, never a truncated result."""
    temps = []
    try:
        for path, obj in items:
            fd, tmp = tempfile.mkstemp(
                dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".json"
            )
            temps.append(tmp)
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)
        for (path, _), tmp in zip(items, temps):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


# ---- generation --------------------------------------------------------------------------------
def generation_text(tokenizer, sequences, prompt_len: int) -> list[str]:
    """Decode what follows the prompt; like LLM-Adapters, stop at a further response marker."""
    texts = tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)
    return [t.split(RESPONSE_MARKER)[0].strip() for t in texts]


def evaluate_dataset(model, tokenizer, name: str, records, args, device) -> tuple[list, dict]:
    """Generate for every record, in batches; returns (per-example results, summary)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    kind = answers.dataset_kind(name)
    max_new = args.max_new_tokens or MAX_NEW_TOKENS[kind]
    gen_config = GenerationConfig(
        max_new_tokens=max_new,
        num_beams=args.num_beams,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.eval()
    results, correct, correct_ref = [], 0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(records), desc=name, unit="ex", file=sys.stderr)
    for start in range(0, len(records), args.batch_size):
        batch = records[start : start + args.batch_size]
        prompts = [generate_prompt(r, args.prompt_style, with_output=False) for r in batch]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        input_ids = enc["input_ids"].to(device)
        attention_mask = enc["attention_mask"].to(device)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config
            )
        sequences = out.sequences if hasattr(out, "sequences") else out
        texts = generation_text(tokenizer, sequences, input_ids.shape[1])
        for j, (rec, prompt, text) in enumerate(zip(batch, prompts, texts)):
            verdict = answers.score(name, text, rec["answer"])
            correct += verdict["correct"]
            correct_ref += verdict.get("correct_llm_adapters", False)
            results.append(
                {
                    "index": start + j,
                    "instruction": rec["instruction"],
                    "prompt": prompt,
                    "generation": text,
                    "label": rec["answer"],
                    **verdict,
                }
            )
        bar.update(len(batch))
        bar.set_postfix(acc=f"{correct / len(results):.3f}")
    bar.close()
    n = len(results)
    summary = {
        "dataset": name,
        "kind": kind,
        "examples": n,
        "correct": correct,
        "accuracy": correct / n,
        "seconds": round(time.perf_counter() - t0, 3),
        "num_beams": args.num_beams,
        "max_new_tokens": max_new,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "prompt_style": args.prompt_style,
    }
    if kind == "letter":
        summary["correct_llm_adapters"] = correct_ref
        summary["accuracy_llm_adapters"] = correct_ref / n
    return results, summary


def _pick_device_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.dtype
    if name == "auto":
        # bf16 rather than LLM-Adapters' fp16: same range as fp32, so no family overflows
        if device.startswith("cuda"):
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            name = "float32"
    return torch.device(device), getattr(torch, name)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (UsageError, DataError) as exc:
        print(f"llm-adapters evaluate: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.table is not None:
        if not os.path.isdir(args.table):
            raise UsageError(f"--table {args.table!r} is not a directory")
        print(format_table(load_summaries(args.table)))
        return 0
    if not args.base_model:
        raise UsageError("--base-model is required (or --table DIR to print results)")
    if not args.dataset:
        raise UsageError("--dataset is required")
    if args.data_path and len(args.dataset) != 1:
        raise UsageError("--data-path goes with exactly one --dataset (it picks the scoring rule)")
    for flag in ("batch_size", "num_beams"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be positive")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be positive")
    if not os.path.isfile(os.path.join(args.base_model, "config.json")):
        raise UsageError(
            f"--base-model {args.base_model!r} is not a local model directory (no config.json)"
        )
    if args.adapter_path is not None and not os.path.isfile(
        os.path.join(args.adapter_path, "adapter_config.json")
    ):
        raise UsageError(f"--adapter-path {args.adapter_path!r} holds no adapter_config.json")
    datasets = [
        load_dataset_records(d, args.data_dir, args.data_path, args.limit) for d in args.dataset
    ]
    if len({d[0] for d in datasets}) != len(datasets):
        raise UsageError("a dataset is named twice")
    if args.run_name:
        run_name = args.run_name
    elif args.model and args.adapter:
        run_name = f"{args.model}-{args.adapter}"
    elif args.adapter_path:
        run_name = os.path.basename(os.path.normpath(args.adapter_path))
    else:
        run_name = "base"
    device, dtype = _pick_device_dtype(args)
    try:
        quantization = quantization_config(args, dtype)
    except FlagError as exc:
        raise UsageError(str(exc)) from None
    os.makedirs(args.output_dir, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llm_adapters as la

    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    tokenizer.padding_side = "left"  # generation continues every prompt at its end
    if tokenizer.pad_token_id is None:
        if tokenizer.unk_token_id is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
    load_kw: dict[str, Any] = {"dtype": dtype}
    if quantization is not None:
        # bitsandbytes quantizes as the weights load onto their device: place them there now
        load_kw["quantization_config"] = quantization
        if device.type != "cpu":
            load_kw["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(args.base_model, **load_kw)
    adapter_type = None
    if args.adapter_path is not None:
        try:
            model = la.load_adapter(model, args.adapter_path, is_trainable=False)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(
                f"adapter {args.adapter_path!r} does not fit {args.base_model!r}: {exc}"
            ) from None
        adapter_type = type(model.adapter_config).adapter_type
    if quantization is None:  # a quantized model is on its device already (and cannot move)
        model.to(device)
    model.eval()

    summaries = []
    for name, path, records in datasets:
        results, summary = evaluate_dataset(model, tokenizer, name, records, args, device)
        summary.update(
            run_name=run_name,
            base_model=args.base_model,
            adapter_path=args.adapter_path,
            adapter_type=adapter_type,
            data_file=path if os.path.isfile(path) else os.path.join(path, "test.json"),
            dtype=str(dtype).replace("torch.", ""),
            quantization=None if quantization is None else (
                f"4bit-{quantization.bnb_4bit_quant_type}" if args.load_4bit else "8bit"),
            device=str(device),
        )
        stem = os.path.join(args.output_dir, f"{run_name}-{name}")
        _write_json_atomic([(stem + ".json", results), (stem + SUMMARY_SUFFIX, summary)])
        summaries.append(summary)
        extra = ""
        if "accuracy_llm_adapters" in summary:
            extra = f" (LLM-Adapters' letter rule: {summary['accuracy_llm_adapters']:.4f})"
        print(
            f"{name}: {summary['correct']}/{summary['examples']} correct, accuracy "
            f"{summary['accuracy']:.4f}{extra} -> {stem}.json"
        )
    if len(summaries) > 1:
        print(format_table(summaries))
    return 0
