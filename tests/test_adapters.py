"""Bottleneck adapters (houlsby / pfeiffer / parallel), AdapterFusion and composition blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery import engine
from tests._helpers import assert_snapshot_equal, bits, run, snapshot, train_lm_with_trainer
from tests.models import (
    TinyTransformer,
    batch_for,
    minilm,
    tiny_bert,
    tiny_bert_cls,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
)

FACTORIES = [tiny_gpt2, tiny_bert, tiny_llama, tiny_qwen2, tiny_mistral, TinyTransformer]
STYLES = ["houlsby", "pfeiffer", "parallel"]


@torch.no_grad()
def jolt(model, name: str, seed: int = 1, std: float = 0.1) -> None:
    """Give an adapter random weights everywhere (its up-projection starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    for ad in engine.adapters(model, name).values():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ids_batch(model, batch=2, seq=8):
    return batch_for(model, batch=batch, seq=seq)


# ---------------------------------------------------------------------------------- sites


EXPECTED_SITES = {
    # (factory, style) -> site paths of layer 0
    ("tiny_gpt2", "houlsby"): ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"],
    ("tiny_gpt2", "pfeiffer"): ["transformer.h.0.mlp.c_proj"],
    ("tiny_gpt2", "parallel"): ["transformer.h.0.mlp"],
    ("tiny_bert", "houlsby"): ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"],
    ("tiny_bert", "pfeiffer"): ["encoder.layer.0.output.dense"],
    ("tiny_bert", "parallel"): ["encoder.layer.0.output.dense"],
    ("tiny_llama", "houlsby"): ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"],
    ("tiny_llama", "pfeiffer"): ["model.layers.0.mlp.down_proj"],
    ("tiny_llama", "parallel"): ["model.layers.0.mlp"],
    ("TinyTransformer", "houlsby"): ["blocks.0.out", "blocks.0.fc2"],
    ("TinyTransformer", "pfeiffer"): ["blocks.0.fc2"],
    ("TinyTransformer", "parallel"): ["blocks.0.fc2"],
}


@pytest.mark.parametrize("key", sorted(EXPECTED_SITES), ids=lambda k: f"{k[0]}-{k[1]}")
def test_default_sites_come_from_roles(key):
    factory = {f.__name__: f for f in FACTORIES}[key[0]]
    model = factory()
    inj = surgery.inject(model, "adapter", style=key[1], bottleneck=8)
    layer0 = [p for p in inj.sites if ".0." in p]
    assert layer0 == EXPECTED_SITES[key]
    assert len(inj.sites) == 2 * len(layer0)  # two layers, same sites in each


@pytest.mark.parametrize("factory", FACTORIES + [tiny_bert_cls], ids=lambda f: f.__name__)
def test_identity_at_injection_and_every_style_changes_output_when_trained(factory):
    model = factory()
    x = ids_batch(model)
    y0 = run(model, x)
    for style in STYLES:
        surgery.inject(model, "adapter", style=style, reduction=4, name=style)
    torch.testing.assert_close(run(model, x), y0, atol=1e-6, rtol=0)
    for style in STYLES:
        jolt(model, style)
        with surgery.use(model, style):
            assert (run(model, x) - y0).abs().max() > 1e-3, style


def test_identity_on_real_minilm():
    model = minilm()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    y0 = run(model, x)
    for style in STYLES:
        surgery.inject(model, "adapter", style=style, bottleneck=32, name=style)
    torch.testing.assert_close(run(model, x), y0, atol=1e-6, rtol=0)
    s = surgery.summary(model)
    # houlsby: 2 sites x 6 layers x (2*384*32 + 32 + 384)
    assert s.deltas["houlsby"]["params"] == 12 * (2 * 384 * 32 + 32 + 384)


def _reference_hooks(model, style, adapters):
    """Put the adapters' math on the base model with plain hooks, written from the formulas."""
    handles = []
    for path, ad in adapters.items():
        W1, b1 = ad.adapter_down.weight, ad.adapter_down.bias
        W2, b2 = ad.adapter_up.weight, ad.adapter_up.bias
        act = {"houlsby": F.silu}.get(style, F.relu)
        s = 4.0 if style == "parallel" else 1.0
        mod = model.get_submodule(path)
        if style != "parallel" or ad.entry is None:

            def hook(m, args, out, W1=W1, b1=b1, W2=W2, b2=b2, act=act, s=s):
                h = args[0] if style == "parallel" else out
                return out + s * (act(h @ W1.T + b1) @ W2.T + b2)

            handles.append(mod.register_forward_hook(hook))
        else:
            seen = {}
            entry = model.get_submodule(ad.entry)
            handles.append(entry.register_forward_pre_hook(lambda m, a, seen=seen: seen.__setitem__("x", a[0])))

            def hook2(m, args, out, W1=W1, b1=b1, W2=W2, b2=b2, act=act, s=s, seen=seen):
                return out + s * (act(seen["x"] @ W1.T + b1) @ W2.T + b2)

            handles.append(mod.register_forward_hook(hook2))
    return handles


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_bert, tiny_llama, TinyTransformer], ids=lambda f: f.__name__)
@pytest.mark.parametrize("style", STYLES)
def test_output_equals_the_formula(factory, style):
    model, ref = factory(), factory()
    x = ids_batch(model)
    surgery.inject(model, "adapter", style=style, bottleneck=8)
    jolt(model, "default")
    ads = engine.adapters(model, "default")
    handles = _reference_hooks(ref, style, ads)
    try:
        torch.testing.assert_close(run(model, x), run(ref, x), atol=1e-5, rtol=1e-5)
    finally:
        for h in handles:
            h.remove()


