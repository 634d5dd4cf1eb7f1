"""The engine's hook runtime: what runs, per call, at a site and at the model's root.

A `Site` is one leaf module with adapters: they sit in its child `AdapterDict` named
``surgery`` and run from hooks on it, by the action each declares (`Action`): INPUT in a
forward pre-hook, OUTPUT / WEIGHT / REPLACE / COMPOSE in a forward hook, ATTENTION inside
the attention rewrite (`Site.active_with`). A `Bypass` lets a REPLACE adapter skip the base,
a `Tap` keeps the input of an entry module for a sublayer site, and `RootHook` pins the
call's active spec, repeats the batch for `Parallel` and runs the methods that change the
model's inputs.
"""

from __future__ import annotations

import copy
import inspect
import sys
import threading
import weakref
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from surgery import compose
from surgery.engine.state import CHILD, ModelState
from surgery.errors import CompositionError, InjectionError, SurgeryError
from surgery.merge import MergeRecord
from surgery.methods.base import Action, Adapter, SiteView


class AdapterDict(nn.ModuleDict):
    """The ``surgery`` child of a site module: its adapters by delta name, and its `Site`."""

    site: Site


def active_at(holder: nn.Module | None, action: Action) -> list[Adapter]:
    """The adapters declaring `action` active in this context at the site whose ``surgery``
    child is `holder` (what the attention rewrite reads on every call)."""
    return holder.site.active_with(action) if isinstance(holder, AdapterDict) else []


def tap_input(st: ModelState, path: str) -> torch.Tensor:
    tap = st.taps.get(path)
    x = tap.seen.get(threading.get_ident()) if tap is not None else None
    if x is None:
        raise SurgeryError(
            f"the input of {path!r} is not available: an adapter reads it, so that module must run "
            "earlier in the same forward (call the whole model, not a submodule)"
        )
    return x


class Site:
    """The adapters at one module, and the hook that runs them."""

    def __init__(self, state: ModelState, path: str, module: nn.Module, model: nn.Module) -> None:
        self.state = state
        self.path = path
        self.module = module
        self.view = SiteView(cast(nn.Module, weakref.proxy(model)), path, module)
        self.live: dict[str, Adapter] = {}  # injected and not merged
        # a stack, last merged on top: (delta, base tensor name -> its merge record)
        self.merged: list[tuple[str, dict[str, MergeRecord]]] = []
        self.pre: Any = None  # the input pre-hook's handle, while an INPUT adapter is here
        self.bypass: list[tuple[nn.Module, Any]] = []  # (module, its own instance `forward` or None) we replaced
        self.taps: list[Tap] = []  # taps of the entries its adapters read
        if CHILD in module._modules:
            raise InjectionError(f"module {path!r} already has a child named {CHILD!r}; cannot inject there")
        holder = AdapterDict()
        holder.__dict__["site"] = self  # a plain reference: how the attention rewrite finds its site
        module.add_module(CHILD, holder)
        # hooks only while an adapter here runs (none while all are merged: the base's speed exactly)
        self.handle: Any = None
        self.hook_id = -1  # the handle's id, a plain int: dynamo cannot represent a RemovableHandle

    @property
    def adapters(self) -> nn.ModuleDict:
        return self.module._modules[CHILD]  # type: ignore[return-value]

    def entry_input(self, path: str) -> torch.Tensor:
        """The input of module `path` in this call (an adapter here reads it: a sublayer site)."""
        return tap_input(self.state, path)

    def active_with(self, action: Action) -> list[Adapter]:
        """The adapters declaring `action` active here in this context, in order. They act
        outside the output hook, so they run as plain names or in a Stack only."""
        live = self.live
        out: list[Adapter] = []
        for item in self.state.active():
            if type(item) is str:
                names: Any = (item,)
            elif isinstance(item, compose.Stack):
                names = item.names()
            else:
                hit = [n for n in item.names() if n in live and live[n].action is action]
                if hit:
                    raise CompositionError(
                        f"{item!r} holds {action.value} delta(s) {hit}: they act outside the site's output "
                        "(extra attention positions only concatenate), so they run by name or in a surgery.Stack; "
                        "they cannot be averaged, fused or split by rows"
                    )
                continue
            for n in names:
                ad = live.get(n)
                if ad is not None and ad.action is action:
                    out.append(ad)
        return out

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """INPUT adapters transform the site's input before the base runs (plain names and Stacks)."""
        live = self.live
        spec = self.state.active()
        x = None
        for name in compose.stacked_names(spec):
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
        if act is Action.OUTPUT or act is Action.REPLACE or act is Action.ATTENTION:
            return ad.contribute(x, out, inplace)
        if act is Action.WEIGHT:
            dw, db = ad.weight_delta(self.view)
            return out + self.view.forward(x, dw, db).to(out.dtype)
        return out  # INPUT ran before the base; COMPOSE runs through compose.run

    def set_live(self, name: str, ad: Adapter | None) -> None:
        """Run `ad` here under `name` (None: it stops running here, merged or removed)."""
        if ad is None:
            self.live.pop(name, None)
        else:
            self.live[name] = ad
        if self.live and self.handle is None:
            self.handle = self.module.register_forward_hook(self.hook, with_kwargs=True)
            self.hook_id = self.handle.id
        elif not self.live and self.handle is not None:
            self.handle.remove()
            self.handle, self.hook_id = None, -1
        want = any(a.action is Action.INPUT for a in self.live.values())
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
        spec = self.state.active()
        if not live or not spec:
            return None
        x = args[0] if args else (kwargs["input"] if "input" in kwargs else next(iter(kwargs.values())))
        # the output may be updated in place only if no hook before ours has seen it
        inplace = out is not None and not _global_forward_hooks and next(iter(module._forward_hooks)) == self.hook_id
        if any(type(n) is not str for n in spec):
            if not _any_lives(spec, live):
                return None  # no member of the blocks lives here (a head delta's tap on the backbone)
            return compose.run(self, spec, x, out)
        if self.bypass:  # a replacing delta makes the output: it runs first, the others add to it
            spec = compose.replacing_first(spec, live)
        for name in spec:
            ad = live.get(name)
            if ad is not None:
                if ad.action is Action.COMPOSE:  # a fusion, active by its own name
                    out = compose.run(self, (name,), x, out)
                else:
                    out = self.apply(ad, x if ad.entry is None else tap_input(self.state, ad.entry), out, inplace)
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
        if self.handle is not None:
            self.handle.remove()
        del self.module._modules[CHILD]


