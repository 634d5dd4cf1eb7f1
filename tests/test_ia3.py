"""(IA)^3 against PEFT's IA3 on the same tensors: outputs, shapes, merge, PEFT's on-disk layout
both ways, the Hub's PEFT import/export, training, and the configs it refuses."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import state_bits
from models import batch_for, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from torch import nn

import surgery
from registry import Hub
from registry.peft_format import PeftFormatError, load_peft, load_peft_delta, save_peft
from surgery import engine
from surgery.errors import ConfigError, SelectorError
from surgery.methods import get_method
from surgery.methods.base import PeftContext
from surgery.methods.ia3 import IA3Config, IA3Input, IA3Output

peft = pytest.importorskip("peft")

# model factory, PEFT's target_modules and feedforward_modules for our default targets
CASES = {
    "llama": (tiny_llama, ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


class ConvNet(nn.Module):
    """Conv2d sites: plain, with bias, and a grouped one (feed-forward merge per group)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.head(h.mean((-1, -2)))


def _run(model: nn.Module, batch) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def _peft(base: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.IA3Config(**kw)).eval()


def _peft_from_dir(base: nn.Module, d) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(d)).eval()


@torch.no_grad()
def _randomize(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for ad in engine.adapters(model, name).values():
        ad.ia3_l.copy_(1 + 0.5 * torch.randn(ad.ia3_l.shape, generator=g))


@torch.no_grad()
def _copy_into_peft(ours: nn.Module, pm: nn.Module, name: str = "default") -> None:
    """Our vectors into PEFT's model, checking PEFT holds the very same sites and shapes."""
    sd = {k.removesuffix(".default"): v for k, v in pm.state_dict().items() if ".ia3_l." in k}
    ads = engine.adapters(ours, name)
    assert set(sd) == {f"base_model.model.{p}.ia3_l" for p in ads}
    for p, ad in ads.items():
        t = sd[f"base_model.model.{p}.ia3_l"]
        assert t.shape == ad.ia3_l.shape, p
        t.copy_(ad.ia3_l)


def _injected(case: str, seed: int = 0, default: bool = False) -> tuple[nn.Module, nn.Module]:
    """(our model with random vectors at PEFT's default sites, a clean copy of the base): our
    default targets (found by role), or PEFT's module names (no graph to trace: faster)."""
    factory, tm, ffm = CASES[case]
    m = factory()
    surgery.inject(m, "ia3", **({} if default else dict(targets=tm, feedforward=ffm)))
    _randomize(m, seed=seed)
    return m, factory()


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_peft(case):
    m, base = _injected(case, default=True)
    _, tm, ffm = CASES[case]
    pm = _peft(base, target_modules=tm, feedforward_modules=ffm)
    _copy_into_peft(m, pm)
    batch = batch_for(m)
    with torch.no_grad():
        ours, theirs = _run(m, batch), _run(pm, batch)
        plain = _run(CASES[case][0](), batch)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the vectors do change the output


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert, tiny_t5])
def test_identity_at_injection_and_default_sites(factory):
    m = factory()
    batch = batch_for(m)
    with torch.no_grad():
        ref = m(**batch)
    surgery.inject(m, "ia3")
    ads = engine.adapters(m, "default")
    with torch.no_grad():
        after = m(**batch)
    key = "logits" if hasattr(ref, "logits") else "last_hidden_state"
    assert torch.equal(getattr(ref, key), getattr(after, key))
    ff = {p for p, ad in ads.items() if isinstance(ad, IA3Input)}
    assert ff and ff == {p for p, ad in ads.items() if "mlp.down" in surgery.graph.roles(m).get(p, ())}
    assert all(isinstance(ad, IA3Output) for p, ad in ads.items() if p not in ff)
    assert all(torch.equal(ad.ia3_l, torch.ones_like(ad.ia3_l)) for ad in ads.values())


