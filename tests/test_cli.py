"""The `surgery hub` shell interface, run in-process (`registry.cli.main`) against a temp hub, plus
one subprocess run of the installed `surgery` script; Hub.unalias; site kinds kept by push."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import huggingface_hub as hfh
import pytest
import torch
from _helpers import hf_fakes_only, randomize, run  # noqa: F401  (hf_fakes_only: a fixture)
from models import batch_for, tiny_llama
from test_hf import FakeApi

import surgery
from registry import Hub, NotFoundError, cli
from registry import hf as rhf
from registry.hf import MANIFEST_NAME
from registry.peft_format import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("hf_fakes_only")


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama with a LoRA on an embedding and on q_proj, and a second set of weights."""
    model = tiny_llama()
    surgery.inject(model, "lora", targets=["embed_tokens", "q_proj"], r=3, alpha=12, name="sql")
    randomize(model, "sql", std=0.2)
    first = surgery.delta(model, "sql")
    return model, first


@pytest.fixture
def hub(tmp_path, trained, monkeypatch):
    model, first = trained
    monkeypatch.delenv("SURGERY_HUB", raising=False)
    h = Hub(tmp_path / "hub")
    h.push(model, "acme/sql", adapter="sql", alias="staging", meta={"dataset": "spider"})
    changed = surgery.Delta(
        first.method,
        first.name,
        dict(first.config),
        {k: t * 2 for k, t in first.tensors.items()},
        first.base,
        dict(first.lineage),
    )
    h.push(changed, "acme/sql", parent=1)
    h.push(first, "team/other")
    return h


def cli_run(hub, *args, capsys):
    rc = cli.main(["hub", "--hub", str(hub.root), *args])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------ help


def test_surgery_help_subprocess_shows_examples():
    exe = Path(sys.executable).parent / "surgery"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "registry.cli"]
    p = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "examples:" in p.stdout and "surgery hub list" in p.stdout and "demo" in p.stdout


