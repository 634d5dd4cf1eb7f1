"""MoE upcycling ("moe") and mixtures of LoRA experts ("lora_moe"): forward cost against the dense model.

    python benchmarks/bench_moe.py            # full run: a few minutes on 2 CPU cores
    python benchmarks/bench_moe.py --quick    # smoke run, < 60 s

Writes docs/results/bench_moe.json (or --out) and docs/results/bench_moe.md (or --md).

Model: LlamaForCausalLM(hidden 512, intermediate 2048, 4 layers, 8 heads, vocab 1000), fp32, eval,
torch.inference_mode(), use_cache=False, batch 8 x 256 tokens (the FFN is about two thirds of the
FLOPs, as in real models). Contenders, all on the same tokens and base weights:

- base: the dense model;
- moe top-1: every FFN upcycled to 8 experts, top-1 routing (Switch) -- target <= 1.5x base;
- moe top-2: the same with top-2 (twice the FFN FLOPs: for information);
- lora_moe: 4 LoRA experts, r=8, top-2, on q/k/v/o (for information);
- moe top-1, disabled: the upcycled model under surgery.disable (the base path through the bypass).

Routers and experts are perturbed at random (a trained-looking delta: routing spread over the
experts, not the near-uniform logits of a fresh router). The FFN alone (one layer's MLP against its
MoE layer, same tokens) is timed too, to show the dispatch overhead without attention around it.
PEFT has no equivalent method, so there is no peer column.

On CPU the forward is timed with as many torch threads as the process has cores, then with one:
an upcycled FFN runs 8 small expert FFNs (about 8x as many parallel regions as the dense FFN), and
on a machine shared with other busy processes every parallel region of a multi-threaded run can
wait a scheduler slice for a descheduled thread; the one-thread reading is the least hurt by that.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

SMALL = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=1000,
)
EXPERTS, LORA_EXPERTS, LORA_R = 8, 4, 8
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, SEQ = 8, 256
QUICK_SEQ = 64  # --quick: a smoke run, its figures are not the benchmark's
TARGET = {"moe_top1_over_base": 1.5}


log = C.log


_quiet = C.quiet


def llama(device: Any, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with _quiet():
        model = LlamaForCausalLM(LlamaConfig(**SMALL))
    return model.to(device).eval()


@torch.no_grad()
def perturb(model: nn.Module, name: str, seed: int) -> None:
    """Routers ~ N(0, 1/d) (spread routing), experts / LoRA B moved off the base a little."""
    from surgery import engine

    g = torch.Generator().manual_seed(seed)
    for ad in engine.adapters(model, name).values():
        for k, p in ad.tensors().items():
            noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            if k == "router.weight":
                p.copy_(noise / p.shape[1] ** 0.5)
            elif k.startswith("experts.") or k == "lora_B.weight":
                p.add_(noise * 0.01)


def build(device: Any) -> dict[str, nn.Module]:
    import surgery

    base = llama(device)
    models = {"base": base}
    for k in (1, 2):
        m = copy.deepcopy(base)
        surgery.inject(m, "moe", targets="@mlp", experts=EXPERTS, top_k=k, name="switch")
        perturb(m, "switch", seed=k)
        models[f"moe_top{k}"] = m
    m = copy.deepcopy(base)
    surgery.inject(m, "lora_moe", targets=ATTN, experts=LORA_EXPERTS, r=LORA_R, top_k=2, name="molora")
    perturb(m, "molora", seed=3)
    models["lora_moe"] = m
    return models


def balance(model: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """Tokens per expert at layer 0 (top-1 choices) and the aux loss of one forward."""
    import surgery
    from surgery import engine

    seen: dict[str, torch.Tensor] = {}
    ad = next(iter(engine.adapters(model, "switch").values()))
    h = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
            logits = ad.router(seen["x"].reshape(-1, SMALL["hidden_size"]))
    finally:
        h.remove()
    counts = torch.bincount(logits.argmax(-1), minlength=EXPERTS).tolist()
    return {"layer0_tokens_per_expert": counts, "aux_loss": float(surgery.aux_loss(model))}


def bench_forward(dev: str, models: dict[str, nn.Module], ids: torch.Tensor, rounds: int, warmup: int) -> dict:
    import surgery

    with torch.inference_mode():
        outs = {k: m(input_ids=ids, use_cache=False).logits.float() for k, m in models.items()}
    check = {f"max_abs_diff_{k}_vs_base": float((o - outs["base"]).abs().max()) for k, o in outs.items() if k != "base"}
    fns = {k: (lambda m=m: m(input_ids=ids, use_cache=False)) for k, m in models.items()}
    top1 = models["moe_top1"]

    def disabled() -> Any:
        with surgery.disable(top1):
            return top1(input_ids=ids, use_cache=False)

    fns["moe_top1_disabled"] = disabled
    with torch.inference_mode():
        st = C.interleaved(fns, rounds, warmup, device=dev, min_sample_s=0.05 if dev == "cuda" else 0)
    out: dict[str, Any] = {"stats": st, "check": check, "mode": "eval, torch.inference_mode(), use_cache=False"}
    for k in st:
        if k != "base":
            out[f"{k}_over_base"] = C.ratio(st, k, "base")
    return out


def bench_ffn(dev: str, models: dict[str, nn.Module], ids: torch.Tensor, rounds: int, warmup: int) -> dict:
    """Layer 0's FFN alone: the dense MLP vs its MoE (top-1, top-2) on the same hidden states."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ids.shape[0], ids.shape[1], SMALL["hidden_size"], generator=g).to(dev)
    mlps = {k: models[k].model.layers[0].mlp for k in ("base", "moe_top1", "moe_top2")}
    fns = {k: (lambda m=m: m(x)) for k, m in mlps.items()}
    with torch.inference_mode():
        st = C.interleaved(fns, rounds * 2, warmup, device=dev, min_sample_s=0.05 if dev == "cuda" else 0)
    return {
        "stats": st,
        "moe_top1_over_dense": C.ratio(st, "moe_top1", "base"),
        "moe_top2_over_dense": C.ratio(st, "moe_top2", "base"),
    }


