"""Hub `extra=`: tensors (an EWC state) stored as their own content-addressed blob next to a delta,
read back verified by `hub.extra`, refused before anything is written when bad; pull, verify, gc, show."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
from registry import Hub, IntegrityError, NotFoundError, RegistryError, cli
from surgery.recipes.ewc import EWC


def model_with_lora() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    surgery.inject(m, "lora", targets=["0", "2"], r=2, name="a")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora" in n:
                p.normal_(0, 0.1)
    return m


def data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 10, generator=g)
    return [(x[:8], torch.randint(0, 3, (8,), generator=g)), (x[8:], torch.randint(0, 3, (8,), generator=g))]


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    return Hub(tmp_path / "hub")


def files(hub: Hub) -> list[Path]:
    return sorted(p for p in hub.root.rglob("*") if p.is_file() and p.suffix != ".lock")


def test_push_extra_round_trip_and_the_delta_unchanged(hub: Hub) -> None:
    model = model_with_lora()
    ewc = EWC(model, data(), lam=5.0)
    plain = hub.push(model, "acme/plain", adapter="a")
    ref = hub.push(model, "acme/a", adapter="a", extra=ewc.state())
    same, got = hub.pull(plain), hub.pull(ref)
    assert list(same.tensors) == list(got.tensors)
    assert all(torch.equal(same.tensors[k], got.tensors[k]) for k in got.tensors)
    assert hub.show(ref)["blob"] == hub.show(plain)["blob"]  # the delta's blob is the same content
    back = hub.extra(ref)
    state = ewc.state()
    assert back.keys() == state.keys() and back["__meta__"] == state["__meta__"]
    assert all(torch.equal(back[k], state[k]) for k in state if k != "__meta__")
    model2 = model_with_lora()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(0.01)
    restored = EWC.from_state(model2, back)
    torch.testing.assert_close(restored.penalty(model2), ewc.penalty(model2))
    assert restored.penalty(model2).item() > 0
    with pytest.raises(NotFoundError, match="has no extra tensors"):
        hub.extra(plain)


def test_extra_is_a_content_addressed_blob_named_in_the_manifest(hub: Hub) -> None:
    model = model_with_lora()
    state = EWC(model, data()).state()
    ref = hub.push(model, "acme/a", adapter="a", extra=state)
    man = hub.show(ref)
    x = man["extra"]
    path = hub.blobs / x["blob"]["digest"][7:9] / x["blob"]["digest"][7:]
    assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == x["blob"]["digest"]
    assert x["meta"] == state["__meta__"] and [k for k, _ in x["tensors"]] == [k for k in state if k != "__meta__"]
    blobs = len(list(hub.blobs.rglob("*")))
    again = hub.push(model, "acme/a", adapter="a", extra=hub.extra(ref))  # read-back tensors push back
    assert len(list(hub.blobs.rglob("*"))) == blobs  # both blobs deduplicated
    assert hub.show(again)["extra"]["blob"] == x["blob"]
    assert hub.extra(again, recheck=True).keys() == state.keys()
    only = hub.push(model, "acme/b", adapter="a", extra={"w": torch.ones(3)})  # no meta: none comes back
    assert list(hub.extra(only)) == ["w"] and hub.show(only)["extra"]["meta"] == {}


def test_reading_the_extra_verifies_its_digest_and_verify_gc_know_it(hub: Hub) -> None:
    model = model_with_lora()
    ref = hub.push(model, "acme/a", adapter="a", extra=EWC(model, data()).state())
    assert hub.verify() == [] and hub.gc()["blobs"] == []  # gc keeps the extra blob
    x = hub.show(ref)["extra"]["blob"]["digest"]
    path = hub.blobs / x[7:9] / x[7:]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=r"\(extra\).*corrupted"):
        Hub(hub.root).extra(ref)
    hub.pull(ref, recheck=True)  # the delta's own blob is intact
    problems = hub.verify()
    assert len(problems) == 1 and "(extra)" in problems[0] and "corrupted" in problems[0]
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        Hub(hub.root).extra(ref)


def test_a_tampered_or_malformed_extra_in_the_manifest_is_refused(hub: Hub) -> None:
    model = model_with_lora()
    ref = hub.push(model, "acme/a", adapter="a", extra={"w": torch.ones(3), "__meta__": {"k": 1}})
    mpath = hub.root / "names" / "acme" / "a" / "versions" / "1.json"
    man = json.loads(mpath.read_text())
    man["extra"]["meta"] = {"k": 2}
    mpath.write_text(json.dumps(man))
    with pytest.raises(IntegrityError, match="hashes to"):
        Hub(hub.root).extra(ref)
    from registry.hub import manifest_digest

    man["extra"] = {"blob": man["extra"]["blob"], "tensors": man["extra"]["tensors"]}  # meta dropped, re-signed
    man["digest"] = manifest_digest(man)
    mpath.write_text(json.dumps(man))
    with pytest.raises(IntegrityError, match="extra.meta"):
        Hub(hub.root).pull("acme/a@1")


@pytest.mark.parametrize(
    "extra, words",
    [
        ([torch.ones(2)], "must be a dict"),
        ({"w": [1.0, 2.0]}, "'w' is list, not a tensor"),
        ({"w": torch.tensor([1.0, float("nan")])}, "'w' holds NaN or infinite"),
        ({"w": torch.tensor([float("inf")], dtype=torch.bfloat16)}, "NaN or infinite"),
        ({"__meta__": {"a": 1}}, "no tensors"),
        ({"w": torch.ones(1), "__meta__": {"a": {1, 2}}}, "'__meta__' must be a dict of JSON values"),
        ({"w": torch.ones(1), "__meta__": {"a": float("nan")}}, "no NaN"),
        ({"w": torch.ones(1), "__meta__": "x"}, "'__meta__' must be a dict"),
        ({"__metadata__": torch.ones(1)}, "reserved"),
        ({"w": torch.ones(1, dtype=torch.complex64)}, "complex64, not a tensor of a dtype"),
    ],
)
def test_a_bad_extra_is_refused_before_anything_is_written(hub: Hub, extra, words) -> None:
    with pytest.raises(RegistryError, match=words):
        hub.push(model_with_lora(), "acme/a", adapter="a", extra=extra)
    assert not hub.root.exists()
    hub.push(model_with_lora(), "acme/a", adapter="a")
    before = files(hub)
    with pytest.raises(RegistryError, match=words):
        hub.push(model_with_lora(), "acme/a", adapter="a", extra=extra)
    assert files(hub) == before and [r.version for r in hub.versions("acme/a")] == [1]


def test_cli_show_with_an_extra(hub: Hub, capsys) -> None:
    model = model_with_lora()
    ref = hub.push(model, "acme/a", adapter="a", extra=EWC(model, data()).state())
    assert cli.main(["hub", "--hub", str(hub.root), "show", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "acme/a@1" in out and "lora" in out
    assert "extra" in out and "surgery.EWC/1" in out  # the text view names the extra tensors and their meta
    assert cli.main(["hub", "--hub", str(hub.root), "--json", "show", "acme/a"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["extra"]["meta"]["kind"] == "surgery.EWC/1"
    assert cli.main(["hub", "--hub", str(hub.root), "verify"]) == 0
