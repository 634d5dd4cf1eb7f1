"""The hub against raw safetensors and PEFT, in one run.

    python benchmarks/bench_hub.py            # about a minute
    python benchmarks/bench_hub.py --quick    # smoke run

Writes docs/results/bench_hub.json and docs/results/bench_hub.md.

Delta: LoRA r=16, alpha=32 on q/k/v/o/gate/up/down of LlamaForCausalLM(hidden 512, intermediate 1376,
4 layers, 8 heads, vocab 1000), fp32: 56 tensors, 2.5 MB. Measurements (interleaved rounds, medians):

1. push of a new delta (other bytes every call) vs `safetensors.torch.save_file` + one fsync;
   push of the same tensors again (dedupe: no blob written);
2. pull vs `safetensors.torch.load_file` of the same bytes: pull of a blob this Hub already checked
   and that has not changed since (stat identity), and pull with `recheck=True` (sha256 of every byte);
3. `hub.load` warm (hot-swap into the live model) vs PEFT `load_adapter` and `hotswap_adapter`;
4. `hub.versions` and ref resolution on a hub of 10,000 versions of one name.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import torch  # noqa: E402

from registry import store  # noqa: E402

SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, vocab_size=1000)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET = {"push_over_raw": 2.0, "pull_over_raw": 1.5, "load_ms": 10.0, "versions_ms": 50.0}


def log(msg: str) -> None:
    print(msg, flush=True)


def build() -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    import surgery

    logging.set_verbosity_error()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    ours = copy.deepcopy(base)
    surgery.inject(ours, "lora", targets=TARGETS, r=16, alpha=32, name="default")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return base, ours


def bench_push_pull(work: Path, delta: Any, rounds: int) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    import registry

    hub = registry.Hub(work / "hub")
    raw = work / "raw.safetensors"
    tensors = delta.tensors
    key = next(iter(tensors))
    counter = [0]

    def bump() -> None:  # new bytes for every call of both contenders (a new delta each time)
        counter[0] += 1
        tensors[key].view(-1)[0] = float(counter[0])

    fns = {
        "raw_save_file_fsync": lambda: (save_file(tensors, str(raw)), store.fsync_file(raw)),
        "hub_push_new": lambda: hub.push(delta, "bench/push"),
    }
    st = C.interleaved(fns, rounds, warmup=2, setup={"raw_save_file_fsync": bump, "hub_push_new": bump})
    st_dedupe = C.interleaved(
        {"raw_save_file_fsync": fns["raw_save_file_fsync"], "hub_push_same": lambda: hub.push(delta, "bench/same")},
        rounds,
        warmup=2,
    )
    ref = hub.push(delta, "bench/pull")
    save_file(tensors, str(raw))
    time.sleep(1.1)  # files changed in the last second are never trusted as already checked
    hub.pull(ref)
    pulls = C.interleaved(
        {
            "raw_load_file": lambda: load_file(str(raw)),
            "hub_pull": lambda: hub.pull(ref),
            "hub_pull_recheck": lambda: hub.pull(ref, recheck=True),
        },
        rounds * 2,
        warmup=3,
        min_sample_s=0.01,
    )
    return {
        "push": st,
        "push_ratio": C.ratio(st, "hub_push_new", "raw_save_file_fsync"),
        "push_same": st_dedupe,
        "push_same_ratio": C.ratio(st_dedupe, "hub_push_same", "raw_save_file_fsync"),
        "pull": pulls,
        "pull_ratio": C.ratio(pulls, "hub_pull", "raw_load_file"),
        "pull_recheck_ratio": C.ratio(pulls, "hub_pull_recheck", "raw_load_file"),
        "blob_bytes": raw.stat().st_size,
    }


def bench_load(work: Path, base: Any, ours: Any, delta: Any, rounds: int) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from peft.utils.hotswap import hotswap_adapter

    import registry
    import surgery

    hub = registry.Hub(work / "hub-load")
    d2 = copy.deepcopy(delta)
    for t in d2.tensors.values():
        t.mul_(0.5)
    refs = [hub.push(delta, "bench/load"), hub.push(d2, "bench/load")]
    time.sleep(1.1)
    live = copy.deepcopy(ours)
    for r in refs:
        hub.pull(r)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    dirs = []
    for i, d in enumerate((delta, d2)):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    k = n.replace("base_model.model.", "").replace(".default", "")
                    p.copy_(d.tensors[k])
        out = work / f"peft{i}"
        pm.save_pretrained(str(out))
        dirs.append(str(out))
    nxt = {"ours": 0, "hot": 0}

    def ours_load() -> None:
        nxt["ours"] ^= 1
        hub.load(live, refs[nxt["ours"]], as_name="default")

    def peft_hot() -> None:
        nxt["hot"] ^= 1
        hotswap_adapter(pm, dirs[nxt["hot"]], adapter_name="default", torch_device="cpu")

    def drop_swap() -> None:
        if "swap" in pm.peft_config:
            pm.delete_adapter("swap")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = C.interleaved(
            {
                "hub_load": ours_load,
                "peft_load_adapter": lambda: pm.load_adapter(dirs[1], adapter_name="swap", torch_device="cpu"),
                "peft_hotswap_adapter": peft_hot,
            },
            rounds,
            warmup=2,
            setup={"peft_load_adapter": drop_swap},
        )
    # correctness: after loading version 2 the live model holds its tensors
    hub.load(live, refs[1], as_name="default")
    now = surgery.delta(live, "default")
    same = all(torch.equal(now.tensors[k], d2.tensors[k]) for k in d2.tensors)
    return {
        "stats": st,
        "over_load_adapter": C.ratio(st, "hub_load", "peft_load_adapter"),
        "over_hotswap_adapter": C.ratio(st, "hub_load", "peft_hotswap_adapter"),
        "tensors_equal_after": same,
    }


def bench_many(work: Path, n: int, rounds: int) -> dict[str, Any]:
    import registry
    import surgery
    from registry.hub import manifest_digest
    from registry.store import append_line

    hub = registry.Hub(work / "hub-many")
    d = surgery.Delta(
        "lora", "x", {"r": 1}, {"a.lora_A.weight": torch.ones(1, 4), "a.lora_B.weight": torch.ones(4, 1)}, "arch:x"
    )
    first = hub.push(d, "bench/many")
    vdir = hub._name_dir("bench/many") / "versions"
    doc = json.loads((vdir / "1.json").read_text())
    t0 = time.perf_counter()
    for v in range(2, n + 1):  # the same manifests a push writes, without n fsyncs
        doc["version"] = v
        doc["created"] = f"2026-01-01T00:00:00.{v:06d}+00:00"
        doc["digest"] = manifest_digest(doc)
        (vdir / f"{v}.json").write_text(json.dumps(doc, sort_keys=True, indent=1))
        append_line(hub._name_dir("bench/many") / "digests.log", {"v": v, "d": doc["digest"]}, fsync=False)
    build_s = time.perf_counter() - t0
    hub.alias("bench/many", "prod", version=n // 2)
    mid = hub.resolve(f"bench/many@{n // 2}")
    assert len(hub.versions("bench/many")) == n and first.version == 1
    fresh = registry.Hub(work / "hub-many")
    st = C.interleaved(
        {
            "versions": lambda: fresh.versions("bench/many"),
            "resolve_latest": lambda: fresh.resolve("bench/many"),
            "resolve_version": lambda: fresh.resolve(f"bench/many@{n // 3}"),
            "resolve_alias": lambda: fresh.resolve("bench/many@prod"),
            "resolve_digest_prefix": lambda: fresh.resolve(f"bench/many@{mid.digest[:19]}"),
        },
        rounds,
        warmup=1,
    )
    return {"n": n, "build_s": build_s, "stats": st}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=str(C.RESULTS_DIR / "bench_hub.json"))
    ap.add_argument("--md", default=str(C.RESULTS_DIR / "bench_hub.md"))
    ap.add_argument("--dir", default=None, help="work folder (default: a temp folder); its disk is what push fsyncs")
    args = ap.parse_args()
    rounds = 5 if args.quick else args.rounds
    C.set_threads()
    env = C.environment("cpu")
    work = Path(tempfile.mkdtemp(prefix="bench_hub_", dir=args.dir))
    try:
        base, ours = build()
        import surgery

        delta = surgery.delta(ours, "default")
        log(f"delta: {delta}")
        res: dict[str, Any] = {"env": env, "delta_bytes": delta.nbytes, "rounds": rounds, "work_dir": str(work)}
        log("push / pull ...")
        res["push_pull"] = bench_push_pull(work, copy.deepcopy(delta), rounds)
        log("hub.load vs PEFT ...")
        res["load"] = bench_load(work, base, ours, delta, rounds)
        log("10,000 versions ...")
        res["many"] = bench_many(work, 1000 if args.quick else 10_000, max(5, rounds // 2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(res, Path(args.out), Path(args.md), args.quick)
    return 0


def write(res: dict[str, Any], out: Path, md: Path, quick: bool) -> None:
    pp, ld, many = res["push_pull"], res["load"], res["many"]
    f = C.fmt_seconds
    rows = []
    ps = pp["push"]
    rows.append(
        {
            "measurement": "push, new delta (blob + manifest, fsync'd) vs save_file + 1 fsync",
            "ours": f(ps["hub_push_new"]["median_s"]),
            "peer": f(ps["raw_save_file_fsync"]["median_s"]),
            "ratio": f"{pp['push_ratio']['ratio']:.2f}",
            "target": f"<= {TARGET['push_over_raw']}x",
            "met?": pp["push_ratio"]["ratio"] <= TARGET["push_over_raw"],
        }
    )
    ps2 = pp["push_same"]
    rows.append(
        {
            "measurement": "push, same tensors again (dedupe: manifest only) vs save_file + 1 fsync",
            "ours": f(ps2["hub_push_same"]["median_s"]),
            "peer": f(ps2["raw_save_file_fsync"]["median_s"]),
            "ratio": f"{pp['push_same_ratio']['ratio']:.2f}",
        }
    )
    pl = pp["pull"]
    rows.append(
        {
            "measurement": "pull (blob checked before by this Hub, unchanged since) vs load_file",
            "ours": f(pl["hub_pull"]["median_s"]),
            "peer": f(pl["raw_load_file"]["median_s"]),
            "ratio": f"{pp['pull_ratio']['ratio']:.2f}",
            "target": f"<= {TARGET['pull_over_raw']}x",
            "met?": pp["pull_ratio"]["ratio"] <= TARGET["pull_over_raw"],
        }
    )
    rows.append(
        {
            "measurement": "pull, recheck=True (sha256 of every byte) vs load_file",
            "ours": f(pl["hub_pull_recheck"]["median_s"]),
            "peer": f(pl["raw_load_file"]["median_s"]),
            "ratio": f"{pp['pull_recheck_ratio']['ratio']:.2f}",
            "target": f"<= {TARGET['pull_over_raw']}x",
            "met?": pp["pull_recheck_ratio"]["ratio"] <= TARGET["pull_over_raw"],
        }
    )
    ls = ld["stats"]
    hl = ls["hub_load"]["median_s"]
    rows.append(
        {
            "measurement": "hub.load warm (hot-swap) vs PEFT load_adapter",
            "ours": f(hl),
            "peer": f(ls["peft_load_adapter"]["median_s"]),
            "ratio": f"{ld['over_load_adapter']['ratio']:.3f}",
            "target": f"<= {TARGET['load_ms']:.0f} ms",
            "met?": hl * 1e3 <= TARGET["load_ms"],
        }
    )
    rows.append(
        {
            "measurement": "hub.load warm (hot-swap) vs PEFT hotswap_adapter",
            "ours": f(hl),
            "peer": f(ls["peft_hotswap_adapter"]["median_s"]),
            "ratio": f"{ld['over_hotswap_adapter']['ratio']:.3f}",
            "target": f"<= {TARGET['load_ms']:.0f} ms",
            "met?": hl * 1e3 <= TARGET["load_ms"],
        }
    )
    for k, label in (
        ("versions", "hub.versions"),
        ("resolve_latest", "resolve name (latest)"),
        ("resolve_version", "resolve name@N"),
        ("resolve_alias", "resolve name@alias"),
        ("resolve_digest_prefix", "resolve name@sha256:<12 hex>"),
    ):
        s = many["stats"][k]["median_s"]
        rows.append(
            {
                "measurement": f"{label}, {many['n']:,} versions",
                "ours": f(s),
                "target": f"< {TARGET['versions_ms']:.0f} ms",
                "met?": s * 1e3 < TARGET["versions_ms"],
            }
        )
    e = res["env"]
    text = f"""# Hub: model-surgery registry vs raw safetensors and PEFT