class Bypass:
    """An instance-level `forward` on a site (or its entry) that skips the module's own
    computation while a replacing adapter runs first at the site. The exit returns None
    (the site's hook builds the output), the entry its input (only the exit reads it)."""

    def __init__(self, site: Site, module: nn.Module, prev: Any, role: str) -> None:
        self.site, self.module, self.prev, self.role = site, module, prev, role

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.site.skips_base():
            if self.role == "exit":
                return None
            return args[0] if args else next(iter(kwargs.values()))
        if self.prev is not None:
            return self.prev(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


class Tap:
    """Remembers, per thread, the input of an entry module until the site that reads it
    has run (its hook drops it then)."""

    def __init__(self, module: nn.Module) -> None:
        self.users = 0
        self.seen: dict[int, torch.Tensor] = {}
        self.handle = module.register_forward_pre_hook(self.pre_hook, with_kwargs=True)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.seen[threading.get_ident()] = args[0] if args else next(iter(kwargs.values()))

    def __deepcopy__(self, memo: dict) -> Tap:
        new = Tap.__new__(Tap)
        memo[id(self)] = new
        new.users, new.seen = self.users, {}
        new.handle = copy.deepcopy(self.handle, memo)
        return new


class RootHook:
    """The model's forward pre-hook: pins the call's active spec, repeats the batch for
    `Parallel`, and lets methods that change the model's inputs (prompts) do so."""

    def __init__(self, st: ModelState) -> None:
        self.st = st

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        st = self.st
        # read once per model call; under torch.compile the sites read this pinned plain value
        spec = _pin(st) if torch.compiler.is_compiling() else st.pin()
        if st.frozen and torch.is_grad_enabled():
            st.check_frozen()
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
        for method in {id(e.method): e.method for e in st.entries.values() if e.method.changes_inputs}.values():
            new = method.prepare_inputs(module, spec, *(out or (args, kwargs)))
            if new is not None:
                out = new
        return out


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
def _pin(st: ModelState) -> tuple[Any, ...]:
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


def _any_lives(spec: tuple[Any, ...], live: dict[str, Any]) -> bool:
    """Whether a delta named in `spec` (names and composition blocks) has an adapter at this site."""
    for item in spec:
        for name in (item,) if isinstance(item, str) else item.members:
            if name in live:
                return True
    return False
