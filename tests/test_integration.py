"""Injected transformers models keep working with the rest of the ecosystem: their class,
generate(), save_pretrained / from_pretrained, the Trainer, torch.compile and DDP."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from _helpers import bits, randomize, run, state_bits, train_lm_with_trainer
from models import TinyTransformer, batch_for, tiny_bert, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2

import surgery

FACTORIES = [tiny_gpt2, tiny_bert, tiny_bert_cls, tiny_llama, tiny_qwen2, tiny_mistral]


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_model_class_and_apis_unchanged(factory):
    from transformers import PreTrainedModel

    model = factory()
    cls = type(model)
    x = batch_for(model)
    base = run(model, x)
    inj = surgery.inject(model, "lora", r=4)  # default targets: q and v (or GPT-2's fused qkv)
    assert inj.sites
    assert type(model) is cls and isinstance(model, PreTrainedModel)
    assert model.config is not None and callable(model.save_pretrained)
    assert torch.equal(run(model, x), base)  # B starts at zero
    randomize(model, std=0.5)
    assert not torch.allclose(run(model, x), base, atol=1e-4)
    with surgery.disable(model):
        assert torch.equal(run(model, x), base)


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0, **kw
        )


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=lambda f: f.__name__)
def test_generate_with_delta(factory):
    model = factory()
    ids = batch_for(model)["input_ids"]
    base_gen = _generate(model, ids)
    surgery.inject(model, "lora", targets=["attn.*", "mlp.*"], r=4)
    assert torch.equal(_generate(model, ids), base_gen)  # zero B: same tokens
    randomize(model, std=1.0)
    gen = _generate(model, ids)
    assert gen.shape == base_gen.shape
    assert not torch.equal(gen, base_gen)
    with surgery.disable(model):
        assert torch.equal(_generate(model, ids), base_gen)
    # the KV-cache path agrees with a full recompute at every step
    assert torch.equal(_generate(model, ids, use_cache=False), gen)
    surgery.merge(model)
    assert torch.equal(_generate(model, ids), gen)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert_cls], ids=lambda f: f.__name__)
def test_save_pretrained_while_injected_gives_base(factory, tmp_path):
    model = factory()
    base = state_bits(model)
    surgery.inject(model, "lora", targets=[torch.nn.Linear, "c_attn", "c_fc"], r=4)
    randomize(model, std=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
        fresh = type(model).from_pretrained(tmp_path).float().eval()
    assert type(fresh) is type(model)
    got = state_bits(fresh)
    assert list(got) == list(base)
    bad = [k for k in base if not torch.equal(base[k], got[k])]
    assert not bad, f"loaded weights differ from the base: {bad[:5]}"
    x = batch_for(model)
    with surgery.disable(model):
        assert torch.equal(run(fresh, x), run(model, x))


def test_trainer_trains_only_lora(tmp_path):
    model = tiny_llama()
    surgery.inject(model, "lora", targets=["attn.*", "mlp.*"], r=4)
    base = {n: bits(p) for n, p in model.named_parameters() if ".surgery." not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if ".surgery." in n}
    assert lora
    trainer, result = train_lm_with_trainer(model, tmp_path)
    assert result.global_step == 3
    assert type(trainer.model) is type(model)
    opt_ids = {id(p) for grp in trainer.optimizer.param_groups for p in grp["params"]}
    named = dict(model.named_parameters())
    assert opt_ids <= {id(named[n]) for n in lora}
    for n, b in base.items():
        assert torch.equal(bits(named[n]), b), f"base parameter {n} moved"
    moved = [n for n, t in lora.items() if not torch.equal(named[n].detach(), t)]
    assert len(moved) == len(lora), f"LoRA tensors that did not move: {sorted(set(lora) - set(moved))[:5]}"


def _compile_ok() -> bool:
    return hasattr(torch, "compile") and not os.environ.get("SURGERY_SKIP_COMPILE")


@pytest.mark.skipif(not _compile_ok(), reason="torch.compile unavailable")
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    model = TinyTransformer(dim=32, layers=1)
    x = batch_for(model, batch=2, seq=6)
    surgery.inject(model, "lora", targets=["q", "v", "fc1"], r=2)
    randomize(model, std=0.5)
    eager = run(model, x)
    with surgery.disable(model):
        base = run(model, x)
    assert not torch.allclose(eager, base, atol=1e-4)
    try:
        compiled = torch.compile(model, backend="inductor")
        out = run(compiled, x)
    except Exception as e:  # noqa: BLE001 (a compiler that cannot run here is not this library's bug)
        if (
            "compile" in type(e).__name__.lower()
            or "Backend" in type(e).__name__
            or "InductorError" in type(e).__name__
        ):
            pytest.skip(f"inductor unavailable here: {type(e).__name__}: {e}")
        raise
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    # the active set is read at run time, also by the compiled model
    with surgery.disable(model):
        torch.testing.assert_close(run(compiled, x), base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(compiled, x), eager, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------- DDP on two CPU processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        model = tiny_llama().train()
        surgery.inject(model, "lora", targets=["q_proj", "v_proj", "down_proj"], r=4)
        randomize(model, std=0.1, seed=rank + 10)  # different per rank: DDP must broadcast rank 0's
        ddp = DDP(model)
        lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert lora and all(".surgery." in n for n, _ in lora)

        g = torch.Generator().manual_seed(100 + rank)  # each rank sees other data
        ids = torch.randint(3, 128, (2, 10), generator=g)

        def loss_fn(m):
            logits = m(input_ids=ids).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

        # local gradient, without synchronisation
        with ddp.no_sync():
            loss_fn(ddp).backward()
        local = torch.cat([p.grad.flatten() for _, p in lora])
        for _, p in lora:
            p.grad = None
        # synchronised gradient
        loss_fn(ddp).backward()
        synced = torch.cat([p.grad.flatten() for _, p in lora])
        for n, p in model.named_parameters():
            if ".surgery." not in n:
                assert p.grad is None, f"rank {rank}: base parameter {n} got a gradient"

        gathered_local = [torch.empty_like(local) for _ in range(world)]
        gathered_synced = [torch.empty_like(synced) for _ in range(world)]
        dist.all_gather(gathered_local, local)
        dist.all_gather(gathered_synced, synced)
        assert not torch.allclose(gathered_local[0], gathered_local[1]), "ranks must see different data"
        assert torch.equal(gathered_synced[0], gathered_synced[1]), "LoRA gradients differ across ranks"
        torch.testing.assert_close(synced, torch.stack(gathered_local).mean(0), atol=1e-6, rtol=1e-5)

        opt = torch.optim.SGD([p for _, p in lora], lr=0.1)
        opt.step()
        after = torch.cat([p.detach().flatten() for _, p in lora])
        gathered = [torch.empty_like(after) for _ in range(world)]
        dist.all_gather(gathered, after)
        assert torch.equal(gathered[0], gathered[1]), "LoRA weights diverged across ranks after a step"
        dist.barrier()  # nobody tears gloo down while the other rank still talks to it
    finally:
        dist.destroy_process_group()
    # Every check passed. On a loaded machine gloo's threads can abort the interpreter's own
    # teardown ("terminate called without an active exception", SIGABRT) after this point;
    # leave without it.
    os._exit(0)


@pytest.mark.slow
def test_ddp_two_processes_lora_grads_agree():
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_ddp_worker, args=(2, _free_port()), nprocs=2, join=True)


# ---------------------------------------------------------------- gradient checkpointing


def _grads_with_checkpointing(factory, targets, method: str, kw: dict, reentrant: bool | None) -> list[dict]:
    """Gradients of the injected tensors over two training steps on a fresh model, checkpointed
    (from its very first forward) unless `reentrant` is None."""
    model = factory()
    surgery.inject(model, method, targets=targets, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero everywhere (B and the adapters' up start at zero, hiding bugs)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    if reentrant is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation of gradient_checkpointing_enable's name
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    steps = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks in both runs
        out = model(input_ids=ids)
        (out.logits if hasattr(out, "logits") else out.last_hidden_state).pow(2).mean().backward()
        # (BERT's pooler takes no part in this loss: its LoRA has no gradient either way)
        steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return steps


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize(
    ("factory", "targets", "method", "kw"),
    [
        (tiny_llama, "@attn", "lora", {"r": 4}),  # q, k, v, o share a parent: o leaves the shared-input group
        (tiny_llama, "attn.*", "lora", {"r": 4}),
        (tiny_llama, "@linear", "lora", {"r": 4}),
        (tiny_gpt2, "@attn", "lora", {"r": 4}),
        (tiny_bert, "@linear", "lora", {"r": 4}),
        (tiny_llama, None, "adapter", {"style": "houlsby", "bottleneck": 8}),
        (tiny_bert, None, "adapter", {"style": "parallel", "bottleneck": 8}),  # reads the FFN's input: a tap
    ],
    ids=["llama-attn", "llama-attn.*", "llama-linear", "gpt2-attn", "bert-linear", "llama-houlsby", "bert-parallel"],
)
def test_gradient_checkpointing_gives_the_same_gradients(factory, targets, method, kw, reentrant):
    """Checkpointing replays each layer's forward in backward; the replay must run the very
    same operations (it raised torch's CheckpointError when the shared-input LoRA group
    shrank during the first forward). Gradients equal those without checkpointing."""
    want = _grads_with_checkpointing(factory, targets, method, kw, None)
    got = _grads_with_checkpointing(factory, targets, method, kw, reentrant)
    for w, g in zip(want, got, strict=True):
        assert list(w) == list(g), f"tensors without a gradient under checkpointing: {sorted(set(w) - set(g))[:5]}"
        assert len(w) >= 8
        for n in w:
            torch.testing.assert_close(g[n], w[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_trainer_with_gradient_checkpointing(tmp_path, reentrant, monkeypatch):
    """The Trainer's own gradient_checkpointing=True (it calls gradient_checkpointing_enable, which
    in transformers 5 also makes the embeddings' output require grad, as PEFT does)."""
    from transformers import TrainingArguments

    init = TrainingArguments.__init__

    def with_checkpointing(self, *a, **k):  # type: ignore[no-untyped-def]
        k.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        init(self, *a, **k)

    monkeypatch.setattr(TrainingArguments, "__init__", with_checkpointing)
    model = tiny_llama()
    surgery.inject(model, "lora", targets="attn.*", r=4)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer, result = train_lm_with_trainer(model, tmp_path)
    assert trainer.args.gradient_checkpointing and result.global_step == 3
    named = dict(model.named_parameters())
    still = [n for n, t in lora.items() if torch.equal(named[n].detach(), t)]
    assert not still, f"LoRA tensors that did not train under checkpointing: {still[:5]}"


