"""transformers.Trainer under FSDP saves, checkpoints and resumes our adapters; a PEFT LoRA model
on our op (`accelerate_peft`) trains under FSDP1 with PEFT's auto-wrap policy.

One torchrun launch (two CPU processes, gloo) runs every scenario:
- Trainer with FSDP1 (use_orig_params, a unit per decoder layer) and FULL_STATE_DICT (LoRA) or
  SHARDED_STATE_DICT (a series adapter), and with FSDP2 (fully_shard per decoder layer, LoRA):
  four steps, a checkpoint every two, then `trainer.save_model()`;
- each resumed from its checkpoint-2 by a fresh model (other weights) and a fresh Trainer;
- FSDP1 with `load_best_model_at_end`;
- a PEFT LoRA model (`peft.get_peft_model`) switched to our op by `la.accelerate_peft`, wrapped
  by FSDP1 with PEFT's `fsdp_auto_wrap_policy` (lora_A and lora_B units of their own), three
  AdamW steps.
The tests compare losses and saved adapter files with the same steps in one process.

accelerate turns its FSDP plugin on for accelerator devices only (on CPU it runs DDP instead):
the worker's Trainer turns accelerate's FSDP state on once its Accelerator exists (device cpu,
gloo), so Trainer and accelerate take their FSDP paths - wrapping, state dicts, the FSDP
optimizer checkpoint, resuming - as they do on GPUs. Two things differ from a GPU run:
- FSDP1's full optimizer state dict with `offload_to_cpu` (accelerate's setting) returns, for
  CPU tensors, views of one gather buffer that the next state overwrites (`.cpu()` copies
  nothing there): every Adam `exp_avg` saved would be its `exp_avg_sq`. The worker turns the
  offload off (a clone instead), as nothing needs offloading on CPU anyway.
- Trainer's FSDP2 checkpoint of the optimizer (torch.distributed.checkpoint) walks state-dict
  names by getattr; `AdapterModel._fqn_modifiers` makes `base_model` there the child module
  (not PEFT's view), so FSDP2 resumes the optimizer as FSDP1 does.
With FSDP1 and SHARDED_STATE_DICT Adam starts afresh on resume too, for any model: accelerate
loads the sharded optimizer state into the template of an optimizer that has not stepped yet,
which holds no state to load into.
"""

from __future__ import annotations

import json
import os
import sys
import time

_T0 = time.perf_counter()

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import VOCAB, tiny_model  # noqa: E402
from torchrun_helpers import (  # noqa: E402
    close_process_group,
    read_reports,
    run_torchrun,
    write_report,
)

import llm_adapters as la  # noqa: E402

transformers = pytest.importorskip("transformers")

WORLD, PER_RANK, ROWS, LENGTH = 2, 2, 16, 10
STEPS, SAVE_EVERY = 4, 2
KINDS = {
    "lora": lambda: la.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
    "series": lambda: la.BottleneckConfig(bottleneck_size=8),
}
_LAYER = ["LlamaDecoderLayer"]
_FSDP1 = {"version": 1, "use_orig_params": True, "sync_module_states": False,
          "transformer_layer_cls_to_wrap": _LAYER}
# name -> (adapter kind, fsdp_config, other TrainingArguments, whether the optimizer resumes)
SCENARIOS = {
    "fsdp1_full": ("lora", {**_FSDP1, "state_dict_type": "FULL_STATE_DICT"}, {}, True),
    "fsdp1_sharded": ("series", {**_FSDP1, "state_dict_type": "SHARDED_STATE_DICT"}, {}, False),
    "fsdp2": ("lora", {"version": 2, "transformer_layer_cls_to_wrap": _LAYER,
                       "state_dict_type": "FULL_STATE_DICT"}, {}, True),
}
SAVES = [f"checkpoint-{SAVE_EVERY}", f"checkpoint-{STEPS}", "final"]
MODEL_FILES = {"adapter_config.json", "adapter_model.safetensors"}
PEFT_STEPS = 3


def _perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.train()


def _model(kind, seed=4):
    return _perturb(la.get_adapter_model(tiny_model("llama", seed=3), KINDS[kind]()), seed)


def _ids():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g)  # no padding: equal tokens


