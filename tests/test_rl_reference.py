"""surgery.rl.reference: every delta off (each kind), checked against merged deltas, a trained base,
strangers in the module tree and in-place edits; context-local, nested, under DDP."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from models import batch_for, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import surgery
from surgery.rl.reference import ReferenceCheckError, check, forget, reference

# method, config, factory: every kind of delta, on a model it fits
KINDS = [
    ("lora", {"r": 4}, tiny_llama),
    ("dora", {"r": 4}, tiny_llama),
    ("adapter", {"bottleneck": 8}, tiny_llama),
    ("ia3", {}, tiny_llama),
    ("vera", {"r": 8}, tiny_llama),
    ("loha", {"r": 4}, tiny_llama),
    ("lokr", {"r": 4}, tiny_llama),
    ("bitfit", {}, tiny_llama),
    ("bitfit", {}, tiny_gpt2),  # biases of the base's own (GPT-2 has them): never trained in place
    ("sparse", {"density": 0.05}, tiny_llama),
    ("diffpruning", {"sparsity": 0.05}, tiny_llama),
    ("moe", {"experts": 2}, tiny_llama),
    ("lora_moe", {"experts": 2, "r": 4}, tiny_llama),
    ("prefix", {"n_tokens": 4}, tiny_llama),
    ("prompt", {"n_tokens": 4}, tiny_llama),
    ("prompt", {"n_tokens": 4}, tiny_bert),
]


def _perturb(model: nn.Module, name: str) -> None:
    """Non-zero delta tensors, so the delta changes the output (most start as the identity)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ad in surgery.engine.adapters(model, name).values():
            for p in ad.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _out(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        o = model(**batch)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("method,cfg,factory", KINDS, ids=[f"{m}-{f.__name__}" for m, _, f in KINDS])
def test_every_kind_is_off_and_exact(method, cfg, factory):
    model = factory()
    pristine = copy.deepcopy(model)
    batch = batch_for(model)
    surgery.inject(model, method, name="d", **cfg)
    _perturb(model, "d")
    assert not torch.equal(_out(model, batch), _out(pristine, batch))  # the delta does something
    with reference(model):
        assert torch.equal(_out(model, batch), _out(pristine, batch))
    assert not torch.equal(_out(model, batch), _out(pristine, batch))  # and is back afterwards


def test_fusion_and_heads_are_off():
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    batch = batch_for(model)
    surgery.inject(model, "adapter", name="a", bottleneck=8)
    surgery.inject(model, "adapter", name="b", bottleneck=8)
    for n in ("a", "b"):
        _perturb(model, n)
    surgery.fuse(model, ["a", "b"])
    _perturb(model, "fusion")
    surgery.heads(model, {"score": 1})
    assert not torch.equal(_out(model, batch), _out(pristine, batch))
    assert model(**batch, task="score").logits.shape == (2, 1)
    with reference(model):
        assert torch.equal(_out(model, batch), _out(pristine, batch))
        with pytest.raises(surgery.ConfigError, match="not active"):  # a head reads no reference output
            model(**batch, task="score")


def test_generate_equals_the_base():
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    surgery.inject(model, "lora", r=4, name="policy")
    surgery.inject(model, "prompt", n_tokens=3, name="p")
    for n in ("policy", "p"):
        _perturb(model, n)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = pristine.generate(ids, **kw)
    assert not torch.equal(model.generate(ids, **kw), want)
    with reference(model):
        assert torch.equal(model.generate(ids, **kw), want)


def test_plain_model_no_op_and_nesting():
    model = tiny_llama()
    batch = batch_for(model)
    want = _out(model, batch)
    with reference(model):
        assert torch.equal(_out(model, batch), want)
    surgery.inject(model, "lora", r=4, name="a")
    _perturb(model, "a")
    with reference(model):
        with reference(model):
            assert torch.equal(_out(model, batch), want)
        assert torch.equal(_out(model, batch), want)
        with surgery.use(model, "a"):  # an explicit choice inside still wins
            assert not torch.equal(_out(model, batch), want)
    assert surgery.active(model) == ("a",)


def test_refuses_merged_delta():
    model = tiny_llama()
    surgery.inject(model, "lora", r=4, name="a")
    _perturb(model, "a")
    surgery.merge(model, "a")
    with pytest.raises(ReferenceCheckError, match="merged.*unmerge"), reference(model):
        pass
    surgery.unmerge(model, "a")
    with reference(model):
        pass


def test_refuses_base_trained_in_place():
    model = tiny_gpt2()
    surgery.inject(model, "lora", r=4, name="a")
    model.transformer.h[0].attn.c_attn.bias.requires_grad_(True)  # biases trained in place (TRL's failure)
    with pytest.raises(ReferenceCheckError, match=r"require grad.*bitfit"), reference(model):
        pass


def test_refuses_parameters_it_does_not_know():
    model = tiny_llama()
    surgery.inject(model, "lora", r=4, name="a")
    layer = model.model.layers[0].self_attn.q_proj
    layer.extra = nn.Linear(4, 4)  # a module added by hand after injection: no delta of surgery's
    layer.extra.requires_grad_(False)
    with pytest.raises(ReferenceCheckError, match="q_proj.extra.*added after"), reference(model):
        pass


def test_refuses_a_wrapper_holding_a_stranger_and_switches_off_inner_deltas():
    inner = tiny_llama()
    pristine = copy.deepcopy(inner)
    batch = batch_for(inner)
    surgery.inject(inner, "lora", r=4, name="a")
    _perturb(inner, "a")

    class Wrapper(nn.Module):  # deltas inside a wrapped model (TRL PR #6527: hidden by a wrapper)
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return self.m(**kw)

    w = Wrapper(inner)
    with reference(w):
        assert torch.equal(_out(w, batch), _out(pristine, batch))
    w.v_head = nn.Linear(64, 1)
    w.v_head.requires_grad_(False)
    with pytest.raises(ReferenceCheckError, match="v_head"), reference(w):
        pass


def test_refuses_peft_layers():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ReferenceCheckError, match="PEFT"), reference(model):
        pass


