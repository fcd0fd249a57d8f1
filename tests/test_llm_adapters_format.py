"""LLM-Adapters' checkpoints: what its PEFT fork saved loads with its logits, and
`save_adapter(format="llm-adapters")` writes its layout.

The fixtures under tests/fixtures/llm_adapters/ were made with the fork's own code
(make_fixtures.py there): tiny random llama / bloom / gptj bases, series, AdapterP and parallel
adapters (fixed and learned scaling), plain LoRA and single-target LoRA (MergedLinear with
enable_lora), each with the fork's logits on a fixed input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import llm_adapters as la
from llm_adapters.models.llm_adapters_format import merged_lora_to_dense

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "llm_adapters"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "meta.json").is_file())
MERGED = [c for c in CASES if c.endswith("_lora_merged")]
THEIR_FILES = {"adapter_config.json", "adapter_model.bin"}


def _meta(case: str) -> dict:
    return json.loads((FIXTURES / case / "meta.json").read_text())


def _base(family: str) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(FIXTURES / f"base_{family}").eval()


def _reference(case: str) -> dict:
    return torch.load(FIXTURES / case / "reference_logits.pt", weights_only=True)


def _logits(model, ref) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before) -> None:
    assert not any(isinstance(m, (la.LoraLinear, la.BottleneckAdapter)) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_fixtures_cover_every_kind_and_family():
    assert len(CASES) == 15
    for family in ("llama", "bloom", "gptj"):
        for kind in ("series", "adapterp", "parallel", "lora", "lora_merged"):
            assert any(c.startswith(f"{family}_{kind}") for c in CASES), (family, kind)
    learned = [c for c in CASES if "learned" in c]
    assert learned and all(
        json.loads((FIXTURES / c / "adapter_config.json").read_text())["scaling"] == "learned"
        for c in learned
    )


@pytest.mark.parametrize("case", CASES)
def test_their_checkpoint_loads_with_their_logits(case):
    ref = _reference(case)
    base = _base(_meta(case)["family"])
    base_logits = _logits(base, ref)
    model = la.load_adapter(base, str(FIXTURES / case))
    out = _logits(model, ref)
    assert (base_logits - ref["logits"]).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(out, ref["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c not in MERGED])
def test_saved_in_their_format_is_their_layout(case, tmp_path):
    model = la.load_adapter(_base(_meta(case)["family"]), str(FIXTURES / case))
    la.save_adapter(model, str(tmp_path), format="llm-adapters")
    assert set(os.listdir(tmp_path)) == THEIR_FILES
    theirs = json.loads((FIXTURES / case / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "adapter_config.json").read_text())
    assert ours == theirs
    a = torch.load(FIXTURES / case / "adapter_model.bin", weights_only=True)
    b = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    assert {k: tuple(v.shape) for k, v in b.items()} == {k: tuple(v.shape) for k, v in a.items()}
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", MERGED)
def test_merged_lora_saves_as_plain_lora_of_the_same_math(case, tmp_path):
    ref = _reference(case)
    family = _meta(case)["family"]
    model = la.load_adapter(_base(family), str(FIXTURES / case))
    la.save_adapter(model, str(tmp_path), format="llm-adapters")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = json.loads((FIXTURES / case / "adapter_config.json").read_text())
    assert saved.keys() == theirs.keys() and saved["enable_lora"] is None
    assert saved["r"] == 2 * theirs["r"] and saved["lora_alpha"] == 2 * theirs["lora_alpha"]
    again = la.load_adapter(_base(family), str(tmp_path))
    torch.testing.assert_close(_logits(again, ref), ref["logits"], rtol=0, atol=1e-5)


def _fork_merged_forward(x, a, conv_w, enable_lora, groups):
    """The fork's MergedLinear LoRA branch, written out: A, grouped 1x1 conv, zero_pad."""
    after_a = x @ a.t()
    after_b = F.conv1d(after_a.t().unsqueeze(0), conv_w, groups=groups)[0].t()
    width = after_b.shape[1] // sum(enable_lora)
    out = x.new_zeros(x.shape[0], width * len(enable_lora))
    rows = torch.tensor(enable_lora).repeat_interleave(width)
    out[:, rows] = after_b
    return out


