"""DoRA: identity at injection, the magnitude's start, outputs and gradients equal to PEFT's
LoraConfig(use_dora=True) on the same tensors (with dropout too), merge against PEFT's and
bit-exact unmerge, PEFT's on-disk layout both ways and through the Hub, refusals, training."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import run
from models import batch_for, tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import surgery
from registry import Hub
from registry.peft_format import PeftFormatError, load_peft, load_peft_delta, save_peft
from surgery import engine
from surgery.errors import ConfigError

peft = pytest.importorskip("peft")

MAG = "lora_magnitude_vector"


class ConvNet(nn.Module):
    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.seq = nn.Conv1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(F.relu(self.seq(h.flatten(2))).mean(-1))


def _conv_input():
    return torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(5))


def _input(factory, model):
    return _conv_input() if factory is ConvNet else batch_for(model)


def _kinds():
    g = torch.Generator().manual_seed(0)
    return {
        "linear": (lambda: nn.Sequential(nn.Linear(16, 12)), lambda: torch.randn(3, 5, 16, generator=g)),
        "conv1d_tf": (lambda: nn.Sequential(Conv1D(12, 16)), lambda: torch.randn(3, 5, 16, generator=g)),
        "conv1d": (lambda: nn.Sequential(nn.Conv1d(4, 6, 3, padding=1)), lambda: torch.randn(2, 4, 9, generator=g)),
        "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 5, 3, stride=2)), lambda: torch.randn(2, 3, 9, 9, generator=g)),
        "embedding": (lambda: nn.Sequential(nn.Embedding(20, 8)), lambda: torch.randint(0, 20, (3, 7), generator=g)),
    }


def _build(kind):
    torch.manual_seed(0)
    make, inp = _kinds()[kind]
    return make(), inp()


def _row_norms(kind: str, w: torch.Tensor) -> torch.Tensor:
    """||W|| per output row / channel / embedding dimension, in PEFT's magnitude shape."""
    if kind in ("conv1d_tf", "embedding"):
        return w.norm(dim=0)
    if kind == "linear":
        return w.norm(dim=1)
    return w.flatten(1).norm(dim=1).view(1, -1, *([1] * (w.dim() - 2)))


@torch.no_grad()
def _randomize(model, name="default", seed=1):
    """A, B random and m moved off its start, so every term of the forward shows."""
    g = torch.Generator().manual_seed(seed)
    for ad in engine.adapters(model, name).values():
        for p in (ad.lora.lora_A, ad.lora.lora_B):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        ad.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn(ad.lora_magnitude_vector.shape, generator=g))


# ---------------------------------------------------------------- injection


@pytest.mark.parametrize("kind", list(_kinds()))
def test_injection_is_identity_and_magnitude_starts_at_the_weight_norm(kind):
    model, x = _build(kind)
    before = run(model, x)
    inj = surgery.inject(model, "dora", targets="0", r=3)
    assert inj.method == "dora" and inj.sites == ("0",)
    assert torch.equal(run(model, x), before)
    ad = engine.adapters(model, "default")["0"]
    torch.testing.assert_close(ad.lora_magnitude_vector.detach(), _row_norms(kind, model[0].weight.detach()))
    d = surgery.delta(model)
    assert set(d.tensors) == {"0.lora_A.weight", "0.lora_B.weight", f"0.{MAG}"}
    assert all(p.requires_grad for p in ad.parameters())


