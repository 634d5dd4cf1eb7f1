"""Which parameters train: `freeze` / `unfreeze` by selector (a merged delta's tensors stay frozen)."""

from __future__ import annotations

from typing import Any

from torch import nn

from surgery.engine.state import check_model, state_of
from surgery.selectors import no_hit_error, sel, select


def freeze(model: nn.Module, targets: Any = None) -> int:
    """Make the parameters of the modules `targets` hits (default: all) untrainable.
    Returns how many parameters changed."""
    return _set_trainable(model, targets, False)


def unfreeze(model: nn.Module, targets: Any = None) -> int:
    """Make the parameters of the modules `targets` hits (default: all) trainable,
    e.g. ``unfreeze(model, layers("10:"))`` or ``unfreeze(model, "@head")``."""
    return _set_trainable(model, targets, True)


def _set_trainable(model: nn.Module, targets: Any, flag: bool) -> int:
    check_model(model)
    if targets is None:
        params = list(model.parameters())
    else:
        st = state_of(model)
        skip = st.is_adapter_path if st else None
        hits = select(model, sel(targets), skip=skip)
        if not hits:
            raise no_hit_error(model, targets, skip=skip)
        seen: dict[int, nn.Parameter] = {}
        for _, mod in hits:
            for p in mod.parameters():
                seen.setdefault(id(p), p)
        params = list(seen.values())
    st = state_of(model)
    if flag and st is not None and st.frozen:  # a merged delta's tensors cannot train until unmerged
        merged_ids = {id(p) for ps in st.frozen.values() for p, _ in ps}
        params = [p for p in params if id(p) not in merged_ids]
    n = 0
    for p in params:
        if p.requires_grad != flag and (p.is_floating_point() or p.is_complex()):
            p.requires_grad_(flag)
            n += p.numel()
    return n
