"""DPO step time and memory (issue 15):

1. our DPO training step (reference log-probs under `reference()` and no_grad, the policy's under its
   LoRA, `dpo_loss`, backward, AdamW) vs TRL 1.16 `DPOTrainer`'s with a PEFT LoRA model (its reference:
   the adapter disabled), same Llama, same LoRA (r 8 on every q/k/v/o/gate/up/down projection), same
   token ids, timed in the same interleaved rounds: target <= 1.0x;
2. the peak memory of our DPO step vs our SFT step over the same rows (chosen and rejected, NLL through
   the same log-prob path): target <= 1.15x (the reference is the same weights, no copy). An SFT step
   through the model's own loss (`labels=`, full logits) and one over the chosen rows alone are shown too.

Memory on CPU, two readings per step: the peak RSS over the step above the RSS just before it (glibc's
free memory handed back first: `malloc_trim`; RSS counts every allocation, transient ones included),
and the bytes autograd saves for backward (a `saved_tensors_hooks` count, storages counted once). On
CUDA: `max_memory_allocated` above the memory allocated before the step.

    python benchmarks/bench_dpo.py            # writes docs/results/bench_dpo.{json,md}
    python benchmarks/bench_dpo.py --smoke    # a tiny model, not judged

Model: a Llama (hidden 256, 4 layers, 4 heads, FFN 688, vocab 32000), random weights from the config,
4 pairs a batch (prompts 48-80 tokens, completions 16-40), fp32, one torch thread.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C  # noqa: E402

MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=32000)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000)
SHAPE = dict(pairs=4, prompt=(48, 80), completion=(16, 40))
SMOKE_SHAPE = dict(pairs=2, prompt=(6, 10), completion=(3, 6))
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET = {"dpo_vs_trl": 1.0, "memory_vs_sft": 1.15}
R, ALPHA, BETA, LR = 8, 16, 0.1, 1e-4
log = C.log


def llama(cfg: dict) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with C.quiet():
        torch.manual_seed(0)
        conf = LlamaConfig(**cfg, num_key_value_heads=cfg["num_attention_heads"], max_position_embeddings=512)
        conf.pad_token_id, conf.bos_token_id, conf.eos_token_id = 0, 1, 2
        return LlamaForCausalLM(conf).float().eval()


def make_pairs(vocab: int, shape: dict, seed: int = 0) -> list[Any]:
    from surgery.rl.data import Encoded

    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)] + [2]  # noqa: E731
    return [
        Encoded(
            ids(rng.randint(*shape["prompt"]))[:-1],
            ids(rng.randint(*shape["completion"])),
            ids(rng.randint(*shape["completion"])),
        )
        for _ in range(shape["pairs"])
    ]


def trl_trainer(base: nn.Module, vocab: int, tmp: str) -> Any:
    """TRL's DPOTrainer with a PEFT LoRA on a copy of `base` (a word-level tokenizer over the vocabulary,
    only to construct it: the timed batches come from its own collator over our token ids)."""
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2")
    data = Dataset.from_list([{"prompt": "t5 t6 ", "chosen": "t7 ", "rejected": "t8 "}] * 4)
    args = DPOConfig(
        output_dir=tmp, beta=BETA, learning_rate=LR, report_to="none", use_cpu=True, save_strategy="no",
        per_device_train_batch_size=4, max_length=None, logging_steps=1_000_000, disable_tqdm=True,
    )  # fmt: skip
    peft = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PROJ, task_type="CAUSAL_LM")
    with C.quiet():
        return DPOTrainer(
            model=copy.deepcopy(base), args=args, train_dataset=data, processing_class=hf_tok, peft_config=peft
        )


def trl_batch(pairs: list[Any]) -> dict[str, torch.Tensor]:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=0)
    return collate([{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs])


def ours(base: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    import surgery

    m = copy.deepcopy(base)
    surgery.inject(m, "lora", targets=[f"*.{p}" for p in PROJ], r=R, alpha=ALPHA, name="policy")
    return m, [p for p in m.parameters() if p.requires_grad]


def with_random_lora(params: list[nn.Parameter]) -> None:
    """Move the LoRA off zero so policy and reference differ (both sides alike)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def steps(cfg: dict, shape: dict) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The training steps timed and measured, each a closure over its model and optimizer."""
    from surgery.rl.data import IGNORE, collate
    from surgery.rl.dpo import pair_loss
    from surgery.rl.logprobs import token_logprobs

    base = llama(cfg)
    pairs = make_pairs(cfg["vocab_size"], shape)
    batch = collate(pairs, 0)
    t = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    rows = {  # chosen and rejected rows padded to one length, as the DPO forward sees them
        k: torch.cat([torch.nn.functional.pad(batch[f"{s}_{k}"], (0, t - batch[f"{s}_{k}"].shape[1]), value=v) for s in ("chosen", "rejected")])
        for k, v in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE))
    }  # fmt: skip
    chosen = {k[len("chosen_") :]: v for k, v in batch.items() if k.startswith("chosen_")}
    fns: dict[str, Callable[[], Any]] = {}
    keep: dict[str, Any] = {"pairs": pairs, "tokens": int(rows["attention_mask"].sum())}

    def trainer_step(loss_of: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            loss_of().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    tmp = tempfile.mkdtemp(prefix="bench_dpo_")
    trainer = trl_trainer(base, cfg["vocab_size"], tmp)
    tm = trainer.model
    tps = [p for p in tm.parameters() if p.requires_grad]
    with_random_lora(tps)
    tm.train()
    tbatch = trl_batch(pairs)
    fns["trl_dpo"] = trainer_step(lambda: trainer.compute_loss(tm, tbatch), torch.optim.AdamW(tps, lr=LR))

    def ours_like_trl() -> tuple[nn.Module, list[nn.Parameter]]:
        m, ps = ours(base)
        peft = dict(tm.named_parameters())
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.requires_grad:  # X.surgery.policy.lora_A <- base_model.model.X.lora_A.default.weight
                    site, ab = n.split(".surgery.policy.")
                    p.copy_(peft[f"base_model.model.{site}.{ab}.default.weight"])
        return m, ps

    m, ps = ours_like_trl()
    fns["ours_dpo"] = trainer_step(
        lambda m=m: pair_loss(m, batch, beta=BETA, delta="policy")[0], torch.optim.AdamW(ps, lr=LR)
    )

    def nll(m: nn.Module, r: dict[str, torch.Tensor]) -> torch.Tensor:
        return (
            -token_logprobs(m, r["input_ids"], r["attention_mask"], r["labels"]).sum() / (r["labels"] != IGNORE).sum()
        )

    for name, r in (("ours_sft_same_rows", rows), ("ours_sft_chosen", chosen)):
        m2, ps2 = ours_like_trl()
        fns[name] = trainer_step(lambda m=m2, r=r: nll(m, r), torch.optim.AdamW(ps2, lr=LR))
    m3, ps3 = ours_like_trl()
    fns["hf_sft_same_rows"] = trainer_step(lambda m=m3: m(**rows).loss, torch.optim.AdamW(ps3, lr=LR))
    keep["trl_trainable"], keep["ours_trainable"] = sum(p.numel() for p in tps), sum(p.numel() for p in ps)
    # the same DPO loss on the same rows and LoRA weights: ours and TRL's agree (checked before any step)
    keep["loss_check"] = {
        "ours": float(pair_loss(m, batch, beta=BETA, delta="policy")[0].detach()),
        "trl": float(trainer.compute_loss(tm, tbatch).detach()),
    }
    return fns, keep


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes autograd saves for backward during `fn` (each storage once)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[(s.data_ptr(), t.device.index or 0)] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_bytes(fn: Callable[[], Any], device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    C.malloc_trim()
    before = C.proc_status_kb("VmRSS").get("VmRSS", 0)
    C.reset_peak_rss()
    fn()
    return 1024 * (C.proc_status_kb("VmHWM").get("VmHWM", 0) - before)


def run(smoke: bool, rounds: int) -> dict[str, Any]:
    cfg, shape = (SMOKE, SMOKE_SHAPE) if smoke else (MODEL, SHAPE)
    fns, keep = steps(cfg, shape)
    log(f"[time] {len(fns)} steps x {rounds} rounds")
    st = C.interleaved(fns, rounds=rounds, warmup=2, clock=__import__("time").process_time)
    res: dict[str, Any] = {"time": {}, "memory": {}, "loss_check": keep["loss_check"]}
    for k, v in st.items():
        res["time"][k] = {"median_ms": 1e3 * v["median_s"], "min_ms": 1e3 * v["min_s"]}
    res["time"]["ours_dpo"]["vs_trl"] = C.ratio(st, "ours_dpo", "trl_dpo")
    log("[memory]")
    for k, fn in fns.items():
        peaks = [peak_bytes(fn, "cpu") for _ in range(3)]
        res["memory"][k] = {"peak_rss_delta_bytes": statistics.median(peaks), "peak_rss_samples": peaks}
    for k in fns:
        res["memory"][k]["autograd_saved_bytes"] = saved_bytes(fns[k])
    mem = res["memory"]
    res["targets"] = {
        "dpo_step_vs_trl": {"ratio": res["time"]["ours_dpo"]["vs_trl"]["ratio"], "target": TARGET["dpo_vs_trl"]},
        "dpo_peak_vs_sft_same_rows": {
            "ratio": mem["ours_dpo"]["peak_rss_delta_bytes"] / mem["ours_sft_same_rows"]["peak_rss_delta_bytes"],
            "target": TARGET["memory_vs_sft"],
        },
    }
    for v in res["targets"].values():
        v["met"] = v["ratio"] <= v["target"]
    res["setup"] = {
        "model": cfg, "shape": shape, "rounds": rounds, "threads": torch.get_num_threads(), "tokens_per_step": keep["tokens"],
        "lora": {"r": R, "alpha": ALPHA, "targets": PROJ}, "trainable": {"ours": keep["ours_trainable"], "trl": keep["trl_trainable"]},
    }  # fmt: skip
    return res


def markdown(res: dict[str, Any], env: dict[str, Any]) -> str:
    s, t, m = res["setup"], res["time"], res["memory"]
    lines = [
        "# DPO: step time against TRL, memory against SFT",
        "",
        "Written by `benchmarks/bench_dpo.py` (issue 15). A Llama (hidden "
        f"{s['model']['hidden_size']}, {s['model']['num_hidden_layers']} layers, vocab {s['model']['vocab_size']}), "
        f"{s['shape']['pairs']} pairs a batch ({s['tokens_per_step']} tokens over chosen + rejected), LoRA r {s['lora']['r']} "
        f"on every projection ({s['trainable']['ours']} trainable tensors' elements here, {s['trainable']['trl']} in TRL's "
        f"PEFT model), fp32, {s['threads']} torch thread(s), {s['rounds']} interleaved rounds of CPU time per step "
        f"(medians; the ratio is the median of per-round ratios). Machine: {env.get('cpu')}, {env['cpu_count']} cores, "
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, trl {env.get('trl')}.",
        "",
        "## Targets",
        "",
        C.markdown_table(
            [
                {"what": k, "ratio": f"{v['ratio']:.2f}x", "target": f"<= {v['target']}x", "met": v["met"]}
                for k, v in res["targets"].items()
            ],
            ["what", "ratio", "target", "met"],
        ),
        "",
        f"Same loss on the same rows and weights: ours {res['loss_check']['ours']:.6f}, TRL {res['loss_check']['trl']:.6f}.",
        "",
        "## Steps",
        "",
        C.markdown_table(
            [
                {
                    "step": k,
                    "median": C.fmt_seconds(t[k]["median_ms"] / 1e3),
                    "peak RSS over the step": C.fmt_bytes(m[k]["peak_rss_delta_bytes"]),
                    "saved for backward": C.fmt_bytes(m[k]["autograd_saved_bytes"]),
                }
                for k in t
            ],
            ["step", "median", "peak RSS over the step", "saved for backward"],
        ),
        "",
        "`ours_dpo`: `surgery.rl.dpo.pair_loss` (reference under `reference()` + no_grad, policy under its LoRA, one "
        "forward each over chosen + rejected rows) + backward + AdamW. `trl_dpo`: `DPOTrainer.compute_loss` on a PEFT "
        "model (reference: adapter disabled) + backward + AdamW. `ours_sft_same_rows`: NLL of the same chosen + rejected "
        "rows through `token_logprobs` (the memory target's denominator); `ours_sft_chosen`: the chosen rows alone; "
        "`hf_sft_same_rows`: the model's own loss (`labels=`, full logits) on the same rows.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model; writes to --out only")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = C.environment()
    try:
        env["trl"] = __import__("trl").__version__
    except ImportError as e:
        env["trl"] = f"unavailable: {e}"
    res = run(args.smoke, 2 if args.smoke else args.rounds)
    res["environment"] = env
    md = markdown(res, env)
    print(md)
    if args.smoke and args.out is None:
        return 0
    out = args.out or C.RESULTS_DIR / "bench_dpo.json"
    C.write_results(res, out, out.with_suffix(".md"), md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
