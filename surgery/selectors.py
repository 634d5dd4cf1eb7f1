"""Selectors: the pattern language that yields sites.

A selector is any of

* a **glob** over dotted module paths. It matches the whole path or any dotted
  suffix of it, and its first segment may match the *end* of a segment name:
  ``"q_proj"`` hits every module whose last segment ends in ``q_proj``;
  ``"attn.*"`` hits everything inside any module whose name ends in ``attn``
  (GPT-2's ``attn.c_attn``, Llama's ``self_attn.q_proj``); ``*`` matches any
  text (dots included), ``?`` one character other than a dot, and a segment
  ``[a:b]`` an integer in ``range(a, b)`` (``"layers.[6:].mlp.*"``);
* ``"re:<regex>"``: a regular expression that must match the whole path;
* ``"@role"``: a role found from the model's dataflow graph (`surgery.graph`):
  ``@q @k @v @qkv @o @attn @mlp.up @mlp.gate @mlp.down @mlp @linear @embed @head``;
* a module type or tuple of types (``isinstance``);
* `layers(spec)`: modules whose layer index (the first integer segment of the
  path) lies in a range, e.g. ``layers("6:")``, ``layers(range(0, 4))``;
* a list of selectors (their union); `Sel` objects combine with ``|``, ``&``
  and ``~`` (``sel("@attn") & layers(":2")``);
* a callable ``(path, module) -> bool``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from torch import nn

from surgery.errors import SelectorError

ROLES = ("q", "k", "v", "qkv", "o", "attn", "mlp.up", "mlp.gate", "mlp.down", "mlp", "linear", "embed", "head")
# Roles that stand for a union of finer roles, in case the graph only names the fine ones.
_ROLE_UNIONS = {"attn": {"q", "k", "v", "qkv", "o"}, "mlp": {"mlp.up", "mlp.gate", "mlp.down"}}


@dataclass(frozen=True)
class Site:
    """One module a selector hit."""

    path: str
    type: str
    roles: frozenset[str] = field(default_factory=frozenset)
    deltas: tuple[str, ...] = ()  # the deltas injected here
    trainable: int | None = None  # with find(method=): the parameters that method would add here
    mergeable: bool | str | None = None  # with find(method=): True, or why it could not merge

    def __repr__(self) -> str:
        roles = f" {' '.join('@' + r for r in sorted(self.roles))}" if self.roles else ""
        more = f" deltas={list(self.deltas)}" if self.deltas else ""
        if self.trainable is not None:
            more += f" +{self.trainable:,} params, merge: {'yes' if self.mergeable is True else 'no'}"
        return f"<{self.path} ({self.type}){roles}{more}>"


class MatchContext:
    """What matching needs from the model, computed lazily."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._roles: dict[str, frozenset[str]] | None = None

    def roles(self) -> dict[str, frozenset[str]]:
        if self._roles is None:
            from surgery.graph import roles  # lazy: tracing is only for role selectors

            self._roles = roles(self.model)
        return self._roles


class Sel:
    """A compiled selector. Combine with ``|``, ``&``, ``~``."""

    uses_roles = False

    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        return False

    def __or__(self, other: Any) -> Sel:
        return _Any([self, sel(other)])

    def __ror__(self, other: Any) -> Sel:
        return _Any([sel(other), self])

    def __and__(self, other: Any) -> Sel:
        return _All([self, sel(other)])

    def __rand__(self, other: Any) -> Sel:
        return _All([sel(other), self])

    def __invert__(self) -> Sel:
        return _Not(self)

    @property
    def is_wildcard(self) -> bool:
        """Whether this selector may hit modules the user did not name one by one."""
        return True


class _Glob(Sel):
    def __init__(self, text: str) -> None:
        self.text = text
        self.rx, self.ranges = _compile_glob(text)

    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        return _glob_match(self.rx, self.ranges, path)

    @property
    def is_wildcard(self) -> bool:
        return any(c in self.text for c in "*?[")

    def __repr__(self) -> str:
        return repr(self.text)


class _Regex(Sel):
    def __init__(self, text: str) -> None:
        self.text = text
        self.rx = _regex(text[3:])

    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        return self.rx.fullmatch(path) is not None

    def __repr__(self) -> str:
        return repr(self.text)


