"""Shared helpers for the benchmark scripts: timing on noisy machines, memory
readings, environment notes, and writing results as JSON + a markdown table.

Timing method (see `interleaved`): every contender is warmed up, then timed in
*rounds*; one round runs each contender once (the order rotates from round to
round so none always runs first or last). Medians and minima are reported per
contender, and ratios are taken between medians of the same interleaved rounds,
so slow phases of a shared, noisy machine hit every contender alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "docs" / "results"


# ----------------------------------------------------------------------------- setup


def log(*a: Any) -> None:
    """Progress on stderr (stdout carries the results)."""
    print(*a, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence library warnings (deprecations, PEFT's notes) inside timed code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads() -> int:
    """Use every core this process may run on; returns the count."""
    n = cpu_count()
    torch.set_num_threads(n)
    return n


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: str | None = None) -> dict[str, Any]:
    """What the numbers were taken on."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        env["cpu"] = m.group(1).strip() if m else None
    except OSError:
        env["cpu"] = platform.processor() or None
    for mod in ("transformers", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"unavailable: {e}"
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda_version"] = torch.version.cuda
    if device is not None:
        env["device"] = device
    return env


# ----------------------------------------------------------------------------- timing


def sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def summarize(samples: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "n": len(samples),
        "samples_s": [round(s, 7) for s in samples],
    }


def _calibrate(
    fn: Callable[[], Any], device: Any, min_sample_s: float, clock: Callable[[], float] = time.perf_counter
) -> int:
    """How many calls make one timed sample last at least `min_sample_s`."""
    sync(device)
    t = clock()
    fn()
    sync(device)
    one = max(clock() - t, 1e-7)
    return max(1, min(10_000, int(min_sample_s / one) + 1)) if one < min_sample_s else 1


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 2,
    device: Any = None,
    min_sample_s: float = 0.0,
    setup: dict[str, Callable[[], Any]] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, Any]]:
    """Time each of `fns` `rounds` times, interleaved; return per-name stats (`clock`: wall
    time by default; `time.process_time` on a shared CPU, where other jobs should not count).

    `setup[name]`, when given, runs (untimed) before every call of `fns[name]`
    (e.g. to undo what the timed call did). When a call is shorter than
    `min_sample_s`, one sample times a batch of calls (`inner`) and reports the
    time per call; `setup` forces one call per sample.
    """
    setup = setup or {}
    names = list(fns)
    for name in names:  # warmups, in the same order as a round
        for _ in range(warmup):
            if name in setup:
                setup[name]()
            fns[name]()
    sync(device)
    inner = {
        n: 1 if (n in setup or min_sample_s <= 0) else _calibrate(fns[n], device, min_sample_s, clock) for n in names
    }
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            if name in setup:
                setup[name]()
            sync(device)
            t = clock()
            for _ in range(inner[name]):
                fn()
            sync(device)
            samples[name].append((clock() - t) / inner[name])
    out = {}
    for n in names:
        out[n] = summarize(samples[n])
        out[n]["inner"] = inner[n]
    return out


def ratio(stats: dict[str, dict[str, Any]], num: str, den: str) -> dict[str, float]:
    """num/den from interleaved rounds.

    `ratio`: the median over rounds of num/den within the round (the two were
    timed back to back, so a burst of load that spans a few rounds hits both);
    `ratio_of_medians` and `ratio_of_mins` as cross-checks. When they disagree
    a lot, the machine was busy: see the samples."""
    a, b = stats[num]["samples_s"], stats[den]["samples_s"]
    return {
        "ratio": statistics.median(x / y for x, y in zip(a, b, strict=True)),
        "ratio_of_medians": stats[num]["median_s"] / stats[den]["median_s"],
        "ratio_of_mins": stats[num]["min_s"] / stats[den]["min_s"],
    }


def once(fn: Callable[[], Any], device: Any = None) -> tuple[float, Any]:
    """Time one call; returns (seconds, result)."""
    sync(device)
    t = time.perf_counter()
    res = fn()
    sync(device)
    return time.perf_counter() - t, res


# ----------------------------------------------------------------------------- memory


def proc_status_kb(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in kB (VmRSS, VmHWM, ...); empty where unavailable."""
    try:
        with open("/proc/self/status") as f:
            text = f.read()
    except OSError:
        return {}
    out = {}
    for k in keys:
        m = re.search(rf"^{k}:\s+(\d+)\s+kB", text, re.M)
        if m:
            out[k] = int(m.group(1))
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS follows live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # noqa: BLE001  (not glibc)
        pass


# ----------------------------------------------------------------------------- results


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else str(x)
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return repr(x)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "yes" if v else "**no**"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], json_path: Path, md_path: Path, md_text: str) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    md_path.write_text(md_text.rstrip() + "\n")


def run_part(name: str, fn: Callable[..., dict], *args: Any) -> dict:
    """One part of a benchmark, timed; a part that fails records its error and the others still run."""
    import gc
    import traceback

    log(f"[{name}] ...")
    t = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001  (one failing part must not lose the others)
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"[:500]}
    gc.collect()
    out["elapsed_s"] = time.perf_counter() - t
    log(f"[{name}] {out['elapsed_s']:.1f} s")
    return out
