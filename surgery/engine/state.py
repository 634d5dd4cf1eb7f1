"""The engine's records of one model: which deltas are injected where, and the lookups on them.

A model's `ModelState` lives in its instance `__dict__` (`context.STATE_ATTR`): the deltas
(`Entry`: the `Injection` record, the method and its parsed config), the sites (`runtime.Site`:
the adapters at one module and its hooks), the default active set and the merged deltas' frozen
tensors. Everything outside the engine reads it through the functions here, never its fields.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from surgery import context, distributed
from surgery.errors import InjectionError, MergeError, ModelTypeError
from surgery.methods.base import Action, Adapter, Method

CHILD = "surgery"  # name of the ModuleDict of adapters inside a site module


@dataclass(frozen=True)
class Injection:
    """The record `inject` returns: what was injected, where."""

    name: str
    method: str
    sites: tuple[str, ...]
    config: dict[str, Any]

    def __repr__(self) -> str:
        more = f", ... {len(self.sites)} sites" if len(self.sites) > 3 else ""
        return f"Injection(name={self.name!r}, method={self.method!r}, sites={list(self.sites[:3])}{more})"


class Entry:
    """One named delta: its record, method and parsed config."""

    __slots__ = ("injection", "method", "cfg")

    def __init__(self, injection: Injection, method: Method, cfg: Any) -> None:
        self.injection, self.method, self.cfg = injection, method, cfg


class ModelState:
    """Everything the engine knows about one model."""

    def __init__(self) -> None:
        self.token = context.new_token()
        self.entries: dict[str, Entry] = {}
        self.sites: dict[str, Any] = {}  # path -> runtime.Site (state is imported by runtime, not the reverse)
        self.default_active: tuple[Any, ...] = ()
        self.taps: dict[str, Any] = {}  # entry module path -> its input tap (runtime.Tap)
        self.root: Any = None  # handle of the model's pre-hook (Parallel repeats the inputs)
        self.params: list[nn.Parameter] = []
        self.requires_grad: list[bool] = []  # flags of `params` before the first injection
        self.fingerprint: str | None = None  # the base's, cached by surgery.fingerprint
        # merged delta -> its tensors and their requires_grad flags before merge (frozen while merged)
        self.frozen: dict[str, list[tuple[nn.Parameter, bool]]] = {}
        self.spec_now: tuple[Any, ...] = ()  # the active spec the last model call pinned (read under torch.compile)
        self.route_now: Any = None  # the per-row route the last model call pinned (read under torch.compile)
        self.specs: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # interned specs: stable objects for dynamo's guards

    def __deepcopy__(self, memo: dict) -> ModelState:
        # a copied model gets its own context token: use()/disable() on one must not switch the other
        new = ModelState.__new__(ModelState)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            setattr(new, k, copy.deepcopy(v, memo))
        new.token = context.new_token()
        new.route_now = None
        return new

    def override(self) -> tuple[Any, ...] | None:
        return context.override(self.token)

    def pin(self) -> tuple[Any, ...]:
        """The active spec of this call, kept in `spec_now` (interned: equal specs are one object)."""
        spec = self.active()
        if len(self.specs) > 256:  # bounded: blocks built with ever new weights would otherwise pile up
            self.specs.clear()
        self.spec_now = spec = self.specs.setdefault(spec, spec)
        self.route_now = context.routing(self.token)
        return spec

    def check_frozen(self) -> None:
        """A merged delta's tensors take no part in the forward: training them would silently do
        nothing, so a forward under autograd refuses once something made them trainable again."""
        for name, params in self.frozen.items():
            if any(p.requires_grad for p, _ in params):
                raise MergeError(
                    f"delta {name!r} is merged into the base weights: its tensors take no part in the forward "
                    f"and would get no gradient, yet some of them require grad again. surgery.unmerge(model, "
                    f"{name!r}) to train it, or run under torch.no_grad() for inference"
                )

    def active(self) -> tuple[Any, ...]:
        if torch.compiler.is_compiling():
            # dynamo cannot read a ContextVar (a graph break at every site, a recompile per adapter):
            # the root hook pinned this call's spec, a plain value dynamo guards on
            return self.spec_now
        names = context.override(self.token)
        return self.default_active if names is None else names

    def route(self) -> Any:
        """The per-row route of this call (`surgery.route`), or None."""
        if torch.compiler.is_compiling():
            return self.route_now
        return context.routing(self.token)

    def deltas(self) -> dict[str, tuple[str, ...]]:
        """Delta name -> the members it composes over (() but for fusions)."""
        return {n: e.method.members(e.cfg) for n, e in self.entries.items()}

    def merged(self) -> set[str]:
        return {mn for s in self.sites.values() for mn, _ in s.merged}

    def is_adapter_path(self, path: str) -> bool:
        head, sep, _ = path.partition("." + CHILD)
        return bool(sep) and head in self.sites


def check_model(model: Any) -> None:
    """Refuse anything but a module where the model goes (every public verb comes through here)."""
    if not isinstance(model, nn.Module):
        hint = (
            " (a model id or path? load it first, e.g. transformers.AutoModel.from_pretrained(...))"
            if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__")
            else ""
        )
        shown = repr(model)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ModelTypeError(
            f"expected the model, a torch.nn.Module, as the first argument; got {type(model).__name__} "
            f"{shown}{hint}. Pass the model object itself, e.g. surgery.inject(model, 'lora')"
        )


def state_of(model: nn.Module) -> ModelState | None:
    if not isinstance(model, nn.Module):
        check_model(model)
    return distributed.unwrap(model).__dict__.get(context.STATE_ATTR)  # a DDP wrapper: its .module's


def get_entry(model: nn.Module, name: str) -> Entry:
    st = state_of(model)
    if st is None or name not in st.entries:
        have = sorted(st.entries) if st else []
        raise InjectionError(f"no delta named {name!r} in this model; injected: {have or 'none'}")
    return st.entries[name]


def base_params(model: nn.Module) -> list[nn.Parameter]:
    """The base's parameters as recorded at the first injection ([] with nothing injected)."""
    st = state_of(model)
    if st is None:
        return []
    # fully_shard after injection puts new (DTensor) parameters in the same places: the current ones
    now = [p for k, p in distributed.unwrap(model).named_parameters() if not st.is_adapter_path(k)]
    return now if len(now) == len(st.params) else list(st.params)


