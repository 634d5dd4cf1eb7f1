"""MoE upcycling ("moe"), mixtures of LoRA experts ("lora_moe") and surgery.aux_loss: identity at
injection, routing against hand-written per-token references, capacity, the auxiliary loss,
training, merge refusal, exact removal, disable, Delta / hub round trips, the Trainer, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery import engine
from surgery.errors import ConfigError, InjectionError, MergeError, SelectorError
from tests._helpers import assert_snapshot_equal, assert_state_equal, bits, run, snapshot, state_bits
from tests.models import (
    TinyTransformer,
    batch_for,
    minilm,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
)

FACTORIES = [tiny_gpt2, tiny_bert, tiny_llama, tiny_qwen2, tiny_mistral]


def no_dropout(model: nn.Module) -> None:
    """Train mode without randomness: every dropout (module or attention probability) at 0."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout_prob", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def forward(model: nn.Module, x) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out[0]


@torch.no_grad()
def jolt(model: nn.Module, name: str, seed: int = 1, router_std: float = 1.0, std: float = 0.05) -> None:
    """Random router (decisive routing) and experts that differ from each other and from the base."""
    g = torch.Generator().manual_seed(seed)
    for ad in engine.adapters(model, name).values():
        for k, p in ad.tensors().items():
            if k == "router.weight":
                p.copy_(torch.randn(p.shape, generator=g) * router_std)
            elif k.startswith("experts."):
                p.add_(torch.randn(p.shape, generator=g) * std)
            else:  # lora_A / lora_B
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------ references


def ref_gates(W: torch.Tensor, xt: torch.Tensor, k: int) -> tuple[list[int], list[torch.Tensor]]:
    p = torch.softmax(W.float() @ xt.float(), -1)
    v, i = p.topk(k)
    return i.tolist(), list(v / v.sum())


def ref_moe(ad, x: torch.Tensor, cap: int | None = None) -> torch.Tensor:
    """One token at a time: top-k experts, gates renormalised, first choices before second
    choices in token order against the capacity."""
    x2 = x.reshape(-1, x.shape[-1])
    T, k = x2.shape[0], ad.top_k
    choices = [ref_gates(ad.router.weight, x2[t], k) for t in range(T)]
    out = [torch.zeros(ad.d_out) for _ in range(T)]
    used = [0] * len(ad.experts)
    for j in range(k):
        for t in range(T):
            e, g = choices[t][0][j], choices[t][1][j]
            if cap is not None and used[e] >= cap:
                continue
            used[e] += 1
            out[t] = out[t] + g * ad.experts[e](x2[t : t + 1])[0]
    return torch.stack(out).view(*x.shape[:-1], ad.d_out)


def ref_lora_moe(ad, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    x2, o2 = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1]).clone()
    r = ad.r
    for t in range(x2.shape[0]):
        es, gs = ref_gates(ad.router.weight, x2[t], ad.top_k)
        for e, g in zip(es, gs, strict=True):
            A = ad.lora_A[e * r : (e + 1) * r]
            B = ad.lora_B[:, e * r : (e + 1) * r]
            o2[t] += ad.scale * g * (B @ (A @ x2[t]))
    return o2.view(out.shape)


def reference_hooks(ref: nn.Module, ads: dict, fn) -> list:
    """Hooks on a fresh copy of the base that compute each site's output with `fn(ad, x, out)`."""
    handles = []
    for path, ad in ads.items():
        mod = ref.get_submodule(path)
        if ad.entry is None:
            handles.append(mod.register_forward_hook(lambda m, a, o, ad=ad: fn(ad, a[0], o)))
        else:
            seen = {}
            handles.append(
                ref.get_submodule(ad.entry).register_forward_pre_hook(
                    lambda m, a, seen=seen: seen.__setitem__("x", a[0])
                )
            )
            handles.append(mod.register_forward_hook(lambda m, a, o, ad=ad, seen=seen: fn(ad, seen["x"], o)))
    return handles


