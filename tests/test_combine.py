"""surgery.combine against PEFT's add_weighted_adapter: every method on GPT-2 (Conv1D) and
Llama (Linear), embeddings and convolutions, the options, the dare seed rule; and the new
delta's life in the model (round trip, merge, inputs untouched, errors change nothing)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from _helpers import assert_snapshot_equal, bits, run, snapshot
from models import batch_for, tiny_gpt2, tiny_llama
from test_lora import ConvNet, _conv_input
from torch import nn

import surgery
from surgery import engine
from surgery.combine import COMBINE_METHODS
from surgery.errors import ConfigError, InjectionError
from surgery.methods.base import Adapter, Method

peft = pytest.importorskip("peft")

FACTORWISE = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
DENSITY = {m: 0.5 for m in COMBINE_METHODS if m not in ("linear", "cat", "svd")}
W3 = {"a": 0.7, "b": -1.3, "c": 2.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # LAPACK's threaded SVD of tiny matrices crawls when the CPU is shared; one thread is fast
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _peft_lora(pm, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.scaling:
            if adapter in mod.lora_A:
                out[path] = (mod.lora_A[adapter].weight, mod.lora_B[adapter].weight, mod.scaling[adapter])
            else:
                out[path] = (mod.lora_embedding_A[adapter], mod.lora_embedding_B[adapter], mod.scaling[adapter])
    return out


def _pair(factory, specs: dict, ours_extra: dict | None = None, peft_extra: dict | None = None):
    """Our model and a PEFT model with the same LoRA deltas (random non-zero A and B).
    specs: name -> (targets, r, alpha)."""
    from peft import LoraConfig, get_peft_model

    ours, ref = factory(), factory()
    pm = None
    g = torch.Generator().manual_seed(7)
    for name, (targets, r, alpha) in specs.items():
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **(peft_extra or {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fan_in_fan_out for GPT-2's Conv1D
            if pm is None:
                pm = get_peft_model(ref, cfg, adapter_name=name)
            else:
                pm.add_adapter(name, cfg)
        surgery.inject(ours, "lora", targets=targets, name=name, r=r, alpha=alpha, **(ours_extra or {}))
        ads, theirs = engine.adapters(ours, name), _peft_lora(pm, name)
        assert sorted(ads) == sorted(theirs), "not the same sites as PEFT"
        with torch.no_grad():
            for path, (A, B, scaling) in theirs.items():
                A.copy_(torch.randn(A.shape, generator=g) * 0.3)
                B.copy_(torch.randn(B.shape, generator=g) * 0.3)
                ads[path].lora_A.copy_(A)
                ads[path].lora_B.copy_(B)
                assert ads[path].scale == pytest.approx(scaling)
    return ours, pm.eval()


def _input_bits(model) -> dict[str, torch.Tensor]:
    return {
        f"{n}:{p}:{k}": bits(t)
        for n in surgery.names(model)
        for p, ad in engine.adapters(model, n).items()
        for k, t in ad.tensors().items()
    }


# outputs: the factors match PEFT's to 1e-6, and our LoRA projects the sites that share an input in one
# GEMM (PEFT one per site), so fp32 rounding differs by up to ~1.2e-5 on the svd methods' larger factors
def check_against_peft(factory, x, specs, weights, method, ours_extra=None, peft_extra=None, atol=2e-5, **kw):
    """Combine in both; the combined delta alone gives PEFT's outputs. Returns (ours, max abs diff)."""
    ours, pm = _pair(factory, specs, ours_extra, peft_extra)
    before_out, before_in, active = run(ours, x), _input_bits(ours), surgery.active(ours)
    pk = {("svd_rank" if k == "r" else k): v for k, v in kw.items() if k != "seed"}
    seed = kw.get("seed", 11)
    torch.manual_seed(seed)  # what a PEFT user does before a dare merge
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_weighted_adapter(list(weights), list(weights.values()), "comb", combination_type=method, **pk)
    pm.set_adapter("comb")
    want = run(pm, x)
    kw.setdefault("seed", seed)
    inj = surgery.combine(ours, weights, method, name="comb", **kw)
    assert inj.name == "comb" and inj.method == "lora"
    assert surgery.active(ours) == active, "the combined delta must not be active by default"
    assert torch.equal(run(ours, x), before_out)
    after_in = _input_bits(ours)
    assert all(torch.equal(before_in[k], after_in[k]) for k in before_in), "an input delta changed"
    with surgery.use(ours, "comb"):
        got = run(ours, x)
    base = run(factory(), x)
    assert (want - base).abs().max() > 1e-2, "the combined delta does nothing: the test is vacuous"
    theirs, ads = _peft_lora(pm, "comb"), engine.adapters(ours, "comb")
    assert sorted(theirs) == sorted(ads)
    for path, (A, B, scaling) in theirs.items():
        assert ads[path].lora_A.shape == A.shape and ads[path].lora_B.shape == B.shape, path
        assert ads[path].scale == pytest.approx(scaling), path
        torch.testing.assert_close(ads[path].lora_A.detach(), A.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ads[path].lora_B.detach(), B.detach(), atol=1e-6, rtol=1e-6)
    diff = (got - want).abs().max().item()
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)
    return ours, diff


