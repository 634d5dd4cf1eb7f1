"""The server's Prometheus metrics, in the text exposition format (no client library needed):
requests, tokens, errors, queue depth and batch size, the pool's hits / misses / load times,
and latency histograms (time to first token, inter-token latency, whole request, decode step)."""

from __future__ import annotations

import bisect
import threading
from typing import Any

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Counter:
    def __init__(self) -> None:
        self.value = 0
        self.lock = threading.Lock()

    def inc(self, n: int = 1) -> None:
        with self.lock:
            self.value += n


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(_BUCKETS, seconds)] += 1
            self.sum += seconds

    def render(self, name: str, help: str) -> list[str]:
        with self.lock:
            counts, total = list(self.counts), self.sum
        out = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        acc = 0
        for le, c in zip((*_BUCKETS, float("inf")), counts, strict=True):
            acc += c
            out.append(f'{name}_bucket{{le="{"+Inf" if le == float("inf") else le}"}} {acc}')
        out += [f"{name}_sum {total:.6f}", f"{name}_count {acc}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self.requests, self.tokens, self.errors = Counter(), Counter(), Counter()
        self.hist = {k: Histogram() for k in ("ttft", "itl", "request", "step")}
        self.last_batch = 0

    def latency(self, kind: str, seconds: float) -> None:
        self.hist[kind].observe(seconds)

    def step(self, seconds: float, rows: int) -> None:
        self.hist["step"].observe(seconds)
        self.last_batch = rows

    def render(self, pool_stats: dict[str, Any], batcher: Any) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, value: float) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"])

        metric("surgery_requests_total", "counter", "Completion requests admitted.", self.requests.value)
        metric("surgery_generated_tokens_total", "counter", "Tokens generated.", self.tokens.value)
        metric("surgery_request_errors_total", "counter", "Requests answered with an error.", self.errors.value)
        metric("surgery_queue_depth", "gauge", "Requests waiting to join the batch.", len(batcher.waiting))
        metric("surgery_running_requests", "gauge", "Requests in the running batch.", len(batcher.running))
        metric("surgery_batch_size", "gauge", "Rows in the last decode step.", self.last_batch)
        for key, kind in (
            ("hits", "counter"),
            ("loads", "counter"),
            ("cpu_hits", "counter"),
            ("misses", "counter"),
            ("evictions", "counter"),
        ):
            metric(f"surgery_pool_{key}_total", kind, f"Adapter pool {key.replace('_', ' ')}.", pool_stats.get(key, 0))
        load = pool_stats.get("load_ms") or {}
        metric("surgery_pool_load_ms_p50", "gauge", "Median hub-to-slot load time (ms).", load.get("p50") or 0)
        metric("surgery_pool_load_ms_p99", "gauge", "p99 hub-to-slot load time (ms).", load.get("p99") or 0)
        for key, help in (
            ("ttft", "Time to first token."),
            ("itl", "Time between tokens of a request."),
            ("request", "Whole request."),
            ("step", "One decode step of the batch."),
        ):
            lines += self.hist[key].render(f"surgery_{key}_seconds", help)
        return "\n".join(lines) + "\n"