# ------------------------------------------------------------------------------ moe: identity


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_upcycled_model_equals_dense_at_injection(factory):
    model = factory()
    x = batch_for(model, batch=2, seq=8)
    no_dropout(model)
    y_eval = run(model, x)
    model.train()
    y_train = forward(model, x).detach()
    model.eval()
    for k in (1, 2):
        inj = surgery.inject(model, "moe", experts=4, top_k=k, name="sw")
        assert inj.sites and all(".mlp" in p or "output.dense" in p for p in inj.sites)
        torch.testing.assert_close(run(model, x), y_eval, atol=1e-5, rtol=1e-5)
        model.train()
        y = forward(model, x)
        torch.testing.assert_close(y.detach(), y_train, atol=1e-5, rtol=1e-5)
        aux = surgery.aux_loss(model)
        assert aux.dim() == 0 and aux.requires_grad  # the graph is kept in training
        model.eval()
        surgery.remove(model, "sw")


def test_upcycled_real_minilm_equals_dense():
    model = minilm()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2023, 2003, 2178, 6251, 999, 102]])
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    y0 = run(model, x)
    before = state_bits(model)
    for k in (1, 2):
        inj = surgery.inject(model, "moe", experts=4, top_k=k, name="sw")
        assert len(inj.sites) == 6 and inj.sites[0] == "encoder.layer.0.output.dense"
        torch.testing.assert_close(run(model, x), y0, atol=1e-5, rtol=1e-5)
        surgery.remove(model)
    assert_state_equal(before, state_bits(model))


def test_upcycled_fp16_llama_equals_dense():
    model = tiny_llama().half()
    x = batch_for(model)
    y0 = run(model, x).float()
    surgery.inject(model, "moe", experts=4, top_k=2, name="sw")
    ad = next(iter(engine.adapters(model, "sw").values()))
    assert ad.router.weight.dtype == torch.float32 and ad.experts[0].up_proj.weight.dtype == torch.float16
    torch.testing.assert_close(run(model, x).float(), y0, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------ moe: routing


@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert, tiny_gpt2], ids=lambda f: f.__name__)
@pytest.mark.parametrize("k", [1, 2])
def test_routing_equals_per_token_reference(factory, k):
    model, ref = factory(), factory()
    x = batch_for(model, batch=2, seq=6)
    surgery.inject(model, "moe", experts=4, top_k=k, name="sw")
    jolt(model, "sw")
    ads = engine.adapters(model, "sw")
    handles = reference_hooks(ref, ads, lambda ad, xi, o: ref_moe(ad, xi))
    try:
        y, y_ref = run(model, x), run(ref, x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    with surgery.disable(model):
        assert (run(model, x) - y).abs().max() > 1e-3  # the experts were changed: routing matters


@pytest.mark.parametrize("k", [1, 2])
def test_capacity_drops_assignments_past_it(k):
    model = tiny_llama()
    surgery.inject(model, "moe", experts=4, top_k=k, capacity_factor=0.5, name="sw")
    jolt(model, "sw", router_std=2.0)
    mlp = model.model.layers[0].mlp
    ad = engine.adapters(model, "sw")["model.layers.0.mlp"]
    x = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(3))
    cap = math.ceil(0.5 * 24 * k / 4)
    assert ad.capacity(24) == cap
    with torch.no_grad():
        y = mlp(x)  # the site alone: an FFN holding its whole computation needs no entry input
        torch.testing.assert_close(y, ref_moe(ad, x, cap), atol=1e-5, rtol=1e-5)
        # some assignments were dropped; with top-1 those tokens get no FFN output at all
        counts = torch.bincount(ad.router(x[0]).topk(k, -1).indices.reshape(-1), minlength=4)
        assert int(counts.max()) > cap
        if k == 1:
            zero = (y[0].abs().sum(-1) == 0).sum().item()
            assert zero == int((counts - counts.clamp(max=cap)).sum())
        gates, idx, _ = ad._route(x[0], k)  # the static-shape path used under torch.export / fx agrees
        torch.testing.assert_close(ad.mix_dense(x[0], gates, idx), y[0], atol=1e-5, rtol=1e-5)
        ad.capacity_factor = None  # no dropping: every token is served
        assert (mlp(x)[0].abs().sum(-1) > 0).all()


# ------------------------------------------------------------------------------ aux loss


