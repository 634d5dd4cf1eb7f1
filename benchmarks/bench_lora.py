"""LoRA with model-surgery against PEFT, in one run, on CPU (and CUDA when there is one).

    python benchmarks/bench_lora.py            # full run: several minutes on 2 CPU cores
    python benchmarks/bench_lora.py --quick    # CI smoke run, < 60 s

Writes docs/results/bench_lora.json (or --out) and a markdown table
docs/results/bench_lora.md (or --md). See benchmarks/README.md.

Model: LlamaForCausalLM(hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 1000), fp32,
LoRA r=16, alpha=32 on q/k/v/o/gate/up/down, batch 64 x 32 tokens. Measurements:

1. forward (inference) of the base, and with one unmerged delta (ours, PEFT), as ratios to the base;
2. a training step (forward + backward + AdamW on the LoRA tensors; causal-LM loss, labels=input_ids);
3. hot-swapping a delta of the same shape (surgery.apply) vs PEFT load_adapter / hotswap_adapter;
4. injection into a Llama-2-7B-shaped model on the meta device, by names and by role ("@linear");
5. merge + unmerge: time, peak extra memory (CPU: peak RSS of a subprocess; CUDA: allocator peak),
   and bit-exactness after many merge/unmerge cycles in bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import dataclasses
import gc
import io
import itertools
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, vocab_size=1000)
LLAMA7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
# for the memory check only: layers big enough that merge's row chunking (4M elements) matters
LARGE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=16, vocab_size=1000)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, NAME = 16, 32, "default"
BATCH, SEQ = 64, 32
QUICK_BATCH = 8  # --quick: a smoke run, its figures are not the benchmark's
B_STD = 0.01  # lora_B ~ N(0, B_STD): a trained-looking delta (|dW| ~ 0.1 |W|; see results["delta"])

TARGET = {
    "forward_ratio": 1.10,  # ours unmerged forward / base forward
    "train_ratio": 0.90,  # ours / PEFT training step
    "apply_s": 5e-3,  # surgery.apply hot-swap
    "inject_names_s": 0.2,  # 7B meta, targets = 7 names
    "inject_role_s": 5.0,  # 7B meta, targets = "@linear"
}


log = C.log


# ----------------------------------------------------------------------------- models


_quiet = C.quiet


def llama(cfg: dict, device: Any = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.to(device=device, dtype=dtype).eval()


def peft_config(targets: Any = None):  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets or list(TARGETS))


def random_delta(model: nn.Module, seed: int, both: bool = False):  # type: ignore[no-untyped-def]
    """The model's delta NAME with lora_B (and lora_A if `both`) drawn at random (host memory)."""
    import surgery

    g = torch.Generator().manual_seed(seed)
    d = surgery.delta(model, NAME)
    tensors = {}
    for k, t in d.tensors.items():
        if k.endswith("lora_B.weight"):
            tensors[k] = torch.randn(t.shape, generator=g, dtype=torch.float32) * B_STD
        elif both:
            bound = 1 / t.shape[1] ** 0.5
            tensors[k] = (torch.rand(t.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound
        else:
            tensors[k] = t.detach().to("cpu", torch.float32).clone()
    return dataclasses.replace(d, tensors=tensors)


def load_into_peft(pm: nn.Module, delta: Any) -> None:
    """Put our Delta's tensors into PEFT's adapter NAME (same on-disk key layout)."""
    from peft import set_peft_model_state_dict

    sd = {"base_model.model." + k: v for k, v in delta.tensors.items()}
    res = set_peft_model_state_dict(pm, sd, adapter_name=NAME)
    bad = [k for k in res.unexpected_keys if "lora" in k]
    if bad:
        raise RuntimeError(f"PEFT did not take keys {bad[:3]}")


def make_pair(device: str, dtype: torch.dtype = torch.float32, cfg: dict = SMALL, delta: Any = None):  # type: ignore[no-untyped-def]
    """base, ours (surgery LoRA), peft (PeftModel): same base weights, same delta."""
    from peft import get_peft_model

    import surgery

    base = llama(cfg, device, dtype)
    ours = copy.deepcopy(base)
    surgery.inject(ours, "lora", targets=TARGETS, r=R, alpha=ALPHA, name=NAME)
    if delta is None:
        delta = random_delta(ours, seed=1)
    surgery.apply(ours, delta)
    with _quiet():
        pm = get_peft_model(copy.deepcopy(base), peft_config())
    load_into_peft(pm, delta)
    for m in (base, ours, pm):
        m.eval()
    return base, ours, pm, delta


def site_weights(model: nn.Module, peft: bool) -> dict[str, torch.Tensor]:
    suffix = ".base_layer.weight" if peft else ".weight"
    out = {}
    for k, p in model.named_parameters():
        if k.endswith(suffix) and any(f".{t}{suffix}" in k for t in TARGETS) and "lora_" not in k:
            out[k.removeprefix("base_model.model.").replace(".base_layer", "")] = p
    return out


# ----------------------------------------------------------------------------- 1. forward


def bench_forward(dev: str, base, ours, pm, ids, rounds: int, warmup: int, quick: bool) -> dict:  # type: ignore[no-untyped-def]
    import surgery

    with torch.inference_mode():
        lb = base(input_ids=ids, use_cache=False).logits.float()
        lo = ours(input_ids=ids, use_cache=False).logits.float()
        lp = pm(input_ids=ids, use_cache=False).logits.float()
    check = {
        "max_abs_diff_ours_vs_peft": float((lo - lp).abs().max()),
        "max_abs_diff_ours_vs_base": float((lo - lb).abs().max()),
    }
    fns = {
        "base": lambda: base(input_ids=ids, use_cache=False),
        "ours": lambda: ours(input_ids=ids, use_cache=False),
        "peft": lambda: pm(input_ids=ids, use_cache=False),
    }
    if not quick:

        def disabled():  # type: ignore[no-untyped-def]
            with surgery.disable(ours):
                return ours(input_ids=ids, use_cache=False)

        fns["ours_disabled"] = disabled
    with torch.inference_mode():
        st = C.interleaved(fns, rounds, warmup, device=dev, min_sample_s=0.05 if dev == "cuda" else 0)
    out = {"stats": st, "check": check, "mode": "eval, torch.inference_mode(), use_cache=False"}
    out["ours_over_base"] = C.ratio(st, "ours", "base")
    out["peft_over_base"] = C.ratio(st, "peft", "base")
    out["ours_over_peft"] = C.ratio(st, "ours", "peft")
    if "ours_disabled" in st:
        out["ours_disabled_over_base"] = C.ratio(st, "ours_disabled", "base")
    return out


# ----------------------------------------------------------------------------- 2. training step


def bench_train(dev: str, ours, pm, ids, rounds: int, warmup: int) -> dict:  # type: ignore[no-untyped-def]
    mods = {"ours": ours, "peft": pm}
    opts, counts = {}, {}
    for k, m in mods.items():
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        counts[k] = {"tensors": len(params), "elements": sum(p.numel() for p in params)}
        opts[k] = torch.optim.AdamW(params, lr=1e-4)

    def step(k: str):  # type: ignore[no-untyped-def]
        def run():  # type: ignore[no-untyped-def]
            loss = mods[k](input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)

        return run

    st = C.interleaved(
        {"ours": step("ours"), "peft": step("peft")},
        rounds,
        warmup,
        device=dev,
        min_sample_s=0.05 if dev == "cuda" else 0,
    )
    for m in mods.values():
        m.eval()
    return {
        "stats": st,
        "ours_over_peft": C.ratio(st, "ours", "peft"),
        "trainable": counts,
        "optimizer": "torch.optim.AdamW(lr=1e-4), default implementation",
        "loss": "LlamaForCausalLM causal-LM loss, labels=input_ids",
    }


# ----------------------------------------------------------------------------- 3. hot-swap


def bench_hotswap(dev: str, ours, pm, d_first, rounds: int, warmup: int, quick: bool) -> dict:  # type: ignore[no-untyped-def]
    from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict
    from safetensors.torch import load_file, save_file

    import surgery

    d_b = random_delta(ours, seed=2, both=True)
    host = {"A": d_first, "B": d_b}
    on_dev = {k: dataclasses.replace(v, tensors={n: t.to(dev) for n, t in v.tensors.items()}) for k, v in host.items()}
    out: dict[str, Any] = {
        "delta_bytes": d_first.nbytes,
        "delta_tensors": len(d_first.tensors),
        "delta_dtype": str(next(iter(d_first.tensors.values())).dtype),
    }

    tmp = tempfile.TemporaryDirectory(prefix="bench_lora_")
    root = Path(tmp.name)
    dirs = {}
    for k, d in host.items():  # PEFT's own format, written by PEFT
        load_into_peft(pm, d)
        dirs[k] = root / f"peft_{k}"
        pm.save_pretrained(str(dirs[k]))
        save_file({n: t.contiguous() for n, t in d.tensors.items()}, str(root / f"ours_{k}.safetensors"))
    out["peft_adapter_file_bytes"] = (dirs["A"] / "adapter_model.safetensors").stat().st_size
    load_into_peft(pm, d_first)
    sds = {}
    for k, d in host.items():
        sd = {"base_model.model." + n: t.to(dev) for n, t in d.tensors.items()}
        sds[k] = _insert_adapter_name_into_state_dict(sd, adapter_name=NAME, parameter_prefix="lora_")
    cfg = pm.peft_config[NAME]

    nxt = {n: itertools.cycle("BA") for n in ("ours_host", "ours_dev", "ours_disk", "hot", "hot_sd")}

    def ours_apply(which: str):  # type: ignore[no-untyped-def]
        src = host if which == "ours_host" else on_dev
        return lambda: surgery.apply(ours, src[next(nxt[which])])

    def ours_disk() -> None:
        k = next(nxt["ours_disk"])
        t = load_file(str(root / f"ours_{k}.safetensors"), device=dev)
        surgery.apply(ours, dataclasses.replace(host[k], tensors=t))

    def drop_swap() -> None:
        if "swap" in pm.peft_config:
            pm.delete_adapter("swap")

    fns = {
        "ours_apply": ours_apply("ours_host"),
        "ours_disk": ours_disk,
        "peft_load_adapter": lambda: pm.load_adapter(str(dirs["B"]), adapter_name="swap", torch_device=dev),
        "peft_hotswap_adapter": lambda: hotswap_adapter(
            pm, str(dirs[next(nxt["hot"])]), adapter_name=NAME, torch_device=dev
        ),
        "peft_hotswap_from_state_dict": lambda: hotswap_adapter_from_state_dict(
            pm, sds[next(nxt["hot_sd"])], NAME, cfg
        ),
    }
    if dev == "cuda":
        fns["ours_apply_from_device"] = ours_apply("ours_dev")
    with _quiet():
        st = C.interleaved(fns, rounds, warmup, device=dev, setup={"peft_load_adapter": drop_swap})
    drop_swap()
    # correctness: after an apply, the model holds exactly the applied tensors
    surgery.apply(ours, d_b)
    got = surgery.delta(ours, NAME).tensors
    out["apply_exact"] = all(torch.equal(got[k].cpu(), d_b.tensors[k]) for k in got)
    surgery.apply(ours, d_first)
    load_into_peft(pm, d_first)
    out["stats"] = st
    out["ours_over_peft_load_adapter"] = C.ratio(st, "ours_apply", "peft_load_adapter")
    out["ours_over_peft_hotswap_adapter"] = C.ratio(st, "ours_apply", "peft_hotswap_adapter")
    out["notes"] = (
        "ours_apply: surgery.apply of a host-memory Delta into a model holding one of that shape; "
        "ours_disk: safetensors.load_file + apply; PEFT reads the dirs save_pretrained wrote "
        "(page cache warm after the warmups); peft_load_adapter adds a second adapter "
        "(deleted, untimed, before each call); hotswap_* overwrite adapter 'default'"
    )
    if not quick:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            surgery.apply(ours, host[next(nxt["ours_host"])])
        prof.disable()
        surgery.apply(ours, d_first)
        out["profile_apply_cprofile"] = _pstats_top(prof, 12, per=50)
    tmp.cleanup()
    return out


# ----------------------------------------------------------------------------- 4. injection, 7B on meta


def _meta_llama7b() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA7B))


