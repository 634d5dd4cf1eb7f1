"""The method contract's cost (issue 10): IA3 forward, DoRA training step, and the engine's idle overhead.

Each figure is a ratio to a peer timed in the same interleaved rounds (see common.py):

1. forward (eval, `torch.no_grad()`) with IA3 injected at its default targets (k, v, down; vectors
   drawn at random) vs the base model: target <= 1.03x. PEFT's IA3 vs the base, for reference.
2. a DoRA training step (forward + backward + AdamW over the adapter tensors) with
   `surgery.inject(model, "dora", r=16, targets q,k,v,o)` vs PEFT `LoraConfig(use_dora=True)` on the
   same targets, same tensors: target ours / PEFT <= 1.0.
3. the engine with no active delta: a LoRA on all 7 projections, switched off by `surgery.disable`
   and by `surgery.activate(model)` with nothing, vs the plain base model: target <= 1.01x. Also a
   merged LoRA (base speed expected) and the LoRA active, for reference.

    python benchmarks/bench_methods.py            # writes docs/results/bench_methods.{json,md}
    python benchmarks/bench_methods.py --quick    # smoke run on a tiny model, not judged
    python benchmarks/bench_methods.py --device cuda --dtype bf16 --out docs/results/bench_methods_cuda.json

Model: LlamaForCausalLM(hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8000), batch 4 x 128.
On a GPU a forward of this batch is a few ms, mostly kernel launches, so the per-call Python cost
of hooks weighs more there than on CPU; `--batch` / `--seq` give the GPU real work.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C  # noqa: E402

MODEL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, vocab_size=8000)
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
BATCH, SEQ = 4, 128
QUICK_BATCH, QUICK_SEQ = 2, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
IA3_PEFT = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
R, ALPHA, NAME = 16, 32, "default"
TARGET = {"ia3_forward": 1.03, "dora_train": 1.00, "idle_forward": 1.01}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

log = C.log


def llama(cfg: dict, dev: str, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with C.quiet():
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(**cfg))
    return m.to(dev, dtype).eval()


@torch.no_grad()
def randomize(model: nn.Module, name: str, seed: int) -> None:
    """Make the delta live: lora_B ~ N(0, 0.01), IA3 vectors ~ 1 + N(0, 0.1); other tensors as initialised."""
    from surgery import engine

    g = torch.Generator().manual_seed(seed)
    for ad in engine.adapters(model, name).values():
        for pname, p in ad.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            elif "ia3" in pname:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)


@torch.no_grad()
def copy_to_peft(pm: nn.Module, ours: nn.Module, name: str) -> int:
    """Copy our delta's tensors into PEFT's adapter `name` (same key layout as PEFT saves it)."""
    import surgery

    ts = surgery.delta(ours, name).tensors
    n = 0
    missing = []
    for key, p in pm.named_parameters():
        if f".{name}" not in key:
            continue
        ours_key = key.removeprefix("base_model.model.").replace(f".{name}", "", 1)
        # PEFT holds the DoRA magnitude as lora_magnitude_vector.<name>.weight but saves it without ".weight"
        t = ts.get(ours_key, ts.get(ours_key.removesuffix(".weight")))
        if t is None or t.numel() != p.numel():
            missing.append(key)
            continue
        p.copy_(t.reshape(p.shape))
        n += 1
    if missing or n != len(ts):
        raise RuntimeError(f"PEFT/ours tensors do not line up: {n} copied of {len(ts)}, missing {missing[:3]}")
    return n


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def timing(fns: dict[str, Callable[[], Any]], opt: argparse.Namespace, rounds: int = 0) -> dict[str, dict[str, Any]]:
    # on CUDA a forward of this model is a few ms: one sample then times a batch of calls
    return C.interleaved(
        fns,
        rounds or opt.rounds,
        opt.warmup,
        device=opt.device,
        min_sample_s=0.05 if torch.device(opt.device).type == "cuda" else 0,
        clock=opt.timer,
    )


def inputs(opt: argparse.Namespace, cfg: dict) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg["vocab_size"], (opt.batch, opt.seq), generator=g).to(opt.device)
    return {"input_ids": ids, "use_cache": False}


# ----------------------------------------------------------------------------- 3. idle overhead


def idle_calls(opt: argparse.Namespace, cfg: dict, kw: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """Forwards of the base, and of a LoRA-injected copy switched off, merged, or active."""
    import surgery

    base = llama(cfg, opt.device, opt.dtype)
    lora = copy.deepcopy(base)
    surgery.inject(lora, "lora", targets=LORA_TARGETS, r=R, alpha=ALPHA, name=NAME)
    randomize(lora, NAME, 1)
    surgery.activate(lora)  # nothing active by default: a plain call runs the base alone
    merged = copy.deepcopy(lora)
    surgery.merge(merged, NAME)

    def disabled() -> Any:
        with surgery.disable(lora):
            return lora(**kw)

    def active() -> Any:
        with surgery.use(lora, NAME):
            return lora(**kw)

    return {
        "base": lambda: base(**kw),
        "base_again": lambda: base(**kw),  # an A/A control: the run's noise floor
        "disabled": disabled,
        "activate_none": lambda: lora(**kw),
        "merged": lambda: merged(**kw),
        "active": active,
    }


def bench_idle(opt: argparse.Namespace, cfg: dict) -> dict[str, Any]:
    kw = inputs(opt, cfg)
    fns = calls = idle_calls(opt, cfg, kw)
    with torch.no_grad():
        ref = calls["base"]().logits
        check = {
            "disabled_equals_base": torch.equal(calls["disabled"]().logits, ref),
            "activate_none_equals_base": torch.equal(calls["activate_none"]().logits, ref),
            "max_abs_diff_active_vs_base": max_diff(calls["active"]().logits, ref),
            "max_abs_diff_merged_vs_active": max_diff(calls["merged"]().logits, calls["active"]().logits),
        }
        st = timing(fns, opt, 2 * opt.rounds)  # the tightest target: twice the rounds
        del fns, calls
        gc.collect()
        # The engine's cost is per call and per site, whatever the widths: read it in seconds on a
        # skeleton (the same layers and sites, width 64, 1 x 16 tokens: the forward is then mostly
        # Python), timed in batches of calls, and set it against the full base forward.
        skel = dict(cfg, hidden_size=64, intermediate_size=172, num_attention_heads=4, vocab_size=512)
        small = idle_calls(opt, skel, {"input_ids": kw["input_ids"][:1, :16] % 512, "use_cache": False})
        del small["base_again"], small["active"]
        st_small = C.interleaved(
            small, 2 * opt.rounds, opt.warmup, device=opt.device, min_sample_s=0.1, clock=opt.timer
        )
    out: dict[str, Any] = {"stats": st, "check": check, "sites": len(LORA_TARGETS) * cfg["num_hidden_layers"]}
    for k in st:
        if k != "base":
            out[f"{k}_over_base"] = C.ratio(st, k, "base")
    b = st_small["base"]["median_s"]
    out["per_call"] = {"skeleton": skel, "batch": [1, 16], "stats": st_small}
    for k in small:
        if k != "base":
            extra = st_small[k]["median_s"] - b
            out["per_call"][k] = {"extra_s": extra, "extra_over_full_base": extra / st["base"]["median_s"]}
    return out


# ----------------------------------------------------------------------------- 1. IA3 forward


def bench_ia3(opt: argparse.Namespace, cfg: dict) -> dict[str, Any]:
    from peft import IA3Config, get_peft_model

    import surgery

    base = llama(cfg, opt.device, opt.dtype)
    ours = copy.deepcopy(base)
    inj = surgery.inject(ours, "ia3", name=NAME)  # the method's default targets
    randomize(ours, NAME, 2)
    with C.quiet():
        pm = get_peft_model(copy.deepcopy(base), IA3Config(**IA3_PEFT)).eval()
    out: dict[str, Any] = {"ours_sites": sorted(surgery.engine.adapters(ours, NAME)), "injection": repr(inj)}
    try:
        out["tensors_copied_to_peft"] = copy_to_peft(pm, ours, NAME)
    except RuntimeError as e:  # still time PEFT, with vectors of its own
        out["copy_error"] = str(e)
        randomize_peft_ia3(pm)
    kw = inputs(opt, cfg)
    fns = {"base": lambda: base(**kw), "ours": lambda: ours(**kw), "peft": lambda: pm(**kw)}
    with torch.no_grad():
        ref, o, p = base(**kw).logits, ours(**kw).logits, pm(**kw).logits
        out["check"] = {"max_abs_diff_ours_vs_peft": max_diff(o, p), "max_abs_diff_ours_vs_base": max_diff(o, ref)}
        out["stats"] = st = timing(fns, opt)
    out["ours_over_base"] = C.ratio(st, "ours", "base")
    out["peft_over_base"] = C.ratio(st, "peft", "base")
    out["ours_over_peft"] = C.ratio(st, "ours", "peft")
    return out


@torch.no_grad()
def randomize_peft_ia3(pm: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    for key, p in pm.named_parameters():
        if "ia3_l" in key:
            p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------- 2. DoRA training step


def bench_dora(opt: argparse.Namespace, cfg: dict) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    import surgery

    base = llama(cfg, opt.device, opt.dtype)
    ours = copy.deepcopy(base)
    surgery.inject(ours, "dora", targets=DORA_TARGETS, r=R, alpha=ALPHA, name=NAME)
    randomize(ours, NAME, 3)
    with C.quiet():
        lc = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=DORA_TARGETS, use_dora=True)
        pm = get_peft_model(copy.deepcopy(base), lc)
    out: dict[str, Any] = {"tensors_copied_to_peft": copy_to_peft(pm, ours, NAME)}
    del base
    kw = inputs(opt, cfg)
    kw["labels"] = kw["input_ids"]
    with torch.no_grad():
        o, p = ours(**kw), pm(**kw)
        out["check"] = {
            "max_abs_diff_logits_ours_vs_peft": max_diff(o.logits, p.logits),
            "loss_ours": o.loss.item(),
            "loss_peft": p.loss.item(),
        }
    steps = {}
    for label, m in (("ours", ours), ("peft", pm)):
        m.train()
        params = [q for q in m.parameters() if q.requires_grad]
        out[f"trainable_{label}"] = sum(q.numel() for q in params)
        opt_ = torch.optim.AdamW(params, lr=1e-4)

        def step(m: nn.Module = m, o: torch.optim.Optimizer = opt_) -> None:
            o.zero_grad(set_to_none=True)
            m(**kw).loss.backward()
            o.step()

        steps[label] = step
    out["stats"] = st = timing(steps, opt)
    out["ours_over_peft"] = C.ratio(st, "ours", "peft")
    return out


# ----------------------------------------------------------------------------- report


def fmt(st: dict[str, Any]) -> str:
    return f"{C.fmt_seconds(st['median_s'])} / {C.fmt_seconds(st['min_s'])}"


def markdown(res: dict[str, Any]) -> str:
    env, s = res["env"], res["setup"]
    quick = res["quick"]
    head = [
        "# Method contract: IA3 forward, DoRA training step, idle engine overhead",
        "",
        f"Generated by `benchmarks/bench_methods.py{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(res['started']))}: torch {env['torch']}, "
        f"transformers {env['transformers']}, peft {env['peft']}, {env.get('cuda_device') or env.get('cpu')}, "
        f"device {s['device']}, {s['threads']} torch thread(s) (load average at start "
        f"{env['load_average_at_start']}, at end {env.get('load_average_at_end')}); {res['elapsed_s']:.0f} s.",
        "",
        f"Model: LlamaForCausalLM {s['model']}, {s['dtype']}, batch {s['batch'][0]} x {s['batch'][1]} tokens"
        f"{' (--quick: a tiny model, figures not judged)' if quick else ''}. Timings: {s['warmup']} warm-ups, "
        f"then {s['rounds']} interleaved rounds ({2 * s['rounds']} for part 3) (contenders in rotating order); times ("
        f"{'CPU time of this process' if s['clock'] == 'cpu' else 'wall clock'}) are median / min over "
        "rounds; `ratio` is the median over rounds of the ratio within a round (ratios of medians and of "
        "minima, and every sample, are in the JSON).",
        "",
    ]
    rows: list[dict[str, Any]] = []

    def judged(ok: bool) -> Any:
        return f"({'yes' if ok else 'no'}; --quick)" if quick else ok

    ia3 = res.get("ia3", {})
    if "error" in ia3:
        rows.append({"measurement": "1. forward with IA3 (k, v, down)", "ours": ia3["error"]})
    elif ia3:
        st, r, p = ia3["stats"], ia3["ours_over_base"], ia3["peft_over_base"]
        rows.append(
            {
                "measurement": "1. forward (no_grad) with IA3 (k, v, down) vs base",
                "ours": f"{fmt(st['ours'])} ({r['ratio']:.3f}x; mins {r['ratio_of_mins']:.3f}x)",
                "peer": f"base {fmt(st['base'])}",
                "ratio": f"{r['ratio']:.3f}",
                "target": f"<= {TARGET['ia3_forward']}",
                "met?": judged(r["ratio"] <= TARGET["ia3_forward"]),
            }
        )
        rows.append(
            {
                "measurement": "1. (reference) PEFT IA3 forward vs base; ours / PEFT",
                "ours": f"ours / PEFT {ia3['ours_over_peft']['ratio']:.3f}",
                "peer": f"PEFT {fmt(st['peft'])} ({p['ratio']:.3f}x base)",
                "ratio": f"{p['ratio']:.3f}",
            }
        )
    dora = res.get("dora", {})
    if "error" in dora:
        rows.append({"measurement": "2. DoRA training step", "ours": dora["error"]})
    elif dora:
        st, r = dora["stats"], dora["ours_over_peft"]
        rows.append(
            {
                "measurement": "2. DoRA r=16 (q, k, v, o) training step (fwd + bwd + AdamW) vs PEFT use_dora",
                "ours": fmt(st["ours"]),
                "peer": f"PEFT {fmt(st['peft'])}",
                "ratio": f"{r['ratio']:.3f} (mins {r['ratio_of_mins']:.3f})",
                "target": f"<= {TARGET['dora_train']}",
                "met?": judged(r["ratio"] <= TARGET["dora_train"]),
            }
        )
    idle = res.get("idle", {})
    if "error" in idle:
        rows.append({"measurement": "3. idle engine overhead", "ours": idle["error"]})
    elif idle:
        st = idle["stats"]
        what = {
            "base_again": ("3. (A/A control: the noise floor) the base again", False),
            "disabled": ("3. LoRA (7 projections) injected, `with surgery.disable(model)`", True),
            "activate_none": ("3. LoRA injected, `surgery.activate(model)` with nothing", True),
            "merged": ("3. LoRA merged", False),
            "active": ("3. (reference) LoRA active, unmerged", False),
        }
        for k, (label, target) in what.items():
            r = idle[f"{k}_over_base"]
            rows.append(
                {
                    "measurement": f"{label} vs base",
                    "ours": f"{fmt(st[k])} ({r['ratio']:.3f}x; mins {r['ratio_of_mins']:.3f}x)",
                    "peer": f"base {fmt(st['base'])}",
                    "ratio": f"{r['ratio']:.3f}",
                    "target": f"<= {TARGET['idle_forward']}" if target else "",
                    "met?": judged(r["ratio"] <= TARGET["idle_forward"]) if target else None,
                }
            )
        pc = idle["per_call"]
        for k in ("disabled", "activate_none", "merged"):
            frac = pc[k]["extra_over_full_base"]
            rows.append(
                {
                    "measurement": f"3. per-call cost, {k}: extra time per forward on the skeleton "
                    "(same sites, width 64, 1 x 16 tokens), as a share of the full base forward",
                    "ours": f"{pc[k]['extra_s'] * 1e6:+.0f} µs per call",
                    "peer": f"skeleton base {C.fmt_seconds(pc['stats']['base']['median_s'])}",
                    "ratio": f"{1 + frac:.4f}",
                    "target": f"<= {TARGET['idle_forward']}" if k != "merged" else "",
                    "met?": judged(1 + frac <= TARGET["idle_forward"]) if k != "merged" else None,
                }
            )
    notes = ["", "Checks (same run):", ""]
    if "check" in ia3:
        c = ia3["check"]
        notes.append(
            f"- IA3: {len(ia3['ours_sites'])} sites; logits ours vs PEFT max |diff| "
            f"{c['max_abs_diff_ours_vs_peft']:.3g} (ours vs base {c['max_abs_diff_ours_vs_base']:.3g}: the "
            "vectors are live)" + (f"; PEFT got its own vectors: {ia3['copy_error']}" if "copy_error" in ia3 else "")
        )
    if "check" in dora:
        c = dora["check"]
        notes.append(
            f"- DoRA: logits ours vs PEFT max |diff| {c['max_abs_diff_logits_ours_vs_peft']:.3g}, loss "
            f"{c['loss_ours']:.6g} vs {c['loss_peft']:.6g}; trainable parameters {dora['trainable_ours']:,} "
            f"vs {dora['trainable_peft']:,}."
        )
    if "check" in idle:
        c = idle["check"]
        notes.append(
            f"- Idle: {idle['sites']} LoRA sites; disabled and activate-nothing logits equal the base's "
            f"bit for bit: {c['disabled_equals_base']}, {c['activate_none_equals_base']}; active vs base max "
            f"|diff| {c['max_abs_diff_active_vs_base']:.3g} (the delta is live), merged vs active "
            f"{c['max_abs_diff_merged_vs_active']:.3g}."
        )
    if "stats" in idle:
        st = idle["stats"]
        aa = sorted(a / b for a, b in zip(st["base_again"]["samples_s"], st["base"]["samples_s"], strict=True))
        notes.append(
            f"- Noise floor: the A/A control's per-round ratios (the base against itself) span "
            f"{aa[len(aa) // 4]:.3f} to {aa[3 * len(aa) // 4]:.3f} between quartiles ({aa[0]:.3f} to {aa[-1]:.3f} "
            "in all): a full-size ratio closer to 1 than that is not resolved by this run; the per-call rows "
            "measure the engine's own cost in seconds instead."
        )
    table = C.markdown_table(rows, ["measurement", "ours", "peer", "ratio", "target", "met?"])
    return "\n".join(head) + "\n" + table + "\n" + "\n".join(notes)


def run_part(name: str, fn: Callable[[argparse.Namespace, dict], dict], opt: argparse.Namespace, cfg: dict) -> dict:
    import surgery

    method = {"ia3": "ia3", "dora": "dora"}.get(name)
    if method and method not in surgery.METHODS:
        log(f"[{name}] skipped: method {method!r} not available")
        return {"error": f"method {method!r} not available"}
    return C.run_part(name, fn, opt, cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run on a tiny model: seconds, not judged")
    ap.add_argument("--out", type=Path, default=C.RESULTS_DIR / "bench_methods.json", help="JSON results path")
    ap.add_argument("--md", type=Path, default=None, help="markdown path (default: --out with .md)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype (bf16: for CUDA)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default 15; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per contender (default 2; quick 1)")
    ap.add_argument("--batch", type=int, default=None, help=f"sequences per batch (default {BATCH})")
    ap.add_argument("--seq", type=int, default=None, help=f"tokens per sequence (default {SEQ})")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: every core)")
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="what a sample measures: this process's CPU time (default on CPU: other jobs on the machine "
        "do not count) or wall time (default, and the only choice, on CUDA)",
    )
    ap.add_argument("--parts", default="idle,ia3,dora", help="which measurements, comma-separated")
    ap.add_argument("--hidden", type=int, default=0, help="width of the model (default 512; 2048: a 1B-sized Llama)")
    opt = ap.parse_args(argv)
    # --quick: one thread, as bench_lora (a smoke run's small ops make two threads wait on each other)
    threads = opt.threads or (1 if opt.quick else C.set_threads())
    torch.set_num_threads(threads)
    opt.rounds = opt.rounds or (2 if opt.quick else 15)
    opt.warmup = opt.warmup if opt.warmup is not None else (1 if opt.quick else 2)
    opt.batch = opt.batch or (QUICK_BATCH if opt.quick else BATCH)
    opt.seq = opt.seq or (QUICK_SEQ if opt.quick else SEQ)
    opt.dtype = DTYPES[opt.dtype]
    cuda = torch.device(opt.device).type == "cuda"
    opt.clock = opt.clock or ("wall" if cuda else "cpu")
    if opt.clock == "cpu" and cuda:
        ap.error("--clock cpu cannot see GPU time: use --clock wall with --device cuda")
    # this process's CPU time on a shared machine, so other jobs stop counting (with one torch
    # thread, CPU time is the work); wall time on CUDA, where the work is the device's
    opt.timer = time.process_time if opt.clock == "cpu" else time.perf_counter
    cfg = TINY if opt.quick else MODEL
    if opt.hidden:  # the same shape, wider: where compute, not per-call overhead, sets the time
        cfg = dict(
            cfg, hidden_size=opt.hidden, intermediate_size=opt.hidden * 11 // 4, num_attention_heads=opt.hidden // 64
        )
    res: dict[str, Any] = {
        "benchmark": "bench_methods",
        "quick": opt.quick,
        "started": time.time(),
        "env": C.environment(opt.device),
        "setup": {
            "model": cfg,
            "dtype": str(opt.dtype).removeprefix("torch."),
            "device": opt.device,
            "batch": [opt.batch, opt.seq],
            "rounds": opt.rounds,
            "warmup": opt.warmup,
            "threads": threads,
            "clock": opt.clock,
            "lora": {"r": R, "alpha": ALPHA, "idle_targets": LORA_TARGETS, "dora_targets": DORA_TARGETS},
            "peft_ia3": IA3_PEFT,
        },
        "targets": TARGET,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import surgery  # noqa: F401

        parts = {"idle": bench_idle, "ia3": bench_ia3, "dora": bench_dora}
        for name in opt.parts.split(","):
            res[name] = run_part(name, parts[name], opt, cfg)
    res["env"]["load_average_at_end"] = C.load_average()
    res["elapsed_s"] = time.time() - res["started"]
    md = markdown(res)
    if opt.quick and opt.md is None and opt.out == C.RESULTS_DIR / "bench_methods.json":
        print(md)  # a smoke run does not overwrite the benchmark's results
        return 0
    C.write_results(res, opt.out, opt.md or opt.out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
