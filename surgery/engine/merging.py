"""Merge orchestration: fold a delta into the base tensors of all its sites, or none, and take it
back out bit for bit (`surgery.merge` holds the exact weight arithmetic). A merged delta's tensors
are frozen while merged; deltas merged on one site form a stack, lifted in reverse order.

A sharded model (FSDP2: `DTensor` weights, each rank holding some rows) merges exactly: every rank
calls merge, the rule is computed from the full tensors of the site (gathered one site at a time),
each rank adds its own rows of the update to its shard of the weight and keeps the unmerge record of
that shard, so unmerge restores each shard bit for bit. The merged model's outputs are the
unsharded merged model's (the update's rows are the same numbers, up to the matmul's blocking)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, cast

import torch
from torch import nn

from surgery import distributed
from surgery.engine.runtime import Site
from surgery.engine.state import ModelState, adapters, get_entry, state_of
from surgery.errors import MergeError
from surgery.fourbit import is_quantized
from surgery.merge import MergeRecord, merge_weight, unmerge_weight, update_of
from surgery.methods.base import Adapter, Merge, Method, NotMergeable, SiteView, WeightUpdate


def site_tensor(site: Site, tname: str) -> torch.Tensor:
    w = getattr(site.module, tname, None)
    if not isinstance(w, torch.Tensor):
        raise MergeError(f"site {site.path!r} has no {tname} tensor to merge into")
    return w


def refuse_4bit(s: Site | SiteView, name: str, rule: Merge) -> str | None:
    """Why `rule` may not merge at site `s`: it writes into a 4-bit weight (None if it does not)."""
    if "weight" not in rule or not is_quantized(s.module):
        return None
    return (
        f"delta {name!r} would merge into the 4-bit weight of {s.path!r}: W + dW rounded back to 4 bits "
        "loses most of the delta (a LoRA update is far below NF4's step). Merge into a dequantised base: "
        f"surgery.dequantize(model) (it reports the error against the original weights), then "
        f"surgery.merge(model, {name!r}); or keep the delta unmerged"
    )


def _empty_record(w: torch.Tensor) -> MergeRecord:
    """The record of a merge into a shard that holds no rows (nothing to change)."""
    none = torch.zeros(0, dtype=torch.int64)
    return MergeRecord(
        None, None, None, torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=w.dtype), none, none, 1
    )


def _merge(w: torch.Tensor, update: Any) -> MergeRecord:
    """merge_weight into `w`, or into this rank's shard of it (`update` already this shard's rows)."""
    loc = distributed.local_tensor(w)
    return _empty_record(loc) if loc.numel() == 0 and w.numel() else merge_weight(loc, update)


def _unmerge(w: torch.Tensor, rec: MergeRecord) -> None:
    loc = distributed.local_tensor(w)
    if loc is not w and loc.dim():  # a record of the whole weight cannot restore a shard of it
        f = rec.factors
        first = f[0] if isinstance(f, tuple) else f if f is not None else rec.rows
        if first is not None and first.shape[0] != loc.shape[0]:
            raise MergeError(
                f"this delta was merged into the whole weight ({first.shape[0]} rows) before the model was "
                f"sharded (this rank holds {loc.shape[0]} rows): it cannot be unmerged shard by shard. "
                "Unmerge before sharding, or surgery.remove(model, name, keep_merged=True) to keep it merged"
            )
    if loc.numel() or not w.numel():
        unmerge_weight(loc, rec)


def _rows(t: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    return None if t is None else distributed.full_tensor(t)[lo:hi]


def local_update(w: torch.Tensor, update: Any, where: str) -> Any:
    """The part of a merge rule's update that this rank's shard of `w` takes (its rows: the left
    factor's, a dense delta's, the row scale's; the right factor and the column scale whole); the
    update itself for a plain `w`. MergeError for a shard layout the rows cannot follow."""
    try:
        rows = distributed.local_rows(w)
    except ValueError as e:
        raise MergeError(
            f"cannot merge into {where}: its shards are laid out as {e}. Merge in an unsharded copy: "
            "surgery.delta(model, name) on every rank, surgery.apply it to the unsharded base, merge there"
        ) from None
    if rows is None:
        return update
    lo, hi = rows
    if isinstance(update, (tuple, torch.Tensor)):
        update = WeightUpdate(update)
    d = update.delta
    if isinstance(d, tuple):
        left, right = d
        d = (_rows(left, lo, hi), distributed.full_tensor(right))
    elif d is not None:
        d = _rows(d, lo, hi)
    cols = None if update.cols is None else distributed.full_tensor(update.cols)
    return WeightUpdate(d, _rows(update.rows, lo, hi), cols)


def _folds(method: Method) -> bool:
    return getattr(type(method), "fold", None) is not getattr(Method, "fold", None)


def _sharded_site(s: Site) -> bool:
    return not distributed.plain([*s.module.parameters(), *s.module.buffers()])


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

    On a sharded model (FSDP2) every rank calls it: each merges its rows into its shards, exactly
    (see the module's notes); a method that merges within its own tensors (fold) is refused there.
    A DDP wrapper is merged through its `.module` (every rank merges its replica).
    """
    model = distributed.unwrap(model)
    st = state_of(model)
    todo = [name] if name is not None else list(st.active() if st else ())
    if any(not isinstance(n, str) for n in todo):
        raise MergeError(
            f"the active set {todo} holds a composition block; merge deltas by name, e.g. surgery.merge(model, 'a')"
        )
    for n in todo:
        entry = get_entry(model, n)
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
        distributed.reshard(model)  # the shards, not the unsharded copies a forward left
        sharded = any(_sharded_site(s) for s in sites)
        if sharded:
            if _folds(entry.method):
                raise MergeError(
                    f"delta {n!r} ({entry.method.name}) merges within its own tensors, which are sharded here; "
                    "that is not done on a sharded model. Keep it unmerged, or merge in an unsharded copy: "
                    f"surgery.delta(model, {n!r}) on every rank, surgery.apply it to the unsharded base, merge there"
                )
            distributed.guard("surgery.merge", n)
        flags = [(p, p.requires_grad) for ad in adapters(model, n).values() for p in ad.parameters()]
        if entry.method.fold(adapters(model, n)):  # merged within its own tensors: no base weight changes
            _freeze_merged(st, n, flags)
            continue
        shared = _shared_weights(model)
        rules = []
        for s in sites:  # check every site before touching any weight
            with distributed.gathered(s.module) if sharded else nullcontext():  # the full tensors, one site at a time
                rule = cast(Adapter, s.adapters[n]).merge(s.view)
            if isinstance(rule, NotMergeable):
                raise MergeError(
                    f"delta {n!r} ({entry.method.name}) has no merge rule: {rule.reason}; keep it unmerged"
                )
            refusal = refuse_4bit(s, n, rule)
            if refusal:
                raise MergeError(refusal)
            for tname in rule:
                owners = shared.get(id(site_tensor(s, tname)))
                if owners:
                    raise MergeError(
                        f"the {tname} of {s.path!r} is shared by {owners} (tied weights); merging would "
                        f"change all of them. Keep delta {n!r} unmerged, or untie the weights first."
                    )
            if sharded:  # this rank's rows of each update
                rule = {t: local_update(site_tensor(s, t), u, f"the {t} of {s.path!r}") for t, u in rule.items()}
            rules.append(rule)
        done: list[Site] = []
        try:
            for s, rule in zip(sites, rules, strict=True):
                recs: dict[str, MergeRecord] = {}
                try:
                    for tname, upd in rule.items():
                        recs[tname] = _merge(site_tensor(s, tname), upd)
                except BaseException:
                    for tname, rec in reversed(recs.items()):
                        _unmerge(site_tensor(s, tname), rec)
                    raise
                s.merged.append((n, recs))
                s.set_live(n, None)
                done.append(s)
        except BaseException:
            for s in done:  # all sites or none
                _unmerge_site(s, n)
            raise
        _freeze_merged(st, n, flags)
        if n not in st.default_active:
            st.default_active = st.default_active + (n,)


def _freeze_merged(st: ModelState, name: str, flags: list[tuple[nn.Parameter, bool]]) -> None:
    """A merged delta's tensors get no gradient (the forward does not read them): freeze them,
    remembering their flags for unmerge."""
    st.frozen[name] = flags
    for p, _ in flags:
        p.requires_grad_(False)


def _thaw_merged(st: ModelState, name: str) -> None:
    for p, flag in st.frozen.pop(name, ()):
        p.requires_grad_(flag)


def _lift(s: Site, recs: dict[str, MergeRecord]) -> None:
    """Take one merged update out of the site's tensors (all of them, or none)."""
    done: list[str] = []
    try:
        for tname, rec in reversed(recs.items()):
            _unmerge(site_tensor(s, tname), rec)
            done.append(tname)
    except BaseException:
        for tname in reversed(done):
            recs[tname] = _merge(site_tensor(s, tname), update_of(recs[tname]))
        raise


def _reapply(s: Site, recs: dict[str, MergeRecord]) -> dict[str, MergeRecord]:
    return {t: _merge(site_tensor(s, t), update_of(rec)) for t, rec in recs.items()}


def _unmerge_site(s: Site, name: str) -> dict[str, MergeRecord]:
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
    s.set_live(name, cast(Adapter, s.adapters[name]))
    return mine


def unmerge(model: nn.Module, name: str | None = None) -> None:
    """Take a merged delta (default: all merged ones) back out of the base
    weights, bit for bit; it runs unmerged again. If it cannot be done exactly
    it raises and the delta stays merged everywhere. On a sharded model every rank calls it (each
    restores its own shards)."""
    model = distributed.unwrap(model)
    st = state_of(model)
    if name is None:
        for n in reversed(merged(model)):
            unmerge(model, n)
        return
    entry = get_entry(model, name)
    assert st is not None
    if entry.method.unfold(adapters(model, name)):
        _thaw_merged(st, name)
        return
    sites = [st.sites[p] for p in entry.injection.sites]
    if not any(name == mn for s in sites for mn, _ in s.merged):
        raise MergeError(f"delta {name!r} is not merged; nothing to unmerge")
    distributed.reshard(model)
    if any(_sharded_site(s) for s in sites):  # no communication, but every rank must restore its shards
        distributed.guard("surgery.unmerge", name)
    done: list[tuple[Site, dict[str, MergeRecord]]] = []
    try:
        for s in sites:
            done.append((s, _unmerge_site(s, name)))
    except BaseException:
        for s, recs in done:  # merge those back: the delta stays merged everywhere
            s.merged.append((name, _reapply(s, recs)))
            s.set_live(name, None)
        raise
    _thaw_merged(st, name)


def merged(model: nn.Module) -> list[str]:
    """Names of deltas merged into the base weights."""
    st = state_of(distributed.unwrap(model))
    if st is None:
        return []
    out = list(dict.fromkeys(mn for s in st.sites.values() for mn, _ in s.merged))
    return out + [n for n, e in st.entries.items() if n not in out and e.method.folded(adapters(model, n))]


def mergeable(model: nn.Module, name: str) -> bool | str:
    """True if `merge(model, name)` can fold the delta (into the base, or within its own tensors),
    else the reason it cannot (the first site's). On a sharded model no rank communicates: the rule
    is computed on `meta` tensors of the full shapes (whether a rule exists does not hang on values)."""
    model = distributed.unwrap(model)
    st, e = state_of(model), get_entry(model, name)
    assert st is not None
    distributed.reshard(model)
    sharded = any(_sharded_site(st.sites[p]) for p in e.injection.sites)
    if sharded and _folds(e.method):
        return (
            "it merges within its own tensors, which are sharded here: merge in an unsharded copy "
            f"(surgery.delta(model, {name!r}) on every rank, surgery.apply it to the unsharded base, merge there)"
        )
    for p in e.injection.sites:
        with distributed.gathered(st.sites[p].module, values=False) if sharded else nullcontext():
            rule = cast(Adapter, st.sites[p].adapters[name]).merge(st.sites[p].view)
        if isinstance(rule, NotMergeable):
            return rule.reason
        refusal = refuse_4bit(st.sites[p], name, rule)
        if refusal:
            return refusal
    return True