def bench_inject_7b(rounds: int, quick: bool) -> dict:
    from peft import get_peft_model

    import surgery

    out: dict[str, Any] = {"config": LLAMA7B, "device": "meta", "targets_names": TARGETS}
    samples: dict[str, list[float]] = {
        "ours_names": [],
        "peft_names": [],
        "ours_role_linear": [],
        "peft_all_linear": [],
    }
    errors: dict[str, str] = {}
    sites: dict[str, Any] = {}
    run_peft = not quick
    for _ in range(rounds):
        m = _meta_llama7b()
        t, inj = C.once(lambda m=m: surgery.inject(m, "lora", targets=TARGETS, r=R, alpha=ALPHA, name=NAME))
        samples["ours_names"].append(t)
        names_sites = set(inj.sites)
        sites["ours_names"] = len(inj.sites)
        del m
        if "ours_role_linear" not in errors:
            m = _meta_llama7b()
            try:
                t, inj = C.once(lambda m=m: surgery.inject(m, "lora", targets="@linear", r=R, alpha=ALPHA, name=NAME))
                samples["ours_role_linear"].append(t)
                sites["ours_role_linear"] = len(inj.sites)
                sites["role_linear_minus_names"] = sorted(set(inj.sites) - names_sites)[:10]
                sites["names_minus_role_linear"] = sorted(names_sites - set(inj.sites))[:10]
            except Exception as e:  # noqa: BLE001  (surgery.graph is work in progress)
                errors["ours_role_linear"] = f"{type(e).__name__}: {e}"
                errors["ours_role_linear_traceback"] = traceback.format_exc(limit=6)
            del m
        if run_peft:
            for key, tm in (("peft_names", TARGETS), ("peft_all_linear", "all-linear")):
                m = _meta_llama7b()
                with _quiet():
                    t, pm = C.once(lambda m=m, tm=tm: get_peft_model(m, peft_config(tm)))
                samples[key].append(t)
                from peft.tuners.lora import LoraLayer

                sites[key] = sum(isinstance(x, LoraLayer) for x in pm.modules())
                del pm, m
        gc.collect()
    for k, v in samples.items():
        if v:
            out[k] = C.summarize(v)
            out[k]["first_s"] = v[0]
    if not run_peft:
        out["peft_skipped"] = "PEFT get_peft_model on the 7B meta model is skipped in --quick (takes seconds)"
    out["sites"] = sites
    out["errors"] = errors
    return out


