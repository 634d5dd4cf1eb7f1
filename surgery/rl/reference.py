"""`reference(model)`: the frozen base alone, with every delta off, and checked to be so;
`reference(model, "sft")`: the base with only the named (frozen) deltas on.

RL and preference training compare the policy with a reference: here the same model with every
delta switched off (`surgery.disable`, context-local), so no second copy is held. TRL's "adapter
disabled" reference is silently wrong when an adapter is hidden by a wrapper or biases were trained
in place; `reference` refuses such a model instead (`ReferenceCheckError`, saying what to do):

* a delta merged into the base weights (it cannot be switched off);
* a base parameter that requires grad (the base is trained in place: the reference would move);
* a parameter that is neither the base surgery recorded at the first injection nor one of its
  deltas (a PEFT layer, a hand-added module), and any PEFT tuner layer;
* base weights changed in place since the first `reference()`: that call hashes them and records
  each tensor's `_version`; later ones re-hash only the tensors whose version moved.

DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers are looked through, and
deltas injected into any submodule (a wrapper around an injected model) are switched off too.

Named deltas stay on (`reference(model, "sft")`: TRL's ``ref_adapter_name``): DPO, PPO and GRPO from an
SFT delta are then anchored to the SFT model, not to the base. The policy trains a copy of it
(``surgery.apply(model, surgery.delta(model, "sft"), name="policy")``). The kept deltas' tensors are
watched like the base's: one that changes in place (an optimizer over it, a hot-swap) is refused.
A kept delta may be merged (it stays in the weights); every other merged delta is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery import context, engine
from surgery.engine.runtime import AdapterDict
from surgery.errors import ConfigError, SurgeryError

_RECORD = "_surgery_reference"  # the weights record, in the unwrapped model's instance __dict__


class ReferenceCheckError(SurgeryError):
    """`reference()` cannot vouch that the model with every delta off is the frozen base."""


@dataclass
class ReferenceCheck:
    """What the weights check did for one model: `entries` (reference() calls checked), `tensors`
    (base tensors watched), `hashed` (tensors hashed, the first call's included), `seconds` (time
    spent hashing in all) and `first` (when the weights were first hashed, time.time())."""

    entries: int = 0
    tensors: int = 0
    hashed: int = 0
    seconds: float = 0.0
    first: float = 0.0
    # name -> (the tensor, weakly: an id could be reused by a new one; its _version; digest)
    seen: dict[str, tuple[Any, int, str]] = field(default_factory=dict, repr=False)
    kept: dict[str, tuple[Any, int, str]] = field(default_factory=dict, repr=False)  # kept deltas' tensors


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    engine.check_model(model)
    while True:
        wraps = isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
        inner = model._modules.get("module") if wraps else model._modules.get("_orig_mod")
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def injected(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> module, for `model` and every submodule that holds surgery deltas."""
    return _walk(model)[0]


@dataclass
class _Tree:
    holders: dict[str, nn.Module]  # path -> module holding surgery deltas
    params: dict[str, nn.Parameter]  # the base's (every delta left out), by every name they have
    tensors: dict[str, torch.Tensor]  # params and buffers
    tuner: str | None  # the first PEFT tuner layer's path


def _is_tuner(cls: type, cache: dict[type, bool] = {}) -> bool:  # noqa: B006  (a per-class cache)
    if cls not in cache:
        cache[cls] = any(c.__name__ == "BaseTunerLayer" for c in cls.__mro__)
    return cache[cls]


def _quant_tensors(prefix: str, qs: Any) -> dict[str, torch.Tensor]:
    """A 4-bit weight's quantisation state (bitsandbytes' absmax, code, nested state2): part of the base too."""
    out: dict[str, torch.Tensor] = {}
    for k, v in (vars(qs) if qs is not None and hasattr(qs, "__dict__") else {}).items():
        if isinstance(v, torch.Tensor):
            out[f"{prefix}.{k}"] = v
        elif k == "state2":
            out.update(_quant_tensors(f"{prefix}.state2", v))
    return out


