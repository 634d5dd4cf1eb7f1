"""The injection engine: in place, at the leaves, reversible.

A site is a leaf module (Linear, Conv1D, Conv, Embedding). Injection adds one
forward hook to the site and puts the adapters in a child ``ModuleDict`` named
``surgery`` (so they are parameters of the model: optimizers, the `Trainer`,
DDP and `.to()` see them). The module keeps its class, its own parameters keep
their names, and nothing of `transformers` is copied. Removing the last delta
of a site drops the hook and the child: the module tree and `state_dict` are
those of the original, bit for bit.

Which deltas are active is context-local: `use` / `disable` set a
`contextvars.ContextVar` (per thread, per asyncio task), `activate` sets the
model's default. The hook reads it on every call, so two threads running one
model with different deltas each get their own result.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from surgery import compose, context
from surgery.errors import (
    CompositionError,
    InjectionError,
    MergeError,
    ModelTypeError,
    SelectorError,
    SurgeryError,
)
from surgery.merge import MergeRecord, merge_weight, unmerge_weight, update_of
from surgery.methods.base import Action, Adapter, Method, NotMergeable, SiteView, get_method
from surgery.selectors import no_hit_error, sel, select

CHILD = "surgery"  # name of the ModuleDict of adapters inside a site module
_NAME_RX = re.compile(r"[A-Za-z0-9_\-]{1,64}")


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


class _Entry:
    """One named delta: its record, method and parsed config."""

    __slots__ = ("injection", "method", "cfg")

    def __init__(self, injection: Injection, method: Method, cfg: Any) -> None:
        self.injection, self.method, self.cfg = injection, method, cfg


class _Site:
    """The adapters at one module, and the hook that runs them."""

    def __init__(self, state: _State, path: str, module: nn.Module, model: nn.Module) -> None:
        self.state = state
        self.path = path
        self.module = module
        self.view = SiteView(weakref.proxy(model), path, module)
        self.live: dict[str, Adapter] = {}  # injected and not merged
        # a stack, last merged on top: (delta, base tensor name -> its merge record)
        self.merged: list[tuple[str, dict[str, MergeRecord]]] = []
        self.pre: Any = None  # the input pre-hook's handle, while an INPUT adapter is here
        self.bypass: list[tuple[nn.Module, Any]] = []  # (module, its own instance `forward` or None) we replaced
        self.taps: list[_Tap] = []  # taps of the entries its adapters read
        if CHILD in module._modules:
            raise InjectionError(f"module {path!r} already has a child named {CHILD!r}; cannot inject there")
        module.add_module(CHILD, nn.ModuleDict())
        self.handle = module.register_forward_hook(self.hook, with_kwargs=True)
        self.hook_id = self.handle.id  # a plain int: dynamo cannot represent a RemovableHandle

    @property
    def adapters(self) -> nn.ModuleDict:
        return self.module._modules[CHILD]  # type: ignore[return-value]

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """INPUT adapters transform the site's input before the base runs (plain names and Stacks)."""
        live = self.live
        spec = self.state.active()
        x = None
        for name in compose.stacked_names(spec, self.path):
            ad = live.get(name)
            if ad is not None and ad.action is Action.INPUT:
                if x is None:
                    x = args[0] if args else (kwargs["input"] if "input" in kwargs else next(iter(kwargs.values())))
                x = ad.transform_input(x)
        if x is None:
            return None
        if args:
            return (x, *args[1:]), kwargs
        key = "input" if "input" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: x}

    def apply(self, ad: Adapter, x: Any, out: Any, inplace: bool) -> Any:
        """One adapter's effect on the output, by its declared action."""
        act = ad.action
        if act is Action.OUTPUT or act is Action.REPLACE:
            return ad.contribute(x, out, inplace)
        if act is Action.WEIGHT:
            dw, db = ad.weight_delta(self.view)
            return out + self.view.forward(x, dw, db).to(out.dtype)
        return out  # INPUT ran before the base; ATTENTION and INPUTS act elsewhere

    def sync_pre_hook(self) -> None:
        want = any(a.action is Action.INPUT for a in self.adapters.values())
        if want and self.pre is None:
            self.pre = self.module.register_forward_pre_hook(self.pre_hook, with_kwargs=True, prepend=True)
        elif not want and self.pre is not None:
            self.pre.remove()
            self.pre = None

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if not self.taps:
            return self._run(module, args, kwargs, out)
        try:
            return self._run(module, args, kwargs, out)
        finally:  # the entries' inputs were for this call only
            for tap in self.taps:
                tap.seen.pop(threading.get_ident(), None)

    def _run(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        live = self.live
        if not live:
            return None
        x = args[0] if args else (kwargs["input"] if "input" in kwargs else next(iter(kwargs.values())))
        spec = self.state.active()
        # the output may be updated in place only if no hook before ours has seen it
        inplace = out is not None and not _global_forward_hooks and next(iter(module._forward_hooks)) == self.hook_id
        if any(type(n) is not str for n in spec):
            return compose.run(self, spec, x, out)
        if self.bypass:  # a replacing delta makes the output: it runs first, the others add to it
            spec = compose.replacing_first(spec, live)
        for name in spec:
            ad = live.get(name)
            if ad is not None:
                if ad.action is Action.COMPOSE:  # a fusion, active by its own name
                    out = compose.run(self, (name,), x, out)
                else:
                    out = self.apply(ad, x if ad.entry is None else self.state.tap_input(ad.entry), out, inplace)
                inplace = True  # ours now: a fresh tensor or one we already own
        return out

    def skips_base(self) -> bool:
        """Whether an active adapter here replaces the output (it then runs first), so the
        base need not run. Under composition blocks the base always runs."""
        ad = compose.first_live(compose.replacing_first(self.state.active(), self.live), self.live)
        return ad is not None and ad.replaces

    def add_bypass(self, entry: nn.Module | None) -> None:
        """Let a replacing adapter skip the base computation: the site's forward (and the
        entry's, for a sublayer site) become a `Bypass` that runs the original only when needed."""
        if self.bypass:
            return
        for mod, role in ((self.module, "exit"), (entry, "entry")):
            if mod is None or mod is self.module and role == "entry":
                continue
            prev = mod.__dict__.get("forward")
            if isinstance(prev, Bypass):
                raise InjectionError(f"module {type(mod).__name__} is already bypassed by another site")
            self.bypass.append((mod, prev))
            mod.__dict__["forward"] = Bypass(self, mod, prev, role)

    def drop_bypass(self) -> None:
        for mod, prev in self.bypass:
            if prev is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.__dict__["forward"] = prev
        self.bypass = []

    def detach(self) -> None:
        self.drop_bypass()
        if self.pre is not None:
            self.pre.remove()
        self.handle.remove()
        del self.module._modules[CHILD]


class Bypass:
    """An instance-level `forward` on a site (or its entry) that skips the module's own
    computation while a replacing adapter runs first at the site. The exit returns None
    (the site's hook builds the output), the entry its input (only the exit reads it)."""

    def __init__(self, site: _Site, module: nn.Module, prev: Any, role: str) -> None:
        self.site, self.module, self.prev, self.role = site, module, prev, role

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.site.skips_base():
            if self.role == "exit":
                return None
            return args[0] if args else next(iter(kwargs.values()))
        if self.prev is not None:
            return self.prev(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


class _Tap:
    """Remembers, per thread, the input of an entry module until the site that reads it
    has run (its hook drops it then)."""

    def __init__(self, module: nn.Module) -> None:
        self.users = 0
        self.seen: dict[int, torch.Tensor] = {}
        self.handle = module.register_forward_pre_hook(self.pre_hook, with_kwargs=True)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.seen[threading.get_ident()] = args[0] if args else next(iter(kwargs.values()))

    def __deepcopy__(self, memo: dict) -> _Tap:
        new = _Tap.__new__(_Tap)
        memo[id(self)] = new
        new.users, new.seen = self.users, {}
        new.handle = copy.deepcopy(self.handle, memo)
        return new


class _State:
    """Everything the engine knows about one model."""

    def __init__(self) -> None:
        self.token = context.new_token()
        self.entries: dict[str, _Entry] = {}
        self.sites: dict[str, _Site] = {}
        self.default_active: tuple[Any, ...] = ()
        self.taps: dict[str, _Tap] = {}  # entry module path -> its input tap
        self.root: Any = None  # handle of the model's pre-hook (Parallel repeats the inputs)
        self.params: list[nn.Parameter] = []
        self.requires_grad: list[bool] = []  # flags of `params` before the first injection
        self.fingerprint: str | None = None  # the base's, cached by surgery.fingerprint
        # merged delta -> its tensors and their requires_grad flags before merge (frozen while merged)
        self.frozen: dict[str, list[tuple[nn.Parameter, bool]]] = {}
        self.spec_now: tuple[Any, ...] = ()  # the active spec the last model call pinned (read under torch.compile)
        self.specs: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # interned specs: stable objects for dynamo's guards

    def __deepcopy__(self, memo: dict) -> _State:
        # a copied model gets its own context token: use()/disable() on one must not switch the other
        new = _State.__new__(_State)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            setattr(new, k, copy.deepcopy(v, memo))
        new.token = context.new_token()
        return new

    def override(self) -> tuple[Any, ...] | None:
        return context.override(self.token)

    def tap_input(self, path: str) -> torch.Tensor:
        tap = self.taps.get(path)
        x = tap.seen.get(threading.get_ident()) if tap is not None else None
        if x is None:
            raise SurgeryError(
                f"the input of {path!r} is not available: an adapter reads it, so that module must run "
                "earlier in the same forward (call the whole model, not a submodule)"
            )
        return x

    def root_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # read once per model call; under torch.compile the sites read this pinned plain value
        spec = _pin(self) if torch.compiler.is_compiling() else self.pin()
        if self.frozen and torch.is_grad_enabled():
            self.check_frozen()
        n = compose.parallel_copies(spec)
        if n > 1 and _in_generate():
            raise CompositionError(
                f"Parallel cannot run inside generate(): it repeats the batch once per delta, so each step "
                f"returns {n}x the rows (and the KV cache) that generate() expects. Generate with one delta "
                "at a time (with surgery.use(model, 'a'): model.generate(...)), or repeat the prompts yourself "
                f"and give each copy its delta: surgery.use(model, surgery.BatchSplit('a', 'b', "
                "batch_sizes=[B, B])) around model.generate(input_ids=ids.repeat(2, 1), ...)"
            )
        out = None if n == 1 else _repeat_batch(args, kwargs, n)
        # methods that change the model's inputs (prompts) see them after Parallel's repeat
        for method in {id(e.method): e.method for e in self.entries.values() if e.method.changes_inputs}.values():
            new = method.prepare_inputs(module, spec, *(out or (args, kwargs)))
            if new is not None:
                out = new
        return out

    def pin(self) -> tuple[Any, ...]:
        """The active spec of this call, kept in `spec_now` (interned: equal specs are one object)."""
        spec = self.active()
        if len(self.specs) > 256:  # bounded: blocks built with ever new weights would otherwise pile up
            self.specs.clear()
        self.spec_now = spec = self.specs.setdefault(spec, spec)
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

    def is_adapter_path(self, path: str) -> bool:
        head, sep, _ = path.partition("." + CHILD)
        return bool(sep) and head in self.sites


# keyword inputs of transformers models that carry the batch in dim 0 (Parallel repeats them)
_BATCH_KWARGS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "inputs_embeds",
    "labels",
    "pixel_values",
    "decoder_input_ids",
    "decoder_attention_mask",
    "input_values",
    "input",
)


def _repeat_batch(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    """The model's inputs with the batch repeated n times (copy i is rows i*B..(i+1)*B)."""
    first = next((t for t in (*args, *(kwargs.get(k) for k in _BATCH_KWARGS)) if isinstance(t, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        raise CompositionError("Parallel: found no batched tensor input to repeat")
    b = first.shape[0]

    def rep(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b:
            return t.repeat(n, *([1] * (t.dim() - 1)))
        return t

    return tuple(rep(a) for a in args), {k: rep(v) if k in _BATCH_KWARGS else v for k, v in kwargs.items()}


@torch._disable_dynamo  # runs eagerly (a graph break at the model's root only): it reads the ContextVar
def _pin(st: _State) -> tuple[Any, ...]:
    return st.pin()


_GENERATE_CODES: set[Any] | None = None


@torch._disable_dynamo  # walks the Python stack
def _in_generate() -> bool:
    """Whether a transformers `generate()` is on the call stack (checked only under Parallel)."""
    global _GENERATE_CODES
    gen = sys.modules.get("transformers.generation.utils")
    if gen is None:
        return False
    if _GENERATE_CODES is None:
        _GENERATE_CODES = {inspect.unwrap(gen.GenerationMixin.generate).__code__}
    f: Any = sys._getframe(1)
    while f is not None:
        if f.f_code in _GENERATE_CODES:
            return True
        f = f.f_back
    return False


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


def state_of(model: nn.Module) -> _State | None:
    if not isinstance(model, nn.Module):
        check_model(model)
    return model.__dict__.get(context.STATE_ATTR)


def _state(model: nn.Module) -> _State:
    st = state_of(model)
    if st is None:
        st = _State()
        model.__dict__[context.STATE_ATTR] = st
        st.root = model.register_forward_pre_hook(st.root_hook, with_kwargs=True)
        if callable(getattr(type(model), "save_pretrained", None)):  # transformers: write the base alone
            model.__dict__["save_pretrained"] = _SaveBase(model, model.__dict__.get("save_pretrained"))
    return st


class _SaveBase:
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
    checkpoints and DDP rely on it)."""
    check_model(model)
    sd = model.state_dict()
    st = state_of(model)
    if st is None:
        return sd
    out = {k: v for k, v in sd.items() if not st.is_adapter_path(k)}
    for path, site in st.sites.items():
        for tname in {t for _, recs in site.merged for t in recs}:
            key = f"{path}.{tname}"
            if key in out:
                w = _tensor(site, tname).detach().clone()
                for _, recs in reversed(site.merged):  # last merged first, as unmerge does
                    if tname in recs:
                        unmerge_weight(w, recs[tname])
                out[key] = w
    return out


def _entry(model: nn.Module, name: str) -> _Entry:
    st = state_of(model)
    if st is None or name not in st.entries:
        have = sorted(st.entries) if st else []
        raise InjectionError(f"no delta named {name!r} in this model; injected: {have or 'none'}")
    return st.entries[name]


def names(model: nn.Module) -> list[str]:
    """Names of the deltas injected into `model`, in injection order."""
    st = state_of(model)
    return list(st.entries) if st else []


def injection(model: nn.Module, name: str) -> Injection:
    return _entry(model, name).injection


def adapters(model: nn.Module, name: str) -> dict[str, Adapter]:
    """Site path -> adapter module of one delta."""
    entry = _entry(model, name)
    st = state_of(model)
    assert st is not None
    return {p: st.sites[p].adapters[name] for p in entry.injection.sites}  # type: ignore[misc]


def site_module(model: nn.Module, path: str) -> nn.Module:
    st = state_of(model)
    if st is not None and path in st.sites:
        return st.sites[path].module
    return model.get_submodule(path)


def resolve_sites(model: nn.Module, method: Method, targets: Any, cfg: Any = None) -> list[tuple[str, nn.Module]]:
    """The sites `method` attaches to for what `targets` hits, or a clear error."""
    st = state_of(model)
    skip = st.is_adapter_path if st else None
    if targets is None:
        targets = method.targets(cfg)
    hits = select(model, targets, skip=skip)
    if not hits:
        raise no_hit_error(model, targets, skip=skip)
    sites = method.place(model, hits, cfg)
    if sites and not getattr(method, "handles_fused", False):  # '@linear' cannot reach fused expert tensors: say so
        from surgery.sublayers import note_fused

        note_fused(model, repr(method.name), targets, sites)
    if not sites:
        shown = ", ".join(f"{p} ({type(m).__name__})" for p, m in hits[:8])
        more = f" and {len(hits) - 8} more" if len(hits) > 8 else ""
        raise SelectorError(
            f"selector {targets!r} hits no module that method {method.name!r} can attach to; "
            f"it hit: {shown}{more}. Point it at leaf layers, e.g. 'attn.*' or '@linear'."
        )
    return sites


def check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RX.fullmatch(name):
        raise InjectionError(f"delta name {name!r} must be 1-64 characters of letters, digits, '_' or '-'")
    st = state_of(model)
    if st is not None and name in st.entries:
        raise InjectionError(
            f"a delta named {name!r} is already injected; pick another name, or "
            f"surgery.remove(model, {name!r}) first (surgery.apply hot-swaps tensors into it)"
        )


def inject(model: nn.Module, method: str, targets: Any = None, name: str = "default", **config: Any) -> Injection:
    """Inject `method` at the sites `targets` selects, in place; return the record.

    Only the injected tensors are trainable afterwards. The new delta joins the
    model's default active set (see `activate`, `use`).
    """
    check_model(model)
    m = get_method(method)
    cfg = m.config(**config)
    check_name(model, name)
    sites = resolve_sites(model, m, targets, cfg)
    made = [(p, mod, m.make(SiteView(model, p, mod), cfg)) for p, mod in sites]  # may raise: nothing attached yet
    return attach(model, name, m, cfg, made)


def check_overlap(model: nn.Module, made: list[tuple[str, nn.Module, Adapter]]) -> None:
    """A replacing adapter skips the whole module it sits on, and its entry module (a sublayer
    site's): no other site may lie inside either (or be the entry itself)."""
    st = state_of(model)
    if st is None:
        return
    replaced = [(p, False) for p, s in st.sites.items() if any(a.replaces for a in s.live.values())]
    replaced += [
        (a.entry, True) for s in st.sites.values() for a in s.live.values() if a.replaces and a.entry is not None
    ]
    replaced += [(p, False) for p, _, ad in made if ad.replaces]
    replaced += [(ad.entry, True) for _, _, ad in made if ad.replaces and ad.entry is not None]
    paths = list(st.sites) + [p for p, _, _ in made]
    at: dict[str, list[Adapter]] = {p: list(s.live.values()) for p, s in st.sites.items()}
    for p, _, ad in made:
        at.setdefault(p, []).append(ad)
    for p, ads in at.items():  # a sublayer site's own input is the skipped entry's pass-through
        entry = next((a.entry for a in ads if a.replaces and a.entry is not None), None)
        if entry is not None and any(a.entry != entry for a in ads):
            raise InjectionError(
                f"a delta at {p!r} would read that module's own input, but a replacing delta (moe) there "
                f"skips {entry!r} that computes it; only deltas that read the FFN's input can share this site"
            )
    for r, is_entry in replaced:
        inner = next((p for p in paths if p.startswith(r + ".") or is_entry and p == r), None)
        if inner is not None:
            raise InjectionError(
                f"site {inner!r} lies inside {r!r}, whose computation a replacing delta (moe) takes "
                "over; a delta there would not run. Remove one of them, or inject the other first elsewhere"
            )


def attach(
    model: nn.Module,
    name: str,
    method: Method,
    cfg: Any,
    made: list[tuple[str, nn.Module, Adapter]],
    *,
    activate: bool = True,
) -> Injection:
    """Attach built adapters under `name` (the step of `inject` that cannot fail).
    With `activate=False` the delta does not join the default active set."""
    check_overlap(model, made)
    st = _state(model)
    if not st.entries:  # first delta: remember trainability to give it back on remove
        st.params = list(model.parameters())
        st.requires_grad = [p.requires_grad for p in st.params]
        for p in st.params:
            p.requires_grad_(False)
    for path, mod, ad in made:
        site = st.sites.get(path)
        if site is None:
            site = st.sites[path] = _Site(st, path, mod, model)
        ad.train(mod.training)  # follow the model's mode: no dropout at inference
        site.adapters[name] = ad
        site.live[name] = ad
        if ad.entry is not None:
            tap = st.taps.get(ad.entry)
            if tap is None:
                tap = st.taps[ad.entry] = _Tap(model.get_submodule(ad.entry))
            tap.users += 1
            if tap not in site.taps:
                site.taps.append(tap)
        if ad.replaces:
            site.add_bypass(model.get_submodule(ad.entry) if ad.entry is not None else None)
        site.sync_pre_hook()
        for p in ad.parameters():
            p.requires_grad_(True)
    inj = Injection(name, method.name, tuple(p for p, _, _ in made), method.config_dict(cfg))
    st.entries[name] = _Entry(inj, method, cfg)
    if activate:  # a fusion runs its members itself: they leave the plain active set
        members = set(method.members(cfg))
        st.default_active = tuple(a for a in st.default_active if a not in members) + (name,)
    method.attached({path: ad for path, _, ad in made})
    return inj


def remove(model: nn.Module, name: str | None = None, *, keep_merged: bool = False) -> None:
    """Remove one delta (or all). A merged delta is unmerged first, exactly,
    unless `keep_merged=True`, which leaves its update baked into the base."""
    st = state_of(model)
    if st is None or not st.entries:
        if name is None:
            return
        raise InjectionError(f"no delta named {name!r} in this model; injected: none")
    todo = list(st.entries) if name is None else [_entry(model, name).injection.name]
    users = [f for f, e in st.entries.items() if f not in todo and set(e.method.members(e.cfg)) & set(todo)]
    if users:
        raise InjectionError(f"delta {todo[0]!r} is fused in {users}; surgery.remove(model, {users[0]!r}) first")
    for n in reversed(todo):
        if not keep_merged and any(n == mn for s in st.sites.values() for mn, _ in s.merged):
            unmerge(model, n)
    for n in todo:
        entry = st.entries.pop(n)
        st.frozen.pop(n, None)
        gone: dict[str, Adapter] = {}
        for path in entry.injection.sites:
            site = st.sites[path]
            site.merged = [(mn, r) for mn, r in site.merged if mn != n]
            site.live.pop(n, None)
            ad = gone[path] = cast(Adapter, site.adapters[n])
            del site.adapters[n]
            if ad.entry is not None:
                tap = st.taps[ad.entry]
                tap.users -= 1
                if not any(a.entry == ad.entry for a in site.adapters.values()):
                    site.taps.remove(tap)
                if not tap.users:
                    tap.handle.remove()
                    del st.taps[ad.entry]
            if ad.replaces and not any(a.replaces for a in site.adapters.values()):
                site.drop_bypass()
            site.sync_pre_hook()
            if not len(site.adapters):
                site.detach()
                del st.sites[path]
        entry.method.detached(gone)
        members = entry.method.members(entry.cfg)
        # a fusion active by name gives its place back to its adapters, which run on their own again
        back = tuple(m for m in members if m in st.entries and m not in spec_names(st.default_active))
        st.default_active = tuple(
            x for a in st.default_active for x in (back if a == n else () if n in spec_names((a,)) else (a,))
        )
        if members:  # the members it froze become trainable again (unless another fusion holds them)
            held = {m for e in st.entries.values() for m in e.method.members(e.cfg)}
            for m in members:
                if m in st.entries and m not in held:
                    for ad in adapters(model, m).values():
                        ad.requires_grad_(True)
    if not st.entries:
        for p, flag in zip(st.params, st.requires_grad, strict=False):
            p.requires_grad_(flag)
        st.root.remove()
        del model.__dict__[context.STATE_ATTR]
        save = model.__dict__.get("save_pretrained")
        if isinstance(save, _SaveBase):
            if save.prev is None:
                del model.__dict__["save_pretrained"]
            else:
                model.__dict__["save_pretrained"] = save.prev


def activate(model: nn.Module, *names: Any) -> None:
    """Set the deltas active by default (outside any `use` / `disable`): names or
    composition blocks (`surgery.Stack`, `Fuse`, `Average`, `Parallel`, `BatchSplit`)."""
    st, spec = _check_active(model, names)
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


def _check_active(model: nn.Module, names: tuple[Any, ...]) -> tuple[_State | None, tuple[Any, ...]]:
    st = state_of(model)
    if st is None:
        for n in names:
            if isinstance(n, compose.Block):
                n = next(iter(n.names()))
            _entry(model, n)
        return None, ()
    merged = {mn for s in st.sites.values() for mn, _ in s.merged}
    for n in names:
        if isinstance(n, str):
            _entry(model, n)
    spec = compose.normalize(st, tuple(names), merged)
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
    st, spec = _check_active(model, names)
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


def _tensor(site: _Site, tname: str) -> torch.Tensor:
    w = getattr(site.module, tname, None)
    if not isinstance(w, torch.Tensor):
        raise MergeError(f"site {site.path!r} has no {tname} tensor to merge into")
    return w


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> owners, for parameters that several modules share (tied weights)."""
    owners: dict[int, list[str]] = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(path)
    return {k: v for k, v in owners.items() if len(v) > 1}


def merge(model: nn.Module, name: str | None = None) -> None:
    """Fold a delta (default: every active one) into the base weights.

    Outputs are unchanged and the delta costs nothing at run time. `unmerge`
    restores the base bit for bit; merged deltas stay active until unmerged.
    """
    st = state_of(model)
    todo = [name] if name is not None else list(st.active() if st else ())
    if any(not isinstance(n, str) for n in todo):
        raise MergeError(
            f"the active set {todo} holds a composition block; merge deltas by name, e.g. surgery.merge(model, 'a')"
        )
    for n in todo:
        entry = _entry(model, n)
        assert st is not None
        sites = [st.sites[p] for p in entry.injection.sites]
        if any(n == mn for s in sites for mn, _ in s.merged):
            raise MergeError(f"delta {n!r} is already merged; surgery.unmerge(model, {n!r}) first")
        ov = st.override()
        if ov is not None and n not in ov:
            raise MergeError(
                f"delta {n!r} is switched off in this surgery.use()/disable() context; merging it here "
                "would put it back into every output. Merge outside the context."
            )
        flags = [(p, p.requires_grad) for ad in adapters(model, n).values() for p in ad.parameters()]
        if entry.method.fold(adapters(model, n)):  # merged within its own tensors: no base weight changes
            _freeze_merged(st, n, flags)
            continue
        shared = _shared_weights(model)
        rules = []
        for s in sites:  # check every site before touching any weight
            rule = cast(Adapter, s.adapters[n]).merge(s.view)
            if isinstance(rule, NotMergeable):
                raise MergeError(
                    f"delta {n!r} ({entry.method.name}) has no merge rule: {rule.reason}; keep it unmerged"
                )
            for tname in rule:
                owners = shared.get(id(_tensor(s, tname)))
                if owners:
                    raise MergeError(
                        f"the {tname} of {s.path!r} is shared by {owners} (tied weights); merging would "
                        f"change all of them. Keep delta {n!r} unmerged, or untie the weights first."
                    )
            rules.append(rule)
        done: list[_Site] = []
        try:
            for s, rule in zip(sites, rules, strict=True):
                recs: dict[str, MergeRecord] = {}
                try:
                    for tname, upd in rule.items():
                        recs[tname] = merge_weight(_tensor(s, tname), upd)
                except BaseException:
                    for tname, rec in reversed(recs.items()):
                        unmerge_weight(_tensor(s, tname), rec)
                    raise
                s.merged.append((n, recs))
                s.live.pop(n, None)
                done.append(s)
        except BaseException:
            for s in done:  # all sites or none
                _unmerge_site(s, n)
            raise
        _freeze_merged(st, n, flags)
        if n not in st.default_active:
            st.default_active = st.default_active + (n,)


def _freeze_merged(st: _State, name: str, flags: list[tuple[nn.Parameter, bool]]) -> None:
    """A merged delta's tensors get no gradient (the forward does not read them): freeze them,
    remembering their flags for unmerge."""
    st.frozen[name] = flags
    for p, _ in flags:
        p.requires_grad_(False)


def _thaw_merged(st: _State, name: str) -> None:
    for p, flag in st.frozen.pop(name, ()):
        p.requires_grad_(flag)


def _lift(s: _Site, recs: dict[str, MergeRecord]) -> None:
    """Take one merged update out of the site's tensors (all of them, or none)."""
    done: list[str] = []
    try:
        for tname, rec in reversed(recs.items()):
            unmerge_weight(_tensor(s, tname), rec)
            done.append(tname)
    except BaseException:
        for tname in reversed(done):
            recs[tname] = merge_weight(_tensor(s, tname), update_of(recs[tname]))
        raise


def _reapply(s: _Site, recs: dict[str, MergeRecord]) -> dict[str, MergeRecord]:
    return {t: merge_weight(_tensor(s, t), update_of(rec)) for t, rec in recs.items()}


def _unmerge_site(s: _Site, name: str) -> dict[str, MergeRecord]:
    """Take `name` out of one site's tensors; on failure the site is left as it was."""
    k = max(i for i, (mn, _) in enumerate(s.merged) if mn == name)
    lifted: list[int] = []
    try:
        # exact only in reverse order: lift what was merged later, then put it back
        for i in range(len(s.merged) - 1, k - 1, -1):
            _lift(s, s.merged[i][1])
            lifted.append(i)
    except BaseException:
        for i in reversed(lifted):
            mn, recs = s.merged[i]
            s.merged[i] = (mn, _reapply(s, recs))
        raise
    mine, rest = s.merged[k][1], s.merged[k + 1 :]
    del s.merged[k:]
    for mn, recs in rest:
        s.merged.append((mn, _reapply(s, recs)))
    s.live[name] = s.adapters[name]  # type: ignore[assignment]
    return mine


def unmerge(model: nn.Module, name: str | None = None) -> None:
    """Take a merged delta (default: all merged ones) back out of the base
    weights, bit for bit; it runs unmerged again. If it cannot be done exactly
    it raises and the delta stays merged everywhere."""
    st = state_of(model)
    if name is None:
        for n in reversed(merged(model)):
            unmerge(model, n)
        return
    entry = _entry(model, name)
    assert st is not None
    if entry.method.unfold(adapters(model, name)):
        _thaw_merged(st, name)
        return
    sites = [st.sites[p] for p in entry.injection.sites]
    if not any(name == mn for s in sites for mn, _ in s.merged):
        raise MergeError(f"delta {name!r} is not merged; nothing to unmerge")
    done: list[tuple[_Site, dict[str, MergeRecord]]] = []
    try:
        for s in sites:
            done.append((s, _unmerge_site(s, name)))
    except BaseException:
        for s, recs in done:  # merge those back: the delta stays merged everywhere
            s.merged.append((name, _reapply(s, recs)))
            s.live.pop(name, None)
        raise
    _thaw_merged(st, name)


def merged(model: nn.Module) -> list[str]:
    """Names of deltas merged into the base weights."""
    st = state_of(model)
    if st is None:
        return []
    out = list(dict.fromkeys(mn for s in st.sites.values() for mn, _ in s.merged))
    return out + [n for n, e in st.entries.items() if n not in out and e.method.folded(adapters(model, n))]


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
