"""Speed and memory of the parameter-space deltas (issue 13), each against a peer timed in the same
interleaved rounds (see common.py):

1. a BitFit training step (forward + backward + AdamW over the bias deltas) vs full fine-tuning's
   step (every parameter): target <= 0.7x;
2. the LT-SFT sparse phase's step (AdamW over the selected entries' values, 1 % and 0.5 % of the
   linear weights) vs full fine-tuning's: target <= 1.2x, and its optimizer state proportional to the
   selected entries (bytes shown);
3. the forward (eval, no grad) with a 1 % sparse delta applied in the forward (unmerged) vs the base:
   target <= 1.1x; merged (base speed expected) and BitFit unmerged for reference.

DiffPruning's step and a LoRA r=8 step over the same linear layers are timed for reference.

    python benchmarks/bench_sparse.py            # writes docs/results/bench_sparse.{json,md}
    python benchmarks/bench_sparse.py --quick    # a tiny model, not judged

Model: a BERT with MiniLM-L6's shape (6 layers, hidden 384, 12 heads, FFN 1536, vocab 30522), random
weights from the config, batch 8 x 128, fp32, one torch thread.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C  # noqa: E402

MODEL = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12, vocab_size=30522)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
TARGET = {"bitfit_step": 0.7, "ltsft_step": 1.2, "sparse_forward": 1.1}
log = C.log


def bert(cfg: dict) -> nn.Module:
    from transformers import BertConfig, BertModel

    with C.quiet():
        torch.manual_seed(0)
        return BertModel(BertConfig(**cfg, max_position_embeddings=512), add_pooling_layer=False).float()


def sparse_model(base: nn.Module, density: float, active: bool = True) -> tuple[nn.Module, Any]:
    """A copy of `base` with an LT-SFT delta at `density` (selected after a random stand-in for the full
    phase, so the entries are scattered as a real selection's are) and random values."""
    import surgery

    m = copy.deepcopy(base)
    sft = surgery.SparseFinetune(m, targets="@linear", density=density)
    sft.full_phase()
    with torch.no_grad():
        for w in sft.weights.values():
            w.add_(torch.randn_like(w), alpha=1e-3)
    sft.select()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 1e-3)
    return m, sft


def run(quick: bool, rounds: int) -> dict[str, Any]:
    import surgery

    cfg = TINY if quick else MODEL
    batch, seq = (2, 32) if quick else (8, 128)
    base = bert(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g)

    def loss(m: nn.Module) -> torch.Tensor:  # a stand-in objective over every output
        return m(input_ids=ids).last_hidden_state.pow(2).mean()

    train: dict[str, tuple[nn.Module, list[nn.Parameter]]] = {}
    full = copy.deepcopy(base).requires_grad_(True)
    train["full"] = (full, list(full.parameters()))
    m = copy.deepcopy(base)
    surgery.inject(m, "bitfit", name="b")
    train["bitfit"] = (m, [p for p in m.parameters() if p.requires_grad])
    for d in (0.01, 0.005):
        m, _ = sparse_model(base, d)
        train[f"ltsft_{d}"] = (m, [p for p in m.parameters() if p.requires_grad])
    m = copy.deepcopy(base)
    surgery.inject(m, "diffpruning", targets="@linear", sparsity=0.005, name="dp")
    train["diffpruning"] = (m, [p for p in m.parameters() if p.requires_grad])
    m = copy.deepcopy(base)
    surgery.inject(m, "lora", targets="@linear", r=8, name="l")
    train["lora_r8"] = (m, [p for p in m.parameters() if p.requires_grad])
    opts = {k: torch.optim.AdamW(ps, lr=1e-6) for k, (_, ps) in train.items()}
    fns: dict[str, Callable[[], Any]] = {}
    for k, (model, _) in train.items():
        model.train()

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opts[k]) -> None:
            loss(model).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[k] = step
    log(f"[train] {len(fns)} steps x {rounds} rounds")
    st = C.interleaved(fns, rounds=rounds, warmup=2)
    res: dict[str, Any] = {"train": {}, "forward": {}}
    for k, v in st.items():
        state = sum(t.numel() * t.element_size() for s in opts[k].state.values() for t in s.values() if t.dim())
        res["train"][k] = {
            "median_ms": 1e3 * v["median_s"],
            "trainable": sum(p.numel() for p in train[k][1]),
            "optimizer_state_bytes": state,
            **({"vs_full": C.ratio(st, k, "full")} if k != "full" else {}),
        }
    del train, opts, fns

    fwd: dict[str, nn.Module] = {"base": copy.deepcopy(base)}
    fwd["sparse_0.01"], _ = sparse_model(base, 0.01)
    fwd["sparse_0.01_merged"], _ = sparse_model(base, 0.01)
    surgery.merge(fwd["sparse_0.01_merged"], "sft")
    m = copy.deepcopy(base)
    surgery.inject(m, "bitfit", name="b")
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 1e-2)
    fwd["bitfit"] = m
    ffns: dict[str, Callable[[], Any]] = {}
    for k, model in fwd.items():
        model.eval()

        def fw(model: nn.Module = model) -> None:
            with torch.no_grad():
                model(input_ids=ids)

        ffns[k] = fw
    log(f"[forward] {len(ffns)} x {rounds} rounds")
    st = C.interleaved(ffns, rounds=rounds, warmup=2)
    for k, v in st.items():
        res["forward"][k] = {
            "median_ms": 1e3 * v["median_s"],
            **({"vs_base": C.ratio(st, k, "base")} if k != "base" else {}),
        }
    t = res["train"]
    res["targets"] = {
        "bitfit_step_vs_full": {"ratio": t["bitfit"]["vs_full"]["ratio"], "target": TARGET["bitfit_step"]},
        "ltsft_1pct_step_vs_full": {"ratio": t["ltsft_0.01"]["vs_full"]["ratio"], "target": TARGET["ltsft_step"]},
        "ltsft_0.5pct_step_vs_full": {"ratio": t["ltsft_0.005"]["vs_full"]["ratio"], "target": TARGET["ltsft_step"]},
        "sparse_forward_vs_base": {
            "ratio": res["forward"]["sparse_0.01"]["vs_base"]["ratio"],
            "target": TARGET["sparse_forward"],
        },
    }
    for v in res["targets"].values():
        v["met"] = v["ratio"] <= v["target"]
    res["setup"] = {"model": cfg, "batch": batch, "seq": seq, "rounds": rounds, "threads": torch.get_num_threads()}
    return res


