"""Injection and removal: resolve the sites a selector hits, build the adapters (nothing is
attached until all are built), attach them with their hooks, and take them out again so that
the module tree and `state_dict` are the original's, bit for bit."""

from __future__ import annotations

import re
from typing import Any, cast

from torch import nn

from surgery import context, distributed
from surgery.engine.active import spec_names
from surgery.engine.merging import merged, unmerge
from surgery.engine.runtime import RootHook, Site, Tap
from surgery.engine.saving import SaveBase
from surgery.engine.state import Entry, Injection, ModelState, adapters, check_model, get_entry, state_of
from surgery.errors import InjectionError, SelectorError
from surgery.methods.base import Adapter, Method, SiteView, get_method
from surgery.selectors import no_hit_error, select

_NAME_RX = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def ensure_state(model: nn.Module) -> ModelState:
    st = state_of(model)
    if st is None:
        st = ModelState()
        model.__dict__[context.STATE_ATTR] = st
        st.root = model.register_forward_pre_hook(RootHook(st), with_kwargs=True)
        if callable(getattr(type(model), "save_pretrained", None)):  # transformers: write the base alone
            model.__dict__["save_pretrained"] = SaveBase(model, model.__dict__.get("save_pretrained"))
    return st


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
    model's default active set (see `activate`, `use`). A DDP wrapper is injected through its
    `.module` (its reducer does not see the new tensors: inject before wrapping to train them).
    """
    check_model(model)
    model = distributed.unwrap(model)
    if distributed.is_sharded(model):
        raise InjectionError(
            f"inject({method!r}, name={name!r}) into a model whose parameters fully_shard (FSDP2) has already "
            "sharded: the new tensors would be plain, unsharded and never reduced across ranks (each rank would "
            "train its own copy). Inject first, then call fully_shard on the blocks and the root (docs/distributed.md)"
        )
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
    st = ensure_state(model)
    if not st.entries:  # first delta: remember trainability to give it back on remove
        st.params = list(model.parameters())
        st.requires_grad = [p.requires_grad for p in st.params]
        for p in st.params:
            p.requires_grad_(False)
    for path, mod, ad in made:
        site = st.sites.get(path)
        if site is None:
            site = st.sites[path] = Site(st, path, mod, model)
        ad.train(mod.training)  # follow the model's mode: no dropout at inference
        site.adapters[name] = ad
        site.set_live(name, ad)
        if ad.entry is not None:
            tap = st.taps.get(ad.entry)
            if tap is None:
                tap = st.taps[ad.entry] = Tap(model.get_submodule(ad.entry))
            tap.users += 1
            if tap not in site.taps:
                site.taps.append(tap)
        if ad.replaces:
            site.add_bypass(model.get_submodule(ad.entry) if ad.entry is not None else None)
        for p in ad.parameters():
            p.requires_grad_(True)
    inj = Injection(name, method.name, tuple(p for p, _, _ in made), method.config_dict(cfg))
    st.entries[name] = Entry(inj, method, cfg)
    if activate:  # a fusion runs its members itself: they leave the plain active set
        members = set(method.members(cfg))
        st.default_active = tuple(a for a in st.default_active if a not in members) + (name,)
    method.attached({path: ad for path, _, ad in made})
    return inj


def remove(model: nn.Module, name: str | None = None, *, keep_merged: bool = False) -> None:
    """Remove one delta (or all). A merged delta is unmerged first, exactly,
    unless `keep_merged=True`, which leaves its update baked into the base. On a sharded model with
    a merged delta every rank calls it (each restores its own shards)."""
    check_model(model)
    model = distributed.unwrap(model)
    st = state_of(model)
    if st is None or not st.entries:
        if name is None:
            return
        raise InjectionError(f"no delta named {name!r} in this model; injected: none")
    todo = list(st.entries) if name is None else [get_entry(model, name).injection.name]
    users = [f for f, e in st.entries.items() if f not in todo and set(e.method.members(e.cfg)) & set(todo)]
    if users:
        raise InjectionError(f"delta {todo[0]!r} is fused in {users}; surgery.remove(model, {users[0]!r}) first")
    for n in reversed(todo):  # a method that folds (BitFit into the bias) counts as merged too
        if not keep_merged and n in merged(model):
            unmerge(model, n)
    for n in todo:
        entry = st.entries.pop(n)
        st.frozen.pop(n, None)
        gone: dict[str, Adapter] = {}
        for path in entry.injection.sites:
            site = st.sites[path]
            site.merged = [(mn, r) for mn, r in site.merged if mn != n]
            site.set_live(n, None)
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
        # the base's parameters now: FSDP2 (fully_shard after injection) put new DTensor parameters in
        # the same places, so the flags go back by position while the tree has as many as recorded
        now = list(model.parameters())
        for p, flag in zip(now if len(now) == len(st.params) else st.params, st.requires_grad, strict=False):
            p.requires_grad_(flag)
        st.root.remove()
        del model.__dict__[context.STATE_ATTR]
        save = model.__dict__.get("save_pretrained")
        if isinstance(save, SaveBase):
            if save.prev is None:
                del model.__dict__["save_pretrained"]
            else:
                model.__dict__["save_pretrained"] = save.prev
