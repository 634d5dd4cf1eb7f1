"""Every delta that trains, under DDP and under FSDP2 (`fully_shard` per decoder layer and the root; frozen
base, trainable delta), on two CPU processes with gloo: the losses and the final delta equal a single-process
run on the same global batch (each rank trains on its half), to 1e-5 in fp32; under FSDP2 also a bf16 base
and an NF4 (QLoRA) base with fp32 LoRA factors, whose base bytes per rank stay packed and halved. ONE spawn
per backend runs every method in sequence; the single-process references are computed
in the parent. The checks are per (backend, method) tests over the results the spawn wrote.

What each rank does is what a user writes: build the model, ``surgery.inject(...)`` (or ``heads``,
``SparseFinetune``), then wrap (``DistributedDataParallel(model)`` / ``fully_shard(layer)`` for each layer and
``fully_shard(model)``), then an ordinary loop."""

from __future__ import annotations

import importlib.util
import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
from models import VOCAB, tiny_llama

import surgery

WORLD, STEPS, BATCH, SEQ, LR = 2, 3, 4, 8, 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- the cases
# Each builder injects into a fresh tiny Llama as a user would and returns (delta name, forward kind).
# "lm": the causal LM loss on the ids; "cls": a sequence head's cross-entropy on 3 labels.


def _lora(m):
    surgery.inject(m, "lora", targets=["q_proj", "v_proj", "down_proj"], r=4, name="d")
    return "d", "lm"


def _dora(m):
    surgery.inject(m, "dora", targets=["q_proj", "v_proj"], r=4, name="d")
    return "d", "lm"