@pytest.mark.parametrize(
    "enable_lora,r,groups",
    [([True, False, True], 3, 2), ([True, True, False, True], 2, 2), ([False, True], 4, 2),
     ([True, False, True], 2, 1)],
)
def test_merged_lora_to_dense_is_the_fork_math(enable_lora, r, groups):
    g = torch.Generator().manual_seed(3)
    k, width, s = 7, 6, sum(enable_lora)
    x = torch.randn(5, k, generator=g, dtype=torch.float64)
    a = torch.randn(r * s, k, generator=g, dtype=torch.float64)
    conv_w = torch.randn(width * s, r * s // groups, 1, generator=g, dtype=torch.float64)
    dense_a, dense_b = merged_lora_to_dense(a, conv_w, enable_lora, r)
    assert dense_b.shape == (width * len(enable_lora), r * s)
    expected = _fork_merged_forward(x, a, conv_w, enable_lora, groups)
    torch.testing.assert_close(x @ dense_a.t() @ dense_b.t(), expected, rtol=1e-12, atol=1e-12)


def test_merged_lora_wrong_shapes_are_refused():
    a, b = torch.zeros(8, 4), torch.zeros(12, 3, 1)  # 8 channels are not 3·k groups of 3
    with pytest.raises(ValueError, match="lora_B has shape"):
        merged_lora_to_dense(a, b, [True, False, True], 4)
    with pytest.raises(ValueError, match="lora_A has shape"):
        merged_lora_to_dense(torch.zeros(6, 4), torch.zeros(8, 4, 1), [True, False, True], 4)


@pytest.mark.parametrize(
    "family,config",
    [
        ("llama", la.BottleneckConfig(bottleneck_size=6, non_linearity="silu", scaling="learned")),
        ("gptj", la.BottleneckConfig(bottleneck_size=4, use_parallel_adapter=True, scaling=0.3)),
        ("bloom", la.BottleneckConfig(bottleneck_size=4, use_adapterp=True)),
        ("llama", la.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                target_modules=["q_proj", "o_proj", "up_proj"])),
    ],
)
def test_our_adapter_round_trips_through_their_format(family, config, tmp_path):
    ref = _reference("llama_series")
    model = la.get_adapter_model(_base(family), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 0 else 0.0))
    model.eval()
    expected = _logits(model, ref)
    la.save_adapter(model, str(tmp_path), format="llm-adapters")
    state = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    assert all(k.startswith("base_model.model.") for k in state)
    if config.scaling == "learned" if isinstance(config, la.BottleneckConfig) else False:
        scales = [v for k, v in state.items() if k.endswith(".adapter_scaling")]
        assert scales and all(v.shape == (1,) for v in scales)
    again = la.load_adapter(_base(family), str(tmp_path))
    torch.testing.assert_close(_logits(again, ref), expected, rtol=0, atol=1e-5)


def test_scale_under_either_name_loads(tmp_path):
    case = "llama_series_learned"
    for name in ("adapter_model.bin", "adapter_config.json"):
        (tmp_path / name).write_bytes((FIXTURES / case / name).read_bytes())
    state = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    renamed = {k.replace("adapter_scaling", "adapter_scale"): v.reshape(()) if
               k.endswith("adapter_scaling") else v for k, v in state.items()}
    torch.save(renamed, tmp_path / "adapter_model.bin")
    ref = _reference(case)
    model = la.load_adapter(_base("llama"), str(tmp_path))
    torch.testing.assert_close(_logits(model, ref), ref["logits"], rtol=0, atol=1e-5)


def test_our_own_learned_scale_files_still_load(tmp_path):
    model = la.get_adapter_model(_base("llama"), la.BottleneckConfig(bottleneck_size=4,
                                                                      scaling="learned"))
    la.save_adapter(model, str(tmp_path))
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    scales = {k: v for k, v in state.items() if k.endswith("adapter_scale")}
    assert scales and all(v.shape == () for v in scales.values())
    la.load_adapter(_base("llama"), str(tmp_path))


def _copy_case(case, tmp_path):
    for name in ("adapter_model.bin", "adapter_config.json"):
        (tmp_path / name).write_bytes((FIXTURES / case / name).read_bytes())
    return tmp_path


def _edit_config(path, **changes):
    data = json.loads((path / "adapter_config.json").read_text())
    data.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("case", ["bloom_series", "bloom_lora_merged"])
def test_truncated_bin_is_a_clear_error(case, tmp_path):
    path = _copy_case(case, tmp_path)
    data = (path / "adapter_model.bin").read_bytes()
    (path / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    base = _base("bloom")
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"adapter_model\.bin cannot be read"):
        la.load_adapter(base, str(path))
    _assert_untouched(base, before)


@pytest.mark.parametrize(
    "payload,match",
    [([torch.zeros(2)], "does not hold a state dict"),
     ({"base_model.model.x": 3}, "does not hold a state dict"),
     ({}, "holds no tensors")],
)
def test_pickle_that_is_not_a_state_dict_is_a_clear_error(payload, match, tmp_path):
    path = _copy_case("llama_parallel", tmp_path)
    torch.save(payload, path / "adapter_model.bin")
    base = _base("llama")
    before = _snapshot(base)
    with pytest.raises(ValueError, match=match):
        la.load_adapter(base, str(path))
    _assert_untouched(base, before)


def test_pickle_of_an_object_is_refused_without_running_it(tmp_path):
    import pickle

    path = _copy_case("llama_parallel", tmp_path)
    with open(path / "adapter_model.bin", "wb") as f:
        pickle.dump(_Opaque(), f)
    with pytest.raises(ValueError, match="cannot be read as a PyTorch state dict"):
        la.load_adapter(_base("llama"), str(path))


