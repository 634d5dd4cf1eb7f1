"""Deltas: what one named injection learned, as plain tensors, and applying them back.

A `Delta` is the unit the hub stores and moves: method, config, tensors keyed
``"{site path}.{suffix}"`` (for LoRA ``lora_A.weight`` / ``lora_B.weight``, as
PEFT stores them on disk) and the fingerprint of the base it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from surgery import distributed, engine
from surgery.errors import DeltaMismatchError, InjectionError
from surgery.methods.base import METHODS, SiteView, get_method


@dataclass
class Delta:
    method: str
    name: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    base: str
    lineage: dict[str, Any] = field(default_factory=dict)

    def sites(self) -> dict[str, dict[str, torch.Tensor]]:
        """Site path -> {suffix: tensor}, in the order the tensors are stored."""
        suffixes = get_method(self.method).tensor_suffixes
        exact = [s for s in suffixes if not s.endswith("*")]
        prefixes = [s[:-1] for s in suffixes if s.endswith("*")]  # "experts.*": any key under ".experts."
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.tensors.items():
            suf = next((s for s in exact if key.endswith("." + s)), None)
            if suf is not None:
                at = len(key) - len(suf) - 1
            else:
                at = min((i for i in (key.find("." + pre) for pre in prefixes) if i > 0), default=-1)
                if at <= 0:
                    raise DeltaMismatchError(
                        f"tensor {key!r} of delta {self.name!r} does not end in one of {suffixes} "
                        f"as method {self.method!r} needs"
                    )
            out.setdefault(key[:at], {})[key[at + 1 :]] = t
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __repr__(self) -> str:
        return (
            f"Delta(name={self.name!r}, method={self.method!r}, sites={len(self.sites())}, "
            f"tensors={len(self.tensors)}, bytes={self.nbytes}, base={self.base!r})"
        )


def fingerprint(model: nn.Module, weights: bool = False) -> str:
    """A string that identifies the base's architecture (class, parameter names
    and shapes; not dtype or device), and with `weights=True` also its weight
    values (hashing every byte: slow on big models, so only on request).
    Injected deltas are left out, so it is the same before and after injection, and a sharded
    (FSDP2) or DDP-wrapped model has its unsharded base's (with `weights=True` the full weights are
    gathered: every rank calls it)."""
    model = distributed.unwrap(model)
    if weights:
        distributed.reshard(model)  # read the shards, not the copies a forward left unsharded
    arch = engine.cached_fingerprint(model)
    if arch is None or weights:
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        items = sorted((kv for kv in named if not engine.is_adapter_path(model, kv[0])), key=lambda kv: kv[0])
        h = hashlib.sha256(distributed.model_class(model).__qualname__.encode())
        for k, t in items:  # a 4-bit weight by its logical shape: a QLoRA delta fits the base it was quantised from
            shape = getattr(getattr(t, "quant_state", None), "shape", t.shape)
            h.update(f"{k}:{tuple(shape)};".encode())
        arch = "arch:" + h.hexdigest()[:16]
        engine.cache_fingerprint(model, arch)  # kept while deltas are injected: hot-swaps skip the walk
    if not weights:
        return arch
    h = hashlib.sha256()
    if any(distributed.is_dtensor(t) for _, t in items):
        distributed.guard("surgery.fingerprint", "weights")
    for k, t in items:
        t = distributed.full_tensor(t)  # one full tensor at a time (a collective on a sharded model)
        h.update(k.encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{arch}+w:{h.hexdigest()[:16]}"


def delta(model: nn.Module, name: str = "default") -> Delta:
    """What the delta `name` has learned, as a `Delta` (tensors copied, detached).

    On a sharded model (FSDP2) it is a collective: every rank calls it, the full tensors are gathered
    and every rank gets the same Delta, plain tensors equal to the unsharded model's. A DDP wrapper
    is read through its `.module`."""
    model = distributed.unwrap(model)
    inj = engine.injection(model, name)
    if METHODS.get(inj.method) is not engine.method_of(model, name):
        raise InjectionError(
            f"{name!r} is a slot bank (surgery.serve), not a delta with learned "
            "tensors: it has nothing to save; the deltas it serves come from the hub"
        )
    distributed.reshard(model)  # the sharded fp32 masters, not the copies a forward left unsharded
    ads = engine.adapters(model, name)
    found = [(f"{path}.{suf}", t) for path, ad in ads.items() for suf, t in ad.tensors().items()]
    if distributed.plain(t for _, t in found):
        tensors = {k: t.detach().clone() for k, t in found}
    else:  # sharded: every rank gathers the full tensors
        distributed.guard("surgery.delta", name)
        tensors = {k: distributed.full_tensor(t).detach().clone() for k, t in found}
    return Delta(inj.method, name, json.loads(json.dumps(inj.config)), tensors, fingerprint(model))


def apply(
    model: nn.Module, delta: Delta, name: str | None = None, *, allow_other_base: bool = False
) -> engine.Injection:
    """Put a Delta into the model under `name` (default: the delta's own name).

    If a delta of that name, method, sites and shapes is already there, its
    tensors are overwritten in place (a hot-swap: no new modules); otherwise the
    delta is injected. A Delta whose sites or shapes do not fit raises
    DeltaMismatchError naming the first misfit, and the model is left as it was.

    Into a sharded model (FSDP2) every rank applies the same Delta: each puts its own rows into its
    shards (a merged delta is unmerged and merged again: a collective). A DDP wrapper is applied
    through its `.module`.
    """
    model = distributed.unwrap(model)
    name = name or delta.name
    if not allow_other_base:
        check_base(delta, fingerprint(model))
    method = get_method(delta.method)
    by_site = delta.sites()
    check_finite(delta)
    method.check_tensors(model, by_site, delta.config)
    if name in engine.names(model):
        current = engine.adapters(model, name)
        have = engine.method_of(model, name).name
        misfit = (
            f"it is a {have!r} delta and the one applied is {delta.method!r}"
            if have != delta.method
            else _first_misfit(current, by_site)
        )
        if misfit:
            raise DeltaMismatchError(
                f"cannot hot-swap delta {delta.name!r} into the injected delta {name!r}: {misfit}. "
                f"surgery.remove(model, {name!r}) first, or apply under another name"
            )
        return _hot_swap(model, name, delta, current, by_site)
    engine.check_name(model, name)
    cfg = method.config(**config_kwargs(method, delta.config))
    distributed.reshard(model)
    made = make_adapters(model, delta, cfg)
    with torch.no_grad():
        for path, _, ad in made:
            for suf, t in ad.tensors().items():
                distributed.copy_into(t, by_site[path][suf])
    return engine.attach(model, name, method, cfg, made)


def check_base(delta: Delta, arch: str, label: str | None = None) -> None:
    """Refuse a Delta trained on another base than `arch` (the architecture fingerprint)."""
    if delta.base.split("+", 1)[0] != arch:
        raise DeltaMismatchError(
            f"delta {label or delta.name!r} was trained on base {delta.base.split('+', 1)[0]} but this model is "
            f"{arch} (another architecture); pass allow_other_base=True if you know it fits"
        )


def make_adapters(model: nn.Module, delta: Delta, cfg: Any) -> list[tuple[str, nn.Module, Any]]:
    """The method's adapters for each site of `delta` in `model`, shaped as its tensors (not yet
    filled with them, not attached); DeltaMismatchError for a site the model lacks, a module the
    method cannot attach to, or tensors of other shapes."""
    method = get_method(delta.method)
    made = []
    for path, ts in delta.sites().items():
        try:
            mod = engine.site_module(model, path)
        except AttributeError:
            raise DeltaMismatchError(f"delta {delta.name!r}: the model has no module {path!r}") from None
        if not method.supports(mod):
            raise DeltaMismatchError(
                f"delta {delta.name!r}: module {path!r} is a {type(mod).__name__}, "
                f"which method {delta.method!r} cannot attach to"
            )
        ad = method.make(SiteView(model, path, mod), cfg, shapes={k: t.shape for k, t in ts.items()})
        if misfit := _first_misfit({path: ad}, {path: ts}):
            raise DeltaMismatchError(f"delta {delta.name!r}: {misfit}")
        made.append((path, mod, ad))
    return made


def check_finite(delta: Delta) -> None:
    """Refuse a Delta holding NaN or Inf before anything is touched: it would silently poison
    every output (and, merged, the base weights)."""
    floats = [(k, t) for k, t in delta.tensors.items() if t.is_floating_point() or t.is_complex()]
    if not floats:
        return
    # Fast path: NaN and Inf survive a sum, so one read pass per tensor and one host sync per device
    # (about a tenth of the hot-swap's copy; an isfinite mask per tensor cost as much as the copy).
    # A sum that overflows a finite tensor only sends us to the exact check below.
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for _, t in floats:
        acc = t.dtype if t.dtype in (torch.float64, torch.complex128) or t.is_complex() else torch.float32
        sums.setdefault(t.device, []).append(t.sum(dtype=acc))
    if all(bool(torch.isfinite(torch.stack(ss)).all()) for ss in sums.values()):
        return
    for k, t in floats:
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if n_nan or n_inf:
            raise DeltaMismatchError(
                f"delta {delta.name!r}: tensor {k!r} holds {n_nan} NaN and {n_inf} Inf value(s) of {t.numel()}; "
                "nothing was applied. The training that produced it diverged (lower the learning rate, "
                "clip gradients) or the file is damaged: apply an earlier version"
            )


def _first_misfit(current: dict[str, Any], by_site: dict[str, dict[str, torch.Tensor]]) -> str | None:
    for path, ts in by_site.items():
        if path not in current:
            return f"site {path!r} is not one of its sites"
        have = current[path].tensors()
        for suf, t in have.items():
            if suf not in ts:
                return f"tensor {path}.{suf} is missing"
            if tuple(ts[suf].shape) != tuple(t.shape):
                return f"{path}.{suf} has shape {tuple(ts[suf].shape)} but the model holds {tuple(t.shape)}"
    missing = next((p for p in current if p not in by_site), None)
    return None if missing is None else f"site {missing!r} is missing from the delta applied"


def config_kwargs(method: Any, config: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(method.Config)}
    return {k: v for k, v in config.items() if k in known}


@torch.no_grad()
def _hot_swap(model: nn.Module, name: str, delta: Delta, current: dict, by_site: dict) -> engine.Injection:
    method, old = engine.method_of(model, name), engine.config_of(model, name)
    # validate before touching anything (a merged delta is unmerged below)
    same = delta.config == engine.injection(model, name).config
    cfg = old if same else method.config(**config_kwargs(method, delta.config))
    was_merged = name in engine.merged(model)
    if was_merged:
        engine.unmerge(model, name)
    distributed.reshard(model)  # write the shards, not the unsharded copies a forward left
    for path, ts in by_site.items():
        ad = current[path]
        for suf, t in ad.tensors().items():
            distributed.copy_into(t, ts[suf])
        if cfg is not old:  # another alpha, say, travels with the tensors
            method.refresh(ad, path, cfg)
    inj = engine.reconfigure(model, name, cfg, dict(delta.config))
    if was_merged:
        engine.merge(model, name)
    return inj
