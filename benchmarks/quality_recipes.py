"""Quality of the training recipes on real weights (issue 14): layer-wise learning-rate decay, LP-FT,
head-only and top-2 partial fine-tuning, and continual learning (plain sequential, EWC, a LoRA per task)
on the pretrained MiniLM, the recipe of `quality_adapters.py`.

    python benchmarks/quality_recipes.py --part rows --checkpoint /work/runs/qr_rows.json
    python benchmarks/quality_recipes.py --part continual --checkpoint /work/runs/qr_cl.json
    python benchmarks/quality_recipes.py --render     # both checkpoints -> docs/results/quality_recipes.{json,md}
    python benchmarks/quality_recipes.py --smoke      # CI smoke run, writes nothing under docs/

The two parts can run side by side (one torch thread each). Every model is the encoder with a task head
from `surgery.heads(enc, {...}, pooling="mean")` (the mean pooling of quality_adapters.py), trained 4
epochs at batch 32 with AdamW and a linear decay to zero over the groups `surgery.Schedule` builds.

Rows (seeds 0-2): full fine-tuning (`Schedule(enc, lr)`, decay 1), LLRD (`layer_decay=0.8`, ELECTRA's),
LP-FT (`unfreeze("head", at=0).unfreeze("all", at=one epoch)`, the head at 10x the rate), head only (`surgery.partial(enc, "head")`),
top-2 blocks (`partial(enc, "top", layers=2)`). Rates: full fine-tuning's and the probe's from
quality_adapters (1e-4, 3e-2); LLRD and top-2 choose between two on the validation part (seed 0).

Continual learning: task A = four sections (the split of quality_adapters' fusion experiment), task B = the
other four, two heads ("a", "b"). Plain: the encoder and head a trained on A, then the encoder and head b on
B. EWC: the same, with `surgery.EWC(model, A's batches)` after A and its penalty added on B (lambda chosen
on the validation parts, seed 0: the one that forgets least while B stays within 2 points of plain's).
LoRA per task: the encoder frozen, LoRA r=8 on @linear "lora_a" + head a on A, then "lora_b" + head b on B.
Accuracy on A before and after B, and on B.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import quality_adapters as Q  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

FULL_LR, HEAD_LR, LORA_LR = 1e-4, 3e-2, 5e-3  # quality_adapters' choices (full FT, probe, LoRA @linear)
LAYER_DECAY = 0.8
LPFT_HEAD_SCALE = 10.0  # the head's rate over the body's in LP-FT (both phases: the groups never change)
LLRD_LRS = (1e-4, 2e-4)
TOP2_LRS = (1e-4, 3e-4)
EWC_LAMBDAS = (1e3, 1e4, 1e5, 1e6, 1e7)
log = C.log


class Task(nn.Module):
    """The encoder called with one task: `(ids, mask) -> logits`, as quality_adapters' loop expects."""

    def __init__(self, enc: nn.Module, task: str) -> None:
        super().__init__()
        self.enc, self.task = enc, task

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.enc(input_ids=ids, attention_mask=mask, task=self.task).logits


def with_heads(enc0: nn.Module, spec: dict[str, int], seed: int) -> nn.Module:
    import surgery

    Q.seed_all(seed)
    enc = copy.deepcopy(enc0)
    surgery.heads(enc, spec, pooling="mean")
    return enc


