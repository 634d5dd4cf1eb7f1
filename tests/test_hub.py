"""The hub: refs, push / pull, dedupe, versions, aliases, show / list, load (hot-swap), integrity, gc."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import registry
import surgery
from registry import BaseMismatchError, Hub, IntegrityError, NotFoundError, Ref, RefError, RegistryError
from registry.refs import parse


class Net(nn.Module):
    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(32, 16)
        if extra:
            self.l3 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def lora_model(seed: int = 1, name: str = "sql", extra: bool = False) -> nn.Module:
    m = Net(extra)
    surgery.inject(m, "lora", targets=["l1", "l2"], r=4, alpha=8, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return m


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    return Hub(tmp_path / "hub")


def blob_files(hub: Hub) -> list[Path]:
    return sorted(p for p in hub.blobs.rglob("*") if p.is_file())


def same_delta(a: surgery.Delta, b: surgery.Delta) -> None:
    assert (a.method, a.name, a.config, a.base) == (b.method, b.name, b.config, b.base)
    assert list(a.tensors) == list(b.tensors)
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]), k


# ----------------------------------------------------------------------------- refs


def test_ref_kinds() -> None:
    assert parse("acme/sql").kind == "latest"
    assert parse("acme/sql@latest").kind == "latest"
    assert (parse("acme/sql@3").kind, parse("acme/sql@3").value) == ("version", 3)
    assert (parse("acme/sql@prod").kind, parse("acme/sql@prod").value) == ("alias", "prod")
    assert (parse("acme/sql@sha256:ab12").kind, parse("acme/sql@sha256:ab12").value) == ("digest", "ab12")
    assert parse("a-1/b.c_d@x-y.z").name == "a-1/b.c_d"
    r = Ref("acme/sql", 3, "sha256:" + "0" * 64)
    assert repr(r) == f'Ref(name="acme/sql", version=3, digest="sha256:{"0" * 64}")'
    assert str(r) == "acme/sql@3"


BAD_REFS = [
    "",
    "sql",
    "/etc/passwd",
    "/abs/name",
    "../x",
    "a/..",
    "a/../b",
    "..",
    "a/b/c",
    "a//b",
    "/a/b",
    "a/b/",
    "A/b",
    "a/B",
    "a/b c",
    "a/b\x00",
    "a\\b/c",
    "a/.hidden",
    ".git/x",
    "a/-x",
    "x" * 97 + "/b",
    "a/" + "y" * 97,
    "a/b@",
    "a/b@0",
    "a/b@-1",
    "a/b@sha256:",
    "a/b@sha256:xyz",
    "a/b@sha256:ABCD",
    "a/b@sha256:" + "a" * 65,
    "a/b@@c",
    "a/b@1@2",
    "a/b@Prod",
    "a/b@../x",
    "a/b@sha256x",
    "a/b@" + "p" * 65,
    "ä/b",
    "a/b\n",
    "a/b@1 ",
    "a/b@99999999999999",
]


@pytest.mark.parametrize("bad", BAD_REFS)
def test_bad_refs_rejected_before_any_file_is_touched(bad: str, tmp_path: Path) -> None:
    hub = Hub(tmp_path / "hub")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(RefError):
        parse(bad)
    for call in (lambda: hub.pull(bad), lambda: hub.show(bad), lambda: hub.history(bad)):
        with pytest.raises(RefError):
            call()
    if "@" not in bad:
        with pytest.raises(RefError):
            hub.push(lora_model(), bad, adapter="sql")
        with pytest.raises(RefError):
            hub.versions(bad)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.from_regex(r"[a-z0-9._/@:-]{0,40}", fullmatch=True))
def test_any_string_parses_or_raises_ref_error(s: str) -> None:
    try:
        spec = parse(s)
    except RefError:
        return
    org, name = spec.name.split("/")
    for part in (org, name):
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", part) and ".." not in part and len(part) <= 96
    assert spec.kind in {"latest", "version", "alias", "digest"}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}/[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True))
def test_valid_names_stay_inside_the_hub(tmp_path: Path, name: str) -> None:
    hub = Hub(tmp_path / "h")
    try:
        d = hub._name_dir(name)
    except RefError:
        assert ".." in name
        return
    assert d.resolve().is_relative_to((tmp_path / "h" / "names").resolve())


def test_ref_errors_are_surgery_errors() -> None:
    for cls in (RefError, IntegrityError, NotFoundError, BaseMismatchError):
        assert issubclass(cls, RegistryError) and issubclass(cls, surgery.SurgeryError)


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SURGERY_HUB", str(tmp_path / "env-hub"))
    assert Hub().root == tmp_path / "env-hub"
    monkeypatch.delenv("SURGERY_HUB")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert Hub().root == tmp_path / "cache" / "model-surgery" / "hub"
    assert Hub(tmp_path / "explicit").root == tmp_path / "explicit"


# ----------------------------------------------------------------------------- push / pull


def test_push_pull_round_trip(hub: Hub) -> None:
    m = lora_model()
    ref = hub.push(m, "acme/sql", adapter="sql", meta={"dataset": "spider", "eval": {"acc": 0.71}})
    assert ref.name == "acme/sql" and ref.version == 1 and re.fullmatch(r"sha256:[0-9a-f]{64}", ref.digest)
    got = hub.pull("acme/sql")
    same_delta(got, surgery.delta(m, "sql"))
    assert got.lineage["hub"]["version"] == 1 and got.lineage["hub"]["digest"] == ref.digest
    for r in ("acme/sql@1", ref, f"acme/sql@{ref.digest[:14]}", ref.digest.replace("sha256:", "acme/sql@sha256:")):
        same_delta(hub.pull(r), got)
    same_delta(hub.pull(ref, recheck=True), got)
    # a Delta pushes as well as a model; other dtypes survive
    d = surgery.delta(m, "sql")
    d.tensors = {k: v.to(torch.bfloat16) for k, v in d.tensors.items()}
    hub.push(d, "acme/sql")
    same_delta(hub.pull("acme/sql@2"), d)
    assert hub.verify() == []


def test_same_tensors_store_no_new_bytes(hub: Hub) -> None:
    m = lora_model()
    r1 = hub.push(m, "acme/sql", adapter="sql")
    assert len(blob_files(hub)) == 1
    r2 = hub.push(m, "acme/sql", adapter="sql")
    r3 = hub.push(m, "other/name", adapter="sql")
    assert len(blob_files(hub)) == 1, "same tensors: no new blob"
    assert (r1.version, r2.version, r3.version) == (1, 2, 1) and r1.digest != r2.digest
    assert hub.show(r1)["blob"]["digest"] == hub.show(r2)["blob"]["digest"]
    hub.push(lora_model(seed=2), "acme/sql", adapter="sql")
    assert len(blob_files(hub)) == 2
    assert list(hub.tmp.iterdir()) == []


def test_versions_count_up_and_are_never_reused(hub: Hub) -> None:
    for i in range(3):
        assert hub.push(lora_model(seed=i), "acme/sql", adapter="sql").version == i + 1
    assert [r.version for r in hub.versions("acme/sql")] == [1, 2, 3]
    assert [r.digest for r in hub.versions("acme/sql")] == [hub.resolve(f"acme/sql@{v}").digest for v in (1, 2, 3)]
    hub.gc()
    assert hub.push(lora_model(seed=9), "acme/sql", adapter="sql").version == 4
    assert hub.resolve("acme/sql").version == 4


def test_parent_and_history_lineage(hub: Hub) -> None:
    hub.push(lora_model(1), "acme/sql", adapter="sql")
    hub.push(lora_model(2), "acme/sql", adapter="sql", parent=1)
    r3 = hub.push(lora_model(3), "acme/sql", adapter="sql", parent="acme/sql@2")
    chain = hub.history(r3)
    assert [c["version"] for c in chain] == [3, 2, 1]
    assert hub.show("acme/sql@3")["parent"]["version"] == 2
    with pytest.raises(NotFoundError):
        hub.push(lora_model(4), "acme/sql", adapter="sql", parent=42)


def test_aliases_and_history(hub: Hub) -> None:
    hub.push(lora_model(1), "acme/sql", adapter="sql", alias="staging")
    hub.push(lora_model(2), "acme/sql", adapter="sql")
    assert hub.aliases("acme/sql") == {"staging": 1}
    assert hub.alias("acme/sql", "prod", version=1).version == 1
    hub.alias("acme/sql", "prod", version=2)
    hub.alias("acme/sql", "staging")  # latest
    assert hub.aliases("acme/sql") == {"staging": 2, "prod": 2}
    assert hub.resolve("acme/sql@prod").version == 2
    moves = hub.history("acme/sql@prod")
    assert [(m["previous"], m["version"]) for m in moves] == [(None, 1), (1, 2)]
    assert all("time" in m for m in moves)
    events = hub.history("acme/sql")
    assert [e["event"] for e in events].count("push") == 2 and [e["event"] for e in events].count("alias") == 4
    for bad in ("Prod", "1", "latest", "sha256x", "a/b", "", "../x"):
        with pytest.raises(RefError):
            hub.alias("acme/sql", bad, version=1)
    with pytest.raises(NotFoundError):
        hub.alias("acme/sql", "prod", version=7)
    with pytest.raises(NotFoundError):
        hub.alias("acme/none", "prod", version=1)
    with pytest.raises(NotFoundError, match="no alias 'canary'"):
        hub.pull("acme/sql@canary")


def test_show_and_list(hub: Hub) -> None:
    hub.push(lora_model(1), "acme/sql", adapter="sql", alias="prod", meta={"eval": {"acc": 0.71}})
    hub.push(lora_model(1), "zeta/x", adapter="sql")
    s = hub.show("acme/sql@prod")
    assert s["ref"] == "acme/sql@1" and s["aliases"] == ["prod"] and s["meta"] == {"eval": {"acc": 0.71}}
    assert s["method"] == "lora" and s["config"]["r"] == 4 and s["base"] == surgery.fingerprint(Net())
    assert s["nbytes"] > 0 and {k for k, _ in s["tensors"]} == set(surgery.delta(lora_model(), "sql").tensors)
    s["meta"]["eval"]["acc"] = 0  # a copy: the hub's cached manifest is untouched
    assert hub.show("acme/sql@1")["meta"] == {"eval": {"acc": 0.71}}
    assert [str(r) for r in hub.list()] == ["acme/sql@1", "zeta/x@1"]
    (hub.root / "empty").mkdir()  # an existing empty folder is an empty hub
    assert Hub(hub.root / "empty").list() == []
    with pytest.raises(NotFoundError, match="no hub at .* push creates one"):  # a missing one is an error
        Hub(hub.root / "typo").list()
    assert not (hub.root / "typo").exists()


def test_not_found_messages(hub: Hub) -> None:
    with pytest.raises(NotFoundError, match="no hub at .*push creates one"):  # nothing pushed yet: no folder
        hub.pull("acme/none")
    hub.push(lora_model(), "acme/sql", adapter="sql")
    with pytest.raises(NotFoundError, match="push one"):
        hub.pull("acme/none")
    with pytest.raises(NotFoundError, match="no version 5"):
        hub.pull("acme/sql@5")
    with pytest.raises(NotFoundError, match="sha256:ffff"):
        hub.pull("acme/sql@sha256:ffff")
    with pytest.raises(NotFoundError):
        hub.versions("acme/none")


def test_bad_push_arguments(hub: Hub) -> None:
    m = lora_model()
    with pytest.raises(RegistryError, match="JSON"):
        hub.push(m, "acme/sql", adapter="sql", meta={"x": object()})
    with pytest.raises(RegistryError, match="JSON"):
        hub.push(m, "acme/sql", adapter="sql", meta={"x": float("nan")})
    with pytest.raises(RegistryError):
        hub.push("not a model", "acme/sql")  # type: ignore[arg-type]
    with pytest.raises(RefError):
        hub.push(m, "acme/sql", adapter="sql", alias="Bad Alias")
    with pytest.raises(surgery.SurgeryError):
        hub.push(m, "acme/sql", adapter="nope")
    assert not (hub.names_dir / "acme").exists() or hub.names() == []


# ----------------------------------------------------------------------------- load


def test_load_injects_then_hot_swaps_in_place(hub: Hub) -> None:
    src1, src2 = lora_model(1), lora_model(2)
    hub.push(src1, "acme/sql", adapter="sql")
    hub.push(src2, "acme/sql", adapter="sql", alias="prod")
    target = Net()
    x = torch.randn(3, 16)
    hub.load(target, "acme/sql@1", as_name="live")
    assert surgery.names(target) == ["live"]
    with torch.no_grad():
        assert torch.allclose(target(x), src1(x), atol=1e-6)
    params = {n: p for n, p in target.named_parameters() if "lora" in n}
    modules = [id(m) for m in target.modules()]
    hub.load(target, "acme/sql@prod", as_name="live")
    assert [id(m) for m in target.modules()] == modules, "hot-swap reuses the modules"
    assert all(p is dict(target.named_parameters())[n] for n, p in params.items())
    with torch.no_grad():
        assert torch.allclose(target(x), src2(x), atol=1e-6)
    hub.load(target, "acme/sql@1")  # its own name: a second delta
    assert sorted(surgery.names(target)) == ["live", "sql"]


def test_load_refuses_another_base_showing_both(hub: Hub) -> None:
    hub.push(lora_model(1), "acme/sql", adapter="sql")
    other = Net(extra=True)
    fp = surgery.fingerprint(other)
    with pytest.raises(BaseMismatchError) as e:
        hub.load(other, "acme/sql")
    assert fp in str(e.value) and surgery.fingerprint(Net()) in str(e.value) and "allow_other_base" in str(e.value)
    assert surgery.names(other) == []
    assert isinstance(e.value, surgery.DeltaMismatchError)
    hub.load(other, "acme/sql", allow_other_base=True)
    assert surgery.names(other) == ["sql"]


# ----------------------------------------------------------------------------- integrity, verify, gc


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_flipped_byte_raises_and_verify_reports(hub: Hub) -> None:
    ref = hub.push(lora_model(1), "acme/sql", adapter="sql")
    hub.pull(ref)  # checked once: a later change must still be caught
    (blob,) = blob_files(hub)
    flip_byte(blob, blob.stat().st_size - 3)
    with pytest.raises(IntegrityError) as e:
        hub.pull("acme/sql")
    msg = str(e.value)
    assert blob.name in msg and "acme/sql@1" in msg and "corrupted" in msg
    problems = hub.verify()
    assert problems and all(blob.name in p for p in problems)
    with pytest.raises(IntegrityError):
        Hub(hub.root).pull("acme/sql@1")  # another Hub object: nothing cached
    with pytest.raises(IntegrityError):
        hub.load(Net(), "acme/sql@1")


def test_header_byte_flip_and_truncation(hub: Hub) -> None:
    hub.push(lora_model(1), "acme/sql", adapter="sql")
    (blob,) = blob_files(hub)
    flip_byte(blob, 20)
    with pytest.raises(IntegrityError, match="corrupted"):
        hub.pull("acme/sql")
    data = blob.read_bytes()
    blob.write_bytes(data[:-10])
    with pytest.raises(IntegrityError, match="bytes but the manifest records"):
        hub.pull("acme/sql")
    blob.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        hub.pull("acme/sql")
    assert any("missing" in p for p in hub.verify())


def test_verify_lists_every_problem(hub: Hub) -> None:
    for i in range(3):
        hub.push(lora_model(i), f"acme/n{i}", adapter="sql", alias="prod")
    blobs = blob_files(hub)
    flip_byte(blobs[0], 100)
    flip_byte(blobs[1], 200)
    man = hub.root / "names" / "acme" / "n2" / "versions" / "1.json"
    doc = json.loads(man.read_text())
    doc["meta"] = {"tampered": True}
    man.write_text(json.dumps(doc))
    (hub.blobs / "zz").mkdir()
    (hub.blobs / "zz" / "junk").write_bytes(b"x")
    problems = hub.verify()
    assert len(problems) >= 4, problems
    assert sum("corrupted" in p for p in problems) >= 2
    assert any("n2@1" in p and "hashes to" in p for p in problems)
    assert any("stray" in p for p in problems)


def test_gc_removes_unreferenced_blobs_and_temp_files(hub: Hub) -> None:
    hub.push(lora_model(1), "acme/sql", adapter="sql")
    (keep,) = blob_files(hub)
    stray = hub.blobs / "ab" / ("ab" + "0" * 62)
    stray.parent.mkdir()
    stray.write_bytes(b"old")
    (hub.tmp / "blob.123.1.abcd.tmp").write_bytes(b"half written")
    out = hub.gc()
    assert out["blobs"] == ["sha256:" + stray.name] and out["temp"] == ["blob.123.1.abcd.tmp"]
    assert out["bytes"] == 3 + len(b"half written")
    assert blob_files(hub) == [keep] and hub.verify() == []
    assert hub.gc()["blobs"] == []


def test_gc_keeps_blobs_when_a_manifest_is_unreadable(hub: Hub) -> None:
    hub.push(lora_model(1), "acme/sql", adapter="sql")
    (hub.root / "names" / "acme" / "sql" / "versions" / "1.json").write_text("{not json")
    out = hub.gc()
    assert out["blobs"] == [] and out["skipped"] and len(blob_files(hub)) == 1


# ----------------------------------------------------------------------------- PEFT / HF boundary


def test_registry_exports() -> None:
    for n in ("Hub", "Ref", "RegistryError", "RefError", "IntegrityError", "NotFoundError"):
        assert hasattr(registry, n)
    with pytest.raises(AttributeError):
        registry.no_such_thing  # noqa: B018


@pytest.mark.skipif(importlib.util.find_spec("registry.peft_format") is None, reason="registry.peft_format absent")
def test_export_import_peft_round_trip(hub: Hub, tmp_path: Path) -> None:
    m = lora_model(1)
    hub.push(m, "acme/sql", adapter="sql")
    out = hub.export_peft("acme/sql@1", tmp_path / "peft")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    r = hub.import_peft(out, "acme/back")
    back, orig = hub.pull(r), surgery.delta(m, "sql")
    assert set(back.tensors) == set(orig.tensors)
    for k in orig.tensors:
        assert torch.equal(back.tensors[k], orig.tensors[k])
    assert callable(registry.save_peft) and callable(registry.load_peft)


def test_no_pickle_in_registry() -> None:
    root = Path(registry.__file__).parent
    for f in ("hub.py", "store.py", "refs.py", "errors.py"):
        text = (root / f).read_text()
        assert "import pickle" not in text and "torch.load(" not in text, f
    assert os.sep not in "x"