def test_weights_hashed_once_and_in_place_edits_refused():
    model = tiny_llama()
    surgery.inject(model, "lora", r=4, name="a")
    with reference(model):
        pass
    first = check(model)
    assert first is not None and first.hashed == first.tensors > 0 and first.entries == 1
    for _ in range(3):
        with reference(model):
            pass
    assert check(model).hashed == first.tensors and check(model).entries == 4  # no re-hash: versions unchanged
    _perturb(model, "a")
    surgery.merge(model, "a")
    surgery.unmerge(model, "a")  # bit-exact: versions moved, the hash did not
    with reference(model):
        pass
    assert first.tensors < check(model).hashed < 2 * first.tensors  # only the moved tensors
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    with pytest.raises(ReferenceCheckError, match="changed in place.*up_proj"), reference(model):
        pass
    forget(model)
    with reference(model):
        pass


def test_a_4bit_base_is_exact_and_its_quantisation_state_watched():
    pytest.importorskip("bitsandbytes")
    from surgery.quantize import quantize

    model = tiny_llama()
    quantize(model, "nf4")
    batch = batch_for(model)
    want = _out(model, batch)
    surgery.inject(model, "prompt", n_tokens=3, name="p")
    _perturb(model, "p")
    assert not torch.equal(_out(model, batch), want)
    with reference(model):
        assert torch.equal(_out(model, batch), want)
    w = model.model.layers[0].self_attn.q_proj.weight
    w.quant_state.state2.absmax.mul_(2)  # the double-quantised absmax is part of the base
    with pytest.raises(ReferenceCheckError, match=r"q_proj.weight.quant_state.state2.absmax"), reference(model):
        pass


def test_context_local_another_thread_keeps_its_deltas():
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    batch = batch_for(model)
    surgery.inject(model, "lora", r=4, name="a")
    _perturb(model, "a")
    with_delta = _out(model, batch)
    inside, got = threading.Event(), {}

    def other():
        inside.wait()
        got["out"] = _out(model, batch)

    t = threading.Thread(target=other)
    t.start()
    with reference(model):
        inside.set()
        t.join()
        assert torch.equal(_out(model, batch), _out(pristine, batch))
    assert torch.equal(got["out"], with_delta)


