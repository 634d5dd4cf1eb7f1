"""Prefix tuning / P-tuning v2 ("prefix"): extra keys and values at every attention layer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery import engine
from tests._helpers import assert_snapshot_equal, run, snapshot
from tests.models import (
    FusedQKVTransformer,
    TinyTransformer,
    decoder_kw,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
)

HF = [tiny_gpt2, tiny_bert, tiny_llama, tiny_qwen2, tiny_mistral]
DECODERS = [tiny_gpt2, tiny_llama, tiny_qwen2, tiny_mistral]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models on a shared 2-core machine: more threads only contend
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids(batch=3, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (batch, seq), generator=g)


@torch.no_grad()
def _fill(model, name, seed=1, std=0.5, zero=False):
    g = torch.Generator().manual_seed(seed)
    for ad in engine.adapters(model, name).values():
        for p in ad.parameters():
            p.copy_(torch.zeros_like(p) if zero else torch.randn(p.shape, generator=g) * std)


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


# ------------------------------------------------------------------ the reference: eager attention by hand

_REF: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _ref_attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
    """softmax(q [Pk; k]^T * scale + [0 | mask]) [Pv; v], with the key/value heads repeated for GQA."""
    pk, pv = _REF[id(module)]
    b = q.shape[0]
    k = torch.cat((pk.expand(b, -1, -1, -1), k), 2)
    v = torch.cat((pv.expand(b, -1, -1, -1), v), 2)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if mask is not None:  # an additive float mask (eager's), P zero columns in front
        s = s + torch.cat((torch.zeros(*mask.shape[:-1], pk.shape[2], dtype=mask.dtype), mask), -1)
    p = s.softmax(-1)
    return (p @ v).transpose(1, 2), p


def _register_ref():
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("test_ref_prefix", _ref_attention)
    AttentionMaskInterface.register("test_ref_prefix", eager_mask)


def reference(model, name, **inputs):
    """The model's output computed with the prefix of `name` put in by `_ref_attention`."""
    _register_ref()
    _REF.clear()
    for path, ad in engine.adapters(model, name).items():
        k, v = ad.kv()
        _REF[id(model.get_submodule(path))] = (k.detach()[None], v.detach()[None])
    cfg = model.config
    old = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = "test_ref_prefix"
    try:
        with torch.no_grad(), surgery.disable(model):
            return _out(model(**inputs))
    finally:
        cfg._attn_implementation_internal = old


@pytest.mark.parametrize("factory", HF, ids=lambda f: f.__name__)
@pytest.mark.parametrize("values", ["zeros", "random"])
def test_matches_attention_by_hand(factory, values):
    model = factory()
    surgery.inject(model, "prefix", n_tokens=5, name="p")
    _fill(model, "p", zero=values == "zeros")
    ids = _ids()
    mask = torch.ones_like(ids)
    if factory is tiny_bert:
        mask[0, -3:] = 0  # right padding
    else:
        mask[0, :3] = 0  # left padding
        mask[1, :1] = 0
    for inputs in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids}):
        with torch.no_grad():
            ours = _out(model(**inputs))
        ref = reference(model, "p", **inputs)
        keep = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=1e-5)
    with surgery.disable(model), torch.no_grad():
        base = _out(model(input_ids=ids))
    assert (ours - base).abs().max() > 1e-3  # the prefix does something


def test_eager_implementation_matches():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    surgery.inject(model, "prefix", n_tokens=4, name="p")
    assert model.config._attn_implementation == "surgery_eager"
    _fill(model, "p")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ours = run(model, {"input_ids": ids, "attention_mask": mask})
    ref = reference(model, "p", input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    surgery.remove(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_mistral], ids=lambda f: f.__name__)
def test_grouped_query_attention_shapes(factory):
    model = factory()  # 4 query heads, 2 key/value heads, head width 16
    surgery.inject(model, "prefix", n_tokens=7, name="p")
    for ad in engine.adapters(model, "p").values():
        assert ad.prefix_key.shape == (2, 7, 16) and ad.prefix_value.shape == (2, 7, 16)
    d = surgery.delta(model, "p")
    assert {k.rsplit(".", 1)[-1] for k in d.tensors} == {"prefix_key", "prefix_value"}
    assert sum(t.numel() for t in d.tensors.values()) == 2 * 2 * (2 * 7 * 16)


