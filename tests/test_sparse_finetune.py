"""Lottery-ticket sparse fine-tuning: the selection against a top-k of the full phase's change computed
here, per tensor and global; the reset to the pretrained weights; a sparse phase that moves only the
selected entries with optimizer state ~ nnz; the HF Trainer route; bad input leaving the model alone."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import assert_state_equal
from models import batch_for, tiny_llama
from torch import nn

import surgery
from surgery import engine
from surgery.sparse_finetune import SparseFinetune


def _step(model: nn.Module) -> torch.Tensor:
    b = batch_for(model)
    return model(**b, labels=b["input_ids"]).loss


def _weights(model: nn.Module, paths: list[str]) -> dict[str, torch.Tensor]:
    return {p: model.get_submodule(p).weight.detach().clone() for p in paths}


def _lr(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_selection_reset_and_sparse_phase(scope: str) -> None:
    model = tiny_llama()
    base = copy.deepcopy(model)
    sft = SparseFinetune(model, targets="@linear", density=0.02, scope=scope, optimizer=_lr)
    paths = list(sft.weights)
    w0 = _weights(model, paths)
    sft.full_phase(_step, steps=3)
    moved = {p: model.get_submodule(p).weight.detach() - w0[p] for p in paths}
    # the reference selection: top-k of |change| per weight, or over the concatenation of all of them
    if scope == "tensor":
        want = {p: set(d.abs().flatten().topk(round(0.02 * d.numel())).indices.tolist()) for p, d in moved.items()}
    else:
        flat = torch.cat([d.abs().flatten() for d in moved.values()])
        top = flat.topk(round(0.02 * flat.numel())).indices
        starts = torch.tensor([0] + [d.numel() for d in moved.values()]).cumsum(0)
        want = {
            p: set((top[(top >= starts[i]) & (top < starts[i + 1])] - starts[i]).tolist()) for i, p in enumerate(moved)
        }
    sft.select()
    ads = engine.adapters(model, "sft")
    assert {p: set(ad.indices.tolist()) for p, ad in ads.items()} == {p: s for p, s in want.items() if s}
    assert sft.nnz == sum(len(s) for s in want.values())
    assert all(ad.indices.dtype == torch.int32 for ad in ads.values())
    # pretrained weights back, values from zero: the model computes the base
    assert_state_equal(surgery.base_state_dict(model), base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch_for(model)).logits, base(**batch_for(base)).logits, rtol=0, atol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n in dict(model.named_parameters()) if n.endswith(".values")
    ]
    losses = sft.sparse_phase(_step, steps=4)
    assert losses[-1] < losses[0]
    assert_state_equal(surgery.base_state_dict(model), base.state_dict())  # the base never moves
    surgery.merge(model, "sft")
    for p in paths:  # the merged weight differs from the pretrained one only at selected entries
        changed = set((model.get_submodule(p).weight.detach() != w0[p]).flatten().nonzero().flatten().tolist())
        assert changed and changed <= want[p] or not want[p]


def test_optimizer_state_is_nnz() -> None:
    model = tiny_llama()
    seen: list[torch.optim.Optimizer] = []

    def keep(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        seen.append(torch.optim.AdamW(params, lr=1e-3))
        return seen[-1]

    sft = SparseFinetune(model, targets="@linear", density=0.01, optimizer=keep)
    sft.full_phase(_step, steps=1)
    sft.select()
    sft.sparse_phase(_step, steps=1)
    state = sum(t.numel() for s in seen[-1].state.values() for t in s.values() if t.dim())
    assert state == 2 * sft.nnz  # AdamW's two moments over the selected entries only


def test_trainer_route() -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny_llama()
    rows = [{"input_ids": ids, "labels": ids} for ids in batch_for(model, batch=4)["input_ids"]]
    args = dict(
        output_dir="/tmp/sft_trainer",
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    sft = SparseFinetune(model, density=0.01)
    sft.full_phase()  # snapshot + unfreeze only
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    transformers.Trainer(
        model=model, args=transformers.TrainingArguments(learning_rate=1e-2, **args), train_dataset=rows
    ).train()
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)
    sft.select()
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, before, rtol=0, atol=0)
    values = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    transformers.Trainer(
        model=model, args=transformers.TrainingArguments(learning_rate=1e-2, **args), train_dataset=rows
    ).train()
    assert all(not torch.equal(p, values[n]) for n, p in model.named_parameters() if n in values)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, before, rtol=0, atol=0)


@pytest.mark.parametrize("density", [0, 1.5, -0.1, True, "0.1"])
def test_bad_density(density: object) -> None:
    model = tiny_llama()
    with pytest.raises(surgery.ConfigError, match="density"):
        SparseFinetune(model, density=density)  # type: ignore[arg-type]
    assert surgery.names(model) == []


def test_out_of_order_calls_leave_model_alone() -> None:
    model = tiny_llama()
    base = copy.deepcopy(model)
    with pytest.raises(surgery.ConfigError, match="scope"):
        SparseFinetune(model, scope="layer")
    sft = SparseFinetune(model)
    with pytest.raises(surgery.ConfigError, match="full_phase"):
        sft.select()
    with pytest.raises(surgery.ConfigError, match="select"):
        sft.sparse_phase(_step, steps=1)
    assert_state_equal(model.state_dict(), base.state_dict())
    assert surgery.names(model) == [] and all(
        p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), base.parameters(), strict=True)
    )


def test_dense_parameters_train_in_both_phases() -> None:
    model = tiny_llama()
    head = model.lm_head.weight
    with pytest.raises(surgery.ConfigError, match="dense"):
        SparseFinetune(model, targets=nn.Linear, dense=[head])  # lm_head is an nn.Linear too
    sft = SparseFinetune(
        model, targets=lambda p, m: isinstance(m, nn.Linear) and ".mlp." in p, dense=[head], optimizer=_lr
    )
    h0 = head.detach().clone()
    sft.full_phase(_step, steps=1)
    h1 = head.detach().clone()
    sft.select()
    assert torch.equal(head, h1) and not torch.equal(h1, h0)  # moved in the full phase, not reset
    assert "lm_head" not in engine.adapters(model, "sft")
    sft.sparse_phase(_step, steps=1)
    assert head.requires_grad and not torch.equal(head, h1)