def _ia3(m):
    surgery.inject(m, "ia3", targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"], name="d")
    return "d", "lm"


def _houlsby(m):
    surgery.inject(m, "adapter", style="houlsby", bottleneck=8, name="d")
    return "d", "lm"


def _prefix(m):
    surgery.inject(m, "prefix", n_tokens=4, name="d")
    return "d", "lm"


def _prompt(m):
    surgery.inject(m, "prompt", n_tokens=4, init="random", name="d")
    return "d", "lm"


def _bitfit(m):
    surgery.inject(m, "bitfit", name="d")
    return "d", "lm"


def _sparse(m):
    surgery.inject(m, "sparse", targets=["q_proj", "o_proj", "up_proj"], density=0.05, name="d")
    return "d", "lm"


def _diffpruning(m):  # training-mode gates are sampled: every run seeds each step the same way
    surgery.inject(m, "diffpruning", targets=["q_proj", "v_proj"], sparsity=0.05, name="d")
    return "d", "lm"


def _sft(m):
    """SparseFinetune: the full phase and select() on the unsharded model (the same on every rank), then
    the sparse phase (only the selected entries train) is the distributed part."""
    from surgery.sparse_finetune import SparseFinetune

    sft = SparseFinetune(m, targets=["q_proj", "up_proj"], density=0.02, name="d")
    ids = _batch(99)[0]
    sft.full_phase(lambda mm: mm(input_ids=ids, labels=ids).loss, steps=1)
    sft.select()
    return "d", "lm"


def _heads(m):
    from surgery.recipes.heads import heads

    heads(m, {"cls": 3}, name="d")
    surgery.inject(m, "lora", targets=["q_proj", "v_proj"], r=4, name="l")  # a LoRA trains with the head
    return "d", "cls"


CASES: dict[str, Callable[[Any], tuple[str, str]]] = {
    "lora": _lora,
    "dora": _dora,
    "ia3": _ia3,
    "adapter-houlsby": _houlsby,
    "prefix": _prefix,
    "prompt": _prompt,
    "bitfit": _bitfit,
    "sparse": _sparse,
    "diffpruning": _diffpruning,
    "sparse_finetune": _sft,
    "heads": _heads,
}
BF16 = "lora-bf16-base"  # FSDP2 only: a bf16 base with fp32 LoRA factors
NF4 = "qlora-nf4-base"  # FSDP2 only: QLoRA, the linear weights in bitsandbytes NF4 (uint8 storage, sharded)
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _build(case: str) -> tuple[torch.nn.Module, str, str]:
    model = tiny_llama()
    if case in (BF16, NF4):
        if case == BF16:
            model.to(torch.bfloat16)
        else:
            surgery.quantize(model, "nf4")
        surgery.inject(model, "lora", targets=["q_proj", "v_proj", "down_proj"], r=4, name="d")  # fp32 factors
        name, kind = "d", "lm"
    else:
        name, kind = CASES[case](model)
    model.train()
    return model, name, kind


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().clone()


def _delta(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The delta's tensors: on a sharded model `surgery.delta` gathers the full tensors (every rank calls it)."""
    from torch.distributed.tensor import DTensor

    tensors = surgery.delta(model, name).tensors
    assert not any(isinstance(t, DTensor) for t in tensors.values()), "surgery.delta returned shards"
    return {k: v.detach().float().clone() for k, v in sorted(tensors.items())}


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _train(model, forward_model, kind: str, rows: slice, steps: range, opt) -> list[float]:
    losses = []
    for s in steps:
        ids, y = _batch(s)
        ids, y = ids[rows], y[rows]
        torch.manual_seed(1000 + s)  # DiffPruning's sampled gates: the same noise on every rank and run
        if kind == "lm":
            loss = forward_model(input_ids=ids, labels=ids).loss
        else:
            loss = forward_model(input_ids=ids, task="cls", labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().float())
    return losses


def _reference(case: str) -> dict[str, Any]:
    model, name, kind = _build(case)
    init = _delta(model, name)
    opt = torch.optim.AdamW(_trainable(model), lr=LR)
    losses = _train(model, model, kind, slice(None), range(STEPS), opt)
    return {"losses": torch.stack(losses), "delta": _delta(model, name), "init": init}


# ---------------------------------------------------------------------------------------------- the workers


def _wrap(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    if backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _local_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds: parameters (local shards), gradients, optimizer state."""
    from torch.distributed.tensor import DTensor

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(size(p) for p in model.parameters())
    grads = sum(size(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(size(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    return {"params": params, "grads": grads, "optimizer": state}


def _worker(rank: int, port: int, backend: str, cases: list[str], folder: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    try:
        for case in cases:
            out: dict[str, Any] = {}
            try:
                model, name, kind = _build(case)
                wrapped = _wrap(model, backend)
                opt = torch.optim.AdamW(_trainable(model), lr=LR)
                losses = torch.stack(_train(model, wrapped, kind, rows, range(STEPS), opt))
                local = losses.clone()
                dist.all_reduce(losses)
                out = {"losses": losses / WORLD, "local": local, "delta": _delta(model, name)}
                # memory after a step, gradients as they are before zero_grad: one more forward/backward
                _train(model, wrapped, kind, rows, range(STEPS, STEPS + 1), _NoStep(opt))
                out["bytes"] = _local_bytes(model, opt)
            except Exception:  # recorded for the parent to report; the next case runs in step
                out = {"error": traceback.format_exc()}
            if rank == 0:
                torch.save(out, os.path.join(folder, f"{backend}-{case}.pt"))
            dist.barrier()
        if backend == "fsdp2":  # the checkpoints' uninterrupted runs and saves (one spawn fewer)
            _ckpt_phase(rank, "first", folder)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown on a loaded machine


class _NoStep:
    """An optimizer stand-in that keeps the gradients (for counting their bytes)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def step(self) -> None:
        pass

    def zero_grad(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- the tests

BACKENDS = {"ddp": list(CASES), "fsdp2": [*CASES, BF16, *([NF4] if HAS_BNB else [])]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    folder = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    refs = {case: _reference(case) for case in BACKENDS["fsdp2"]}
    for backend, cases in BACKENDS.items():
        mp.spawn(_worker, args=(_free_port(), backend, cases, str(folder)), nprocs=WORLD, join=True)
    got = {
        (b, c): torch.load(folder / f"{b}-{c}.pt", weights_only=True) for b, cases in BACKENDS.items() for c in cases
    }
    return refs, got, folder


@pytest.mark.parametrize("backend,case", [(b, c) for b, cases in BACKENDS.items() for c in cases])
def test_trains_as_one_process(runs, backend, case):
    refs, got, _ = runs
    out, ref = got[backend, case], refs[case]
    assert "error" not in out, f"{case} under {backend} failed on rank 0:\n{out.get('error')}"
    # bf16 base: bf16 activations of half-batch matmuls (measured 4.5e-5); NF4: bitsandbytes' 4-bit matmul
    # sums in another order for a half batch (measured 1.1e-5 on one entry of 512)
    tol = {BF16: 2e-4, NF4: 1e-4}.get(case, 1e-5)
    torch.testing.assert_close(out["losses"], ref["losses"], rtol=tol, atol=tol)
    assert not torch.allclose(out["local"], ref["losses"], rtol=1e-3, atol=1e-3), "rank 0 did not see half a batch"
    assert out["delta"].keys() == ref["delta"].keys()
    # AdamW (lr 1e-2, 3 steps: up to 3e-2 per entry) divides by sqrt(v): where a gradient is near 0, a
    # 1e-7 change from a half batch's matmul summing in another (CPU-dependent) order moves that entry
    # by up to 2.6e-5 (measured on an AVX512-FP16 Xeon); 1e-4 is 0.3 % of an entry's possible travel
    dtol = max(tol, 1e-4)
    for k, v in ref["delta"].items():
        torch.testing.assert_close(out["delta"][k], v, rtol=dtol, atol=dtol, msg=lambda m, k=k: f"{k}: {m}")
    # it trained: the delta moved from its initial value
    assert any(not torch.equal(ref["init"][k], v) for k, v in ref["delta"].items() if v.is_floating_point())


def test_fsdp2_shards_params_grads_and_optimizer(runs):
    """Per rank, FSDP2 holds about half the parameter bytes of DDP (the frozen base is sharded) and half
    the delta's gradient and optimizer bytes."""
    _, got, _ = runs
    ddp, fsdp = got["ddp", "lora"]["bytes"], got["fsdp2", "lora"]["bytes"]
    assert 0.45 < fsdp["params"] / ddp["params"] < 0.56, (fsdp, ddp)
    assert 0.45 < fsdp["grads"] / ddp["grads"] < 0.56, (fsdp, ddp)
    assert 0.45 < fsdp["optimizer"] / ddp["optimizer"] < 0.56, (fsdp, ddp)
    if HAS_BNB:  # QLoRA keeps its saving under FSDP2: the NF4 storage is sharded, never upcast
        nf4 = got["fsdp2", NF4]["bytes"]
        assert nf4["params"] < 0.6 * fsdp["params"], (nf4, fsdp)
        assert nf4["grads"] == fsdp["grads"] and nf4["optimizer"] == fsdp["optimizer"], (nf4, fsdp)


# ---------------------------------------------------------------------------------------------- checkpoints
# torch.distributed.checkpoint of a sharded (FSDP2) model with a LoRA delta and its optimizer: saved at step
# CUT, resumed in fresh processes, the final weights equal an uninterrupted run bit for bit. "lora": only
# the trainable tensors are saved (ignore_frozen_params); "schedule": a surgery.Schedule unfreezes layer 0's
# LoRA at step 2 (top block first), the whole state is saved and the plan's state beside it.

CKPT_STEPS, CUT = 4, 2


def _ckpt_build(case: str):
    from torch.distributed.fsdp import fully_shard

    from surgery.recipes.schedule import Schedule

    model = tiny_llama()
    surgery.inject(model, "lora", targets=["q_proj", "v_proj"], r=4, name="d")
    model.train()
    plan = None
    if case == "schedule":  # built on the unsharded model (its depths come from the graph), used after sharding
        plan = Schedule(model, lr=LR, layer_decay=0.7).unfreeze("top", every=2)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = plan.optimizer(torch.optim.AdamW) if plan else torch.optim.AdamW(_trainable(model), lr=LR)
    return model, plan, opt


def _ckpt_train(model, plan, opt, steps: range, rank: int) -> None:
    for s in steps:
        if plan is not None:
            plan.step(s)
        ids = _batch(s)[0][rank * BATCH // WORLD : (rank + 1) * BATCH // WORLD]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _ckpt_options(case: str):
    """For "lora": the trainable tensors only (the frozen base comes from its own weights), loaded non-strict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=case == "lora", strict=case != "lora")


def _ckpt_phase(rank: int, phase: str, folder: str) -> None:
    import json

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    for case in ("lora", "schedule"):
        out: dict[str, Any] = {}
        where = os.path.join(folder, case)
        try:
            if phase == "first":
                model, plan, opt = _ckpt_build(case)
                _ckpt_train(model, plan, opt, range(CKPT_STEPS), rank)
                out["full"] = {n: _full(p) for n, p in model.named_parameters()}
                model, plan, opt = _ckpt_build(case)
                _ckpt_train(model, plan, opt, range(CUT), rank)
                msd, osd = get_state_dict(model, opt, options=_ckpt_options(case))
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=where)
                if plan is not None and rank == 0:
                    with open(where + ".schedule.json", "w") as f:
                        json.dump(plan.state_dict(), f)
            else:
                model, plan, opt = _ckpt_build(case)
                if plan is not None:  # first: requires_grad as at the cut, so the optimizer's state matches
                    with open(where + ".schedule.json") as f:
                        plan.load_state_dict(json.load(f))
                msd, osd = get_state_dict(model, opt, options=_ckpt_options(case))
                state = {"model": msd, "optim": osd}
                dcp.load(state, checkpoint_id=where)
                set_state_dict(
                    model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                    options=_ckpt_options(case),
                )  # fmt: skip
                _ckpt_train(model, plan, opt, range(CUT, CKPT_STEPS), rank)
                out["resumed"] = {n: _full(p) for n, p in model.named_parameters()}
        except Exception:
            out = {"error": traceback.format_exc()}
        if rank == 0:
            torch.save(out, os.path.join(folder, f"{phase}-{case}.pt"))
        dist.barrier()


def _ckpt_worker(rank: int, port: int, folder: str) -> None:
    """The resumed half, in fresh processes."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        _ckpt_phase(rank, "resume", folder)
    finally:
        dist.destroy_process_group()
    os._exit(0)


def _ckpt_reference(case: str) -> dict[str, torch.Tensor]:
    from surgery.recipes.schedule import Schedule

    model = tiny_llama()
    surgery.inject(model, "lora", targets=["q_proj", "v_proj"], r=4, name="d")
    model.train()
    plan = Schedule(model, lr=LR, layer_decay=0.7).unfreeze("top", every=2) if case == "schedule" else None
    opt = plan.optimizer(torch.optim.AdamW) if plan else torch.optim.AdamW(_trainable(model), lr=LR)
    for s in range(CKPT_STEPS):
        if plan is not None:
            plan.step(s)
        ids = _batch(s)[0]
        model(input_ids=ids, labels=ids).loss.backward()
        if plan is not None and s < 2:  # the schedule really froze layer 0's LoRA for the first two steps
            assert model.model.layers[0].self_attn.q_proj.surgery.d.lora_B.grad is None
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def checkpoints(runs):
    import torch.multiprocessing as mp

    folder = runs[2]  # the FSDP2 spawn of `runs` ran the uninterrupted runs and saved at CUT
    mp.spawn(_ckpt_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    return folder


@pytest.mark.parametrize("case", ["lora", "schedule"])
def test_fsdp2_checkpoint_resume_is_exact(checkpoints, case):
    first = torch.load(checkpoints / f"first-{case}.pt", weights_only=True)
    resumed = torch.load(checkpoints / f"resume-{case}.pt", weights_only=True)
    for out in (first, resumed):
        assert "error" not in out, out.get("error")
    full, got = first["full"], resumed["resumed"]
    assert full.keys() == got.keys()
    for k, v in full.items():
        assert torch.equal(got[k], v), f"{case}: {k} differs from the uninterrupted run"
    ref = _ckpt_reference(case)  # and the sharded run is the single-process run on the global batch
    for k, v in ref.items():
        torch.testing.assert_close(full[k], v, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{case}: {k}: {m}")
    base = tiny_llama()
    lora = [k for k in full if ".d.lora_" in k]
    assert len(lora) == 8 and all(not torch.equal(full[k], torch.zeros_like(full[k])) for k in lora if "lora_B" in k)
    frozen = dict(base.named_parameters())
    assert all(torch.equal(full[k], frozen[k].float()) for k in frozen), "the frozen base moved"
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(checkpoints / case)).read_metadata().state_dict_metadata
    saved = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    if case == "lora":  # only the delta (and its optimizer state) was written, not the frozen base
        assert saved == set(lora), sorted(saved)
    else:
        assert saved == set(full), sorted(saved)
    assert any(k.startswith("optim.state.") and ".d.lora_" in k for k in keys)
