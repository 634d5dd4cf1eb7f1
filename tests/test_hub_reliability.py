"""Reliability of the hub: kill -9 during pushes, concurrent pushers, and hypothesis-generated
malformed safetensors headers, manifests and refs (a clean RegistryError each, no crash, no hang).

The pushing processes are forked from one "zygote" subprocess that imported the library once,
so 30+ kills take seconds, not 30+ interpreter start-ups."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import surgery
from registry import Hub, IntegrityError, RegistryError, store
from registry.hub import FORMAT, manifest_digest
from registry.refs import parse

ZYGOTE = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
import surgery, registry
signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # children are reaped automatically
print("ready", flush=True)
for line in sys.stdin:
    root, name, n, log, seed = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            hub = registry.Hub(root)
            g = torch.Generator().manual_seed(int(seed))
            for i in range(int(n)):
                t = {f"l{j}.lora_A.weight": torch.randn(8, 256, generator=g) for j in range(4)}
                t.update({f"l{j}.lora_B.weight": torch.randn(256, 8, generator=g) for j in range(4)})
                d = surgery.Delta("lora", "x", {"r": 8}, t, "arch:test")
                ref = hub.push(d, name, meta={"seed": int(seed), "i": i})
                with open(log, "a") as f:
                    f.write(json.dumps({"version": ref.version, "digest": ref.digest,
                                        "sum": float(sum(v.double().sum() for v in t.values()))}) + "\n")
            with open(log, "a") as f:
                f.write(json.dumps({"done": True}) + "\n")
        finally:
            os._exit(0)
    print(pid, flush=True)
"""


class Zygote:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]

    def fork(self, root: Path, name: str, n: int, log: Path, seed: int) -> int:
        self.p.stdin.write(f"{root} {name} {n} {log} {seed}\n")  # type: ignore[union-attr]
        self.p.stdin.flush()  # type: ignore[union-attr]
        return int(self.p.stdout.readline())  # type: ignore[union-attr]

    def close(self) -> None:
        self.p.stdin.close()  # type: ignore[union-attr]
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()


@pytest.fixture(scope="module")
def zygote():  # type: ignore[no-untyped-def]
    z = Zygote()
    yield z
    z.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < end, f"process {pid} still running"
        time.sleep(0.005)


def log_lines(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]


def test_kill_9_during_pushes_leaves_a_clean_hub(zygote: Zygote, tmp_path: Path) -> None:
    root = tmp_path / "hub"
    Hub(root, create=True)
    rng = random.Random(1234)
    returned: list[dict] = []
    kills = 0
    for i in range(36):
        log = tmp_path / f"log{i}"
        pid = zygote.fork(root, "acme/k", 1000, log, i)
        time.sleep(rng.uniform(0.0, 0.06))
        try:
            os.kill(pid, signal.SIGKILL)
            kills += 1
        except ProcessLookupError:
            pass
        wait_gone(pid)
        returned += [x for x in log_lines(log) if "version" in x]
    assert kills >= 30
    hub = Hub(root)
    assert hub.verify() == []
    versions = [r.version for r in hub.versions("acme/k")] if hub.names() else []
    assert versions == list(range(1, len(versions) + 1)), "versions are contiguous"
    for x in returned:  # every push that returned is there, readable, as returned
        d = hub.pull(f"acme/k@{x['version']}")
        assert hub.resolve(f"acme/k@{x['version']}").digest == x["digest"]
        assert abs(float(sum(v.double().sum() for v in d.tensors.values())) - x["sum"]) < 1e-6
    for v in versions:  # nothing half-written is visible: every visible version reads
        hub.pull(f"acme/k@{v}", recheck=True)
    assert len({x["version"] for x in returned}) == len(returned), "no version returned twice"
    gc = hub.gc()
    print(
        f"kills {kills}, returned {len(returned)}, versions {len(versions)}, gc {len(gc['temp'])} temp files, "
        f"{len(gc['blobs'])} blobs"
    )
    assert gc["blobs"] == [] or all(b.startswith("sha256:") for b in gc["blobs"])
    assert list(hub.tmp.iterdir()) == [] and hub.verify() == []


