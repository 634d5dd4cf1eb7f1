"""Which deltas run: the model's default active set (`activate`) and, per thread and asyncio
task, the set a `use` / `disable` context chooses (through `surgery.context`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from surgery import compose, context
from surgery.engine.state import ModelState, get_entry, state_of
from surgery.errors import MergeError


def activate(model: nn.Module, *names: Any) -> None:
    """Set the deltas active by default (outside any `use` / `disable`): names or
    composition blocks (`surgery.Stack`, `Fuse`, `Average`, `Parallel`, `BatchSplit`)."""
    st, spec = check_active(model, names)
    if st is not None:
        st.default_active = spec


def spec_names(spec: tuple[Any, ...]) -> list[str]:
    out: list[str] = []
    for it in spec:
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, compose.Block):
            out.extend(it.names())
            if isinstance(it, compose.Fuse) and it.fusion:
                out.append(it.fusion)
    return out


def check_active(model: nn.Module, names: tuple[Any, ...]) -> tuple[ModelState | None, tuple[Any, ...]]:
    st = state_of(model)
    if st is None:
        for n in names:
            if isinstance(n, compose.Block):
                n = next(iter(n.names()))
            get_entry(model, n)
        return None, ()
    merged = st.merged()
    for n in names:
        if isinstance(n, str):
            get_entry(model, n)
    spec = compose.normalize(st.deltas(), tuple(names), merged)
    off = sorted(merged - set(spec_names(spec)))
    if off:
        raise MergeError(
            f"delta(s) {off} are merged into the base weights and cannot be switched off; "
            f"surgery.unmerge(model, {off[0]!r}) first"
        )
    return st, spec


@contextlib.contextmanager
def use(model: nn.Module, *names: Any) -> Iterator[None]:
    """Within this context (this thread / asyncio task only), run `model` with exactly these
    deltas: names, or composition blocks (`surgery.Stack`, `Fuse`, `Average`, `Parallel`,
    `BatchSplit`) that say how they combine."""
    st, spec = check_active(model, names)
    if st is None:  # nothing injected: the base alone either way
        yield
        return
    with context.choose(st.token, spec):
        yield


base_only = context.base_only  # the base alone, unchecked: for tracing


def disable(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within this context, run the base alone."""
    return use(model)


def active(model: nn.Module) -> tuple[Any, ...]:
    """The deltas active for `model` in the current context (names and blocks)."""
    st = state_of(model)
    return st.active() if st else ()