class _Role(Sel):
    uses_roles = True

    def __init__(self, text: str) -> None:
        role = text[1:]
        if role not in ROLES:
            raise SelectorError(f"unknown role {text!r}; known roles: {', '.join('@' + r for r in ROLES)}")
        self.role = role
        self.accept = {role} | _ROLE_UNIONS.get(role, set())

    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        return not self.accept.isdisjoint(ctx.roles().get(path, ()))

    def __repr__(self) -> str:
        return f"'@{self.role}'"


class _Type(Sel):
    def __init__(self, types: tuple[type, ...]) -> None:
        self.types = types

    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        return isinstance(module, self.types)

    def __repr__(self) -> str:
        return "|".join(t.__name__ for t in self.types)


class _Layers(Sel):
    def __init__(self, rng: range | set[int]) -> None:
        self.rng = rng

    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        idx = layer_index(path)
        return idx is not None and idx in self.rng

    def __repr__(self) -> str:
        return f"layers({self.rng})"


class _Fn(Sel):
    def __init__(self, fn: Callable[[str, nn.Module], bool]) -> None:
        self.fn = fn

    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        return bool(self.fn(path, module))

    def __repr__(self) -> str:
        return getattr(self.fn, "__name__", "callable")


class _Any(Sel):
    def __init__(self, parts: list[Sel]) -> None:
        self.parts = parts
        self.uses_roles = any(p.uses_roles for p in parts)

    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        return any(p.match(path, module, ctx) for p in self.parts)

    @property
    def is_wildcard(self) -> bool:
        return any(p.is_wildcard for p in self.parts)

    def __repr__(self) -> str:
        return "(" + " | ".join(map(repr, self.parts)) + ")"


class _All(_Any):
    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        return all(p.match(path, module, ctx) for p in self.parts)

    def __repr__(self) -> str:
        return "(" + " & ".join(map(repr, self.parts)) + ")"


class _Not(Sel):
    def __init__(self, inner: Sel) -> None:
        self.inner = inner
        self.uses_roles = inner.uses_roles

    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        return not self.inner.match(path, module, ctx)

    def __repr__(self) -> str:
        return f"~{self.inner!r}"


_RANGE_SEG = re.compile(r"\[(-?\d*):(-?\d*)\]")


@lru_cache(maxsize=1024)
def _compile_glob(text: str) -> tuple[re.Pattern[str], tuple[tuple[int | None, int | None], ...]]:
    if not text or text.strip() != text or ".." in text or text.startswith(".") or text.endswith("."):
        raise SelectorError(f"selector {text!r} is not a valid dotted module pattern")
    ranges: list[tuple[int | None, int | None]] = []
    segs = []
    for seg in text.split("."):
        m = _RANGE_SEG.fullmatch(seg)
        if m:
            ranges.append((int(m[1]) if m[1] else None, int(m[2]) if m[2] else None))
            segs.append(r"(\d+)")
            continue
        out, i = [], 0
        while i < len(seg):
            c = seg[i]
            if c == "*":
                out.append(".*")
            elif c == "?":
                out.append("[^.]")
            elif c == "[":
                j = seg.find("]", i)
                if j < 0:
                    raise SelectorError(f"selector {text!r}: unclosed '['")
                out.append(seg[i : j + 1])
                i = j
            else:
                out.append(re.escape(c))
            i += 1
        segs.append("".join(out))
    # the first segment may match the end of a segment name ("attn" hits "self_attn"),
    # but a number range only whole segments
    lead = r"(?:^|\.)" if _RANGE_SEG.fullmatch(text.split(".")[0]) else r"(?:^|\.)[^.]*"
    rx = lead + r"\.".join(segs) + "$"
    try:
        return re.compile(rx), tuple(ranges)
    except re.error as e:
        raise SelectorError(f"selector {text!r} is not a valid pattern: {e}") from None


def _glob_match(rx: re.Pattern[str], ranges: tuple, path: str) -> bool:
    m = rx.search(path)
    if m is None:
        return False
    for (lo, hi), g in zip(ranges, m.groups(), strict=False):
        v = int(g)
        if (lo is not None and v < lo) or (hi is not None and v >= hi):
            return False
    return True


