"""registry.export_vllm: a hub version as the PEFT LoRA folder vLLM loads, named by its content
digest (an alias move can never serve stale weights), and refused with the reason where vLLM's
LoRA loader would refuse or misread it. PEFT reads the folder back to the same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models import batch_for, tiny_llama

import registry
import surgery
from registry.vllm import VllmExportError


def _trained(model, name: str = "default") -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in surgery.engine.adapters(model, name).values():
            for t in p.parameters():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return registry.Hub(tmp_path_factory.mktemp("vllm") / "hub", create=True)


def test_export_is_peft_lora_named_by_digest(hub, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    m = copy.deepcopy(base)
    surgery.inject(m, "lora", targets=["q_proj", "v_proj"], r=4, alpha=8, rslora=True)
    _trained(m)
    v1 = hub.push(m, "acme/sql", alias="prod")
    _trained(m)
    with torch.no_grad():
        next(iter(surgery.engine.adapters(m, "default").values())).lora_B.add_(0.5)
    v2 = hub.push(m, "acme/sql")
    first = registry.export_vllm("acme/sql@prod", tmp_path, hub=hub)
    hub.alias("acme/sql", "prod", version=v2.version)
    second = registry.export_vllm("acme/sql@prod", tmp_path, hub=hub)
    assert first != second and first.name.endswith(v1.digest.removeprefix("sha256:")[:16])
    assert json.loads((second / "surgery.json").read_text()) == {"name": "acme/sql", "version": 2, "digest": v2.digest}
    cfg = json.loads((second / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] and not cfg["use_dora"]
    batch = batch_for(base)
    with torch.no_grad():
        want = m(**batch).logits
        got = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(second))(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "method, cfg, targets, words",
    [
        ("dora", {"r": 4}, ["q_proj"], "plain LoRA only"),
        ("lora", {"r": 4, "rank_pattern": {"*.v_proj": 2}}, ["q_proj", "v_proj"], "rank_pattern"),
        ("lora", {"r": 16}, ["q_proj"], "max_lora_rank=8"),
        ("lora", {"r": 2}, ["lm_head"], "LM head"),
    ],
)
def test_what_vllm_cannot_load_is_refused(hub, tmp_path, method, cfg, targets, words):
    m = tiny_llama()
    surgery.inject(m, method, targets=targets, **cfg)
    ref = hub.push(m, f"acme/{method}-{len(targets)}-{cfg['r']}")
    with pytest.raises(VllmExportError, match=words):
        registry.export_vllm(ref, tmp_path, hub=hub, max_lora_rank=8)
    assert not any(tmp_path.iterdir())  # nothing written