def test_four_processes_push_one_name(zygote: Zygote, tmp_path: Path) -> None:
    root = tmp_path / "hub"
    Hub(root, create=True)
    logs = [tmp_path / f"log{i}" for i in range(4)]
    pids = [zygote.fork(root, "acme/c", 25, log, 100 + i) for i, log in enumerate(logs)]
    for pid in pids:
        wait_gone(pid, timeout=50)
    entries = [x for log in logs for x in log_lines(log)]
    assert sum(1 for x in entries if x.get("done")) == 4
    got = sorted(x["version"] for x in entries if "version" in x)
    hub = Hub(root)
    assert got == list(range(1, 101))
    assert [r.version for r in hub.versions("acme/c")] == list(range(1, 101))
    seeds = {}
    for r in hub.versions("acme/c"):
        hub.pull(r)
        m = hub.show(r)["meta"]
        seeds.setdefault(m["seed"], []).append(m["i"])
    assert {s: sorted(i) for s, i in seeds.items()} == {100 + k: list(range(25)) for k in range(4)}
    assert hub.verify() == []


# ----------------------------------------------------------------------------- hypothesis: malformed input


def _write_version(hub: Hub, name: str, version: int, blob: bytes, tensors: list, *, mutate=None) -> None:  # type: ignore[no-untyped-def]
    """Store `blob` (any bytes) with a manifest whose digests match it: only the parser stands guard."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    path = hub._blob_path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    chunk = 1 << 20
    chunks = [hashlib.sha256(blob[i : i + chunk]).hexdigest() for i in range(0, max(len(blob), 1), chunk)]
    man = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "method": "lora",
        "delta_name": "x",
        "config": {"r": 2},
        "base": "arch:x",
        "parent": None,
        "lineage": {},
        "created": "t",
        "user": "u",
        "meta": {},
        "blob": {"digest": digest, "size": len(blob), "chunk_size": chunk, "chunks": chunks},
        "tensors": tensors,
    }
    if mutate is not None:
        mutate(man)
    man["digest"] = manifest_digest(man)
    vdir = hub._name_dir(name) / "versions"
    vdir.mkdir(parents=True, exist_ok=True)
    (vdir / f"{version}.json").write_text(json.dumps(man))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)

header_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F99", "", "f32"]) | json_values,
        "shape": st.lists(st.integers(-3, 70), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-5, 300), min_size=0, max_size=3) | json_values,
    },
)
headers = st.one_of(
    st.dictionaries(st.text(max_size=10), header_entry | json_values, max_size=5),
    json_values,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=headers,
    data=st.binary(max_size=300),
    length_delta=st.sampled_from([0, 0, 0, 1, -1, 7, 2**40]),
    raw=st.none() | st.binary(max_size=64),
)
def test_malformed_safetensors_headers_raise_cleanly(
    tmp_path: Path, header, data: bytes, length_delta: int, raw: bytes | None
) -> None:  # type: ignore[no-untyped-def]
    if raw is not None:
        blob = raw
    else:
        h = json.dumps(header).encode()
        blob = max(0, len(h) + length_delta).to_bytes(8, "little") + h + data
    hub = Hub(tmp_path / f"h{hashlib.sha256(blob).hexdigest()[:12]}")
    tensors = (
        [[k, {"dtype": v.get("dtype"), "shape": v.get("shape")}] for k, v in header.items() if isinstance(v, dict)]
        if isinstance(header, dict) and raw is None
        else []
    )
    tensors = [
        t
        for t in tensors
        if isinstance(t[1]["dtype"], str)
        and t[1]["dtype"] in store.DTYPES
        and isinstance(t[1]["shape"], list)
        and all(type(d) is int and d >= 0 for d in t[1]["shape"])
    ]
    _write_version(hub, "fuzz/st", 1, blob, tensors)
    try:
        d = hub.pull("fuzz/st@1")
    except RegistryError:
        pass
    else:  # accepted: then it really is a consistent safetensors file
        from safetensors.torch import load

        ref = load(bytes(blob))
        assert set(ref) == set(d.tensors)
        for k in ref:
            assert torch.equal(ref[k], d.tensors[k])
    assert isinstance(hub.verify(), list)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["bytes", "json", "field", "drop"]),
    raw=st.binary(max_size=200),
    value=json_values,
    key=st.sampled_from(
        [
            "format",
            "name",
            "version",
            "method",
            "delta_name",
            "config",
            "base",
            "parent",
            "lineage",
            "created",
            "meta",
            "blob",
            "tensors",
            "digest",
        ]
    ),
    sub=st.sampled_from([None, "digest", "size", "chunk_size", "chunks"]),
    fix_digest=st.booleans(),
)
def test_malformed_manifests_raise_cleanly(
    tmp_path: Path,
    kind: str,
    raw: bytes,
    value,
    key: str,  # type: ignore[no-untyped-def]
    sub: str | None,
    fix_digest: bool,
) -> None:
    hub = Hub(tmp_path / "h")
    name = "fuzz/man"
    if not (hub._name_dir(name) / "versions" / "1.json").exists():
        d = surgery.Delta(
            "lora", "x", {"r": 2}, {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.ones(3, 2)}, "arch:x"
        )
        hub.push(d, name)
    path = hub._name_dir(name) / "versions" / "1.json"
    good = path.read_bytes()
    try:
        doc = json.loads(good)
        if kind == "bytes":
            path.write_bytes(raw)
        elif kind == "json":
            path.write_text(json.dumps(value))
        else:
            if kind == "drop":
                doc.pop(key, None)
            elif sub and key == "blob":
                doc["blob"][sub] = value
            else:
                doc[key] = value
            if fix_digest and key != "digest":
                try:
                    doc["digest"] = manifest_digest(doc)
                except (TypeError, ValueError):
                    pass
            path.write_text(json.dumps(doc))
        for call in (
            lambda: hub.pull(name, recheck=True),
            lambda: hub.show(f"{name}@1"),
            lambda: hub.versions(name),
            lambda: hub.history(name),
            lambda: hub.history(f"{name}@1"),
            lambda: hub.list(),
        ):
            try:
                call()
            except RegistryError:
                pass
        problems = hub.verify()
        changed = path.read_bytes() != good
        if changed and not (kind == "field" and json.loads(good).get(key) == value):
            assert problems, "a changed manifest is reported"
    finally:
        path.write_bytes(good)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ref=st.text(max_size=60)
    | st.binary(max_size=30).map(lambda b: b.decode("latin-1"))
    | st.from_regex(r"[a-zA-Z0-9./@:_-]{0,30}", fullmatch=True)
    | st.builds(lambda a, b: f"{a}@{b}", st.sampled_from(["acme/sql", "../x", "a/b"]), st.text(max_size=70))
)
def test_fuzzed_refs_raise_cleanly(tmp_path: Path, ref: str) -> None:
    hub = Hub(tmp_path / "h", create=True)
    if not hub.names():
        d = surgery.Delta(
            "lora", "x", {"r": 2}, {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.ones(3, 2)}, "arch:x"
        )
        hub.push(d, "acme/sql", alias="prod")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for call in (lambda: hub.pull(ref), lambda: hub.resolve(ref), lambda: hub.show(ref), lambda: hub.history(ref)):
        try:
            call()
        except RegistryError:
            pass
    try:
        parse(ref)
    except RegistryError:
        pass
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_integrity_error_is_raised_not_other_exceptions_for_blob_swap(tmp_path: Path) -> None:
    hub = Hub(tmp_path / "h")
    d1 = surgery.Delta(
        "lora", "x", {"r": 2}, {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.ones(3, 2)}, "arch:x"
    )
    d2 = surgery.Delta(
        "lora", "x", {"r": 2}, {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}, "arch:x"
    )
    r1, r2 = hub.push(d1, "a/b"), hub.push(d2, "a/b")
    b1, b2 = hub._blob_path(hub.show(r1)["blob"]["digest"]), hub._blob_path(hub.show(r2)["blob"]["digest"])
    data = b2.read_bytes()
    b1.write_bytes(data)  # same size, other content
    with pytest.raises(IntegrityError):
        hub.pull(r1)
    assert any(b1.name in p for p in hub.verify())