def test_formula_by_hand_linear_with_bias():
    """y = m / ||W + sBA|| * (W + sBA) x + b, the norm per output row."""
    model, x = _build("linear")
    surgery.inject(model, "dora", targets="0", r=3, alpha=6)
    _randomize(model)
    ad = engine.adapters(model, "default")["0"]
    W, b = model[0].weight.detach(), model[0].bias.detach()
    A, B, m = ad.lora.lora_A.detach(), ad.lora.lora_B.detach(), ad.lora_magnitude_vector.detach()
    V = W + 2.0 * B @ A
    want = F.linear(x, (m / V.norm(dim=1))[:, None] * V, b)
    torch.testing.assert_close(run(model, x), want, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- PEFT's DoRA on the same tensors


def _peft_dora(pm) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.scaling:
            if "default" in mod.lora_A:
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            else:
                A, B = mod.lora_embedding_A["default"], mod.lora_embedding_B["default"]
            out[path] = (A, B, mod.lora_magnitude_vector["default"].weight)
    return out


def _loss(model, x) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    y = out.logits if hasattr(out, "logits") else out
    return (y.float() ** 2).mean()


PEFT_CASES = {
    "llama_linear": (tiny_llama, ["q_proj", "v_proj", "o_proj", "gate_proj"], dict(r=4, alpha=16), False),
    "gpt2_conv1d_bias": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], dict(r=4, alpha=8), False),
    "embedding": (tiny_llama, ["embed_tokens", "q_proj"], dict(r=3, alpha=6), False),
    "conv_and_linear": (ConvNet, ["conv1", "conv2", "seq", "head"], dict(r=3, alpha=6), False),
    "llama_dropout_train": (tiny_llama, ["q_proj", "v_proj", "down_proj"], dict(r=4, alpha=8, dropout=0.2), True),
    "conv_dropout_train": (ConvNet, ["conv1", "conv2", "head"], dict(r=2, alpha=4, dropout=0.3), True),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_outputs_gradients_and_merge_equal_peft(case):
    from peft import LoraConfig, get_peft_model

    factory, targets, cfg, train = PEFT_CASES[case]
    ours, ref = factory(), factory()
    peft_cfg = dict(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg.get("dropout", 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out for GPT-2's Conv1D
        pm = get_peft_model(ref, LoraConfig(use_dora=True, target_modules=targets, **peft_cfg))
    theirs = _peft_dora(pm)
    inj = surgery.inject(ours, "dora", targets=targets, **cfg)
    assert sorted(inj.sites) == sorted(theirs)
    ads = engine.adapters(ours, "default")
    for path, (_, _, m) in theirs.items():  # the same start: PEFT's ||W + s B A|| with B A = 0
        torch.testing.assert_close(ads[path].lora_magnitude_vector.detach(), m.detach(), atol=0, rtol=1e-6)
    _randomize(ours)
    with torch.no_grad():
        for path, (A, B, m) in theirs.items():
            A.copy_(ads[path].lora.lora_A)
            B.copy_(ads[path].lora.lora_B)
            m.copy_(ads[path].lora_magnitude_vector)
    x = _input(factory, ours)
    outs = []
    for model in (ours, pm):
        model.train(train)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout masks, drawn in the same order
        loss = _loss(model, x)
        loss.backward()
        outs.append(loss.detach())
    assert (outs[1] - _loss(factory(), x).detach()).abs() > 1e-4, "vacuous: the adapters change nothing"
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    for model in (ours, pm):
        model.eval()
    torch.testing.assert_close(run(ours, x), run(pm, x), atol=1e-5, rtol=1e-5)
    for path, (A, B, m) in theirs.items():
        ad = ads[path]
        for mine, want, what in (
            (ad.lora.lora_A, A, "A"),
            (ad.lora.lora_B, B, "B"),
            (ad.lora_magnitude_vector, m, "m"),
        ):
            assert mine.grad is not None and want.grad is not None, f"{path}.{what}: no gradient"
            torch.testing.assert_close(mine.grad, want.grad, atol=1e-6, rtol=1e-4, msg=f"{path} grad of {what}")
    # merged: the same base weights as PEFT's merge
    surgery.merge(ours, "default")
    pm.merge_adapter()
    mods = dict(ours.named_modules())
    for path in theirs:
        got, want = mods[path].weight, pm.base_model.model.get_submodule(path).base_layer.weight
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=path)


# ---------------------------------------------------------------- merge


MERGE_CASES = [*_kinds(), "llama", "gpt2"]


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_matches_unmerged_and_unmerge_is_bit_exact(case):
    if case in ("llama", "gpt2"):
        model = tiny_llama() if case == "llama" else tiny_gpt2()
        x = batch_for(model)
        surgery.inject(model, "dora", targets=["q_proj", "v_proj", "down_proj", "c_attn", "c_proj"], r=4)
    else:
        model, x = _build(case)
        surgery.inject(model, "dora", targets="0", r=3)
    base = _base_weights(model)
    _randomize(model)
    live = run(model, x)
    surgery.merge(model, "default")
    assert any(not torch.equal(w, base[k]) for k, w in _base_weights(model).items()), "merge changed nothing"
    torch.testing.assert_close(run(model, x), live, atol=1e-5, rtol=1e-5)
    surgery.unmerge(model, "default")
    after = _base_weights(model)
    assert all(torch.equal(after[k], w) for k, w in base.items())
    torch.testing.assert_close(run(model, x), live, atol=0, rtol=0)


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{engine.CHILD}." not in n}


# ---------------------------------------------------------------- PEFT's files


def _dora_model(factory, targets, name="default", **cfg):
    model = factory()
    surgery.inject(model, "dora", targets=targets, name=name, **cfg)
    _randomize(model, name)
    return model


def _peft_from_dir(factory, d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(factory(), str(d)).eval()


SAVE_CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "embed_tokens"], dict(r=4, alpha=16)),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], dict(r=2, alpha=4)),
    "conv": (ConvNet, ["conv1", "seq", "head"], dict(r=2, alpha=4)),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_peft_loads_in_peft_with_equal_outputs(case, tmp_path):
    factory, targets, cfg = SAVE_CASES[case]
    model = _dora_model(factory, targets, name="sql", **cfg)
    x = _input(factory, model)
    out = save_peft(model, tmp_path / "out", adapter="sql")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    for path in engine.adapters(model, "sql"):
        assert f"base_model.model.{path}.{MAG}" in keys
    torch.testing.assert_close(run(_peft_from_dir(factory, out), x), run(model, x), atol=1e-5, rtol=1e-5)


