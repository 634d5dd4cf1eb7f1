"""The launchers of examples/distributed/, each run as a user runs it (a subprocess, 2 CPU processes, gloo):

* ``torchrun --nproc-per-node 2`` (``python -m torch.distributed.run``) on torchrun_fsdp2.py: FSDP2 trains
  the LoRA to the single-process result (losses and the written delta, 1e-5) and holds half the bytes per rank;
* the transformers ``Trainer`` with ``fsdp`` arguments (FSDP2), under torchrun: it trains on 2 ranks; on
  CPU accelerate 1.15 turns ``fsdp=`` into DDP (no sharding), which the test pins so the docs stay true;
* ``accelerate launch --config_file accelerate_fsdp2.yaml``: accelerate 1.15 applies an FSDP config only
  on GPUs; on CPU the example stops with a message instead of training N unsharded copies.
With 2 or more CUDA devices the Trainer and accelerate runs must shard."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "distributed"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{EXAMPLES}", "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), str(EXAMPLES / script), *args]  # fmt: skip


def _single(out: Path) -> dict:
    """torchrun_fsdp2.train in this process: no process group, no wrapper, the whole batch."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import torchrun_fsdp2

    return torchrun_fsdp2.train(out)


def test_torchrun_fsdp2_trains_as_one_process(tmp_path):
    done = _run(_torchrun("torchrun_fsdp2.py", "--out", str(tmp_path / "fsdp2")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "fsdp2" / "report.json").read_text())
    one = _single(tmp_path / "one")
    assert report["world"] == 2 and report["mode"] == "fsdp2"
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-5)
    got, ref = load_file(tmp_path / "fsdp2" / "lora.safetensors"), load_file(tmp_path / "one" / "lora.safetensors")
    assert got.keys() == ref.keys() and len(ref) == 8  # q, v x 2 layers x A, B: full tensors, not shards
    for k, v in ref.items():
        assert got[k].shape == v.shape, k
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in ref.items())  # it trained
    # every rank called hub.push: one version, full tensors, and it loads into an unsharded model
    import torchrun_fsdp2

    import registry
    import surgery

    hub = registry.Hub(tmp_path / "fsdp2" / "hub")
    assert [v.version for v in hub.versions("demo/lora")] == [1]
    pulled = hub.pull("demo/lora")
    for k, v in ref.items():
        torch.testing.assert_close(pulled.tensors[k], v, rtol=1e-5, atol=1e-5)
    fresh = torchrun_fsdp2.build(64, 2)
    surgery.remove(fresh)
    hub.load(fresh, "demo/lora")
    for k, v in surgery.delta(fresh, "lora").tensors.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-5)
    whole = one["bytes_per_rank"][0]
    for rank in report["bytes_per_rank"]:  # each rank holds about half of everything
        for what in ("params", "grads", "optimizer"):
            assert 0.45 < rank[what] / whole[what] < 0.56, (what, rank, whole)


def test_trainer_with_fsdp_arguments(tmp_path):
    done = _run(_torchrun("trainer_fsdp2.py", "--out", str(tmp_path)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world"] == 2 and len(report["losses"]) == 3
    delta = load_file(tmp_path / "lora.safetensors")
    assert len(delta) == 8 and any("lora_B" in k and v.abs().max() > 0 for k, v in delta.items())
    if GPUS >= 2:
        assert report["sharded"], report
    else:  # accelerate 1.15: FSDP only on accelerators; on CPU the Trainer falls back to DDP (docs say so)
        assert not report["sharded"] and report["wrapped"] == "DistributedDataParallel", report
        assert "WARNING: fsdp was asked for" in done.stdout


def test_accelerate_launch_fsdp2_config(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(EXAMPLES / "accelerate_fsdp2.yaml"), "--main_process_port", str(_free_port()),
           str(EXAMPLES / "accelerate_fsdp2.py"), "--out", str(tmp_path)]  # fmt: skip
    done = _run(cmd)
    if GPUS >= 2:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["world"] == 2 and len(load_file(tmp_path / "lora.safetensors")) == 8
        return
    # on CPU: refused loudly by the example, nothing written (accelerate itself cannot run FSDP2 there)
    assert done.returncode != 0
    assert "not FSDP2: accelerate applies an FSDP config only on GPUs" in done.stdout + done.stderr
    assert not (tmp_path / "lora.safetensors").exists()
