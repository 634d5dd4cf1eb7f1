"""The method table: every kind of surgery registers here under its name.

Adding a method means adding one file in this folder that defines a `Method` subclass
decorated with `@register` (see docs/extending.md): every module here is imported below,
so the file is all there is to it.
"""

from __future__ import annotations

import importlib
import pkgutil

from surgery.methods.base import METHODS, Method, get_method, register

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "Method", "get_method", "register"]