def _peft_saved(factory, targets, d, **kw):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(factory(), LoraConfig(use_dora=True, target_modules=targets, **kw)).eval()
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.mul_(1.2) if MAG in n else p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pm.save_pretrained(str(d))
    return pm


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_load_peft_reads_a_peft_dora_folder(case, tmp_path):
    factory, targets, cfg = SAVE_CASES[case]
    fifo = factory is tiny_gpt2
    pm = _peft_saved(factory, targets, tmp_path, r=cfg["r"], lora_alpha=cfg["alpha"], fan_in_fan_out=fifo)
    model = factory()
    x = _input(factory, model)
    want = run(pm, x)
    assert (want - run(factory(), x)).abs().max() > 1e-3, "vacuous"
    inj = load_peft(model, tmp_path, name="x")
    assert inj.method == "dora"
    torch.testing.assert_close(run(model, x), want, atol=1e-5, rtol=1e-5)
    surgery.remove(model, "x")
    torch.testing.assert_close(run(model, x), run(factory(), x), atol=0, rtol=0)


def test_hub_import_export_round_trip(tmp_path):
    pm = _peft_saved(tiny_llama, ["q_proj", "embed_tokens"], tmp_path / "peft", r=2, lora_alpha=4)
    hub = Hub(tmp_path / "hub")
    with pytest.warns(UserWarning, match="base_layer"):  # PEFT saved the embedding's base weight alongside
        ref = hub.import_peft(tmp_path / "peft", "acme/dora")
    delta = hub.pull(ref)
    assert delta.method == "dora" and any(k.endswith(MAG) for k in delta.tensors)
    out = hub.export_peft(ref, tmp_path / "back")
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    x = batch_for(tiny_llama())
    torch.testing.assert_close(run(_peft_from_dir(tiny_llama, out), x), run(pm, x), atol=1e-6, rtol=1e-6)
    model = tiny_llama()
    surgery.apply(model, hub.pull(ref), "d", allow_other_base=True)
    torch.testing.assert_close(run(model, x), run(pm, x), atol=1e-5, rtol=1e-5)


def _tensors(d):
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_use_dora_and_magnitudes_must_agree(tmp_path):
    _peft_saved(tiny_llama, ["q_proj"], tmp_path, r=2, lora_alpha=4)
    ts = _tensors(tmp_path)
    save_file({k: v for k, v in ts.items() if MAG not in k}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(PeftFormatError, match="use_dora=True .* lacks its lora_magnitude_vector"):
        load_peft_delta(tmp_path)
    save_file(ts, str(tmp_path / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(PeftFormatError, match="use_dora=False .* has a lora_magnitude_vector"):
        load_peft_delta(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": "yes"}))
    with pytest.raises(PeftFormatError, match="use_dora"):
        load_peft_delta(tmp_path)
    key = next(k for k in ts if k.endswith(MAG))
    save_file({**ts, key: ts[key][:-1]}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PeftFormatError, match="output rows"):
        load_peft_delta(tmp_path)


# ---------------------------------------------------------------- config, deltas, training


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(r=0), "dora: r must be a positive integer"),
        (dict(alpha=-1), "dora: alpha"),
        (dict(dropout=1.5), "dora: dropout"),
        (dict(init="pissa"), "dora: init"),
        (dict(use_dora=True), "unknown config key"),
    ],
)
def test_bad_config_raises_config_error(kw, match):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        surgery.inject(model, "dora", **kw)
    assert surgery.names(model) == []


def test_delta_apply_round_trip_keeps_magnitude():
    model = _dora_model(tiny_llama, ["q_proj", "o_proj"], r=2)
    x = batch_for(model)
    other = tiny_llama()
    surgery.apply(other, surgery.delta(model), "d")
    assert torch.equal(run(other, x), run(model, x))


def test_training_lowers_the_loss_and_moves_the_magnitude():
    model = tiny_llama()
    surgery.inject(model, "dora", targets=["q_proj", "v_proj", "up_proj"], r=4, alpha=8)
    ads = engine.adapters(model, "default")
    m0 = {p: ad.lora_magnitude_vector.detach().clone() for p, ad in ads.items()}
    x = batch_for(model)
    x = {**x, "labels": x["input_ids"]}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not torch.equal(ad.lora_magnitude_vector.detach(), m0[p]) for p, ad in ads.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".surgery." in n
    }