def test_houlsby_bert_base_parameter_count_matches_formula():
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig())  # bert-base: 12 layers, hidden 768
    surgery.inject(model, "adapter", style="houlsby", bottleneck=64)
    n = surgery.summary(model).deltas["default"]["params"]
    assert n == 12 * 2 * (2 * 768 * 64 + 64 + 768) == 2_379_264  # "about 2.4 M"


@pytest.mark.parametrize(
    "style,kw,b",
    [
        ("houlsby", {"reduction": 16}, 4),
        ("pfeiffer", {"bottleneck": 5}, 5),
        ("parallel", {"reduction": 8}, 8),
        ("pfeiffer", {}, 4),
    ],
)
def test_size_by_bottleneck_or_reduction(style, kw, b):
    model = tiny_llama()  # hidden 64
    surgery.inject(model, "adapter", style=style, **kw)
    for ad in engine.adapters(model, "default").values():
        assert ad.adapter_down.out_features == b


def test_targets_override_default_sites():
    model = tiny_llama()
    inj = surgery.inject(model, "adapter", style="houlsby", targets="@v", bottleneck=4)
    assert inj.sites == ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj")
    inj = surgery.inject(model, "adapter", style="parallel", targets="layers.0.mlp", bottleneck=4, name="p")
    assert inj.sites == ("model.layers.0.mlp",)


# ---------------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("style", STYLES)
def test_delta_apply_remove_disable(style):
    model = tiny_bert()
    x = ids_batch(model)
    before = snapshot(model)
    y0 = run(model, x)
    surgery.inject(model, "adapter", style=style, bottleneck=8, name="a")
    jolt(model, "a")
    y1 = run(model, x)
    with surgery.disable(model):
        torch.testing.assert_close(run(model, x), y0, atol=0, rtol=0)
    d = surgery.delta(model, "a")
    assert all(
        k.split(
            ".",
        )[-2]
        in ("adapter_down", "adapter_up")
        for k in d.tensors
    )
    fresh = tiny_bert()
    surgery.apply(fresh, d)
    torch.testing.assert_close(run(fresh, x), y1, atol=0, rtol=0)
    # hot-swap: applying again overwrites in place
    jolt(fresh, "a", seed=7)
    surgery.apply(fresh, d)
    torch.testing.assert_close(run(fresh, x), y1, atol=0, rtol=0)
    surgery.remove(model)
    assert_snapshot_equal(before, snapshot(model))
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_hub_round_trip(tmp_path):
    from registry import Hub

    model = tiny_llama()
    x = ids_batch(model)
    surgery.inject(model, "adapter", style="parallel", bottleneck=8, name="par")
    jolt(model, "par")
    y = run(model, x)
    hub = Hub(tmp_path / "hub")
    hub.push(model, "acme/par", adapter="par")
    fresh = tiny_llama()
    hub.load(fresh, "acme/par")
    torch.testing.assert_close(run(fresh, x), y, atol=0, rtol=0)


