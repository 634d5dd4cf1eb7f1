"""SFT, reward model, DPO, PPO and GRPO on deltas over one frozen SmolLM2-135M-Instruct (issue 15).

    python benchmarks/quality_rl.py --checkpoint /work/runs/qrl.json            # every part, resumable
    python benchmarks/quality_rl.py --part zeroshot --checkpoint ...             # one part
    python benchmarks/quality_rl.py --render                                     # checkpoint -> docs/results
    python benchmarks/quality_rl.py --smoke                                      # CI smoke (< 1 min)

Data: ../shared/data/debian-synopsis.jsonl (a Debian long description -> the maintainer's one-line
synopsis; `rejected` is another package's synopsis from the same section; 953 train / 239 test). The
prompt is PROMPT + the description as one user turn of the chat template; the completion is the
synopsis and the end-of-turn token.

- zero-shot: preference accuracy (summed log-probability of the chosen synopsis > the rejected one's)
  and ROUGE-L F1 of greedy synopses (at most 32 new tokens, the KV cache) against the real ones;
  `zeroshot_nf4` the same of the base with its linears in NF4 (what QLoRA starts from), `zeroshot_loftq`
  with LoftQ's rank-16 correction of the rounding as the (untrained) LoRA (what `qlora_loftq` starts from).
- SFT (seeds 0-2): LoRA r=16 on every linear of the fp32 base, the same on the NF4 base (QLoRA), the same
  started from LoftQ's correction of the rounding (`qlora_loftq`: the same NF4 codes), prompt tuning
  (20 virtual tokens) and prefix tuning (20); AdamW, linear decay, the completion's tokens only.
  `lora_lr1e-3` / `qlora_lr1e-3`: LoRA and QLoRA at lr 1e-3 instead of 2e-4 (one epoch at 2e-4 leaves
  QLoRA short of LoRA; the DPO / PPO / GRPO parts start from the 2e-4 `lora` delta).
- reward model: `surgery.RewardModel(base, delta="rm", r=16)`, Bradley-Terry on the train pairs,
  accuracy on the test pairs.
- DPO from the SFT LoRA delta (the reference: `surgery.reference`, the base): test preference
  accuracy (implicit reward margin > 0) and ROUGE-L; `dpo_rpo` the same with the chosen synopsis's
  NLL added (`rpo_alpha=1.0`); `dpo_sft` with the SFT delta as the reference (`ref_delta="sft"`),
  training a copy of it (the DPO paper's and TRL's ``ref_adapter_name`` setting).
- PPO and GRPO from the SFT LoRA delta with the reward model: the mean reward of greedy test answers
  before and after, and the KL to the reference.

ROUGE-L is computed here (longest common subsequence over lower-cased alphanumeric words, F1: the
`rouge-score` package's default tokenisation, no stemming) to keep its dependencies out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import common as C  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

DATA = C.REPO.parent / "shared" / "data" / "debian-synopsis.jsonl"
PROMPT = "Write the one-line synopsis of this Debian package."
MAX_LENGTH = 256
MAX_NEW_TOKENS = 32
SEEDS = (0, 1, 2)
SFT = {  # method -> (inject kwargs, lr)
    "lora": ({"method": "lora", "targets": "@linear", "r": 16, "alpha": 32}, 2e-4),
    "qlora": ({"method": "lora", "targets": "@linear", "r": 16, "alpha": 32}, 2e-4),
    # the same LoRA started from LoftQ's rank-16 approximation of the rounding error (same NF4 codes)
    "qlora_loftq": ({"method": "lora", "targets": "@linear", "r": 16, "alpha": 32, "init": "loftq"}, 2e-4),
    "prompt": ({"method": "prompt", "n_tokens": 20}, 3e-2),
    "prefix": ({"method": "prefix", "n_tokens": 20}, 1e-2),
}
# the same LoRA on either base at 5x the learning rate: is the QLoRA gap a start-point gap that more
# movement closes? (not run by the smoke test: the same code as the rows above)
SFT_SWEEP = {f"{m}_lr1e-3": (SFT[m][0], 1e-3) for m in ("lora", "qlora")}
SFT.update(SFT_SWEEP)
SFT_EPOCHS, SFT_BATCH = 1, 8
EVAL_BATCH = 16
RM = {"r": 16, "lr": 1e-4, "epochs": 1, "batch_size": 8}
DPO = {"beta": 0.1, "lr": 5e-5, "epochs": 1, "batch_size": 8}
DPO_RPO = {**DPO, "rpo_alpha": 1.0}  # + the chosen synopsis's NLL (TRL's rpo_alpha; the RPO paper's 1.0)
# variant -> (train_dpo kwargs, ref_delta): the reference the base, or the SFT delta (the policy a copy of it)
DPO_VARIANTS = {"dpo": (DPO, None), "dpo_rpo": (DPO_RPO, None), "dpo_sft": (DPO, "sft")}
# a sweep of rpo_alpha with the SFT reference: dpo_rpo (1.0) kept ROUGE-L, dpo_sft (0) preference accuracy
DPO_SWEEP = {f"dpo_sft_rpo{a}": ({**DPO, "rpo_alpha": a}, "sft") for a in (0.2, 0.5)}
DPO_VARIANTS.update(DPO_SWEEP)
RL_STEPS, RL_BATCH = 32, 8  # PPO / GRPO updates, prompts per update
PPO_CFG = {"kl": 0.05, "lr": 1e-5, "ppo_epochs": 2, "max_new_tokens": MAX_NEW_TOKENS}
# minibatch: 8 completions per forward (the same gradient); all 32 at once took 14 GB and an OOM kill
GRPO_CFG = {"group": 4, "beta": 0.04, "lr": 1e-5, "max_new_tokens": MAX_NEW_TOKENS, "minibatch": 8}
# variant -> (algorithm, ref_delta): the KL to the base, or (a copy of the SFT delta trained) to the SFT delta
RL_VARIANTS = {"ppo": ("ppo", None), "grpo": ("grpo", None), "ppo_sft": ("ppo", "sft"), "grpo_sft": ("grpo", "sft")}
log = C.log
PARTS = [
    "zeroshot",
    "zeroshot_nf4",
    "zeroshot_loftq",
    *(f"sft:{m}" for m in SFT),
    "rm",
    *DPO_VARIANTS,
    "rl_before",
    *RL_VARIANTS,
]


# ----------------------------------------------------------------------------- data and metrics


def load_rows(limit_train: int | None = None, limit_test: int | None = None) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]

    def pick(split: str, limit: int | None) -> list[dict]:
        out = [
            {"prompt": f"{PROMPT}\n\n{r['text']}", "chosen": r["synopsis"], "rejected": r["rejected"]}
            for r in rows
            if r["split"] == split
        ]
        return out[:limit] if limit else out

    return pick("train", limit_train), pick("test", limit_test)


def _words(s: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).split()


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 of `pred` against `ref` (LCS over words)."""
    a, b = _words(pred), _words(ref)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