class _Opaque:
    pass


@pytest.mark.parametrize(
    "case,family,match",
    [("llama_parallel", "gptj", "does not match this model"),
     ("llama_series", "gptj", "no series placement for 'gate_proj' on gptj"),
     ("bloom_lora_merged", "llama", "not found in this llama model"),
     ("llama_lora_merged", "gptj", "not match|shape")],
)
def test_checkpoint_of_another_architecture_is_a_clear_error(case, family, match):
    base = _base(family)
    before = _snapshot(base)
    with pytest.raises(ValueError, match=match):
        la.load_adapter(base, str(FIXTURES / case))
    _assert_untouched(base, before)


@pytest.mark.parametrize(
    "case,changes,match",
    [("llama_series", {"bias": "all"}, "bias='all'"),
     ("llama_series", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
     ("llama_lora_merged", {"enable_lora": [False, False, False]}, "enables no slice"),
     ("llama_lora_merged", {"enable_lora": [True, True]}, "has shape"),
     ("llama_series", {"non_linearity": "no_such_act"}, "non_linearity")],
)
def test_configs_that_cannot_load_are_clear_errors(case, changes, match, tmp_path):
    path = _copy_case(case, tmp_path)
    _edit_config(path, **changes)
    base = _base("llama")
    before = _snapshot(base)
    with pytest.raises(ValueError, match=match):
        la.load_adapter(base, str(path))
    _assert_untouched(base, before)


@pytest.mark.parametrize(
    "family,config,match",
    [("llama", la.BottleneckConfig(bottleneck_size=4, target_modules=["q_proj"]),
      "placement table has no 'q_proj'"),
     ("llama", la.BottleneckConfig(bottleneck_size=4, use_bias=True), "no biases"),
     ("llama", la.PromptTuningConfig(num_virtual_tokens=2), "LoRA and bottleneck"),
     ("gpt2", la.LoraConfig(r=2, target_modules=["c_attn"]), "nn.Linear modules only")],
)
def test_what_their_code_cannot_load_is_not_written(family, config, match, tmp_path):
    from tiny_models import tiny_model

    base = tiny_model("gpt2") if family == "gpt2" else _base(family)
    model = la.get_adapter_model(base, config)
    with pytest.raises(ValueError, match=match):
        la.save_adapter(model, str(tmp_path / "out"), format="llm-adapters")
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_refused(tmp_path):
    model = la.get_adapter_model(_base("llama"), la.LoraConfig(r=2))
    with pytest.raises(ValueError, match="format must be"):
        la.save_adapter(model, str(tmp_path), format="peft-0.3")


def test_their_use_adapterp_does_not_move_table_placed_adapters(tmp_path):
    # The fork picks each series adapter's side from its table; use_adapterp only chose the
    # default targets. The same weights with use_adapterp=True give the same logits there.
    path = _copy_case("llama_series", tmp_path)
    _edit_config(path, use_adapterp=True)
    ref = _reference("llama_series")
    model = la.load_adapter(_base("llama"), str(path))
    sides = {n.rsplit(".", 1)[-1]: m.placement for n, m in model.named_modules()
             if isinstance(m, la.BottleneckAdapter)}
    assert sides == {"gate_proj": "input", "up_proj": "input", "down_proj": "output"}
    torch.testing.assert_close(_logits(model, ref), ref["logits"], rtol=0, atol=1e-5)


def test_init_weights_names_cross_over(tmp_path):
    path = _copy_case("gptj_parallel", tmp_path)
    _edit_config(path, init_weights="mam_adapter")
    model = la.load_adapter(_base("gptj"), str(path))
    assert model.adapter_config.init_weights == "mam_adapter"
    la.save_adapter(model, str(tmp_path / "again"), format="llm-adapters")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["init_weights"] == "mam_adapter"
    ours = la.get_adapter_model(_base("gptj"), la.BottleneckConfig(bottleneck_size=2,
                                                                    init_weights="zero_up"))
    la.save_adapter(ours, str(tmp_path / "zero_up"), format="llm-adapters")
    saved = json.loads((tmp_path / "zero_up" / "adapter_config.json").read_text())
    assert saved["init_weights"] == "mam_adapter"


def test_their_suffix_matching_of_target_names_is_kept(tmp_path):
    # The fork matches a target by name.endswith(target): "ate_proj" picks gate_proj there.
    path = _copy_case("llama_series", tmp_path)
    _edit_config(path, target_modules=["ate_proj", "up_proj", "own_proj"])
    ref = _reference("llama_series")
    model = la.load_adapter(_base("llama"), str(path))
    torch.testing.assert_close(_logits(model, ref), ref["logits"], rtol=0, atol=1e-5)
    assert len(model.adapter_config.target_modules) == 6  # the fork's choice, by full name
