r"""Reward models on the shared base: a LoRA delta plus a scalar head, trained by Bradley-Terry.

``RewardModel(base, delta="rm")`` injects two deltas into `base` (no copy): a LoRA named ``rm``
and a head delta ``rm-head`` (the "head" method, `surgery.heads`: one sequence head with one
output, pooling the last non-padding token). The head is a delta of its own because a delta has
one method; as a head delta it is saved, pushed to the hub and applied back like any delta
(``surgery.delta(base, "rm")`` and ``surgery.delta(base, "rm-head")``; `RewardModel.deltas`
names both), and ``base(**batch, task="rm")`` under ``surgery.use(base, "rm", "rm-head")`` gives
the same scores. Neither joins the base's default active set: the policy never runs them.

A call runs the backbone alone (``base.base_model``: no vocabulary logits) under
``surgery.use(base, "rm", "rm-head")``, so whatever deltas are active around it (the policy's)
are off inside, and returns one reward per row. `train_reward` minimises
:math:`-\log\sigma(r_c - r_r - m)` (plus ``center`` :math:`\cdot\,\overline{(r_c + r_r)^2}`, TRL's
``center_rewards_coefficient``) over the two deltas' tensors only.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery import engine
from surgery.errors import ConfigError
from surgery.methods.head import head_deltas
from surgery.recipes.heads import heads
from surgery.rl.data import Encoded, collate, pad_id_of


class RewardModel(nn.Module):
    """A scalar reward on the shared `base`: LoRA delta `delta` (rank `r`, at `targets`, default
    ``"@linear"``) and the head delta ``f"{delta}-head"``; when the base already has both (applied
    from the hub), they are reused as they are. ``rm(input_ids, attention_mask)`` ->
    rewards ``(batch,)``. Its parameters are those two deltas' tensors (an optimizer over
    ``rm.parameters()`` trains them alone); the base stays the caller's, outside this module."""

    base: nn.Module
    backbone: nn.Module

    def __init__(
        self, base: nn.Module, delta: str = "rm", r: int = 16, targets: Any = None, tokenizer: Any = None, **lora: Any
    ) -> None:
        super().__init__()
        engine.check_model(base)
        backbone = getattr(base, "base_model", None)
        if not isinstance(backbone, nn.Module):
            raise ConfigError(
                f"RewardModel: {type(base).__name__} has no backbone (transformers' base_model) whose hidden states "
                "a reward head can read; use a transformers model (AutoModelForCausalLM, AutoModel)"
            )
        head = f"{delta}-head"
        have = [n for n in (delta, head) if n in engine.names(base)]
        # the default active set as outside any use(): the policy's deltas, not the reward model's
        before = contextvars.Context().run(engine.active, base)
        if len(have) == 2:  # both there (applied from the hub, or a second wrapper): reuse them
            got = head_deltas(base).get(head)
            if engine.method_of(base, delta).name != "lora" or got is None or delta not in got.tasks:
                raise ConfigError(
                    f"RewardModel: {delta!r} and {head!r} exist but are not a reward model's LoRA and its "
                    f"one-output head {delta!r}; pick another delta= name"
                )
            lin = got[delta]
            before = tuple(x for x in before if x not in (delta, head))  # out of the policy's default set
        elif have:
            raise ConfigError(
                f"RewardModel: {have[0]!r} exists without its partner (a reward model is {delta!r} and {head!r}); "
                "apply both, or pick another delta= name"
            )
        else:
            engine.inject(base, "lora", targets="@linear" if targets is None else targets, name=delta, r=r, **lora)
            try:
                lin = heads(base, {delta: {"num_labels": 1, "pooling": "last"}}, name=head)[delta]
            except BaseException:
                engine.remove(base, delta)
                raise
        engine.activate(base, *before)
        self.__dict__["base"] = base  # shared, not a submodule: rm.to() / state_dict() / deepcopy leave it alone
        self.__dict__["backbone"] = backbone
        self._positions = "position_ids" in inspect.signature(backbone.forward).parameters
        self.delta, self.head_delta, self.tokenizer = delta, head, tokenizer
        self.parts = nn.ModuleList([*engine.adapters(base, delta).values(), lin])

    @property
    def deltas(self) -> tuple[str, str]:
        """The two deltas it is made of (the LoRA's, the head's): save or push both."""
        return self.delta, self.head_delta

    @property
    def head(self) -> nn.Linear:
        lin = self.parts[-1]
        assert isinstance(lin, nn.Linear)
        return lin

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if attention_mask is not None and self._positions:  # a left-padded row (a rollout) scores as the row alone
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with engine.use(self.base, self.delta):  # only the reward model's LoRA (the head is ours to run)
            out = self.backbone(**kw)
        hidden = getattr(out, "last_hidden_state", None)
        if not isinstance(hidden, torch.Tensor):
            raise ConfigError(f"RewardModel: the backbone {type(self.backbone).__name__} gave no last_hidden_state")
        if attention_mask is None:
            last = torch.full(hidden.shape[:1], hidden.shape[1] - 1, device=hidden.device)
        else:  # the last non-padding position, left or right padding alike
            pos = torch.arange(hidden.shape[1], device=hidden.device)
            last = (pos * attention_mask.to(hidden.device, torch.long)).argmax(-1)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()


