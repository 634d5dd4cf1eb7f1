"""Serving many LoRA deltas at once (issue 11): a slot bank with per-row routing vs the base and PEFT.

Ours and PEFT are each timed against the base in interleaved rounds (see common.py); PEFT's calls are
slow on CPU (a loop over the distinct adapters at every site), so they get rounds of their own, fewer:

1. prefill: one forward of 64 x 32 tokens with k distinct deltas (k = 1 .. 64, rows round-robin):
   ours `surgery.serve` + `surgery.route`, PEFT one `PeftModel` with 64 adapters and `adapter_names=`.
   Targets: ours with 64 distinct <= 1.15x the base, with 8 <= 1.10x.
2. decode: one step (64 rows, one new token, a KV cache of 32 positions) with 64 distinct deltas;
   the cache is cut back to 32 positions before every step, untimed. Target: ours <= 1.3x the base.
3. mixed ranks: 32 deltas of rank 16 and 32 of rank 4 in one batch (max_rank 16), against the
   rank-4 deltas zero-padded to 16 (what a bank without rank groups would compute), all-16 and all-4.
4. throughput (tokens/s) against the number of distinct deltas, as a hand-written SVG.
5. outputs (untimed): ours and PEFT per row, max |diff| of the logits.

    python benchmarks/bench_serving.py          # writes docs/results/bench_serving.md and serving_throughput.svg
    python benchmarks/bench_serving.py --quick  # smoke run on a tiny model: prints, writes nothing, not judged
    python benchmarks/bench_serving.py --device cuda --dtype bf16 --md docs/results/bench_serving_cuda.md

Model: LlamaForCausalLM(hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 1000), eval, `torch.no_grad()`;
LoRA r=16, alpha=16 at every linear site (ours `targets="@linear"`, PEFT `target_modules="all-linear"`: the
same 28 projections); A ~ U(+-1/sqrt(in)) and B ~ N(0, 0.02), a different draw per delta, so every row differs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import math
import os
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

MODEL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, vocab_size=1000)
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
BATCH, SEQ, QUICK_BATCH, QUICK_SEQ = 64, 32, 8, 8
R, ALPHA, LOW_R = 16, 16, 4
TARGET = {"prefill_64": 1.15, "prefill_8": 1.10, "decode_64": 1.3, "max_abs_diff": 1e-4}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

log = C.log


def llama(cfg: dict, opt: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with C.quiet():
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(**cfg))
    return m.to(opt.device, opt.dtype).eval()


def random_deltas(base: nn.Module, n: int, r: int, seed: int) -> list[Any]:
    """`n` LoRA deltas of rank `r` at every linear site, each its own random draw."""
    import surgery

    probe = copy.deepcopy(base)
    surgery.inject(probe, "lora", targets="@linear", r=r, alpha=r, name="probe")
    template = surgery.delta(probe, "probe")
    del probe
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        ts = {}
        for key, t in template.tensors.items():
            if "lora_A" in key:
                bound = 1 / math.sqrt(t.shape[1])
                ts[key] = (torch.rand(t.shape, generator=g) * 2 - 1) * bound
            else:
                ts[key] = torch.randn(t.shape, generator=g) * 0.02
        out.append(dataclasses.replace(template, name=f"r{r}_{i}", tensors=ts))
    return out


def serve(base: nn.Module, slots: int, loads: list[Any]) -> tuple[nn.Module, Any]:
    """A copy of the base with a slot bank, slot i holding loads[i] (a Delta or a Prepared)."""
    import surgery

    m = copy.deepcopy(base)
    bank = surgery.serve(m, slots=slots, max_rank=R, targets="@linear")
    for i, d in enumerate(loads):
        bank.load(i, d)
    return m, bank


def padded(bank: Any, delta: Any) -> Any:
    """`delta` prepared with its factors zero-padded to rank R: one rank group, as a bank without groups runs it."""
    import surgery

    prep = bank.prepare(delta)
    pad = {
        p: (
            torch.cat([A, A.new_zeros(R - A.shape[0], A.shape[1])]),
            torch.cat([B, B.new_zeros(R - B.shape[0], B.shape[1])]),
            mul,
            add,
        )
        for p, (A, B, mul, add) in prep.factors.items()
    }
    return surgery.Prepared(prep.label, prep.base, R, pad)


@torch.no_grad()
def peft_model(base: nn.Module, deltas: list[Any]) -> nn.Module:
    """One PeftModel holding every delta as an adapter named after it, with our tensors copied in."""
    from peft import LoraConfig, get_peft_model

    def cfg(d: Any) -> LoraConfig:
        return LoraConfig(r=d.config["r"], lora_alpha=d.config["alpha"], lora_dropout=0.0, target_modules="all-linear")

    with C.quiet():
        pm = get_peft_model(copy.deepcopy(base), cfg(deltas[0]), adapter_name=deltas[0].name)
        for d in deltas[1:]:
            pm.add_adapter(d.name, cfg(d))
    by_name = {d.name: d.tensors for d in deltas}
    copied = 0
    for key, p in pm.named_parameters():
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                head, tail = key.removeprefix("base_model.model.").split(part)
                name, suf = tail.split(".", 1)
                p.copy_(by_name[name][f"{head}{part}{suf}"].to(p.dtype))
                copied += 1
    if copied != sum(len(t) for t in by_name.values()):
        raise RuntimeError(f"PEFT holds {copied} LoRA tensors, our deltas {sum(len(t) for t in by_name.values())}")
    return pm.eval()


def forward(model: nn.Module, slots: list[int], **kw: Any) -> Any:
    """One call of our model with row i on slot slots[i] (the route is built per call, as a server would)."""
    import surgery

    with surgery.route(model, slots):
        return model(**kw)


def peft_forward(pm: nn.Module, names: list[str], **kw: Any) -> Any:
    return pm(adapter_names=names, **kw)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def timing(
    fns: dict[str, Callable[[], Any]], opt: argparse.Namespace, setup: dict | None = None, rounds: int = 0
) -> dict[str, Any]:
    cuda = torch.device(opt.device).type == "cuda"
    return C.interleaved(
        fns,
        rounds or opt.rounds,
        opt.warmup,
        device=opt.device,
        min_sample_s=0.05 if cuda else 0,
        setup=setup,
        clock=opt.timer,
    )


def ratios(st: dict[str, Any], den: str = "base") -> dict[str, Any]:
    return {k: C.ratio(st, k, den) for k in st if k != den}


# ----------------------------------------------------------------------------- the contenders


class Rig:
    """The base, ours (64 slots, rank 16) and PEFT (the same 64 deltas), built once for every part."""

    def __init__(self, opt: argparse.Namespace, cfg: dict) -> None:
        import surgery

        t = time.perf_counter()
        self.base = llama(cfg, opt)
        self.deltas = random_deltas(self.base, opt.slots, R, seed=1000)
        self.ours, self.bank = serve(self.base, opt.slots, self.deltas)
        self.plain = copy.deepcopy(self.base)  # one delta injected the ordinary way: unmerged LoRA's own cost
        surgery.apply(self.plain, self.deltas[0])
        self.pm = peft_model(self.base, self.deltas)
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, cfg["vocab_size"], (opt.batch, opt.seq), generator=g).to(opt.device)
        self.setup_s = time.perf_counter() - t

    def rows(self, k: int) -> list[int]:
        return [i % k for i in range(len(self.ids))]

    def names(self, slots: list[int]) -> list[str]:
        return [self.deltas[s].name for s in slots]


# ----------------------------------------------------------------------------- 1. prefill, 5. check


def bench_prefill(opt: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    """Ours and PEFT each against the base in rounds of their own (PEFT's rounds are long: fewer of them)."""
    kw = {"input_ids": rig.ids, "use_cache": False}
    ours: dict[str, Callable[[], Any]] = {
        "base": lambda: rig.base(**kw),
        "base_again": lambda: rig.base(**kw),
        "plain": lambda: rig.plain(**kw),
    }
    peft: dict[str, Callable[[], Any]] = {"base": lambda: rig.base(**kw)}
    for k in opt.ks:
        s, n = rig.rows(k), rig.names(rig.rows(k))
        ours[f"ours_{k}"] = lambda s=s: forward(rig.ours, s, **kw)
        peft[f"peft_{k}"] = lambda n=n: peft_forward(rig.pm, n, **kw)
    with torch.no_grad():
        k = opt.ks[-1]
        ref = rig.base(**kw).logits
        o = forward(rig.ours, rig.rows(k), **kw).logits
        p = peft_forward(rig.pm, rig.names(rig.rows(k)), **kw).logits
        per_row = (o.float() - p.float()).abs().amax(dim=(1, 2))
        base_rows = forward(rig.ours, [-1] * len(rig.ids), **kw).logits  # rows routed to the base
        one = forward(rig.ours, rig.rows(1), **kw).logits
        check = {
            "k": k,
            "max_abs_diff_ours_vs_peft": per_row.max().item(),
            "rows_within_tol": int((per_row <= TARGET["max_abs_diff"]).sum()),
            "rows": len(per_row),
            "max_abs_diff_ours_vs_base": max_diff(o, ref),
            "max_abs_diff_route_base_vs_base": max_diff(base_rows, ref),
            "max_abs_diff_one_slot_vs_plain": max_diff(one, rig.plain(**kw).logits),
            "distinct_rows": len({tuple(row[-1, :8].tolist()) for row in o.float().cpu()}),
        }
        del ref, o, p, base_rows, one
        st = timing(ours, opt)
        st_peft = timing(peft, opt, rounds=opt.peft_rounds)
    over = {**ratios(st_peft), **ratios(st)}
    return {"stats": {**st_peft, **st}, "over_base": over, "peft_base": st_peft["base"], "check": check}


# ----------------------------------------------------------------------------- 2. decode


def rewind(cache: Any, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def bench_decode(opt: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    """`ours_held`: one route open over the prefill and every step, as around `generate` (the route keeps the
    rows' gathered factors while it is open); `ours_{k}`: a new route for every step."""
    import surgery

    k = opt.ks[-1]
    slots, names, step_ids = rig.rows(k), rig.names(rig.rows(k)), rig.ids[:, -1:]
    runs: dict[str, Callable[..., Any]] = {
        "base": lambda **kw: rig.base(**kw),
        "base_again": lambda **kw: rig.base(**kw),
        "ours_held": lambda **kw: rig.ours(**kw),
        f"ours_{k}": lambda **kw: forward(rig.ours, slots, **kw),
        f"peft_{k}": lambda **kw: peft_forward(rig.pm, names, **kw),
    }
    fns, setup, logits = {}, {}, {}
    # transformers >= 5.24 names the KV cache `cache`; before, `past_key_values`
    arg = "cache" if "cache" in inspect.signature(rig.base.forward).parameters else "past_key_values"
    with torch.no_grad(), surgery.route(rig.ours, slots):
        for name, run in runs.items():
            cache = run(input_ids=rig.ids, use_cache=True)[arg]  # the prefill, once
            logits[name] = run(input_ids=step_ids, **{arg: cache}, use_cache=True).logits
            fns[name] = lambda run=run, cache=cache: run(input_ids=step_ids, **{arg: cache}, use_cache=True)
            setup[name] = lambda cache=cache: rewind(cache, opt.seq)
        check = {
            "max_abs_diff_ours_vs_peft": max_diff(logits[f"ours_{k}"], logits[f"peft_{k}"]),
            "max_abs_diff_held_vs_per_step": max_diff(logits["ours_held"], logits[f"ours_{k}"]),
            "max_abs_diff_ours_vs_base": max_diff(logits[f"ours_{k}"], logits["base"]),
        }
        st = timing(fns, opt, setup, rounds=3 * opt.rounds)  # short calls: more rounds
    return {"stats": st, "over_base": ratios(st), "check": check, "k": k, "cache_positions": opt.seq}


# ----------------------------------------------------------------------------- 3. mixed ranks


def bench_mixed(opt: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    """Slots 0..h-1 hold rank-16 deltas, h..2h-1 rank-4 ones; rows alternate between the two."""
    h = opt.slots // 2
    low = random_deltas(rig.base, h, LOW_R, seed=2000)
    high = rig.deltas[:h]
    grouped, bank = serve(rig.base, opt.slots, high + low)
    flat, _ = serve(rig.base, opt.slots, high + [padded(bank, d) for d in low])
    pm = peft_model(rig.base, high + low)
    n = len(rig.ids)
    mixed = [i // 2 if i % 2 == 0 else h + i // 2 for i in range(n)]
    all16, all4 = [i % h for i in range(n)], [h + i % h for i in range(n)]
    both = high + low
    kw = {"input_ids": rig.ids, "use_cache": False}
    fns = {
        "base": lambda: rig.base(**kw),
        "ours_all16": lambda: forward(grouped, all16, **kw),
        "ours_all4": lambda: forward(grouped, all4, **kw),
        "ours_mixed": lambda: forward(grouped, mixed, **kw),
        "ours_mixed_padded": lambda: forward(flat, mixed, **kw),
    }
    peft = {"base": fns["base"], "peft_mixed": lambda: peft_forward(pm, [both[s].name for s in mixed], **kw)}
    with torch.no_grad():
        o, f, p = fns["ours_mixed"]().logits, fns["ours_mixed_padded"]().logits, peft["peft_mixed"]().logits
        check = {"max_abs_diff_ours_vs_peft": max_diff(o, p), "max_abs_diff_grouped_vs_padded": max_diff(o, f)}
        groups = [(g.rank, None if g.rows is None else len(g.rows)) for g in _plan(grouped, mixed).groups]
        del o, f, p
        st = timing(fns, opt)
        st_peft = timing(peft, opt, rounds=opt.peft_rounds)
    over = {**ratios(st_peft), **ratios(st)}
    return {"stats": {**st_peft, **st}, "over_base": over, "check": check, "groups": groups, "distinct": [h, h]}


def _plan(model: nn.Module, slots: list[int]) -> Any:
    import surgery

    with surgery.route(model, slots) as plan:
        return plan


# ----------------------------------------------------------------------------- 4. plot


def svg_plot(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str) -> str:
    """Tokens/s against distinct deltas (log2 x axis), one polyline per series, hand-written SVG."""
    W, H, L, Rm, T, Bm = 700, 400, 80, 190, 40, 50
    xs = sorted({k for pts in series.values() for k, _ in pts})
    lo, hi = math.log2(xs[0]), math.log2(xs[-1]) or 1.0
    top = max(v for pts in series.values() for _, v in pts)
    step = 10 ** math.floor(math.log10(top / 5))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if top / (step * m) <= 6)
    ymax = step * math.ceil(top * 1.05 / step)

    def px(k: float) -> float:
        return L + (math.log2(k) - lo) / max(hi - lo, 1e-9) * (W - L - Rm)

    def py(v: float) -> float:
        return T + (1 - v / ymax) * (H - T - Bm)

    colors = {"base": "#555555", "ours": "#1f77b4", "PEFT": "#d62728"}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{(W - Rm + L) / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
    ]
    for i in range(int(round(ymax / step)) + 1):
        y = py(i * step)
        out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{W - Rm}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{i * step:,.0f}</text>')
    for k in xs:
        x = px(k)
        out.append(f'<line x1="{x:.1f}" y1="{H - Bm}" x2="{x:.1f}" y2="{H - Bm + 5}" stroke="black"/>')
        out.append(f'<text x="{x:.1f}" y="{H - Bm + 18}" text-anchor="middle">{k}</text>')
    out += [
        f'<line x1="{L}" y1="{H - Bm}" x2="{W - Rm}" y2="{H - Bm}" stroke="black"/>',
        f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - Bm}" stroke="black"/>',
        f'<text x="{(W - Rm + L) / 2}" y="{H - 10}" text-anchor="middle">'
        "distinct deltas in the batch (log2 scale)</text>",
        f'<text transform="translate(18 {(H - Bm + T) / 2}) rotate(-90)" text-anchor="middle">{ylabel}</text>',
    ]
    for i, (name, pts) in enumerate(series.items()):
        c = colors.get(name.split()[0], "#2ca02c")
        line = " ".join(f"{px(k):.1f},{py(v):.1f}" for k, v in pts)
        dash = ' stroke-dasharray="6 4"' if name.startswith("base") else ""
        out.append(f'<polyline points="{line}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        out += [f'<circle cx="{px(k):.1f}" cy="{py(v):.1f}" r="3" fill="{c}"/>' for k, v in pts if not dash]
        ly = T + 10 + 20 * i
        out.append(
            f'<line x1="{W - Rm + 15}" y1="{ly}" x2="{W - Rm + 40}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{W - Rm + 46}" y="{ly + 4}">{name}</text>')
    return "\n".join([*out, "</svg>"]) + "\n"


# ----------------------------------------------------------------------------- report


def fmt(st: dict[str, Any]) -> str:
    return f"{C.fmt_seconds(st['median_s'])} / {C.fmt_seconds(st['min_s'])}"


def tokens_per_s(res: dict[str, Any], name: str) -> float:
    s = res["setup"]
    return s["batch"][0] * s["batch"][1] / res["prefill"]["stats"][name]["median_s"]


def markdown(res: dict[str, Any], svg_name: str | None) -> str:
    env, s, quick = res["env"], res["setup"], res["quick"]

    def judged(ok: bool) -> Any:
        return f"({'yes' if ok else 'no'}; --quick)" if quick else ok

    def row(what: str, part: dict, name: str, target: float | None = None) -> dict[str, Any]:
        st, r = part["stats"][name], part["over_base"].get(name, {"ratio": 1.0, "ratio_of_mins": 1.0})
        return {
            "measurement": what,
            "time (median / min)": fmt(st),
            "tokens/s": f"{s['batch'][0] * (1 if part is dec else s['batch'][1]) / st['median_s']:,.0f}",
            "x base": f"{r['ratio']:.3f}",
            "x base (mins)": f"{r['ratio_of_mins']:.3f}",
            "target": f"<= {target}" if target else "",
            "met?": judged(r["ratio"] <= target) if target else None,
        }

    cols = ["measurement", "time (median / min)", "tokens/s", "x base", "x base (mins)", "target", "met?"]
    pre, dec, mix = res.get("prefill", {}), res.get("decode", {}), res.get("mixed", {})
    out = [
        "# Serving many deltas: slot bank + per-row routing vs the base and PEFT",
        "",
        f"Generated by `benchmarks/bench_serving.py{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(res['started']))}: torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}, {env.get('cuda_device') or env.get('cpu')}, {env['cpu_count']} "
        f"CPU(s), device {s['device']}, {s['threads']} torch thread(s) (load average at start "
        f"{env['load_average_at_start']}, at end {env.get('load_average_at_end')}; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); "
        f"{res['elapsed_s']:.0f} s.",
        "",
        f"Model: LlamaForCausalLM {s['model']}, {s['dtype']}, eval, `torch.no_grad()`, batch {s['batch'][0]} x "
        f"{s['batch'][1]} tokens{' (--quick: a tiny model, figures not judged)' if quick else ''}. {s['slots']} LoRA "
        f"deltas r={R}, alpha={ALPHA} at all {s['sites']} linear sites (A ~ U(+-1/sqrt(in)), B ~ N(0, 0.02), one draw "
        f'each); ours: `surgery.serve(model, slots={s["slots"]}, max_rank={R}, targets="@linear")` + '
        "`surgery.route(model, [slot per row])` (the route is built inside every timed call); PEFT: one `PeftModel` "
        "with every delta as an adapter, `model(..., adapter_names=[...])`. Timing: "
        f"{s['warmup']} warm-up(s), then {s['rounds']} interleaved rounds ({3 * s['rounds']} for the decode step; "
        "contenders in rotating order), "
        f"{'CPU time of this process' if s['clock'] == 'cpu' else 'wall clock'}; times are median / min over rounds; "
        "`x base` is the median over rounds of the ratio to the base within a round (`mins`: the ratio of minima); "
        "tokens/s is tokens over the median time"
        + (
            f" (CPU time: with {s['threads']} threads busy, up to {s['threads']}x the wall time)."
            if s["clock"] == "cpu" and s["threads"] > 1
            else "."
        ),
        "",
    ]
    if "error" in pre:
        out += [f"Prefill: **failed**: {pre['error']}", ""]
    elif pre:
        rows = [row("base", pre, "base"), row("base again (A/A control: the noise floor)", pre, "base_again")]
        rows.append(row("(reference) one LoRA delta injected and active, no bank (`surgery.apply`)", pre, "plain"))
        for k in s["ks"]:
            rows.append(
                row(f"ours, {k} distinct", pre, f"ours_{k}", {64: TARGET["prefill_64"], 8: TARGET["prefill_8"]}.get(k))
            )
            rows.append(row(f"PEFT, {k} distinct", pre, f"peft_{k}"))
        c = pre["check"]
        out += [
            f"## 1. Prefill: one forward of {s['batch'][0]} x {s['batch'][1]} tokens, k distinct deltas",
            "",
            C.markdown_table(rows, cols),
            "",
            f"PEFT's rows come from rounds of their own ({s['peft_rounds']} rounds of the base and PEFT's calls; base "
            f"there {fmt(pre['peft_base'])}); its ratios are to that base.",
            "",
            *([f"![tokens/s against distinct deltas: base, ours, PEFT]({svg_name})", ""] if svg_name else []),
            f"Check (untimed, {c['k']} distinct): logits ours vs PEFT per row, max |diff| "
            f"{c['max_abs_diff_ours_vs_peft']:.3g} ({c['rows_within_tol']} of {c['rows']} rows within "
            f"{TARGET['max_abs_diff']:g}); ours vs base {c['max_abs_diff_ours_vs_base']:.3g} (the deltas are live; "
            f"{c['distinct_rows']} distinct rows); every row routed to the base (-1) vs the base "
            f"{c['max_abs_diff_route_base_vs_base']:.3g}; every row on slot 0 vs that delta injected alone "
            f"{c['max_abs_diff_one_slot_vs_plain']:.3g}.",
            "",
        ]
    if "error" in dec:
        out += [f"Decode: **failed**: {dec['error']}", ""]
    elif dec:
        k = dec["k"]
        rows = [
            row("base", dec, "base"),
            row("base again (A/A)", dec, "base_again"),
            row(
                f"ours, {k} distinct, one route held over the prefill and the steps (as around `generate`)",
                dec,
                "ours_held",
                TARGET["decode_64"] if k == 64 else None,
            ),
            row(f"ours, {k} distinct, a new route every step", dec, f"ours_{k}"),
            row(f"PEFT, {k} distinct", dec, f"peft_{k}"),
        ]
        out += [
            f"## 2. Decode: one step, {s['batch'][0]} rows x 1 token, KV cache of {dec['cache_positions']} positions",
            "",
            C.markdown_table(rows, cols),
            "",
            f"The cache is built once per contender by a prefill and cut back to {dec['cache_positions']} positions "
            "(`DynamicCache.crop`) before every step, outside the timed call. Check: step logits ours vs PEFT max "
            f"|diff| {dec['check']['max_abs_diff_ours_vs_peft']:.3g}; held route vs a route per step "
            f"{dec['check']['max_abs_diff_held_vs_per_step']:.3g} (ours vs base "
            f"{dec['check']['max_abs_diff_ours_vs_base']:.3g}).",
            "",
        ]
    if "error" in mix:
        out += [f"Mixed ranks: **failed**: {mix['error']}", ""]
    elif mix:
        h = mix["distinct"][0]
        what = {
            "ours_all16": f"ours, {h} distinct rank-16 deltas (each on 2 rows)",
            "ours_all4": f"ours, {h} distinct rank-4 deltas",
            "ours_mixed": f"ours, mixed: {h} rank-16 + {h} rank-4 in one batch (rows alternate)",
            "ours_mixed_padded": "ours, the same mixed batch with the rank-4 factors zero-padded to 16 (one group)",
            "peft_mixed": f"PEFT, the same mixed batch ({s['peft_rounds']} rounds of its own with the base)",
        }
        rows = [row("base", mix, "base"), *(row(v, mix, k) for k, v in what.items())]
        c = mix["check"]
        groups = ", ".join(f"rank {g} ({n} rows)" for g, n in mix["groups"])
        out += [
            f"## 3. Mixed ranks in one batch (max_rank {R})",
            "",
            C.markdown_table(rows, cols[:5]),
            "",
            f"The route's rank groups for the mixed batch: {groups}. Check: mixed logits ours vs PEFT max |diff| "
            f"{c['max_abs_diff_ours_vs_peft']:.3g}; grouped vs padded {c['max_abs_diff_grouped_vs_padded']:.3g}.",
            "",
        ]
    if "stats" in pre:
        st = pre["stats"]
        aa = sorted(a / b for a, b in zip(st["base_again"]["samples_s"], st["base"]["samples_s"], strict=True))
        out.append(
            f"Noise floor: the A/A control's per-round ratios (the base against itself, prefill) span "
            f"{aa[len(aa) // 4]:.3f} to {aa[3 * len(aa) // 4]:.3f} between quartiles ({aa[0]:.3f} to {aa[-1]:.3f} in "
            "all): a ratio closer to 1 than that is not resolved by this run."
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run on a tiny model: seconds, prints, not judged")
    ap.add_argument("--md", type=Path, default=C.RESULTS_DIR / "bench_serving.md", help="markdown results path")
    ap.add_argument("--svg", type=Path, default=None, help="plot path (default: serving_throughput.svg by --md)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype (the bank's follows it)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default 11; quick 2)")
    ap.add_argument("--peft-rounds", type=int, default=None, help="rounds with PEFT's slow calls (default 5; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per contender (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: every core)")
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="what a sample measures: this process's CPU time (default on CPU: other jobs on the shared machine do "
        "not count) or wall time (default, and the only choice, on CUDA)",
    )
    ap.add_argument("--parts", default="prefill,decode,mixed", help="which measurements, comma-separated")
    opt = ap.parse_args(argv)
    threads = opt.threads or (1 if opt.quick else C.set_threads())
    torch.set_num_threads(threads)
    opt.rounds = opt.rounds or (2 if opt.quick else 11)
    opt.peft_rounds = opt.peft_rounds or (2 if opt.quick else 5)
    opt.warmup = opt.warmup if opt.warmup is not None else 1
    opt.batch, opt.seq = (QUICK_BATCH, QUICK_SEQ) if opt.quick else (BATCH, SEQ)
    opt.slots = opt.batch  # as many deltas as rows: the most a batch can mix
    opt.ks = [1 << i for i in range(opt.slots.bit_length()) if 1 << i <= opt.slots]
    opt.dtype = DTYPES[opt.dtype]
    cuda = torch.device(opt.device).type == "cuda"
    opt.clock = opt.clock or ("wall" if cuda else "cpu")
    if opt.clock == "cpu" and cuda:
        ap.error("--clock cpu cannot see GPU time: use --clock wall with --device cuda")
    opt.timer = time.process_time if opt.clock == "cpu" else time.perf_counter
    cfg = TINY if opt.quick else MODEL
    res: dict[str, Any] = {"quick": opt.quick, "started": time.time(), "env": C.environment(opt.device)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rig = Rig(opt, cfg)
        log(f"[setup] {rig.setup_s:.1f} s; {rig.bank!r}")
        res["setup"] = {
            "model": cfg,
            "dtype": str(opt.dtype).removeprefix("torch."),
            "device": opt.device,
            "batch": [opt.batch, opt.seq],
            "slots": opt.slots,
            "sites": len(rig.bank.sites),
            "ks": opt.ks,
            "rounds": opt.rounds,
            "peft_rounds": opt.peft_rounds,
            "warmup": opt.warmup,
            "threads": threads,
            "clock": opt.clock,
        }
        parts = {"prefill": bench_prefill, "decode": bench_decode, "mixed": bench_mixed}
        for name in opt.parts.split(","):
            res[name] = C.run_part(name, parts[name], opt, rig)
    res["env"]["load_average_at_end"] = C.load_average()
    res["elapsed_s"] = time.time() - res["started"]
    svg = None
    if "stats" in res.get("prefill", {}):
        series = {
            "base": [(k, tokens_per_s(res, "base")) for k in opt.ks],
            "ours (slot bank)": [(k, tokens_per_s(res, f"ours_{k}")) for k in opt.ks],
            "PEFT (adapter_names)": [(k, tokens_per_s(res, f"peft_{k}")) for k in opt.ks],
        }
        title = f"Prefill throughput, {opt.batch} x {opt.seq} tokens, {res['setup']['dtype']} on {opt.device}"
        per = "tokens per CPU-second of the process" if opt.clock == "cpu" else "tokens / s"
        svg = svg_plot(series, title, per)
    svg_path = opt.svg or opt.md.with_name("serving_throughput.svg")
    md = markdown(res, svg_path.name if svg else None)
    print(md)
    if opt.quick and opt.md == C.RESULTS_DIR / "bench_serving.md":
        return 0  # a smoke run does not overwrite the benchmark's results
    opt.md.parent.mkdir(parents=True, exist_ok=True)
    opt.md.write_text(md.rstrip() + "\n")
    if svg:
        svg_path.write_text(svg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
