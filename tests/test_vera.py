"""VeRA against PEFT's VeraConfig: the same seed gives PEFT's very projections, equal outputs and
merges; only the lambda vectors are stored; PEFT's layout both ways; bad configs refused."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from _helpers import run
from models import batch_for, tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import surgery
from registry import Hub
from registry.peft_format import PeftFormatError, load_peft, load_peft_delta, save_peft
from surgery.errors import ConfigError
from surgery.methods.vera import projections

peft = pytest.importorskip("peft")

CASES = {
    "llama_q_v": (tiny_llama, ["q_proj", "v_proj"]),  # v is 64 -> 32 (GQA): two shapes already
    "llama_q_up": (tiny_llama, ["q_proj", "up_proj"]),  # 64x64 and 128x64
    "llama_up_down": (tiny_llama, ["up_proj", "down_proj"]),  # in_max and out_max from different sites
    "gpt2_conv1d": (tiny_gpt2, ["c_attn", "c_fc"]),
}


def _quiet(f, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*a, **k)


def _peft_vera(model, targets, **kw):
    cfg = _quiet(peft.VeraConfig, target_modules=targets, **kw)
    return _quiet(peft.get_peft_model, copy.deepcopy(model), cfg).eval()


@torch.no_grad()
def _randomize(model, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    for ad in surgery.engine.adapters(model, name).values():
        for p in ad.tensors().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@torch.no_grad()
def _copy_to_peft(model, pm, name="default"):
    for path, ad in surgery.engine.adapters(model, name).items():
        mod = pm.base_model.model.get_submodule(path)
        mod.vera_lambda_b["default"].copy_(ad.vera_lambda_b)
        mod.vera_lambda_d["default"].copy_(ad.vera_lambda_d)


def _shared(model, name="default"):
    ads = list(surgery.engine.adapters(model, name).values())
    assert len({id(a.projections) for a in ads}) == 1, "one projection pair per delta"
    return ads[0].projections


@pytest.mark.parametrize("case", list(CASES))
def test_equals_peft_vera(case):
    factory, targets = CASES[case]
    model = factory()
    x = batch_for(model)
    base = run(model, x)
    pm = _peft_vera(model, targets, r=16, projection_prng_key=7)
    surgery.inject(model, "vera", targets=targets, r=16, projection_prng_key=7)
    assert torch.equal(run(model, x), base), "identity at injection (lambda_b = 0)"
    # the same seed draws PEFT's very projections, at PEFT's size
    proj = _shared(model)
    assert torch.equal(proj.vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(proj.vera_B, pm.base_model.vera_B["default"])
    for path, ad in surgery.engine.adapters(model, "default").items():  # PEFT's init of the vectors
        mod = pm.base_model.model.get_submodule(path)
        assert torch.equal(ad.vera_lambda_b, mod.vera_lambda_b["default"])
        assert torch.equal(ad.vera_lambda_d, mod.vera_lambda_d["default"])
    _randomize(model)
    _copy_to_peft(model, pm)
    ours = run(model, x)
    assert (ours - base).abs().max() > 1e-2, "vacuous"
    torch.testing.assert_close(ours, run(pm, x), atol=1e-5, rtol=1e-5)


def test_contribution_is_the_formula_on_slices():
    model = tiny_llama()
    surgery.inject(model, "vera", targets=["up_proj", "down_proj"], r=8)
    _randomize(model)
    path = "model.layers.0.mlp.down_proj"  # in 128, out 64: A[:, :128], B[:64]
    ad = surgery.engine.adapters(model, "default")[path]
    A, B = projections(0, 8, [128, 128])
    assert torch.equal(ad.projections.vera_A, A) and torch.equal(ad.projections.vera_B, B)
    bound_a, bound_b = math.sqrt(6 / 128), math.sqrt(6 / 8)  # Kaiming-uniform with gain sqrt(2)
    assert A.abs().max() <= bound_a and A.abs().max() > 0.9 * bound_a and B.abs().max() <= bound_b
    x = torch.randn(3, 128)
    mod = model.get_submodule(path)
    want = mod.weight @ x.T
    want = want.T + ad.vera_lambda_b * ((ad.vera_lambda_d * (x @ A[:, :128].T)) @ B[:64].T)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), want, atol=1e-5, rtol=1e-5)


def test_projections_are_shared_frozen_buffers_out_of_state_dict():
    model = tiny_llama()
    keys = set(model.state_dict())
    surgery.inject(model, "vera", targets=["q_proj", "v_proj", "up_proj", "down_proj"], r=32)
    proj = _shared(model)
    assert list(proj.vera_A.shape) == [32, 128] and list(proj.vera_B.shape) == [128, 32]
    assert not any(p is proj.vera_A or p is proj.vera_B for p in model.parameters())
    new = set(model.state_dict()) - keys
    assert new and all(k.endswith((".vera_lambda_b", ".vera_lambda_d")) for k in new)
    # memory: r * (in_max + out_max) once, however many sites
    bufs = {id(b): b for n, b in model.named_buffers() if "vera_" in n}
    assert sum(b.numel() for b in bufs.values()) == 32 * (128 + 128)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in trainable)
    model.to(torch.float64)  # follows the model's dtype, still one shared pair
    proj = _shared(model)
    assert proj.vera_A.dtype == torch.float64 and torch.equal(proj.vera_A, projections(0, 32, [128, 128])[0].double())
    twin = copy.deepcopy(model)
    assert _shared(twin) is not proj  # a copy shares within itself, not with the original


def test_delta_holds_only_the_vectors_and_reproduces_outputs():
    model = tiny_llama()
    x = batch_for(model)
    surgery.inject(model, "vera", targets=["q_proj", "up_proj"], r=16, projection_prng_key=11)
    _randomize(model)
    want = run(model, x)
    d = surgery.delta(model, "default")
    assert all(k.endswith((".vera_lambda_b", ".vera_lambda_d")) for k in d.tensors)
    assert len(d.tensors) == 2 * 4 and all(t.dim() == 1 for t in d.tensors.values())
    assert d.config["projection_prng_key"] == 11 and d.config["projection_shape"] == [128, 64]
    fresh = tiny_llama()
    surgery.apply(fresh, d)
    assert torch.equal(run(fresh, x), want)
    # a hot-swap with another seed draws the other projections
    d2 = copy.deepcopy(d)
    d2.config["projection_prng_key"] = 12
    surgery.apply(fresh, d2)
    assert torch.equal(_shared(fresh).vera_A, projections(12, 16, [128, 64])[0])
    assert not torch.allclose(run(fresh, x), want)


@pytest.mark.parametrize("factory,targets", [(tiny_llama, ["q_proj", "up_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_merge_matches_peft_and_unmerges_bit_exact(factory, targets):
    model = factory()
    x = batch_for(model)
    pm = _peft_vera(model, targets, r=16)
    surgery.inject(model, "vera", targets=targets, r=16)
    _randomize(model)
    _copy_to_peft(model, pm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    live = run(model, x)
    surgery.merge(model, "default")
    torch.testing.assert_close(run(model, x), live, atol=1e-5, rtol=1e-5)
    merged = _quiet(pm.merge_and_unload)
    for path in surgery.engine.adapters(model, "default"):
        torch.testing.assert_close(
            model.get_submodule(path).weight, merged.get_submodule(path).weight, atol=1e-6, rtol=1e-6
        )
    surgery.unmerge(model, "default")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(run(model, x), live)


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("factory,targets", [(tiny_llama, ["q_proj", "up_proj"]), (tiny_gpt2, ["c_attn"])])
def test_save_peft_loads_in_peft(factory, targets, save_projection, tmp_path):
    model = factory()
    x = batch_for(model)
    surgery.inject(model, "vera", targets=targets, r=8, projection_prng_key=5, save_projection=save_projection)
    _randomize(model)
    want = run(model, x)
    save_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["save_projection"] is save_projection
    assert cfg["projection_prng_key"] == 5 and cfg["r"] == 8
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) is save_projection
    assert all(k.startswith("base_model.model.") for k in keys - {"base_model.vera_A", "base_model.vera_B"})
    pm = _quiet(peft.PeftModel.from_pretrained, factory(), str(tmp_path)).eval()
    torch.testing.assert_close(run(pm, x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("save_projection", [True, False])
def test_load_peft_saved_by_peft(save_projection, tmp_path):
    model = tiny_llama()
    x = batch_for(model)
    base = run(model, x)
    pm = _peft_vera(model, ["q_proj", "up_proj"], r=8, projection_prng_key=3, save_projection=save_projection)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for n, p in pm.named_parameters():
            if "vera_lambda" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    want = run(pm, x)
    _quiet(pm.save_pretrained, str(tmp_path))
    inj = load_peft(model, tmp_path, name="v")
    assert inj.method == "vera" and len(inj.sites) == 4
    torch.testing.assert_close(run(model, x), want, atol=1e-5, rtol=1e-5)
    assert surgery.delta(model, "v").config["projection_prng_key"] == 3
    surgery.remove(model)
    assert torch.equal(run(model, x), base)
    d = load_peft_delta(tmp_path)  # without the model: the shape comes from the saved projections
    assert d.config["projection_shape"] == ([128, 64] if save_projection else None)


def test_load_peft_refuses_projections_it_would_not_regenerate(tmp_path):
    pm = _peft_vera(tiny_llama(), ["q_proj"], r=4)
    _quiet(pm.save_pretrained, str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    ts = load_file(str(path))
    ts["base_model.vera_A"][0, 0] += 1e-3
    save_file(ts, str(path))
    with pytest.raises(PeftFormatError, match="differ from the projections projection_prng_key=0 draws"):
        load_peft_delta(tmp_path)
    model = tiny_llama()
    names = surgery.names(model)
    with pytest.raises(PeftFormatError, match="vera_A"):
        load_peft(model, tmp_path)
    assert surgery.names(model) == names


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("bias", "all", "bias"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("some_new_flag", True, "some_new_flag"),
        ("r", 0, "r must be a positive integer"),
    ],
)
def test_load_peft_refuses_fields_it_cannot_represent(field, value, match, tmp_path):
    pm = _peft_vera(tiny_llama(), ["q_proj"], r=4)
    _quiet(pm.save_pretrained, str(tmp_path))
    p = tmp_path / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg[field] = value
    p.write_text(json.dumps(cfg))
    with pytest.raises(PeftFormatError, match=match):
        load_peft_delta(tmp_path)


def test_hub_import_export(tmp_path):
    pm = _peft_vera(tiny_llama(), ["q_proj", "v_proj"], r=8, projection_prng_key=9)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "vera_lambda_b" in n:
                p.fill_(0.3)
    x = batch_for(pm)
    want = run(pm, x)
    _quiet(pm.save_pretrained, str(tmp_path / "peft"))
    hub = Hub(tmp_path / "hub")
    ref = hub.import_peft(tmp_path / "peft", "team/vera")
    out = hub.export_peft(ref, tmp_path / "out")
    assert (
        load_file(str(out / "adapter_model.safetensors")).keys()
        == load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys()
    )
    again = _quiet(peft.PeftModel.from_pretrained, tiny_llama(), str(out)).eval()
    torch.testing.assert_close(run(again, x), want, atol=1e-5, rtol=1e-5)
    model = tiny_llama()
    surgery.apply(model, hub.pull(ref), allow_other_base=True)
    torch.testing.assert_close(run(model, x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=True), "r must be a positive integer"),
        (dict(projection_prng_key=1.5), "projection_prng_key"),
        (dict(d_initial=float("nan")), "d_initial"),
        (dict(dropout=1.0), "dropout"),
        (dict(save_projection="yes"), "save_projection"),
        (dict(projection_shape=[64]), "projection_shape"),
        (dict(projection_shape=[64, 32]), "these sites need \\[64, 64\\]"),
        (dict(vera_dropout=0.1), "did you mean 'dropout'"),
    ],
)
def test_bad_config(kw, match):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        surgery.inject(model, "vera", targets=["q_proj"], **kw)
    assert surgery.names(model) == []


def test_non_identity_init_and_dropout_as_peft():
    model = tiny_llama()
    surgery.inject(model, "vera", targets=["q_proj"], r=4, init_weights=False, d_initial=0.5, dropout=0.5)
    ad = next(iter(surgery.engine.adapters(model, "default").values()))
    assert torch.equal(ad.vera_lambda_b, torch.ones(64)) and not torch.equal(ad.vera_lambda_d, torch.full((4,), 0.5))
    x = torch.randn(2, 64)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        assert torch.equal(q(x), q(x))  # eval: no dropout
        q.train()
        assert not torch.equal(q(x), q(x))


def test_trains_only_the_vectors():
    model = tiny_llama()
    surgery.inject(model, "vera", targets=["q_proj", "v_proj", "up_proj"], r=32)
    model.train()
    proj = _shared(model)
    A0 = proj.vera_A.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-2)
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert torch.equal(proj.vera_A, A0)
    assert all(p.grad is not None for p in params)


def test_half_precision_base_keeps_fp32_vectors_and_merges_exactly():
    model = tiny_llama().to(torch.bfloat16)
    x = batch_for(model)
    surgery.inject(model, "vera", targets=["q_proj", "up_proj"], r=8)
    _randomize(model)
    ad = next(iter(surgery.engine.adapters(model, "default").values()))
    assert ad.vera_lambda_b.dtype == torch.float32 and _shared(model).vera_A.dtype == torch.float32
    live = run(model, x)
    assert live.dtype == torch.bfloat16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    surgery.merge(model)
    surgery.unmerge(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(run(model, x), live)
