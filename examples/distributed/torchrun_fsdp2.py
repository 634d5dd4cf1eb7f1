"""LoRA on a (small, random) Llama trained under FSDP2 or DDP, launched by torchrun.

    torchrun --nproc-per-node 2 examples/distributed/torchrun_fsdp2.py --out out/fsdp2          # FSDP2
    torchrun --nproc-per-node 2 examples/distributed/torchrun_fsdp2.py --out out/ddp --ddp      # DDP
    python examples/distributed/torchrun_fsdp2.py --out out/one                                 # one process
    ... --base bf16 | --base nf4 (QLoRA: bitsandbytes) --hidden 512 --layers 4              # other bases, sizes

CPU: gloo (seconds); CUDA: nccl, one GPU per rank. The order that matters: every rank builds the same
model (seeded: FSDP2 does not broadcast rank 0's weights, each rank keeps its own shard), injects the
delta, THEN shards (`fully_shard` on each decoder layer, then the root) or wraps in DDP, then builds the
optimizer from the trainable parameters (the sharded ones). Each rank trains on its slice of every global
batch. At the end every rank takes part in gathering the delta's full tensors; rank 0 writes them
(`lora.safetensors`) and `report.json` (losses, and the bytes each rank held: parameters, gradients,
optimizer state, local shards) and pushes it to a local hub (`out/hub`, ``demo/lora``) from every rank.
`full()` gathers any other sharded tensor the same way (every rank calls it)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import surgery

VOCAB, SEQ = 128, 16


def build(hidden: int, layers: int, base: str = "fp32") -> torch.nn.Module:
    """The model every rank builds: seeded, `base` "fp32", "bf16" or "nf4" (QLoRA: the decoder's linear
    weights in bitsandbytes NF4), then the LoRA (fp32 factors on any base)."""
    torch.manual_seed(0)  # the same base and the same LoRA init on every rank
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if base == "bf16":
        model.to(torch.bfloat16)
    elif base == "nf4":
        surgery.quantize(model, "nf4")
    surgery.inject(model, "lora", targets=["q_proj", "v_proj"], r=8, alpha=16, name="lora")
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's full value (a collective: every rank calls it); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().contiguous()


def local_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds: parameters, gradients and optimizer state (a DTensor counts its local shard)."""
    from torch.distributed.tensor import DTensor

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    return {
        "params": sum(size(p) for p in model.parameters()),
        "grads": sum(size(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer": sum(size(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()),
    }


def train(
    out: Path, steps: int = 3, batch: int = 4, hidden: int = 64, layers: int = 2, ddp: bool = False, base: str = "fp32"
) -> dict:
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")  # fmt: skip
    model = build(hidden, layers, base).to(device)
    model.train()
    wrapped = model
    if distributed and ddp:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, held = [], {}
    for step in range(steps):
        ids = torch.randint(3, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(step))
        ids = ids.chunk(world)[rank].to(device)  # this rank's slice of the global batch
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == steps - 1:
            held = local_bytes(model, opt)  # gradients present; optimizer state from the earlier steps
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        if distributed:
            dist.all_reduce(loss)
        losses.append(float(loss) / world)
    held["optimizer"] = local_bytes(model, opt)["optimizer"]
    import registry

    # every rank calls these: on a sharded model surgery.delta gathers the full tensors, and hub.push
    # gathers, writes once (rank 0) and gives every rank the same Ref
    tensors = {k: v.contiguous() for k, v in surgery.delta(model, "lora").tensors.items()}
    ref = registry.Hub(out / "hub", create=True).push(model, "demo/lora", adapter="lora")
    per_rank = [held]
    if distributed:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, held)
    report = {"world": world, "mode": "ddp" if ddp else "fsdp2" if distributed else "single", "base": base,
              "losses": losses, "bytes_per_rank": per_rank, "pushed": str(ref)}  # fmt: skip
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "lora.safetensors"))
        (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ddp", action="store_true", help="DistributedDataParallel instead of FSDP2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="global batch (rows), split over the ranks")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--base", choices=["fp32", "bf16", "nf4"], default="fp32", help="nf4: QLoRA (bitsandbytes)")
    a = ap.parse_args()
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    try:
        report = train(a.out, a.steps, a.batch, a.hidden, a.layers, a.ddp, a.base)
        if report and (not dist.is_initialized() or dist.get_rank() == 0):
            print(json.dumps(report))
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # torch 2.13 with gloo: on a loaded machine a gloo thread can abort the interpreter's teardown after the
    # process group is gone ("terminate called without an active exception", SIGABRT: seen once in 6 runs
    # on 2 busy cores); everything is written by now, so leave without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
