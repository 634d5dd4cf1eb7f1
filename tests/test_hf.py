"""The Hugging Face Hub transfer, tested at the `huggingface_hub` API boundary (no network here):
the calls made, the exact files uploaded, the revision pinned to a sha, HF_HUB_OFFLINE honoured."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub as hfh
import pytest
import torch
from _helpers import hf_fakes_only, randomize, run  # noqa: F401  (hf_fakes_only: a fixture)
from models import batch_for, tiny_llama

import surgery
from registry import hf as rhf
from registry.hf import MANIFEST_NAME, HfTransferError, pull_hf, push_hf
from registry.peft_format import CONFIG_NAME, WEIGHTS_NAME, save_peft_delta

Ref = namedtuple("Ref", "name version digest")


pytestmark = pytest.mark.usefixtures("hf_fakes_only")


class FakeHub:
    """The three reads push_hf uses and the push pull_hf uses, nothing more."""

    def __init__(self):
        self.versions: dict[str, list[tuple[surgery.Delta, dict]]] = {}

    def push(self, delta, name, meta=None):
        vs = self.versions.setdefault(name, [])
        vs.append((delta, dict(meta or {})))
        return self.resolve(f"{name}@{len(vs)}")

    def resolve(self, ref):
        name, _, v = ref.partition("@")
        version = int(v) if v else len(self.versions[name])
        delta = self.versions[name][version - 1][0]
        h = hashlib.sha256()
        for k, t in sorted(delta.tensors.items()):
            h.update(k.encode() + t.numpy().tobytes())
        return Ref(name, version, "sha256:" + h.hexdigest())

    def show(self, ref):
        r = self.resolve(ref)
        delta, meta = self.versions[r.name][r.version - 1]
        return {
            "name": r.name,
            "version": r.version,
            "digest": r.digest,
            "method": delta.method,
            "config": delta.config,
            "base": delta.base,
            "meta": meta,
            "lineage": delta.lineage,
        }

    def pull(self, ref):
        r = self.resolve(ref)
        return self.versions[r.name][r.version - 1][0]


class FakeApi:
    """Records every call; keeps commits (name -> bytes) by sha and tags."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", (repo_id,), kw))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kw):
        self.calls.append(("create_commit", (repo_id,), kw))
        files = {}
        for op in operations:
            assert isinstance(op, hfh.CommitOperationAdd)
            with op.as_file() as f:
                files[op.path_in_repo] = f.read()
        sha = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        self.commits[sha] = files
        self.refs["main"] = sha
        return SimpleNamespace(oid=sha, commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}")

    def create_tag(self, repo_id, **kw):
        self.calls.append(("create_tag", (repo_id,), kw))
        self.refs[kw["tag"]] = kw["revision"]

    def model_info(self, repo_id, revision=None, **kw):
        self.calls.append(("model_info", (repo_id,), {"revision": revision, **kw}))
        sha = self.refs.get(revision, revision)
        return SimpleNamespace(sha=sha, siblings=[SimpleNamespace(rfilename=n) for n in self.commits[sha]])


@pytest.fixture
def fake_download(monkeypatch, tmp_path):
    """hf_hub_download served from the FakeApi's commits, through a folder per sha."""
    calls = []

    def install(api: FakeApi):
        def download(repo_id, filename, *, revision=None, **kw):
            calls.append({"repo_id": repo_id, "filename": filename, "revision": revision, **kw})
            files = api.commits.get(revision)
            if files is None or filename not in files:
                raise hfh.errors.EntryNotFoundError(f"{filename} not in {revision}")
            p = tmp_path / "served" / revision / filename
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(files[filename])
            return str(p)

        monkeypatch.setattr(hfh, "hf_hub_download", download)
        return calls

    return install


def _trained_delta(name="sql"):
    model = tiny_llama()
    surgery.inject(model, "lora", targets=["q_proj", "v_proj"], r=4, alpha=8, alpha_pattern={"v_proj": 16}, name=name)
    randomize(model, name, std=0.2)
    return model, surgery.delta(model, name)