def test_hub_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["hub", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for c in (
        "list",
        "versions",
        "show",
        "alias",
        "history",
        "verify",
        "gc",
        "import-peft",
        "export-peft",
        "push-hf",
        "pull-hf",
    ):
        assert c in out
    assert "surgery hub alias acme/sql prod --version 3" in out  # the epilog keeps its line breaks
    assert cli.main(["hub"]) == 0 and "COMMAND" in capsys.readouterr().out


# ------------------------------------------------------------------ queries


def test_list_versions_show(hub, capsys):
    rc, out, _ = cli_run(hub, "list", capsys=capsys)
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["NAME", "LATEST", "VERSIONS", "DIGEST", "ALIASES"]
    assert lines[1].split()[:3] == ["acme/sql", "2", "2"] and "staging->1" in lines[1]
    assert lines[2].split()[:3] == ["team/other", "1", "1"]
    assert lines[1].index("2") == lines[0].index("LATEST")  # aligned columns

    rc, out, _ = cli_run(hub, "list", "--json", capsys=capsys)
    got = json.loads(out)
    assert rc == 0 and [d["ref"] for d in got] == ["acme/sql@2", "team/other@1"]
    assert got[0]["digest"] == hub.resolve("acme/sql").digest and got[0]["aliases"] == {"staging": 1}

    rc, out, _ = cli_run(hub, "versions", "acme/sql", capsys=capsys)
    rows = [ln.split() for ln in out.splitlines()[1:]]
    assert rc == 0 and [r[0] for r in rows] == ["1", "2"] and rows[0][-1] == "staging"
    rc, out, _ = cli_run(hub, "--json", "versions", "acme/sql", capsys=capsys)
    got = json.loads(out)
    assert [d["version"] for d in got] == [1, 2] and got[1]["parent"]["version"] == 1
    assert got[0]["nbytes"] == hub.show("acme/sql@1")["nbytes"]

    rc, out, _ = cli_run(hub, "show", "acme/sql@staging", capsys=capsys)
    assert rc == 0 and "ref:" in out and "acme/sql@1" in out and "spider" in out
    assert "model.embed_tokens.lora_A.weight" in out and "F32" in out
    rc, out, _ = cli_run(hub, "show", "--json", "acme/sql@2", capsys=capsys)
    assert json.loads(out) == json.loads(json.dumps(hub.show("acme/sql@2")))
    digest = hub.resolve("acme/sql@2").digest
    rc, out, _ = cli_run(hub, "show", f"acme/sql@{digest[:15]}", "--json", capsys=capsys)
    assert rc == 0 and json.loads(out)["ref"] == "acme/sql@2"


def test_errors_one_line_exit_2(hub, capsys):
    for args in (
        ["show", "acme/nope"],
        ["show", "Acme/SQL"],
        ["show", "../etc"],
        ["versions", "acme/sql@x@y"],
        ["alias", "acme/sql", "prod", "--version", "9"],
        ["alias", "acme/sql", "nope", "--delete"],
    ):
        rc, out, err = cli_run(hub, *args, capsys=capsys)
        assert rc == 2, args
        assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (args, err)
    with pytest.raises(SystemExit) as e:  # argparse usage errors exit 2 as well
        cli.main(["hub", "push-hf", "acme/sql"])  # no --repo-id
    assert e.value.code == 2
    capsys.readouterr()


def test_hub_path_from_env(hub, capsys, monkeypatch):
    monkeypatch.setenv("SURGERY_HUB", str(hub.root))
    assert cli.main(["hub", "--json", "list"]) == 0
    assert [d["name"] for d in json.loads(capsys.readouterr().out)] == ["acme/sql", "team/other"]
    monkeypatch.setenv("SURGERY_HUB", str(hub.root.parent / "elsewhere"))
    assert cli.main(["--hub", str(hub.root), "hub", "list", "--json"]) == 0  # --hub before `hub` too
    assert len(json.loads(capsys.readouterr().out)) == 2
    # $SURGERY_HUB names a folder that does not exist: an error, and nothing is created there
    assert cli.main(["hub", "list"]) == 2
    assert "no hub at" in capsys.readouterr().err
    assert not (hub.root.parent / "elsewhere").exists()
    (hub.root.parent / "empty").mkdir()  # an existing empty folder is an empty hub
    assert cli.main(["--hub", str(hub.root.parent / "empty"), "hub", "list"]) == 0
    assert "no deltas" in capsys.readouterr().out


@pytest.mark.parametrize(
    "cmd",
    [
        ["list"],
        ["versions", "acme/sql"],
        ["show", "acme/sql@1"],
        ["verify"],
        ["gc"],
        ["history", "acme/sql@prod"],
        ["alias", "acme/sql", "prod"],
        ["alias", "acme/sql", "prod", "--delete"],
        ["export-peft", "acme/sql", "OUT"],
        ["push-hf", "acme/sql", "--repo-id", "a/b"],
    ],
)
def test_commands_on_a_missing_hub_create_nothing(tmp_path, capsys, cmd):
    typo = tmp_path / "typo"
    cmd = [str(tmp_path / "out") if c == "OUT" else c for c in cmd]
    assert cli.main(["hub", "--hub", str(typo), *cmd]) == 2
    err = capsys.readouterr().err
    assert f"error: no hub at {typo} (does not exist); push creates one" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no hub folder, no export folder


def test_a_file_in_place_of_the_hub_is_named(tmp_path, capsys):
    f = tmp_path / "hubfile"
    f.write_bytes(b"not a hub")
    assert cli.main(["hub", "--hub", str(f), "list"]) == 2
    assert "is a file, not a hub folder" in capsys.readouterr().err
    assert f.read_bytes() == b"not a hub"


def test_hub_object_reads_on_a_missing_folder(tmp_path, trained):
    hub = Hub(tmp_path / "nohub")
    assert not hub.root.exists()  # constructing one creates nothing
    for read in (
        hub.list,
        hub.names,
        hub.verify,
        hub.gc,
        lambda: hub.versions("acme/sql"),
        lambda: hub.pull("acme/sql"),
        lambda: hub.aliases("acme/sql"),
        lambda: hub.show("acme/sql@1"),
    ):
        with pytest.raises(NotFoundError, match="no hub at .*push creates one"):
            read()
    assert not hub.root.exists()
    model, _ = trained
    hub.push(model, "acme/sql", adapter="sql")  # push is the one that creates it
    assert [r.name for r in hub.list()] == ["acme/sql"]


# ------------------------------------------------------------------ aliases, history


def test_alias_delete_and_history(hub, capsys):
    rc, out, _ = cli_run(hub, "alias", "acme/sql", "prod", "--version", "1", capsys=capsys)
    assert rc == 0 and out.startswith("acme/sql@prod -> 1")
    rc, out, _ = cli_run(hub, "alias", "acme/sql", "prod", capsys=capsys)  # default: the latest
    assert rc == 0 and hub.aliases("acme/sql")["prod"] == 2
    rc, out, _ = cli_run(hub, "--json", "alias", "acme/sql", "canary", "--version", "staging", capsys=capsys)
    assert json.loads(out)["version"] == 1
    rc, out, _ = cli_run(hub, "alias", "acme/sql", "prod", "--delete", capsys=capsys)
    assert rc == 0 and "deleted" in out and "prod" not in hub.aliases("acme/sql")
    rc, _, err = cli_run(hub, "show", "acme/sql@prod", capsys=capsys)
    assert rc == 2 and "no alias 'prod'" in err

    rc, out, _ = cli_run(hub, "history", "acme/sql@prod", capsys=capsys)
    rows = [ln.split() for ln in out.splitlines()]
    assert rows[0] == ["TIME", "USER", "VERSION", "PREVIOUS"]
    assert [r[2:] for r in rows[1:]] == [["1", "-"], ["2", "1"], ["deleted", "2"]]
    rc, out, _ = cli_run(hub, "history", "--json", "acme/sql@prod", capsys=capsys)
    assert [(e["version"], e["previous"]) for e in json.loads(out)] == [(1, None), (2, 1), (None, 2)]

    rc, out, _ = cli_run(hub, "history", "acme/sql", capsys=capsys)
    assert rc == 0 and "version 2" in out and "(parent acme/sql@1)" in out and "@prod deleted" in out
    rc, out, _ = cli_run(hub, "history", "acme/sql@2", "--json", capsys=capsys)
    assert [e["ref"] for e in json.loads(out)] == ["acme/sql@2", "acme/sql@1"]
    rc, out, _ = cli_run(hub, "history", "acme/sql@2", capsys=capsys)
    assert [ln.split()[0] for ln in out.splitlines()] == ["REF", "acme/sql@2", "acme/sql@1"]


def test_hub_unalias(hub):
    hub.alias("acme/sql", "prod", version=2)
    assert hub.unalias("acme/sql", "prod") == 2
    assert "prod" not in hub.aliases("acme/sql") and hub.aliases("acme/sql") == {"staging": 1}
    assert hub.history("acme/sql@prod")[-1]["version"] is None
    with pytest.raises(NotFoundError, match="no alias 'prod'"):
        hub.unalias("acme/sql", "prod")
    with pytest.raises(NotFoundError):
        hub.unalias("acme/none", "prod")
    hub.alias("acme/sql", "prod", version=1)  # an alias can come back
    assert hub.resolve("acme/sql@prod").version == 1
    assert hub.verify() == []


# ------------------------------------------------------------------ verify, gc


def test_verify_clean_then_corrupt_blob(hub, capsys):
    rc, out, _ = cli_run(hub, "verify", capsys=capsys)
    assert rc == 0 and "no problems" in out
    blob = hub._blob_path(hub.show("acme/sql@2")["blob"]["digest"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    rc, out, err = cli_run(hub, "verify", capsys=capsys)
    assert rc == 1
    assert "acme/sql@2" in out and "corrupted" in out and blob.name in out and "1 problem" in err
    rc, out, _ = cli_run(hub, "verify", "--json", capsys=capsys)
    got = json.loads(out)
    assert rc == 1 and got["ok"] is False and len(got["problems"]) == 1
    rc, _, err = cli_run(hub, "export-peft", "acme/sql@2", str(hub.root.parent / "x"), capsys=capsys)
    assert rc == 2 and "corrupted" in err


def test_gc(hub, capsys):
    stray = b"not referenced by any manifest"
    hexd = hashlib.sha256(stray).hexdigest()
    (hub.blobs / hexd[:2]).mkdir(exist_ok=True)
    (hub.blobs / hexd[:2] / hexd).write_bytes(stray)
    (hub.tmp / "blob.leftover").write_bytes(b"x" * 10)
    rc, out, _ = cli_run(hub, "gc", capsys=capsys)
    assert rc == 0 and "removed 1 blob(s) and 1 temp file(s)" in out and hexd in out
    assert not (hub.blobs / hexd[:2] / hexd).exists()
    rc, out, _ = cli_run(hub, "gc", "--json", capsys=capsys)
    assert json.loads(out) == {"blobs": [], "temp": [], "bytes": 0, "skipped": []}
    assert hub.verify() == [] and len(hub.versions("acme/sql")) == 2


# ------------------------------------------------------------------ PEFT


def test_export_import_peft(hub, trained, tmp_path, capsys):
    model, first = trained
    out_dir = tmp_path / "peft"
    rc, out, _ = cli_run(hub, "export-peft", "acme/sql@1", str(out_dir), capsys=capsys)
    assert rc == 0 and str(out_dir) in out
    assert sorted(p.name for p in out_dir.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    rc, out, _ = cli_run(hub, "--json", "import-peft", str(out_dir), "acme/back", "--alias", "prod", capsys=capsys)
    got = json.loads(out)
    assert rc == 0 and got["ref"] == "acme/back@1" and hub.aliases("acme/back") == {"prod": 1}
    back = hub.pull("acme/back@prod")
    assert back.tensors.keys() == first.tensors.keys()
    for k in first.tensors:
        assert torch.equal(back.tensors[k], first.tensors[k])
    fresh = tiny_llama()
    surgery.apply(fresh, back, allow_other_base=True)  # a PEFT folder carries no base fingerprint
    x = batch_for(fresh)
    torch.testing.assert_close(run(fresh, x), run(model, x), atol=1e-6, rtol=1e-6)
    rc, _, err = cli_run(hub, "import-peft", str(tmp_path / "missing"), "acme/x", capsys=capsys)
    assert rc == 2 and err.startswith("error: ")


def test_push_records_site_kinds_and_export_peft_loads_in_peft(hub, trained, tmp_path):
    """An embedding site pushed from a model keeps PEFT's embedding keys through the hub."""
    peft = pytest.importorskip("peft")
    model, _ = trained
    man = hub.show("acme/sql@1")
    assert man["lineage"]["site_kinds"]["model.embed_tokens"] == "embedding"
    assert man["lineage"]["site_kinds"]["model.layers.0.self_attn.q_proj"] == "linear"
    assert hub.pull("acme/sql@1").lineage["site_kinds"] == man["lineage"]["site_kinds"]
    out = hub.export_peft("acme/sql@1", tmp_path / "peft")
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    x = batch_for(model)
    torch.testing.assert_close(run(pm, x), run(model, x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ Hugging Face Hub (fake api)


class _Api(FakeApi):
    def model_info(self, repo_id, revision=None, **kw):
        if revision not in self.refs and revision not in self.commits:
            err = hfh.errors.RevisionNotFoundError.__new__(hfh.errors.RevisionNotFoundError)
            Exception.__init__(err, f"{repo_id} has no revision {revision}")  # (no HTTP response here)
            raise err
        return super().model_info(repo_id, revision=revision, **kw)


def test_push_hf_and_pull_hf(hub, trained, monkeypatch, tmp_path, capsys):
    model, _ = trained
    api = _Api()
    tokens = []

    def make_api(token=None):
        tokens.append(token)
        return api

    monkeypatch.setattr(rhf, "HfApi", make_api)

    def download(repo_id, filename, *, revision=None, **kw):
        files = api.commits.get(revision)
        if files is None or filename not in files:
            raise hfh.errors.EntryNotFoundError(f"{filename} not in {revision}")
        p = tmp_path / "served" / revision / filename
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(files[filename])
        return str(p)

    monkeypatch.setattr(hfh, "hf_hub_download", download)

    rc, out, _ = cli_run(
        hub, "push-hf", "acme/sql@staging", "--repo-id", "acme/sql-lora", "--private", "--token", "tok", capsys=capsys
    )
    assert rc == 0 and "tag v1" in out and tokens == ["tok"]
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit", "create_tag"]
    assert api.calls[0][2]["private"] is True and api.calls[2][2]["tag"] == "v1"
    sha = api.refs["v1"]
    assert sha in out and sorted(api.commits[sha]) == sorted([CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME])

    rc, out, _ = cli_run(hub, "--json", "push-hf", "acme/sql", "--repo-id", "acme/sql-lora", capsys=capsys)
    got = json.loads(out)
    assert rc == 0 and got["tag"] == "v2" and api.calls[-3][2]["private"] is None

    rc, out, _ = cli_run(hub, "pull-hf", "acme/sql-lora", "--revision", "v1", "--name", "acme/pulled", capsys=capsys)
    assert rc == 0 and "acme/pulled@1" in out
    man = hub.show("acme/pulled@1")
    assert man["meta"]["hf_sha"] == sha and man["meta"]["hf_revision"] == "v1"
    assert man["base"] == hub.show("acme/sql@1")["base"]
    assert man["lineage"]["site_kinds"]["model.embed_tokens"] == "embedding"
    pulled = hub.pull("acme/pulled")
    fresh = tiny_llama()
    surgery.apply(fresh, pulled)
    x = batch_for(fresh)
    torch.testing.assert_close(run(fresh, x), run(model, x), atol=1e-6, rtol=1e-6)

    rc, out, _ = cli_run(hub, "--json", "pull-hf", "acme/sql-lora", capsys=capsys)  # main, name from repo
    assert rc == 0 and json.loads(out)["ref"] == "acme/sql-lora@1"
    rc, _, err = cli_run(hub, "pull-hf", "acme/sql-lora", "--revision", "v9", capsys=capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1


# ------------------------------------------------------------------ progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_late_and_only_on_a_terminal():
    tty = _Tty()
    with cli.progress("fast op", delay=0.5, stream=tty):
        pass
    assert tty.getvalue() == ""
    with cli.progress("slow op", delay=0.05, stream=tty):
        time.sleep(0.4)
    assert "slow op" in tty.getvalue()
    plain = io.StringIO()
    with cli.progress("slow op", delay=0.0, stream=plain):
        time.sleep(0.2)
    assert plain.getvalue() == ""


def test_hf_bars_quiet_inside_cli_and_restored():
    before = rhf.tqdm, rhf.DelayedTqdm
    with cli._quiet_hf_bars():
        bar = rhf.tqdm(total=3, file=_Tty())
        assert bar.disable
        bar.close()
    assert (rhf.tqdm, rhf.DelayedTqdm) == before


def test_demo_subcommand_still_there(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0 and "--steps" in capsys.readouterr().out


def test_table_alignment():
    text = cli.table([["a", 1, "x"], ["longer", 22, ""]], ["NAME", "N", "LAST"])
    lines = text.splitlines()
    assert lines == ["NAME    N   LAST", "a       1   x", "longer  22"]