def profile_moe(dev: str, model: nn.Module, ids: torch.Tensor) -> list[dict]:
    """Self time of the top ops in one upcycled forward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.inference_mode(), profile(activities=acts) as prof:
        model(input_ids=ids, use_cache=False)
        C.sync(dev)
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]:
        rows.append({"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3)})
    return rows


def run_device(dev: str, args: argparse.Namespace) -> dict:
    quick = args.quick
    rounds = args.rounds or (2 if quick else 15)
    warmup = 1 if quick else 2
    seq = QUICK_SEQ if quick else SEQ
    res: dict[str, Any] = {
        "device": dev,
        "rounds": rounds,
        "warmup": warmup,
        "batch": [BATCH, seq],
        "load_average": {"start": C.load_average()},
        "section_s": {},
    }

    @contextlib.contextmanager
    def section(name: str) -> Iterator[None]:
        log(f"[{dev}] {name}")
        t = time.perf_counter()
        yield
        res["section_s"][name] = round(time.perf_counter() - t, 2)
        res["load_average"][name] = C.load_average()

    with section("setup"):
        models = build(dev)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, SMALL["vocab_size"], (BATCH, seq), generator=g).to(dev)
        res["balance"] = balance(models["moe_top1"], ids)
        res["params"] = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    res["runs"] = {}
    for n in args.thread_counts if dev == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(n)
        run: dict[str, Any] = {}
        with section(f"forward, {n} threads"):
            run["forward"] = bench_forward(dev, models, ids, rounds, warmup)
        f = run["forward"]
        log(
            f"[{dev}]    moe top-1 / base {f['moe_top1_over_base']['ratio']:.3f}, "
            f"top-2 {f['moe_top2_over_base']['ratio']:.3f}, lora_moe {f['lora_moe_over_base']['ratio']:.3f}"
        )
        with section(f"ffn alone, {n} threads"):
            run["ffn"] = bench_ffn(dev, models, ids, rounds, warmup)
        log(f"[{dev}]    FFN alone: moe top-1 / dense {run['ffn']['moe_top1_over_dense']['ratio']:.3f}")
        res["runs"][str(n)] = run
    torch.set_num_threads(args.thread_counts[0])
    if args.profile:
        with section("profile"):
            res["profile_moe_top1"] = profile_moe(dev, models["moe_top1"], ids)
    del models
    gc.collect()
    return res


def rows_for(dev: str, r: dict) -> list[dict]:
    rows = []
    for n, run in r["runs"].items():
        rows += rows_for_run(f"{dev}, {n} thread{'s' if n != '1' else ''}", r, run)
    return rows


def rows_for_run(dev: str, r: dict, run: dict) -> list[dict]:
    f, st = run["forward"], run["forward"]["stats"]
    bs = "x".join(map(str, r["batch"]))

    def t(k: str) -> str:
        return f"{C.fmt_seconds(st[k]['median_s'])} / {C.fmt_seconds(st[k]['min_s'])}"

    def ratio(k: str) -> str:
        q = f[f"{k}_over_base"]
        return f"{q['ratio']:.3f}x (medians {q['ratio_of_medians']:.3f}, mins {q['ratio_of_mins']:.3f})"

    top1 = f["moe_top1_over_base"]["ratio"]
    rows = [
        {"measurement": f"[{dev}] base forward, {bs} tokens", "time (median / min)": t("base")},
        {
            "measurement": f"[{dev}] moe, {EXPERTS} experts, top-1, every FFN",
            "time (median / min)": t("moe_top1"),
            "x base": ratio("moe_top1"),
            "target": f"<= {TARGET['moe_top1_over_base']}x",
            "met?": top1 <= TARGET["moe_top1_over_base"],
        },
        {
            "measurement": f"[{dev}] moe, {EXPERTS} experts, top-2 (2x FFN FLOPs)",
            "time (median / min)": t("moe_top2"),
            "x base": ratio("moe_top2"),
        },
        {
            "measurement": f"[{dev}] lora_moe, {LORA_EXPERTS} experts r={LORA_R} top-2 on q/k/v/o",
            "time (median / min)": t("lora_moe"),
            "x base": ratio("lora_moe"),
        },
        {
            "measurement": f"[{dev}] moe top-1 under surgery.disable (base path through the bypass)",
            "time (median / min)": t("moe_top1_disabled"),
            "x base": ratio("moe_top1_disabled"),
        },
    ]
    ff, fs = run["ffn"], run["ffn"]["stats"]
    for k, label in (("moe_top1", "top-1"), ("moe_top2", "top-2")):
        q = ff[f"{k}_over_dense"]
        rows.append(
            {
                "measurement": f"[{dev}] layer-0 FFN alone: MoE {label} vs dense MLP",
                "time (median / min)": f"{C.fmt_seconds(fs[k]['median_s'])} vs {C.fmt_seconds(fs['base']['median_s'])}",
                "x base": f"{q['ratio']:.3f}x (mins {q['ratio_of_mins']:.3f})",
            }
        )
    return rows


def markdown(results: dict) -> str:
    env = results["env"]
    cols = ["measurement", "time (median / min)", "x base", "target", "met?"]
    quick = results["quick"]
    head = [
        "# MoE upcycling and LoRA experts: forward cost vs the dense model",
        "",
        f"Generated by `benchmarks/bench_moe.py{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(results['started']))}: torch {env['torch']}, "
        f"transformers {env['transformers']}, {env.get('cpu')} x{env['cpu_count']} (torch threads {results['setup']['thread_counts']}, "
        f"load average at start {env['load_average_at_start']})"
        + (f", {env['cuda_device']}" if env.get("cuda_device") else "")
        + ".",
        "",
        f"Model: LlamaForCausalLM {SMALL}, fp32, eval, `torch.inference_mode()`; batch {BATCH} x "
        f"{QUICK_SEQ if quick else SEQ} tokens{' (--quick: 2 rounds, smoke test only)' if quick else ''}. "
        "Every contender runs the same tokens on the same base weights; routers and experts are perturbed "
        "at random so the routing is spread as in a trained model. Timings: warm-ups, then interleaved "
        "rounds in rotating order; times are medians (and minima), ratios the median over rounds of the "
        "ratio within a round (ratios of medians and of minima in parentheses). PEFT has no equivalent "
        "method: no peer column.",
        "",
        "",
    ]
    rows = []
    for dev, r in results["devices"].items():
        rows += rows_for(dev, r)
    if quick:
        for row in rows:
            if isinstance(row.get("met?"), bool):
                row["met?"] = f"({'yes' if row['met?'] else 'no'}; --quick)"
    notes = ["", "Notes:", ""]
    for dev, r in results["devices"].items():
        c = next(iter(r["runs"].values()))["forward"]["check"]
        b = r["balance"]
        notes.append(
            f"- [{dev}] logits vs base, max |diff|: "
            + ", ".join(f"{k.removeprefix('max_abs_diff_').removesuffix('_vs_base')} {v:.3g}" for k, v in c.items())
            + " (the perturbed deltas are live)."
        )
        notes.append(
            f"- [{dev}] layer-0 tokens per expert (top-1): {b['layer0_tokens_per_expert']}; "
            f"aux loss (sum over 4 layers) {b['aux_loss']:.3f}."
        )
        p = r["params"]
        notes.append(
            f"- [{dev}] parameters: base {p['base']:,}, upcycled {p['moe_top1']:,}, lora_moe {p['lora_moe']:,}."
        )
        if r.get("profile_moe_top1"):
            top = ", ".join(f"{e['op']} {e['self_cpu_ms']:.1f} ms" for e in r["profile_moe_top1"][:6])
            notes.append(f"- [{dev}] profile of one moe top-1 forward (self CPU time): {top}.")
    return "\n".join(head) + C.markdown_table(rows, cols) + "\n" + "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run (< 60 s): batch {BATCH} x {QUICK_SEQ}, 2 rounds, 1 thread; not judged",
    )
    ap.add_argument("--out", type=Path, default=C.RESULTS_DIR / "bench_moe.json", help="JSON results path")
    ap.add_argument("--md", type=Path, default=None, help="markdown table path (default: --out with .md)")
    ap.add_argument("--devices", default="auto", help="comma list of cpu,cuda (default: cpu, and cuda if present)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default 15; quick 2)")
    ap.add_argument(
        "--threads",
        default=None,
        help="comma list of torch intra-op thread counts to time the CPU at (default: the cores "
        "this process may use, then 1; --quick: 1)",
    )
    ap.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="profile one upcycled forward (default: on, off with --quick)",
    )
    args = ap.parse_args(argv)
    if args.profile is None:
        args.profile = not args.quick
    md_path = args.md or args.out.with_suffix(".md")
    cores = C.set_threads()
    if args.threads:
        args.thread_counts = [int(t) for t in args.threads.split(",")]
    else:  # one thread too: on a shared machine it is the reading least hurt by other processes
        args.thread_counts = [1] if args.quick else list(dict.fromkeys([cores, 1]))
    threads = args.thread_counts[0]
    torch.set_num_threads(threads)
    devices = (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if args.devices == "auto"
        else [d.strip() for d in args.devices.split(",") if d.strip()]
    )
    t_start = time.time()
    results: dict[str, Any] = {
        "benchmark": "bench_moe",
        "quick": args.quick,
        "started": t_start,
        "env": C.environment(),
        "setup": {
            "model": SMALL,
            "dtype": "float32",
            "batch": [BATCH, QUICK_SEQ if args.quick else SEQ],
            "moe": {"experts": EXPERTS, "top_k": [1, 2], "targets": "@mlp"},
            "lora_moe": {"experts": LORA_EXPERTS, "r": LORA_R, "top_k": 2, "targets": ATTN},
            "thread_counts": args.thread_counts,
        },
        "targets": TARGET,
        "devices": {},
    }
    with _quiet():
        import surgery  # noqa: F401
    for dev in devices:
        results["devices"][dev] = run_device(dev, args)
        gc.collect()
    results["elapsed_s"] = time.time() - t_start
    results["env"]["load_average_at_end"] = C.load_average()
    md = markdown(results)
    C.write_results(results, args.out, md_path, md)
    print(md)
    log(f"wrote {args.out} and {md_path} in {results['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