def test_under_ddp(tmp_path):
    import torch.distributed as dist

    model = tiny_llama()
    pristine = copy.deepcopy(model)
    batch = batch_for(model)
    surgery.inject(model, "lora", r=4, name="a")
    _perturb(model, "a")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert not torch.equal(_out(ddp, batch), _out(pristine, batch))
        with reference(ddp):
            assert torch.equal(_out(ddp, batch), _out(pristine, batch))
        with reference(ddp):  # DDP's buffer broadcasts leave the base as it was
            pass
        assert check(ddp) is check(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_torch_compile():
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    batch = batch_for(model)
    surgery.inject(model, "lora", r=4, name="a")
    _perturb(model, "a")
    compiled = torch.compile(model, backend="eager")
    with_delta = _out(compiled, batch)
    with reference(compiled):
        assert torch.equal(_out(compiled, batch), _out(pristine, batch))
    assert torch.equal(_out(compiled, batch), with_delta)
    assert check(compiled) is check(model)


def test_a_replaced_base_tensor_is_rehashed():
    model = tiny_llama()
    with reference(model):
        pass
    n = check(model).hashed
    lin = model.model.layers[0].mlp.down_proj
    lin.weight = nn.Parameter(lin.weight.detach() + 1.0)  # a new tensor (fresh _version) under the same name
    with pytest.raises(ReferenceCheckError, match="changed in place.*down_proj"), reference(model):
        pass
    assert check(model).hashed == n + 1
    forget(model)
    with reference(model):
        pass
    model.extra = nn.Linear(2, 2)  # a plain model: no injection record, so the first reference()'s names are the base
    with pytest.raises(ReferenceCheckError, match=r"tensors changed.*new: \['extra.bias', 'extra.weight'\]"):
        with reference(model):
            pass


def test_kept_deltas_stay_on_and_every_other_is_off():
    model = tiny_llama()
    batch = batch_for(model)
    surgery.inject(model, "lora", r=4, name="sft")
    surgery.inject(model, "prompt", n_tokens=3, name="p")
    surgery.inject(model, "adapter", bottleneck=8, name="style")
    for n in ("sft", "p", "style"):
        _perturb(model, n)
    with surgery.use(model, "sft"):
        want = _out(model, batch)
    with surgery.use(model, "sft", "style"):
        want_two = _out(model, batch)
    with surgery.disable(model):
        base = _out(model, batch)
    assert not torch.equal(want, base)
    with reference(model, "sft"):
        assert torch.equal(_out(model, batch), want)
        with reference(model):  # nested: the base alone
            assert torch.equal(_out(model, batch), base)
    with reference(model, "sft", "style"):
        assert torch.equal(_out(model, batch), want_two)
    with pytest.raises(ReferenceCheckError, match=r"no delta 'sfx'.*injected: \['p', 'sft', 'style'\]"):
        with reference(model, "sfx"):
            pass
    with pytest.raises(surgery.ConfigError, match="distinct names"), reference(model, "sft", "sft"):
        pass


def test_a_kept_delta_trained_in_place_is_refused_and_a_copy_is_the_way():
    model = tiny_llama()
    batch = batch_for(model)
    surgery.inject(model, "lora", r=4, name="sft")
    _perturb(model, "sft")
    with reference(model, "sft"):
        want = _out(model, batch)
    surgery.apply(model, surgery.delta(model, "sft"), name="policy")  # TRL's "load the adapter twice"
    with surgery.use(model, "policy"):
        assert torch.equal(_out(model, batch), want)  # the copy starts as the reference
    _perturb(model, "policy")  # training the copy leaves the reference where it was
    with reference(model, "sft"):
        assert torch.equal(_out(model, batch), want)
    _perturb(model, "sft")  # training the kept delta itself is refused
    with pytest.raises(ReferenceCheckError, match=r"delta 'sft' kept on.*changed.*Train a copy"):
        with reference(model, "sft"):
            pass
    with reference(model):  # the base alone is still the base
        pass
    forget(model)
    with reference(model, "sft"):
        assert not torch.equal(_out(model, batch), want)


def test_a_kept_delta_may_be_merged_but_no_other():
    model = tiny_llama()
    batch = batch_for(model)
    surgery.inject(model, "lora", r=4, name="sft")
    surgery.inject(model, "lora", r=4, name="policy")
    for n in ("sft", "policy"):
        _perturb(model, n)
    with surgery.use(model, "sft"):
        want = _out(model, batch)
    surgery.merge(model, "sft")  # before the first reference(): the merged weights are the ones watched
    with reference(model, "sft"):
        torch.testing.assert_close(_out(model, batch), want, rtol=0, atol=1e-5)
    with pytest.raises(ReferenceCheckError, match=r"\['sft'\] are merged"), reference(model):
        pass


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_bert], ids=["gpt2", "bert"])
def test_kept_bitfit_delta_on_other_architectures(factory):
    model = factory()
    batch = batch_for(model)
    surgery.inject(model, "bitfit", name="sft")
    surgery.inject(model, "lora", r=4, name="pol")
    for n in ("sft", "pol"):
        _perturb(model, n)
    with surgery.use(model, "sft"):
        want = _out(model, batch)
    with reference(model, "sft"):
        assert torch.equal(_out(model, batch), want)
    with reference(model):
        assert not torch.equal(_out(model, batch), want)
