"""PEFT's on-disk LoRA layout: what we write, PEFT loads with equal outputs; what PEFT writes,
we load with equal outputs; what cannot be represented raises naming the field, model unchanged."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _helpers import assert_snapshot_equal, randomize, run, snapshot
from models import batch_for, tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import surgery
from registry.peft_format import (
    PeftFormatError,
    load_peft,
    load_peft_delta,
    save_peft,
    save_peft_delta,
)

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean((-1, -2)))


def _conv_input():
    return torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(5))


def _peft_from_dir(factory, d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(factory(), str(d)).eval()


def _keys(d):
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


# ------------------------------------------------------------ ours -> PEFT

SAVE_CASES = {
    "llama_linear": (tiny_llama, ["q_proj", "v_proj", "o_proj", "gate_proj"], dict(r=4, alpha=16)),
    "gpt2_conv1d": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], dict(r=4, alpha=8)),
    "embedding": (tiny_llama, ["embed_tokens", "q_proj"], dict(r=3, alpha=12)),
    "gpt2_tied_embedding": (tiny_gpt2, ["wte", "c_attn"], dict(r=2, alpha=4)),
    "rslora": (tiny_llama, ["q_proj", "v_proj", "down_proj"], dict(r=4, alpha=16, rslora=True)),
    "patterns": (
        tiny_llama,
        ["q_proj", "v_proj", "down_proj"],
        dict(
            r=4,
            alpha=8,
            rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
            alpha_pattern={"v_proj": 32, "re:.*layers\\.0\\.mlp\\.down_proj": 3},
        ),
    ),
    "rslora_patterns": (
        tiny_llama,
        ["q_proj", "v_proj"],
        dict(r=4, alpha=8, rslora=True, rank_pattern={"v_proj": 9}, alpha_pattern={"q_proj": 2}),
    ),
    "conv2d": (ConvNet, ["conv1", "conv2", "head"], dict(r=3, alpha=6)),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_peft_loads_in_peft_with_equal_outputs(case, tmp_path):
    factory, targets, cfg = SAVE_CASES[case]
    model = factory()
    x = _conv_input() if factory is ConvNet else batch_for(model)
    base = run(model, x)
    surgery.inject(model, "lora", targets=targets, name="sql", **cfg)
    randomize(model, "sql", std=0.2)
    ours = run(model, x)
    assert (ours - base).abs().max() > 1e-3
    out = save_peft(model, tmp_path / "out", adapter="sql")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = _peft_from_dir(factory, out)
    torch.testing.assert_close(run(pm, x), ours, atol=1e-5, rtol=1e-5)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert config["fan_in_fan_out"] == (factory is tiny_gpt2 and "c_attn" in targets)
    assert config["use_rslora"] == cfg.get("rslora", False)


def test_save_peft_keys_and_layout(tmp_path):
    model = tiny_llama()
    surgery.inject(model, "lora", targets=["embed_tokens", "q_proj"], r=3)
    save_peft(model, tmp_path)
    keys = _keys(tmp_path)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"] == (3, 128)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"] == (64, 3)
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (3, 64)
    assert keys["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"] == (64, 3)
    assert len(keys) == 6
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["embed_tokens", "q_proj"]  # a suffix list: unambiguous here
    assert config["task_type"] == "CAUSAL_LM"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_target_modules_regex_when_suffixes_are_ambiguous(tmp_path):
    model = tiny_llama()
    surgery.inject(model, "lora", targets="layers.0.self_attn.q_proj", r=2)
    randomize(model)
    save_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)
    x = batch_for(model)
    torch.testing.assert_close(run(_peft_from_dir(tiny_llama, tmp_path), x), run(model, x), atol=1e-5, rtol=1e-5)


def test_save_peft_delta_without_model_uses_lineage_kinds(tmp_path):
    model = tiny_llama()
    surgery.inject(model, "lora", targets=["embed_tokens", "q_proj"], r=2)
    randomize(model)
    d = surgery.delta(model)
    save_peft_delta(d, tmp_path / "plain")  # no model: 2-D sites are taken as linear
    assert "base_model.model.model.embed_tokens.lora_A.weight" in _keys(tmp_path / "plain")
    from registry.peft_format import site_kinds

    d.lineage["site_kinds"] = site_kinds(model, d)
    save_peft_delta(d, tmp_path / "kinds")
    x = batch_for(model)
    torch.testing.assert_close(
        run(_peft_from_dir(tiny_llama, tmp_path / "kinds"), x), run(model, x), atol=1e-5, rtol=1e-5
    )


def test_save_refuses_other_methods(tmp_path):
    d = surgery.Delta("adapter", "x", {}, {}, "")
    with pytest.raises(PeftFormatError, match="method"):
        save_peft_delta(d, tmp_path)


# ------------------------------------------------------------ PEFT -> ours


def _peft_saved(factory, peft_cfg: dict, d):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(factory(), LoraConfig(**peft_cfg)).eval()
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pm.save_pretrained(str(d))
    return pm


LOAD_CASES = {
    "list": (tiny_llama, dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"])),
    "regex": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=r".*layers\.1\.(self_attn\.(q|k)_proj|mlp\.up_proj)")),
    "rank_pattern": (
        tiny_llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"q_proj": 2, "model.layers.1.self_attn.v_proj": 6},
        ),
    ),
    "alpha_pattern": (
        tiny_llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            alpha_pattern={"v_proj": 32, r"layers\.0\.mlp\.down_proj": 3},
        ),
    ),
    "rslora": (
        tiny_llama,
        dict(
            r=4,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 9},
            alpha_pattern={"q_proj": 2},
        ),
    ),
    "gpt2_fan_in_fan_out": (
        tiny_gpt2,
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "embedding": (tiny_llama, dict(r=3, lora_alpha=6, target_modules=["embed_tokens", "q_proj"])),
    "layers_to_transform": (
        tiny_llama,
        dict(r=2, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"),
    ),
    "conv2d": (ConvNet, dict(r=3, lora_alpha=5, target_modules=["conv1", "conv2", "head"])),
    "dropout_causal_lm": (
        tiny_llama,
        dict(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["k_proj"], task_type="CAUSAL_LM"),
    ),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_peft_saved_by_peft_with_equal_outputs(case, tmp_path):
    factory, cfg = LOAD_CASES[case]
    pm = _peft_saved(factory, cfg, tmp_path)
    model = factory()
    x = _conv_input() if factory is ConvNet else batch_for(model)
    base = run(model, x)
    want = run(pm, x)
    assert (want - base).abs().max() > 1e-3, "vacuous"
    inj = load_peft(model, tmp_path, name="x")
    assert inj.name == "x"
    torch.testing.assert_close(run(model, x), want, atol=1e-5, rtol=1e-5)
    # and back out again: PEFT loads what we write from it
    save_peft(model, tmp_path / "again", adapter="x")
    torch.testing.assert_close(run(_peft_from_dir(factory, tmp_path / "again"), x), want, atol=1e-5, rtol=1e-5)
    surgery.remove(model)
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)


def test_load_peft_delta_config_is_per_site(tmp_path):
    _peft_saved(tiny_llama, LOAD_CASES["rank_pattern"][1] | {"alpha_pattern": {"v_proj": 32}}, tmp_path)
    d = load_peft_delta(tmp_path)
    assert d.base == "" and d.method == "lora" and d.name == "default"
    assert d.config["r"] == 4 and d.config["alpha"] == 8
    assert d.config["rank_pattern"] == {
        r"re:model\.layers\.0\.self_attn\.q_proj": 2,
        r"re:model\.layers\.1\.self_attn\.q_proj": 2,
        r"re:model\.layers\.1\.self_attn\.v_proj": 6,
    }
    assert d.config["alpha_pattern"] == {
        r"re:model\.layers\.0\.self_attn\.v_proj": 32,
        r"re:model\.layers\.1\.self_attn\.v_proj": 32,
    }
    assert d.lineage["source"] == "peft"
    model = tiny_llama()
    with pytest.raises(surgery.DeltaMismatchError, match="allow_other_base"):
        surgery.apply(model, d)
    surgery.apply(model, d, allow_other_base=True)
    d2 = load_peft_delta(tmp_path, model=tiny_llama(), name="n")
    assert d2.base == surgery.fingerprint(tiny_llama()) and d2.name == "n"


def test_load_peft_hot_swaps_in_place(tmp_path):
    cfg = dict(r=2, lora_alpha=4, target_modules=["q_proj"])
    pm1 = _peft_saved(tiny_llama, cfg, tmp_path / "a")
    model = tiny_llama()
    x = batch_for(model)
    load_peft(model, tmp_path / "a", name="t")
    ids = [id(p) for p in model.parameters()]
    from peft import LoraConfig, get_peft_model

    pm2 = get_peft_model(tiny_llama(), LoraConfig(**cfg)).eval()
    with torch.no_grad():
        for n, p in pm2.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    pm2.save_pretrained(str(tmp_path / "b"))
    load_peft(model, tmp_path / "b", name="t")
    assert [id(p) for p in model.parameters()] == ids
    torch.testing.assert_close(run(model, x), run(pm2, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(pm1, x), run(pm2, x))


# ------------------------------------------------------------ what cannot be represented


def _edit_config(d, **changes):
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "field, peft_kw",
    [
        ("bias", dict(bias="all")),
        ("lora_bias", dict(lora_bias=True)),
        ("modules_to_save", dict(modules_to_save=["lm_head"])),
    ],
)
def test_unsupported_fields_saved_by_peft_raise_naming_field(field, peft_kw, tmp_path):
    _peft_saved(tiny_llama, dict(r=2, lora_alpha=4, target_modules=["q_proj"], **peft_kw), tmp_path)
    model = tiny_llama()
    surgery.inject(model, "lora", targets="v_proj", name="other")
    before = snapshot(model)
    with pytest.raises(PeftFormatError, match=field):
        load_peft(model, tmp_path, name="x")
    assert_snapshot_equal(before, snapshot(model))


@pytest.mark.parametrize(
    "field, value",
    [
        ("peft_type", "ADALORA"),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "olora"),
        ("layer_replication", [[0, 2]]),
        ("trainable_token_indices", [1, 2]),
        ("target_parameters", ["mlp.experts.gate_up_proj"]),
        ("some_future_field", {"x": 1}),
        ("r", 0),
        ("lora_alpha", "big"),
    ],
)
def test_unsupported_config_values_raise_naming_field(field, value, tmp_path):
    _peft_saved(tiny_llama, dict(r=2, lora_alpha=4, target_modules=["q_proj"]), tmp_path)
    _edit_config(tmp_path, **{field: value})
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(PeftFormatError, match=field):
        load_peft(model, tmp_path)
    assert_snapshot_equal(before, snapshot(model))


def test_rank_in_config_must_agree_with_tensors(tmp_path):
    _peft_saved(tiny_llama, dict(r=2, lora_alpha=4, target_modules=["q_proj"]), tmp_path)
    _edit_config(tmp_path, r=4)
    with pytest.raises(PeftFormatError, match="rank"):
        load_peft_delta(tmp_path)


def test_unknown_tensor_keys_raise(tmp_path):
    _peft_saved(tiny_llama, dict(r=2, lora_alpha=4, target_modules=["q_proj"]), tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    ts["base_model.model.lm_head.weight"] = torch.zeros(128, 64)
    save_file(ts, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(PeftFormatError, match="lm_head.weight"):
        load_peft_delta(tmp_path)


def test_embedding_base_layer_checked_against_model(tmp_path):
    _peft_saved(tiny_llama, dict(r=2, lora_alpha=4, target_modules=["embed_tokens"]), tmp_path)
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in _keys(tmp_path))
    load_peft_delta(tmp_path, model=tiny_llama())  # the same base weights: fine
    with pytest.warns(UserWarning, match="base_layer"):
        load_peft_delta(tmp_path)  # no model: not checked, said so
    other = tiny_llama()
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1)
    with pytest.raises(PeftFormatError, match="base_layer"):
        load_peft(other, tmp_path)


def test_pickle_and_missing_files_refused(tmp_path):
    with pytest.raises(PeftFormatError, match="adapter_config.json"):
        load_peft_delta(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(PeftFormatError, match="pickle"):
        load_peft_delta(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(PeftFormatError, match="safetensors"):
        load_peft_delta(tmp_path)


def test_sites_the_model_lacks_leave_it_unchanged(tmp_path):
    _peft_saved(tiny_llama, dict(r=2, lora_alpha=4, target_modules=["q_proj"]), tmp_path)
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(PeftFormatError, match="no such module"):
        load_peft(model, tmp_path)
    assert_snapshot_equal(before, snapshot(model))


# ------------------------------------------------------------------ where save_peft may write


@pytest.fixture(scope="module")
def small_lora():
    model = tiny_llama()
    surgery.inject(model, "lora", targets=["q_proj"], r=2, name="a")
    randomize(model, "a", std=0.2)
    return model


@pytest.mark.parametrize("where", ["file", "inside_file"])
def test_save_peft_to_a_file_path_is_refused_and_the_file_untouched(small_lora, tmp_path, where):
    f = tmp_path / "adapter.bin"
    f.write_bytes(b"precious")
    target = f if where == "file" else f / "sub" / "dir"
    with pytest.raises(PeftFormatError, match="a file: PEFT's layout is a folder.*pass a folder path"):
        save_peft(small_lora, target, adapter="a")
    assert f.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.bin"]


def test_save_peft_into_a_non_empty_folder_keeps_other_files(small_lora, tmp_path):
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"an older adapter")
    out = save_peft(small_lora, tmp_path, adapter="a")
    assert (tmp_path / "README.md").read_text() == "mine"  # like PEFT: the two adapter files are replaced
    d = load_peft_delta(out)
    want = surgery.delta(small_lora, "a").tensors
    assert d.tensors.keys() == want.keys()
    for k in want:
        assert torch.equal(d.tensors[k], want[k])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_save_peft_into_an_unwritable_folder_is_a_clear_error(small_lora, tmp_path, monkeypatch):
    import registry.peft_format as pf

    def denied(*a, **kw):  # what a read-only folder answers (tests may run as root, who may write anyway)
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(pf.tempfile, "mkstemp", denied)
    with pytest.raises(
        PeftFormatError, match="cannot write the PEFT adapter into .*Permission denied.*pass a folder you can write to"
    ):
        save_peft(small_lora, tmp_path / "out", adapter="a")
    assert not [p for p in (tmp_path / "out").iterdir()]
