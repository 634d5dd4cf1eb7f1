"""LoRA on a (small, random) Llama with the transformers `Trainer` and its `fsdp` arguments (FSDP2):

    torchrun --nproc-per-node 2 examples/distributed/trainer_fsdp2.py --out out/trainer

The model is built (seeded: the same on every rank) and injected BEFORE the Trainer: the Trainer (through
accelerate) applies `fully_shard` to each `LlamaDecoderLayer` and the root and builds the optimizer over
the trainable (delta) parameters. After training every rank calls `surgery.delta` (it gathers the full
tensors); rank 0 writes
`lora.safetensors` and `report.json`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchrun_fsdp2 import SEQ, VOCAB, build
from transformers import Trainer, TrainingArguments

import surgery


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="global batch (rows), split over the ranks")
    a = ap.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(
        output_dir=str(a.out / "trainer"),
        per_device_train_batch_size=a.batch // world,
        max_steps=a.steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        fsdp="full_shard auto_wrap",
        fsdp_config={
            "version": 2,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
        },
        seed=0,
    )
    model = build(64, 2)
    rows = torch.randint(3, VOCAB, (a.steps * a.batch, SEQ), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in rows]
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    wrapped = trainer.model_wrapped
    tensors = {k: v.contiguous() for k, v in surgery.delta(model, "lora").tensors.items()}
    report = {
        "world": trainer.args.world_size,
        "mode": "trainer",
        "wrapped": type(wrapped).__name__,
        "sharded": any(type(p).__name__ == "DTensor" for p in model.parameters()),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    if report["world"] > 1 and not report["sharded"]:  # what accelerate does with fsdp= on CPU
        print(f"WARNING: fsdp was asked for, but the Trainer wrapped the model in {report['wrapped']}: "
              "accelerate applies FSDP only on GPUs / accelerators; this run was data parallel, unsharded")  # fmt: skip
    if trainer.is_world_process_zero():
        a.out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(a.out / "lora.safetensors"))
        (a.out / "report.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report))


if __name__ == "__main__":
    main()
    # torch 2.13 with gloo: on a loaded machine a gloo thread can abort the interpreter's teardown after the
    # process group is gone ("terminate called without an active exception", SIGABRT: seen once in 6 runs
    # on 2 busy cores); everything is written by now, so leave without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
