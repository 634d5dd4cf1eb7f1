"""Lottery-ticket sparse fine-tuning (LT-SFT, Ansell et al., 2022) as a "sparse" delta.

    sft = surgery.SparseFinetune(model, targets="@linear", density=0.01)
    sft.full_phase(train_step, steps=200)   # the targeted weights train densely
    sft.select()                            # top |theta - theta0|; weights back to pretrained; "sft" injected
    sft.sparse_phase(train_step, steps=200) # only the selected entries (the delta's values) train

`train_step(model) -> loss` computes one batch's loss; the helper runs backward and the optimizer.
With the HF ``Trainer`` instead: ``sft.full_phase()`` (no step: only snapshots and unfreezes),
``trainer.train()``, ``sft.select()``, then a second ``Trainer`` (its optimizer sees the delta's
values alone, the only trainable parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn

from surgery.errors import ConfigError
from surgery.methods.sparse import SparseDelta, check_density, entries, index_dtype

Step = Callable[[nn.Module], torch.Tensor]
MakeOptimizer = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


class SparseFinetune:
    """LT-SFT on `model`'s `targets` (sites a "sparse" delta fits), keeping `density` of their
    entries: per weight (``scope="tensor"``) or over all of them together (``scope="global"``).
    `optimizer` builds each phase's optimizer from its parameters (AdamW, lr 1e-4, by default).
    `dense` parameters (a new task head, say) train as they are in both phases: never reset, never
    part of the delta."""

    def __init__(
        self,
        model: nn.Module,
        targets: Any = "@linear",
        density: float = 0.01,
        scope: str = "tensor",
        name: str = "sft",
        optimizer: MakeOptimizer = _adamw,
        dense: Iterable[nn.Parameter] = (),
    ) -> None:
        from surgery import engine
        from surgery.methods.base import get_method

        self.density = check_density(density, "SparseFinetune")
        if scope not in ("tensor", "global"):
            raise ConfigError(f"SparseFinetune: scope must be 'tensor' or 'global', got {scope!r}")
        engine.check_name(model, name)
        self.model, self.scope, self.name, self.make_optimizer = model, scope, name, optimizer
        sites = engine.resolve_sites(model, get_method("sparse"), targets)
        self.weights = {p: cast(nn.Parameter, m.weight) for p, m in sites}
        self.dense = list(dense)
        if {id(w) for w in self.weights.values()} & {id(d) for d in self.dense}:
            raise ConfigError("SparseFinetune: a `dense` parameter is also a targeted weight; narrow targets=")
        self.pretrained: dict[str, torch.Tensor] | None = None  # the targeted weights before the full phase

    def _loop(self, train_step: Step, steps: int, params: list[nn.Parameter]) -> list[float]:
        opt = self.make_optimizer(params)
        losses = []
        was_training = self.model.training
        self.model.train()
        try:
            for _ in range(steps):
                loss = train_step(self.model)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
        finally:
            self.model.train(was_training)
        return losses

    def full_phase(self, train_step: Step | None = None, steps: int = 0) -> list[float]:
        """Snapshot the targeted weights (first call only), make them the only trainable parameters
        and run `steps` of `train_step` on them; returns the losses. Without a step it only prepares
        (train with your own loop or a ``Trainer``, then `select`)."""
        if self.name in __import__("surgery").names(self.model):
            raise ConfigError(
                f"SparseFinetune: {self.name!r} is selected already; the full phase comes before select()"
            )
        if self.pretrained is None:
            self.pretrained = {p: w.detach().clone() for p, w in self.weights.items()}
        targeted = {id(w) for w in [*self.weights.values(), *self.dense]}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in targeted)
        if steps and train_step is None:
            raise ConfigError("SparseFinetune.full_phase: steps given without train_step(model) -> loss")
        return self._loop(train_step, steps, [*self.weights.values(), *self.dense]) if train_step is not None else []

    def _diff(self, path: str) -> torch.Tensor:
        return (self.weights[path] - cast(dict, self.pretrained)[path]).reshape(-1)

    @torch.no_grad()
    def _counts(self) -> dict[str, int]:
        """Entries kept per weight: `density` of each, or of all together (the global top-k is found
        among each weight's own top-k candidates, one difference at a time: no more than k values
        per weight are held)."""
        sizes = {p: w.numel() for p, w in self.weights.items()}
        if self.scope == "tensor":
            return {p: entries(self.density, n) for p, n in sizes.items()}
        k = entries(self.density, sum(sizes.values()))
        cands = [torch.topk(self._diff(p).abs().float(), min(k, n), sorted=False).values for p, n in sizes.items()]
        owner = torch.cat([torch.full((len(c),), i, device=c.device) for i, c in enumerate(cands)])
        won = owner[torch.topk(torch.cat(cands), k, sorted=False).indices]
        return {p: n for p, n in zip(sizes, torch.bincount(won, minlength=len(cands)).tolist(), strict=True) if n}

    @torch.no_grad()
    def select(self) -> Any:
        """Keep the largest |theta - theta0| entries, put the pretrained weights back, and inject
        the "sparse" delta `name` (active) at those entries with values from zero: its values are
        then the model's only trainable parameters (with `dense`). Returns the Injection."""
        from surgery import engine
        from surgery.delta import apply
        from surgery.methods.sparse import sparse_delta

        if self.pretrained is None:
            raise ConfigError("SparseFinetune.select: no full phase has run; call full_phase(...) first")
        engine.check_name(self.model, self.name)
        picked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for p, n in self._counts().items():
            flat = self._diff(p)
            idx = torch.topk(flat.abs(), n, sorted=False).indices.sort().values.to(index_dtype(flat.numel()))
            picked[p] = (idx, torch.zeros(n, dtype=flat.dtype, device=flat.device))
        for p, w in self.weights.items():  # before the delta: its base fingerprint is the pretrained model's
            w.copy_(self.pretrained[p])
        self.pretrained = None
        inj = apply(self.model, sparse_delta(self.model, picked, name=self.name))
        for prm in self.model.parameters():
            prm.requires_grad_(False)
        for prm in [
            *self.dense,
            *(cast(SparseDelta, ad).values for ad in engine.adapters(self.model, self.name).values()),
        ]:
            prm.requires_grad_(True)
        return inj

    @property
    def nnz(self) -> int:
        """Entries selected (0 before `select`)."""
        from surgery import engine

        if self.name not in engine.names(self.model):
            return 0
        return sum(cast(SparseDelta, ad).values.numel() for ad in engine.adapters(self.model, self.name).values())

    def sparse_phase(self, train_step: Step, steps: int) -> list[float]:
        """Train only the selected entries (the delta's values; optimizer state ~ nnz) for `steps`."""
        from surgery import engine

        if self.name not in engine.names(self.model):
            raise ConfigError("SparseFinetune.sparse_phase: call select() first (after a full phase)")
        values = [cast(SparseDelta, ad).values for ad in engine.adapters(self.model, self.name).values()]
        return self._loop(train_step, steps, [*values, *self.dense])
