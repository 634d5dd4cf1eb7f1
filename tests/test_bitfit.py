"""BitFit: outputs against a copy of the base whose biases are edited by hand, disable / remove exact,
merge / unmerge bit-exact (a bias added to a module without one and taken away again), gradients
only on the bias deltas, the Hub, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import assert_snapshot_equal, assert_state_equal, snapshot, state_bits
from models import batch_for, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import surgery
from registry import Hub
from surgery import engine


def _out(model: nn.Module, batch=None) -> torch.Tensor:
    with torch.no_grad():
        out = model(**(batch or batch_for(model)))
    return getattr(out, "logits", None) if hasattr(out, "logits") else out.last_hidden_state


@torch.no_grad()
def _randomize(model: nn.Module, name: str = "b", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    got = {}
    for path, ad in engine.adapters(model, name).items():
        ad.bias_delta.copy_(torch.randn(ad.bias_delta.shape, generator=g) * 0.5)
        got[path] = ad.bias_delta.detach().clone()
    return got


@torch.no_grad()
def _by_hand(base: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """The reference: a copy of the base whose biases get the deltas directly (a zero bias first where none)."""
    ref = copy.deepcopy(base)
    for path, d in deltas.items():
        mod = ref.get_submodule(path)
        if mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros_like(d))
        mod.bias += d.to(mod.bias.dtype)
    return ref


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert])
def test_outputs_match_biases_edited_by_hand(factory) -> None:
    model = factory()
    base = copy.deepcopy(model)
    want_base = _out(model)
    inj = surgery.inject(model, "bitfit", name="b")
    assert torch.equal(_out(model), want_base), "a fresh BitFit delta is not the identity"
    deltas = _randomize(model)
    ref = _by_hand(base, deltas)
    torch.testing.assert_close(_out(model), _out(ref), rtol=0, atol=1e-5)
    with surgery.disable(model):
        assert torch.equal(_out(model), want_base)
    # the base's biases are untouched while the delta is injected
    assert_state_equal(state_bits(base), {k: v for k, v in state_bits(model).items() if k in state_bits(base)})
    assert inj.sites


def test_default_sites_and_narrowing() -> None:
    llama, gpt2, bert = tiny_llama(), tiny_gpt2(), tiny_bert()
    # Llama has no bias anywhere: every linear layer gets one from zero
    sites = surgery.inject(llama, "bitfit", name="b").sites
    assert sorted(sites) == sorted(s.path for s in surgery.find(llama, "@linear"))
    # GPT-2: every bias, LayerNorms' included; BERT too, with its pooler
    with_bias = lambda m: sorted(p for p, x in m.named_modules() if isinstance(x._parameters.get("bias"), nn.Parameter))  # noqa: E731
    assert sorted(surgery.inject(gpt2, "bitfit", name="b").sites) == with_bias(gpt2)
    want_bert = with_bias(bert)
    assert sorted(surgery.inject(bert, "bitfit", name="b").sites) == want_bert
    assert any("LayerNorm" in p for p in want_bert)
    # targets= narrows
    q = surgery.inject(tiny_llama(), "bitfit", targets="@q", name="b").sites
    assert q and all(p.endswith("q_proj") for p in q)
    down = surgery.inject(tiny_gpt2(), "bitfit", targets="@mlp.down", name="b").sites
    assert down and all(p.endswith("mlp.c_proj") for p in down)


def test_conv_and_channel_norms_against_hand_edits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(144)
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    base = copy.deepcopy(model)
    sites = surgery.inject(model, "bitfit", targets=["0", "1", "2", "4"], name="b").sites
    assert sites == ("0", "1", "2", "4")
    deltas = _randomize(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _by_hand(base, deltas)(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_bit_exact(factory, dtype) -> None:
    model = factory().to(dtype)
    before = state_bits(model)
    attrs = {p: sorted(vars(m)) for p, m in model.named_modules()}
    surgery.inject(model, "bitfit", name="b")
    _randomize(model)
    want = _out(model)
    surgery.merge(model, "b")
    assert surgery.merged(model) == ["b"]
    got = _out(model)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.1)
    if factory is tiny_llama:  # the merged biases are real parameters of the modules
        assert isinstance(model.model.layers[0].self_attn.q_proj.bias, nn.Parameter)
    surgery.unmerge(model, "b")
    base = set(surgery.base_state_dict(model))
    assert_state_equal(before, {k: v for k, v in state_bits(model).items() if k in base})
    assert model.model.layers[0].self_attn.q_proj.bias is None if factory is tiny_llama else True
    assert torch.equal(_out(model), want)  # runs unmerged again
    surgery.merge(model, "b")
    surgery.remove(model, "b")  # a merged delta leaves the base as it was
    assert_state_equal(before, state_bits(model))
    assert {p: sorted(vars(m)) for p, m in model.named_modules()} == attrs


def test_unmerge_refuses_an_edited_added_bias() -> None:
    model = tiny_llama()
    surgery.inject(model, "bitfit", targets="@q", name="b")
    _randomize(model)
    surgery.merge(model, "b")
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.bias += 1
    with pytest.raises(surgery.MergeError, match="changed since"):
        surgery.unmerge(model, "b")
    assert surgery.merged(model) == ["b"]  # all sites still merged


def test_gradients_only_on_the_bias_deltas() -> None:
    model = tiny_gpt2()
    surgery.inject(model, "bitfit", name="b")
    ads = engine.adapters(model, "b")
    batch = batch_for(model)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    mine = {id(ad.bias_delta) for ad in ads.values()}
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == mine
    # Δb's gradient is the output's gradient summed over positions: the same as the base bias' gradient
    ref = tiny_gpt2()
    ref(**batch, labels=batch["input_ids"]).loss.backward()
    for path, ad in ads.items():
        torch.testing.assert_close(ad.bias_delta.grad, ref.get_submodule(path).bias.grad, rtol=1e-4, atol=1e-6)


def test_hub_roundtrip(tmp_path) -> None:
    model = tiny_llama()
    surgery.inject(model, "bitfit", name="b")
    _randomize(model)
    want = _out(model)
    hub = Hub(tmp_path / "hub")
    hub.push(model, "acme/bias", adapter="b")
    d = hub.pull("acme/bias")
    assert d.method == "bitfit" and set(d.tensors) == {f"{p}.bias_delta" for p in engine.adapters(model, "b")}
    fresh = tiny_llama()
    surgery.apply(fresh, d)
    assert torch.equal(_out(fresh), want)
    stored = sum(f.stat().st_size for f in hub.blobs.rglob("*") if f.is_file())  # one blob: the safetensors file
    data = sum(t.numel() * 4 for t in d.tensors.values())
    assert data <= stored <= data + 200 * len(d.tensors)


def test_bad_input_leaves_the_model_unchanged() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(surgery.ConfigError, match="add_missing must be True or False"):
        surgery.inject(model, "bitfit", add_missing="yes", name="b")
    with pytest.raises(surgery.ConfigError, match="unknown config key"):
        surgery.inject(model, "bitfit", density=0.1, name="b")
    # Llama has no bias: without add_missing nothing is left to adapt
    with pytest.raises(surgery.SelectorError, match="bitfit"):
        surgery.inject(model, "bitfit", add_missing=False, name="b")
    with pytest.raises(surgery.SelectorError):
        surgery.inject(model, "bitfit", targets="embed_tokens", name="b")
    assert_snapshot_equal(before, snapshot(model))


def test_remove_keep_merged_bakes_the_biases_in() -> None:
    """remove(keep_merged=True) of a merged BitFit delta leaves its biases in the modules (a Llama
    projection keeps the bias merging gave it) and the model a plain one with the merged outputs."""
    model = tiny_llama()
    surgery.inject(model, "bitfit", name="b")
    deltas = _randomize(model)
    want = _out(model)
    surgery.merge(model, "b")
    surgery.remove(model, "b", keep_merged=True)
    assert surgery.names(model) == []
    torch.testing.assert_close(_out(model), want, rtol=0, atol=1e-5)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q.bias, nn.Parameter)
    assert torch.equal(q.bias, deltas["model.layers.0.self_attn.q_proj"].to(q.bias.dtype))