def test_aux_loss_is_switch_formula_and_trains_the_router():
    model = tiny_llama()
    surgery.inject(model, "moe", experts=4, top_k=2, name="sw")
    surgery.inject(model, "lora", r=2, name="plain")
    assert surgery.aux_loss(model).item() == 0.0  # no forward yet
    jolt(model, "sw", router_std=0.5)
    ad = engine.adapters(model, "sw")["model.layers.0.mlp"]
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0))
    model.train()
    model.model.layers[0].mlp(x)  # only this site runs
    probs = torch.softmax(x.reshape(-1, 64) @ ad.router.weight.T, -1)
    top = probs.topk(2, -1).indices.reshape(-1)
    f = torch.bincount(top, minlength=4).float() / top.numel()
    expected = 4 * (f * probs.mean(0)).sum()
    got = surgery.aux_loss(model)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(surgery.aux_loss(model, "sw"), expected)
    got.backward()
    assert ad.router.weight.grad is not None and ad.router.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="no router"):
        surgery.aux_loss(model, "plain")
    with pytest.raises(ConfigError, match="no delta named"):
        surgery.aux_loss(model, "nope")
    with surgery.use(model, "plain"):  # only active routing deltas count
        assert surgery.aux_loss(model).item() == 0.0
    assert surgery.aux_loss(TinyTransformer()).item() == 0.0


def test_training_lowers_loss_and_moves_routers():
    model = tiny_llama()
    x = batch_for(model, batch=4, seq=12)
    surgery.inject(model, "moe", targets="layers.1.mlp", experts=4, top_k=2, name="sw")
    surgery.inject(model, "lora_moe", targets="@attn", experts=4, r=4, top_k=2, name="molora")
    base = {n: bits(p) for n, p in model.named_parameters() if ".surgery." not in n}
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("router.weight")}
    assert len(routers) == 1 + 2 * 4  # one FFN, 4 attention linears x 2 layers
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(".surgery." in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        out = model(**x, labels=x["input_ids"])
        loss = out.loss + 0.01 * surgery.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    named = dict(model.named_parameters())
    assert all(not torch.equal(named[n].detach(), r) for n, r in routers.items())
    assert all(torch.equal(bits(named[n]), b) for n, b in base.items())


# ------------------------------------------------------------------------------ engine operations


def test_merge_raises_and_changes_nothing():
    model = tiny_llama()
    surgery.inject(model, "moe", experts=2, name="sw")
    surgery.inject(model, "lora_moe", experts=2, r=2, top_k=1, name="molora")
    for name in ("sw", "molora"):
        before = snapshot(model)
        with pytest.raises(MergeError, match="no merge rule"):
            surgery.merge(model, name)
        assert_snapshot_equal(before, snapshot(model))


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama], ids=lambda f: f.__name__)
def test_remove_restores_bit_identical_model_and_disable_gives_base(factory):
    model = factory()
    x = batch_for(model)
    y0 = run(model, x)
    before = snapshot(model)
    inj = surgery.inject(model, "moe", experts=3, top_k=2, name="sw")
    ads = engine.adapters(model, "sw")
    bypassed = [model.get_submodule(p) for p in inj.sites]
    bypassed += [model.get_submodule(a.entry) for a in ads.values() if a.entry is not None]
    assert all("forward" in m.__dict__ for m in bypassed)
    jolt(model, "sw")
    y = run(model, x)
    assert (y - y0).abs().max() > 1e-3
    with surgery.disable(model):
        torch.testing.assert_close(run(model, x), y0, atol=0, rtol=0)
    torch.testing.assert_close(run(model, x), y, atol=0, rtol=0)
    surgery.remove(model, "sw")
    assert_snapshot_equal(before, snapshot(model))
    assert all("forward" not in m.__dict__ for m in bypassed)
    assert torch.equal(run(model, x), y0)