def markdown(res: dict[str, Any], env: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [
        "# Parameter-space deltas: speed and memory",
        "",
        "Written by `benchmarks/bench_sparse.py` (issue 13). A BERT of MiniLM-L6's shape "
        f"({s['model']['num_hidden_layers']} layers, hidden {s['model']['hidden_size']}), batch {s['batch']} x "
        f"{s['seq']}, fp32, {s['threads']} torch thread(s), {s['rounds']} interleaved rounds (medians; ratios are "
        f"the median of the per-round ratios). Machine: {env.get('cpu')}, {env['cpu_count']} cores, torch "
        f"{env['torch']}, transformers {env['transformers']}.",
        "",
        "## Targets",
        "",
        C.markdown_table(
            [
                {
                    "figure": k,
                    "ratio": f"{v['ratio']:.2f}x",
                    "target": f"<= {v['target']}x",
                    "met": "yes" if v["met"] else "**no**",
                }
                for k, v in res["targets"].items()
            ],
            ["figure", "ratio", "target", "met"],
        ),
        "",
        "## Training step (forward + backward + AdamW)",
        "",
        C.markdown_table(
            [
                {
                    "method": k,
                    "median ms": f"{v['median_ms']:.1f}",
                    "vs full FT": f"{v['vs_full']['ratio']:.2f}x" if "vs_full" in v else "1.00x",
                    "trainable": f"{v['trainable']:,}",
                    "AdamW state": C.fmt_bytes(v["optimizer_state_bytes"]),
                }
                for k, v in res["train"].items()
            ],
            ["method", "median ms", "vs full FT", "trainable", "AdamW state"],
        ),
        "",
        "AdamW state: the exp_avg and exp_avg_sq tensors after the steps (2 x 4 bytes per trainable entry): "
        "for LT-SFT, 8 bytes per selected entry.",
        "",
        "## Forward (eval, no grad)",
        "",
        C.markdown_table(
            [
                {
                    "model": k,
                    "median ms": f"{v['median_ms']:.1f}",
                    "vs base": f"{v['vs_base']['ratio']:.2f}x" if "vs_base" in v else "1.00x",
                }
                for k, v in res["forward"].items()
            ],
            ["model", "median ms", "vs base"],
        ),
        "",
        "sparse_0.01: a 1 % LT-SFT delta over every linear layer, applied in the forward (the values are added "
        "into a copy of each weight); _merged: the same merged into the weights; bitfit: every bias delta "
        "added to the outputs.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model; writes to --out only")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args.quick, 3 if args.quick else args.rounds)
    env = C.environment()
    res["env"] = env
    md = markdown(res, env)
    print(md)
    if args.quick and args.out is None:
        return 0
    out = args.out or C.RESULTS_DIR / "bench_sparse.json"
    C.write_results(res, out, out.with_suffix(".md"), md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