def _walk(model: nn.Module) -> tuple[dict[str, nn.Module], _Tree]:
    """One pass over the module tree, skipping every delta's modules (the sites' ``surgery`` children)."""
    tree = _Tree({}, {}, {}, None)
    todo = [("", model)]
    while todo:
        path, m = todo.pop()
        if isinstance(m, AdapterDict):
            continue
        if context.STATE_ATTR in m.__dict__:
            tree.holders[path] = m
        if tree.tuner is None and _is_tuner(type(m)):
            tree.tuner = path
        pre = path + "." if path else ""
        for n, p in m._parameters.items():
            if p is not None:
                tree.params[pre + n] = tree.tensors[pre + n] = p
                tree.tensors.update(_quant_tensors(f"{pre}{n}.quant_state", getattr(p, "quant_state", None)))
        for n, b in m._buffers.items():
            if b is not None:
                tree.tensors[pre + n] = b
        todo.extend((pre + n, c) for n, c in reversed(m._modules.items()) if c is not None)
    return tree.holders, tree


def _check_structure(tree: _Tree, keep: tuple[str, ...] = ()) -> None:
    holders = tree.holders
    if tree.tuner is not None:
        raise ReferenceCheckError(
            f"reference(): {tree.tuner!r} is a PEFT adapter layer, which surgery cannot switch off; load the base "
            "without PEFT and inject the delta with surgery.inject (or surgery.apply a Delta converted from PEFT)"
        )
    bad = sorted(n for n, p in tree.params.items() if p.requires_grad)
    if bad and holders:  # a model without deltas is checked by its weights alone
        raise ReferenceCheckError(
            f"reference(): base parameter(s) {bad[:5]}{' ...' if len(bad) > 5 else ''} require grad: the base is "
            "being trained in place, so the reference would move with the policy. Train a delta instead "
            "(surgery.inject(model, 'bitfit') for biases, 'sparse' for a few weights) or freeze them "
            "(p.requires_grad_(False))"
        )
    merged = {p or "model": off for p, m in holders.items() if (off := [n for n in engine.merged(m) if n not in keep])}
    if merged:
        where, names = next(iter(merged.items()))
        raise ReferenceCheckError(
            f"reference(): delta(s) {names} are merged into {where}'s weights and cannot be switched off; "
            f"surgery.unmerge(model, {names[0]!r}) first"
        )
    if not holders:
        return
    known = {id(p) for m in holders.values() for p in engine.base_params(m)}  # as recorded at first injection
    stranger = sorted(n for n, p in tree.params.items() if id(p) not in known)
    if stranger:
        raise ReferenceCheckError(
            f"reference(): parameter(s) {stranger[:5]}{' ...' if len(stranger) > 5 else ''} were added after the "
            "first delta was injected and are no delta of surgery's, so they cannot be switched off: a module "
            "added by hand or by another library. Make it a surgery delta (surgery.inject, surgery.heads) or "
            "remove it"
        )


