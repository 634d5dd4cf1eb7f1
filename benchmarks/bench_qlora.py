"""QLoRA (issue 15): the NF4 base's bytes and the training step, each against a peer timed in the
same interleaved rounds (see common.py):

1. bytes of the linear layers' weights in NF4 with double quantisation (`surgery.quantize`: packed
   codes, absmax, nested absmax, code books) over the same weights in bf16: target <= 0.28x;
2. a QLoRA training step (forward + backward + AdamW over LoRA r=16 on every linear of the blocks,
   the base in NF4, computing in fp32) vs the same LoRA on the fp32 base (reported, not judged), and
   vs PEFT's QLoRA (peft LoRA on the model transformers loads with BitsAndBytesConfig(load_in_4bit=True,
   bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)), the same weights and batch.

    python benchmarks/bench_qlora.py            # writes docs/results/bench_qlora.{json,md}
    python benchmarks/bench_qlora.py --smoke    # a tiny model, not judged

Model: a Llama with SmolLM2-135M's layer shape (hidden 576, FFN 1536, 9 heads, 3 KV heads) and 4
layers, vocab 8192, random weights from the config; batch 4 x 64, fp32, one torch thread.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C  # noqa: E402

MODEL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SHAPE, SMOKE_SHAPE = (4, 64), (2, 16)
VOCAB, RANK = 8192, 16
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET = {"nf4_bytes_vs_bf16": 0.28}
log = C.log


def llama(cfg: dict) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with C.quiet():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**cfg, vocab_size=VOCAB, max_position_embeddings=256)).float()


def nf4_bytes(base: nn.Module) -> dict[str, Any]:
    from surgery.quantize import quantize

    q = copy.deepcopy(base)
    r = quantize(q)
    bf16 = sum(base.get_submodule(p).weight.numel() for p in r.layers) * 2
    return {
        "layers": len(r.layers),
        "bf16_bytes": bf16,
        "nf4_bytes": r.bytes_after,
        "nf4_bytes_vs_bf16": r.bytes_after / bf16,
        "bits_per_weight": r.bytes_after * 8 / (bf16 / 2),
        "max_abs_error": r.max_abs_error,
    }


def _step(model: nn.Module, batch: dict) -> Any:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def steps(base: nn.Module, shape: tuple[int, int], rounds: int) -> dict[str, Any]:
    import surgery
    from surgery.quantize import quantize

    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, VOCAB, shape, generator=g)}
    targets = "re:.*(" + "|".join(LINEARS) + ")"
    fp = copy.deepcopy(base)
    surgery.inject(fp, "lora", targets=targets, r=RANK, alpha=2 * RANK)
    q = copy.deepcopy(base)
    quantize(q)
    surgery.inject(q, "lora", targets=targets, r=RANK, alpha=2 * RANK)
    fns = {"qlora": _step(q, batch), "lora_fp32_base": _step(fp, batch)}
    peft = peft_qlora(base)
    if isinstance(peft, nn.Module):
        fns["peft_qlora"] = _step(peft, batch)
    # CPU time of this process: on a shared machine, waiting for a core is not the step's cost
    st = C.interleaved(fns, rounds=rounds, warmup=2, clock=time.process_time)
    out: dict[str, Any] = {"rounds": rounds, "batch": list(shape), "rank": RANK, "steps": st}
    out["qlora_vs_lora_fp32_base"] = C.ratio(st, "qlora", "lora_fp32_base")
    if "peft_qlora" in st:
        out["qlora_vs_peft_qlora"] = C.ratio(st, "qlora", "peft_qlora")
    else:
        out["peft_qlora_error"] = peft
    return out


def peft_qlora(base: nn.Module) -> nn.Module | str:
    """PEFT's QLoRA on the same weights: saved, loaded 4-bit by transformers, LoRA by peft."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        with tempfile.TemporaryDirectory() as d, C.quiet():
            base.save_pretrained(d)
            m = AutoModelForCausalLM.from_pretrained(d, quantization_config=cfg, device_map="cpu")
            lcfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=LINEARS, lora_dropout=0.0)
            return get_peft_model(m, lcfg)
    except Exception as e:  # noqa: BLE001  (reported, the others still run)
        return f"{type(e).__name__}: {e}"


def run(smoke: bool, rounds: int) -> dict[str, Any]:
    cfg, shape = (SMOKE, SMOKE_SHAPE) if smoke else (MODEL, SHAPE)
    base = llama(cfg)
    res: dict[str, Any] = {"model": {**cfg, "vocab_size": VOCAB}, "smoke": smoke, "target": TARGET}
    res["bytes"] = C.run_part("bytes", nf4_bytes, base)
    res["step"] = C.run_part("step", steps, base, shape, rounds)
    return res


def markdown(res: dict[str, Any], env: dict[str, Any]) -> str:
    b, s = res["bytes"], res["step"]
    lines = [
        "# bench_qlora: NF4 base bytes and the QLoRA training step",
        "",
        f"Model: Llama {res['model']}, random weights; fp32; {env['torch_threads']} torch thread(s); "
        f"torch {env['torch']}. Produced by `python benchmarks/bench_qlora.py`.",
        "",
        "## Bytes of the linear layers' weights",
        "",
    ]
    if "nf4_bytes" in b:
        ok = b["nf4_bytes_vs_bf16"] <= TARGET["nf4_bytes_vs_bf16"]
        lines += [
            C.markdown_table(
                [
                    {
                        "layers": b["layers"],
                        "bf16": C.fmt_bytes(b["bf16_bytes"]),
                        "NF4 + double quant": C.fmt_bytes(b["nf4_bytes"]),
                        "ratio": f"{b['nf4_bytes_vs_bf16']:.4f}x",
                        "bits / weight": f"{b['bits_per_weight']:.3f}",
                        "target <= 0.28x": ok,
                        "max abs error": f"{b['max_abs_error']:.4g}",
                    }
                ],
                ["layers", "bf16", "NF4 + double quant", "ratio", "bits / weight", "target <= 0.28x", "max abs error"],
            ),
            "",
        ]
    else:
        lines += [f"failed: {b}", ""]
    lines += ["## Training step (forward + backward + AdamW), LoRA r=16 on every linear of the blocks", ""]
    if "steps" in s:
        lines.append(
            f"Batch {s['batch'][0]} x {s['batch'][1]}, {s['rounds']} interleaved rounds, process CPU time (medians; "
            "ratios are medians of the per-round ratios)."
        )
        lines.append("")
        rows = []
        for k, v in s["steps"].items():
            row = {"contender": k, "median": C.fmt_seconds(v["median_s"]), "min": C.fmt_seconds(v["min_s"])}
            if k == "qlora":
                row["qlora / this"] = "1"
            else:
                r = s.get(f"qlora_vs_{k}")
                row["qlora / this"] = f"{r['ratio']:.2f}x" if r else ""
            rows.append(row)
        lines += [C.markdown_table(rows, ["contender", "median", "min", "qlora / this"]), ""]
        if "peft_qlora_error" in s:
            lines += [f"PEFT's QLoRA did not run: {s['peft_qlora_error']}", ""]
    else:
        lines += [f"failed: {s}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model; writes to --out only")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args.smoke, 2 if args.smoke else args.rounds)
    env = C.environment()
    res["env"] = env
    md = markdown(res, env)
    print(md)
    if args.smoke and args.out is None:
        return 0
    out = args.out or C.RESULTS_DIR / "bench_qlora.json"
    C.write_results(res, out, out.with_suffix(".md"), md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