# ------------------------------------------------------------------ generate, padding, batch sizes


@torch.no_grad()
def _greedy_by_hand(model, ids, n):
    for _ in range(n):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), 1)
    return ids


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama], ids=lambda f: f.__name__)
def test_generate_with_kv_cache_equals_full_recompute(factory):
    model = factory()
    surgery.inject(model, "prefix", n_tokens=6, name="p")
    _fill(model, "p", std=1.0)
    ids = _ids(batch=2, seq=5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        plain = model.generate(ids, use_cache=False, **kw)
        with surgery.disable(model):
            base = model.generate(ids, use_cache=True, **kw)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, _greedy_by_hand(model, ids, 8))
    assert not torch.equal(cached, base)


@pytest.mark.parametrize("factory", DECODERS, ids=lambda f: f.__name__)
def test_left_padding_rows_equal_unpadded(factory):
    model = factory()
    surgery.inject(model, "prefix", n_tokens=4, name="p")
    _fill(model, "p", std=1.0)
    rows = [_ids(1, 5, seed=1)[0], _ids(1, 8, seed=2)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for i, r in enumerate(rows):
            alone = model(input_ids=r[None]).logits[0]
            torch.testing.assert_close(batched[i, width - len(r) :], alone, atol=1e-5, rtol=1e-5)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for i, r in enumerate(rows):
            one = model.generate(
                r[None],
                attention_mask=torch.ones(1, len(r), dtype=torch.long),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
            )
            assert torch.equal(gen[i, width:], one[0, len(r) :])


def test_batch_size_changes_between_calls():
    model = tiny_llama()
    surgery.inject(model, "prefix", n_tokens=4, name="p")
    _fill(model, "p")
    ids = _ids(batch=3, seq=6)
    with torch.no_grad():
        singles = [model(input_ids=ids[i : i + 1]).logits for i in range(3)]
        for b in (3, 1, 2, 3):
            out = model(input_ids=ids[:b]).logits
            for i in range(b):
                torch.testing.assert_close(out[i : i + 1], singles[i], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ layers, training, merge


def test_layers_picks_depths():
    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids, output_hidden_states=True).hidden_states
    inj = surgery.inject(model, "prefix", n_tokens=4, layers="1:", name="ner")
    assert inj.sites == ("model.layers.1.self_attn",)
    assert inj.config["layers"] == "1:"
    _fill(model, "ner")
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(hs[1], base[1])  # layer 0 untouched
    assert not torch.allclose(hs[2], base[2])
    inj2 = surgery.inject(model, "prefix", n_tokens=2, layers=surgery.layers(":1"), name="low")
    assert inj2.sites == ("model.layers.0.self_attn",) and inj2.config["layers"] == "0:1"
    with pytest.raises(surgery.SelectorError, match="depths 0..1"):
        surgery.inject(model, "prefix", n_tokens=2, layers="5:", name="none")


def test_training_updates_only_the_prefix():
    model = tiny_llama()
    surgery.inject(model, "prefix", n_tokens=4, name="p")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.surgery.p.prefix_{w}" for i in (0, 1) for w in ("key", "value")}
    ids = _ids()
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in trainable), n


