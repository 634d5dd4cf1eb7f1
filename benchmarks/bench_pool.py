"""registry.AdapterPool: the cost of a miss, and Zipf traffic over 1,000 adapters on a 64-slot bank.

    python benchmarks/bench_pool.py            # a few minutes on 2 cores
    python benchmarks/bench_pool.py --quick    # smoke run

Writes docs/results/bench_pool.json and docs/results/bench_pool.md.

Model: LlamaForCausalLM(hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 1000), fp32, a bank of
64 slots, max_rank 16, on "@linear". Deltas: LoRA on q/k/v/o/gate/up/down (seeded random tensors).

1. Miss: a lease of one ref no tier holds (blob just pushed: in the page cache, not yet hashed by this
   process) until its slot is ready; median and p99 over `--misses` misses, with the pool's breakdown
   (hub read + sha256 verify, `bank.prepare`, copy into the slot; resolve = the rest).
2. Zipf: `--adapters` adapters, batches of 64 rows drawn Zipf(s=1.1) over them; per batch lease -> route ->
   one forward of 64 x 32 tokens. Latency of batches with hub misses, with CPU-tier loads only, and of hits
   only; hit rate and evictions after a warm-up.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import torch  # noqa: E402

SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, vocab_size=1000)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET = {"miss_ms": 10.0, "miss_over_hit_p99": 2.0}
ROWS, TOKENS, ZIPF_S = 64, 32, 1.1


def build(device: str, rank: int) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    import surgery

    logging.set_verbosity_error()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    m = copy.deepcopy(base)
    surgery.inject(m, "lora", targets=TARGETS, r=rank, alpha=2 * rank)
    return base.to(device), surgery.delta(m)


def lora(template: Any, seed: int) -> Any:
    import surgery

    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(t.shape, generator=g) * 0.01 for k, t in template.tensors.items()}
    return surgery.Delta("lora", f"d{seed}", dict(template.config), tensors, template.base)


def q(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p * len(s)))]


def bench_miss(work: Path, base: Any, template: Any, n: int) -> dict[str, Any]:
    import registry
    import surgery

    hub = registry.Hub(work / "hub-miss")
    warm = 3
    refs = [hub.push(lora(template, i), f"miss/d{i:03d}", alias="prod") for i in range(n + warm)]
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=64, max_rank=16, targets="@linear")
    with registry.AdapterPool(bank, registry.Hub(hub.root)) as pool:  # warm-up: first calls of every code path
        for r in refs[:warm]:
            with pool.lease([f"{r.name}@prod"]):
                pass
    lat = []
    with registry.AdapterPool(bank, registry.Hub(hub.root)) as pool:
        for r in refs[warm:]:
            t0 = time.perf_counter()
            with pool.lease([f"{r.name}@prod"]) as slots:
                t1 = time.perf_counter()
            assert slots.refs[0] == r
            lat.append((t1 - t0) * 1e3)
        st = pool.stats()
    assert st["misses"] == st["loads"] == n
    med = {k: st[f"{k}_ms"]["p50"] for k in ("pull", "prepare", "copy", "load")}
    med["lease"] = statistics.median(lat)
    med["resolve_and_rest"] = med["lease"] - med["load"]
    return {
        "n": n,
        "sites": len(bank.sites),
        "delta_bytes": template.nbytes,
        "lease_ms": {"median": med["lease"], "p99": q(lat, 0.99), "max": max(lat), "samples": lat},
        "median_ms": med,
        "p99_ms": {k: st[f"{k}_ms"]["p99"] for k in ("pull", "prepare", "copy", "load")},
    }


def bench_zipf(work: Path, base: Any, template: Any, adapters: int, batches: int, warmup: int) -> dict[str, Any]:
    import registry
    import surgery

    hub = registry.Hub(work / "hub-zipf")
    t0 = time.perf_counter()
    names = [hub.push(lora(template, 10_000 + i), f"zipf/d{i:04d}").name for i in range(adapters)]
    push_s = time.perf_counter() - t0
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=64, max_rank=16, targets="@linear")
    dev = bank.device
    rng = random.Random(0)
    order = names[:]
    rng.shuffle(order)  # popularity independent of push order
    weights = [1 / (k**ZIPF_S) for k in range(1, adapters + 1)]
    ids = torch.randint(3, SMALL["vocab_size"], (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev)}
    keys = ("hits", "cpu_hits", "misses", "joined", "loads", "evictions", "cpu_evictions")
    counts = dict.fromkeys(keys, 0)
    kinds: dict[str, list[float]] = {"hub_miss": [], "cpu_load": [], "hits_only": [], "replay": []}
    per_batch = []
    with registry.AdapterPool(bank, registry.Hub(hub.root), cpu_cache=512) as pool:

        def run(refs: list[str]) -> tuple[float, dict[str, int]]:
            before = pool.stats()
            C.sync(dev)
            t = time.perf_counter()
            with pool.lease(refs) as slots, surgery.route(model, slots), torch.no_grad():
                model(**batch)
                C.sync(dev)
            ms = (time.perf_counter() - t) * 1e3
            after = pool.stats()
            return ms, {k: after[k] - before[k] for k in keys}

        for b in range(warmup + batches):
            refs = rng.choices(order, weights=weights, k=ROWS)
            ms, d = run(refs)
            if b < warmup:
                continue
            kind = "hub_miss" if d["misses"] else "cpu_load" if d["loads"] else "hits_only"
            kinds[kind].append(ms)
            counts = {k: counts[k] + d[k] for k in keys}
            # the same batch again, now every version in a slot: a batch of hits of the same composition
            replay_ms, d2 = run(refs)
            assert d2["loads"] == 0, "a replayed batch loaded a slot"
            kinds["replay"].append(replay_ms)
            per_batch.append({"ms": ms, "replay_ms": replay_ms, "kind": kind, "distinct": len(set(refs)), **d})
        end = pool.stats()
        check = spot_check(base, hub, model, pool, order[:3], batch)
    looked = counts["hits"] + counts["cpu_hits"] + counts["misses"] + counts["joined"]
    summary = {
        k: {"n": len(v), "p50": q(v, 0.5), "p99": q(v, 0.99), "max": max(v)} if v else {"n": 0}
        for k, v in kinds.items()
    }
    traffic = kinds["hub_miss"] + kinds["cpu_load"] + kinds["hits_only"]
    return {
        "adapters": adapters,
        "batches": batches,
        "warmup": warmup,
        "push_s": push_s,
        "counts": counts,
        "slot_hit_rate": counts["hits"] / looked,
        "cpu_hit_rate": counts["cpu_hits"] / looked,
        "distinct_per_batch": statistics.mean(p["distinct"] for p in per_batch),
        "loads_per_batch": statistics.mean(p["loads"] for p in per_batch),
        "latency_ms": summary,
        "p99_with_misses_over_hits": q(kinds["hub_miss"], 0.99) / q(kinds["replay"], 0.99)
        if kinds["hub_miss"]
        else None,
        "p99_traffic_over_hits": q(traffic, 0.99) / q(kinds["replay"], 0.99),
        "p50_with_misses_over_hits": q(kinds["hub_miss"], 0.5) / q(kinds["replay"], 0.5) if kinds["hub_miss"] else None,
        "load_ms": end["load_ms"],
        "max_abs_diff_vs_single_tenant": check,
        "per_batch": per_batch,
    }


def spot_check(base: Any, hub: Any, model: Any, pool: Any, names: list[str], batch: dict) -> float:
    """Rows of a served batch against each delta applied alone to a copy of the base."""
    import surgery

    rows = 3
    small = {k: v[:rows] for k, v in batch.items()}
    with pool.lease(names) as slots, surgery.route(model, slots), torch.no_grad():
        out = model(**small).logits
    worst = 0.0
    for i, r in enumerate(slots.refs):
        single = copy.deepcopy(base)
        surgery.apply(single, hub.pull(r))
        with torch.no_grad():
            worst = max(worst, (single(**small).logits[i] - out[i]).abs().max().item())
    return worst


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--misses", type=int, default=30)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the deltas (the bank's max_rank is 16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--dir", default=None, help="work folder (default: a temp folder)")
    args = ap.parse_args()
    if args.quick:
        args.misses, args.adapters, args.batches, args.warmup = 8, 100, 3, 2
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    out = Path(args.out or C.RESULTS_DIR / f"bench_pool{suffix}.json")
    md = Path(args.md or out.with_suffix(".md"))
    if args.device == "cpu":
        C.set_threads()
    env = C.environment(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_pool_", dir=args.dir))
    try:
        base, template = build(args.device, args.rank)
        C.log(f"delta: {template}")
        res: dict[str, Any] = {"env": env, "date": time.strftime("%Y-%m-%d %H:%M"), "rank": args.rank}
        C.log("misses ...")
        res["miss"] = bench_miss(work, base, template, args.misses)
        C.log(f"zipf over {args.adapters} adapters ...")
        res["zipf"] = bench_zipf(work, base, template, args.adapters, args.batches, args.warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(res, out, md, args.quick)
    return 0


def write(res: dict[str, Any], out: Path, md: Path, quick: bool) -> None:
    mi, z, e = res["miss"], res["zipf"], res["env"]
    med, p99 = mi["median_ms"], mi["p99_ms"]
    ms = lambda v: f"{v:.2f} ms"  # noqa: E731
    miss_rows = [
        {
            "part": "lease of one new ref -> slot ready",
            "median": ms(med["lease"]),
            "p99": ms(mi["lease_ms"]["p99"]),
            "target": f"<= {TARGET['miss_ms']:.0f} ms",
            "met?": med["lease"] <= TARGET["miss_ms"] and mi["lease_ms"]["p99"] <= TARGET["miss_ms"],
        },
        {"part": "hub read + sha256 verify (`hub.pull`)", "median": ms(med["pull"]), "p99": ms(p99["pull"])},
        {"part": "`bank.prepare` (delta -> low-rank factors)", "median": ms(med["prepare"]), "p99": ms(p99["prepare"])},
        {"part": "copy into the slot (`bank.load`)", "median": ms(med["copy"]), "p99": ms(p99["copy"])},
        {"part": "resolve the alias, bookkeeping, thread hand-offs (the rest)", "median": ms(med["resolve_and_rest"])},
    ]
    lat = z["latency_ms"]
    names = {
        "hub_miss": "traffic: with at least one hub miss",
        "cpu_load": "traffic: with CPU-tier -> slot loads only",
        "hits_only": "traffic: hits only",
        "replay": "the same batch again: hits only",
    }
    zipf_rows = [
        {
            "batches": names[k],
            "n": lat[k]["n"],
            "p50": ms(lat[k]["p50"]) if lat[k]["n"] else "",
            "p99": ms(lat[k]["p99"]) if lat[k]["n"] else "",
        }
        for k in names
    ]
    ratio = z["p99_with_misses_over_hits"]
    c = z["counts"]
    extra = statistics.median(p["ms"] - p["replay_ms"] for p in z["per_batch"])
    misses = statistics.mean(p["misses"] for p in z["per_batch"])
    text = f"""# AdapterPool: misses and Zipf traffic