class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = _ids()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Trainer(transformers.Trainer):
    """Rows in order, so a step of two ranks sees the rows a step of one process with twice
    the batch sees; accelerate's FSDP state on CPU (see the module docstring)."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is None:
            return
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        if hasattr(state.fsdp_plugin.optim_state_dict_config, "offload_to_cpu"):
            state.fsdp_plugin.optim_state_dict_config.offload_to_cpu = False  # see above
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")
        self.is_fsdp_enabled = True


def _args(out, batch, fsdp_config=None, **kw):
    fsdp = {"fsdp": "full_shard", "fsdp_config": dict(fsdp_config)} if fsdp_config else {}
    kw = {k: v for k, v in kw.items() if fsdp or k != "save_only_model"}
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, learning_rate=1e-2,
        max_steps=STEPS, report_to="none", use_cpu=True, save_strategy="steps",
        save_steps=SAVE_EVERY, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        seed=0, lr_scheduler_type="constant", **fsdp, **kw,
    )


def _losses(trainer, after=0):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > after]


def _peft_model():
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["q_proj", "v_proj"])
    return _perturb(peft.get_peft_model(tiny_model("llama", seed=3), config), 4)


def _train_peft(model, rank=0, world=1):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in _ids()[: PEFT_STEPS * WORLD * PER_RANK].chunk(PEFT_STEPS):
        ids = ids.chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def _trainable(model):
    from llm_adapters.models._distributed import clean_name

    return {clean_name(n): p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad}


# ---- the torchrun worker (this file run as a script) -------------------------------------------
def _peft_worker(out, rank, world):
    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel

    from llm_adapters import ops

    calls = []
    real = ops.lora_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    ops.lora_linear = counting
    try:
        model = la.accelerate_peft(_peft_model())
        wrapped = FullyShardedDataParallel(
            model, use_orig_params=True, device_id=torch.device("cpu"),
            auto_wrap_policy=fsdp_auto_wrap_policy(model),
        )
        lora_a = [m for n, m in wrapped.named_modules() if n.endswith("lora_A.default")]
        losses = _train_peft(wrapped, rank, world)
    finally:
        ops.lora_linear = real
    dist.all_reduce(losses)
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        if rank == 0:
            torch.save(_trainable(wrapped), os.path.join(out, "peft-trained.pt"))
    return {
        "losses": (losses / world).tolist(), "calls": len(calls),
        "accelerated": len(model.llm_adapters_report.accelerated),
        "lora_a_units": sum(isinstance(m, FullyShardedDataParallel) for m in lora_a),
        "lora_a": len(lora_a),
    }


def _worker(out: str) -> None:
    import warnings

    import torch.distributed as dist

    from llm_adapters.models import hf_trainer

    warnings.filterwarnings("ignore")  # FSDP1's deprecation and mixed requires_grad notes
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loads = []
    real_load = hf_trainer.load_weights_in_place

    def counting_load(*args, **kwargs):
        loads.append(args[1])
        return real_load(*args, **kwargs)

    hf_trainer.load_weights_in_place = counting_load
    report = {"losses": {}, "resumed": {}, "loads": loads, "seconds": {}}
    report["seconds"]["import"] = time.perf_counter() - _T0
    try:
        for name, (kind, fsdp_config, extra, _) in SCENARIOS.items():
            start = time.perf_counter()
            run = os.path.join(out, name)
            trainer = _Trainer(model=_model(kind), args=_args(run, PER_RANK, fsdp_config, **extra),
                               train_dataset=_Rows())
            assert trainer.is_fsdp_enabled
            trainer.train()
            report["losses"][name] = _losses(trainer)
            trainer.save_model(os.path.join(run, "final"))
            report["seconds"][name] = time.perf_counter() - start

            start = time.perf_counter()
            resumed = os.path.join(out, f"{name}-resumed")
            trainer = _Trainer(model=_model(kind, seed=123),
                               args=_args(resumed, PER_RANK, fsdp_config, **extra),
                               train_dataset=_Rows())
            trainer.train(resume_from_checkpoint=os.path.join(run, SAVES[0]))
            report["resumed"][name] = _losses(trainer, after=SAVE_EVERY)
            trainer.save_model(os.path.join(resumed, "final"))
            report["seconds"][f"{name}-resumed"] = time.perf_counter() - start
        # load_best_model_at_end: "best" is the highest eval loss, so that it is an earlier
        # checkpoint than the last and loading it changes the adapter
        start = time.perf_counter()
        kind, fsdp_config, _, _ = SCENARIOS["fsdp1_full"]
        run = os.path.join(out, "fsdp1_best")
        best = dict(eval_strategy="steps", eval_steps=SAVE_EVERY, load_best_model_at_end=True,
                    metric_for_best_model="loss", greater_is_better=True)
        trainer = _Trainer(model=_model(kind), args=_args(run, PER_RANK, fsdp_config, **best),
                           train_dataset=_Rows(), eval_dataset=_Rows())
        trainer.train()
        report["best"] = trainer.state.best_model_checkpoint
        trainer.save_model(os.path.join(run, "final"))
        report["seconds"]["fsdp1_best"] = time.perf_counter() - start
        start = time.perf_counter()
        report["peft"] = _peft_worker(out, rank, world)
        report["seconds"]["peft"] = time.perf_counter() - start
    finally:
        write_report(out, rank, report)
        close_process_group()


# ---- the tests -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_trainer")
    seconds = run_torchrun(__file__, out)
    return out, read_reports(out), seconds


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Losses and saved adapters of the same Trainer steps in one process (twice the batch)."""
    out = tmp_path_factory.mktemp("single")
    results = {}
    for name, (kind, _, extra, _) in SCENARIOS.items():
        trainer = _Trainer(model=_model(kind), args=_args(out / name, WORLD * PER_RANK, **extra),
                           train_dataset=_Rows())
        trainer.train()
        trainer.save_model(str(out / name / "final"))
        results[name] = (_losses(trainer), out / name)
    return results