def test_push_hf_one_commit_exact_files_and_tag(tmp_path):
    hub, api = FakeHub(), FakeApi()
    model, delta = _trained_delta()
    hub.push(delta, "acme/sql", meta={"dataset": "spider"})
    hub.push(delta, "acme/sql", meta={"dataset": "spider", "again": True})
    sha = push_hf(hub, "acme/sql@2", "acme/sql-lora", token="tok", private=True, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit", "create_tag"]
    _, args, kw = api.calls[0]
    assert args == ("acme/sql-lora",) and kw["exist_ok"] is True and kw["private"] is True and kw["token"] == "tok"
    _, _, kw = api.calls[1]
    assert "acme/sql@2" in kw["commit_message"] and kw["token"] == "tok"
    _, _, kw = api.calls[2]
    assert kw["tag"] == "v2" and kw["revision"] == sha
    files = api.commits[sha]
    assert sorted(files) == sorted([CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME])
    # the exact bytes: what save_peft_delta writes for this delta, and the manifest as hub.show gives it
    save_peft_delta(delta, tmp_path / "want")
    assert files[WEIGHTS_NAME] == (tmp_path / "want" / WEIGHTS_NAME).read_bytes()
    assert files[CONFIG_NAME] == (tmp_path / "want" / CONFIG_NAME).read_bytes()
    assert json.loads(files[MANIFEST_NAME]) == json.loads(json.dumps(hub.show("acme/sql@2")))
    # and PEFT reads what was uploaded with our outputs
    peft = pytest.importorskip("peft")
    d = tmp_path / "uploaded"
    d.mkdir()
    for n, b in files.items():
        (d / n).write_bytes(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(d)).eval()
    x = batch_for(model)
    torch.testing.assert_close(run(pm, x), run(model, x), atol=1e-5, rtol=1e-5)


def test_pull_hf_resolves_revision_to_sha_and_records_lineage(fake_download):
    hub, api = FakeHub(), FakeApi()
    calls = fake_download(api)
    model, delta = _trained_delta()
    hub.push(delta, "acme/sql")
    sha = push_hf(hub, "acme/sql", "Acme/SQL-LoRA", api=api)
    other = FakeHub()
    ref = pull_hf(other, "Acme/SQL-LoRA", revision="v1", api=api)
    assert api.calls[-1] == ("model_info", ("Acme/SQL-LoRA",), {"revision": "v1", "token": None})
    assert {c["filename"] for c in calls} == {CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME}
    assert all(c["revision"] == sha for c in calls)  # pinned to the commit, not the tag
    assert ref == Ref("acme/sql-lora", 1, hub.resolve("acme/sql").digest)  # the same tensors
    got, meta = other.versions["acme/sql-lora"][0]
    assert meta == {"hf_repo": "Acme/SQL-LoRA", "hf_revision": "v1", "hf_sha": sha}
    assert got.lineage["hf_sha"] == sha and got.lineage["hf_repo"] == "Acme/SQL-LoRA"
    # the manifest brings back what PEFT's config cannot say: the base fingerprint and our config
    assert got.base == delta.base == surgery.fingerprint(model)
    assert got.config == delta.config
    assert got.tensors.keys() == delta.tensors.keys()
    for k in delta.tensors:
        assert torch.equal(got.tensors[k], delta.tensors[k])
    fresh = tiny_llama()
    surgery.apply(fresh, got)  # no allow_other_base needed: the fingerprint travelled
    x = batch_for(fresh)
    torch.testing.assert_close(run(fresh, x), run(model, x), atol=1e-6, rtol=1e-6)


def test_pull_hf_plain_peft_repo_without_manifest(fake_download, tmp_path):
    peft = pytest.importorskip("peft")
    api = FakeApi()
    fake_download(api)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"])).eval()
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.normal_()
        pm.save_pretrained(str(tmp_path / "p"))
    files = {n: (tmp_path / "p" / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME, "README.md")}
    api.commits["a" * 40] = files
    api.refs["main"] = "a" * 40
    hub = FakeHub()
    ref = pull_hf(hub, "someone/k-lora", api=api, name="acme/k")
    assert ref.name == "acme/k"
    got, meta = hub.versions["acme/k"][0]
    assert got.base == "" and meta["hf_sha"] == "a" * 40
    model = tiny_llama()
    surgery.apply(model, got, allow_other_base=True)
    x = batch_for(model)
    torch.testing.assert_close(run(model, x), run(pm, x), atol=1e-5, rtol=1e-5)


def test_pull_hf_missing_files_is_a_clean_error(fake_download):
    api = FakeApi()
    fake_download(api)
    api.commits["b" * 40] = {"adapter_config.json": b"{}", "adapter_model.bin": b"pickle"}
    api.refs["main"] = "b" * 40
    with pytest.raises(HfTransferError, match="adapter_model.safetensors.*pickle"):
        pull_hf(FakeHub(), "x/y", api=api)


def test_pull_hf_offline_with_nothing_cached_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfh.constants, "HF_HUB_OFFLINE", True)

    class NoApi:
        def __getattr__(self, name):
            raise AssertionError(f"offline: the api must not be called ({name})")

    with pytest.raises(HfTransferError, match="HF_HUB_OFFLINE"):
        pull_hf(FakeHub(), "acme/sql-lora", revision="v3", api=NoApi(), cache_dir=tmp_path / "cache")
    with pytest.raises(HfTransferError, match="HF_HUB_OFFLINE"):  # a sha: resolved, but the files are not cached
        pull_hf(FakeHub(), "acme/sql-lora", revision="c" * 40, api=NoApi(), cache_dir=tmp_path / "cache")


