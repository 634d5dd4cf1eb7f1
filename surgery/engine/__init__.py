"""The injection engine: in place, at the leaves, reversible.

A site is a leaf module (Linear, Conv1D, Conv, Embedding). Injection adds hooks to the site and
puts the adapters in a child ``ModuleDict`` named ``surgery`` (so they are parameters of the
model: optimizers, the `Trainer`, DDP and `.to()` see them). The module keeps its class, its own
parameters keep their names, and nothing of `transformers` is copied. Removing the last delta of
a site drops the hooks and the child: the module tree and `state_dict` are those of the
original, bit for bit.

Which deltas are active is context-local: `use` / `disable` set a `contextvars.ContextVar` (per
thread, per asyncio task), `activate` sets the model's default. The hooks read it on every
call, so two threads running one model with different deltas each get their own result.

One job per module, imported in one direction (state <- runtime <- merging <- saving <- lifecycle;
active and trainable beside them):

* `state`: the records (`Injection`, `ModelState`) and every lookup on them, the only reader
  of the engine's fields for the rest of the library;
* `runtime`: the hooks that run adapters by their declared `Action`, bypasses, taps, the root hook;
* `active`: the default active set and `use` / `disable`;
* `lifecycle`: `inject`, `attach`, `remove`;
* `merging`: `merge`, `unmerge`, `merged`;
* `saving`: `base_state_dict` and the `save_pretrained` that writes the base alone;
* `trainable`: `freeze`, `unfreeze`.
"""

from __future__ import annotations

from surgery.engine.active import activate, active, base_only, disable, spec_names, use
from surgery.engine.lifecycle import attach, check_name, check_overlap, inject, remove, resolve_sites
from surgery.engine.merging import merge, mergeable, merged, refuse_4bit, unmerge
from surgery.engine.saving import base_state_dict
from surgery.engine.state import (
    CHILD,
    Injection,
    adapters,
    base_params,
    cache_fingerprint,
    cached_fingerprint,
    check_model,
    config_of,
    context_key,
    held_paths,
    injection,
    is_adapter_path,
    method_of,
    names,
    reconfigure,
    site_module,
    sites_of,
    state_of,
    with_action,
)
from surgery.engine.trainable import freeze, unfreeze

__all__ = [
    "CHILD",
    "Injection",
    "activate",
    "active",
    "adapters",
    "base_params",
    "attach",
    "base_only",
    "base_state_dict",
    "cache_fingerprint",
    "cached_fingerprint",
    "check_model",
    "check_name",
    "check_overlap",
    "config_of",
    "context_key",
    "disable",
    "freeze",
    "held_paths",
    "inject",
    "injection",
    "is_adapter_path",
    "merge",
    "mergeable",
    "merged",
    "refuse_4bit",
    "method_of",
    "names",
    "reconfigure",
    "remove",
    "resolve_sites",
    "site_module",
    "sites_of",
    "spec_names",
    "state_of",
    "unfreeze",
    "unmerge",
    "use",
    "with_action",
]