@torch.no_grad()
def greedy(model: nn.Module, tok: Any, encoded: Sequence[Any], pad_id: int) -> list[str]:
    """Greedy synopses (the KV cache, at most MAX_NEW_TOKENS), batched and left-padded."""
    from surgery.rl import data as D

    model.eval()
    out: list[str] = []
    for i in range(0, len(encoded), EVAL_BATCH):
        batch = D.prompts(encoded[i : i + EVAL_BATCH], pad_id)
        gen = model.generate(
            **batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad_id, use_cache=True
        )
        new = gen[:, batch["input_ids"].shape[1] :]
        out += [tok.decode(row, skip_special_tokens=True).strip().split("\n")[0] for row in new]
    return out


def rouge(model: nn.Module, tok: Any, encoded: Sequence[Any], refs: Sequence[str], pad_id: int) -> dict[str, Any]:
    preds = greedy(model, tok, encoded, pad_id)
    scores = [rouge_l(p, r) for p, r in zip(preds, refs, strict=True)]
    return {"rouge_l": 100 * statistics.fmean(scores), "examples": list(zip(preds[:5], refs[:5], strict=True))}


@torch.no_grad()
def preference_accuracy(model: nn.Module, encoded: Sequence[Any], pad_id: int) -> float:
    """Share of pairs whose chosen completion has the higher summed log-probability."""
    from surgery.rl import data as D
    from surgery.rl.logprobs import logprobs

    model.eval()
    wins = 0
    for i in range(0, len(encoded), EVAL_BATCH):
        c, r = logprobs(model, D.collate(encoded[i : i + EVAL_BATCH], pad_id))
        wins += int((c > r).sum())
    return 100.0 * wins / len(encoded)