def path_matches(pattern: str, path: str) -> bool:
    """Whether a glob or ``re:`` pattern matches one dotted path (no roles)."""
    if pattern.startswith("re:"):
        return _regex(pattern[3:]).fullmatch(path) is not None
    rx, ranges = _compile_glob(pattern)
    return _glob_match(rx, ranges, path)


@lru_cache(maxsize=256)
def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as e:
        raise SelectorError(f"selector 're:{text}' is not a valid regular expression: {e}") from None


def layer_index(path: str) -> int | None:
    """The first integer segment of a path: the index in the model's layer list."""
    for seg in path.split("."):
        if seg.isdigit():
            return int(seg)
    return None


def layers(spec: str | int | range | Iterable[int]) -> Sel:
    """Select modules by layer index: ``layers("6:")``, ``layers("0:4")``,
    ``layers(3)``, ``layers(range(2, 8, 2))``, ``layers([0, 11])``."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return _Layers({spec})
    if isinstance(spec, range):
        return _Layers(spec)
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", spec)
        if m is None:
            raise SelectorError(f"layer range {spec!r} must look like 'a:b', 'a:' or ':b'")
        lo = int(m[1]) if m[1] else 0
        hi = int(m[2]) if m[2] else 1 << 30
        return _Layers(range(lo, hi))
    try:
        return _Layers({int(i) for i in spec})  # type: ignore[union-attr]  # a bool is refused here
    except (TypeError, ValueError):
        raise SelectorError(f"layer range {spec!r} must be 'a:b', an int, a range or ints") from None


def sel(selector: Any) -> Sel:
    """Compile any selector form into a `Sel`."""
    if isinstance(selector, Sel):
        return selector
    if isinstance(selector, str):
        s = selector.strip()
        if s.startswith("re:"):
            return _Regex(s)
        if s.startswith("@"):
            return _Role(s)
        return _Glob(s)
    if isinstance(selector, type) and issubclass(selector, nn.Module):
        return _Type((selector,))
    if (
        isinstance(selector, tuple)
        and selector
        and all(isinstance(t, type) and issubclass(t, nn.Module) for t in selector)
    ):
        return _Type(selector)
    if isinstance(selector, (list, tuple, set, frozenset)):
        if not selector:
            raise SelectorError("an empty list of selectors selects nothing; give at least one pattern")
        return _Any([sel(s) for s in selector])
    if callable(selector):
        return _Fn(selector)
    raise SelectorError(
        f"cannot use {selector!r} as a selector; use a glob string, 're:<regex>', '@role', "
        "a module type, surgery.layers(...), a list of these, or a callable (path, module) -> bool"
    )


def select(
    model: nn.Module, selector: Any, *, skip: Callable[[str], bool] | None = None
) -> list[tuple[str, nn.Module]]:
    """All (path, module) pairs of `model` that `selector` hits, in module order."""
    s = sel(selector)
    ctx = MatchContext(model)
    hits = []
    for path, module in model.named_modules():
        if not path or (skip is not None and skip(path)):
            continue
        if s.match(path, module, ctx):
            hits.append((path, module))
    return hits


def no_hit_error(model: nn.Module, selector: Any, *, skip: Callable[[str], bool] | None = None) -> SelectorError:
    """The error for a selector that hits nothing, naming the closest module paths."""
    paths = [p for p, _ in model.named_modules() if p and not (skip and skip(p))]
    text = str(selector)
    probe = text[3:] if text.startswith("re:") else text.lstrip("@").replace("*", "")
    lasts = sorted({p.rsplit(".", 1)[-1] for p in paths})
    near = difflib.get_close_matches(probe, lasts, n=5, cutoff=0.4)
    near_paths = difflib.get_close_matches(probe, paths, n=3, cutoff=0.3)
    hint = ", ".join([repr(n) for n in near] + [repr(p) for p in near_paths if p not in near]) or (
        ", ".join(repr(p) for p in paths[:5])
    )
    return SelectorError(
        f"selector {selector!r} hits no module of {type(model).__name__}; closest module names: {hint}. "
        "Use surgery.find(model, pattern) to preview a selector."
    )