def test_pull_hf_offline_reads_the_real_cache(monkeypatch, tmp_path):
    """With HF_HUB_OFFLINE=1 the real hf_hub_download serves a revision from its cache layout."""
    hub, api = FakeHub(), FakeApi()
    model, delta = _trained_delta()
    hub.push(delta, "acme/sql")
    sha = push_hf(hub, "acme/sql", "acme/sql-lora", api=api)
    cache = tmp_path / "cache"
    repo = cache / "models--acme--sql-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "v1").write_text(sha)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for n, b in api.commits[sha].items():
        (snap / n).write_bytes(b)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfh.constants, "HF_HUB_OFFLINE", True)
    other = FakeHub()
    ref = pull_hf(other, "acme/sql-lora", revision="v1", name="acme/sql", cache_dir=cache)
    assert ref.version == 1
    got, meta = other.versions["acme/sql"][0]
    assert meta["hf_sha"] == sha and got.base == delta.base
    with pytest.raises(HfTransferError, match="not in the local Hugging Face cache"):
        pull_hf(other, "acme/sql-lora", revision="main", cache_dir=cache)


def test_progress_bar_only_after_the_delay(capsys):
    with rhf._Progress("quick", 100) as p:
        p.update(100)
    assert p.bar is None and capsys.readouterr().err == ""
    with rhf._Progress("slow", 100, delay=0.05) as p:
        time.sleep(0.3)
        p.update(100)
    assert p.bar is not None and "slow" in capsys.readouterr().err


def test_push_hf_tag_conflict_is_a_clean_error():
    hub = FakeHub()
    hub.push(_trained_delta()[1], "acme/sql")

    class Conflict(FakeApi):
        def create_tag(self, repo_id, **kw):
            err = hfh.errors.HfHubHTTPError.__new__(hfh.errors.HfHubHTTPError)
            Exception.__init__(err, "409 Conflict: tag already exists")
            err.response = SimpleNamespace(status_code=409)
            raise err

    with pytest.raises(HfTransferError, match="tag 'v1' already exists"):
        push_hf(hub, "acme/sql", "acme/sql-lora", api=Conflict())


def test_name_from_repo():
    assert rhf._name_from_repo("Acme/SQL_LoRA v2") == "acme/sql_lora-v2"
    assert rhf._name_from_repo("gpt2-lora") == "hf/gpt2-lora"