def test_conv_outputs_equal_peft_and_merge():
    m, base = ConvNet(), ConvNet()
    surgery.inject(m, "ia3", targets=["conv1", "conv2", "conv3"], feedforward=["conv2", "conv3"])
    _randomize(m, seed=3)
    ads = engine.adapters(m, "default")
    assert ads["conv1"].ia3_l.shape == (1, 8, 1, 1) and ads["conv3"].ia3_l.shape == (1, 8, 1, 1)
    pm = _peft(base, target_modules=["conv1", "conv2", "conv3"], feedforward_modules=["conv2", "conv3"])
    _copy_into_peft(m, pm)
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = m(x)
        torch.testing.assert_close(out, pm(x), rtol=0, atol=1e-5)
        before = state_bits(m)
        surgery.merge(m, "default")
        torch.testing.assert_close(m(x), out, rtol=0, atol=1e-5)
        pm.merge_adapter()  # PEFT's merged weights: the same up to rounding
        for p in ("conv1", "conv2", "conv3"):
            w = pm.get_submodule(f"base_model.model.{p}.base_layer").weight
            torch.testing.assert_close(m.get_submodule(p).weight, w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m.conv1.bias, pm.get_submodule("base_model.model.conv1.base_layer").bias)
        surgery.unmerge(m, "default")
    after = state_bits(m)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ merge


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_bit_exact(case):
    m, _ = _injected(case)
    batch = batch_for(m)
    before = state_bits(m)
    with torch.no_grad():
        out = _run(m, batch)
        surgery.merge(m, "default")
        merged_state = state_bits(m)
        # merged weights differ from the base where the vectors act: on weight and bias
        changed = {k for k in before if not torch.equal(before[k], merged_state[k])}
        merged = _run(m, batch)
        surgery.unmerge(m, "default")
        back = _run(m, batch)
    torch.testing.assert_close(merged, out, rtol=0, atol=1e-5)
    assert torch.equal(back, out)
    after = state_bits(m)
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    sites = set(engine.adapters(m, "default"))
    assert {k.rsplit(".", 1)[0] for k in changed} == sites
    if case == "gpt2":  # Conv1D output sites scale their bias too
        assert "transformer.h.0.attn.c_attn.bias" in changed and "transformer.h.0.mlp.c_proj.bias" not in changed


# ------------------------------------------------------------------ PEFT's layout


@pytest.mark.parametrize("case", list(CASES))
def test_save_peft_loads_in_peft(case, tmp_path):
    m, base = _injected(case, seed=1)
    save_peft(m, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["modules_to_save"] is None
    assert cfg["fan_in_fan_out"] is (case == "gpt2")
    pm = _peft_from_dir(base, tmp_path / "a")
    ff = {p for p, ad in engine.adapters(m, "default").items() if isinstance(ad, IA3Input)}
    assert {n for n, mod in pm.named_modules() if getattr(mod, "is_feedforward", False)} == {
        f"base_model.model.{p}" for p in ff
    }
    batch = batch_for(m)
    with torch.no_grad():
        torch.testing.assert_close(_run(m, batch), _run(pm, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_load_peft_reads_a_folder_peft_saved(case, tmp_path):
    factory, tm, ffm = CASES[case]
    pm = _peft(factory(), target_modules=tm, feedforward_modules=ffm)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path / "p"))
    m = factory()
    load_peft(m, tmp_path / "p", name="peft")
    batch = batch_for(m)
    with torch.no_grad():
        torch.testing.assert_close(_run(m, batch), _run(pm, batch), rtol=0, atol=1e-5)
    d = load_peft_delta(tmp_path / "p")  # without a model: sites and sides come from the files alone
    assert d.method == "ia3" and set(d.tensors) == {f"{p}.ia3_l" for p in engine.adapters(m, "peft")}


def test_hub_export_import_peft_round_trip(tmp_path):
    m, base = _injected("gpt2", seed=2)
    hub = Hub(tmp_path / "hub")
    hub.push(m, "acme/ia3")
    out = hub.export_peft("acme/ia3@1", tmp_path / "peft")
    back, orig = hub.pull(hub.import_peft(out, "acme/back")), surgery.delta(m, "default")
    assert back.method == "ia3" and set(back.tensors) == set(orig.tensors)
    assert all(torch.equal(back.tensors[k], orig.tensors[k]) for k in orig.tensors)
    pm = _peft_from_dir(base, out)
    batch = batch_for(m)
    with torch.no_grad():
        torch.testing.assert_close(_run(m, batch), _run(pm, batch), rtol=0, atol=1e-5)


def test_feedforward_names_written_so_peft_tells_them_apart():
    """GPT-2: 'c_proj' ends both attn.c_proj and mlp.c_proj; the feed-forward set must be exact."""
    m = tiny_gpt2()
    surgery.inject(m, "ia3", targets=["c_attn", "attn.c_proj", "mlp.c_proj"], feedforward="mlp.c_proj")
    d = surgery.delta(m)
    sites = d.sites()
    ctx = PeftContext(None, dict.fromkeys(sites, "conv1d_tf"), lambda ps: ["c_attn", "c_proj"])
    fields, tensors = get_method("ia3").to_peft(d.config, sites, ctx)
    ff = fields["feedforward_modules"]
    assert isinstance(ff, str)  # the suffix list ['c_proj'] would also make attn.c_proj feed-forward
    method = get_method("ia3")
    config, ours = method.from_peft({"peft_type": "IA3", **fields}, tensors, ctx)
    assert {k: t.shape for k, t in ours.items()} == {k: t.shape for k, t in d.tensors.items()}
    assert sorted(config["feedforward"]) == sorted(
        "re:" + p.replace(".", r"\.") for p, ad in engine.adapters(m, "default").items() if isinstance(ad, IA3Input)
    )


# ------------------------------------------------------------------ training


def test_training_moves_only_the_vectors_and_loss_falls():
    m = tiny_llama()
    base = state_bits(m)
    surgery.inject(m, "ia3", targets=CASES["llama"][1], feedforward=CASES["llama"][2])
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(ad.ia3_l) for ad in engine.adapters(m, "default").values()}
    opt = torch.optim.AdamW(params, lr=0.2)
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    target = torch.full_like(ids[:, 1:], 7)  # a constant next token: reachable by rescaling alone
    losses = []
    for _ in range(12):
        logits = m(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0] and all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses
    now = state_bits(m)
    assert all(torch.equal(base[k], now[k]) for k in base)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(feedforward=5), "feedforward must be"),
        (dict(feedforward=["down_proj", ""]), "feedforward must be"),
        (dict(feedforward="re:("), "feedforward"),
        (dict(init="yes"), "init must be"),
    ],
)
def test_bad_configs_raise(kw, match):
    with pytest.raises(ConfigError, match=match):
        IA3Config(**kw)
    m = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        surgery.inject(m, "ia3", **kw)
    assert surgery.names(m) == []