def _pair_batches(
    pairs: Iterable[Any], batch_size: int, pad_id: int, shuffle: bool, seed: int
) -> Iterator[Mapping[str, torch.Tensor]]:
    if isinstance(pairs, Sequence) and pairs and all(isinstance(p, Encoded) for p in pairs):
        if not all(p.rejected for p in pairs):
            raise ConfigError("rl: reward pairs need a rejected completion in every row (rows with 'rejected')")
        order = list(range(len(pairs)))
        if shuffle:
            random.Random(seed).shuffle(order)
        for i in range(0, len(order), batch_size):
            yield collate([pairs[j] for j in order[i : i + batch_size]], pad_id)
        return
    n = 0
    for b in pairs:
        if not isinstance(b, Mapping) or "chosen_input_ids" not in b:
            raise ConfigError(
                "rl: reward pairs are a list of surgery.rl.data.encode(...) results or collated batches "
                "(surgery.rl.data.collate / batches)"
            )
        if "rejected_input_ids" not in b:
            raise ConfigError("rl: a reward batch has no rejected completions; Bradley-Terry needs pairs")
        n += 1
        yield b
    if not n:
        raise ConfigError("rl: no reward pairs given")


def _pad_right(t: torch.Tensor, n: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, n - t.shape[1]), value=value)


def pair_rewards(rm: RewardModel, batch: Mapping[str, torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected rows of one collated batch, in one forward."""
    dev = rm.head.weight.device
    c, r = batch["chosen_input_ids"], batch["rejected_input_ids"]
    cm, rmask = batch["chosen_attention_mask"], batch["rejected_attention_mask"]
    n = max(c.shape[1], r.shape[1])
    ids = torch.cat([_pad_right(c, n, pad_id), _pad_right(r, n, pad_id)]).to(dev)
    mask = torch.cat([_pad_right(cm, n, 0), _pad_right(rmask, n, 0)]).to(dev)
    out = rm(ids, mask)
    return out[: c.shape[0]], out[c.shape[0] :]


def _pad(rm: RewardModel, pad_id: int | None) -> int:
    if pad_id is not None:
        return int(pad_id)
    if rm.tokenizer is not None:
        return pad_id_of(rm.tokenizer)
    cfg = getattr(rm.base, "config", None)
    v = getattr(cfg, "pad_token_id", None)
    v = v if isinstance(v, int) else getattr(cfg, "eos_token_id", None)
    return v if isinstance(v, int) else 0  # padding is masked and never pooled: any id does


@contextlib.contextmanager
def _training(rm: RewardModel, on: bool) -> Iterator[None]:
    was = rm.training, [p.requires_grad for p in rm.parameters()]
    rm.train(on)
    if on:
        rm.requires_grad_(True)
    try:
        yield
    finally:
        rm.train(was[0])
        for p, flag in zip(rm.parameters(), was[1], strict=True):
            p.requires_grad_(flag)


def train_reward(
    rm: RewardModel,
    pairs: Iterable[Any],
    *,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 8,
    pad_id: int | None = None,
    seed: int = 0,
    margin: float = 0.0,
    center: float = 0.0,
    weight_decay: float = 0.0,
) -> list[float]:
    """Bradley-Terry training of the reward model's two deltas (AdamW, nothing else trains) on pairs:
    a list of `rl.data.encode` results (shuffled per epoch by `seed`) or collated batches (a batch may
    carry per-pair ``margin``s). `margin` is subtracted from each reward gap; `center` weighs TRL's
    mean squared reward sum. Returns the mean loss of each epoch."""
    if not isinstance(rm, RewardModel):
        raise ConfigError(f"rl.train_reward: expected a surgery.RewardModel, got {type(rm).__name__}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(
            f"rl.train_reward: epochs, batch_size and lr must be positive; got {epochs}, {batch_size}, {lr}"
        )
    pad = _pad(rm, pad_id)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    listed = pairs if isinstance(pairs, Sequence) else list(pairs)
    with _training(rm, True):
        for epoch in range(epochs):
            total, n = 0.0, 0
            for batch in _pair_batches(listed, batch_size, pad, True, seed + epoch):
                rc, rr = pair_rewards(rm, batch, pad)
                m = batch.get("margin")
                gap = rc - rr - margin - (0.0 if m is None else torch.as_tensor(m, device=rc.device, dtype=rc.dtype))
                loss = -F.logsigmoid(gap).mean()
                if center:
                    loss = loss + center * ((rc + rr) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + loss.item() * len(rc), n + len(rc)
            losses.append(total / n)
    return losses


@torch.no_grad()
def reward_accuracy(rm: RewardModel, pairs: Iterable[Any], *, batch_size: int = 16, pad_id: int | None = None) -> float:
    """The fraction of pairs whose chosen completion gets the higher reward (eval mode)."""
    pad = _pad(rm, pad_id)
    hit = n = 0
    with _training(rm, False):
        for batch in _pair_batches(pairs, batch_size, pad, False, 0):
            rc, rr = pair_rewards(rm, batch, pad)
            hit, n = hit + int((rc > rr).sum()), n + len(rc)
    return hit / n


__all__ = ["RewardModel", "pair_rewards", "reward_accuracy", "train_reward"]