# ---------------------------------------------------------------- Parallel and generate()


def test_parallel_inside_generate_refuses_and_batchsplit_generates():
    """Parallel repeats the batch once per delta: generate() cannot take that many rows back.
    It refuses at the first step; repeating the prompts and BatchSplit does what was meant."""
    from surgery.errors import CompositionError

    model = tiny_llama()
    for i, name in enumerate("ab"):
        surgery.inject(model, "lora", targets="attn.*", r=4, name=name)
        randomize(model, name, seed=i + 1, std=0.5)
    ids = batch_for(model)["input_ids"]
    with surgery.use(model, surgery.Parallel("a", "b")):
        assert run(model, ids).shape[0] == 2 * ids.shape[0]  # a plain forward still works
        for kw in ({}, {"use_cache": False}):
            with pytest.raises(CompositionError) as ei:
                _generate(model, ids, **kw)
            assert "generate()" in str(ei.value) and "BatchSplit" in str(ei.value)
    b = ids.shape[0]
    with surgery.use(model, surgery.BatchSplit("a", "b", batch_sizes=[b, b])):
        both = _generate(model, ids.repeat(2, 1))
    for i, name in enumerate("ab"):
        with surgery.use(model, name):
            assert torch.equal(both[i * b : (i + 1) * b], _generate(model, ids))