def test_merge_raises_and_changes_nothing():
    model = tiny_llama()
    surgery.inject(model, "adapter", style="houlsby", bottleneck=8)
    before = snapshot(model)
    with pytest.raises(surgery.MergeError, match="no merge rule"):
        surgery.merge(model, "default")
    assert_snapshot_equal(before, snapshot(model))


def test_only_adapters_train_and_the_trainer_runs(tmp_path):
    model = tiny_llama()
    surgery.inject(model, "adapter", style="houlsby", bottleneck=8)
    named = dict(model.named_parameters())
    base = {n: bits(p) for n, p in named.items() if ".surgery." not in n}
    ad = {n: p.detach().clone() for n, p in named.items() if ".surgery." in n}
    assert all(named[n].requires_grad for n in ad) and not any(named[n].requires_grad for n in base)
    train_lm_with_trainer(model, tmp_path)
    for n, b in base.items():
        assert torch.equal(bits(named[n]), b), n
    assert all(not torch.equal(named[n].detach(), t) for n, t in ad.items() if "adapter_up" in n)


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"style": "double"}, surgery.ConfigError, "unknown style"),
        ({"style": "pfeiffer", "bottleneck": 65}, surgery.ConfigError, "larger than the hidden size"),
        ({"style": "pfeiffer", "bottleneck": 0}, surgery.ConfigError, "positive integer"),
        ({"style": "pfeiffer", "bottleneck": 8, "reduction": 4}, surgery.ConfigError, "not both"),
        ({"style": "pfeiffer", "reduction": 0.5}, surgery.ConfigError, ">= 1"),
        ({"style": "pfeiffer", "activation": "wobble"}, surgery.ConfigError, "unknown activation"),
        ({"style": "parallel", "targets": "@q"}, surgery.SelectorError, "not part of a feed-forward block"),
    ],
)
def test_bad_input_is_refused_and_model_unchanged(kw, exc, match):
    model = tiny_llama()
    surgery.inject(model, "lora", r=2, name="keep")
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        surgery.inject(model, "adapter", name="bad", **kw)
    assert_snapshot_equal(before, snapshot(model))


# ---------------------------------------------------------------------------------- fusion


def _three_adapters(factory=tiny_bert, style="pfeiffer"):
    model = factory()
    for i, n in enumerate(["nli", "sst", "qa"]):
        surgery.inject(model, "adapter", style=style, bottleneck=8, name=n)
        jolt(model, n, seed=10 + i)
    return model


def test_fuse_freezes_adapters_and_only_fusion_trains():
    model = _three_adapters()
    inj = surgery.fuse(model, ["nli", "sst", "qa"], name="fusion")
    assert inj.method == "fusion"
    assert surgery.active(model) == ("fusion",)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".surgery.fusion." in n for n in trainable)
    x = ids_batch(model)
    out = model(**x).last_hidden_state
    out.pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".surgery.fusion." in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    surgery.remove(model, "fusion")  # the adapters train again
    assert all(p.requires_grad for ad in engine.adapters(model, "nli").values() for p in ad.parameters())