def _digest(t: torch.Tensor) -> str:
    if t.device.type == "meta":
        return "meta"
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _kept_tensors(holders: dict[str, nn.Module], keep: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The kept deltas' tensors, by "delta:holder path:site.suffix"; every name must be injected somewhere."""
    out: dict[str, torch.Tensor] = {}
    found: set[str] = set()
    for path, m in holders.items():
        here = set(engine.names(m))
        for name in keep:
            if name in here:
                found.add(name)
                for site, ad in engine.adapters(m, name).items():
                    out.update({f"{name}:{path}:{site}.{suf}": t for suf, t in ad.tensors().items()})
    missing = [n for n in keep if n not in found]
    if missing:
        injected = sorted({n for m in holders.values() for n in engine.names(m)})
        raise ReferenceCheckError(
            f"reference(): no delta {missing[0]!r} to keep on in the reference (injected: {injected or 'none'}); "
            "name deltas the model has, or none for the base alone"
        )
    return out


def _rehash(rec: ReferenceCheck, seen: dict[str, tuple[Any, int, str]], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Hash the tensors that are new or whose version moved into `seen`; the names whose digest changed."""
    t0 = time.perf_counter()
    changed = []
    for n, t in tensors.items():
        key = seen.get(n)
        if key is not None and key[0]() is t and key[1] == t._version:
            continue
        d = _digest(t)
        rec.hashed += 1
        if key is not None and key[2] != d:
            changed.append(n)
        seen[n] = (weakref.ref(t), t._version, d)
    rec.seconds += time.perf_counter() - t0
    return changed


def _check_weights(
    model: nn.Module, base: dict[str, torch.Tensor], kept: dict[str, torch.Tensor] | None = None
) -> ReferenceCheck:
    rec: ReferenceCheck | None = model.__dict__.get(_RECORD)
    first = rec is None
    if rec is None:
        rec = ReferenceCheck(first=time.time())
    if not first and set(base) != set(rec.seen):
        gone, new = sorted(set(rec.seen) - set(base)), sorted(set(base) - set(rec.seen))
        raise ReferenceCheckError(
            f"reference(): the base's tensors changed since the first reference() (gone: {gone[:5]}, new: {new[:5]}); "
            "the reference would not be the base it was. Rebuild the model, or reference.forget(model) to accept it"
        )
    seen, kept_seen = dict(rec.seen), dict(rec.kept)
    changed = _rehash(rec, seen, base)
    when = time.strftime("%H:%M:%S", time.localtime(rec.first))
    if changed:
        raise ReferenceCheckError(
            f"reference(): the base changed in place since the first reference() at {when}: {changed[:5]}"
            f"{' ...' if len(changed) > 5 else ''}. Something trains or edits base weights (an optimizer over "
            "base parameters, a merge without unmerge); train deltas only, or reference.forget(model) to take "
            "the current weights as the base"
        )
    moved = _rehash(rec, kept_seen, kept or {})
    if moved:
        name = moved[0].split(":", 1)[0]
        raise ReferenceCheckError(
            f"reference(): the delta {name!r} kept on in the reference changed since it was first kept "
            f"({len(moved)} tensor(s), e.g. {moved[0].split(':', 1)[1]!r}): something trains or overwrites it, "
            f"so the reference would move. Train a copy (surgery.apply(model, surgery.delta(model, {name!r}), "
            "name='policy')) and keep the original frozen, or reference.forget(model) to accept its new weights"
        )
    rec.seen, rec.kept, rec.tensors = seen, kept_seen, len(seen)
    rec.entries += 1
    model.__dict__[_RECORD] = rec
    return rec


def keep_names(deltas: Any, where: str, policy: str | None = None) -> tuple[str, ...]:
    """`ref_delta=` of the RL trainers as a tuple of names (None -> (), "sft" -> ("sft",)), refusing
    the trained delta `policy` among them: the reference would move with it."""
    if deltas is None:
        return ()
    names = (deltas,) if isinstance(deltas, str) else tuple(deltas) if isinstance(deltas, (list, tuple)) else None
    if names is None or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ConfigError(
            f"{where}: ref_delta must be None (the base), a delta name or a list of distinct names, got {deltas!r}"
        )
    if policy is not None and policy in names:
        raise ConfigError(
            f"{where}: the policy delta {policy!r} is also ref_delta, so the reference would move with it; "
            f"train a copy: surgery.apply(model, surgery.delta(model, {policy!r}), name='policy'), delta='policy'"
        )
    return names


@contextlib.contextmanager
def reference(model: nn.Module, *deltas: str) -> Iterator[None]:
    """Within this context (this thread / asyncio task only), run `model` as the frozen base: every
    delta off in it and in every injected submodule, after the checks above (`ReferenceCheckError`
    when one fails), but the `deltas` named, which stay on (stacked) and are watched too. A model with
    no delta runs as it is (its weights are still watched). Nests."""
    keep = keep_names(list(deltas), "reference()")
    inner = unwrap(model)
    holders, tree = _walk(inner)
    _check_structure(tree, keep)
    kept = _kept_tensors(holders, keep)
    _check_weights(inner, tree.tensors, kept)
    with contextlib.ExitStack() as stack:
        for m in holders.values():
            here = set(engine.names(m))
            stack.enter_context(engine.use(m, *[n for n in keep if n in here]))
        yield


def check(model: nn.Module) -> ReferenceCheck | None:
    """The weights check's record for `model` (its cost: tensors hashed, seconds), None before the first
    `reference()`."""
    return unwrap(model).__dict__.get(_RECORD)


def forget(model: nn.Module) -> None:
    """Drop the weights record: the next `reference()` hashes the current weights as the base."""
    unwrap(model).__dict__.pop(_RECORD, None)


reference.check = check  # type: ignore[attr-defined]
reference.forget = forget  # type: ignore[attr-defined]

__all__ = ["ReferenceCheck", "ReferenceCheckError", "check", "forget", "keep_names", "reference", "unwrap"]
