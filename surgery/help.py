"""The help text of `surgery.inject`: every registered method and its config keys, built from
the methods' Config dataclasses (name, type, default) and the "Attributes:" section of each
Config's docstring (the meaning), so ``help(surgery.inject)`` never lags the code."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import textwrap
from typing import Any

from surgery.methods.base import METHODS, Method

_MARK = "Methods and their config keys"  # where the generated part of inject's docstring starts
_ITEM = re.compile(r"^(\w+)\s*:\s*(.*)$")


def field_docs(config: type) -> dict[str, str]:
    """Field name -> meaning, from the "Attributes:" section of a Config class's docstring
    (one ``name: meaning`` per field; a more indented line continues the meaning before it)."""
    lines = inspect.cleandoc(config.__doc__ or "").splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if at is None:
        return {}
    out: dict[str, str] = {}
    indent, last = None, None
    for raw in lines[at + 1 :]:
        if not raw.strip():
            continue
        depth = len(raw) - len(raw.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:  # the section ended
            break
        m = _ITEM.match(raw.strip())
        if depth == indent and m:
            last = m.group(1)
            out[last] = m.group(2)
        elif last is not None:
            out[last] += " " + raw.strip()
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def _summary(method: Method) -> str:
    """The first sentence of the method's module docstring (or its class docstring)."""
    doc = sys.modules[type(method).__module__].__doc__ or type(method).__doc__ or ""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    end = para.find(". ")
    return para if end < 0 else para[: end + 1]


def method_help(method: Method) -> str:
    """One method's entry: its summary, then each config key with type, default and meaning."""
    docs = field_docs(method.Config)
    lines = textwrap.wrap(f"{method.name!r}: {_summary(method)}", 100, subsequent_indent=" " * 4)
    for f in dataclasses.fields(method.Config):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", repr(f.type))
        lines.append(f"    {f.name}: {ann} = {_default(f)}")
        meaning = docs.get(f.name, "(undocumented)")
        lines.extend(textwrap.wrap(meaning, 92, initial_indent=" " * 8, subsequent_indent=" " * 8))
    return "\n".join(lines)


def methods_help() -> str:
    """The generated part of `inject`'s docstring: every registered method, sorted by name."""
    head = (
        f"{_MARK} (``surgery.inject(model, method, targets, name, **config)``; "
        "an unknown key is a ConfigError that lists the known ones):"
    )
    return "\n\n".join(["\n".join(textwrap.wrap(head, 100)), *(method_help(METHODS[n]) for n in sorted(METHODS))])


def document(fn: Any) -> None:
    """Append (or refresh) the methods' help in `fn.__doc__` (`surgery.inject`)."""
    base = (fn.__doc__ or "").split("\n    " + _MARK)[0].rstrip()
    fn.__doc__ = base + "\n\n" + textwrap.indent(methods_help(), "    ") + "\n"


__all__ = ["document", "field_docs", "method_help", "methods_help"]