@torch.no_grad()
def quantisation_residual(base: nn.Module, quantised: nn.Module, layers: Sequence[str]) -> dict[str, Any]:
    """Over the quantised linears: ‖W - Q(W)‖ / ‖W‖, and the share of the residual's energy its best
    rank-k approximation holds (what a LoftQ-style initialisation of the factors could remove). That
    approximation is the LoftQ factors `quantize(..., loftq_rank=k)` kept: an exact truncated SVD."""
    from surgery.fourbit import loftq_factors, weight_of

    rel, share = [], []
    for path in layers:
        q = quantised.get_submodule(path)
        w = base.get_submodule(path).weight.float()
        r = w - weight_of(q).float()
        lr = loftq_factors(q)
        assert lr is not None, f"{path} was quantised without loftq_rank"
        rel.append(float(r.norm() / w.norm()))
        share.append(float((lr[0] @ lr[1]).norm() ** 2 / r.norm() ** 2))
    rank = lr[0].shape[1]
    return {
        "layers": len(layers),
        "residual_rel_norm": statistics.fmean(rel),
        f"residual_rank{rank}_energy": statistics.fmean(share),
        f"residual_rank{rank}_energy_max": max(share),
    }


@torch.no_grad()
def loftq_residual(base: nn.Module, quantised: nn.Module, name: str) -> dict[str, Any]:
    """Over the sites of the LoRA `name` on the quantised copy: the mean of ‖W - Q(W)‖ / ‖W‖, and of
    ‖W - Q(W) - s B A‖ / ‖W‖ (what its LoftQ start leaves)."""
    import surgery
    from surgery.fourbit import weight_of

    rel, left = [], []
    for path, ad in surgery.engine.adapters(quantised, name).items():
        w = base.get_submodule(path).weight.float()
        r = w - weight_of(quantised.get_submodule(path)).float()
        rel.append(float(r.norm() / w.norm()))
        left.append(float((r - ad.scale * ad.lora_B @ ad.lora_A).norm() / w.norm()))
    return {"residual_rel_norm": statistics.fmean(rel), "loftq_residual_rel_norm": statistics.fmean(left)}


# ----------------------------------------------------------------------------- SFT


