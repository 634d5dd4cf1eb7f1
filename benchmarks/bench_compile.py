"""torch.compile of a model with an injected LoRA against the base model, on CPU.

    python benchmarks/bench_compile.py            # full run: a few minutes on 2 CPU cores
    python benchmarks/bench_compile.py --quick    # smoke run

Writes docs/results/bench_compile.json (or --out) and a markdown table
docs/results/bench_compile.md (or --md). See benchmarks/README.md.

Model: LlamaForCausalLM(hidden 256, intermediate 688, 2 layers, 4 heads, vocab 1000), fp32, inference;
LoRA r=16, alpha=32 on q/k/v/o/gate/up/down (a trained-looking delta: lora_B ~ N(0, 0.01)).
Measurements:

1. compile time: the first call of `torch.compile(model)` (default inductor backend), base vs injected,
   in alternating order, after `torch._dynamo.reset()` with inductor's FX-graph and AOT-autograd caches
   off; inductor's own one-time start-up is paid by a warm-up compile before any of them (kernels the
   two models share may still come from inductor's in-process code cache for the second: hence the
   alternating order and the median);
2. graphs and graph breaks dynamo made for the injected model (one break: the root hook reading the
   context-local active set);
3. steady-state forward, interleaved: eager base, eager injected, compiled base, compiled injected;
4. correctness: compiled vs eager outputs of the injected model (max abs difference).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

CFG = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=1000,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32
BATCH, SEQ = 8, 64
TARGET = {"compile_ratio": 2.0}  # injected first-call compile time / base's

log = C.log


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with C.quiet():
        return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


def injected(base: nn.Module) -> nn.Module:
    import surgery

    model = copy.deepcopy(base)
    surgery.inject(model, "lora", targets=TARGETS, r=R, alpha=ALPHA)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):  # the parameter (stored as lora_B.weight in a Delta)
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model.eval()


def cold() -> None:
    """Forget every compiled graph, and keep inductor from reusing one from its caches."""
    import torch._dynamo
    import torch._inductor.config as ic

    torch._dynamo.reset()
    ic.fx_graph_cache = False
    ic.fx_graph_remote_cache = False
    ic.autotune_local_cache = False
    try:
        import torch._functorch.config as fc

        fc.enable_autograd_cache = False
    except (ImportError, AttributeError):
        pass


def compile_time(model: nn.Module, x: torch.Tensor) -> tuple[float, nn.Module]:
    compiled = torch.compile(model)
    with torch.no_grad(), C.quiet():
        t, _ = C.once(lambda: compiled(input_ids=x))
    return t, compiled


def dynamo_report(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Graphs and graph breaks dynamo makes for `model` (eager backend: tracing only)."""
    import torch._dynamo

    cold()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), C.quiet():
        compiled(input_ids=x)
    breaks = {k.split("\n")[0]: v for k, v in torch._dynamo.utils.counters["graph_break"].items()}
    return {
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "graph_breaks": sum(breaks.values()),
        "break_reasons": breaks,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one compile each, few rounds (a smoke run)")
    ap.add_argument("--out", type=Path, default=C.RESULTS_DIR / "bench_compile.json", help="JSON results path")
    ap.add_argument("--md", type=Path, default=None, help="markdown table path (default: --out with .md)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--reps", type=int, default=None, help="compiles of each model (default 2; quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="timed forward rounds (default 15; quick 3)")
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 2)
    rounds = args.rounds or (3 if args.quick else 15)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    results: dict[str, Any] = {
        "benchmark": "bench_compile",
        "quick": args.quick,
        "env": C.environment(),
        "config": {
            **CFG,
            "targets": TARGETS,
            "r": R,
            "alpha": ALPHA,
            "batch": BATCH,
            "seq": SEQ,
            "reps": reps,
            "rounds": rounds,
        },
        "target": TARGET,
    }
    base = llama()
    ours = injected(base)
    x = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    log("warm-up compile (inductor start-up)")
    warm = torch.compile(lambda t: torch.nn.functional.gelu(t @ t.t()) + 1)
    results["warmup_compile_s"] = C.once(lambda: warm(torch.randn(8, 8)))[0]

    log("dynamo graphs and breaks")
    results["dynamo"] = {"base": dynamo_report(base, x), "injected": dynamo_report(ours, x)}

    times: dict[str, list[float]] = {"base": [], "injected": []}
    compiled: dict[str, nn.Module] = {}
    for i in range(reps):
        cold()  # once per rep: the two models' frames then compile side by side (the last pair is timed below)
        order = [("base", base), ("injected", ours)]
        for name, model in order if i % 2 == 0 else order[::-1]:
            t, compiled[name] = compile_time(model, x)
            times[name].append(t)
            log(f"compile {name}: {t:.1f} s")
    comp = {n: {"median_s": statistics.median(v), "samples_s": v} for n, v in times.items()}
    comp["ratio"] = comp["injected"]["median_s"] / comp["base"]["median_s"]
    comp["meets_target"] = comp["ratio"] <= TARGET["compile_ratio"]
    results["compile"] = comp

    log("steady-state forward")
    cb, co = compiled["base"], compiled["injected"]
    with torch.no_grad(), C.quiet():
        fns = {
            "eager_base": lambda: base(input_ids=x),
            "eager_injected": lambda: ours(input_ids=x),
            "compiled_base": lambda: cb(input_ids=x),
            "compiled_injected": lambda: co(input_ids=x),
        }
        stats = C.interleaved(fns, rounds=rounds, warmup=2)
        diff = (co(input_ids=x).logits - ours(input_ids=x).logits).abs().max().item()
        base_diff = (ours(input_ids=x).logits - base(input_ids=x).logits).abs().max().item()
    results["forward"] = stats
    results["forward_ratios"] = {
        "compiled_injected/compiled_base": C.ratio(stats, "compiled_injected", "compiled_base"),
        "eager_injected/eager_base": C.ratio(stats, "eager_injected", "eager_base"),
        "compiled_injected/eager_injected": C.ratio(stats, "compiled_injected", "eager_injected"),
    }
    results["max_abs_diff_compiled_vs_eager"] = diff
    results["max_abs_delta_effect"] = base_diff  # the delta really changes the output
    results["elapsed_s"] = time.time() - t_start

    md = markdown(results)
    md_path = args.md or args.out.with_suffix(".md")
    C.write_results(results, args.out, md_path, md)
    print(md)
    return 0


def markdown(r: dict[str, Any]) -> str:
    c, f, fr, d = r["compile"], r["forward"], r["forward_ratios"], r["dynamo"]
    env = r["env"]
    rows = [
        {
            "model": "base",
            "first call (compile)": C.fmt_seconds(c["base"]["median_s"]),
            "graphs": d["base"]["graphs"],
            "graph breaks": d["base"]["graph_breaks"],
            "eager forward": C.fmt_seconds(f["eager_base"]["median_s"]),
            "compiled forward": C.fmt_seconds(f["compiled_base"]["median_s"]),
        },
        {
            "model": f"+ LoRA r={R} (7 targets)",
            "first call (compile)": C.fmt_seconds(c["injected"]["median_s"]),
            "graphs": d["injected"]["graphs"],
            "graph breaks": d["injected"]["graph_breaks"],
            "eager forward": C.fmt_seconds(f["eager_injected"]["median_s"]),
            "compiled forward": C.fmt_seconds(f["compiled_injected"]["median_s"]),
        },
    ]
    cols = ["model", "first call (compile)", "graphs", "graph breaks", "eager forward", "compiled forward"]
    lines = [
        "# torch.compile: injected LoRA vs base",
        "",
        f"LlamaForCausalLM (hidden {CFG['hidden_size']}, {CFG['num_hidden_layers']} layers, vocab "
        f"{CFG['vocab_size']}), fp32, batch {BATCH} x {SEQ} tokens, inference; default inductor backend; "
        f"torch {env['torch']}, transformers {env.get('transformers')}, {env['torch_threads']} threads on "
        f"{env.get('cpu')} (load at start {env.get('load_average_at_start')}).",
        "" if not r["quick"] else "\n**Quick (smoke) run: the figures are not the benchmark's.**\n",
        C.markdown_table(rows, cols),
        "",
        f"- compile time, injected / base: **{c['ratio']:.2f}x** (target <= {TARGET['compile_ratio']}x: "
        f"{'met' if c['meets_target'] else 'NOT met'}); samples base {[round(s, 1) for s in c['base']['samples_s']]} s, "
        f"injected {[round(s, 1) for s in c['injected']['samples_s']]} s (cold: dynamo reset, inductor caches off).",
        f"- compiled forward, injected / base: {fr['compiled_injected/compiled_base']['ratio']:.2f}x; "
        f"eager, injected / base: {fr['eager_injected/eager_base']['ratio']:.2f}x; "
        f"injected, compiled / eager: {fr['compiled_injected/eager_injected']['ratio']:.2f}x.",
        f"- compiled vs eager output of the injected model: max |diff| {r['max_abs_diff_compiled_vs_eager']:.2e} "
        f"(the delta itself moves the logits by up to {r['max_abs_delta_effect']:.2e}).",
        f"- graph breaks of the injected model: {d['injected']['break_reasons'] or 'none'}: the model's root hook "
        "reads the context-local active set once per call (dynamo cannot read a ContextVar) and pins it; the sites "
        "read that plain value, so dynamo compiles one graph per active set.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