def test_fusion_math_and_weights():
    model = _three_adapters()
    x = ids_batch(model)
    surgery.fuse(model, ["nli", "sst", "qa"], name="fusion")
    jolt(model, "fusion", seed=3, std=0.2)
    y = run(model, x)
    w = surgery.fusion_weights(model, "fusion")
    assert set(w) == set(engine.injection(model, "fusion").sites)
    for p in w.values():
        assert p.shape == (2, 8, 3)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 8))
    # by hand, at each site: o + V sum_i softmax_i(Q o . K c_i) c_i, with the adapters' c_i
    ref = tiny_bert()
    fus = engine.adapters(model, "fusion")
    members = {n: engine.adapters(model, n) for n in ("nli", "sst", "qa")}

    def hook(path):
        def h(m, args, out):
            cs = [members[n][path].delta(args[0], out) for n in ("nli", "sst", "qa")]
            f = fus[path]
            q = out @ f.query.weight.T + f.query.bias
            scores = torch.stack([(q * (c @ f.key.weight.T + f.key.bias)).sum(-1) for c in cs], -1)
            p = scores.softmax(-1)
            mix = sum(p[..., i : i + 1] * c for i, c in enumerate(cs))
            return out + mix @ f.value.weight.T + f.value.bias

        return h

    hs = [ref.get_submodule(p).register_forward_hook(hook(p)) for p in fus]
    torch.testing.assert_close(y, run(ref, x), atol=1e-5, rtol=1e-5)
    for h in hs:
        h.remove()


def test_fuse_block_equals_fusion_by_name_and_value_starts_as_identity():
    model = _three_adapters()
    x = ids_batch(model)
    surgery.fuse(model, ["nli", "sst", "qa"], name="fusion")
    by_name = run(model, x)
    with surgery.use(model, surgery.Fuse("qa", "nli", "sst")):  # order-free: the fusion's own order
        torch.testing.assert_close(run(model, x), by_name, atol=0, rtol=0)
    # value = identity: with one-hot attention the fusion is exactly one adapter
    f = next(iter(engine.adapters(model, "fusion").values()))
    torch.testing.assert_close(f.value.weight, torch.eye(64))


def test_fusion_round_trips_through_delta():
    model = _three_adapters()
    x = ids_batch(model)
    surgery.fuse(model, ["nli", "sst", "qa"], name="fusion")
    jolt(model, "fusion", seed=5, std=0.2)
    y = run(model, x)
    fresh = tiny_bert()
    for n in ("nli", "sst", "qa", "fusion"):
        surgery.apply(fresh, surgery.delta(model, n))
    assert surgery.active(fresh) == ("fusion",)
    torch.testing.assert_close(run(fresh, x), y, atol=0, rtol=0)


def test_fusion_errors():
    model = _three_adapters()
    surgery.inject(model, "adapter", style="houlsby", bottleneck=8, name="other")
    before = snapshot(model)
    with pytest.raises(surgery.ConfigError, match="do not share their sites"):
        surgery.fuse(model, ["nli", "other"])
    with pytest.raises(surgery.ConfigError, match="at least two"):
        surgery.fuse(model, ["nli"])
    with pytest.raises(surgery.InjectionError, match="no delta named"):
        surgery.fuse(model, ["nli", "nope"])
    with pytest.raises(surgery.CompositionError, match="no fusion over"):
        with surgery.use(model, surgery.Fuse("nli", "sst")):
            pass
    with pytest.raises(surgery.CompositionError, match="has not run yet"):
        surgery.fuse(model, ["nli", "sst"], name="f2")
        surgery.fusion_weights(model, "f2")
    surgery.remove(model, "f2")
    after = snapshot(model)
    # the fused adapters are active again, in the fusion's place
    assert after.pop("active") == ("qa", "other", "nli", "sst") and before.pop("active")
    assert_snapshot_equal({**before, "active": ()}, {**after, "active": ()})
    surgery.fuse(model, ["nli", "sst"], name="f3")
    with pytest.raises(surgery.InjectionError, match="is fused in"):
        surgery.remove(model, "nli")


