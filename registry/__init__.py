"""registry: the storage side of model-surgery: a versioned, content-addressed hub of deltas.

    import registry
    hub = registry.Hub()                     # $SURGERY_HUB, else ~/.cache/model-surgery/hub
    ref = hub.push(model, "acme/sql", adapter="sql", alias="staging")
    hub.load(model, "acme/sql@staging")      # verified; hot-swapped in place if it fits

Depends on `surgery`; `surgery` never imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

from registry.errors import BaseMismatchError, IntegrityError, NotFoundError, PoolError, RefError, RegistryError
from registry.hub import Hub
from registry.pool import AdapterPool, Lease
from registry.refs import Ref

# provided by registry.peft_format, imported on first use (so a missing optional module
# never breaks `import registry`)
_LAZY = {"save_peft": "registry.peft_format", "load_peft": "registry.peft_format", "export_vllm": "registry.vllm"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'registry' has no attribute {name!r}")


__all__ = [
    "AdapterPool",
    "BaseMismatchError",
    "Hub",
    "IntegrityError",
    "Lease",
    "NotFoundError",
    "PoolError",
    "Ref",
    "RefError",
    "RegistryError",
    "export_vllm",
    "load_peft",
    "save_peft",
]