def test_with_the_real_hub(fake_download, tmp_path):
    """If registry.Hub exists: push to HF from it and pull back into it."""
    try:
        from registry import Hub
    except ImportError:
        pytest.skip("registry.Hub is not there yet")
    api = FakeApi()
    fake_download(api)
    hub = Hub(tmp_path / "hub")
    model, delta = _trained_delta()
    r = hub.push(delta, "acme/sql")
    sha = push_hf(hub, f"acme/sql@{r.version}", "acme/sql-lora", api=api)
    assert sorted(api.commits[sha]) == sorted([CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME])
    ref = pull_hf(hub, "acme/sql-lora", revision=f"v{r.version}", name="acme/sql-back", api=api)
    back = hub.pull(f"{ref.name}@{ref.version}")
    for k in delta.tensors:
        assert torch.equal(back.tensors[k], delta.tensors[k])
    assert Path(tmp_path / "hub").exists()


@pytest.mark.parametrize(
    "method, kw", [("ia3", {}), ("dora", {"r": 4}), ("vera", {"r": 8}), ("loha", {"r": 4}), ("lokr", {"r": 4})]
)
def test_push_hf_and_pull_hf_every_peft_method(fake_download, tmp_path, method, kw):
    """Each method with a PEFT layout goes to the Hugging Face Hub and back: PEFT reads the commit
    with our outputs, and pull_hf gives the very tensors and outputs again."""
    peft = pytest.importorskip("peft")
    model = tiny_llama().eval()
    surgery.inject(model, method, name="t", **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ad in surgery.engine.adapters(model, "t").values():
            for t in ad.parameters():
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
    delta = surgery.delta(model, "t")
    hub, api = FakeHub(), FakeApi()
    fake_download(api)
    hub.push(delta, "acme/t")
    sha = push_hf(hub, "acme/t", "acme/t-" + method, api=api)
    folder = tmp_path / "commit"
    folder.mkdir()
    for n, data in api.commits[sha].items():
        (folder / n).write_bytes(data)
    x = batch_for(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama().eval(), str(folder))
    torch.testing.assert_close(run(pm, x), run(model, x), atol=1e-5, rtol=1e-5)
    other = FakeHub()
    ref = pull_hf(other, "acme/t-" + method, revision="v1", api=api)
    got = other.pull(f"{ref.name}@{ref.version}")
    assert got.method == method and got.tensors.keys() == delta.tensors.keys()
    assert all(torch.equal(got.tensors[k], delta.tensors[k]) for k in delta.tensors)
    fresh = tiny_llama().eval()
    surgery.apply(fresh, got, "t")
    torch.testing.assert_close(run(fresh, x), run(model, x), atol=1e-6, rtol=1e-6)


def test_extra_tensors_travel_with_the_version(fake_download, tmp_path):
    """A version pushed with extra tensors (an EWC state) reaches the HF Hub as one more file, and pull_hf
    brings them back into the hub next to the delta, meta included."""
    from registry import Hub

    api = FakeApi()
    fake_download(api)
    hub = Hub(tmp_path / "hub", create=True)
    _, delta = _trained_delta()
    extra = {"fisher.w": torch.rand(3, 4), "anchor.w": torch.randn(3, 4), "__meta__": {"mode": "online", "lam": 2e5}}
    r = hub.push(delta, "acme/sql", extra=extra)
    sha = push_hf(hub, f"acme/sql@{r.version}", "acme/sql-lora", api=api)
    assert sorted(api.commits[sha]) == sorted([CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME, rhf.EXTRA_NAME])
    ref = pull_hf(hub, "acme/sql-lora", revision=f"v{r.version}", name="acme/sql-back", api=api)
    back = hub.extra(f"{ref.name}@{ref.version}")
    assert back["__meta__"] == extra["__meta__"]
    for k in ("fisher.w", "anchor.w"):
        assert torch.equal(back[k], extra[k])
    # a repo whose manifest names extra tensors it does not hold: refused, nothing pushed
    api.commits[sha].pop(rhf.EXTRA_NAME)
    before = hub.versions("acme/sql-back") if hasattr(hub, "versions") else None
    with pytest.raises(HfTransferError, match="surgery_extra"):
        pull_hf(hub, "acme/sql-lora", revision=sha, name="acme/sql-back", api=api)
    if before is not None:
        assert hub.versions("acme/sql-back") == before
