"""Serving many deltas at once: slot banks (`serve`) and per-row routing (`route`).

    bank = surgery.serve(model, slots=64, max_rank=16, targets="@linear")
    bank.load(3, hub.pull("acme/sql@prod"))
    with surgery.route(model, [3, -1, 3]):    # one slot per row; -1 / None: the base
        out = model.generate(**batch)

`Batcher` runs requests for different slots as rows of every decode step (iteration-level
batching); `registry.AdapterPool` manages which deltas are resident in a bank's slots.
"""

from __future__ import annotations

from surgery.serving.bank import BankAdapter, Prepared, SlotBank, bank_of, serve
from surgery.serving.batcher import Batcher, Request, Sampling
from surgery.serving.route import Plan, route

__all__ = ["BankAdapter", "Batcher", "Plan", "Prepared", "Request", "Sampling", "SlotBank", "bank_of", "route", "serve"]