LLAMA_T = ["q_proj", "v_proj", "down_proj"]
GPT2_T = ["c_attn", "c_proj", "c_fc"]


def _specs(targets: list[str], method: str) -> dict:
    if method in FACTORWISE:  # one rank (PEFT's rule), different alphas
        return {"a": (targets, 4, 8), "b": (targets, 4, 16), "c": (targets, 4, 4)}
    # mixed ranks and sites
    return {"a": (targets, 4, 8), "b": (targets[:2], 2, 16), "c": (targets[1:], 6, 4)}


@pytest.mark.parametrize("method", COMBINE_METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_peft(arch, method):
    factory, targets = (tiny_llama, LLAMA_T) if arch == "llama" else (tiny_gpt2, GPT2_T)
    x = batch_for(factory())
    check_against_peft(
        factory,
        x,
        _specs(targets, method),
        W3,
        method,
        peft_extra={"fan_in_fan_out": arch == "gpt2"},
        density=DENSITY.get(method),
    )


@pytest.mark.parametrize("method", COMBINE_METHODS)
def test_matches_peft_embedding(method):
    x = batch_for(tiny_llama())
    t = ["embed_tokens", "q_proj"]
    same = method in FACTORWISE
    specs = {"a": (t, 4, 8), "b": (t if same else t[:1], 4 if same else 2, 3)}
    check_against_peft(tiny_llama, x, specs, {"a": 0.6, "b": -1.5}, method, density=DENSITY.get(method))


@pytest.mark.parametrize("method", COMBINE_METHODS)
def test_matches_peft_conv(method):
    # conv2d 3x3, strided 3x3 and 1x1, plus a Linear head; the Conv1d "seq" joins where PEFT supports it
    # (PEFT's svd methods cannot factor a Conv1d update: see test_svd_conv1d_is_exact)
    t = ["conv1", "conv2", "proj", "head"] + ([] if method.endswith("svd") else ["seq"])
    same = method in FACTORWISE
    specs = {"a": (t, 3, 6), "b": (t if same else t[:3], 3 if same else 2, 5)}
    check_against_peft(ConvNet, _conv_input(), specs, {"a": 1.2, "b": -0.5}, method, density=DENSITY.get(method))


OPTIONS = {
    "rslora_linear": (dict(rslora=True), dict(use_rslora=True), "linear", {}),
    "rslora_cat": (dict(rslora=True), dict(use_rslora=True), "cat", {}),
    "gaussian_dare_ties": (dict(init="gaussian"), dict(init_lora_weights="gaussian"), "dare_ties", dict(density=0.3)),
    "frequency_ties": ({}, {}, "ties", dict(density=0.4, majority_sign_method="frequency")),
    "frequency_dare_ties_svd": ({}, {}, "dare_ties_svd", dict(density=0.6, majority_sign_method="frequency")),
    "density_1": ({}, {}, "dare_linear", dict(density=1.0)),
    "svd_r_clamp_reduced": ({}, {}, "ties_svd", dict(density=0.5, r=3, svd_clamp=0.9, svd_full_matrices=False)),
    "svd_r_big": ({}, {}, "svd", dict(r=10)),
    "magnitude_prune_small_density": ({}, {}, "magnitude_prune_svd", dict(density=0.05)),
    "rank_pattern_linear": (dict(rank_pattern={"v_proj": 2}), dict(rank_pattern={"v_proj": 2}), "linear", {}),
    "rank_pattern_ties_rslora": (
        dict(rank_pattern={"v_proj": 2}, rslora=True),
        dict(rank_pattern={"v_proj": 2}, use_rslora=True),
        "ties",
        dict(density=0.7),
    ),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_matches_peft_options(case):
    ours_extra, peft_extra, method, kw = OPTIONS[case]
    x = batch_for(tiny_llama())
    t = ["q_proj", "v_proj", "o_proj"]
    specs = {"a": (t, 4, 8), "b": (t, 4, 3), "c": (t, 4, 5)}
    ours, _ = check_against_peft(tiny_llama, x, specs, W3, method, ours_extra, peft_extra, **kw)
    if case.startswith("rank_pattern"):  # the rank-2 sites keep rank 2, at PEFT's scale
        ranks = {p: ad.lora_A.shape[0] for p, ad in engine.adapters(ours, "comb").items()}
        assert sorted(set(ranks.values())) == [2, 4]
        _round_trip(ours, x)


def test_single_delta_is_linear_as_in_peft():
    x = batch_for(tiny_llama())
    ours, _ = check_against_peft(tiny_llama, x, {"a": (LLAMA_T, 4, 8)}, {"a": -1.7}, "svd", r=2)
    assert {ad.lora_A.shape[0] for ad in engine.adapters(ours, "comb").values()} == {4}


# ---------------------------------------------------------------- randomness


def _combined_tensors(model, name="comb") -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in surgery.delta(model, name).tensors.items()}


def _three(factory=tiny_llama, targets=("q_proj", "v_proj")):
    model = factory()
    for n, alpha in (("a", 8), ("b", 16), ("c", 4)):
        surgery.inject(model, "lora", targets=list(targets), name=n, r=4, alpha=alpha)
        with torch.no_grad():
            g = torch.Generator().manual_seed(len(n) + alpha)
            for ad in engine.adapters(model, n).values():
                ad.lora_A.copy_(torch.randn(ad.lora_A.shape, generator=g))
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g))
    return model


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear_svd"])
def test_seed_rule(method):
    model = _three()
    state = torch.get_rng_state()
    surgery.combine(model, W3, method, name="s5", density=0.5, seed=5)
    assert torch.equal(torch.get_rng_state(), state), "a seeded combine must leave the global generator alone"
    surgery.combine(model, W3, method, name="s5b", density=0.5, seed=5)
    surgery.combine(model, W3, method, name="s6", density=0.5, seed=6)
    torch.manual_seed(5)
    surgery.combine(model, W3, method, name="g5", density=0.5)  # seed=None: the global generator as it is
    assert not torch.equal(torch.get_rng_state(), state)
    s5, s5b, s6, g5 = (_combined_tensors(model, n) for n in ("s5", "s5b", "s6", "g5"))
    for k in s5:
        assert torch.equal(s5[k], s5b[k]) and torch.equal(s5[k], g5[k]), k
    assert any(not torch.equal(s5[k], s6[k]) for k in s5), "another seed must give other masks"