def test_no_delta_inside_an_upcycled_ffn_and_no_upcycling_a_modified_one():
    model = tiny_llama()
    surgery.inject(model, "moe", targets="layers.0.mlp", experts=2, name="sw")
    before = snapshot(model)
    with pytest.raises(InjectionError, match="lies inside"):
        surgery.inject(model, "lora", targets="layers.0.mlp.down_proj", name="in")
    assert_snapshot_equal(before, snapshot(model))
    surgery.inject(model, "adapter", style="parallel", targets="layers.0.mlp", bottleneck=4, name="par")
    x = batch_for(model)
    run(model, x)  # moe then the parallel adapter at the same site
    other = tiny_llama()
    surgery.inject(other, "lora", targets="layers.0.mlp.down_proj", name="in")
    before = snapshot(other)
    with pytest.raises(InjectionError, match="already holds injected deltas"):
        surgery.inject(other, "moe", targets="layers.0.mlp", experts=2)
    assert_snapshot_equal(before, snapshot(other))


def test_no_delta_inside_the_entry_of_an_upcycled_split_ffn():
    model = tiny_bert()
    surgery.inject(model, "moe", experts=2, name="sw")
    before = snapshot(model)
    for target in ("encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"):
        with pytest.raises(InjectionError, match="lies inside|skips"):
            surgery.inject(model, "lora", targets=target, name="in")
        assert_snapshot_equal(before, snapshot(model))
    # a delta that reads the FFN's input (the same entry) may share the site: it adds to the experts
    surgery.inject(model, "adapter", style="parallel", bottleneck=4, name="par")
    x = batch_for(model)
    with surgery.use(model, "sw"):
        y = run(model, x)
    with torch.no_grad():
        for ad in engine.adapters(model, "par").values():
            ad.adapter_up.weight.normal_()
    assert (run(model, x) - y).abs().max() > 1e-3


def test_split_ffn_needs_a_module_holding_the_activation():
    model = TinyTransformer()
    before = snapshot(model)
    with pytest.raises(SelectorError, match="activation"):
        surgery.inject(model, "moe", experts=2)
    assert_snapshot_equal(before, snapshot(model))


BAD = [
    ("moe", {"experts": 2, "top_k": 3}, "top_k=3 is larger"),
    ("moe", {"experts": 0}, "experts must be"),
    ("moe", {"experts": 2.5}, "experts must be"),
    ("moe", {"top_k": 0}, "top_k must be"),
    ("moe", {"capacity_factor": 0}, "capacity_factor"),
    ("moe", {"capacity_factor": -1.0}, "capacity_factor"),
    ("moe", {"jitter": 1.5}, "jitter"),
    ("moe", {"router_std": -1}, "router_std"),
    ("moe", {"expert": 2}, "unknown config key"),
    ("lora_moe", {"r": 0}, "r must be"),
    ("lora_moe", {"r": -2}, "r must be"),
    ("lora_moe", {"experts": 2, "top_k": 4}, "top_k=4 is larger"),
    ("lora_moe", {"experts": 0}, "experts must be"),
    ("lora_moe", {"alpha": 0}, "alpha"),
    ("lora_moe", {"dropout": 1.0}, "dropout"),
]


@pytest.mark.parametrize("method,cfg,msg", BAD, ids=lambda v: str(v))
def test_bad_config_is_refused_and_changes_nothing(method, cfg, msg):
    model = tiny_gpt2()
    surgery.inject(model, "lora", r=2, name="keep")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=msg):
        surgery.inject(model, method, name="new", **cfg)
    assert_snapshot_equal(before, snapshot(model))
    assert surgery.names(model) == ["keep"]


# ------------------------------------------------------------------------------ deltas and the hub


@pytest.mark.parametrize("factory", [tiny_bert, tiny_gpt2], ids=lambda f: f.__name__)
def test_delta_apply_hot_swap_and_hub(factory, tmp_path):
    from registry import Hub

    model = factory()
    x = batch_for(model)
    surgery.inject(model, "moe", experts=3, top_k=2, name="sw")
    jolt(model, "sw")
    y = run(model, x)
    d = surgery.delta(model, "sw")
    sites = d.sites()
    assert list(sites) == list(engine.injection(model, "sw").sites)
    first = next(iter(sites.values()))
    assert "router.weight" in first and any(k.startswith("experts.2.") for k in first)
    fresh = factory()
    surgery.apply(fresh, d)
    torch.testing.assert_close(run(fresh, x), y, atol=0, rtol=0)
    # hot-swap: same modules, new tensors
    jolt(model, "sw", seed=5)
    y2 = run(model, x)
    mods = [id(m) for m in fresh.modules()]
    surgery.apply(fresh, surgery.delta(model, "sw"))
    assert [id(m) for m in fresh.modules()] == mods
    torch.testing.assert_close(run(fresh, x), y2, atol=0, rtol=0)
    # through the hub
    hub = Hub(tmp_path / "hub")
    hub.push(model, "acme/switch", adapter="sw")
    pulled = factory()
    hub.load(pulled, "acme/switch")
    torch.testing.assert_close(run(pulled, x), y2, atol=0, rtol=0)
    assert surgery.aux_loss(pulled).dim() == 0