# ---------------------------------------------------------------------------------- composition


def _outputs(model, x, *spec):
    with surgery.use(model, *spec):
        return run(model, x)


def test_stack_is_sequential_and_plain_names_stack():
    model = _three_adapters(tiny_llama)
    x = ids_batch(model)
    a = _outputs(model, x, surgery.Stack("nli", "sst"))
    b = _outputs(model, x, "nli", "sst")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # sequential at one site: sst sees nli's output, so the order matters
    c = _outputs(model, x, surgery.Stack("sst", "nli"))
    assert (a - c).abs().max() > 1e-6


def test_average_is_weighted_mean_of_outputs():
    model = _three_adapters(tiny_llama)
    x = ids_batch(model)
    avg = _outputs(model, x, surgery.Average({"nli": 0.7, "sst": 0.3}))
    # at every site y = 0.7 y_nli + 0.3 y_sst: check with hand hooks on the base
    ref = tiny_llama()
    n_ad, s_ad = engine.adapters(model, "nli"), engine.adapters(model, "sst")
    hs = [
        ref.get_submodule(p).register_forward_hook(
            lambda m, a, o, p=p: o + 0.7 * n_ad[p].delta(a[0], o) + 0.3 * s_ad[p].delta(a[0], o)
        )
        for p in n_ad
    ]
    torch.testing.assert_close(avg, run(ref, x), atol=1e-5, rtol=1e-5)
    for h in hs:
        h.remove()
    # weights are normalised
    torch.testing.assert_close(_outputs(model, x, surgery.Average({"nli": 7, "sst": 3})), avg)


def test_batch_split_and_parallel():
    model = _three_adapters(tiny_llama)
    x = ids_batch(model, batch=3)
    per = {n: _outputs(model, x, n) for n in ("nli", "sst", "qa")}
    split = _outputs(model, x, surgery.BatchSplit("nli", "sst", batch_sizes=[1, 2]))
    torch.testing.assert_close(split[:1], per["nli"][:1], atol=1e-6, rtol=0)
    torch.testing.assert_close(split[1:], per["sst"][1:], atol=1e-6, rtol=0)
    par = _outputs(model, x, surgery.Parallel("nli", "sst", "qa"))
    assert par.shape[0] == 9
    for i, n in enumerate(("nli", "sst", "qa")):
        torch.testing.assert_close(par[3 * i : 3 * i + 3], per[n], atol=1e-6, rtol=0)
    # nested: a stack in one branch of a split
    nest = _outputs(model, x, surgery.BatchSplit(surgery.Stack("nli", "qa"), "sst", batch_sizes=[2, 1]))
    torch.testing.assert_close(nest[:2], _outputs(model, x, "nli", "qa")[:2], atol=1e-6, rtol=0)


def test_parallel_with_lora_on_a_plain_module():
    model = TinyTransformer()
    x = ids_batch(model)
    surgery.inject(model, "lora", targets=["q", "v"], r=2, name="a")
    surgery.inject(model, "adapter", style="parallel", bottleneck=4, name="b")
    jolt(model, "a")
    jolt(model, "b")
    par = _outputs(model, x, surgery.Parallel("a", "b"))
    torch.testing.assert_close(par[:2], _outputs(model, x, "a"), atol=1e-6, rtol=0)
    torch.testing.assert_close(par[2:], _outputs(model, x, "b"), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "spec,match",
    [
        ((surgery.Stack("nli", surgery.Parallel("sst", "qa")),), "Parallel cannot be nested"),
        ((surgery.Parallel("nli", "sst"), "qa"), "only block"),
        ((surgery.Stack("nli", "nli"),), "appears twice"),
        ((surgery.Stack("nli", "nope"),), "no delta named"),
    ],
)
def test_impossible_compositions_say_which(spec, match):
    model = _three_adapters(tiny_llama)
    with pytest.raises(surgery.CompositionError, match=match):
        with surgery.use(model, *spec):
            pass


