"""Multi-tenant serving on a GPU: not a timing, a check of the CUDA paths the CPU suite cannot reach.

- every row of a routed batch equals its delta's single-tenant output (LoRA, rsLoRA, DoRA, VeRA, LoHa,
  LoKr, IA3 in one bank), fp32 and bf16, prefill and cached decoding;
- the adapter pool over a hub (pinned host cache, copies to the GPU) serves the same numbers;
- the continuous batcher's greedy tokens equal `generate` of each delta alone (fp32);
- a compiled model (inductor) under routes and swaps equals eager, with no recompile.

Run: python benchmarks/check_serving_cuda.py [--out docs/results/check_serving_cuda.md]"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from models import VOCAB, tiny_llama  # noqa: E402

import registry  # noqa: E402
import surgery  # noqa: E402
from surgery.serving import Batcher, Request, Sampling  # noqa: E402

DELTAS = [
    ("lora", {"r": 4}),
    ("lora", {"r": 8, "alpha": 16, "rslora": True}),
    ("dora", {"r": 4}),
    ("vera", {"r": 8}),
    ("loha", {"r": 2}),
    ("lokr", {"r": 2}),
    ("ia3", {"targets": ["k_proj", "v_proj"], "feedforward": []}),
]
TOL = {torch.float32: 1e-4, torch.bfloat16: 0.06}  # max abs logit difference; bf16 rounds each matmul


def donor(base: torch.nn.Module, method: str, cfg: dict[str, Any], seed: int) -> torch.nn.Module:
    m = copy.deepcopy(base)
    cfg = dict(cfg)
    surgery.inject(m, method, targets=cfg.pop("targets", "@linear"), **cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.device, p.dtype))
    return m


def rows_equal_single_tenant(dtype: torch.dtype, dev: str) -> dict[str, Any]:
    base = tiny_llama().to(dev, dtype).eval()
    donors = [donor(base, m, c, i) for i, (m, c) in enumerate(DELTAS)]
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=8, max_rank=16)
    for i, d in enumerate(donors):
        bank.load(i, surgery.delta(d))
    route = [6, None, 0, 1, 2, 3, 4, 5, -1, 0]
    ids = torch.randint(3, VOCAB, (len(route), 9), generator=torch.Generator().manual_seed(0)).to(dev)
    worst_prefill = worst_decode = 0.0
    with torch.no_grad():
        with surgery.route(model, route):
            out = model(input_ids=ids[:, :8], use_cache=True)
            step = model(input_ids=ids[:, 8:], past_key_values=out.past_key_values).logits
        for row, s in enumerate(route):
            ref_model = base if s is None or s < 0 else donors[s]
            ref = ref_model(input_ids=ids[row : row + 1, :8], use_cache=True)
            ref_step = ref_model(input_ids=ids[row : row + 1, 8:], past_key_values=ref.past_key_values).logits
            worst_prefill = max(worst_prefill, (out.logits[row] - ref.logits[0]).abs().max().item())
            worst_decode = max(worst_decode, (step[row] - ref_step[0]).abs().max().item())
        base_exact = torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    ok = max(worst_prefill, worst_decode) <= TOL[dtype] and base_exact
    return {
        "check": f"routed rows vs single tenant, {len(DELTAS)} methods, {str(dtype)[6:]}",
        "prefill max abs diff": worst_prefill,
        "decode max abs diff": worst_decode,
        "outside a route the base, bit for bit": base_exact,
        "ok": ok,
    }


def pool_over_hub(dev: str, tmp: Path) -> dict[str, Any]:
    base = tiny_llama().to(dev).eval()
    hub = registry.Hub(tmp / "hub")
    expect: dict[str, torch.Tensor] = {}
    ids = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(1)).to(dev)
    for i in range(6):
        d = donor(base, "lora", {"r": 2 + i % 3, "targets": "@attn"}, 100 + i)
        ref = hub.push(surgery.delta(d), f"acme/a{i}")
        with torch.no_grad():
            expect[f"acme/a{i}@{ref.version}"] = d(input_ids=ids).logits
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=4, max_rank=4, targets="@attn")
    pool = registry.AdapterPool(bank, hub, cpu_cache=8)
    worst, t0 = 0.0, time.perf_counter()
    try:
        for round_ in range(3):  # 6 adapters through 4 slots: loads, evictions, cache hits
            for group in ([0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]):
                refs = [f"acme/a{(g + round_) % 6}@1" for g in group]
                with pool.lease(refs) as slots, torch.no_grad(), surgery.route(model, list(slots)):
                    out = model(input_ids=ids).logits
                for row, r in enumerate(refs):
                    worst = max(worst, (out[row] - expect[r][row]).abs().max().item())
        stats = pool.stats()
    finally:
        pool.close()
    return {
        "check": "adapter pool (hub -> pinned host cache -> GPU slots), 6 LoRAs through 4 slots, fp32",
        "max abs diff": worst,
        "loads / cpu hits / misses": f"{stats['loads']} / {stats['cpu_hits']} / {stats['misses']}",
        "seconds": round(time.perf_counter() - t0, 3),
        "ok": worst <= TOL[torch.float32],
    }


def batcher_greedy(dev: str) -> dict[str, Any]:
    base = tiny_llama().to(dev).eval()
    donors = [donor(base, "lora", {"r": 4}, 10 + i) for i in range(3)]
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=4, max_rank=8)
    for i, d in enumerate(donors):
        bank.load(i, surgery.delta(d))
    g = torch.Generator().manual_seed(2)
    reqs = [
        Request(
            prompt_ids=torch.randint(3, VOCAB, (5 + i % 4,), generator=g).tolist(),
            slot=(i % 4) - 1,
            sampling=Sampling(max_tokens=6 + i % 5),
        )
        for i in range(10)
    ]
    b = Batcher(model, bank=bank, max_batch=6, eos_token_id=[])
    rids = [b.submit(r) for r in reqs]
    got = b.run_until_done()
    same = 0
    with torch.no_grad():
        for rid, r in zip(rids, reqs, strict=True):
            ref_model = base if r.slot < 0 else donors[r.slot]
            prompt = torch.tensor([r.prompt_ids], device=dev)
            ref = ref_model.generate(
                prompt, max_new_tokens=r.sampling.max_tokens, do_sample=False, pad_token_id=0, eos_token_id=None
            )
            same += got[rid] == ref[0, prompt.shape[1] :].tolist()
    return {
        "check": "continuous batcher, 10 requests over 3 LoRAs + base, max_batch 6, greedy, fp32",
        "requests equal to generate alone": f"{same} / {len(reqs)}",
        "ok": same == len(reqs),
    }


def compiled_routes(dev: str) -> dict[str, Any]:
    import torch._dynamo as dynamo

    base = tiny_llama().to(dev).eval()
    donors = [donor(base, "lora", {"r": 2 + i}, 20 + i) for i in range(4)]
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=3, max_rank=8)
    for i in range(3):
        bank.load(i, surgery.delta(donors[i]))
    ids = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(3)).to(dev)
    dynamo.reset()
    compiled = torch.compile(model)
    worst = 0.0
    with torch.no_grad(), dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        for route in ([0, 1, 2, -1], [2, 2, 0, 1], [-1, 0, -1, 2]):
            with surgery.route(model, route):
                out = compiled(input_ids=ids).logits
            for row, s in enumerate(route):
                ref = (base if s < 0 else donors[s])(input_ids=ids[row : row + 1]).logits
                worst = max(worst, (out[row] - ref[0]).abs().max().item())
        graphs = dynamo.utils.counters["stats"]["unique_graphs"]
        bank.load(1, surgery.delta(donors[3]))  # a swap is a copy: the same graphs
        with surgery.route(model, [1, 0, 1, 2]):
            out = compiled(input_ids=ids).logits
        worst = max(worst, (out[0] - donors[3](input_ids=ids[:1]).logits[0]).abs().max().item())
        recompiled = dynamo.utils.counters["stats"]["unique_graphs"] != graphs
    return {
        "check": "torch.compile (inductor) under routes and a hot swap, fp32",
        "max abs diff vs eager single tenant": worst,
        "recompiled after the swap": recompiled,
        "ok": worst <= 1e-3 and not recompiled,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="docs/results/check_serving_cuda.md")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks compare fp32 numbers, not TF32
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        parts = [
            lambda: rows_equal_single_tenant(torch.float32, args.device),
            lambda: rows_equal_single_tenant(torch.bfloat16, args.device),
            lambda: pool_over_hub(args.device, Path(tmp)),
            lambda: batcher_greedy(args.device),
            lambda: compiled_routes(args.device),
        ]
        for part in parts:
            try:
                rows.append(part())
            except Exception as e:  # a failed part is reported, the others still run
                rows.append({"check": f"part {len(rows) + 1}", "error": f"{type(e).__name__}: {e}", "ok": False})
            print(rows[-1], flush=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    lines = [
        "# Serving on a GPU: routed rows, the pool, the batcher and compile against single-tenant references",
        "",
        f"Generated by `benchmarks/check_serving_cuda.py` on {time.strftime('%Y-%m-%d %H:%M')}: {name}, "
        f"torch {torch.__version__}, model-surgery {surgery.__version__}. Not a timing. TF32 off; tolerances: "
        f"fp32 {TOL[torch.float32]}, bf16 {TOL[torch.bfloat16]} (max abs logit difference).",
        "",
    ]
    for r in rows:
        lines.append(f"- **{r.pop('check')}**: " + ", ".join(f"{k}: {v}" for k, v in r.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
