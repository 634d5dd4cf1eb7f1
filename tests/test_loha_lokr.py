"""LoHa and LoKr against PEFT's own layers on the same tensors: outputs, gradients, training-time
dropouts, merge; PEFT's on-disk format both ways, the Hub; config checks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import bits, run
from models import batch_for, tiny_cnn, tiny_gpt2, tiny_llama
from safetensors.torch import save_file
from torch import nn

import surgery
from registry import Hub
from registry.peft_format import PeftFormatError, load_peft, load_peft_delta, save_peft
from surgery import engine
from surgery.errors import ConfigError

peft = pytest.importorskip("peft")


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(-1))


def _conv1d_net() -> Conv1dNet:
    return Conv1dNet().eval()


def _input(factory):
    if factory is _conv1d_net:
        return torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(0))
    return batch_for(factory())


def _peft_config(method: str, targets, **kw):
    kw = dict(kw)
    if "init" in kw:
        kw["init_weights"] = {"default": True, "random": False}.get(kw.pop("init"), "lycoris")
    cls = peft.LoHaConfig if method == "loha" else peft.LoKrConfig
    return cls(target_modules=targets, **kw)


def _peft_model(factory, method, targets, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(factory(), _peft_config(method, targets, **kw))


def _pair(factory, method, targets, seed=0, **kw):
    """Ours and PEFT's on two copies of one base, with the same random non-zero tensors."""
    ours, pm = factory(), _peft_model(factory, method, targets, **kw).eval()
    surgery.inject(ours, method, targets=targets, **kw)
    ads = engine.adapters(ours, "default")
    theirs = dict(pm.base_model.model.named_modules())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, ad in ads.items():
            layer = theirs[path]
            mine = ad.tensors()
            peft_names = {n for n in layer.adapter_layer_names if "default" in getattr(layer, n)}
            assert set(mine) == peft_names, (path, sorted(mine), sorted(peft_names))
            for k, t in mine.items():
                ref = getattr(layer, k)["default"]
                assert ref.shape == t.shape, (path, k)
                ref.copy_(torch.randn(t.shape, generator=g) * 0.3)
                t.copy_(ref)
            assert ad.scale == pytest.approx(layer.scaling["default"]), path
    return ours, pm, ads, theirs


CASES = {
    "loha_llama": (tiny_llama, "loha", ["q_proj", "v_proj", "down_proj"], dict(r=4, alpha=6)),
    "loha_patterns": (
        tiny_llama,
        "loha",
        ["q_proj", "v_proj"],
        dict(r=4, alpha=8, rank_pattern={"layers.1.self_attn.v_proj": 2}, alpha_pattern={"q_proj": 3}),
    ),
    "loha_conv2d": (tiny_cnn, "loha", ["conv1", "conv2", "fc"], dict(r=2, alpha=4)),
    "loha_conv2d_effective": (tiny_cnn, "loha", ["conv1", "conv2"], dict(r=2, alpha=4, use_effective_conv2d=True)),
    "loha_conv1d_effective": (_conv1d_net, "loha", ["conv"], dict(r=2, alpha=3, use_effective_conv2d=True)),
    "lokr_llama": (tiny_llama, "lokr", ["q_proj", "v_proj", "down_proj"], dict(r=4, alpha=6)),
    "lokr_full_w2": (tiny_llama, "lokr", ["q_proj", "k_proj"], dict(r=8, alpha=2)),
    "lokr_decompose_both": (tiny_llama, "lokr", ["q_proj", "down_proj"], dict(r=2, alpha=6, decompose_both=True)),
    "lokr_factor": (tiny_llama, "lokr", ["q_proj", "up_proj"], dict(r=2, alpha=6, decompose_factor=4)),
    "lokr_patterns": (
        tiny_llama,
        "lokr",
        ["q_proj", "v_proj"],
        dict(r=2, rank_pattern={"v_proj": 8}, alpha_pattern={"q_proj": 5}),
    ),
    "lokr_conv2d": (tiny_cnn, "lokr", ["conv1", "conv2"], dict(r=1, alpha=6)),
    "lokr_conv2d_effective": (tiny_cnn, "lokr", ["conv1", "conv2"], dict(r=1, alpha=6, use_effective_conv2d=True)),
    "lokr_conv2d_full": (tiny_cnn, "lokr", ["conv2"], dict(r=8, alpha=6)),
    "lokr_conv1d_full": (_conv1d_net, "lokr", ["conv"], dict(r=8, alpha=6)),
}