def test_reparam_mlp_merge_folds_and_unmerge_restores():
    model = tiny_llama()
    inj = surgery.inject(model, "prefix", n_tokens=5, reparam="mlp", hidden=32, name="summ")
    assert inj.config["reparam"] == "mlp"
    ad = engine.adapters(model, "summ")["model.layers.0.self_attn"]
    assert set(ad.tensors()) == {
        "prefix_embedding",
        "prefix_mlp.0.weight",
        "prefix_mlp.0.bias",
        "prefix_mlp.2.weight",
        "prefix_mlp.2.bias",
    }
    assert ad.prefix_embedding.shape == (5, 64) and ad.prefix_mlp[2].out_features == 2 * 2 * 16
    ids = _ids()
    before = run(model, {"input_ids": ids})
    k, v = ad.kv()
    assert k.shape == (2, 5, 16) and v.shape == (2, 5, 16)
    torch.testing.assert_close(before, reference(model, "summ", input_ids=ids), atol=1e-5, rtol=1e-5)

    surgery.merge(model, "summ")
    assert surgery.merged(model) == ["summ"] and ad.folded
    assert not any(p.requires_grad for p in ad.parameters())
    torch.testing.assert_close(run(model, {"input_ids": ids}), before, atol=1e-6, rtol=1e-6)
    calls = []
    handle = ad.prefix_mlp.register_forward_hook(lambda *a: calls.append(1))
    run(model, {"input_ids": ids})
    assert not calls  # the MLP no longer runs
    with surgery.disable(model):  # still switchable: only its own tensors were merged
        torch.testing.assert_close(run(model, {"input_ids": ids}), run(tiny_llama(), {"input_ids": ids}))
    with pytest.raises(surgery.MergeError, match="already"):
        surgery.merge(model, "summ")

    surgery.unmerge(model, "summ")
    handle.remove()
    assert surgery.merged(model) == [] and not ad.folded
    assert all(p.requires_grad for p in ad.parameters())
    torch.testing.assert_close(run(model, {"input_ids": ids}), before, atol=0, rtol=0)
    with pytest.raises(surgery.MergeError, match="not merged"):
        surgery.unmerge(model, "summ")

    surgery.inject(model, "prefix", n_tokens=3, name="plain")
    with pytest.raises(surgery.MergeError, match="no reparameterisation"):
        surgery.merge(model, "plain")


# ------------------------------------------------------------------ delta / apply / remove / use / disable


def test_delta_apply_remove_bit_identical():
    model = tiny_llama()
    ids = _ids()
    before = snapshot(model)
    base = run(model, {"input_ids": ids})
    surgery.inject(model, "prefix", n_tokens=4, name="summ")
    _fill(model, "summ")
    ours = run(model, {"input_ids": ids})
    d = surgery.delta(model, "summ")
    assert set(d.sites()) == {f"model.layers.{i}.self_attn" for i in (0, 1)}

    other = tiny_llama()
    surgery.apply(other, d)
    assert other.config._attn_implementation == "surgery_sdpa"
    torch.testing.assert_close(run(other, {"input_ids": ids}), ours, atol=0, rtol=0)
    _fill(other, "summ", seed=5)
    surgery.apply(other, d)  # a hot-swap: tensors overwritten in place
    torch.testing.assert_close(run(other, {"input_ids": ids}), ours, atol=0, rtol=0)

    surgery.remove(model, "summ")
    assert model.config._attn_implementation == "sdpa"
    assert_snapshot_equal(before, snapshot(model))
    assert torch.equal(run(model, {"input_ids": ids}), base)


def test_hot_swap_of_a_merged_reparam_prefix_refolds():
    model = tiny_llama()
    surgery.inject(model, "prefix", n_tokens=3, reparam="mlp", hidden=16, name="r")
    ids = _ids()
    d = surgery.delta(model, "r")
    _fill(model, "r", seed=3, std=0.3)
    surgery.merge(model, "r")
    surgery.apply(model, d)  # unmerged, swapped, merged again
    assert surgery.merged(model) == ["r"]
    ref = tiny_llama()
    surgery.apply(ref, d)
    torch.testing.assert_close(run(model, {"input_ids": ids}), run(ref, {"input_ids": ids}), atol=1e-6, rtol=1e-6)