def test_deterministic_methods_leave_rng_alone():
    model = _three()
    state = torch.get_rng_state()
    for m in ("linear", "cat", "svd", "ties", "magnitude_prune_svd"):
        surgery.combine(model, W3, m, name=m, density=DENSITY.get(m))
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- the new delta in the model


def _round_trip(model, x, name="comb"):
    with surgery.use(model, name):
        want = run(model, x)
    d = surgery.delta(model, name)
    fresh = type(model)(model.config) if hasattr(model, "config") else None
    if fresh is not None:
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".surgery." not in k})
        fresh.eval()
        surgery.apply(fresh, d, name="again")
        with surgery.use(fresh, "again"):
            torch.testing.assert_close(run(fresh, x), want, atol=1e-6, rtol=1e-6)
    # and back into the same model under another name: same tensors, same scales
    surgery.apply(model, d, name="copy")
    for path, ad in engine.adapters(model, "copy").items():
        ref = engine.adapters(model, name)[path]
        assert ad.scale == ref.scale and torch.equal(ad.lora_A, ref.lora_A) and torch.equal(ad.lora_B, ref.lora_B)
    with surgery.use(model, "copy"):
        assert torch.equal(run(model, x), want)


@pytest.mark.parametrize("method", ["cat", "svd", "ties"])
def test_round_trip_and_merge(method):
    model = _three()
    x = batch_for(model)
    surgery.combine(model, W3, method, density=DENSITY.get(method))
    _round_trip(model, x, "combined")
    surgery.activate(model, "combined")
    unmerged = run(model, x)
    w = model.model.layers[0].self_attn.q_proj.weight
    w0 = bits(w)
    surgery.merge(model, "combined")
    assert not torch.equal(bits(w), w0)
    torch.testing.assert_close(run(model, x), unmerged, atol=1e-5, rtol=1e-5)
    surgery.unmerge(model, "combined")
    assert torch.equal(bits(w), w0), "unmerge must restore the base bit for bit"
    assert torch.equal(run(model, x), unmerged)