Generated by `benchmarks/bench_pool.py{" --quick" if quick else ""}` on {res["date"]}: device {e["device"]}, torch {e["torch"]}, transformers {e["transformers"]}, {e.get("cpu")} x{e["cpu_count"]}, {e["torch_threads"]} torch threads, OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "unset")} (load average at start {e["load_average_at_start"]}){", " + e["cuda_device"] if "cuda_device" in e and e["device"] != "cpu" else ""}.

Model: Llama, hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 1000, fp32; bank of 64 slots, max_rank 16 on
"@linear" ({mi["sites"]} sites). Deltas: LoRA r={res["rank"]} on q/k/v/o/gate/up/down, {C.fmt_bytes(mi["delta_bytes"])} each. Hub in a temp folder on
the machine's disk; blobs just pushed, so in the page cache.

## A miss: hub -> slot ({mi["n"]} misses, each a new version)

{C.markdown_table(miss_rows, ["part", "median", "p99", "target", "met?"])}

The parts are the pool's own timings (`stats()`: `pull_ms`, `prepare_ms`, `copy_ms`); a lease reads and prepares
its first miss on its own thread (further misses on the pool's workers, in parallel), then copies. A first read of a blob hashes every byte
(sha256); the pool's CPU tier keeps the prepared factors, so a version read once is not read again until
the tier (`cpu_cache` entries, LRU) lets it go.

## Zipf traffic: {z["adapters"]:,} adapters, batches of {ROWS} rows, Zipf(s={ZIPF_S})

Per batch: `pool.lease(refs)` -> `surgery.route` -> one forward of {ROWS} x {TOKENS} tokens, timed as a whole;
{z["batches"]} batches after {z["warmup"]} warm-up batches (pushing the {z["adapters"]:,} versions took {z["push_s"]:.1f} s),
`cpu_cache=512`. With {z["distinct_per_batch"]:.1f} distinct versions per batch, most from the long tail, a batch of
traffic whose versions are all resident is rare, so each batch is run a second time right after: the replay
has the same rows and versions, all in slots, and is the batch of hits it is compared with.

{C.markdown_table(zipf_rows, ["batches", "n", "p50", "p99"])}

- p99 of batches with hub misses / p99 of the replays (hits only): **{f"{ratio:.2f}x" if ratio else "n/a"}** (target
  <= {TARGET["miss_over_hit_p99"]:.0f}x: {"met" if ratio and ratio <= TARGET["miss_over_hit_p99"] else "**not met**" if ratio else "n/a"}); p50: {f"{z['p50_with_misses_over_hits']:.2f}x" if z["p50_with_misses_over_hits"] else "n/a"}; p99 of all traffic batches / p99 of the replays: {z["p99_traffic_over_hits"]:.2f}x.
- Per distinct version per lease (traffic batches): {z["slot_hit_rate"]:.1%} already in a slot, {z["cpu_hit_rate"]:.1%} from the CPU
  tier, the rest read from the hub ({c["misses"]} misses, {c["joined"]} joined a read under way); {z["loads_per_batch"]:.2f}
  slot loads per batch; {c["evictions"]} slot evictions, {c["cpu_evictions"]} CPU-tier evictions.
- What the misses cost in absolute terms: a traffic batch took {extra:.0f} ms more than its replay (median over
  batches) for {z["loads_per_batch"]:.1f} slot loads and {misses:.1f} hub reads. The target is met here because a forward of
  {ROWS} x {TOKENS} tokens on this CPU takes seconds; where the forward takes milliseconds (a GPU) the same loads
  would not fit in 2x a batch of hits.
- Correctness: rows of a served batch against each delta applied alone (`surgery.apply`) to a copy of the base:
  max abs difference {z["max_abs_diff_vs_single_tenant"]:.1e}.
"""
    C.write_results(res, out, md, text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
