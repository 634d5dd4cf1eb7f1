"""Quality of parameter-space deltas on real weights (issue 13): BitFit, DiffPruning at 0.5 % and
LT-SFT at 1 % and 0.5 % on the pretrained MiniLM, the recipe of `quality_adapters.py`.

    python benchmarks/quality_sparse.py --checkpoint /tmp/qs.json   # full run, ~75 min on one thread; resumable
    python benchmarks/quality_sparse.py --smoke                     # CI smoke run (< 1 min), writes nothing under docs/

Writes docs/results/quality_sparse.{json,md}. Model, data, budget (4 epochs, batch 32, AdamW, linear decay,
the head always trainable) and the choice of learning rates (a grid trained on 90 % of train, scored on
the other 10 %; the best retrained on all of train and scored on test; seeds 1 and 2 rerun at the chosen
rate) are `quality_adapters.py`'s, whose probe and full fine-tuning rows are the reference.

- BitFit: `surgery.inject(enc, "bitfit")`, every bias of the encoder (the head trains too).
- DiffPruning: `surgery.inject(enc, "diffpruning", targets="@linear", sparsity=0.005)`; 4 epochs of
  cross-entropy + `l0_weight x l0_loss / numel` (the expected density), the gates' log-alpha at their own rate;
  then `finalize` (magnitude projection to 0.5 % per tensor) and a phase with the mask fixed, at its own
  (rate, epochs) (the fixed-mask phase trains 0.5 % of the entries, as LT-SFT's sparse phase does; one gated phase is
  copied for each fixed-mask rate of the sweep).
- LT-SFT: `surgery.SparseFinetune(enc, targets="@linear", density=d, dense=head)`: a full phase of 4 epochs
  over the linear weights at full fine-tuning's rate (1e-4), `select()`, then a sparse phase of 4 epochs;
  the sweep is over the sparse phase's rate. Both densities start from the same full phase (a copy).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import quality_adapters as Q  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

FULL_LR = 1e-4  # full fine-tuning's chosen rate in docs/results/quality_adapters.json: LT-SFT's full phase
BITFIT_LRS = (1e-3, 3e-3, 1e-2, 3e-2)  # widened once upward: 1e-2, the largest first tried, won
SPARSE_LRS = (1e-3, 3e-3)  # LT-SFT's sparse phase (1e-4, the full phase's, left it at 68.8 %: one seed, 1 %)
# The gated phase: (the difference's rate, the gates' rate, the weight of the expected density
# l0_loss / numel in the loss). At weight 1 the gates stayed 86-91 % open and the projection to 0.5 % cost
# 12 points (74.6 % test); a sweep of the weight over 1, 10, 100, 1000 (val 75.1, 75.7, 83.6, 72.3; its
# checkpoint since lost) chose 100: the gates close to 1.4 % by themselves. The fixed-mask phase then ran at
# the difference's rate (3e-4) and reached 81.1 % test (seed 0), under the probe. A sweep of the fixed-mask
# phase's rate at L0 100 (3e-4, 1e-3, 3e-3 for 2 epochs: val 84.7, 83.1, 85.3) chose 3e-3, as LT-SFT's sparse
# phase, which trains 0.5 % of the entries too; test 82.8 % (seed 0), the probe's. The grid below: the L0
# weight around 100, and the fixed-mask phase as (rate, epochs), longer and faster.
DP_GRID = ((3e-4, 1e-1, 30.0), (3e-4, 1e-1, 100.0), (3e-4, 1e-1, 300.0))
DP_FIXED = ((3e-3, 2), (3e-3, 4), (1e-2, 4))
DP_SPARSITY = 0.005
DENSITIES = (0.01, 0.005)
log = C.log


def _stored_bytes(enc: nn.Module, name: str) -> int:
    """Size of the delta's tensors as the hub stores them (one safetensors file)."""
    from safetensors.torch import save

    import surgery

    d = surgery.delta(enc, name)
    return len(save({k: t.contiguous() for k, t in d.tensors.items()}))


def _evals(model: nn.Module, evals: dict[str, Q.Split], pad: int) -> dict[str, Any]:
    return {k: Q.evaluate(model, s, pad) for k, s in evals.items()}