def test_feedforward_must_be_among_the_targets():
    m = tiny_llama()
    with pytest.raises(ConfigError, match="not among the targeted sites"):
        surgery.inject(m, "ia3", targets=["k_proj", "v_proj"], feedforward="down_proj")
    with pytest.raises(ConfigError, match="hits none of the targeted sites"):
        surgery.inject(m, "ia3", targets=["k_proj", "down_proj"], feedforward="fc2")
    assert surgery.names(m) == []
    # PEFT-style names and an explicit empty set work
    surgery.inject(m, "ia3", targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"], name="a")
    surgery.inject(m, "ia3", targets=["k_proj", "down_proj"], feedforward=[], name="b")
    assert all(isinstance(ad, IA3Output) for ad in engine.adapters(m, "b").values())
    assert isinstance(engine.adapters(m, "a")["model.layers.0.mlp.down_proj"], IA3Input)


def test_unsupported_sites_refused():
    m = tiny_llama()
    with pytest.raises(SelectorError, match="ia3"):
        surgery.inject(m, "ia3", targets=["embed_tokens"])
    assert not get_method("ia3").supports(nn.Conv1d(2, 2, 1)) and get_method("ia3").supports(nn.Conv3d(2, 2, 1))


def test_peft_fields_and_tensors_it_cannot_represent(tmp_path):
    m, base = _injected("llama")
    save_peft(m, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    good = json.loads(cfg_path.read_text())
    for field, value in (("modules_to_save", ["lm_head"]), ("use_dora_like_thing", True)):
        cfg_path.write_text(json.dumps({**good, field: value}))
        with pytest.raises(PeftFormatError, match=field):
            load_peft(copy.deepcopy(base), tmp_path / "a")
    # a feed-forward set that contradicts the vectors' shapes
    cfg_path.write_text(json.dumps({**good, "feedforward_modules": ["k_proj"]}))
    with pytest.raises(PeftFormatError, match="feedforward_modules"):
        load_peft_delta(tmp_path / "a")
    method = get_method("ia3")
    ctx = PeftContext(None, {}, lambda ps: list(ps))
    with pytest.raises(ConfigError, match="lora_A"):
        method.from_peft({"peft_type": "IA3"}, {"base_model.model.x.lora_A.weight": torch.ones(2, 2)}, ctx)
    with pytest.raises(ConfigError, match="modules_to_save"):
        method.from_peft({"peft_type": "IA3", "modules_to_save": ["score"]}, {}, ctx)