def test_lora_moe_delta_round_trip():
    model = tiny_gpt2()
    x = batch_for(model)
    surgery.inject(model, "lora_moe", experts=3, r=4, top_k=2, name="molora")
    jolt(model, "molora")
    d = surgery.delta(model, "molora")
    assert sorted(next(iter(d.sites().values()))) == ["lora_A.weight", "lora_B.weight", "router.weight"]
    fresh = tiny_gpt2()
    surgery.apply(fresh, d)
    torch.testing.assert_close(run(fresh, x), run(model, x), atol=0, rtol=0)


def test_trainer_runs_moe():
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    surgery.inject(model, "moe", targets="layers.1.mlp", experts=2, top_k=1, name="sw")
    moe_params = {n: p.detach().clone() for n, p in model.named_parameters() if ".surgery." in n}
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(4):
        ids = torch.randint(3, 128, (10,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})

    class AuxTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            out = model(**inputs)
            loss = out.loss + 0.01 * surgery.aux_loss(model)
            return (loss, out) if return_outputs else loss

    import tempfile

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(
            output_dir=tmp,
            use_cpu=True,
            report_to=[],
            max_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        result = AuxTrainer(model=model, args=args, train_dataset=rows).train()
    assert result.global_step == 2
    named = dict(model.named_parameters())
    assert any(not torch.equal(named[n].detach(), t) for n, t in moe_params.items() if "router" in n)
    assert any(not torch.equal(named[n].detach(), t) for n, t in moe_params.items() if "experts" in n)


# ------------------------------------------------------------------------------ lora_moe


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama, tiny_bert], ids=lambda f: f.__name__)
def test_lora_moe_equals_base_at_injection_and_reference_after(factory):
    model, ref = factory(), factory()
    x = batch_for(model)
    y0 = run(model, x)
    inj = surgery.inject(model, "lora_moe", experts=4, r=4, top_k=2, name="molora")
    assert inj.sites
    torch.testing.assert_close(run(model, x), y0, atol=0, rtol=0)  # B starts at zero
    jolt(model, "molora")
    ads = engine.adapters(model, "molora")
    handles = reference_hooks(ref, ads, ref_lora_moe)
    try:
        y, y_ref = run(model, x), run(ref, x)
    finally:
        for h in handles:
            h.remove()
    assert (y - y0).abs().max() > 1e-3
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    with surgery.disable(model):
        torch.testing.assert_close(run(model, x), y0, atol=0, rtol=0)
    surgery.remove(model, "molora")
    torch.testing.assert_close(run(model, x), y0, atol=0, rtol=0)


def test_lora_moe_parameters_and_top1():
    model = tiny_llama()
    surgery.inject(model, "lora_moe", targets="@attn", experts=4, r=8, top_k=1, name="molora")
    ad = engine.adapters(model, "molora")["model.layers.0.self_attn.q_proj"]
    assert ad.lora_A.shape == (32, 64) and ad.lora_B.shape == (64, 32) and ad.router.weight.shape == (4, 64)
    x = torch.randn(5, 64)
    jolt(model, "molora")
    out = torch.zeros(5, 64)
    torch.testing.assert_close(ad.contribute(x, out.clone()), ref_lora_moe(ad, x, out), atol=1e-5, rtol=1e-5)
    F.mse_loss(ad.contribute(x, out.clone()), torch.ones(5, 64)).backward()
    assert ad.router.weight.grad.abs().sum() > 0 and ad.lora_A.grad.abs().sum() > 0