def _assert_same_adapter(saved_dir, single_dir):
    config = "adapter_config.json"
    with open(saved_dir / config) as a, open(single_dir / config) as b:
        assert json.load(a) == json.load(b)
    saved = load_file(saved_dir / "adapter_model.safetensors")
    single = load_file(single_dir / "adapter_model.safetensors")
    assert saved.keys() == single.keys() and single
    for key, t in single.items():
        assert saved[key].shape == t.shape, key
        # measured: at most 1.5e-7 apart (float32 rounding of sums taken in another order)
        torch.testing.assert_close(saved[key], t, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_trainer_under_fsdp_trains_like_one_process(fsdp_run, single_process, name):
    _, reports, _ = fsdp_run
    single, _ = single_process[name]
    losses = reports[0]["losses"][name]
    assert len(losses) == STEPS and reports[1]["losses"][name] == losses
    # measured: at most 4.8e-7 apart (one float32 ulp at 4.6)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_trainer_under_fsdp_saves_the_whole_adapter(fsdp_run, single_process, name, save):
    out, _, _ = fsdp_run
    _, single = single_process[name]
    saved_dir, single_dir = out / name / save, single / save
    files = set(os.listdir(saved_dir))
    assert MODEL_FILES <= files and not {"model.safetensors", "pytorch_model.bin"} & files
    # no FSDP model state beside the adapter (base weights included); the optimizer's is there
    assert not [f for f in files if f.startswith("pytorch_model_fsdp")]
    if save != "final" and not SCENARIOS[name][2].get("save_only_model"):
        assert [f for f in files if f.startswith("optimizer")]
    _assert_same_adapter(saved_dir, single_dir)
    kind = SCENARIOS[name][0]
    untrained = la.models.io._adapter_state(_model(kind))
    saved = load_file(saved_dir / "adapter_model.safetensors")
    assert max((saved[k] - untrained[k]).abs().max() for k in saved) > 1e-3  # it trained
    loaded = la.load_adapter(tiny_model("llama", seed=3), str(saved_dir))
    again = la.models.io._adapter_state(loaded)
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_trainer_under_fsdp_resumes_from_its_checkpoint(fsdp_run, name):
    out, reports, _ = fsdp_run
    for report in reports:  # every rank read the checkpoint's adapter file through our loader
        assert report["loads"].count(os.path.join(str(out), name, SAVES[0])) == 1
    # the fresh model had other weights: the same loss at step 3 means the adapter came back;
    # the same losses after it, that the optimizer state did too
    resumed, uninterrupted = reports[0]["resumed"][name], reports[0]["losses"][name]
    assert len(resumed) == STEPS - SAVE_EVERY
    optimizer_resumes = SCENARIOS[name][3]
    n = len(resumed) if optimizer_resumes else 1
    torch.testing.assert_close(torch.tensor(resumed[:n]),
                               torch.tensor(uninterrupted[SAVE_EVERY:][:n]), rtol=0, atol=1e-6)
    if optimizer_resumes:
        _assert_same_adapter(out / f"{name}-resumed" / "final", out / name / "final")


@pytest.mark.slow
def test_accelerate_peft_under_fsdp1_with_peft_wrap_policy(fsdp_run):
    out, reports, seconds = fsdp_run
    report = reports[0]["peft"]
    # PEFT's policy made every lora_A a unit of its own, and every LoRA layer ran our op
    assert report["lora_a"] == report["lora_a_units"] == report["accelerated"] == 4
    for r in reports:
        assert r["peft"]["calls"] == report["accelerated"] * PEFT_STEPS
    peft_model = _peft_model()  # PEFT's own forward, one process
    single = _train_peft(peft_model)
    # measured: at most 4.8e-7 apart
    torch.testing.assert_close(torch.tensor(report["losses"]), single, rtol=0, atol=1e-6)
    trained = torch.load(out / "peft-trained.pt")
    want = _trainable(peft_model)
    assert trained.keys() == want.keys() and want
    for key, t in want.items():  # measured: at most 4.5e-8 apart
        torch.testing.assert_close(trained[key], t, rtol=0, atol=1e-6, msg=key)
    assert seconds < 300


@pytest.mark.slow
def test_trainer_under_fsdp_loads_the_best_checkpoint_at_end(fsdp_run):
    out, reports, _ = fsdp_run
    best = reports[0]["best"]
    assert best == os.path.join(str(out), "fsdp1_best", f"checkpoint-{SAVE_EVERY}")
    for report in reports:
        assert report["loads"].count(best) == 1
    final = load_file(out / "fsdp1_best" / "final" / "adapter_model.safetensors")
    want = load_file(os.path.join(best, "adapter_model.safetensors"))
    last = load_file(out / "fsdp1_best" / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in want)
    assert any(not torch.equal(last[k], want[k]) for k in want)


def test_fsdp2_checkpoint_without_save_only_model_is_a_clear_error():
    from types import SimpleNamespace

    from llm_adapters.models.hf_trainer import _fsdp2_checkpoint_problem

    def trainer(version, save_only_model):
        plugin = SimpleNamespace(fsdp_version=version)
        return SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(
            fsdp_plugin=plugin)), args=SimpleNamespace(save_only_model=save_only_model))

    model = _model("lora")  # its names walk (AdapterModel._fqn_modifiers): nothing to refuse
    assert _fsdp2_checkpoint_problem(trainer(2, False), model) is None

    class _View:  # a wrapper whose `base_model` is a view without the child's attributes
        pass

    class _Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._modules["base_model"] = torch.nn.Sequential(torch.nn.Linear(2, 2))

        base_model = property(lambda self: _View())

    hidden = _Hidden()
    assert "save_only_model=True" in _fsdp2_checkpoint_problem(trainer(2, False), hidden)
    assert _fsdp2_checkpoint_problem(trainer(2, True), hidden) is None
    assert _fsdp2_checkpoint_problem(trainer(1, False), hidden) is None


