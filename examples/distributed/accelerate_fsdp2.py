"""LoRA on a (small, random) Llama under FSDP2 through `accelerate`:

    accelerate launch --config_file examples/distributed/accelerate_fsdp2.yaml \
        examples/distributed/accelerate_fsdp2.py --out out/acc

The user's code is the usual accelerate loop: build the model (seeded: the same on every rank), inject,
THEN `accelerator.prepare(model, optimizer)` (it applies `fully_shard` to each `LlamaDecoderLayer` and the
root, and points the optimizer at the sharded parameters). Rank 0 writes the delta's full tensors
(`lora.safetensors`) and `report.json`; every rank calls `surgery.delta`, which gathers them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torchrun_fsdp2 import SEQ, VOCAB, build, local_bytes

import surgery


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="global batch (rows), split over the ranks")
    a = ap.parse_args()
    torch.set_num_threads(1)
    accelerator = Accelerator()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched or (launched > 1 and not accelerator.is_fsdp2):
        # accelerate 1.15 turns an FSDP config into FSDP only on accelerators (CUDA, XPU, NPU, ...): on CPU
        # each launched process would train alone, unsharded, and silently write its own result
        raise SystemExit(
            f"accelerate set up {accelerator.distributed_type} over {accelerator.num_processes} process(es) for "
            f"{launched} launched, not FSDP2: accelerate applies an FSDP config only on GPUs / accelerators. "
            "On CPU use torchrun with fully_shard (examples/distributed/torchrun_fsdp2.py)"
        )
    model = build(64, 2)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    rank, world = accelerator.process_index, accelerator.num_processes
    losses, held = [], {}
    for step in range(a.steps):
        ids = torch.randint(3, VOCAB, (a.batch, SEQ), generator=torch.Generator().manual_seed(step))
        ids = ids.chunk(world)[rank].to(accelerator.device)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        if step == a.steps - 1:
            held = local_bytes(model, opt)
        opt.step()
        opt.zero_grad()
        losses.append(float(accelerator.reduce(loss.detach(), "mean")))
    inner = accelerator.unwrap_model(model)
    tensors = {k: v.contiguous() for k, v in surgery.delta(inner, "lora").tensors.items()}
    report = {"world": world, "mode": "accelerate", "sharded": type(model).__name__, "losses": losses,
              "bytes_per_rank": accelerator.gather_for_metrics([held], use_gather_object=True)}  # fmt: skip
    if accelerator.is_main_process:
        a.out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(a.out / "lora.safetensors"))
        (a.out / "report.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
    # torch 2.13 with gloo: on a loaded machine a gloo thread can abort the interpreter's teardown after the
    # process group is gone ("terminate called without an active exception", SIGABRT: seen once in 6 runs
    # on 2 busy cores); everything is written by now, so leave without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