def test_a_replacing_delta_runs_first_whatever_the_order_of_plain_names():
    from tests.models import batch_for, tiny_llama

    model = tiny_llama()
    x = batch_for(model)
    surgery.inject(model, "moe", experts=4, name="sw")
    surgery.inject(model, "adapter", style="parallel", bottleneck=8, name="par")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in ("par", "sw"):
            for ad in engine.adapters(model, n).values():
                for p in ad.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    outs = {}
    for spec in (("par", "sw"), ("sw", "par"), ("sw",), (surgery.Stack("sw", "par"),)):
        with surgery.use(model, *spec):
            outs[spec] = run(model, x)
    assert torch.equal(outs[("par", "sw")], outs[("sw", "par")])
    assert torch.equal(outs[("par", "sw")], outs[(surgery.Stack("sw", "par"),)])
    assert (outs[("par", "sw")] - outs[("sw",)]).abs().max() > 1e-4  # the parallel adapter still adds


# ------------------------------------------------------------------ architectures moe cannot upcycle (issue 9)

from surgery.errors import FusedExpertsWarning, SurgeryError  # noqa: E402
from surgery.sublayers import fused_experts  # noqa: E402
from tests.models import (  # noqa: E402
    tiny_bloom,
    tiny_convnext,
    tiny_mamba,
    tiny_mixtral,
    tiny_qwen2_moe,
    tiny_qwen3_moe,
)

FUSED = [tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe]


def _lifecycle(model, x) -> None:
    """After inject (identity checked by the caller): only the delta trains, gradients reach it,
    and a step on it changes the output."""
    base = run(model, x)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(".surgery." in n for n, p in model.named_parameters() if p.requires_grad)
    model.train()
    out = model(**x) if isinstance(x, dict) else model(x)
    logits = out.logits if hasattr(out, "logits") else out[0]
    (logits.float() ** 2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    assert (run(model, x) - base).abs().max() > 1e-4


def test_fused_experts_are_found_from_tensors_not_model_names():
    for factory in FUSED:
        found = fused_experts(factory())
        assert [f.path for f in found] == [f"model.layers.{i}.mlp.experts" for i in (0, 1)], factory.__name__
        assert all(len(s) == 3 and s[0] == 4 for f in found for _, s in f.shapes)
    # conv kernels (Mamba's conv1d, ConvNeXt's 2-D convs) and dense models hold no fused experts
    for factory in (tiny_llama, tiny_mamba, tiny_convnext, tiny_bloom):
        assert fused_experts(factory()) == [], factory.__name__

    class Bank(nn.Module):  # a plain module: found by its leading dimension matching nothing named "expert"
        def __init__(self, name_hint: bool) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, 4, 4))
            if name_hint:
                self.my_experts = nn.Module()
                self.my_experts.w = nn.Parameter(torch.zeros(3, 4, 4))

    assert [f.path for f in fused_experts(Bank(True))] == ["my_experts"]  # named as experts; `w` is not


@pytest.mark.parametrize("factory", FUSED, ids=lambda f: f.__name__)
def test_moe_on_fused_experts_is_refused_at_inject_naming_them(factory):
    model = factory()
    before = snapshot(model)
    with pytest.raises(
        InjectionError, match=r"model\.layers\.0\.mlp\.experts .*fused 3-D|fused 3-D.*mlp\.experts"
    ) as e:
        surgery.inject(model, "moe", experts=2)
    assert "target the attention" in str(e.value)
    if factory is tiny_qwen2_moe:  # the shared expert is made of linears: the error says how to target it
        assert "targets='mlp.shared_expert'" in str(e.value)
    assert_snapshot_equal(before, snapshot(model))


@pytest.mark.parametrize("factory", FUSED, ids=lambda f: f.__name__)
def test_lora_moe_on_fused_experts_is_refused_and_attention_works(factory):
    model = factory()
    before = snapshot(model)
    with pytest.raises(InjectionError, match="fused 3-D"):
        surgery.inject(model, "lora_moe", targets="mlp.*", name="m")
    assert_snapshot_equal(before, snapshot(model))
    x = batch_for(model)
    base = run(model, x)
    inj = surgery.inject(model, "lora_moe", experts=2, r=2, name="m")  # default: the attention's q, v
    assert all(p.endswith(("q_proj", "v_proj")) for p in inj.sites)
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)
    _lifecycle(model, x)
    surgery.remove(model, "m")
    assert_snapshot_equal(before, snapshot(model))