def _trainable(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- rows


def run_row(kind: str, enc0: nn.Module, data: Q.Data, lr: float, fit: Q.Split, evals: dict, b: Q.Budget) -> dict:
    import surgery

    enc = with_heads(enc0, {"sections": len(data.label_names)}, b.seed)
    on_step = None
    if kind in ("full", "llrd", "lpft"):
        surgery.unfreeze(enc)
        if kind == "lpft":  # the head alone for one epoch (at 10x the rate), then everything
            plan = surgery.Schedule(enc, lr=lr, groups={"*heads*": LPFT_HEAD_SCALE})
            plan.unfreeze("head", at=0).unfreeze("all", at=-(-len(fit) // b.batch))
        else:
            plan = surgery.Schedule(enc, lr=lr, layer_decay=LAYER_DECAY if kind == "llrd" else 1.0)
        groups, on_step = plan.param_groups(), plan.step
    else:
        if kind == "head":
            surgery.partial(enc, "head")
        else:
            surgery.partial(enc, "top", layers=2)
        groups = [{"params": [p for p in enc.parameters() if p.requires_grad], "lr": lr}]
    model = Task(enc, "sections")
    out = Q.train(model, groups, fit, data.pad_id, b, on_step=on_step)
    out.update(lr=lr, trainable_at_end=_trainable(enc))
    out.update({k: Q.evaluate(model, s, data.pad_id) for k, s in evals.items()})
    return out


ROWS = {
    "full": ("full fine-tuning (Schedule, no decay)", (FULL_LR,)),
    "llrd": (f"full fine-tuning, layer-wise decay {LAYER_DECAY}", LLRD_LRS),
    "lpft": ("LP-FT (head 1 epoch, then all)", (FULL_LR,)),
    "head": ("head only (partial 'head')", (HEAD_LR,)),
    "top2": ("top 2 blocks + head (partial 'top')", TOP2_LRS),
}


def part_rows(enc0: nn.Module, data: Q.Data, seeds: list[int], ck: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (label, lrs) in ROWS.items():
        sweep = []
        if len(lrs) > 1:
            for lr in lrs:
                r = _cached(
                    ck,
                    f"sweep:{key}:{lr!r}",
                    lambda lr=lr, key=key: run_row(key, enc0, data, lr, data.fit, {"val": data.val}, Q.Budget()),
                )
                log(f"[{key} sweep] lr {lr:g}: val {r['val']['accuracy']:.1f} %")
                sweep.append(r)
        lr = Q.best(sweep)["lr"] if sweep else lrs[0]
        per = {}
        for sd in seeds:
            per[str(sd)] = _cached(
                ck,
                f"final:{key}:{lr!r}:{sd}",
                lambda sd=sd, key=key, lr=lr: run_row(
                    key, enc0, data, lr, data.train, {"test": data.test}, Q.Budget(seed=sd)
                ),
            )
            log(f"[{key}] seed {sd} lr {lr:g}: TEST {per[str(sd)]['test']['accuracy']:.1f} %")
        accs = [r["test"]["accuracy"] for r in per.values()]
        out[key] = {
            "label": label,
            "lr": lr,
            "per_seed": per,
            "accuracy": {s: r["test"]["accuracy"] for s, r in per.items()},
            "mean": statistics.fmean(accs),
            "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "sweep": [{"lr": r["lr"], "val": r["val"]} for r in sweep],
        }
    return out


# ----------------------------------------------------------------------------- continual learning


def halves(data: Q.Data, seed: int = Q.SEED) -> dict[str, list[int]]:
    n = len(data.label_names)
    a = sorted(random.Random(seed).sample(range(n), n // 2))  # quality_adapters' fusion split
    return {"a": a, "b": [i for i in range(n) if i not in a]}


def pick(s: Q.Split, labels: list[int]) -> Q.Split:
    relabel = {y: i for i, y in enumerate(labels)}
    return s.subset([i for i, y in enumerate(s.labels.tolist()) if y in relabel], relabel)


def _batches(split: Q.Split, pad: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """Batches for EWC's Fisher, by length: EWC runs vmap over the examples that share an attention mask,
    and right-padded examples of one length share theirs."""
    order = sorted(range(len(split)), key=lambda i: len(split.ids[i]))
    out = []
    for s in range(0, len(order), batch):
        ids, mask, y = Q.collate(split, order[s : s + batch], pad)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": y})
    return out


def continual(
    enc0: nn.Module,
    data: Q.Data,
    tasks: dict[str, tuple[Q.Split, dict]],
    b: Q.Budget,
    lams: tuple[float, ...] = (),
    lora: bool = False,
) -> dict[str, Any]:
    """Task A, then task B; `tasks[t] = (train split, eval splits)`. Full fine-tuning: one run on A, then
    B from a copy of that model plainly and with EWC at each of `lams` (one Fisher); with `lora`, a LoRA
    per task instead. Returns {"plain" | "ewc:<lambda>" | "lora": {a_before, a_after, b, ...}}."""
    import surgery

    enc = with_heads(enc0, {"a": 4, "b": 4}, b.seed)

    def scores(e: nn.Module, t: str) -> dict[str, Any]:
        return {k: Q.evaluate(Task(e, t), s, data.pad_id) for k, s in tasks[t][1].items()}

    def groups(e: nn.Module, lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in e.parameters() if p.requires_grad], "lr": lr}]

    if lora:
        surgery.inject(enc, "lora", targets="@linear", r=8, alpha=8, name="lora_a")
        surgery.activate(enc, "heads", "lora_a")
        train_a = Q.train(Task(enc, "a"), groups(enc, LORA_LR), tasks["a"][0], data.pad_id, b)
        a_before = scores(enc, "a")
        surgery.inject(enc, "lora", targets="@linear", r=8, alpha=8, name="lora_b")
        surgery.activate(enc, "heads", "lora_b")
        train_b = Q.train(Task(enc, "b"), groups(enc, LORA_LR), tasks["b"][0], data.pad_id, b)
        res = {"b": scores(enc, "b"), "train_b": train_b}
        surgery.activate(enc, "heads", "lora_a")  # task A's own delta back for task A
        return {"lora": {"a_before": a_before, "a_after": scores(enc, "a"), "train_a": train_a, **res}}
    surgery.unfreeze(enc)
    train_a = Q.train(Task(enc, "a"), groups(enc, FULL_LR), tasks["a"][0], data.pad_id, b)
    a_before = scores(enc, "a")
    out: dict[str, Any] = {}
    ewc = None
    fisher_s = 0.0
    if lams:
        t0 = time.perf_counter()
        ewc = surgery.EWC(
            Task(enc, "a"),
            _batches(tasks["a"][0], data.pad_id, b.batch),
            loss_fn=lambda m, x: F.cross_entropy(m(x["input_ids"], x["attention_mask"]), x["labels"]),
        )
        fisher_s = time.perf_counter() - t0
    for lam in (None, *lams):
        e = copy.deepcopy(enc)
        extra = None
        if lam is not None:
            assert ewc is not None
            ewc.lam = lam
            task_b = Task(e, "b")

            def extra(task_b: nn.Module = task_b, ewc: Any = ewc) -> torch.Tensor:
                return ewc.penalty(task_b)

        Q.seed_all(b.seed)
        train_b = Q.train(Task(e, "b"), groups(e, FULL_LR), tasks["b"][0], data.pad_id, b, extra_loss=extra)
        key = "plain" if lam is None else f"ewc:{lam!r}"
        out[key] = {"a_before": a_before, "a_after": scores(e, "a"), "b": scores(e, "b"), "lambda": lam or 0.0}
        out[key].update(train_b_ms=train_b["ms_per_step"], train_a_ms=train_a["ms_per_step"])
        if lam is not None:
            out[key].update(fisher_s=fisher_s, fisher_path=ewc.per_example if ewc else None)
        del e
    return out


def part_continual(enc0: nn.Module, data: Q.Data, seeds: list[int], ck: Path | None) -> dict[str, Any]:
    h = halves(data)
    sub = {t: {k: pick(getattr(data, k), h[t]) for k in ("train", "fit", "val", "test")} for t in h}
    val_tasks = {t: (sub[t]["fit"], {"val": sub[t]["val"]}) for t in h}
    test_tasks = {t: (sub[t]["train"], {"test": sub[t]["test"]}) for t in h}
    # lambda on the validation parts, seed 0: the one that forgets least while B stays within 2 points
    sw = _cached(ck, f"sweep:{EWC_LAMBDAS!r}", lambda: continual(enc0, data, val_tasks, Q.Budget(), EWC_LAMBDAS))
    plain_b = sw["plain"]["b"]["val"]["accuracy"]
    ewcs = [sw[f"ewc:{lam!r}"] for lam in EWC_LAMBDAS]
    for r in ewcs:
        x = _brief(r, "val")
        log(
            f"[ewc sweep] lambda {x['lambda']:g}: A {x['a_before']:.1f} -> {x['a_after']:.1f}, B {x['b']:.1f} (plain B {plain_b:.1f})"
        )
    ok = [r for r in ewcs if r["b"]["val"]["accuracy"] >= plain_b - 2.0] or ewcs
    lam = max(ok, key=lambda r: (r["a_after"]["val"]["accuracy"], r["b"]["val"]["accuracy"]))["lambda"]
    out: dict[str, Any] = {
        "halves": {t: [data.label_names[i] for i in h[t]] for t in h},
        "lambda": lam,
        "sweep": {"plain": _brief(sw["plain"], "val"), "ewc": [_brief(r, "val") for r in ewcs]},
        "runs": {},
    }
    per: dict[str, dict[str, Any]] = {"plain": {}, "ewc": {}, "lora": {}}
    for sd in seeds:
        b = Q.Budget(seed=sd)
        full = _cached(ck, f"final:full:{lam!r}:{sd}", lambda b=b: continual(enc0, data, test_tasks, b, (lam,)))
        lo = _cached(ck, f"final:lora:{sd}", lambda b=b: continual(enc0, data, test_tasks, b, lora=True))
        per["plain"][str(sd)], per["ewc"][str(sd)], per["lora"][str(sd)] = (
            full["plain"],
            full[f"ewc:{lam!r}"],
            lo["lora"],
        )
        for k in per:
            x = _brief(per[k][str(sd)], "test")
            log(f"[{k}] seed {sd}: A {x['a_before']:.1f} -> {x['a_after']:.1f}, B {x['b']:.1f}")
    for k, runs in per.items():
        briefs = {s: _brief(r, "test") | {"fisher_s": r.get("fisher_s")} for s, r in runs.items()}
        out["runs"][k] = {
            "per_seed": briefs,
            **{
                f"mean_{m}": statistics.fmean(x[m] for x in briefs.values())
                for m in ("a_before", "a_after", "b", "forgetting")
            },
        }
    return out


def _brief(r: dict[str, Any], split: str) -> dict[str, Any]:
    a0, a1, bb = (r[k][split]["accuracy"] for k in ("a_before", "a_after", "b"))
    return {"lambda": r.get("lambda", 0.0), "a_before": a0, "a_after": a1, "b": bb, "forgetting": a0 - a1}


# ----------------------------------------------------------------------------- plumbing and report


def _cached(ck: Path | None, key: str, make: Callable[[], Any]) -> Any:
    done = Q._load(ck)
    if key in done:
        return done[key]
    v = C._jsonable(make())
    Q._save(ck, key, v)
    return v


def targets(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ref = res.get("reference", {})
    rows = res.get("rows", {})
    if "probe" in ref:
        for k in ("head", "top2"):
            if k in rows:
                out[f"{k}_beats_probe (seed mean)"] = rows[k]["mean"] > ref["probe"]["mean"]
    if "full" in rows:
        for k in ("llrd", "lpft"):
            if k in rows:
                out[f"{k}_minus_full (seed mean, points)"] = round(rows[k]["mean"] - rows["full"]["mean"], 2)
    cl = res.get("continual", {}).get("runs", {})
    if "plain" in cl and "ewc" in cl:
        out["ewc_halves_forgetting"] = cl["ewc"]["mean_forgetting"] <= 0.5 * cl["plain"]["mean_forgetting"]
        out["ewc_within_2pt_on_b"] = cl["ewc"]["mean_b"] >= cl["plain"]["mean_b"] - 2.0
    return out


def markdown(res: dict[str, Any]) -> str:
    env, ref = res["env"], res.get("reference", {})
    lines = [
        "# Training recipes on real weights: MiniLM on Debian package sections",
        "",
        "Written by `benchmarks/quality_recipes.py` (issue 14). The recipe of [quality_adapters.md](quality_adapters.md) "
        "(pretrained all-MiniLM-L6-v2, mean pooling, 4 epochs, batch 32, AdamW, linear decay to zero), the head a "
        '`surgery.heads(enc, {"sections": 8}, pooling="mean")` delta, the optimizer groups from `surgery.Schedule` '
        f"(full FT, LLRD, LP-FT) or `surgery.partial`. Machine: {env.get('cpu')}, {env['cpu_count']} cores, torch "
        f"{env['torch']}, transformers {env['transformers']}, one torch thread.",
        "",
    ]
    rows = res.get("rows", {})
    if rows:
        seeds = list(next(iter(rows.values()))["accuracy"])
        lines += [
            "## Fine-tuning recipes (test accuracy %, 592 examples)",
            "",
            "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | lr | trainable at the end |",
            "|---|" + "---|" * (len(seeds) + 3),
        ]
        for k in ("probe", "full"):
            if k in ref:
                r = ref[k]
                lines.append(
                    f"| {r['label']} (quality_adapters.md, its own harness) | "
                    + " | ".join(f"{r['accuracy'].get(s, float('nan')):.1f}" for s in seeds)
                    + f" | {r['mean']:.1f} ± {r['sd']:.1f} | {r['lr']:g} | |"
                )
        for r in rows.values():
            s0 = next(iter(r["per_seed"].values()))
            lines.append(
                f"| {r['label']} | "
                + " | ".join(f"{r['accuracy'][s]:.1f}" for s in seeds)
                + f" | {r['mean']:.1f} ± {r['sd']:.1f} | {r['lr']:g} | {s0['trainable_at_end']:,} |"
            )
        sw = [
            f"{r['label']}: " + ", ".join(f"{s['lr']:g}: {s['val']['accuracy']:.1f}" for s in r["sweep"])
            for r in rows.values()
            if r["sweep"]
        ]
        if sw:
            lines += ["", "Validation sweeps (seed 0, accuracy %): " + "; ".join(sw) + "."]
        lines.append("")
    cl = res.get("continual")
    if cl:
        lines += [
            "## Continual learning: task A, then task B",
            "",
            f"Task A = {', '.join(cl['halves']['a'])}; task B = {', '.join(cl['halves']['b'])} (two heads, 4 epochs "
            f"each). EWC lambda {cl['lambda']:g}, chosen on the validation parts (seed 0). Means over seeds "
            f"{', '.join(next(iter(cl['runs'].values()))['per_seed'])}:",
            "",
            "| run | A before B % | A after B % | forgetting (points) | B % |",
            "|---|---|---|---|---|",
        ]
        names = {
            "plain": "plain sequential (full FT)",
            "ewc": "EWC (online, empirical Fisher per example)",
            "lora": "a LoRA per task",
        }
        for k, r in cl["runs"].items():
            lines.append(
                f"| {names[k]} | {r['mean_a_before']:.1f} | {r['mean_a_after']:.1f} | {r['mean_forgetting']:.1f} | {r['mean_b']:.1f} |"
            )
        lines += ["", "Per seed (A before -> after, B):", ""]
        for k, r in cl["runs"].items():
            per = "; ".join(
                f"seed {s}: {x['a_before']:.1f} -> {x['a_after']:.1f}, {x['b']:.1f}" for s, x in r["per_seed"].items()
            )
            lines.append(f"- {names[k]}: {per}")
        fs = [x["fisher_s"] for x in cl["runs"].get("ewc", {}).get("per_seed", {}).values() if x.get("fisher_s")]
        if fs:
            lines.append(
                f"- EWC's Fisher over task A's {''}examples took {statistics.fmean(fs):.0f} s (vmap over each batch)."
            )
        sw = "; ".join(
            f"lambda {r['lambda']:g}: A {r['a_before']:.1f} -> {r['a_after']:.1f}, B {r['b']:.1f}"
            for r in cl["sweep"]["ewc"]
        )
        p = cl["sweep"]["plain"]
        lines += [
            "",
            f"Lambda sweep (validation): plain A {p['a_before']:.1f} -> {p['a_after']:.1f}, B {p['b']:.1f}; {sw}.",
            "",
        ]
    t = res.get("targets", {})
    if t:
        lines += ["## Targets", ""] + [
            f"- {k}: {'yes' if v is True else ('**no**' if v is False else v)}" for k, v in t.items()
        ]
    return "\n".join(lines)


def smoke() -> dict[str, Any]:
    """CI: 12 train / 8 test examples per section, 1 epoch at batch 16: LLRD, LP-FT, top-2, and the three
    continual runs."""
    tok, enc0 = Q.load_tokenizer_and_encoder()
    data = Q.load_data(tok, train_per_class=12, test_per_class=8)
    b = Q.Budget(epochs=1, batch=16, warmup_steps=1)
    test = {"test": data.test}
    rows = {
        k: run_row(k, enc0, data, lr, data.train, test, b) for k, lr in (("llrd", 1e-4), ("lpft", 1e-4), ("top2", 1e-4))
    }
    h = halves(data)
    tasks = {t: (pick(data.train, h[t]), {"test": pick(data.test, h[t])}) for t in h}
    cl = continual(enc0, data, tasks, b, (1e6,)) | continual(enc0, data, tasks, b, lora=True)
    return C._jsonable({"rows": rows, "continual": cl})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("rows", "continual"), help="run one part into its checkpoint")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--render", action="store_true", help="the two parts' checkpoints -> docs/results")
    ap.add_argument("--rows", type=Path, default=Path("/work/runs/qr_rows.json"))
    ap.add_argument("--continual", type=Path, default=Path("/work/runs/qr_cl.json"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        out = Path(tempfile.mkdtemp(prefix="quality_recipes_")) / "smoke.json"
        out.write_text(json.dumps(smoke(), indent=1) + "\n")
        log(f"wrote {out}")
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.part:
        tok, enc0 = Q.load_tokenizer_and_encoder()
        data = Q.load_data(tok)
        run = part_rows if args.part == "rows" else part_continual
        res = run(enc0, data, seeds, args.checkpoint)
        Q._save(args.checkpoint, f"result:{args.part}", res)
        return 0
    if args.render:
        res: dict[str, Any] = {"benchmark": "quality_recipes", "env": C.environment()}
        for part, path in (("rows", args.rows), ("continual", args.continual)):
            got = Q._load(path).get(f"result:{part}")
            if got:
                res[part] = got
        ref = json.loads((C.RESULTS_DIR / "quality_adapters.json").read_text())
        res["reference"] = {k: {"label": ref["rows"][k]["label"], **ref["seeds"][k]} for k in ("probe", "full")}
        res["targets"] = targets(res)
        out = C.RESULTS_DIR / "quality_recipes.json"
        md = markdown(res)
        C.write_results(res, out, out.with_suffix(".md"), md)
        print(md)
        return 0
    ap.error("give --part, --render or --smoke")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
