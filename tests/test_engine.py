"""The engine: reversible injection, named deltas, context-local activation (threads, asyncio),
bad inputs that change nothing, Delta round trips and hot-swaps, fingerprints, summary, freeze."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading

import pytest
import torch
from _helpers import assert_snapshot_equal, assert_state_equal, randomize, run, snapshot, state_bits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import TinyTransformer, batch_for, tiny_bert, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2
from torch import nn

import surgery
from surgery import engine
from surgery.errors import (
    ConfigError,
    DeltaMismatchError,
    InjectionError,
    MergeError,
    SelectorError,
    SurgeryError,
)


def full_snapshot(model: nn.Module) -> dict:
    s = snapshot(model)
    s["attrs"] = sorted(model.__dict__)  # a failed call must not leave bookkeeping behind either
    s["module_ids"] = [(p, id(m)) for p, m in model.named_modules()]
    s["training"] = [m.training for m in model.modules()]
    return s


def assert_full_equal(a: dict, b: dict) -> None:
    assert_snapshot_equal(a, b)
    for key in ("attrs", "module_ids", "training"):
        assert a[key] == b[key], key


# ---------------------------------------------------------------- inject / remove identity


def _mlp(widths, biases, frozen, dtype, embed):
    layers: list[nn.Module] = []
    if embed:
        layers.append(nn.Embedding(11, widths[0]))
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(nn.Linear(a, b, bias=biases[i % len(biases)]))
        layers.append(nn.ReLU())
    model = nn.Sequential(*layers).to(dtype)
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(not frozen[i % len(frozen)])
    return model


@settings(
    max_examples=int(os.environ.get("SURGERY_HYPOTHESIS_EXAMPLES", 40)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    widths=st.lists(st.integers(1, 12), min_size=2, max_size=5),
    biases=st.lists(st.booleans(), min_size=1, max_size=4),
    frozen=st.lists(st.booleans(), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    embed=st.booleans(),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    merge_mask=st.lists(st.booleans(), min_size=3, max_size=3),
    remove_order=st.permutations([0, 1, 2]),
    remove_all_at_once=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_inject_then_remove_is_identity(
    widths, biases, frozen, dtype, embed, ranks, merge_mask, remove_order, remove_all_at_once, seed
):
    torch.manual_seed(seed)
    model = _mlp(widths, biases, frozen, dtype, embed)
    x = torch.randint(0, 11, (2, 3)) if embed else torch.randn(2, widths[0]).to(dtype)
    before = full_snapshot(model)
    out_before = run(model, x)
    targets = [nn.Linear, (nn.Linear, nn.Embedding), "re:[02468]"]
    names = [f"d{i}" for i in range(len(ranks))]
    for i, (name, r) in enumerate(zip(names, ranks, strict=True)):
        inj = surgery.inject(model, "lora", targets=targets[i % 3], name=name, r=r)
        assert inj.name == name and inj.method == "lora" and inj.sites
        randomize(model, name, seed=seed + i, std=0.5)
    # the module tree keeps every original module, with its class, at its path
    mods = dict(model.named_modules())
    for path, typ in before["modules"]:
        assert type(mods[path]) is typ and id(mods[path]) == dict(before["module_ids"])[path]
    assert type(model) is nn.Sequential
    # only the injected tensors train while injected
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    lora = {id(p) for n in names for ad in engine.adapters(model, n).values() for p in ad.parameters()}
    assert trainable == lora
    for name, m in zip(names, merge_mask, strict=False):
        if m:
            surgery.merge(model, name)
    if remove_all_at_once:
        surgery.remove(model)
    else:
        for i in remove_order:
            if i < len(names):
                surgery.remove(model, names[i])
    assert_full_equal(before, full_snapshot(model))
    assert torch.equal(run(model, x), out_before)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama, tiny_bert])
def test_inject_remove_identity_transformers(factory):
    model = factory()
    before = full_snapshot(model)
    surgery.inject(model, "lora", targets=[nn.Linear, nn.Embedding, "c_attn", "c_fc"], r=3, name="a")
    surgery.inject(model, "lora", targets="re:.*\\.1\\..*", r=2, name="b")
    randomize(model, "a")
    randomize(model, "b")
    assert type(model) is before["class"]
    surgery.merge(model, "b")
    surgery.remove(model)
    assert_full_equal(before, full_snapshot(model))


def test_requires_grad_flags_restored():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    surgery.inject(model, "lora", targets="q_proj", r=2)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".surgery." not in n)
    surgery.unfreeze(model, "norm")
    surgery.remove(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_several_named_deltas_remove_one():
    model = TinyTransformer()
    x = batch_for(model)
    for i, (name, tg) in enumerate([("a", "q"), ("b", ["q", "fc1"]), ("c", "v")]):
        surgery.inject(model, "lora", targets=tg, r=2 + i, name=name)
        randomize(model, name, seed=i, std=0.3)
    assert surgery.names(model) == ["a", "b", "c"]
    assert surgery.active(model) == ("a", "b", "c")
    with surgery.use(model, "a", "c"):
        want_ac = run(model, x)
    all3 = run(model, x)
    assert not torch.allclose(all3, want_ac)
    surgery.remove(model, "b")
    assert surgery.names(model) == ["a", "c"]
    assert surgery.active(model) == ("a", "c")
    torch.testing.assert_close(run(model, x), want_ac, atol=0, rtol=0)
    with pytest.raises(InjectionError):
        engine.adapters(model, "b")
    # the q site still carries a; c's v site is untouched
    assert set(engine.adapters(model, "a")) == {"blocks.0.q", "blocks.1.q"}


def test_default_targets_are_q_and_v():
    model = tiny_llama()
    inj = surgery.inject(model, "lora", r=2)
    assert sorted(inj.sites) == sorted(
        p for p, _ in model.named_modules() if p.endswith(("q_proj", "v_proj")) and ".surgery" not in p
    )
    g = tiny_gpt2()
    assert surgery.inject(g, "lora", r=2).sites == ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn")


def test_injection_record_is_json_able():
    model = TinyTransformer()
    inj = surgery.inject(model, "lora", targets="q", r=4, alpha=16, dropout=0.1, rank_pattern={"blocks.1.q": 2})
    assert isinstance(inj, surgery.Injection)
    cfg = json.loads(json.dumps(inj.config))
    assert cfg["r"] == 4 and cfg["alpha"] == 16 and cfg["dropout"] == 0.1
    assert cfg["rank_pattern"] == {"blocks.1.q": 2}


# ---------------------------------------------------------------- activate / use / disable


@pytest.fixture
def two_delta_model():
    model = TinyTransformer()
    x = batch_for(model)
    base = run(model, x)
    surgery.inject(model, "lora", targets=["q", "v"], r=2, name="a")
    surgery.inject(model, "lora", targets=["fc1", "q"], r=3, name="b")
    randomize(model, "a", seed=1, std=0.3)
    randomize(model, "b", seed=2, std=0.3)
    refs = {"": base}
    for names in (("a",), ("b",), ("a", "b")):
        # reference: a fresh model holding only those deltas, with the same tensors
        ref = TinyTransformer()
        for n in names:
            surgery.apply(ref, surgery.delta(model, n))
        refs["".join(names)] = run(ref, x)
    return model, x, refs


def test_activate_use_disable(two_delta_model):
    model, x, refs = two_delta_model
    assert len({tuple(v.flatten()[:8].tolist()) for v in refs.values()}) == 4, "references must differ"
    torch.testing.assert_close(run(model, x), refs["ab"], atol=1e-6, rtol=1e-6)
    with surgery.use(model, "a"):
        assert surgery.active(model) == ("a",)
        torch.testing.assert_close(run(model, x), refs["a"], atol=1e-6, rtol=1e-6)
        with surgery.use(model, "b"):
            assert surgery.active(model) == ("b",)
            torch.testing.assert_close(run(model, x), refs["b"], atol=1e-6, rtol=1e-6)
            with surgery.disable(model):
                assert surgery.active(model) == ()
                assert torch.equal(run(model, x), refs[""])
            assert surgery.active(model) == ("b",)
        assert surgery.active(model) == ("a",)
    assert surgery.active(model) == ("a", "b")
    surgery.activate(model, "b")
    assert surgery.active(model) == ("b",)
    torch.testing.assert_close(run(model, x), refs["b"], atol=1e-6, rtol=1e-6)
    with surgery.use(model, "a", "b"):
        torch.testing.assert_close(run(model, x), refs["ab"], atol=1e-6, rtol=1e-6)
    surgery.activate(model)
    assert torch.equal(run(model, x), refs[""])
    surgery.activate(model, "a", "b")
    torch.testing.assert_close(run(model, x), refs["ab"], atol=1e-6, rtol=1e-6)


def test_use_resets_on_exception(two_delta_model):
    model, x, refs = two_delta_model
    with pytest.raises(RuntimeError):
        with surgery.use(model, "a"):
            raise RuntimeError("boom")
    assert surgery.active(model) == ("a", "b")


def test_use_is_per_model(two_delta_model):
    model, x, refs = two_delta_model
    other = TinyTransformer()
    surgery.apply(other, surgery.delta(model, "a"))
    surgery.apply(other, surgery.delta(model, "b"))
    with surgery.disable(model):
        assert surgery.active(other) == ("a", "b")
        torch.testing.assert_close(run(other, x), refs["ab"], atol=1e-6, rtol=1e-6)


def test_deepcopy_of_injected_model_has_its_own_context(two_delta_model):
    model, x, refs = two_delta_model
    twin = copy.deepcopy(model)
    torch.testing.assert_close(run(twin, x), refs["ab"], atol=1e-6, rtol=1e-6)
    with surgery.disable(model):
        assert surgery.active(twin) == ("a", "b")
        torch.testing.assert_close(run(twin, x), refs["ab"], atol=1e-6, rtol=1e-6)


def test_a_deepcopied_model_saves_and_merges_its_deltas(two_delta_model):
    model, x, refs = two_delta_model
    twin = copy.deepcopy(model)
    for name in ("a", "b"):  # the copy's deltas are deltas of their method, not unknown kinds
        assert surgery.delta(twin, name).method == surgery.delta(model, name).method
        assert all(
            torch.equal(t, surgery.delta(model, name).tensors[k]) for k, t in surgery.delta(twin, name).tensors.items()
        )
    surgery.merge(twin, "a")
    surgery.unmerge(twin, "a")
    torch.testing.assert_close(run(twin, x), refs["ab"], atol=1e-6, rtol=1e-6)


def test_use_unknown_name_raises(two_delta_model):
    model, x, refs = two_delta_model
    snap = full_snapshot(model)
    for call in (lambda: surgery.use(model, "zzz").__enter__(), lambda: surgery.activate(model, "a", "zzz")):
        with pytest.raises(InjectionError) as ei:
            call()
        assert "zzz" in str(ei.value)
    assert_full_equal(snap, full_snapshot(model))
    assert surgery.active(model) == ("a", "b")


def test_threads_get_their_own_deltas(two_delta_model):
    model, x, refs = two_delta_model
    jobs = [("a",), ("b",), (), ("a", "b")]
    n_calls = 8
    # every forward of every thread waits at block 1 until all threads are there: they overlap for sure
    lockstep = threading.Barrier(len(jobs), timeout=30)

    def wait_for_all(module, args):
        lockstep.wait()

    handle = model.blocks[1].register_forward_pre_hook(wait_for_all)
    results: dict[tuple, list] = {j: [] for j in jobs}
    errors: list[BaseException] = []

    def work(names):
        try:
            with surgery.use(model, *names):
                for _ in range(n_calls):
                    results[names].append((surgery.active(model), run(model, x)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            lockstep.abort()

    threads = [threading.Thread(target=work, args=(j,)) for j in jobs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        handle.remove()
    assert not errors, errors
    for names in jobs:
        assert len(results[names]) == n_calls
        for act, out in results[names]:
            assert act == names
            torch.testing.assert_close(out, refs["".join(names)], atol=1e-6, rtol=1e-6)
    assert surgery.active(model) == ("a", "b")


def test_asyncio_tasks_get_their_own_deltas(two_delta_model):
    model, x, refs = two_delta_model
    jobs = [("a",), ("b",), ()]

    async def job(names, barrier):
        with surgery.use(model, *names):
            await barrier.wait()  # every task is inside its own `use` now
            outs = []
            for _ in range(3):
                outs.append((surgery.active(model), run(model, x)))
                await asyncio.sleep(0)  # let the other tasks run in between
            return outs

    async def main():
        barrier = asyncio.Barrier(len(jobs))
        return await asyncio.gather(*(job(j, barrier) for j in jobs))

    for names, outs in zip(jobs, asyncio.run(main()), strict=True):
        for act, out in outs:
            assert act == names
            torch.testing.assert_close(out, refs["".join(names)], atol=1e-6, rtol=1e-6)
    assert surgery.active(model) == ("a", "b")


# ---------------------------------------------------------------- bad inputs change nothing


def _bad_calls():
    """(id, exception type, call(model), text the message must contain)."""
    return [
        ("unknown-method", ConfigError, lambda m: surgery.inject(m, "lorax", targets="q"), "lora"),
        ("r-zero", ConfigError, lambda m: surgery.inject(m, "lora", targets="q", r=0, name="n"), "r"),
        ("r-negative", ConfigError, lambda m: surgery.inject(m, "lora", targets="q", r=-3, name="n"), "r"),
        ("r-float", ConfigError, lambda m: surgery.inject(m, "lora", targets="q", r=2.5, name="n"), "r"),
        ("alpha-zero", ConfigError, lambda m: surgery.inject(m, "lora", targets="q", alpha=0, name="n"), "alpha"),
        ("dropout-1", ConfigError, lambda m: surgery.inject(m, "lora", targets="q", dropout=1.0, name="n"), "dropout"),
        ("bad-init", ConfigError, lambda m: surgery.inject(m, "lora", targets="q", init="zeros", name="n"), "init"),
        ("unknown-key", ConfigError, lambda m: surgery.inject(m, "lora", targets="q", rank=4, name="n"), "rank"),
        (
            "bad-rank-pattern",
            ConfigError,
            lambda m: surgery.inject(m, "lora", targets="q", rank_pattern={"q": 0}, name="n"),
            "rank_pattern",
        ),
        ("no-hit", SelectorError, lambda m: surgery.inject(m, "lora", targets="fc3", name="n"), "fc1"),
        ("unsupported-only", SelectorError, lambda m: surgery.inject(m, "lora", targets="ln1", name="n"), "LayerNorm"),
        ("bad-regex", SelectorError, lambda m: surgery.inject(m, "lora", targets="re:(", name="n"), "re:"),
        ("unknown-role", SelectorError, lambda m: surgery.inject(m, "lora", targets="@nope", name="n"), "@nope"),
        ("bad-name", SurgeryError, lambda m: surgery.inject(m, "lora", targets="q", name="a b"), "a b"),
        ("remove-unknown", InjectionError, lambda m: surgery.remove(m, "zzz"), "zzz"),
        ("merge-unknown", InjectionError, lambda m: surgery.merge(m, "zzz"), "zzz"),
        ("delta-unknown", InjectionError, lambda m: surgery.delta(m, "zzz"), "zzz"),
        ("activate-unknown", InjectionError, lambda m: surgery.activate(m, "zzz"), "zzz"),
        ("use-unknown", InjectionError, lambda m: surgery.use(m, "zzz").__enter__(), "zzz"),
        ("freeze-no-hit", SelectorError, lambda m: surgery.freeze(m, "fc9"), "fc9"),
        ("apply-misfit", DeltaMismatchError, lambda m: surgery.apply(m, _misfit_delta()), "blocks.1.v"),
        ("apply-other-arch", DeltaMismatchError, lambda m: surgery.apply(m, _other_arch_delta()), "base"),
        ("apply-unknown-method", ConfigError, lambda m: surgery.apply(m, _delta_with(method="nope")), "nope"),
        ("apply-bad-key", DeltaMismatchError, lambda m: surgery.apply(m, _delta_with(bad_key=True)), "blocks.0.q.w"),
    ]


def _misfit_delta():
    src = TinyTransformer()
    surgery.inject(src, "lora", targets=["q", "v"], r=2, name="x")
    d = surgery.delta(src, "x")
    d.tensors["blocks.1.v.lora_A.weight"] = torch.zeros(2, 31)
    return d


def _delta_with(method=None, bad_key=False):
    src = TinyTransformer()
    surgery.inject(src, "lora", targets="q", r=2, name="x")
    d = surgery.delta(src, "x")
    if method:
        d.method = method
    if bad_key:
        d.tensors["blocks.0.q.weight"] = d.tensors.pop("blocks.0.q.lora_A.weight")
    return d


def _other_arch_delta():
    src = TinyTransformer(dim=16)
    surgery.inject(src, "lora", targets="q", r=2, name="x")
    return surgery.delta(src, "x")


def _states():
    def pristine():
        return TinyTransformer()

    def injected():
        m = TinyTransformer()
        surgery.inject(m, "lora", targets=["q", "fc1"], r=2, name="a")
        randomize(m, "a")
        return m

    def merged():
        m = injected()
        surgery.inject(m, "lora", targets=["q", "v"], r=3, name="b")
        randomize(m, "b", seed=3)
        surgery.merge(m, "a")
        return m

    return {"pristine": pristine, "injected": injected, "merged": merged}


@pytest.mark.parametrize("state", list(_states()))
@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_leaves_model_unchanged(state, case):
    _, exc, call, text = case
    model = _states()[state]()
    x = batch_for(model)
    out = run(model, x)
    before = full_snapshot(model)
    with pytest.raises(exc) as ei:
        call(model)
    assert isinstance(ei.value, SurgeryError)
    assert text in str(ei.value), str(ei.value)
    assert_full_equal(before, full_snapshot(model))
    assert torch.equal(run(model, x), out)


@pytest.mark.parametrize("state", ["injected", "merged"])
def test_name_taken_leaves_model_unchanged(state):
    model = _states()[state]()
    before = full_snapshot(model)
    with pytest.raises(InjectionError) as ei:
        surgery.inject(model, "lora", targets="v", r=2, name="a")
    assert "a" in str(ei.value)
    assert_full_equal(before, full_snapshot(model))


@pytest.mark.parametrize("state", ["injected", "merged"])
def test_merge_errors_leave_model_unchanged(state):
    model = _states()[state]()
    before = full_snapshot(model)
    other = "b" if state == "merged" else "a"
    if state == "merged":
        calls = [
            lambda: surgery.unmerge(model, "b"),
            lambda: surgery.merge(model, "a"),
            lambda: surgery.disable(model).__enter__(),
            lambda: surgery.use(model, "b").__enter__(),
            lambda: surgery.activate(model, "b"),
        ]
    else:
        calls = [lambda: surgery.unmerge(model, other)]
    for call in calls:
        with pytest.raises(MergeError):
            call()
        assert_full_equal(before, full_snapshot(model))


def test_unsupported_only_message_names_paths_and_types():
    model = TinyTransformer()
    with pytest.raises(SelectorError) as ei:
        surgery.inject(model, "lora", targets="ln?")
    msg = str(ei.value)
    assert "blocks.0.ln1" in msg and "LayerNorm" in msg


def test_unknown_method_lists_known_ones():
    with pytest.raises(ConfigError) as ei:
        surgery.inject(TinyTransformer(), "nope", targets="q")
    assert "lora" in str(ei.value) and "nope" in str(ei.value)


def test_hot_swap_with_bad_config_into_merged_delta_changes_nothing():
    model = _states()["merged"]()
    d = surgery.delta(model, "a")
    d.config["alpha"] = -1
    before = full_snapshot(model)
    with pytest.raises(SurgeryError):
        surgery.apply(model, d)
    assert_full_equal(before, full_snapshot(model))


# ---------------------------------------------------------------- Delta and apply


def test_delta_contents():
    model = tiny_llama()
    surgery.inject(
        model, "lora", targets=["q_proj", "v_proj", "embed_tokens"], r=4, alpha=16, name="x", rank_pattern={"v_proj": 2}
    )
    randomize(model, "x")
    d = surgery.delta(model, "x")
    assert isinstance(d, surgery.Delta)
    assert d.method == "lora" and d.name == "x"
    assert json.loads(json.dumps(d.config)) == d.config
    assert d.config["r"] == 4 and d.config["alpha"] == 16
    assert d.base == surgery.fingerprint(model)
    mods = dict(model.named_modules())
    want = {}
    for p in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        want[p + ".lora_A.weight"] = (4, mods[p].in_features)
        want[p + ".lora_B.weight"] = (mods[p].out_features, 4)
    for p in ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"):
        want[p + ".lora_A.weight"] = (2, mods[p].in_features)
        want[p + ".lora_B.weight"] = (mods[p].out_features, 2)
    emb = mods["model.embed_tokens"]
    want["model.embed_tokens.lora_A.weight"] = (4, emb.num_embeddings)
    want["model.embed_tokens.lora_B.weight"] = (emb.embedding_dim, 4)
    assert {k: tuple(v.shape) for k, v in d.tensors.items()} == want
    # the tensors are copies: training on does not change a Delta taken before
    ad = engine.adapters(model, "x")["model.layers.0.self_attn.q_proj"]
    saved = d.tensors["model.layers.0.self_attn.q_proj.lora_B.weight"].clone()
    with torch.no_grad():
        ad.lora_B.add_(1)
    assert torch.equal(d.tensors["model.layers.0.self_attn.q_proj.lora_B.weight"], saved)
    assert not any(t.requires_grad for t in d.tensors.values())


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_delta_apply_round_trip(factory):
    src = factory()
    x = batch_for(src)
    surgery.inject(src, "lora", targets=["attn.*", "mlp.*"], r=3, alpha=5, name="t", rank_pattern={"re:.*\\.1\\..*": 5})
    randomize(src, "t", std=0.2)
    want = run(src, x)
    d = surgery.delta(src, "t")
    d = surgery.Delta(d.method, d.name, json.loads(json.dumps(d.config)), d.tensors, d.base)
    dst = factory()
    assert not torch.allclose(run(dst, x), want)
    inj = surgery.apply(dst, d)
    assert inj.name == "t" and sorted(inj.sites) == sorted(engine.adapters(src, "t"))
    ranks = {p: ad.lora_A.shape[0] for p, ad in engine.adapters(dst, "t").items()}
    assert ranks == {p: (5 if ".1." in p else 3) for p in ranks}
    torch.testing.assert_close(run(dst, x), want, atol=1e-6, rtol=1e-6)
    # under another name too
    dst2 = factory()
    surgery.apply(dst2, d, name="renamed")
    assert surgery.names(dst2) == ["renamed"]
    torch.testing.assert_close(run(dst2, x), want, atol=1e-6, rtol=1e-6)
    # and the delta taken back out is the same
    back = surgery.delta(dst, "t")
    assert back.tensors.keys() == d.tensors.keys()
    assert all(torch.equal(back.tensors[k], d.tensors[k]) for k in d.tensors)


def test_apply_hot_swap_reuses_modules():
    src = tiny_llama()
    x = batch_for(src)
    surgery.inject(src, "lora", targets=["q_proj", "v_proj"], r=2, name="t")
    randomize(src, "t", seed=1)
    d1 = surgery.delta(src, "t")
    out1 = run(src, x)
    randomize(src, "t", seed=2)
    d2 = surgery.delta(src, "t")
    out2 = run(src, x)

    dst = tiny_llama()
    surgery.apply(dst, d1)
    torch.testing.assert_close(run(dst, x), out1, atol=1e-6, rtol=1e-6)
    ids = {p: id(a) for p, a in engine.adapters(dst, "t").items()}
    param_ids = [(n, id(p)) for n, p in dst.named_parameters()]
    tree = [(p, id(m)) for p, m in dst.named_modules()]
    surgery.apply(dst, d2)
    assert {p: id(a) for p, a in engine.adapters(dst, "t").items()} == ids
    assert [(n, id(p)) for n, p in dst.named_parameters()] == param_ids
    assert [(p, id(m)) for p, m in dst.named_modules()] == tree
    assert surgery.names(dst) == ["t"]
    out = run(dst, x)
    assert not torch.allclose(out, out1)
    torch.testing.assert_close(out, out2, atol=1e-6, rtol=1e-6)


def test_apply_hot_swap_into_merged_delta():
    src = TinyTransformer()
    x = batch_for(src)
    base_bits = state_bits(src)
    surgery.inject(src, "lora", targets=["q", "fc2"], r=2, name="t")
    randomize(src, "t", seed=1)
    d1 = surgery.delta(src, "t")
    randomize(src, "t", seed=2)
    out2 = run(src, x)
    d2 = surgery.delta(src, "t")

    dst = TinyTransformer()
    surgery.apply(dst, d1)
    surgery.merge(dst, "t")
    surgery.apply(dst, d2)
    assert surgery.merged(dst) == ["t"]
    torch.testing.assert_close(run(dst, x), out2, atol=1e-5, rtol=1e-5)
    surgery.remove(dst)
    assert_state_equal(base_bits, state_bits(dst))


def test_apply_hot_swap_new_alpha_changes_scale():
    src = TinyTransformer()
    x = batch_for(src)
    surgery.inject(src, "lora", targets="q", r=2, alpha=2, name="t")
    randomize(src, "t")
    d = surgery.delta(src, "t")
    dst = TinyTransformer()
    surgery.apply(dst, d)
    d.config["alpha"] = 8
    surgery.apply(dst, d)
    assert all(ad.scale == pytest.approx(4.0) for ad in engine.adapters(dst, "t").values())
    ref = TinyTransformer()
    surgery.inject(ref, "lora", targets="q", r=2, alpha=8, name="t")
    surgery.apply(ref, d)
    torch.testing.assert_close(run(dst, x), run(ref, x), atol=1e-6, rtol=1e-6)


def test_misfit_into_fresh_model_names_the_path():
    model = TinyTransformer()
    before = full_snapshot(model)
    with pytest.raises(DeltaMismatchError) as ei:
        surgery.apply(model, _misfit_delta())
    assert "blocks.1.v" in str(ei.value)
    assert_full_equal(before, full_snapshot(model))
    # a site the model does not have
    src = TinyTransformer(layers=3)
    surgery.inject(src, "lora", targets="q", r=2)
    d = surgery.delta(src)
    with pytest.raises(DeltaMismatchError) as ei:
        surgery.apply(model, d, allow_other_base=True)
    assert "blocks.2.q" in str(ei.value)
    assert_full_equal(before, full_snapshot(model))


def test_misfit_hot_swap_names_the_path():
    model = TinyTransformer()
    surgery.inject(model, "lora", targets=["q", "v"], r=2, name="x")
    before = full_snapshot(model)
    with pytest.raises(DeltaMismatchError) as ei:
        surgery.apply(model, _misfit_delta())
    assert_full_equal(before, full_snapshot(model))
    assert "blocks.1.v" in str(ei.value)


def test_apply_with_tensor_missing():
    model = TinyTransformer()
    d = _misfit_delta()
    d.tensors = {k: v for k, v in d.tensors.items() if k != "blocks.0.q.lora_B.weight"}
    d.tensors["blocks.1.v.lora_A.weight"] = torch.zeros(2, 32)
    before = full_snapshot(model)
    with pytest.raises(DeltaMismatchError) as ei:
        surgery.apply(model, d)
    assert "blocks.0.q" in str(ei.value)
    assert_full_equal(before, full_snapshot(model))


# ---------------------------------------------------------------- fingerprint, summary, freeze


def test_fingerprint():
    m = tiny_llama()
    f0 = surgery.fingerprint(m)
    assert f0 == surgery.fingerprint(tiny_llama())
    surgery.inject(m, "lora", targets="attn.*", r=2)
    randomize(m)
    assert surgery.fingerprint(m) == f0
    surgery.merge(m)
    assert surgery.fingerprint(m) == f0
    surgery.remove(m)
    assert surgery.fingerprint(m) == f0
    prints = {surgery.fingerprint(f()) for f in (tiny_llama, tiny_gpt2, tiny_bert, tiny_qwen2, tiny_mistral)}
    assert len(prints) == 5
    assert surgery.fingerprint(TinyTransformer(layers=2)) != surgery.fingerprint(TinyTransformer(layers=3))
    # with weights: equal for equal weights, different once one weight moves
    a, b = tiny_llama(), tiny_llama()
    assert surgery.fingerprint(a, weights=True) == surgery.fingerprint(b, weights=True)
    with torch.no_grad():
        b.lm_head.weight[0, 0] += 1
    assert surgery.fingerprint(a, weights=True) != surgery.fingerprint(b, weights=True)
    assert surgery.fingerprint(a) == surgery.fingerprint(b)


def test_summary_counts():
    model = tiny_llama()
    total0 = sum(p.numel() for p in model.parameters())
    s0 = surgery.summary(model)
    assert (s0.total, s0.trainable, s0.base) == (total0, total0, total0)
    surgery.inject(model, "lora", targets=["q_proj", "v_proj"], r=4, name="a")
    surgery.inject(model, "lora", targets=["down_proj", "embed_tokens"], r=2, name="b")
    mods = dict(model.named_modules())

    def cost(paths, r):
        n = 0
        for p in paths:
            m = mods[p]
            n += r * (
                (m.in_features + m.out_features) if isinstance(m, nn.Linear) else (m.num_embeddings + m.embedding_dim)
            )
        return n

    qv = [p for p in mods if p.endswith(("q_proj", "v_proj")) and ".surgery" not in p]
    dn = [p for p in mods if p.endswith("down_proj") and ".surgery" not in p] + ["model.embed_tokens"]
    na, nb = cost(qv, 4), cost(dn, 2)
    surgery.merge(model, "b")
    with surgery.use(model, "b"):
        s = surgery.summary(model)
    assert s.base == total0
    assert s.total == total0 + na + nb
    assert s.trainable == na  # a merged delta is frozen (it takes no part in the forward) until unmerged
    assert s.deltas["a"]["params"] == na and s.deltas["a"]["sites"] == 4
    assert s.deltas["b"]["params"] == nb and s.deltas["b"]["sites"] == 3
    assert s.deltas["a"]["state"] == "off" and s.deltas["b"]["state"] == "merged"
    assert surgery.summary(model).deltas["a"]["state"] == "active"
    assert s.trainable_fraction == pytest.approx(na / (total0 + na + nb))
    assert "a" in str(s) and "b" in str(s)
    surgery.unmerge(model, "b")
    assert surgery.summary(model).trainable == na + nb


def test_freeze_unfreeze_layers():
    model = tiny_llama()
    surgery.inject(model, "lora", targets="attn.*", r=2)
    named = dict(model.named_parameters())

    def trainable():
        return {n for n, p in named.items() if p.requires_grad}

    lora = {n for n in named if ".surgery." in n}
    assert trainable() == lora
    layer1 = {n for n in named if n.startswith("model.layers.1.")}
    n = surgery.unfreeze(model, surgery.layers("1:"))
    assert n == sum(named[k].numel() for k in layer1 - lora)
    assert trainable() == lora | layer1
    n = surgery.freeze(model, surgery.layers("1:") & surgery.sel("mlp.*"))
    mlp1 = {k for k in layer1 if ".mlp." in k}
    assert n == sum(named[k].numel() for k in mlp1)
    assert trainable() == lora | (layer1 - mlp1)
    assert surgery.unfreeze(model, "lm_head") == named["lm_head.weight"].numel()
    expected = sum(named[k].numel() for k in trainable())
    assert surgery.freeze(model) == expected
    assert trainable() == set()
    surgery.remove(model)
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_without_injection():
    model = TinyTransformer()
    n = surgery.freeze(model, surgery.layers(0))
    assert n == sum(p.numel() for p in model.blocks[0].parameters())
    assert {nm for nm, p in model.named_parameters() if not p.requires_grad} == {
        nm for nm, _ in model.named_parameters() if nm.startswith("blocks.0.")
    }
    assert surgery.unfreeze(model) == n


# ---------------------------------------------------------------- the model argument


def _verb_calls():
    """Every public verb that takes the model first, called as a user would."""
    d = surgery.Delta("lora", "a", {}, {}, "arch:0")
    return {
        "inject": lambda m: surgery.inject(m, "lora"),
        "inject-bad-method": lambda m: surgery.inject(m, "no-such-method"),  # the model is checked first
        "remove": lambda m: surgery.remove(m),
        "remove-one": lambda m: surgery.remove(m, "a"),
        "merge": lambda m: surgery.merge(m),
        "merge-one": lambda m: surgery.merge(m, "a"),
        "unmerge": lambda m: surgery.unmerge(m),
        "unmerge-one": lambda m: surgery.unmerge(m, "a"),
        "activate": lambda m: surgery.activate(m, "a"),
        "use": lambda m: surgery.use(m, "a").__enter__(),
        "disable": lambda m: surgery.disable(m).__enter__(),
        "active": surgery.active,
        "names": surgery.names,
        "merged": surgery.merged,
        "delta": surgery.delta,
        "apply": lambda m: surgery.apply(m, d),
        "fingerprint": surgery.fingerprint,
        "find": lambda m: surgery.find(m, "q"),
        "trace": surgery.trace,
        "summary": surgery.summary,
        "freeze": surgery.freeze,
        "unfreeze": surgery.unfreeze,
        "freeze-targets": lambda m: surgery.freeze(m, "q"),
        "fuse": lambda m: surgery.fuse(m, ["a", "b"]),
        "fusion_weights": surgery.fusion_weights,
        "combine": lambda m: surgery.combine(m, {"a": 0.5, "b": 0.5}),
        "aux_loss": surgery.aux_loss,
        "base_state_dict": engine.base_state_dict,
    }


@pytest.mark.parametrize("verb", list(_verb_calls()))
@pytest.mark.parametrize("bad", ["notamodel", None, {"q.weight": torch.zeros(2)}], ids=["str", "none", "dict"])
def test_verbs_refuse_what_is_not_a_model(verb, bad):
    from surgery.errors import ModelTypeError

    with pytest.raises(ModelTypeError) as ei:
        _verb_calls()[verb](bad)
    assert isinstance(ei.value, SurgeryError) and isinstance(ei.value, TypeError)
    msg = str(ei.value)
    assert "torch.nn.Module" in msg and type(bad).__name__ in msg, msg
    if isinstance(bad, str):
        assert "from_pretrained" in msg, msg  # a model id: say how to load it


# ---------------------------------------------------------------- NaN / Inf deltas


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path", ["fresh", "hot-swap", "hot-swap-merged"])
def test_apply_refuses_a_delta_with_nan_or_inf(path, value):
    src = _states()["injected"]()
    d = surgery.delta(src, "a")
    key = sorted(d.tensors)[1]
    d.tensors[key][0, -1] = value
    model = {"fresh": TinyTransformer, "hot-swap": _states()["injected"], "hot-swap-merged": _states()["merged"]}[
        path
    ]()
    x = batch_for(model)
    out = run(model, x)
    before = full_snapshot(model)
    with pytest.raises(DeltaMismatchError) as ei:
        surgery.apply(model, d)
    msg = str(ei.value)
    assert key in msg and ("NaN" in msg and "Inf" in msg) and "nothing was applied" in msg, msg
    assert_full_equal(before, full_snapshot(model))
    assert torch.equal(run(model, x), out)


def test_apply_of_finite_delta_still_works_after_the_check():
    src = _states()["injected"]()
    model = TinyTransformer()
    surgery.apply(model, surgery.delta(src, "a"))
    x = batch_for(model)
    assert torch.equal(run(model, x), run(src, x))


# ---------------------------------------------------------------- training a merged delta


def test_merge_freezes_the_delta_and_unmerge_gives_its_flags_back():
    """A merged delta takes no part in the forward: its tensors would get no gradient. Merge freezes
    them (no optimizer picks them up), unmerge restores each tensor's own flag."""
    model = _states()["injected"]()
    ads = engine.adapters(model, "a")
    ads["q" if "q" in ads else next(iter(ads))]  # noqa: B018
    params = [p for ad in ads.values() for p in ad.parameters()]
    params[0].requires_grad_(False)  # a flag of the user's own: kept through merge / unmerge
    flags = [p.requires_grad for p in params]
    surgery.merge(model, "a")
    assert not any(p.requires_grad for p in params)
    assert surgery.unfreeze(model) > 0  # the base may be unfrozen, the merged delta stays frozen
    assert not any(p.requires_grad for p in params)
    x = batch_for(model)
    model(x).sum().backward()  # full fine-tuning of the merged base runs
    assert all(p.grad is None for p in params)
    surgery.unmerge(model, "a")
    assert [p.requires_grad for p in params] == flags