def test_moe_on_qwen2_moe_shared_expert_works_and_warns_the_routed_experts_stay():
    model = tiny_qwen2_moe()
    x = batch_for(model)
    base = run(model, x)
    before = snapshot(model)
    with pytest.warns(FusedExpertsWarning, match=r"shared_expert.*mlp\.experts"):
        inj = surgery.inject(model, "moe", targets="mlp.shared_expert", experts=2, name="sw")
    assert inj.sites == ("model.layers.0.mlp.shared_expert", "model.layers.1.mlp.shared_expert")
    torch.testing.assert_close(run(model, x), base, atol=1e-6, rtol=0)
    _lifecycle(model, x)
    surgery.remove(model, "sw")
    assert_snapshot_equal(before, snapshot(model))
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)


def test_moe_on_bloom_is_refused_its_mlp_takes_the_residual():
    model = tiny_bloom()
    before = snapshot(model)
    with pytest.raises(InjectionError, match=r"transformer\.h\.0\.mlp.*\['residual'\].*lora_moe"):
        surgery.inject(model, "moe", experts=2)
    assert_snapshot_equal(before, snapshot(model))


def test_moe_on_convnext_is_refused_at_inject():
    model = tiny_convnext()
    before = snapshot(model)
    with pytest.raises(SurgeryError, match=r"pwconv"):  # its FFN's input side is a bare linear
        surgery.inject(model, "moe", experts=2)
    # the whole ConvNeXt layer named as the FFN: it works on NCHW images, not [tokens, features]
    with pytest.raises(InjectionError, match=r"layers\.0' \(ConvNextLayer\) cannot be an expert"):
        surgery.inject(model, "moe", targets="stages.0.layers.0", experts=2)
    assert_snapshot_equal(before, snapshot(model))
    run(model, batch_for(model))


def test_moe_on_mamba_is_refused_with_the_package_error():
    model = tiny_mamba()
    before = snapshot(model)
    for targets in (None, "mixer"):
        with pytest.raises(SurgeryError):  # never a bare AssertionError, never a crash at the forward
            surgery.inject(model, "moe", targets=targets, experts=2)
    with pytest.raises(InjectionError, match=r"mixer' \(MambaMixer\) cannot be an expert"):
        surgery.inject(model, "moe", targets="mixer", experts=2)
    assert_snapshot_equal(before, snapshot(model))


def test_moe_refuses_an_ffn_that_mixes_positions():
    class MixingFFN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(F.gelu(self.up(x))).cumsum(-2)  # a running sum over the tokens

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ffn = MixingFFN()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.ffn(x)

    model = Net()
    with pytest.raises(InjectionError, match="depends on the other tokens"):
        surgery.inject(model, "moe", targets="ffn", experts=2)
    # the same FFN without the running sum is position-wise: upcycled
    MixingFFN.forward = lambda self, x: self.down(F.gelu(self.up(x)))  # type: ignore[method-assign]
    x = torch.randn(2, 5, 8)
    base = model(x)
    surgery.inject(model, "moe", targets="ffn", experts=2)
    torch.testing.assert_close(model(x), base, atol=1e-6, rtol=0)


def test_lora_on_linear_roles_warns_that_fused_experts_are_not_covered():
    model = tiny_mixtral()
    with pytest.warns(FusedExpertsWarning, match=r"'lora'.*mlp\.experts .*it covers only model\.layers\.0\.self_attn"):
        inj = surgery.inject(model, "lora", targets="@linear", r=2, name="l")
    assert all(".self_attn." in p for p in inj.sites)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedExpertsWarning)  # asked for the attention only: nothing to say
        surgery.inject(model, "lora", targets=["@q", "@v"], r=2, name="qv")
        surgery.inject(tiny_llama(), "lora", targets="@linear", r=2)  # no fused experts: nothing to say
