"""Per-row routing: which slot of a bank each row of the batch uses, for the calls in a context.

`surgery.route(model, slots)` is a per-call input, never module state: it is kept in a
`contextvars.ContextVar` (per thread, per asyncio task) like `surgery.use`, so concurrent
requests on one model each see their own rows' deltas. The plan it builds once per context
holds the row -> slot index on the bank's device and the rows grouped by rank, so every site
does one gathered batched matmul per rank group whatever the number of distinct deltas.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery import context, engine
from surgery.errors import SlotError
from surgery.serving.bank import SlotBank, bank_of


@dataclass(frozen=True)
class Group:
    """Rows that run at one rank: `idx` their slots (the zero slot for base rows), `rows`
    their positions in the batch (None: all rows, in order)."""

    rank: int
    idx: torch.Tensor
    rows: torch.Tensor | None


@dataclass
class Plan:
    """A batch's route over one bank: per row, its slot (`idx`, the zero slot for the base),
    the rows grouped so that no group pads a rank by more than 2x, and whether any routed
    slot scales the output (DoRA, IA3)."""

    bank: SlotBank
    rows: int
    idx: torch.Tensor
    full: Group  # all rows at max_rank: the one shape torch.compile sees
    groups: tuple[Group, ...]
    scaled: bool
    ids: list[int]  # per row, -1 for the base
    # site, rank -> the rows' gathered A and B, kept while the route is open (None: not kept). On a
    # CPU the gather costs as much as the matmuls that read it; decoding steps reuse it. Its size
    # is at most the bank's when rows <= slots, and the slots it copies cannot change meanwhile.
    cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None
    wider: dict[int, Plan] = field(default_factory=dict)

    def close(self) -> None:
        for p in (self, *self.wider.values()):
            p.wider, p.cache = {}, None

    def expanded(self, n: int) -> Plan:
        """The plan for a batch of `n` = k * rows rows, each row repeated k times in place
        (what `generate` does for beams and `num_return_sequences`)."""
        got = self.wider.get(n)
        if got is not None:
            return got
        if n % self.rows:
            raise SlotError(
                f"the route gives {self.rows} rows a slot each but the model got a batch of {n} rows; route "
                "one slot per row of the batch the model runs"
            )
        k = n // self.rows
        got = self.wider[n] = build(self.bank, [s for s in self.ids for _ in range(k)])
        return got


def _bucket(rank: int, max_rank: int) -> int:
    """The rank a group computes at: the next power of two (so padding wastes at most 2x)."""
    return 0 if rank <= 0 else min(max_rank, 1 << (rank - 1).bit_length())


def build(bank: SlotBank, ids: list[int]) -> Plan:
    zero, dev = bank.slots, bank.device
    slot_idx = [zero if s < 0 else s for s in ids]
    idx = torch.tensor(slot_idx, dtype=torch.long, device=dev)
    buckets: dict[int, list[int]] = {}
    for row, s in enumerate(ids):
        if s >= 0:
            buckets.setdefault(_bucket(bank.ranks[s], bank.max_rank), []).append(row)
    buckets.pop(0, None)  # rank 0 (an output scale alone): nothing to multiply
    if len(buckets) == 1:  # one rank: every row in one batched matmul (base rows read the zero slot)
        groups: tuple[Group, ...] = (Group(next(iter(buckets)), idx, None),)
    else:
        groups = tuple(
            Group(
                r,
                torch.tensor([slot_idx[i] for i in rows], dtype=torch.long, device=dev),
                torch.tensor(rows, dtype=torch.long, device=dev),
            )
            for r, rows in sorted(buckets.items())
        )
    scaled = any(s >= 0 and bank.scaled[s] for s in ids)
    keep = dev.type == "cpu" and len(ids) <= bank.slots + 1
    cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = {} if keep else None
    return Plan(bank, len(ids), idx, Group(bank.max_rank, idx, None), groups, scaled, list(ids), cache)


def _row_ids(bank: SlotBank, slots: Any) -> list[int]:
    if isinstance(slots, torch.Tensor):
        if slots.dim() != 1 or slots.dtype.is_floating_point or slots.dtype == torch.bool:
            raise SlotError(
                f"route: slots as a tensor must be 1-D integers (one per row), got {slots.dtype} {tuple(slots.shape)}"
            )
        slots = slots.tolist()
    if isinstance(slots, (str, bytes)) or not hasattr(slots, "__iter__"):
        raise SlotError(
            f"route: slots is one slot id per row of the batch (an int, -1 or None for the base), got {slots!r}"
        )
    ids = []
    for s in slots:
        if s is None or (isinstance(s, int) and not isinstance(s, bool) and s == -1):
            ids.append(-1)
        else:
            ids.append(bank.check_slot(s))
    if not ids:
        raise SlotError("route: slots is empty; give one slot id per row of the batch")
    return ids


@contextlib.contextmanager
def route(model: nn.Module, slots: Any, bank: SlotBank | str | None = None) -> Iterator[Plan]:
    """Within this context (this thread / asyncio task only), row i of every batch `model` runs
    uses the delta in slot ``slots[i]`` of its bank (-1 or None: the base), together with the
    deltas active otherwise. `slots` is a list, a tuple or a 1-D integer tensor, one id per row
    (a batch k times as long, as `generate` makes for beams, repeats each row's id k times).
    While the context is open the slots it uses cannot be loaded or unloaded."""
    engine.check_model(model)
    if not isinstance(bank, SlotBank):
        bank = bank_of(model, bank)
    assert bank is not None
    if bank.model_ref() is not model:
        raise SlotError("route: this bank belongs to another model")
    ids = _row_ids(bank, slots)
    plan = build(bank, ids)
    try:
        with install(model, plan):
            yield plan
    finally:
        plan.close()


@contextlib.contextmanager
def install(model: nn.Module, plan: Plan) -> Iterator[Plan]:
    """Route the calls in this context by a plan built before (`build`): a caller that runs the same
    rows again (the decoding steps of one batch) keeps the plan and its gathered factors between
    contexts, as long as it holds the plan's slots meanwhile (so their contents cannot change)."""
    used = sorted({s for s in plan.ids if s >= 0})
    plan.bank.acquire(used)
    try:
        st = engine.state_of(model)
        assert st is not None
        spec = st.active()
        if plan.bank.name not in engine.spec_names(spec):
            spec = (*spec, plan.bank.name)
        with context.choose(st.token, spec), context.routed(st.token, plan):
            yield plan
    finally:
        plan.bank.release(used)