def test_fuse_takes_names_only_and_batch_split_checks_sizes():
    with pytest.raises(surgery.CompositionError, match="names only"):
        surgery.Fuse("a", surgery.Stack("b", "c"))
    model = _three_adapters(tiny_llama)
    x = ids_batch(model, batch=2)
    with pytest.raises(surgery.CompositionError, match="sum to 3"):
        _outputs(model, x, surgery.BatchSplit("nli", "sst", batch_sizes=[1, 2]))


def test_merged_delta_cannot_sit_in_a_block():
    model = tiny_llama()
    surgery.inject(model, "lora", r=2, name="l")
    surgery.inject(model, "adapter", style="pfeiffer", bottleneck=4, name="a")
    surgery.merge(model, "l")
    with pytest.raises(surgery.CompositionError, match="merged"):
        with surgery.use(model, surgery.BatchSplit("l", "a", batch_sizes=[1, 1])):
            pass
    with surgery.use(model, "l", surgery.Stack("a")):  # as a plain name it is fine
        pass


def test_compositions_are_context_local():
    import threading

    model = _three_adapters(tiny_llama)
    x = ids_batch(model)
    want = {n: _outputs(model, x, n) for n in ("nli", "sst")}
    got, errors = {}, []

    def worker(n):
        try:
            for _ in range(5):
                with surgery.use(model, surgery.Stack(n)):
                    got[n] = run(model, x)
                    assert torch.equal(got[n], want[n])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(n,)) for n in ("nli", "sst")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_parallel_adapter_reads_ffn_input_of_split_ffn():
    # BERT: the FFN input is intermediate's input; nothing is kept after the call
    model = tiny_bert()
    surgery.inject(model, "adapter", style="parallel", bottleneck=8)
    ad = next(iter(engine.adapters(model, "default").values()))
    assert ad.entry == "encoder.layer.0.intermediate"
    run(model, ids_batch(model))
    st = engine.state_of(model)
    assert all(not tap.seen for tap in st.taps.values())
    assert math.isfinite(float(run(model, ids_batch(model)).sum()))


# ------------------------------------------------------------------ fused experts, Bloom, ConvNeXt, Mamba (issue 9)

from surgery.errors import FusedExpertsWarning, InjectionError, SurgeryError  # noqa: E402
from tests.models import (  # noqa: E402
    tiny_bloom,
    tiny_convnext,
    tiny_mamba,
    tiny_mixtral,
    tiny_qwen2_moe,
    tiny_qwen3_moe,
)

FUSED = [tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe]


def _trains_and_removes(model, x, name: str, before: dict, base: torch.Tensor) -> None:
    """Identity at injection, gradients reach only the adapter, trained weights change the output,
    `remove` gives back the model bit for bit."""
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)
    model.train()
    out = model(**x) if isinstance(x, dict) else model(x)
    logits = out.logits if hasattr(out, "logits") else out[0]
    (logits.float() ** 2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".surgery." in n for n in grads)
    model.eval()
    jolt(model, name)
    assert (run(model, x) - base).abs().max() > 1e-4
    surgery.remove(model, name)
    assert_snapshot_equal(before, snapshot(model))
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)


@pytest.mark.parametrize("factory", FUSED, ids=lambda f: f.__name__)
def test_houlsby_on_fused_experts_warns_and_covers_the_attention(factory):
    model = factory()
    x = ids_batch(model)
    base, before = run(model, x), snapshot(model)
    with pytest.warns(FusedExpertsWarning, match=r"mlp\.experts .*fused|fused 3-D.*mlp\.experts") as w:
        inj = surgery.inject(model, "adapter", style="houlsby", bottleneck=4, name="h")
    assert "it covers only model.layers.0.self_attn.o_proj" in str(w[0].message)
    expected = {f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)}
    if factory is tiny_qwen2_moe:  # its shared expert is made of linears, with role @mlp.down
        expected |= {f"model.layers.{i}.mlp.shared_expert.down_proj" for i in (0, 1)}
    assert set(inj.sites) == expected
    _trains_and_removes(model, x, "h", before, base)


