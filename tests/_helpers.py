"""Helpers shared by the engine / LoRA / merge / integration tests (not a test module)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import surgery
from surgery import engine

_INT_OF = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor (as an int tensor), so -0.0 != 0.0 and NaNs compare."""
    t = t.detach().contiguous()
    if t.dtype in _INT_OF:
        return t.view(_INT_OF[t.dtype]).clone()
    return t.clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def state_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: bits(v) for k, v in model.state_dict().items()}


def assert_state_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert list(before) == list(after), (
        f"state_dict keys differ: only before {sorted(set(before) - set(after))[:5]}, "
        f"only after {sorted(set(after) - set(before))[:5]}"
    )
    bad = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert not bad, f"state_dict tensors changed bits: {bad[:5]}"


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        p: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(getattr(m, "_forward_hooks_with_kwargs", {})),
        )
        for p, m in model.named_modules()
    }


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was."""
    return {
        "state": state_bits(model),
        "modules": [(p, type(m)) for p, m in model.named_modules()],
        "params": [(p, id(t), t.requires_grad) for p, t in model.named_parameters()],
        "hooks": hook_counts(model),
        "names": surgery.names(model),
        "active": surgery.active(model),
        "merged": surgery.merged(model),
        "class": type(model),
    }


def assert_snapshot_equal(before: dict, after: dict) -> None:
    assert_state_equal(before["state"], after["state"])
    for key in ("modules", "params", "hooks", "names", "active", "merged", "class"):
        assert before[key] == after[key], f"{key} changed: {before[key]!r} -> {after[key]!r}"


@torch.no_grad()
def randomize(model: nn.Module, name: str = "default", seed: int = 1, std: float = 0.1, a_too: bool = True) -> None:
    """Give a delta random, non-zero A and B (B starts at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for ad in engine.adapters(model, name).values():
        for p in [ad.lora_A, ad.lora_B] if a_too else [ad.lora_B]:
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def run(model: nn.Module, inputs):
    """Call the model on a tensor or a dict of tensors; return a tensor (logits if there are any)."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if v is not None:
            return v
    return out[0]


@pytest.fixture
def hf_fakes_only(monkeypatch):
    """No socket can connect, and huggingface_hub starts "online" (the suite runs with
    HF_HUB_OFFLINE=1): fakes stand in for the network; offline tests switch it back on."""
    import socket

    import huggingface_hub as hfh

    def refuse(*a, **k):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hfh.constants, "HF_HUB_OFFLINE", False)


@torch.no_grad()
def greedy_tokens(base: nn.Module, delta, ids: list[int], max_tokens: int) -> list[int]:
    """The greedy continuation of `ids` by `base` with `delta` applied to a copy (None: the base itself):
    what a server must answer for a request, computed the plain transformers way."""
    model = base
    if delta is not None:
        model = copy.deepcopy(base)
        surgery.apply(model, delta)
    out = model.generate(
        input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=2
    )
    return out[0, len(ids) :].tolist()


def train_lm_with_trainer(model: nn.Module, tmp_path, steps: int = 3, lr: float = 1e-2):
    """Run the transformers Trainer for `steps` steps of causal-LM loss on random token rows."""
    import warnings

    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(3, 128, (12,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        result = trainer.train()
    return trainer, result


def load_benchmark(name: str):
    """Import benchmarks/<name>.py as module `name` (the benchmarks import their siblings, e.g. `common`)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