def run_bitfit(enc0: nn.Module, data: Q.Data, lr: float, fit: Q.Split, evals: dict, budget: Q.Budget) -> dict:
    import surgery

    Q.seed_all(budget.seed)
    enc = copy.deepcopy(enc0)
    surgery.inject(enc, "bitfit", name="b")
    model = Q.Classifier(enc, len(data.label_names))
    delta = [p for p in enc.parameters() if p.requires_grad]
    out = Q.train(model, [{"params": delta + list(model.head.parameters()), "lr": lr}], fit, data.pad_id, budget)
    n = sum(p.numel() for p in delta)
    out.update(lr=lr, delta_params=n, density=n / sum(p.numel() for p in enc0.parameters()))
    out["stored_bytes"] = _stored_bytes(enc, "b")
    out.update(_evals(model, evals, data.pad_id))
    return out


def run_diffpruning(
    enc0: nn.Module,
    data: Q.Data,
    hp: tuple[float, float, float],
    fixed: list[tuple[float, int]],
    fit: Q.Split,
    evals: dict,
    budget: Q.Budget,
) -> dict[str, dict]:
    """One gated phase at `hp`, finalize, then for each (rate, epochs) in `fixed` a copy trained with the mask fixed."""
    import surgery
    from surgery.methods import diffpruning as dp

    lr, gate_lr, l0_weight = hp
    Q.seed_all(budget.seed)
    enc = copy.deepcopy(enc0)
    surgery.inject(enc, "diffpruning", targets="@linear", sparsity=DP_SPARSITY, name="dp")
    model = Q.Classifier(enc, len(data.label_names))
    named = [(k, p) for k, p in enc.named_parameters() if p.requires_grad]
    diff = [p for k, p in named if k.endswith(".diff")]
    gates = [p for k, p in named if k.endswith(".log_alpha")]
    if len(diff) + len(gates) != len(named):
        raise RuntimeError("diffpruning: trainable tensors other than diff and log_alpha")
    total = dp.numel(enc, "dp")
    head = list(model.head.parameters())
    # the gates' L0 gradient is ~1e-10 per gate (the density's, over 21 M entries): under Adam's eps (1e-8)
    # it would barely move them; a tiny eps lets Adam scale it up like any other gradient
    groups = [{"params": diff + head, "lr": lr}, {"params": gates, "lr": gate_lr, "eps": 1e-12, "weight_decay": 0.0}]
    gated = Q.train(
        model, groups, fit, data.pad_id, budget, extra_loss=lambda: l0_weight * dp.l0_loss(enc, "dp") / total
    )
    gated["expected_density_after_training"] = dp.expected_density(enc, "dp")
    gated["before_projection"] = Q.evaluate(model, next(iter(evals.values())), data.pad_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = dp.finalize(enc, "dp")
    gated["after_projection"] = Q.evaluate(model, next(iter(evals.values())), data.pad_id)
    out: dict[str, dict] = {}
    for fixed_lr, fixed_epochs in fixed:
        # the fixed-mask phase (our loop: the head trains with the kept values, the rate decays as in training)
        m = copy.deepcopy(model)
        values = [p for p in m.encoder.parameters() if p.requires_grad]
        Q.seed_all(budget.seed)
        fixed = Q.train(
            m,
            [{"params": values + list(m.head.parameters()), "lr": fixed_lr}],
            fit,
            data.pad_id,
            Q.Budget(fixed_epochs, budget.batch, budget.seed),
        )
        r = dict(gated)
        r["fixed_mask_ms_per_step"] = fixed["ms_per_step"]
        r["fixed_mask_epoch_loss"] = fixed["epoch_loss"]
        r["finalize"] = dict(report, fixed_steps=fixed["steps"], warnings=[str(w.message) for w in caught])
        r.update(lr=lr, gate_lr=gate_lr, l0_weight=l0_weight, fixed_lr=fixed_lr, density=report["density"])
        r["fixed_epochs"] = fixed_epochs
        r["delta_params"] = sum(int(ad.values.numel()) for ad in _sparse_values(m.encoder, "dp"))
        r["stored_bytes"] = _stored_bytes(m.encoder, "dp")
        r.update(_evals(m, evals, data.pad_id))
        out[repr((fixed_lr, fixed_epochs))] = r
        del m
    return out


def _sparse_values(enc: nn.Module, name: str) -> list[Any]:
    from surgery import engine

    return list(engine.adapters(enc, name).values())


def run_ltsft(
    enc0: nn.Module,
    data: Q.Data,
    runs: list[tuple[float, float]],
    fit: Q.Split,
    evals: dict,
    budget: Q.Budget,
) -> dict[str, dict]:
    """One full phase, then for each (density, sparse-phase rate) in `runs` a copy selected and trained."""
    import surgery

    Q.seed_all(budget.seed)
    enc = copy.deepcopy(enc0)
    model = Q.Classifier(enc, len(data.label_names))
    head = list(model.head.parameters())
    sft = surgery.SparseFinetune(enc, targets="@linear", density=runs[0][0], dense=head)
    sft.full_phase()  # snapshot + the linear weights (and the head) trainable; our loop trains them
    full = Q.train(model, [{"params": list(sft.weights.values()) + head, "lr": FULL_LR}], fit, data.pad_id, budget)
    full.update(_evals(model, evals, data.pad_id))
    out: dict[str, dict] = {}
    for density, lr in runs:
        m, s = copy.deepcopy((model, sft))  # one memo: the copy's sft points into the copy's model
        s.density = density
        t0 = time.perf_counter()
        s.select()
        select_s = time.perf_counter() - t0
        values = [p for p in m.encoder.parameters() if p.requires_grad]
        Q.seed_all(budget.seed)
        r = Q.train(m, [{"params": values + list(m.head.parameters()), "lr": lr}], fit, data.pad_id, budget)
        nnz = s.nnz
        r.update(
            lr=lr,
            full_lr=FULL_LR,
            density=nnz / sum(w.numel() for w in s.weights.values()),
            delta_params=nnz,
            select_s=select_s,
            optimizer_state_bytes=2 * sum(v.numel() * v.element_size() for v in values),
            full_phase={k: full[k] for k in ("ms_per_step", "epoch_loss", *evals)},
        )
        r["stored_bytes"] = _stored_bytes(m.encoder, "sft")
        r.update(_evals(m, evals, data.pad_id))
        out[f"{density}:{lr!r}"] = r
        del m, s
    return out


# ----------------------------------------------------------------------------- the plan


def _dp_choice(sweep: list[dict]) -> tuple[tuple[float, float, float], tuple[float, int]]:
    """The gated phase's (rate, gates' rate, L0 weight) and the fixed-mask (rate, epochs) of the best sweep run."""
    b = Q.best(sweep)
    return (b["lr"], b["gate_lr"], b["l0_weight"]), (b["fixed_lr"], b["fixed_epochs"])


def _cached(ck: Path | None, key: str, make: Callable[[], Any]) -> Any:
    done = Q._load(ck)
    if key in done:
        log(f"[{key}] from the checkpoint")
        return done[key]
    v = C._jsonable(make())
    Q._save(ck, key, v)
    return v


def full(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    tok, enc0 = Q.load_tokenizer_and_encoder()
    data = Q.load_data(tok)
    ck = args.checkpoint
    for extra in args.merge or []:  # another part's checkpoint: its runs count as done here
        for k, v in Q._load(extra).items():
            Q._save(ck, k, v)
    part = args.part
    seeds = [Q.SEED, *[int(s) for s in args.seeds.split(",") if s.strip()]]
    log(f"train {len(data.train)} (fit {len(data.fit)} + val {len(data.val)}), test {len(data.test)}")
    val, test = {"val": data.val}, {"test": data.test}
    res: dict[str, Any] = {"benchmark": "quality_sparse", "env": C.environment(), "rows": {}}

    # sweeps (seed 0, fit -> val)
    if part == "dp":
        bit_sweep = []
    else:
        bit_sweep = [
            _cached(ck, f"sweep:bitfit:{lr!r}", lambda lr=lr: run_bitfit(enc0, data, lr, data.fit, val, Q.Budget()))
            for lr in BITFIT_LRS
        ]
    for r in bit_sweep:
        log(f"[bitfit sweep] lr {r['lr']:g}: val {r['val']['accuracy']:.1f} %")
    if part == "sparse":
        dp_sweep = []
    else:
        dp_sweep = [
            r
            for hp in DP_GRID
            for r in _cached(
                ck,
                f"sweep:dp5:{hp!r}:{list(DP_FIXED)!r}",
                lambda hp=hp: run_diffpruning(enc0, data, hp, list(DP_FIXED), data.fit, val, Q.Budget()),
            ).values()
        ]
    for r in dp_sweep:
        log(
            f"[dp sweep] lr {r['lr']:g} gates {r['gate_lr']:g} L0 {r['l0_weight']:g} fixed {r['fixed_lr']:g} x {r['fixed_epochs']}: "
            f"val {r['val']['accuracy']:.1f} %"
        )
    if part == "dp":
        dp_hp, dp_fixed = _dp_choice(dp_sweep)
        for sd in [int(x) for x in args.dp_seeds.split(",")] if args.dp_seeds else seeds:
            r = _cached(
                ck,
                f"final:dp5:{dp_hp!r}:{dp_fixed!r}:{sd}",
                lambda sd=sd: run_diffpruning(enc0, data, dp_hp, [dp_fixed], data.train, test, Q.Budget(seed=sd)),
            )[repr(dp_fixed)]
            log(f"[dp] seed {sd}: TEST {r['test']['accuracy']:.1f} %")
        return {}
    lt_sweep = _cached(
        ck,
        "sweep:ltsft",
        lambda: run_ltsft(enc0, data, [(d, lr) for d in DENSITIES for lr in SPARSE_LRS], data.fit, val, Q.Budget()),
    )
    for k, r in lt_sweep.items():
        log(f"[ltsft sweep] {k}: val {r['val']['accuracy']:.1f} %")
    bit_lr = Q.best(bit_sweep)["lr"]
    dp_hp, dp_fixed = _dp_choice(dp_sweep) if dp_sweep else ((0.0, 0.0, 0.0), (0.0, 0))
    lt_lr = {d: Q.best([r for k, r in lt_sweep.items() if k.startswith(f"{d}:")])["lr"] for d in DENSITIES}

    # finals: all of train -> test, every seed
    finals: dict[str, dict[int, dict]] = {"bitfit": {}, "diffpruning": {}, **{f"ltsft_{d}": {} for d in DENSITIES}}
    for sd in seeds:
        b = Q.Budget(seed=sd)
        finals["bitfit"][sd] = _cached(
            ck, f"final:bitfit:{bit_lr!r}:{sd}", lambda b=b: run_bitfit(enc0, data, bit_lr, data.train, test, b)
        )
        if part == "sparse":
            finals["diffpruning"][sd] = {"test": {"accuracy": float("nan")}}
        else:
            finals["diffpruning"][sd] = _cached(
                ck,
                f"final:dp5:{dp_hp!r}:{dp_fixed!r}:{sd}",
                lambda b=b: run_diffpruning(enc0, data, dp_hp, [dp_fixed], data.train, test, b),
            )[repr(dp_fixed)]
        lt = _cached(
            ck,
            f"final:ltsft:{sorted(lt_lr.items())!r}:{sd}",
            lambda b=b: run_ltsft(enc0, data, [(d, lt_lr[d]) for d in DENSITIES], data.train, test, b),
        )
        for d in DENSITIES:
            finals[f"ltsft_{d}"][sd] = lt[f"{d}:{lt_lr[d]!r}"]
        log(
            f"[seed {sd}] bitfit {finals['bitfit'][sd]['test']['accuracy']:.1f}, dp "
            f"{finals['diffpruning'][sd]['test']['accuracy']:.1f}, "
            + ", ".join(f"ltsft {d} {finals[f'ltsft_{d}'][sd]['test']['accuracy']:.1f}" for d in DENSITIES)
        )
    if part == "sparse":
        return {}
    sweeps = {"bitfit": bit_sweep, "diffpruning": dp_sweep, **{f"ltsft_{d}": [] for d in DENSITIES}}
    for k, r in lt_sweep.items():
        sweeps[f"ltsft_{k.split(':')[0]}"].append(r)
    for key, per_seed in finals.items():
        accs = [r["test"]["accuracy"] for r in per_seed.values()]
        res["rows"][key] = {
            "per_seed": {str(s): r for s, r in per_seed.items()},
            "accuracy": {str(s): r["test"]["accuracy"] for s, r in per_seed.items()},
            "mean": statistics.fmean(accs),
            "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "sweep": [
                {
                    k: r[k]
                    for k in (
                        "lr",
                        "gate_lr",
                        "l0_weight",
                        "fixed_lr",
                        "fixed_epochs",
                        "val",
                        "density",
                        "expected_density_after_training",
                    )
                    if k in r
                }
                for r in sweeps[key]
            ],
        }
    log("[timing] one training step per method, interleaved")
    res["step_timing"] = step_timing(enc0, data)
    ref = json.loads((C.RESULTS_DIR / "quality_adapters.json").read_text())
    res["reference"] = {
        k: {"label": ref["rows"][k]["label"], **ref["seeds"][k]} for k in ("probe", "full") if k in ref.get("seeds", {})
    }
    res["setup"] = {
        "recipe": "benchmarks/quality_adapters.py (4 epochs, batch 32, AdamW, linear decay, head trainable)",
        "seeds": seeds,
        "grids": {
            "bitfit": list(BITFIT_LRS),
            "diffpruning (diff lr, gate lr, L0 weight)": [list(x) for x in DP_GRID],
            "diffpruning fixed-mask (lr, epochs)": [list(x) for x in DP_FIXED],
            "ltsft sparse phase": list(SPARSE_LRS),
        },
        "chosen": {"bitfit": bit_lr, "diffpruning": [*dp_hp, dp_fixed], **{f"ltsft_{d}": lt_lr[d] for d in DENSITIES}},
        "ltsft_full_phase_lr": FULL_LR,
        "dp": {
            "sparsity": DP_SPARSITY,
            "l0_weight": dp_hp[2],
            "fixed_mask_epochs": dp_fixed[1],
            "fixed_mask_lr": dp_fixed[0],
        },
        "threads": torch.get_num_threads(),
    }
    res["elapsed_s"] = time.time() - t0
    res["env"]["load_average_at_end"] = C.load_average()
    res["targets"] = targets(res)
    return res


def step_timing(enc0: nn.Module, data: Q.Data, rounds: int = 10) -> dict[str, Any]:
    """One training step (forward, backward, AdamW) of full fine-tuning, BitFit, DiffPruning and the
    LT-SFT sparse phase at both densities, interleaved on one fixed batch of 32, and each optimizer's
    state in bytes after the steps."""
    import surgery

    ids, mask, y = Q.collate(data.train, list(range(0, 2 * Q.BATCH, 2)), data.pad_id)
    n = len(data.label_names)
    models: dict[str, tuple[nn.Module, list[nn.Parameter]]] = {}
    enc = copy.deepcopy(enc0).requires_grad_(True)
    m = Q.Classifier(enc, n)
    models["full"] = (m, list(m.parameters()))
    enc = copy.deepcopy(enc0)
    surgery.inject(enc, "bitfit", name="b")
    m = Q.Classifier(enc, n)
    models["bitfit"] = (m, [p for p in m.parameters() if p.requires_grad])
    enc = copy.deepcopy(enc0)
    surgery.inject(enc, "diffpruning", targets="@linear", sparsity=DP_SPARSITY, name="dp")
    m = Q.Classifier(enc, n)
    models["diffpruning"] = (m, [p for p in m.parameters() if p.requires_grad])
    for d in DENSITIES:
        enc = copy.deepcopy(enc0)
        m = Q.Classifier(enc, n)
        sft = surgery.SparseFinetune(enc, targets="@linear", density=d, dense=list(m.head.parameters()))
        sft.full_phase()
        with torch.no_grad():  # a stand-in for a full phase: random moves, so the selection is scattered
            for w in sft.weights.values():
                w.add_(torch.randn_like(w), alpha=1e-3)
        sft.select()
        models[f"ltsft_{d}"] = (m, [p for p in m.parameters() if p.requires_grad])
    opts = {k: torch.optim.AdamW(ps, lr=1e-6) for k, (_, ps) in models.items()}
    fns = {}
    for k, (model, _) in models.items():
        model.train()

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opts[k]) -> None:
            F.cross_entropy(model(ids, mask), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[k] = step
    st = C.interleaved(fns, rounds=rounds, warmup=2)
    out: dict[str, Any] = {}
    for k, v in st.items():
        state = sum(t.numel() * t.element_size() for s in opts[k].state.values() for t in s.values() if t.dim())
        out[k] = {
            "median_ms": 1e3 * v["median_s"],
            "min_ms": 1e3 * v["min_s"],
            "rounds": v["n"],
            "optimizer_state_bytes": state,
            "trainable": sum(p.numel() for p in models[k][1]),
        }
        if k != "full":
            out[k]["vs_full"] = C.ratio(st, k, "full")
    return out


def targets(res: dict[str, Any]) -> dict[str, Any]:
    rows, ref = res["rows"], res.get("reference", {})
    out: dict[str, Any] = {}
    if "probe" in ref:
        for k, r in rows.items():
            out[f"{k}_beats_probe (seed mean)"] = r["mean"] > ref["probe"]["mean"]
    k = max(rows, key=lambda k: rows[k]["mean"])
    out["best"] = k
    dens = max(r["density"] for r in rows[k]["per_seed"].values())
    out["best_changes_at_most_1pct"] = round(100 * dens, 2) <= 1.0  # entries round up: 1.0007 % is 1 %
    if "full" in ref:
        out["best_within_1pt_of_full (seed mean)"] = ref["full"]["mean"] - rows[k]["mean"] <= 1.0
    return out


LABELS = {
    "bitfit": "BitFit (every bias)",
    "diffpruning": "DiffPruning, 0.5 % of @linear",
    "ltsft_0.01": "LT-SFT, 1 % of @linear",
    "ltsft_0.005": "LT-SFT, 0.5 % of @linear",
}


def markdown(res: dict[str, Any]) -> str:
    env, setup, ref = res["env"], res["setup"], res.get("reference", {})
    seeds = [str(s) for s in setup["seeds"]]
    lines = [
        "# Parameter-space deltas on real weights: MiniLM on Debian package sections",
        "",
        "Written by `benchmarks/quality_sparse.py` (issue 13). The recipe of "
        "[quality_adapters.md](quality_adapters.md): pretrained all-MiniLM-L6-v2 + mean pooling + a linear head, "
        "4 epochs, batch 32, AdamW, linear decay, the head always trainable; rates chosen on a 10 % validation "
        "part of train (seed 0), then every seed trained on all of train and scored on test. "
        f"Machine: {env.get('cpu')}, {env['cpu_count']} cores, torch {env['torch']}, transformers "
        f"{env['transformers']}, {setup['threads']} thread(s).",
        "",
        "| row | " + " | ".join(f"seed {s} %" for s in seeds) + " | mean ± sd | density | entries | bytes stored "
        "| ms/step vs full FT | lr |",
        "|---|" + "---|" * (len(seeds) + 6),
    ]
    for k in ("probe", "full"):
        if k in ref:
            r = ref[k]
            lines.append(
                f"| {r['label']} (quality_adapters.md) | "
                + " | ".join(f"{r['accuracy'].get(s, float('nan')):.1f}" for s in seeds)
                + f" | {r['mean']:.1f} ± {r['sd']:.1f} | {'0' if k == 'probe' else '100 %'} | | | | {r['lr']:g} |"
            )
    timing = res.get("step_timing", {})
    for k, r in res["rows"].items():
        s0 = r["per_seed"][seeds[0]]
        t = timing.get(k, {}).get("vs_full", {}).get("ratio")
        lr = f"{s0['lr']:g}" + (f", gates {s0['gate_lr']:g}" if "gate_lr" in s0 else "")
        if "fixed_lr" in s0:
            lr += f", L0 {s0['l0_weight']:g}, fixed mask {s0['fixed_lr']:g} x {s0['fixed_epochs']} epochs"
        if k.startswith("ltsft"):
            lr = f"full phase {s0['full_lr']:g}, sparse {s0['lr']:g}"
        lines.append(
            f"| {LABELS.get(k, k)} | "
            + " | ".join(f"{r['accuracy'][s]:.1f}" for s in seeds)
            + f" | {r['mean']:.1f} ± {r['sd']:.1f} | {100 * s0['density']:.3f} % | {s0['delta_params']:,} | "
            f"{C.fmt_bytes(s0['stored_bytes'])} | {f'{t:.2f}x' if t else ''} | {lr} |"
        )
    lines += [
        "",
        "Density: the fraction of the targeted weights the stored delta holds (BitFit: its biases over all the "
        "encoder's parameters). Bytes stored: the delta's safetensors tensors as the hub keeps them "
        "(indices int32 + float32 values for the sparse rows). ms/step vs full FT: the median of "
        f"{next(iter(timing.values()), {}).get('rounds', '?')} interleaved rounds of one training step on one "
        "batch of 32 over the median of full fine-tuning's in the same rounds (LT-SFT: its sparse phase; its full "
        "phase is a full fine-tuning of the linear weights).",
        "",
        "## Training steps, side by side",
        "",
        C.markdown_table(
            [
                {
                    "method": k,
                    "median ms": f"{v['median_ms']:.0f}",
                    "vs full": f"{v['vs_full']['ratio']:.2f}x" if "vs_full" in v else "1.00x",
                    "trainable": f"{v['trainable']:,}",
                    "AdamW state": C.fmt_bytes(v["optimizer_state_bytes"]),
                }
                for k, v in timing.items()
            ],
            ["method", "median ms", "vs full", "trainable", "AdamW state"],
        ),
        "",
    ]
    dp = res["rows"].get("diffpruning", {}).get("per_seed", {})
    if dp:
        lines += [
            "## DiffPruning: what the gates reached",
            "",
            C.markdown_table(
                [
                    {
                        "seed": s,
                        "expected density after training": f"{100 * r['expected_density_after_training']:.2f} %",
                        "gates open at finalize": f"{100 * r['finalize']['gates_density']:.2f} %",
                        "stored": f"{100 * r['finalize']['density']:.3f} %",
                        "nonzero": f"{100 * r['finalize']['nonzero']:.3f} %",
                        "test % gated": f"{r['before_projection']['accuracy']:.1f}",
                        "projected": f"{r['after_projection']['accuracy']:.1f}" if "after_projection" in r else "",
                        "fixed-mask phase": f"{r['test']['accuracy']:.1f}",
                    }
                    for s, r in dp.items()
                ],
                [
                    "seed",
                    "expected density after training",
                    "gates open at finalize",
                    "stored",
                    "nonzero",
                    "test % gated",
                    "projected",
                    "fixed-mask phase",
                ],
            ),
            "",
            f"L0 weight {setup['dp']['l0_weight']:g} on the expected density; when the gates leave more than "
            f"{100 * setup['dp']['sparsity']:.1f} % open, `finalize` warns and the magnitude projection cuts the rest; "
            f"then {setup['dp']['fixed_mask_epochs']} epochs with the mask fixed at rate "
            f"{setup['dp'].get('fixed_mask_lr', 0):g}. Test accuracy of the gated model (every gate as trained), "
            "right after the projection to 0.5 %, and after the fixed-mask phase.",
            "",
        ]
    lines += ["## Learning-rate sweeps (validation accuracy %, seed 0)", ""]
    for k, r in res["rows"].items():
        pts = ", ".join(
            f"{s['lr']:g}"
            + (f"/{s['gate_lr']:g}/L0 {s['l0_weight']:g}" if "gate_lr" in s else "")
            + (f"/fixed {s['fixed_lr']:g} x {s.get('fixed_epochs', 2)}" if "fixed_lr" in s else "")
            + f": {s['val']['accuracy']:.1f}"
            for s in r["sweep"]
        )
        lines.append(f"- {LABELS.get(k, k)}: {pts}")
    lt = res["rows"].get("ltsft_0.01", {}).get("per_seed", {})
    if lt:
        fp = ", ".join(f"seed {s} {r['full_phase']['test']['accuracy']:.1f} %" for s, r in lt.items())
        lines += ["", f"LT-SFT's full phase itself (all linear weights dense, lr {FULL_LR:g}) scored {fp} on test."]
    lines += ["", "## Targets", ""]
    for k, v in res["targets"].items():
        lines.append(f"- {k}: {'yes' if v is True else ('**no**' if v is False else v)}")
    lines += [
        "",
        "Notes: DiffPruning's score comes from its fixed-mask phase. At L0 weight 1 the gates stayed 86-91 % open "
        "and the projection to 0.5 % left 74.6 % (the first run); at the weights chosen here the gates close below "
        "the target by themselves (0.13-0.15 % open), the gated model scores about 76 % on test, the projection "
        "keeps the 0.5 % largest entries of the gated difference, and the fixed-mask phase (these entries and the "
        "head, 4 epochs) brings it to the table's figure. The fixed-mask rate 1e-2 and L0 300 are the largest of "
        "their grids (L0 30 tied on validation). LT-SFT's sparse-phase rate 3e-3 is the largest of its grid.",
        "",
        f"This invocation ran {res['elapsed_s'] / 60:.1f} min (runs done earlier come from `--checkpoint`).",
    ]
    return "\n".join(lines)


def smoke() -> dict[str, Any]:
    """CI: 12 train / 8 test examples per section, 1 epoch at batch 16; every method once."""
    t0 = time.time()
    tok, enc0 = Q.load_tokenizer_and_encoder()
    data = Q.load_data(tok, train_per_class=12, test_per_class=8)
    b = Q.Budget(epochs=1, batch=16, warmup_steps=1)
    test = {"test": data.test}
    out = {
        "bitfit": run_bitfit(enc0, data, 1e-2, data.train, test, b),
        "diffpruning": run_diffpruning(enc0, data, DP_GRID[0], [(3e-4, 1), (3e-3, 1)], data.train, test, b),
        "ltsft": run_ltsft(enc0, data, [(d, 1e-3) for d in DENSITIES], data.train, test, b),
    }
    return {"runs": C._jsonable(out), "elapsed_s": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CI smoke run; writes to a temp dir unless --out")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default docs/results/quality_sparse.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as quality_adapters.py)")
    ap.add_argument("--seeds", default="1,2", help="extra seeds after seed 0 (default 1,2)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="save each finished run here and reuse them")
    ap.add_argument("--render", type=Path, default=None, help="only rewrite the markdown from this results JSON")
    ap.add_argument(
        "--part",
        choices=("sparse", "dp"),
        default=None,
        help="run only BitFit + LT-SFT, or only DiffPruning, into --checkpoint (two processes side by side); "
        "then a run without --part and with --merge of the other checkpoint writes the results",
    )
    ap.add_argument("--merge", type=Path, action="append", help="another --part's checkpoint to take runs from")
    ap.add_argument("--dp-seeds", default="", help="with --part dp: the final seeds to run here (two processes)")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(args.render.read_text())
        res["targets"] = targets(res)
        C.write_results(res, args.render, args.render.with_suffix(".md"), markdown(res))
        return 0
    if args.part:
        torch.set_num_threads(args.threads)
        full(args)
        return 0
    torch.set_num_threads(args.threads)
    if args.smoke:
        res = smoke()
        out = args.out or Path(tempfile.mkdtemp(prefix="quality_sparse_")) / "quality_sparse_smoke.json"
        out.write_text(json.dumps(res, indent=1) + "\n")
        log(f"smoke run done in {res['elapsed_s']:.1f} s; wrote {out}")
        return 0
    res = full(args)
    out = args.out or C.RESULTS_DIR / "quality_sparse.json"
    md = markdown(res)
    C.write_results(res, out, out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
