"""A Schedule under DDP on two CPU processes (gloo): a schedule that unfreezes mid-run, checkpointed
(model + optimizer + plan state) and resumed in fresh processes, gives the same weights as an
uninterrupted run, and the ranks agree; frozen parameters get no gradient on any rank."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from models import TinyTransformer

from surgery.recipes.schedule import Schedule

STEPS, CUT, WORLD = 6, 3, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    model = TinyTransformer(seed=1)  # the same weights on every rank (DDP broadcasts rank 0's anyway)
    plan = Schedule(model, lr=1e-2, layer_decay=0.7, weight_decay=0.1).unfreeze("head").unfreeze("all", at=2)
    ddp = plan.ddp()
    opt = plan.optimizer(torch.optim.AdamW)
    return model, plan, ddp, opt


def _train(model, plan, ddp, opt, steps: range, rank: int) -> None:
    for s in steps:
        plan.step(s)
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(100 * rank + s))
        logits = ddp(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if s < 2:  # LP phase: only the head has gradients, on every rank
            assert model.embed.weight.grad is None and model.blocks[0].q.weight.grad is None
            assert model.lm_head.weight.grad is not None
        opt.step()


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _agree(t: torch.Tensor) -> None:
    import torch.distributed as dist

    got = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(got, t)
    assert torch.equal(got[0], got[1]), "ranks disagree"


def _worker(rank: int, port: int, phase: str, folder: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        if phase == "first":
            model, plan, ddp, opt = _setup()
            start = _flat(model)
            _train(model, plan, ddp, opt, range(STEPS), rank)
            _agree(_flat(model))
            assert not torch.equal(
                model.embed.weight, TinyTransformer(seed=1).embed.weight
            )  # unfrozen: synced, trained
            if rank == 0:
                torch.save(_flat(model), os.path.join(folder, "full.pt"))
            model, plan, ddp, opt = _setup()
            _train(model, plan, ddp, opt, range(CUT), rank)
            assert not torch.equal(_flat(model), start)
            if rank == 0:
                state = {"model": model.state_dict(), "opt": opt.state_dict(), "plan": plan.state_dict()}
                torch.save(state, os.path.join(folder, "ckpt.pt"))
        else:
            state = torch.load(os.path.join(folder, "ckpt.pt"), weights_only=True)
            model = TinyTransformer(seed=1)
            model.load_state_dict(state["model"])
            plan = Schedule(model, lr=1e-2, layer_decay=0.7, weight_decay=0.1).unfreeze("head").unfreeze("all", at=2)
            plan.load_state_dict(state["plan"])
            ddp, opt = plan.ddp(), plan.optimizer(torch.optim.AdamW)
            opt.load_state_dict(state["opt"])
            _train(model, plan, ddp, opt, range(CUT, STEPS), rank)
            _agree(_flat(model))
            assert torch.equal(_flat(model), torch.load(os.path.join(folder, "full.pt"), weights_only=True))
        dist.barrier()  # nobody tears gloo down while the other rank still talks to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown on a loaded machine


def test_ddp_unfreeze_mid_run_resume_is_exact(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    for phase in ("first", "resume"):  # fresh processes for the resumed half
        mp.spawn(_worker, args=(_free_port(), phase, str(tmp_path)), nprocs=WORLD, join=True)
    assert (tmp_path / "full.pt").is_file() and (tmp_path / "ckpt.pt").is_file()