@pytest.mark.parametrize("how", ["requires_grad", "hot-swap"])
def test_training_a_merged_delta_is_refused_not_silent(how):
    model = _states()["injected"]()
    surgery.merge(model, "a")
    x = batch_for(model)
    params = [p for ad in engine.adapters(model, "a").values() for p in ad.parameters()]
    if how == "hot-swap":  # unmerge, swap, merge again: still frozen
        surgery.apply(model, surgery.delta(model, "a"))
        assert not any(p.requires_grad for p in params)
    params[1].requires_grad_(True)  # someone makes it trainable again
    with pytest.raises(MergeError) as ei:
        model(x)
    assert "'a'" in str(ei.value) and "unmerge" in str(ei.value)
    with torch.no_grad():  # inference is fine
        model(x)
    surgery.unmerge(model, "a")
    out = model(x).sum()
    out.backward()
    assert params[1].grad is not None and params[1].grad.abs().sum() > 0


def test_remove_keep_merged_forgets_the_frozen_delta():
    model = _states()["injected"]()
    surgery.merge(model, "a")
    surgery.remove(model, "a", keep_merged=True)
    assert surgery.names(model) == []
    model(batch_for(model))  # nothing left to refuse


def test_apply_accepts_huge_finite_values():
    """The fast check sums each tensor; a sum that overflows a finite tensor must not refuse it."""
    src = _states()["injected"]()
    d = surgery.delta(src, "a")
    key = sorted(d.tensors)[0]
    d.tensors[key].fill_(3e38)
    model = TinyTransformer()
    surgery.apply(model, d)
    assert torch.equal(
        dict(engine.adapters(model, "a"))[key.rsplit(".", 2)[0]].tensors()["lora_A.weight"], d.tensors[key]
    )