def test_two_named_prefixes_choose_per_call():
    model = tiny_llama()
    ids = _ids()
    base = run(model, {"input_ids": ids})
    surgery.inject(model, "prefix", n_tokens=4, name="a")
    surgery.inject(model, "prefix", n_tokens=3, name="b")
    _fill(model, "a", seed=1)
    _fill(model, "b", seed=2)
    with surgery.use(model, "a"):
        only_a = run(model, {"input_ids": ids})
        torch.testing.assert_close(only_a, reference(model, "a", input_ids=ids), atol=1e-5, rtol=1e-5)
    with surgery.use(model, "b"):
        only_b = run(model, {"input_ids": ids})
        torch.testing.assert_close(only_b, reference(model, "b", input_ids=ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(only_a, only_b)
    with surgery.disable(model):
        assert torch.equal(run(model, {"input_ids": ids}), base)
    # both active: their positions concatenate, a then b
    both = run(model, {"input_ids": ids})
    with surgery.use(model, surgery.Stack("a", "b")):
        torch.testing.assert_close(run(model, {"input_ids": ids}), both, atol=0, rtol=0)
    joined = tiny_llama()
    surgery.inject(joined, "prefix", n_tokens=7, name="ab")
    with torch.no_grad():
        for path, ad in engine.adapters(joined, "ab").items():
            ka, va = engine.adapters(model, "a")[path].kv()
            kb, vb = engine.adapters(model, "b")[path].kv()
            ad.prefix_key.copy_(torch.cat((ka, kb), 1))
            ad.prefix_value.copy_(torch.cat((va, vb), 1))
    torch.testing.assert_close(run(joined, {"input_ids": ids}), both, atol=1e-6, rtol=1e-6)
    with surgery.use(model, surgery.Average("a", "b")), pytest.raises(surgery.CompositionError, match="concatenate"):
        run(model, {"input_ids": ids})
    surgery.remove(model, "a")
    assert model.config._attn_implementation == "surgery_sdpa"  # b still needs it
    torch.testing.assert_close(run(model, {"input_ids": ids}), only_b, atol=0, rtol=0)
    surgery.remove(model, "b")
    assert model.config._attn_implementation == "sdpa"


def test_works_beside_lora():
    model = tiny_llama()
    surgery.inject(model, "lora", targets="q_proj", r=4, name="lo")
    surgery.inject(model, "prefix", n_tokens=3, name="p")
    ids = _ids()
    with surgery.use(model, "p"):
        only_p = run(model, {"input_ids": ids})
    both = run(model, {"input_ids": ids})
    torch.testing.assert_close(both, only_p)  # lora_B starts at zero
    surgery.remove(model)
    assert model.config._attn_implementation == "sdpa"


def test_deepcopy_is_independent():
    model = tiny_llama()
    surgery.inject(model, "prefix", n_tokens=3, name="p")
    _fill(model, "p")
    ids = _ids()
    ours = run(model, {"input_ids": ids})
    twin = copy.deepcopy(model)
    torch.testing.assert_close(run(twin, {"input_ids": ids}), ours, atol=0, rtol=0)
    surgery.remove(twin)
    assert twin.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "surgery_sdpa"
    torch.testing.assert_close(run(model, {"input_ids": ids}), ours, atol=0, rtol=0)


def test_switching_the_implementation_afterwards_is_caught():
    model = tiny_llama()
    surgery.inject(model, "prefix", n_tokens=3, name="p")
    model.config._attn_implementation_internal = "eager"  # as set_attn_implementation("eager") would
    with pytest.raises(surgery.SurgeryError, match="did not run"):
        run(model, {"input_ids": _ids()})
    with surgery.disable(model):
        run(model, {"input_ids": _ids()})  # the prefix off: nothing is missing
    surgery.remove(model)
    assert model.config._attn_implementation == "eager"  # the user's choice stays


# ------------------------------------------------------------------ plain modules: the fx rewrite


def _plain_reference(model, name, ids):
    """TinyTransformer's forward written out, with the prefix of `name` in every block's sdpa."""
    ads = engine.adapters(model, name)
    pos = torch.arange(ids.shape[1])
    x = model.embed(ids) + model.pos(pos)
    for i, blk in enumerate(model.blocks):
        b, t, d = x.shape
        h = blk.ln1(x)
        q, k, v = (blk._heads(lin(h)) for lin in (blk.q, blk.k, blk.v))
        pk, pv = ads[f"blocks.{i}"].kv()
        k = torch.cat((pk.expand(b, -1, -1, -1), k), 2)
        v = torch.cat((pv.expand(b, -1, -1, -1), v), 2)
        p = pk.shape[1]
        mask = torch.cat((torch.ones(t, p, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool).tril()), 1)
        s = (q @ k.transpose(-1, -2)) / (d // blk.heads) ** 0.5
        a = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + blk.out(a.transpose(1, 2).reshape(b, t, d))
        x = x + blk.fc2(F.gelu(blk.fc1(blk.ln2(x))))
    return model.lm_head(model.ln_f(x))


def test_plain_module_rewritten_in_place():
    model = TinyTransformer()
    ids = _ids(2, 8)
    before = snapshot(model)
    base = run(model, ids)
    inj = surgery.inject(model, "prefix", n_tokens=3, name="p")
    assert inj.sites == ("blocks.0", "blocks.1")
    assert type(model) is TinyTransformer and "forward" in model.blocks[0].__dict__
    _fill(model, "p")
    with torch.no_grad():
        ours = run(model, ids)
        torch.testing.assert_close(ours, _plain_reference(model, "p", ids), atol=1e-5, rtol=1e-5)
        with surgery.disable(model):
            assert torch.equal(run(model, ids), base)
    # training reaches the prefix through the rewritten forward
    run_loss = model(ids).logsumexp(-1).mean()
    run_loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the graph (roles) of the rewritten model still finds the attention
    from surgery import graph

    graph.clear_cache(model)
    assert "q" in graph.roles(model)["blocks.0.q"]
    twin = copy.deepcopy(model)
    assert twin.blocks[0].forward.__self__ is twin.blocks[0]
    torch.testing.assert_close(run(twin, ids), ours, atol=0, rtol=0)
    d = surgery.delta(model, "p")
    other = TinyTransformer()
    surgery.apply(other, d)
    torch.testing.assert_close(run(other, ids), ours, atol=0, rtol=0)
    surgery.remove(model)
    assert "forward" not in model.blocks[0].__dict__
    assert_snapshot_equal(before, snapshot(model))
    assert torch.equal(run(model, ids), base)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "bad",
    [
        dict(n_tokens=0),
        dict(n_tokens=-3),
        dict(n_tokens=2.5),
        dict(n_tokens=True),
        dict(reparam="lstm"),
        dict(hidden=0),
        dict(layers="x:y"),
        dict(init_std=-1),
    ],
)
def test_bad_config_leaves_model_unchanged(bad):
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(surgery.ConfigError):
        surgery.inject(model, "prefix", **bad)
    assert_snapshot_equal(before, snapshot(model))
    assert model.config._attn_implementation == "sdpa"


def test_unreachable_attention_is_refused_naming_what_was_tried():
    model = FusedQKVTransformer()  # attention by matmul -> softmax -> matmul, no sdpa call
    before = snapshot(model)
    with pytest.raises(surgery.InjectionError) as e:
        surgery.inject(model, "prefix", n_tokens=4)
    msg = str(e.value)
    assert "layers.0 (_FusedBlock)" in msg and "layers.1 (_FusedBlock)" in msg
    assert "attention interface" in msg and "torch.fx" in msg and "scaled_dot_product_attention" in msg
    assert_snapshot_equal(before, snapshot(model))
    assert not any("forward" in vars(m) for m in model.modules())


def test_unsupported_attention_implementation_is_refused():
    model = tiny_llama()
    model.config._attn_implementation_internal = "flex_attention"  # the name is enough to refuse
    before = snapshot(model)
    with pytest.raises(surgery.InjectionError, match="flex_attention"):
        surgery.inject(model, "prefix", n_tokens=4)
    assert_snapshot_equal(before, snapshot(model))
    assert model.config._attn_implementation == "flex_attention"


def test_no_attention_in_targets():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(surgery.InjectionError, match="found no attention module"):
        surgery.inject(model, "prefix", targets="mlp.*", n_tokens=4)
    assert_snapshot_equal(before, snapshot(model))


# ------------------------------------------------------------------ quality


def test_prefix_tuning_learns_a_new_pattern():
    """A tiny Llama learns pairs (x, x+1 mod 16) with all weights, then is frozen; a prefix
    alone teaches it (x, x+5 mod 16). Held-out loss (new random x) on the second token of each pair."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, n = 32, 16
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(LlamaConfig(**{**decoder_kw(), "vocab_size": vocab}))
    g = torch.Generator().manual_seed(0)

    def batch(shift, b=32, gen=g):
        x = torch.randint(0, n, (b, 6), generator=gen)
        return torch.stack((x, (x + shift) % n), -1).reshape(b, 12) + 3

    def loss(ids):
        logits = model(input_ids=ids).logits[:, 0:-1:2]
        return F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1::2].reshape(-1))

    def train(params, shift, steps, lr):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for _ in range(steps):
            opt.zero_grad()
            loss(batch(shift)).backward()
            opt.step()

    train(list(model.parameters()), 1, 200, 3e-3)  # "pretraining" on the first pattern
    model.eval()
    held = batch(5, b=256, gen=torch.Generator().manual_seed(123))
    with torch.no_grad():
        frozen = loss(held).item()
    surgery.inject(model, "prefix", n_tokens=16, name="shift5")
    train([p for p in model.parameters() if p.requires_grad], 5, 300, 5e-2)
    with torch.no_grad():
        tuned = loss(held).item()
        with surgery.disable(model):
            assert loss(held).item() == pytest.approx(frozen)
    assert frozen > 3.0 and tuned < 0.2, (frozen, tuned)


# ------------------------------------------------------------------ encoder-decoders: self-attention only (issue 9)

from tests._helpers import state_bits  # noqa: E402
from tests.models import batch_for, tiny_bart, tiny_t5, tiny_whisper  # noqa: E402

SELF_ATTN = {
    tiny_t5: ["encoder.block.{i}.layer.0.SelfAttention", "decoder.block.{i}.layer.0.SelfAttention"],
    tiny_bart: ["model.encoder.layers.{i}.self_attn", "model.decoder.layers.{i}.self_attn"],
    tiny_whisper: ["model.encoder.layers.{i}.self_attn", "model.decoder.layers.{i}.self_attn"],
}
CROSS = {tiny_t5: "EncDecAttention", tiny_bart: "encoder_attn", tiny_whisper: "encoder_attn"}


@pytest.mark.parametrize("factory", list(SELF_ATTN), ids=lambda f: f.__name__)
def test_encoder_decoder_prefix_on_self_attention_only(factory):
    model = factory()
    x = batch_for(model)
    with torch.no_grad():
        base = _out(model(**x))
    before = snapshot(model)
    inj = surgery.inject(model, "prefix", n_tokens=3, name="p")
    assert sorted(inj.sites) == sorted(t.format(i=i) for t in SELF_ATTN[factory] for i in (0, 1))
    assert not any(CROSS[factory] in s for s in inj.sites)
    with torch.no_grad():
        with surgery.disable(model):  # no prefix: the base, bit for bit
            assert torch.equal(_out(model(**x)), base)
        on = _out(model(**x))
    assert (on - base).abs().max() > 1e-4
    # training reaches the prefixes alone
    model.train()
    _out(model(**x)).float().pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {f"{s}.surgery.p.prefix_{w}" for s in inj.sites for w in ("key", "value")}
    model.eval()
    surgery.remove(model, "p")
    assert_snapshot_equal(before, snapshot(model))


def test_t5_generate_with_cache_equals_greedy_recompute():
    # the decoder's self-attention carries the prefix at every step (with the KV cache); cross-attention none
    model = tiny_t5()
    ids = _ids(batch=2, seq=7)
    surgery.inject(model, "prefix", n_tokens=3, name="p")
    _fill(model, "p", std=1.0)
    n = 5
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, **kw)
        cur = gen.sequences[:, :1]
        for step in range(n):
            logits = model(input_ids=ids, decoder_input_ids=cur, use_cache=False).logits[:, -1]
            torch.testing.assert_close(gen.logits[step], logits, atol=1e-5, rtol=1e-5)
            cur = torch.cat((cur, gen.sequences[:, step + 1 : step + 2]), dim=1)
        with surgery.disable(model):
            plain = model.generate(input_ids=ids, **kw)
    assert (plain.logits[0] - gen.logits[0]).abs().max() > 1e-3  # the prefix does change the decoder


@pytest.mark.parametrize("factory", list(SELF_ATTN), ids=lambda f: f.__name__)
def test_cross_attention_targets_are_refused(factory):
    model = factory()
    before = state_bits(model)
    with pytest.raises(surgery.InjectionError, match="cross-attention .*self-attention only"):
        surgery.inject(model, "prefix", targets=CROSS[factory], n_tokens=2)
    assert not surgery.names(model)
    for k, v in state_bits(model).items():
        assert torch.equal(v, before[k]), k
