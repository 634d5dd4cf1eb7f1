"""The base alone while deltas are injected: `base_state_dict`, and the `save_pretrained` that
writes it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery import distributed
from surgery.engine.merging import site_tensor
from surgery.engine.state import check_model, state_of
from surgery.merge import unmerge_weight


class SaveBase:
    """`save_pretrained` of an injected transformers model, set on the instance while deltas are
    injected: it writes the base alone (`base_state_dict`), so `from_pretrained` reloads the plain
    model with no unexpected keys. A `state_dict=` given by the caller (the Trainer's checkpoints,
    which hold the adapters) is written as given. Deltas travel as Deltas (`surgery.delta`, the hub)."""

    def __init__(self, model: nn.Module, prev: Any) -> None:
        self.model, self.prev = model, prev  # prev: an instance-level save_pretrained we shadow

    def __call__(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("state_dict") is None:
            kwargs["state_dict"] = base_state_dict(self.model)
        if self.prev is not None:
            return self.prev(save_directory, *args, **kwargs)
        return type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)  # type: ignore[attr-defined]


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's `state_dict` while deltas are injected: no injected tensors, and the weights
    of merged sites as they were before the merge (recomputed exactly on a copy; the model is not
    touched). `model.state_dict()` itself keeps the injected tensors (optimizers, the Trainer's
    checkpoints and DDP rely on it). A DDP wrapper is read through its `.module`; a sharded model
    (FSDP2) gives its `DTensor` shards, as its `state_dict` does, each merged shard restored."""
    check_model(model)
    model = distributed.unwrap(model)
    distributed.reshard(model)
    sd = model.state_dict()
    st = state_of(model)
    if st is None:
        return sd
    out = {k: v for k, v in sd.items() if not st.is_adapter_path(k)}
    for path, site in st.sites.items():
        for tname in {t for _, recs in site.merged for t in recs}:
            key = f"{path}.{tname}"
            if key in out:
                w = site_tensor(site, tname).detach().clone()
                loc = distributed.local_tensor(w)  # a shard's own rows: its records are the shard's
                for _, recs in reversed(site.merged):  # last merged first, as unmerge does
                    if tname in recs and (loc.numel() or not w.numel()):
                        unmerge_weight(loc, recs[tname])
                out[key] = w
    return out