# ---------------------------------------------------------------- save_pretrained writes the base


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("merged", [False, True], ids=["live", "merged"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert_cls], ids=lambda f: f.__name__)
def test_save_pretrained_writes_the_base_alone_and_reloads_quietly(factory, merged, tmp_path):
    from safetensors import safe_open

    from surgery import engine

    model = factory()
    base = state_bits(model)
    x = batch_for(model)
    want = run(model, x)
    # (GPT-2's lm_head is tied to its embeddings: a merge there is refused, so not a target)
    surgery.inject(model, "lora", targets=["c_attn", "c_fc"] if factory is tiny_gpt2 else torch.nn.Linear, r=4)
    randomize(model, std=0.5)
    if merged:
        surgery.merge(model)
    assert any(".surgery." in k for k in model.state_dict())  # state_dict keeps the adapters (Trainer, DDP)
    injected = run(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if ".surgery." in k]
    assert torch.equal(run(model, x), injected)  # saving touched nothing
    records = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(model).from_pretrained(tmp_path).float().eval()
    finally:
        hf_logger.removeHandler(records)
    noisy = [m for m in records.messages if "UNEXPECTED" in m or "unexpected" in m.lower()]
    assert not noisy, noisy[0]
    got = state_bits(fresh)
    bad = [k for k in base if not torch.equal(base[k], got[k])]
    assert not bad, f"reloaded weights differ from the base: {bad[:5]}"
    assert torch.equal(run(fresh, x), want)
    # the caller's own state_dict (the Trainer's checkpoints) is written as given
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "full", state_dict=model.state_dict())
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as f:
        assert any(".surgery." in k for k in f.keys())
    assert engine.base_state_dict(model).keys() == {k for k in model.state_dict() if ".surgery." not in k}
    surgery.remove(model)
    assert "save_pretrained" not in model.__dict__