def test_merged_inputs_are_read():
    model, ref = _three(), _three()
    surgery.merge(model, "a")
    surgery.combine(model, W3, "cat")
    surgery.combine(ref, W3, "cat")
    a, b = _combined_tensors(model, "combined"), _combined_tensors(ref, "combined")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_svd_conv1d_is_exact():
    """PEFT's svd cannot factor a Conv1d update (its svd runs on the 3-d kernel); here it is
    flattened like a Conv2d one, so at full rank svd reproduces the exact sum of updates (= cat)."""
    model = ConvNet()
    x = _conv_input()
    surgery.inject(model, "lora", targets=["seq", "conv1"], name="a", r=3, alpha=6)
    surgery.inject(model, "lora", targets=["seq"], name="b", r=2, alpha=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in ("a", "b"):
            for ad in engine.adapters(model, n).values():
                ad.lora_A.copy_(torch.randn(ad.lora_A.shape, generator=g))
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g))
    w = {"a": 0.8, "b": -1.4}
    surgery.combine(model, w, "cat", name="cat")
    surgery.combine(model, w, "svd", name="svd", r=5)
    assert engine.adapters(model, "svd")["seq"].lora_A.shape == (5, 6, 3)
    with surgery.use(model, "cat"):
        want = run(model, x)
    with surgery.use(model, "svd"):
        got = run(model, x)
    with surgery.use(model):
        assert (want - run(model, x)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- errors change nothing


@dataclasses.dataclass
class _NoConfig:
    pass


class _Zero(Adapter):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def contribute(self, x, out, inplace=False):
        return out


class _Other(Method):  # not registered: only attached to one test model
    name = "other"
    Config = _NoConfig

    def supports(self, module):
        return isinstance(module, nn.Linear)

    def make(self, module, path, cfg, shapes=None):
        return _Zero()


def _model_for_errors():
    model = _three()
    surgery.inject(model, "lora", targets=["q_proj"], name="q_only", r=4)
    surgery.inject(model, "lora", targets=["q_proj", "v_proj"], name="r8", r=8)
    surgery.inject(model, "lora", targets=["q_proj"], name="taken", r=2)
    path = "model.layers.0.self_attn.o_proj"
    mod = model.get_submodule(path)
    engine.attach(model, "other", _Other(), _NoConfig(), [(path, mod, _Zero())])
    return model


BAD = {
    "unknown method": (dict(weights={"a": 1, "b": 1}, method="mean"), ConfigError, "known methods"),
    "empty weights": (dict(weights={}), ConfigError, "non-empty"),
    "weights not a dict": (dict(weights=["a", "b"]), ConfigError, "dict"),
    "weight not a number": (dict(weights={"a": 1, "b": "x"}), ConfigError, "number"),
    "weight nan": (dict(weights={"a": 1, "b": float("nan")}), ConfigError, "number"),
    "missing density": (dict(weights=W3, method="ties"), ConfigError, "needs density"),
    "density 0": (dict(weights=W3, method="dare_linear", density=0), ConfigError, "(0, 1]"),
    "density 1.5": (dict(weights=W3, method="magnitude_prune_svd", density=1.5), ConfigError, "(0, 1]"),
    "density for linear": (dict(weights=W3, method="linear", density=0.5), ConfigError, "density is used by"),
    "r 0": (dict(weights=W3, method="svd", r=0), ConfigError, "positive integer"),
    "r negative": (dict(weights=W3, method="ties_svd", density=0.5, r=-2), ConfigError, "positive integer"),
    "r for cat": (dict(weights=W3, method="cat", r=4), ConfigError, "svd methods"),
    "r too big": (dict(weights=W3, method="svd", r=65), ConfigError, "exceeds"),
    "clamp out of range": (dict(weights=W3, method="svd", svd_clamp=1.5), ConfigError, "quantile"),
    "bad majority": (
        dict(weights=W3, method="ties", density=0.5, majority_sign_method="most"),
        ConfigError,
        "majority_sign_method",
    ),
    "bad seed": (dict(weights=W3, method="dare_ties", density=0.5, seed="1"), ConfigError, "seed"),
    "name taken": (dict(weights=W3, name="taken"), InjectionError, "already injected"),
    "bad name": (dict(weights=W3, name="a b"), InjectionError, "letters"),
    "unknown delta": (dict(weights={"a": 1, "nope": 1}), InjectionError, "no delta named 'nope'"),
    "not lora": (dict(weights={"a": 1, "other": 1}, method="cat"), ConfigError, "only LoRA"),
    "linear other sites": (dict(weights={"a": 1, "q_only": 1}), ConfigError, "same sites"),
    "ties mixed ranks": (dict(weights={"a": 1, "r8": 1}, method="ties", density=0.5), ConfigError, "one rank"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_changes_nothing(case):
    kw, exc, text = BAD[case]
    model = _model_for_errors()
    before = snapshot(model)
    rng = torch.get_rng_state()
    with pytest.raises(exc) as info:
        surgery.combine(model, **kw)
    assert text in str(info.value), str(info.value)
    assert_snapshot_equal(before, snapshot(model))
    assert torch.equal(torch.get_rng_state(), rng)


def test_different_sites_ok_beyond_linear():
    model = _model_for_errors()
    x = batch_for(model)
    surgery.combine(model, {"a": 1.0, "q_only": -0.5}, "cat", name="cat")
    surgery.combine(model, {"a": 1.0, "q_only": -0.5}, "ties", name="tie", density=0.5)
    assert set(engine.adapters(model, "cat")) == set(engine.adapters(model, "a"))
    with surgery.use(model, "cat"):
        run(model, x)