def names(model: nn.Module) -> list[str]:
    """Names of the deltas injected into `model`, in injection order."""
    st = state_of(model)
    return list(st.entries) if st else []


def injection(model: nn.Module, name: str) -> Injection:
    return get_entry(model, name).injection


def adapters(model: nn.Module, name: str) -> dict[str, Adapter]:
    """Site path -> adapter module of one delta."""
    entry = get_entry(model, name)
    st = state_of(model)
    assert st is not None
    return {p: st.sites[p].adapters[name] for p in entry.injection.sites}


def site_module(model: nn.Module, path: str) -> nn.Module:
    st = state_of(model)
    if st is not None and path in st.sites:
        return st.sites[path].module
    return distributed.unwrap(model).get_submodule(path)


def reconfigure(model: nn.Module, name: str, cfg: Any, config: dict[str, Any]) -> Injection:
    """Give an injected delta a new config (a hot-swap brought other settings); returns its new record."""
    e = get_entry(model, name)
    e.cfg = cfg
    e.injection = dataclasses.replace(e.injection, config=config)
    return e.injection


def method_of(model: nn.Module, name: str) -> Method:
    """The method of an injected delta."""
    return get_entry(model, name).method


def config_of(model: nn.Module, name: str) -> Any:
    """The parsed config (the method's Config dataclass) of an injected delta."""
    return get_entry(model, name).cfg


def sites_of(model: nn.Module) -> dict[str, dict[str, Adapter]]:
    """Site path -> {delta name: adapter}, for every site of the model (merged deltas included)."""
    st = state_of(model)
    return {} if st is None else {p: {n: cast(Adapter, a) for n, a in s.adapters.items()} for p, s in st.sites.items()}


def held_paths(model: nn.Module) -> list[str]:
    """Paths of the modules the engine holds: every site, and every module whose input a site reads."""
    st = state_of(model)
    return [] if st is None else [*st.sites, *st.taps]


def with_action(model: nn.Module, action: Action) -> list[Adapter]:
    """Every adapter of the model (active or not) that declares `action`."""
    return [a for ads in sites_of(model).values() for a in ads.values() if a.action is action]


def context_key(model: nn.Module) -> int | None:
    """A key for per-call values tied to this model (a deep copy gets another), None if nothing is injected."""
    st = state_of(model)
    return None if st is None else st.token


def is_adapter_path(model: nn.Module, path: str) -> bool:
    """Whether `path` names an injected module (inside a site's `surgery` child)."""
    st = state_of(model)
    return st is not None and st.is_adapter_path(path)


def cached_fingerprint(model: nn.Module) -> str | None:
    st = state_of(model)
    return None if st is None else st.fingerprint


def cache_fingerprint(model: nn.Module, value: str) -> None:
    st = state_of(model)
    if st is not None:
        st.fingerprint = value