# ---- save_pretrained(safe_serialization=False): PEFT's adapter_model.bin ------------------------
def test_save_pretrained_without_safetensors_writes_the_bin_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    from tiny_models import tiny_batch

    model = _model("lora").eval()
    out = tmp_path / "bin"
    model.save_pretrained(str(tmp_path / "st"))  # the default: safetensors
    model.save_pretrained(str(out), safe_serialization=False)
    assert set(os.listdir(out)) == {"adapter_config.json", "adapter_model.bin"}
    written = torch.load(out / "adapter_model.bin", weights_only=True)
    safe = load_file(tmp_path / "st" / "adapter_model.safetensors")
    assert written.keys() == safe.keys() and all(torch.equal(written[k], safe[k]) for k in safe)
    batch = tiny_batch()
    with torch.no_grad():
        want = model(**batch).logits
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama", seed=3), str(out)).eval()
        torch.testing.assert_close(theirs(**batch).logits, want, rtol=1e-5, atol=1e-5)
        ours = la.AdapterModel.from_pretrained(tiny_model("llama", seed=3), str(out))
        torch.testing.assert_close(ours(**batch).logits, want, rtol=0, atol=0)
        fresh = _model("lora", seed=9).eval()
        fresh.load_adapter(str(out))  # what resuming a Trainer checkpoint does
        torch.testing.assert_close(fresh(**batch).logits, want, rtol=0, atol=0)
    # a .bin save over a safetensors one takes its place (the safetensors would be read first)
    model.save_pretrained(str(tmp_path / "st"), safe_serialization=False)
    assert set(os.listdir(tmp_path / "st")) == {"adapter_config.json", "adapter_model.bin"}


def test_save_pretrained_takes_the_adapter_from_a_given_state_dict(tmp_path):
    """What Trainer hands save_pretrained under DeepSpeed ZeRO-3: a gathered whole state dict
    (keyed as model.state_dict()); the file holds its tensors, not the parameters'."""
    model = _model("lora")
    state = {k: v + 1 for k, v in model.state_dict().items()}
    model.save_pretrained(str(tmp_path), state_dict=state)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    params = la.models.io._adapter_parameters(model)
    assert saved.keys() == params.keys() and saved
    for key, p in params.items():
        assert torch.equal(saved[key], state[names[id(p)]]), key


if __name__ == "__main__":
    _worker(sys.argv[1])