Generated by `benchmarks/bench_hub.py{" --quick" if quick else ""}` on {time.strftime("%Y-%m-%d %H:%M")}: torch {e["torch"]}, peft {e["peft"]}, {e.get("cpu")} x{e["cpu_count"]} (load average at start {e["load_average_at_start"]}).

Delta: LoRA r=16 on the seven linear kinds of a 4-layer hidden-512 Llama, fp32, {C.fmt_bytes(res["delta_bytes"])} ({C.fmt_bytes(pp["blob_bytes"])} as safetensors). Interleaved rounds ({res["rounds"]}), medians; `ratio` is the median over rounds of ours / peer within a round. Files in a temp folder on the machine's disk (fsync cost is the disk's).

{C.markdown_table(rows, ["measurement", "ours", "peer", "ratio", "target", "met?"])}

Notes:

- A push writes the blob (temp file, fsync, rename, fsync of its directory) and the manifest (temp file, fsync,
  rename, fsync of the versions directory); the blob's fsync runs on a worker thread while the manifest is
  prepared under the name's lock, so the two fsyncs overlap. The raw peer does one fsync.
- Pull checks the manifest's digest, the blob's size, its safetensors header against the manifest, and the
  sha256 of every byte (per chunk, hashed on worker threads while the header is parsed). A Hub object remembers
  which files it has checked by (device, inode, size, mtime, ctime); files changed less than a second before
  the check are never remembered. So a repeated pull of an unchanged blob skips the hashing (first row), a
  `recheck=True` pull always hashes (second row), and `hub.verify()` always hashes everything.
- hub.load = pull + fingerprint check + `surgery.apply` (in-place copy into the live LoRA tensors); after the
  benchmark the live model's tensors equal the last version loaded: {ld["tensors_equal_after"]}.
- 10,000 versions: manifests written as a push writes them (without 10,000 fsyncs: {many["build_s"]:.1f} s);
  `versions` lists the folder and reads `digests.log` once.
"""
    C.write_results(res, out, md, text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