# ----------------------------------------------------------------------------- 5. merge / unmerge


def bench_merge_time(dev: str, ours, pm, rounds: int, warmup: int, halves: bool = True) -> dict:  # type: ignore[no-untyped-def]
    import surgery

    def ours_mu() -> None:
        surgery.merge(ours, NAME)
        surgery.unmerge(ours, NAME)

    def peft_mu() -> None:
        pm.merge_adapter()
        pm.unmerge_adapter()

    w0 = {k: v.detach().clone() for k, v in site_weights(ours, False).items()}
    with _quiet():
        st = C.interleaved({"ours": ours_mu, "peft": peft_mu}, rounds, warmup, device=dev)
    exact = all(torch.equal(w0[k], v) for k, v in site_weights(ours, False).items())
    # each half on its own, for the profile of where time goes
    parts: dict[str, list[float]] = {"ours_merge": [], "ours_unmerge": [], "peft_merge": [], "peft_unmerge": []}
    with _quiet():
        for _ in range(max(3, rounds // 3) if halves else 0):
            parts["ours_merge"].append(C.once(lambda: surgery.merge(ours, NAME), dev)[0])
            parts["ours_unmerge"].append(C.once(lambda: surgery.unmerge(ours, NAME), dev)[0])
            parts["peft_merge"].append(C.once(pm.merge_adapter, dev)[0])
            parts["peft_unmerge"].append(C.once(pm.unmerge_adapter, dev)[0])
    return {
        "stats": st,
        "ours_over_peft": C.ratio(st, "ours", "peft"),
        "halves_median_s": {k: sorted(v)[len(v) // 2] for k, v in parts.items() if v},
        "ours_fp32_exact_after_rounds": exact,
        "sites": len(w0),
    }


def _mem_child(which: str, size: str) -> dict:
    """Runs in a fresh subprocess: peak RSS increase of one merge + unmerge on CPU."""
    import surgery

    torch.set_num_threads(1)
    cfg = SMALL if size == "bench" else LARGE
    with _quiet():
        if which == "ours":
            model = llama(cfg)
            surgery.inject(model, "lora", targets=TARGETS, r=R, alpha=ALPHA, name=NAME)
            surgery.apply(model, random_delta(model, seed=1))

            def merge() -> None:
                surgery.merge(model, NAME)

            def unmerge() -> None:
                surgery.unmerge(model, NAME)
        else:
            from peft import get_peft_model

            inner = llama(cfg)
            model = get_peft_model(inner, peft_config())
            tmp = llama(cfg)
            surgery.inject(tmp, "lora", targets=TARGETS, r=R, alpha=ALPHA, name=NAME)
            load_into_peft(model, random_delta(tmp, seed=1))
            del tmp
            merge, unmerge = model.merge_adapter, model.unmerge_adapter
        weights = site_weights(model, which == "peft")
        largest = max(w.numel() * w.element_size() for w in weights.values())
        merge()  # warm-up cycle: lazy allocations (thread pools, BLAS buffers) happen here
        unmerge()
        gc.collect()
        C.malloc_trim()
        ok = C.reset_peak_rss()
        rss0 = C.proc_status_kb("VmRSS")["VmRSS"]
        t0 = time.perf_counter()
        merge()
        t1 = time.perf_counter()
        hwm_merge = C.proc_status_kb("VmHWM")["VmHWM"]
        gc.collect()
        C.malloc_trim()
        rss_merged = C.proc_status_kb("VmRSS")["VmRSS"]
        C.reset_peak_rss()
        rss1 = C.proc_status_kb("VmRSS")["VmRSS"]
        t2 = time.perf_counter()
        unmerge()
        t3 = time.perf_counter()
        hwm_unmerge = C.proc_status_kb("VmHWM")["VmHWM"]
    kb = 1024
    return {
        "which": which,
        "size": size,
        "config": cfg,
        "peak_reset_ok": ok,
        "largest_site_weight_bytes": largest,
        "merge_peak_extra_bytes": (hwm_merge - rss0) * kb,
        "unmerge_peak_extra_bytes": (hwm_unmerge - rss1) * kb,
        "peak_extra_bytes": max(hwm_merge - rss0, hwm_unmerge - rss1) * kb,
        "held_while_merged_bytes": (rss_merged - rss0) * kb,
        "merge_s": t1 - t0,
        "unmerge_s": t3 - t2,
    }


def start_mem_children(sizes: list[str]) -> dict:
    """Start one fresh subprocess per (contender, size) for the peak-RSS check."""
    env = dict(os.environ)
    # fixed mmap threshold: every tensor >= 64 kB is mmap'ed and given back when freed, so the
    # process's RSS (and its peak) follows live tensor memory, not what glibc's heap kept
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    # one thread each: they run side by side, and the peak memory barely depends on it
    env["OMP_NUM_THREADS"] = "1"
    procs = {}
    for size in sizes:
        for which in ("ours", "peft"):
            procs[(which, size)] = subprocess.Popen(
                [sys.executable, __file__, "--_mem-child", which, "--_mem-size", size],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
    return procs


def collect_mem_children(procs: dict) -> dict:
    """Peak RSS increase of merge + unmerge, each contender in its own fresh process."""
    out: dict[str, Any] = {
        "method": "fresh subprocess per contender (1 thread); MALLOC_MMAP_THRESHOLD_=65536; one warm-up "
        "merge+unmerge, malloc_trim, VmHWM reset via /proc/self/clear_refs, then "
        "peak VmHWM - VmRSS around merge and around unmerge"
    }
    for (which, size), p in procs.items():
        so, se = p.communicate(timeout=900)
        if p.returncode != 0:
            out[f"{size}_{which}"] = {"error": se.strip()[-2000:]}
            continue
        res = json.loads(so.strip().splitlines()[-1])
        res["peak_extra_over_largest_layer"] = res["peak_extra_bytes"] / res["largest_site_weight_bytes"]
        out[f"{size}_{which}"] = res
    return out


def bench_merge_memory_cuda(dev: str, sizes: list[str]) -> dict:
    import surgery

    out: dict[str, Any] = {
        "method": "torch.cuda.max_memory_allocated() - memory_allocated() around one "
        "merge+unmerge, after a warm-up cycle"
    }
    for size in sizes:
        cfg = SMALL if size == "bench" else LARGE
        with _quiet():
            base, ours, pm, _ = make_pair(dev, cfg=cfg)
            del base
            for which, (mg, um) in {
                "ours": (lambda o=ours: surgery.merge(o, NAME), lambda o=ours: surgery.unmerge(o, NAME)),
                "peft": (pm.merge_adapter, pm.unmerge_adapter),
            }.items():
                model = ours if which == "ours" else pm
                largest = max(w.numel() * w.element_size() for w in site_weights(model, which == "peft").values())
                mg()
                um()
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                res = {}
                for phase, fn in (("merge", mg), ("unmerge", um)):
                    torch.cuda.reset_peak_memory_stats()
                    m0 = torch.cuda.memory_allocated()
                    fn()
                    torch.cuda.synchronize()
                    res[f"{phase}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - m0
                    if phase == "merge":
                        res["held_while_merged_bytes"] = torch.cuda.memory_allocated() - m0
                res["peak_extra_bytes"] = max(res["merge_peak_extra_bytes"], res["unmerge_peak_extra_bytes"])
                res["largest_site_weight_bytes"] = largest
                res["peak_extra_over_largest_layer"] = res["peak_extra_bytes"] / largest
                out[f"{size}_{which}"] = res
        ours = pm = model = None
        gc.collect()
        torch.cuda.empty_cache()
    return out


def bench_bf16_exact(dev: str, delta, cycles: int) -> dict:  # type: ignore[no-untyped-def]
    import surgery

    with _quiet():
        _, ours, pm, _ = make_pair(dev, torch.bfloat16, delta=delta)
    w_ours = site_weights(ours, False)
    w_peft = site_weights(pm, True)
    orig = {k: v.detach().clone() for k, v in w_ours.items()}
    assert set(orig) == set(w_peft) and all(torch.equal(orig[k], w_peft[k]) for k in orig)
    # size of the delta relative to the weights it is merged into
    ad_q = "model.layers.0.self_attn.q_proj"
    A, B = delta.tensors[f"{ad_q}.lora_A.weight"], delta.tensors[f"{ad_q}.lora_B.weight"]
    dw = (ALPHA / R) * (B @ A)
    rel = float(dw.pow(2).mean().sqrt() / orig[f"{ad_q}.weight"].float().cpu().pow(2).mean().sqrt())

    def diff(now: dict[str, torch.Tensor]) -> dict[str, Any]:
        n = changed = 0
        mx = 0.0
        for k, w0 in orig.items():
            w = now[k]
            ne = w.view(torch.int16) != w0.view(torch.int16)
            changed += int(ne.sum())
            n += w0.numel()
            mx = max(mx, float((w.float() - w0.float()).abs().max()))
        return {"max_abs_diff": mx, "fraction_altered": changed / n, "elements": n, "altered": changed}

    res: dict[str, Any] = {
        "cycles": cycles,
        "dtype": "bfloat16 base, fp32 LoRA (both libraries' default)",
        "delta_rms_over_weight_rms_q_proj0": rel,
    }
    with _quiet():
        for which, (mg, um, ws) in {
            "ours": (lambda: surgery.merge(ours, NAME), lambda: surgery.unmerge(ours, NAME), w_ours),
            "peft": (pm.merge_adapter, pm.unmerge_adapter, w_peft),
        }.items():
            t0 = time.perf_counter()
            try:
                for c in range(cycles):
                    mg()
                    um()
                    if c == 0:
                        res[f"{which}_after_1"] = diff(ws)
                res[f"{which}_after_{cycles}"] = diff(ws)
            except Exception as e:  # noqa: BLE001
                res[f"{which}_error"] = f"{type(e).__name__}: {e}"
            C.sync(dev)
            res[f"{which}_seconds"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- profile


def _pstats_top(prof: cProfile.Profile, n: int, per: int = 1) -> list[str]:
    s = io.StringIO()
    ps = pstats.Stats(prof, stream=s).sort_stats("tottime")
    ps.print_stats(n)
    lines = [ln.rstrip() for ln in s.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return [f"(totals over {per} calls)"] + lines[start : start + n + 1]


def profile_forward(dev: str, base, ours, pm, ids, iters: int) -> dict:  # type: ignore[no-untyped-def]
    out: dict[str, Any] = {}
    with torch.inference_mode():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(iters):
            ours(input_ids=ids, use_cache=False)
        prof.disable()
        out["ours_forward_cprofile_tottime"] = _pstats_top(prof, 15, per=iters)
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        for name, m in (("base", base), ("ours", ours), ("peft", pm)):
            m(input_ids=ids, use_cache=False)
            with profile(activities=acts) as p:
                for _ in range(iters):
                    m(input_ids=ids, use_cache=False)
                C.sync(dev)
            table = p.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=40)
            out[f"{name}_forward_torch_profiler"] = [ln for ln in table.splitlines() if ln.strip()]
    return out


def profile_merge(dev: str, ours) -> dict:  # type: ignore[no-untyped-def]
    from torch.profiler import ProfilerActivity, profile

    import surgery

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    out = {}
    for phase, fn in (("merge", lambda: surgery.merge(ours, NAME)), ("unmerge", lambda: surgery.unmerge(ours, NAME))):
        with profile(activities=acts) as p:
            fn()
            C.sync(dev)
        table = p.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=40)
        out[f"ours_{phase}_torch_profiler"] = [ln for ln in table.splitlines() if ln.strip()]
    return out


# ----------------------------------------------------------------------------- driver


def run_device(dev: str, args: argparse.Namespace) -> dict:
    import surgery

    quick = args.quick
    rounds = args.rounds or (2 if quick else 15)
    warmup = 1 if quick else 2
    batch = QUICK_BATCH if quick else BATCH
    res: dict[str, Any] = {
        "device": dev,
        "rounds": rounds,
        "warmup": warmup,
        "batch": [batch, SEQ],
        "load_average": {"start": C.load_average()},
        "section_s": {},
    }
    sizes = ["bench"] if quick else ["bench", "large"]

    @contextlib.contextmanager
    def section(name: str) -> Iterator[None]:
        log(f"[{dev}] {name}")
        t = time.perf_counter()
        yield
        res["section_s"][name] = round(time.perf_counter() - t, 2)
        res["load_average"][name] = C.load_average()

    with section("setup"):
        base, ours, pm, delta = make_pair(dev)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, SMALL["vocab_size"], (batch, SEQ), generator=g).to(dev)
    with section("1 forward"):
        res["forward"] = bench_forward(dev, base, ours, pm, ids, rounds, warmup, quick)
    log(
        f"[{dev}]    ours/base {res['forward']['ours_over_base']['ratio']:.3f}, "
        f"peft/base {res['forward']['peft_over_base']['ratio']:.3f}"
    )
    with section("2 training step"):
        res["train"] = bench_train(dev, ours, pm, ids, rounds, warmup)
        surgery.apply(ours, delta)  # back to the delta both started with
        load_into_peft(pm, delta)
    log(f"[{dev}]    ours/peft {res['train']['ours_over_peft']['ratio']:.3f}")
    with section("3 hot-swap"):
        res["hotswap"] = bench_hotswap(dev, ours, pm, delta, max(rounds, 5) if quick else rounds * 2, warmup, quick)
    log(f"[{dev}]    apply {C.fmt_seconds(res['hotswap']['stats']['ours_apply']['median_s'])}")
    with section("5 merge/unmerge time"):
        res["merge_time"] = bench_merge_time(dev, ours, pm, rounds, 0 if quick else warmup, halves=not quick)
    if args.profile:
        with section("profile"):
            res["profile"] = profile_forward(dev, base, ours, pm, ids, 3 if dev == "cpu" else 20)
            res["profile"].update(profile_merge(dev, ours))
    del base, ours, pm
    gc.collect()
    with section("5 bf16 exactness"):
        res["bf16_exact"] = bench_bf16_exact(dev, delta, args.cycles or (2 if quick else 100))
    with section("5 merge/unmerge memory"):
        if dev == "cpu":
            res["merge_memory"] = collect_mem_children(start_mem_children(sizes))
        else:
            res["merge_memory"] = bench_merge_memory_cuda(dev, sizes)
    return res


def rows_for(dev: str, r: dict) -> list[dict]:
    rows = []
    f = r["forward"]
    st = f["stats"]
    ob, pb = f["ours_over_base"]["ratio"], f["peft_over_base"]["ratio"]
    bs = "x".join(map(str, r["batch"]))
    rows.append(
        {
            "measurement": f"[{dev}] base forward, {bs} tokens (median / min)",
            "ours": f"{C.fmt_seconds(st['base']['median_s'])} / {C.fmt_seconds(st['base']['min_s'])}",
        }
    )
    rows.append(
        {
            "measurement": f"[{dev}] forward, 1 unmerged delta, x base (time median / min)",
            "ours": f"{ob:.3f}x ({C.fmt_seconds(st['ours']['median_s'])} / {C.fmt_seconds(st['ours']['min_s'])})",
            "PEFT": f"{pb:.3f}x ({C.fmt_seconds(st['peft']['median_s'])} / {C.fmt_seconds(st['peft']['min_s'])})",
            "ratio": f"{f['ours_over_peft']['ratio']:.3f} (mins: {f['ours_over_peft']['ratio_of_mins']:.3f})",
            "target": f"ours <= {TARGET['forward_ratio']:.2f}x base",
            "met?": ob <= TARGET["forward_ratio"],
        }
    )
    if "ours_disabled_over_base" in f:
        rows.append(
            {
                "measurement": f"[{dev}] forward, delta injected but disabled, x base",
                "ours": f"{f['ours_disabled_over_base']['ratio']:.3f}x",
            }
        )
    t = r["train"]
    ts = t["stats"]
    tr, trm = t["ours_over_peft"]["ratio"], t["ours_over_peft"]["ratio_of_mins"]
    rows.append(
        {
            "measurement": f"[{dev}] training step (fwd+bwd+AdamW on LoRA), median / min",
            "ours": f"{C.fmt_seconds(ts['ours']['median_s'])} / {C.fmt_seconds(ts['ours']['min_s'])}",
            "PEFT": f"{C.fmt_seconds(ts['peft']['median_s'])} / {C.fmt_seconds(ts['peft']['min_s'])}",
            "ratio": f"{tr:.3f} (mins: {trm:.3f})",
            "target": f"ours/PEFT <= {TARGET['train_ratio']}",
            "met?": tr <= TARGET["train_ratio"],
        }
    )
    h = r["hotswap"]
    hs = h["stats"]
    oa = hs["ours_apply"]["median_s"]
    size = C.fmt_bytes(h["delta_bytes"])
    rows.append(
        {
            "measurement": f"[{dev}] hot-swap {size} delta: surgery.apply vs PEFT load_adapter (from disk)",
            "ours": C.fmt_seconds(oa),
            "PEFT": C.fmt_seconds(hs["peft_load_adapter"]["median_s"]),
            "ratio": f"{h['ours_over_peft_load_adapter']['ratio']:.3f}",
            "target": f"ours <= {TARGET['apply_s'] * 1e3:.0f} ms",
            "met?": oa <= TARGET["apply_s"],
        }
    )
    rows.append(
        {
            "measurement": f"[{dev}] hot-swap: surgery.apply vs PEFT hotswap_adapter (from disk)",
            "ours": C.fmt_seconds(oa),
            "PEFT": C.fmt_seconds(hs["peft_hotswap_adapter"]["median_s"]),
            "ratio": f"{h['ours_over_peft_hotswap_adapter']['ratio']:.3f}",
            "target": f"ours <= {TARGET['apply_s'] * 1e3:.0f} ms",
            "met?": oa <= TARGET["apply_s"],
        }
    )
    rows.append(
        {
            "measurement": f"[{dev}] hot-swap, like for like: safetensors load + apply vs PEFT "
            "hotswap_adapter; in-memory apply vs hotswap_adapter_from_state_dict",
            "ours": f"{C.fmt_seconds(hs['ours_disk']['median_s'])}; {C.fmt_seconds(oa)}",
            "PEFT": f"{C.fmt_seconds(hs['peft_hotswap_adapter']['median_s'])}; "
            f"{C.fmt_seconds(hs['peft_hotswap_from_state_dict']['median_s'])}",
            "ratio": f"{hs['ours_disk']['median_s'] / hs['peft_hotswap_adapter']['median_s']:.3f}; "
            f"{oa / hs['peft_hotswap_from_state_dict']['median_s']:.3f}",
        }
    )
    if "ours_apply_from_device" in hs:
        rows.append(
            {
                "measurement": f"[{dev}] hot-swap, delta already on the device",
                "ours": C.fmt_seconds(hs["ours_apply_from_device"]["median_s"]),
            }
        )
    mt = r["merge_time"]
    ms = mt["stats"]
    rows.append(
        {
            "measurement": f"[{dev}] merge + unmerge, all {mt['sites']} sites, fp32 (median)",
            "ours": C.fmt_seconds(ms["ours"]["median_s"]),
            "PEFT": C.fmt_seconds(ms["peft"]["median_s"]),
            "ratio": f"{mt['ours_over_peft']['ratio']:.3f}",
        }
    )
    mm = r["merge_memory"]
    for size in ("bench", "large"):
        o, p = mm.get(f"{size}_ours"), mm.get(f"{size}_peft")
        if not o or not p:
            continue
        if "error" in o or "error" in p:
            rows.append(
                {
                    "measurement": f"[{dev}] merge+unmerge peak extra memory ({size})",
                    "ours": o.get("error", "")[:200],
                    "PEFT": p.get("error", "")[:200],
                }
            )
            continue
        what = "RSS" if dev == "cpu" else "CUDA allocator"
        layer = C.fmt_bytes(o["largest_site_weight_bytes"])
        rows.append(
            {
                "measurement": f"[{dev}] merge+unmerge peak extra {what}, x largest layer ({layer}; "
                f"{'benchmark model' if size == 'bench' else 'hidden 2048 / inter 8192'})",
                "ours": f"{o['peak_extra_over_largest_layer']:.2f}x ({C.fmt_bytes(o['peak_extra_bytes'])})",
                "PEFT": f"{p['peak_extra_over_largest_layer']:.2f}x ({C.fmt_bytes(p['peak_extra_bytes'])})",
                "ratio": f"{o['peak_extra_bytes'] / max(p['peak_extra_bytes'], 1):.2f}",
            }
        )
        rows.append(
            {
                "measurement": f"[{dev}] memory held while merged ({size}; ours: fixups + factor snapshots"
                f"{', in host memory' if dev != 'cpu' else ''})",
                "ours": C.fmt_bytes(o["held_while_merged_bytes"]),
                "PEFT": C.fmt_bytes(p["held_while_merged_bytes"]),
            }
        )
    b = r["bf16_exact"]
    n = b["cycles"]

    def ex(k: str) -> str:
        if f"{k}_error" in b:
            return b[f"{k}_error"][:200]
        d = b[f"{k}_after_{n}"]
        return f"{d['fraction_altered'] * 100:.3g}% altered, max |diff| {d['max_abs_diff']:.3g}"

    ours_exact = f"ours_after_{n}" in b and b[f"ours_after_{n}"]["altered"] == 0
    rows.append(
        {
            "measurement": f"[{dev}] bf16 weights after {n} merge/unmerge cycles",
            "ours": ex("ours"),
            "PEFT": ex("peft"),
            "target": "bit-exact",
            "met?": ours_exact,
        }
    )
    return rows


def rows_inject(r: dict) -> list[dict]:
    rows = []
    on, pn = r.get("ours_names"), r.get("peft_names")
    rows.append(
        {
            "measurement": "[meta] inject into Llama-2-7B shape, targets = 7 names (median)",
            "ours": C.fmt_seconds(on["median_s"]) if on else "n/a",
            "PEFT": C.fmt_seconds(pn["median_s"]) if pn else r.get("peft_skipped", "n/a")[:40],
            "ratio": f"{on['median_s'] / pn['median_s']:.4f}" if on and pn else "",
            "target": f"ours <= {TARGET['inject_names_s']} s",
            "met?": bool(on and on["median_s"] <= TARGET["inject_names_s"]),
        }
    )
    orl, pal = r.get("ours_role_linear"), r.get("peft_all_linear")
    err = r["errors"].get("ours_role_linear")
    rows.append(
        {
            "measurement": '[meta] inject into Llama-2-7B shape, targets = "@linear" (first call; median) '
            'vs PEFT "all-linear"',
            "ours": f"error: {err[:160]}"
            if err
            else (f"{C.fmt_seconds(orl['first_s'])}; {C.fmt_seconds(orl['median_s'])}" if orl else "n/a"),
            "PEFT": C.fmt_seconds(pal["median_s"]) if pal else "skipped",
            "ratio": f"{orl['median_s'] / pal['median_s']:.4f}" if orl and pal else "",
            "target": f"ours <= {TARGET['inject_role_s']} s",
            "met?": bool(orl and not err and max(orl["first_s"], orl["median_s"]) <= TARGET["inject_role_s"]),
        }
    )
    return rows


def markdown(results: dict) -> str:
    env = results["env"]
    cols = ["measurement", "ours", "PEFT", "ratio", "target", "met?"]
    head = [
        "# LoRA: model-surgery vs PEFT",
        "",
        f"Generated by `benchmarks/bench_lora.py{' --quick' if results['quick'] else ''}` "
        f"on {time.strftime('%Y-%m-%d %H:%M', time.localtime(results['started']))}: "
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"{env.get('cpu')} x{env['cpu_count']} (threads {env['torch_threads']}, load average at start "
        f"{env['load_average_at_start']})" + (f", {env['cuda_device']}" if env.get("cuda_device") else "") + ".",
        "",
        f"Model: LlamaForCausalLM {SMALL}, fp32; LoRA r={R}, alpha={ALPHA} on {', '.join(TARGETS)}; "
        f"batch {BATCH} x {SEQ} tokens{f' (--quick: {QUICK_BATCH} x {SEQ}, 2 rounds; smoke test only)' if results['quick'] else ''}. Timings: warm-ups, then interleaved rounds (ours / PEFT / base "
        "in rotating order); times are medians (and minima) over rounds, ratios the median over rounds of "
        "the ratio within a round (`ratio` = ours / PEFT). Per-round samples, ratios of medians and of "
        "minima, load averages and profiles are in the JSON.",
        "",
    ]
    rows = []
    for dev in results["devices"]:
        rows += rows_for(dev, results["devices"][dev])
    if "inject_7b" in results:
        rows += rows_inject(results["inject_7b"])
    if results["quick"]:  # 2 rounds on a small batch: the verdicts are not the benchmark's
        for row in rows:
            if isinstance(row.get("met?"), bool):
                row["met?"] = f"({'yes' if row['met?'] else 'no'}; --quick)"
    notes = ["", "Notes:", ""]
    for dev, r in results["devices"].items():
        c = r["forward"]["check"]
        notes.append(
            f"- [{dev}] logits, ours vs PEFT: max |diff| {c['max_abs_diff_ours_vs_peft']:.3g} "
            f"(ours vs base {c['max_abs_diff_ours_vs_base']:.3g}: the delta is live)."
        )
        b = r["bf16_exact"]
        if "ours_after_1" in b and "peft_after_1" in b:
            notes.append(
                f"- [{dev}] bf16 after 1 cycle: ours {b['ours_after_1']['fraction_altered'] * 100:.3g}% "
                f"altered, PEFT {b['peft_after_1']['fraction_altered'] * 100:.3g}% "
                f"(delta rms / weight rms = {b['delta_rms_over_weight_rms_q_proj0']:.3f})."
            )
    inj = results.get("inject_7b")
    if inj and inj["errors"].get("ours_role_linear"):
        notes.append(f"- `@linear` failed: `{inj['errors']['ours_role_linear'][:400]}`")
    if inj and inj.get("sites"):
        notes.append(f"- 7B sites hit: {inj['sites']}")
    return "\n".join(head) + C.markdown_table(rows, cols) + "\n" + "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run (< 60 s): batch 8, 2 rounds, 1 thread, fewer extras; not judged",
    )
    ap.add_argument("--out", type=Path, default=C.RESULTS_DIR / "bench_lora.json", help="JSON results path")
    ap.add_argument("--md", type=Path, default=None, help="markdown table path (default: --out with .md)")
    ap.add_argument("--devices", default="auto", help="comma list of cpu,cuda (default: cpu, and cuda if present)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default 15; quick 2)")
    ap.add_argument("--cycles", type=int, default=None, help="bf16 merge/unmerge cycles (default 100; quick 2)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: the cores this process may use; --quick: 1)",
    )
    ap.add_argument("--skip-7b", action="store_true", help="skip the 7B-on-meta injection measurement")
    ap.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="profile our forward (default: on, off with --quick)",
    )
    ap.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_mem-size", dest="mem_size", default="bench", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.mem_child:
        print(json.dumps(_mem_child(args.mem_child, args.mem_size)))
        return 0
    if args.profile is None:
        args.profile = not args.quick
    md_path = args.md or args.out.with_suffix(".md")
    threads = C.set_threads()
    # --quick runs on one thread unless told otherwise: on a busy 2-core machine torch's OpenMP
    # threads wait on each other at every small op, and a smoke run then takes minutes, not seconds
    if args.threads or args.quick:
        threads = args.threads or 1
        torch.set_num_threads(threads)
    devices = (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if args.devices == "auto"
        else [d.strip() for d in args.devices.split(",") if d.strip()]
    )
    t_start = time.time()
    results: dict[str, Any] = {
        "benchmark": "bench_lora",
        "quick": args.quick,
        "started": t_start,
        "env": C.environment(),
        "setup": {
            "model": SMALL,
            "dtype": "float32",
            "lora": {"r": R, "alpha": ALPHA, "targets": TARGETS},
            "batch": [QUICK_BATCH if args.quick else BATCH, SEQ],
            "lora_B_std": B_STD,
            "threads": threads,
            "attn_implementation": None,
        },
        "targets": TARGET,
        "devices": {},
    }
    with _quiet():
        import surgery  # noqa: F401

        results["setup"]["attn_implementation"] = llama(dict(SMALL, num_hidden_layers=1)).config._attn_implementation
    for dev in devices:
        results["devices"][dev] = run_device(dev, args)
        gc.collect()
    if not args.skip_7b:
        log("[meta] 4. inject into 7B-shaped model")
        results["inject_7b"] = bench_inject_7b(1 if args.quick else 5, args.quick)
    results["elapsed_s"] = time.time() - t_start
    results["env"]["load_average_at_end"] = C.load_average()
    md = markdown(results)
    C.write_results(results, args.out, md_path, md)
    print(md)
    log(f"wrote {args.out} and {md_path} in {results['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