def _loss(model, x) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    return (getattr(out, "logits", out).float() ** 2).mean()


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_grads_equal_peft(case):
    factory, method, targets, kw = CASES[case]
    ours, pm, ads, theirs = _pair(factory, method, targets, **kw)
    x = _input(factory)
    got, want = run(ours, x), run(pm, x)
    assert (want - run(factory(), x)).abs().max() > 1e-3, "the update does not change the output: vacuous"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if case.startswith("loha") and kw.get("use_effective_conv2d"):
        return  # PEFT's HadaWeightCP.backward fails gradcheck: see test_loha_cp_gradients_pass_gradcheck
    for m in (ours, pm):
        _loss(m, x).backward()
    for path, ad in ads.items():
        for k, t in ad.tensors().items():
            ref = getattr(theirs[path], k)["default"]
            torch.testing.assert_close(t.grad, ref.grad, atol=1e-5, rtol=1e-4, msg=f"{path}.{k} grad")


def test_loha_cp_gradients_pass_gradcheck():
    """Our LoHa conv cores train by autograd; PEFT's hand-written HadaWeightCP.backward (0.21.2)
    disagrees with finite differences, so its conv-core gradients are not compared."""
    from surgery.methods.loha import LoHaAdapter

    ad = LoHaAdapter((5, 3, 3, 2), 2, True, False, torch.zeros(1, dtype=torch.float64))
    ad.scale = 1.5
    names = list(ad.tensors())
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(t.shape, generator=g, dtype=torch.float64, requires_grad=True) for t in ad.tensors().values()]

    def dense(*ts):
        for n, t in zip(names, ts, strict=True):
            ad._parameters[n] = t
        return ad.dense()

    assert names == ["hada_w1_a", "hada_w1_b", "hada_t1", "hada_w2_a", "hada_w2_b", "hada_t2"]
    assert torch.autograd.gradcheck(dense, inputs)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_train_mode_dropouts_equal_peft_with_the_same_seed(method):
    kw = dict(r=4, alpha=6, rank_dropout=0.5, module_dropout=0.3)
    if method == "lokr":
        kw["rank_dropout_scale"] = True
    ours, pm, _, _ = _pair(tiny_llama, method, ["q_proj", "v_proj"], **kw)
    x = batch_for(ours)
    ours.train(), pm.train()
    outs = []
    for m in (ours, pm):
        torch.manual_seed(7)
        outs.append(torch.stack([run(m, x) for _ in range(4)]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    ours.eval()
    evals = torch.stack([run(ours, x) for _ in range(2)])
    assert not torch.allclose(outs[0][0], evals[0], atol=1e-4), "no dropout in training: vacuous"
    assert torch.equal(evals[0], evals[1]), "dropout in eval mode"


@pytest.mark.parametrize(
    "method,kw", [("loha", {}), ("lokr", {}), ("lokr", dict(init="lycoris")), ("lokr", dict(decompose_both=True, r=2))]
)
def test_identity_at_injection_and_init_as_peft(method, kw):
    m = tiny_llama()
    x = batch_for(m)
    before = run(m, x)
    surgery.inject(m, method, **({} if method == "loha" and not kw else {"targets": ["q_proj", "v_proj"]}), **kw)
    assert torch.equal(run(m, x), before)
    assert sorted(engine.adapters(m, "default"))[:2] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    pm = _peft_model(tiny_llama, method, ["q_proj", "v_proj"], **kw)
    theirs = dict(pm.base_model.model.named_modules())
    for path, ad in engine.adapters(m, "default").items():
        for k, t in ad.tensors().items():
            ref = getattr(theirs[path], k)["default"]
            assert t.shape == ref.shape and bool(t.any()) == bool(ref.any()), (path, k)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_random_init_changes_outputs(method):
    m = tiny_llama()
    x = batch_for(m)
    before = run(m, x)
    surgery.inject(m, method, targets=["q_proj"], init="random", alpha=64)
    assert not torch.allclose(run(m, x), before, atol=1e-4)


@pytest.mark.parametrize("case", ["loha_llama", "lokr_decompose_both", "loha_conv2d_effective", "lokr_conv2d"])
def test_merge_unmerge_bit_exact(case):
    factory, method, targets, kw = CASES[case]
    ours, pm, _, _ = _pair(factory, method, targets, **kw)
    x = _input(factory)
    before = {k: bits(v) for k, v in ours.state_dict().items()}
    unmerged = run(ours, x)
    surgery.merge(ours, "default")
    torch.testing.assert_close(run(ours, x), unmerged, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
    for path in engine.adapters(ours, "default"):
        mine = ours.get_submodule(path).weight
        torch.testing.assert_close(mine, pm.base_model.model.get_submodule(path).base_layer.weight, atol=1e-6, rtol=0)
    surgery.unmerge(ours, "default")
    after = {k: bits(v) for k, v in ours.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(run(ours, x), unmerged)


def test_merge_in_train_mode_uses_no_dropout():
    ours, _, _, _ = _pair(tiny_llama, "loha", ["q_proj"], r=2, rank_dropout=0.5, module_dropout=0.5)
    x = batch_for(ours)
    want = run(ours, x)
    ours.train()
    surgery.merge(ours, "default")
    ours.eval()
    torch.testing.assert_close(run(ours, x), want, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_sites_are_linear_layers_transposed(tmp_path):
    m = tiny_gpt2()
    x = batch_for(m)
    surgery.inject(m, "lokr", targets=["c_attn"], r=2, init="random")
    ad = engine.adapters(m, "default")["transformer.h.0.attn.c_attn"]
    dw = ad.dense()  # [out, in] = [192, 64]
    assert dw.shape == (192, 64)
    want = run(m, x)
    surgery.merge(m, "default")
    torch.testing.assert_close(run(m, x), want, atol=1e-5, rtol=1e-5)
    surgery.unmerge(m, "default")
    with pytest.raises(PeftFormatError, match="Conv1D"):
        save_peft(m, tmp_path / "never", "default")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_half_precision_base_trains_fp32_factors(method):
    m = nn.Sequential(nn.Linear(16, 16)).to(torch.bfloat16)
    surgery.inject(m, method, targets="0", r=2, init="random")
    ad = engine.adapters(m, "default")["0"]
    assert {t.dtype for t in ad.tensors().values()} == {torch.float32}
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = m[0](x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in ad.tensors().values())
    want = x.float() @ (m[0].weight.float() + ad.dense().to(torch.bfloat16).float()).t() + m[0].bias.float()
    torch.testing.assert_close(y.float(), want, atol=0.05, rtol=0.02)


# ------------------------------------------------------------------ PEFT's format


@pytest.mark.parametrize("case", ["loha_patterns", "loha_conv2d_effective", "lokr_patterns", "lokr_decompose_both"])
def test_save_peft_loads_in_peft_with_equal_outputs(case, tmp_path):
    factory, method, targets, kw = CASES[case]
    ours, _, _, _ = _pair(factory, method, targets, **kw)
    save_peft(ours, tmp_path / "a", "default")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.upper()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(factory(), str(tmp_path / "a")).eval()
    x = _input(factory)
    torch.testing.assert_close(run(pm, x), run(ours, x), atol=1e-5, rtol=1e-5)
    # and back: the folder reads into an equal delta
    back = load_peft_delta(tmp_path / "a")
    orig = surgery.delta(ours, "default")
    assert set(back.tensors) == set(orig.tensors)
    assert all(torch.equal(back.tensors[k], orig.tensors[k]) for k in orig.tensors)


@pytest.mark.parametrize("case", ["loha_patterns", "lokr_patterns", "lokr_conv2d_effective", "lokr_factor"])
def test_load_peft_of_a_peft_saved_folder(case, tmp_path):
    factory, method, targets, kw = CASES[case]
    _, pm, _, _ = _pair(factory, method, targets, seed=3, **kw)
    pm.save_pretrained(str(tmp_path / "p"))
    m = factory()
    load_peft(m, tmp_path / "p", "ly")
    x = _input(factory)
    torch.testing.assert_close(run(m, x), run(pm, x), atol=1e-5, rtol=1e-5)
    # a rank set by a pattern and alphas from PEFT's patterns are kept per site
    for path, ad in engine.adapters(m, "ly").items():
        assert ad.scale == pytest.approx(pm.base_model.model.get_submodule(path).scaling["default"])


def test_lokr_full_factors_keep_their_pattern_rank_through_peft(tmp_path):
    # both factors full: the rank is in no shape, only in the scale alpha / r
    factory, method, targets, kw = CASES["lokr_patterns"]
    ours, _, ads, _ = _pair(factory, method, targets, **kw)
    v = "model.layers.0.self_attn.v_proj"
    assert ads[v].scale == pytest.approx(8 / 8) and "lokr_w2" in ads[v].tensors()
    save_peft(ours, tmp_path / "a", "default")
    m = tiny_llama()
    load_peft(m, tmp_path / "a", "back")
    assert engine.adapters(m, "back")[v].scale == pytest.approx(1.0)


def test_hub_export_import_round_trip(tmp_path):
    ours, _, _, _ = _pair(tiny_llama, "lokr", ["q_proj", "v_proj"], r=2, alpha=4, decompose_both=True)
    hub = Hub(tmp_path / "hub")
    hub.push(ours, "acme/kron", adapter="default")
    out = hub.export_peft("acme/kron@1", tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LOKR"
    back = hub.pull(hub.import_peft(out, "acme/back"))
    orig = surgery.delta(ours, "default")
    assert back.method == "lokr" and set(back.tensors) == set(orig.tensors)
    assert all(torch.equal(back.tensors[k], orig.tensors[k]) for k in orig.tensors)
    m = tiny_llama()
    surgery.apply(m, back, "b", allow_other_base=True)
    x = batch_for(m)
    torch.testing.assert_close(run(m, x), run(ours, x), atol=1e-6, rtol=0)


def _peft_folder(tmp_path, cfg_update=None, extra_tensor=None):
    _, pm, _, _ = _pair(tiny_llama, "loha", ["q_proj"], r=2)
    d = tmp_path / "p"
    pm.save_pretrained(str(d))
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(cfg_update or {})
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    if extra_tensor:
        from safetensors.torch import load_file

        ts = load_file(str(d / "adapter_model.safetensors"))
        save_file({**ts, extra_tensor: torch.zeros(2)}, str(d / "adapter_model.safetensors"))
    return d


@pytest.mark.parametrize(
    "update,extra,match",
    [
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({"some_new_field": 3}, None, "some_new_field"),
        ({"init_weights": "pissa"}, None, "init_weights"),
        ({"rank_dropout": 1.5}, None, "rank_dropout"),
        (None, "base_model.model.model.layers.0.self_attn.q_proj.hada_w3", "hada_w3"),
    ],
)
def test_unrepresentable_peft_adapters_are_refused_naming_why(tmp_path, update, extra, match):
    d = _peft_folder(tmp_path, update, extra)
    m = tiny_llama()
    before = {k: bits(v) for k, v in m.state_dict().items()}
    with pytest.raises(PeftFormatError, match=match):
        load_peft(m, d, "x")
    assert surgery.names(m) == [] and all(torch.equal(before[k], bits(v)) for k, v in m.state_dict().items())


# ------------------------------------------------------------------ configs and training


@pytest.mark.parametrize(
    "method,kw,match",
    [
        ("loha", dict(r=0), "r must be a positive integer"),
        ("loha", dict(r=2.5), "r must be a positive integer"),
        ("loha", dict(alpha=0), "alpha must be a positive number"),
        ("loha", dict(rank_dropout=1.0), "rank_dropout must be in"),
        ("loha", dict(module_dropout=-0.1), "module_dropout must be in"),
        ("loha", dict(init="lycoris"), "init must be one of"),
        ("loha", dict(use_effective_conv2d="yes"), "use_effective_conv2d"),
        ("loha", dict(rank_pattern={"@q": 2}), "roles are not supported"),
        ("loha", dict(alpha_pattern={"q_proj": -1}), r"alpha_pattern\['q_proj'\] must be a positive number"),
        ("lokr", dict(decompose_factor=0), "decompose_factor must be -1 or a positive integer"),
        ("lokr", dict(decompose_both=1), "decompose_both must be True or False"),
        ("lokr", dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
        ("lokr", dict(lora_alpha=3), "did you mean"),
    ],
)
def test_bad_configs_raise(method, kw, match):
    m = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        surgery.inject(m, method, **kw)
    assert surgery.names(m) == []


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_training_lowers_the_loss_and_moves_only_the_adapter(method):
    torch.manual_seed(0)
    m = tiny_llama()
    base = {k: bits(v) for k, v in m.state_dict().items()}
    surgery.inject(m, method, targets=["q_proj", "v_proj", "o_proj", "down_proj"], r=4, alpha=8)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=5e-2)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        logits = m(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.92 * losses[0] and losses[0] > losses[1] > losses[2], losses
    after = m.state_dict()
    assert all(torch.equal(base[k], bits(after[k])) for k in base)