# ---------------------------------------------------------------- dtype after injection


def test_to_half_precision_after_injection_casts_adapters_too():
    """`.to(dtype)` casts every parameter, the adapters included (as PEFT's do): documented in
    docs/engine.md. fp32 adapters on a bf16 base come from injecting into (or applying a Delta to)
    the bf16 base."""
    model = tiny_llama()
    x = batch_for(model)
    surgery.inject(model, "lora", targets="attn.*", r=4)
    randomize(model, std=0.5)
    want = run(model, x)
    model.to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.bfloat16}
    out = model(**x).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in trainable)
    torch.testing.assert_close(out.detach().float(), want, atol=0.1, rtol=0.05)
    # the recipe for fp32 adapters on a bf16 base: take the delta, remove, cast, apply
    model.zero_grad(set_to_none=True)
    model.float()
    d = surgery.delta(model)
    surgery.remove(model)
    model.to(torch.bfloat16)
    surgery.apply(model, d)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    torch.testing.assert_close(run(model, x).float(), want, atol=0.1, rtol=0.05)


def test_cast_while_merged_refuses_to_unmerge():
    from surgery.errors import MergeError

    model = tiny_llama()
    surgery.inject(model, "lora", targets="attn.*", r=4)
    randomize(model, std=0.5)
    surgery.merge(model)
    model.to(torch.bfloat16)
    with pytest.raises(MergeError, match="cast"):
        surgery.unmerge(model)
    assert surgery.merged(model) == ["default"]
