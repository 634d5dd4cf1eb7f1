"""The per-call routing context: which deltas run, per thread and per asyncio task.

Each injected model's state has a token; a `contextvars.ContextVar` maps tokens to the spec
(names and composition blocks) chosen by `surgery.use` / `disable` in this context, and
another to the per-row route `surgery.route` chose (which slot of a bank each row uses). This module
knows no engine: the engine, the graph (which traces the base with every delta off) and the
sublayer probes all go through it, so none of them imports another to switch deltas.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from torch import nn

STATE_ATTR = "_surgery_state"  # where a model keeps its engine state (an instance attribute)

# token of a model's state -> spec active in this context; None: no override anywhere
_OVERRIDE: ContextVar[dict[int, tuple[Any, ...]] | None] = ContextVar("surgery_active", default=None)
# token of a model's state -> the per-row route of this context (a serving plan); None: none anywhere
_ROUTE: ContextVar[dict[int, Any] | None] = ContextVar("surgery_route", default=None)
_tokens = itertools.count(1)


def new_token() -> int:
    """A fresh token for a model's state (a deep copy gets its own: switching one never switches the other)."""
    return next(_tokens)


def override(token: int) -> tuple[Any, ...] | None:
    """The spec chosen for this token in the current context, or None when none was."""
    ov = _OVERRIDE.get()
    return None if ov is None else ov.get(token)


@contextlib.contextmanager
def _scoped(var: ContextVar[dict[int, Any] | None], token: int, value: Any) -> Iterator[None]:
    cur = var.get()
    tok = var.set({**(cur or {}), token: value})
    try:
        yield
    finally:
        var.reset(tok)


def choose(token: int, spec: tuple[Any, ...]) -> contextlib.AbstractContextManager[None]:
    """Within this context (this thread / asyncio task only), the model with this token runs `spec`."""
    return _scoped(_OVERRIDE, token, spec)


def routing(token: int) -> Any:
    """The per-row route chosen for this token in the current context (`surgery.route`), or None."""
    r = _ROUTE.get()
    return None if r is None else r.get(token)


def routed(token: int, plan: Any) -> contextlib.AbstractContextManager[None]:
    """Within this context, the model with this token routes its batch rows by `plan`."""
    return _scoped(_ROUTE, token, plan)


@contextlib.contextmanager
def base_only(model: nn.Module) -> Iterator[None]:
    """No injected delta runs in this context, with no checks (merged ones stay in the
    weights): for tracing or probing the base."""
    st = model.__dict__.get(STATE_ATTR)
    if st is None:
        yield
        return
    with choose(st.token, ()):
        yield