def sft(
    model: nn.Module, train: Sequence[Any], pad_id: int, lr: float, seed: int, epochs: int = SFT_EPOCHS
) -> dict[str, Any]:
    """Next-token cross-entropy on the completions, AdamW over what requires grad, linear decay."""
    from surgery.rl import data as D

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = epochs * math.ceil(len(train) / SFT_BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    model.train()
    losses, times = [], []
    for ep in range(epochs):
        for b in D.batches(train, SFT_BATCH, pad_id, seed=seed * 1000 + ep):
            t = time.perf_counter()
            out = model(
                input_ids=b["chosen_input_ids"], attention_mask=b["chosen_attention_mask"], labels=b["chosen_labels"]
            )
            out.loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            losses.append(float(out.loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"SFT loss is {losses[-1]} at step {len(losses)}")
    model.eval()
    return {
        "steps": len(losses),
        "first_loss": statistics.fmean(losses[:10]),
        "last_loss": statistics.fmean(losses[-10:]),
        "ms_per_step": 1e3 * statistics.median(times),
        "trainable": sum(p.numel() for p in params),
    }


# ----------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from models import smollm2

        from surgery.rl import data as D

        self.args = args
        self.base, self.tok = smollm2()
        self.base.requires_grad_(False)
        self.pad = D.pad_id_of(self.tok)
        train, test = load_rows(args.limit_train, args.limit_test)
        self.train = D.encode(self.tok, train, max_length=MAX_LENGTH)
        self.test = D.encode(self.tok, test, max_length=MAX_LENGTH)
        self.test_refs = [r["chosen"] for r in test]
        self.ck: Path | None = args.checkpoint
        self._nf4: tuple[nn.Module, list[str]] | None = None

    def cached(self, key: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        done = json.loads(self.ck.read_text()) if self.ck and self.ck.exists() else {}
        if key in done:
            log(f"[{key}] from the checkpoint")
            return done[key]
        t = time.perf_counter()
        v = C._jsonable(make())
        v["elapsed_s"] = time.perf_counter() - t
        if self.ck is not None:
            done = json.loads(self.ck.read_text()) if self.ck.exists() else {}
            done[key] = v
            self.ck.write_text(json.dumps(done, indent=1) + "\n")
        log(f"[{key}] {json.dumps({k: v[k] for k in v if k != 'examples'})[:300]}")
        return v

    def zeroshot(self, part: str = "zeroshot") -> dict[str, Any]:
        """The base untuned; `zeroshot_nf4` with its linears quantised as QLoRA's are (what the 4-bit base
        alone costs, before any delta); `zeroshot_loftq` that with qlora_loftq's LoRA as injected, untrained
        (what LoftQ's correction gives back)."""

        def make() -> dict[str, Any]:
            model, out = self.base, {}
            if part == "zeroshot_nf4":
                model, layers = self.nf4_base()
                out = quantisation_residual(self.base, model, layers)
            elif part == "zeroshot_loftq":
                model = self.sft_model("qlora_loftq", 0)
                out = loftq_residual(self.base, model, "sft")
            return {
                "preference_accuracy": preference_accuracy(model, self.test, self.pad),
                **rouge(model, self.tok, self.test, self.test_refs, self.pad),
                **out,
            }

        return self.cached(part, make)

    def nf4_base(self) -> tuple[nn.Module, list[str]]:
        """The base with its linears quantised as QLoRA's are, and the paths of those, made once: every
        QLoRA part copies it. LoftQ's rank-r factors are kept on it for qlora_loftq's init and the residual
        figures; they change no NF4 code (tested), so plain qlora trains on the same base as without."""
        if self._nf4 is None:
            import surgery

            model = copy.deepcopy(self.base)
            rep = surgery.quantize(model, "nf4", double_quant=True, loftq_rank=SFT["qlora"][0]["r"])
            self._nf4 = (model, list(rep.layers))
        return self._nf4

    def sft_model(self, method: str, seed: int) -> nn.Module:
        """A copy of the base with the SFT delta `method` injected as "sft" (NF4 base for qlora)."""
        import surgery

        random.seed(seed)
        torch.manual_seed(seed)
        model = copy.deepcopy(self.nf4_base()[0] if method.startswith("qlora") else self.base)
        cfg = dict(SFT[method][0])
        surgery.inject(model, cfg.pop("method"), name="sft", **cfg)
        return model

    def sft_run(self, method: str, seed: int) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            model = self.sft_model(method, seed)
            out = sft(model, self.train, self.pad, SFT[method][1], seed)
            out.update(rouge(model, self.tok, self.test, self.test_refs, self.pad))
            out["preference_accuracy"] = preference_accuracy(model, self.test, self.pad)
            if method == "lora":  # DPO, PPO and GRPO start from it
                self.keep("sft", seed, model)
            return out

        return self.cached(f"sft:{method}:{seed}", make)

    def _delta_path(self, what: str, seed: int) -> Path:
        root = (self.ck.parent if self.ck else Path(tempfile.gettempdir())) / "quality_rl_deltas"
        return root / f"{what}-{seed}-{len(self.train)}"

    def keep(self, what: str, seed: int, model: nn.Module) -> None:
        """The delta `what` of `model` (and its head, if any) in safetensors, for the later parts."""
        import safetensors.torch as st

        import surgery

        path = self._delta_path(what, seed)
        path.mkdir(parents=True, exist_ok=True)
        for name in [n for n in surgery.names(model) if n == what or n.startswith(f"{what}-")]:
            d = surgery.delta(model, name)
            st.save_file({k: v.contiguous() for k, v in d.tensors.items()}, str(path / f"{name}.safetensors"))
            (path / f"{name}.json").write_text(json.dumps({"method": d.method, "config": d.config, "base": d.base}))

    def restore(self, what: str, seed: int, model: nn.Module) -> None:
        import safetensors.torch as st

        import surgery

        path = self._delta_path(what, seed)
        if not path.exists():
            raise SystemExit(f"{path} is missing: run the part that makes {what!r} (seed {seed}) first")
        for meta in sorted(path.glob("*.json")):
            m = json.loads(meta.read_text())
            tensors = st.load_file(str(meta.with_suffix(".safetensors")))
            surgery.apply(model, surgery.Delta(m["method"], meta.stem, m["config"], tensors, m["base"]))

    def policy(self, seed: int) -> nn.Module:
        """A copy of the base with the SFT LoRA delta as "sft", trainable and active."""
        import surgery

        model = copy.deepcopy(self.base)
        self.restore("sft", seed, model)
        surgery.activate(model, "sft")
        model.requires_grad_(False)
        for ad in surgery.engine.adapters(model, "sft").values():
            ad.requires_grad_(True)
        return model

    @staticmethod
    def sft_copy(model: nn.Module, name: str) -> str:
        """A copy of the SFT delta as `name`, the active delta, to train while "sft" stays as it is (the
        reference of `ref_delta="sft"`); returns `name`."""
        import surgery

        surgery.apply(model, surgery.delta(model, "sft"), name=name)
        surgery.activate(model, name)
        return name

    def rm_run(self, seed: int) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            import surgery

            torch.manual_seed(seed)
            model = copy.deepcopy(self.base)
            rm = surgery.RewardModel(model, delta="rm", r=RM["r"])
            kw = {k: RM[k] for k in ("lr", "epochs", "batch_size")}
            losses = surgery.rl.train_reward(rm, self.train, pad_id=self.pad, seed=seed, **kw)
            self.keep("rm", seed, model)
            return {"epoch_loss": losses, "accuracy": 100 * surgery.rl.reward_accuracy(rm, self.test, pad_id=self.pad)}

        return self.cached(f"rm:{seed}", make)

    def dpo_run(self, seed: int, variant: str = "dpo") -> dict[str, Any]:
        """One of DPO_VARIANTS from the SFT LoRA delta: the preference accuracy of the implicit reward
        margin against the variant's own reference and against the base, the policy's own preference
        (chosen log-prob > rejected, as the zero-shot and SFT rows), and ROUGE-L."""

        def make() -> dict[str, Any]:
            import surgery

            cfg, ref = DPO_VARIANTS[variant]
            torch.manual_seed(seed)
            model = self.policy(seed)
            delta = "sft" if ref is None else self.sft_copy(model, "dpo")  # train_dpo optimises "dpo" alone

            def acc(**kw: Any) -> float:
                return 100 * surgery.rl.preference_accuracy(model, self.test, delta=delta, pad_id=self.pad, **kw)

            before = acc(ref_delta=ref)
            hist = surgery.rl.train_dpo(
                model,
                self.train,
                delta=delta,
                ref_delta=ref,
                pad_id=self.pad,
                seed=seed,
                on_step=lambda i, r: i % 10 or log(f"{variant}:{seed} step {i}: loss {r['loss']:.3f}"),
                **cfg,
            )
            out = {
                "reference": ref or "base",
                "test_preference_accuracy_before": before,
                "test_preference_accuracy": acc(ref_delta=ref),
                "test_preference_accuracy_vs_base": acc(),
                "policy_preference_accuracy": acc(against_reference=False),
                "first_loss": statistics.fmean(h["loss"] for h in hist[:10]),
                "last_loss": statistics.fmean(h["loss"] for h in hist[-10:]),
            }
            out.update(rouge(model, self.tok, self.test, self.test_refs, self.pad))
            return out

        return self.cached(f"{variant}:{seed}", make)

    @torch.no_grad()
    def greedy_reward(self, model: nn.Module, rm: nn.Module) -> dict[str, float]:
        """Mean reward-model score and KL-to-reference proxy of greedy test answers."""
        from surgery.rl import data as D

        preds = greedy(model, self.tok, self.test, self.pad)
        rows = D.encode(
            self.tok,
            [{"prompt": self.tok.decode(e.prompt), "chosen": p} for e, p in zip(self.test, preds, strict=True)],
        )
        scores = []
        for i in range(0, len(rows), EVAL_BATCH):
            b = D.collate(rows[i : i + EVAL_BATCH], self.pad)
            scores += rm(b["chosen_input_ids"], b["chosen_attention_mask"]).tolist()
        rl = [rouge_l(p, r) for p, r in zip(preds, self.test_refs, strict=True)]
        return {"reward": statistics.fmean(scores), "rouge_l": 100 * statistics.fmean(rl), "examples": preds[:5]}

    def rl_roles(self, seed: int) -> tuple[nn.Module, nn.Module]:
        """The SFT policy and the trained reward model, both on one copy of the base."""
        import surgery

        model = self.policy(seed)
        self.restore("rm", seed, model)
        return model, surgery.RewardModel(model, delta="rm")  # the trained one: its two deltas are there

    def rl_before(self, seed: int) -> dict[str, Any]:
        """The SFT policy's greedy test answers scored by the reward model: PPO's and GRPO's start."""
        return self.cached(f"rl_before:{seed}", lambda: self.greedy_reward(*self.rl_roles(seed)))

    def rl_run(self, variant: str, seed: int) -> dict[str, Any]:
        """One of RL_VARIANTS from the SFT LoRA delta with the trained reward model: the reward of greedy
        test answers before and after, and the per-update history (KL to the variant's reference)."""

        def make() -> dict[str, Any]:
            import surgery

            algo, ref = RL_VARIANTS[variant]
            torch.manual_seed(seed)
            before = self.rl_before(seed)
            model, rm = self.rl_roles(seed)
            delta = "sft" if ref is None else self.sft_copy(model, "policy")
            rows = [{"prompt": self.tok.decode(e.prompt)} for e in self.train]
            kw = {"delta": delta, "ref_delta": ref, "tokenizer": self.tok}
            if algo == "ppo":
                trainer: Any = surgery.rl.PPO(model, reward=rm, **kw, **PPO_CFG)
            else:
                trainer = surgery.rl.GRPO(model, reward_funcs=[rm], **kw, **GRPO_CFG)
            hist = trainer.train(
                rows,
                steps=RL_STEPS,
                batch_size=RL_BATCH,
                seed=seed,
                on_step=lambda i, r: log(f"[{variant}:{seed}] step {i}: reward {r['reward']:.3f} kl {r['kl']:.3f}"),
            )
            after = self.greedy_reward(model, rm)
            return {"reference": ref or "base", "before": before, "after": after, "history": hist}

        return self.cached(f"{variant}:{seed}", make)


def run(args: argparse.Namespace) -> None:
    b = Bench(args)
    parts = args.part or PARTS
    for part in parts:
        if part.startswith("zeroshot"):
            b.zeroshot(part)
            continue
        for seed in args.seeds if part.startswith(("sft:", "dpo")) or part == "rm" else args.seeds[:1]:
            if part.startswith("sft:"):
                b.sft_run(part.split(":", 1)[1], seed)
            elif part == "rm":
                b.rm_run(seed)
            elif part in DPO_VARIANTS:
                b.dpo_run(seed, part)
            elif part == "rl_before":
                b.rl_before(seed)
            elif part in RL_VARIANTS:
                b.rl_run(part, seed)
            else:
                raise SystemExit(f"unknown part {part!r}")


def markdown(done: dict[str, Any]) -> str:
    # each seeded run knows its seed, for the figures taken against the same seed's SFT run
    done = {k: {**v, "seed": int(m[1])} if (m := re.search(r":(\d+)$", k)) else v for k, v in done.items()}
    lines = ["# Quality of SFT / RLHF deltas on SmolLM2-135M-Instruct (issue 15)", ""]
    rows = []
    for key, row in (
        ("zeroshot", "zero-shot"),
        ("zeroshot_nf4", "zero-shot, the NF4 base (QLoRA's)"),
        ("zeroshot_loftq", "zero-shot, the NF4 base + LoftQ's LoRA, untrained"),
    ):
        if z := done.get(key):
            rows.append(
                {"row": row, "ROUGE-L": f"{z['rouge_l']:.1f}", "pref. acc.": f"{z['preference_accuracy']:.1f} %"}
            )
    for m in SFT:
        runs = [v for k, v in done.items() if k.startswith(f"sft:{m}:")]
        if not runs:
            continue
        rl = [r["rouge_l"] for r in runs]
        pa = [r["preference_accuracy"] for r in runs]
        sd = f" ± {statistics.stdev(rl):.1f}" if len(rl) > 1 else ""
        rows.append(
            {
                "row": f"SFT {m} ({len(runs)} seed{'s' if len(runs) > 1 else ''})",
                "ROUGE-L": f"{statistics.fmean(rl):.1f}{sd}",
                "pref. acc.": f"{statistics.fmean(pa):.1f} %",
            }
        )
    lines += [C.markdown_table(rows, ["row", "ROUGE-L", "pref. acc."]), ""]
    r = SFT["qlora"][0]["r"]
    if (z := done.get("zeroshot_nf4", {})).get("layers"):
        lines += [
            f"NF4 residual over the {z['layers']} quantised linears: ‖W - NF4(W)‖ / ‖W‖ "
            f"{z['residual_rel_norm']:.3f} on average; its best rank-{r} approximation holds "
            f"{100 * z[f'residual_rank{r}_energy']:.1f} % of its energy on average "
            f"({100 * z[f'residual_rank{r}_energy_max']:.1f} % at most).",
            "",
        ]
    # QLoRA against fp32-base LoRA with the same recipe and seed (the "within 1 point")
    for q, f in (("qlora", "lora"), ("qlora_loftq", "lora"), ("qlora_lr1e-3", "lora_lr1e-3")):
        pairs = [
            (seed, v["rouge_l"] - done[fk]["rouge_l"])
            for k, v in done.items()
            if k.startswith(f"sft:{q}:") and (fk := f"sft:{f}:{(seed := v['seed'])}") in done
        ]
        if pairs:
            each = ", ".join(f"seed {s_} {g:+.2f}" for s_, g in sorted(pairs))
            lines += [f"ROUGE-L, SFT {q} - SFT {f} on the same seed: {each}.", ""]
    if (z := done.get("zeroshot_loftq", {})).get("loftq_residual_rel_norm") is not None:
        lines += [
            f"With LoftQ's rank-{r} correction as the LoRA's start: ‖W - NF4(W) - s B A‖ / ‖W‖ "
            f"{z['loftq_residual_rel_norm']:.3f} on average (from {z['residual_rel_norm']:.3f}).",
            "",
        ]

    def mean(key: str, get: Callable[[dict], float], digits: int = 1) -> str:
        vals = [x for k, v in done.items() if k.split(":")[0] == key and not math.isnan(x := get(v))]
        sd = f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else ""
        return (
            f"{statistics.fmean(vals):.{digits}f}{sd} ({len(vals)} seed{'s' if len(vals) > 1 else ''})" if vals else "-"
        )

    lines += [
        "| role | figure |",
        "|---|---|",
        f"| reward model, test pair accuracy % | {mean('rm', lambda v: v['accuracy'])} |",
    ]
    for v, (algo, ref) in RL_VARIANTS.items():
        name = f"{algo.upper()}, a copy of the SFT delta, KL to it" if ref else f"{algo.upper()}, KL to the base"
        lines += [
            f"| {name}: mean reward of greedy test answers, before -> after | "
            f"{mean(v, lambda r: r['before']['reward'], 2)} -> {mean(v, lambda r: r['after']['reward'], 2)} |",
            # one update's KL is a sampled estimate of 8 completions (it can be < 0): the last 8 averaged
            f"| {name}: KL to the reference, the first update / the mean of the last 8 | "
            f"{mean(v, lambda r: r['history'][0]['kl'], 2)} / "
            f"{mean(v, lambda r: statistics.fmean(h['kl'] for h in r['history'][-8:]), 2)} |",
        ]
    lines += ["", dpo_table(done, mean)]
    return "\n".join(lines + [""])


def dpo_table(done: dict[str, Any], mean: Callable[[str, Callable[[dict], float]], str]) -> str:
    """One row per DPO variant: test preference accuracy (implicit reward margin > 0) against its own
    reference and against the base, the policy's own preference (as the zero-shot / SFT rows), ROUGE-L."""
    what = {
        "dpo": "DPO (beta 0.1)",
        "dpo_rpo": f"DPO + chosen NLL (rpo_alpha {DPO_RPO['rpo_alpha']})",
        "dpo_sft": "DPO (beta 0.1), a copy of the SFT delta",
        **{
            k: f"DPO + chosen NLL (rpo_alpha {c['rpo_alpha']}), a copy of the SFT delta"
            for k, (c, _) in DPO_SWEEP.items()
        },
    }

    def vs_base(r: dict) -> float:  # runs before this figure was recorded had the base as reference
        same = r["test_preference_accuracy"] if r.get("reference", "base") == "base" else float("nan")
        return r.get("test_preference_accuracy_vs_base", same)

    def vs_sft(r: dict) -> float:
        sft = done.get(f"sft:lora:{r['seed']}")
        return r["rouge_l"] - sft["rouge_l"] if sft else float("nan")

    rows = []
    for v, (_, ref) in DPO_VARIANTS.items():
        rows.append(
            {
                "DPO from the SFT LoRA": what[v],
                "reference": f"the SFT delta (`ref_delta={ref!r}`)" if ref else "the base",
                "pref. acc. % vs its reference": mean(v, lambda r: r["test_preference_accuracy"]),
                "vs the base": mean(v, vs_base),
                "policy's own pref. %": mean(v, lambda r: r.get("policy_preference_accuracy", float("nan"))),
                "ROUGE-L": mean(v, lambda r: r["rouge_l"]),
                "ROUGE-L - the same seed's SFT": mean(v, vs_sft),
            }
        )
    return C.markdown_table(rows, list(rows[0]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument(
        "--part",
        action="append",
        help=f"one of {', '.join(PARTS)} (repeatable; default all)",
    )
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=list(SEEDS))
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render", action="store_true", help="the checkpoint -> docs/results/quality_rl.{json,md}")
    ap.add_argument("--smoke", action="store_true", help="a few rows of each split, one seed, one step")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:  # every part, on a few rows, with one update each
        global MAX_NEW_TOKENS, RL_STEPS, RL_BATCH
        MAX_NEW_TOKENS, RL_STEPS, RL_BATCH = 8, 1, 2
        PPO_CFG.update(max_new_tokens=8, ppo_epochs=1)
        GRPO_CFG.update(max_new_tokens=8, group=2)
        args.limit_train, args.limit_test, args.seeds = 4, 2, [0]
        args.checkpoint = args.checkpoint or Path(tempfile.mkdtemp(prefix="quality_rl_")) / "smoke.json"
        skipped = {*DPO_SWEEP, *(f"sft:{m}" for m in SFT_SWEEP)}  # the sweeps run the same code
        args.part = args.part or [p for p in PARTS if p not in skipped]
    if args.render:
        done = json.loads(args.checkpoint.read_text())
        res = {"benchmark": "quality_rl", "env": C.environment(), "runs": done}
        out = C.RESULTS_DIR / "quality_rl.json"
        C.write_results(res, out, out.with_suffix(".md"), markdown(done))
        return 0
    run(args)
    if args.smoke and args.checkpoint:
        print(markdown(json.loads(args.checkpoint.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