@pytest.mark.parametrize("style", ["pfeiffer", "parallel"])
@pytest.mark.parametrize("factory", FUSED, ids=lambda f: f.__name__)
def test_ffn_adapters_on_fused_experts_are_refused_naming_them(factory, style):
    model = factory()
    before = snapshot(model)
    with pytest.raises(InjectionError, match=r"fused 3-D tensors.*model\.layers\.0\.mlp\.experts") as e:
        surgery.inject(model, "adapter", style=style)
    assert type(model.model.layers[0].mlp.experts).__name__ in str(e.value)  # names the module's class
    assert "target the attention" in str(e.value)
    assert_snapshot_equal(before, snapshot(model))


def test_qwen2_moe_shared_expert_by_name_works_with_a_warning():
    model = tiny_qwen2_moe()
    x = ids_batch(model)
    base, before = run(model, x), snapshot(model)
    with pytest.warns(FusedExpertsWarning, match="left as they are"):
        inj = surgery.inject(model, "adapter", style="parallel", targets="mlp.shared_expert", bottleneck=4, name="p")
    assert inj.sites == ("model.layers.0.mlp.shared_expert", "model.layers.1.mlp.shared_expert")
    _trains_and_removes(model, x, "p", before, base)


def test_parallel_adapter_on_bloom_works():
    # Bloom's MLP is forward(hidden_states, residual) and adds the residual itself: the adapter reads
    # hidden_states and adds to the MLP's output, which is what a parallel adapter does
    model = tiny_bloom()
    x = ids_batch(model)
    base, before = run(model, x), snapshot(model)
    inj = surgery.inject(model, "adapter", style="parallel", bottleneck=8, name="p")
    assert inj.sites == ("transformer.h.0.mlp", "transformer.h.1.mlp")
    _trains_and_removes(model, x, "p", before, base)


def test_parallel_adapter_on_convnext_enters_the_ffn_at_its_up_projection():
    # the ConvNeXt layer holds the FFN and a depthwise conv on NCHW images: the FFN is entered at pwconv1
    model = tiny_convnext()
    with torch.no_grad():  # the FFN's output is scaled by layer_scale (1e-6 in a fresh model): make it 1
        for n, p in model.named_parameters():
            if n.endswith("layer_scale_parameter"):
                p.fill_(1.0)
    x = ids_batch(model)
    base, before = run(model, x), snapshot(model)
    inj = surgery.inject(model, "adapter", style="parallel", bottleneck=4, name="p")
    assert inj.sites == ("convnext.encoder.stages.0.layers.0.pwconv2", "convnext.encoder.stages.1.layers.0.pwconv2")
    ads = engine.adapters(model, "p")
    assert ads[inj.sites[0]].entry == "convnext.encoder.stages.0.layers.0.pwconv1"
    _trains_and_removes(model, x, "p", before, base)
    # the whole layer named as the FFN is refused at inject, not at the first forward
    with pytest.raises(InjectionError, match=r"ConvNextLayer\) does not map tokens x features"):
        surgery.inject(model, "adapter", style="parallel", targets="stages.0.layers.0", name="q")
    assert_snapshot_equal(before, snapshot(model))


@pytest.mark.parametrize("style", STYLES)
def test_every_style_on_mamba_works_or_is_refused_with_the_package_error(style):
    model = tiny_mamba()
    x = ids_batch(model)
    base, before = run(model, x), snapshot(model)
    try:
        surgery.inject(model, "adapter", style=style, bottleneck=4, name="a")
    except AssertionError:  # pragma: no cover - the failure this guards against
        pytest.fail("a bare AssertionError escaped from inject")
    except SurgeryError:
        assert_snapshot_equal(before, snapshot(model))
        return
    _trains_and_removes(model, x, "a", before, base)
