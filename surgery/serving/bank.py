r"""Slot banks: many low-rank deltas resident at once, each row of a batch on its own.

`surgery.serve(model, slots, max_rank, targets)` puts, at every targeted linear site, a
`BankAdapter` holding preallocated tensors for `slots` deltas (plus one all-zero slot, the
base) of rank up to `max_rank`:

.. math::  y_b = m_s \odot (W x_b) + c_s + (x_b A_s^\top) B_s, \qquad s = \mathrm{slot}(b)

with :math:`A_s \in \mathbb{R}^{r \times in}`, :math:`B_s \in \mathbb{R}^{r \times out}`
(the scale folded in), and the output scale :math:`m_s` and shift :math:`c_s` that a DoRA
magnitude or an IA3 vector on the output needs (1 and 0 otherwise). A row's slot comes from
`surgery.route`, a per-call input; the bank's tensors never change shape, so loading a delta
into a slot is a copy: no re-injection, no recompilation of a `torch.compile`d model.

A delta enters a bank through its method's `Adapter.low_rank` (a merge as low-rank factors
and an output scale), so LoRA, DoRA, VeRA, IA3 on outputs, and LoHa / LoKr on linear layers
(their updates factor exactly, at rank r**2 and the Kronecker ranks) are served; anything else
is refused with the method's reason. `SlotBank.prepare` converts a `Delta` once (the pool
keeps what it returns in its CPU tier), `SlotBank.load` copies it into a slot.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import nn

from surgery import engine
from surgery.delta import Delta, check_base, check_finite, config_kwargs, fingerprint, make_adapters
from surgery.errors import ConfigError, SlotError
from surgery.methods.base import Action, Adapter, Method, NotMergeable, SiteView, WeightUpdate, get_method

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # A, B, mul, add


@dataclass
class Prepared:
    """A delta converted for a bank: per site, ``(A [r, in], B [r, out], mul [out] | None,
    add [out] | None)`` with the scale folded into B, on the device it was prepared on (B is
    the transpose of a contiguous [out, r], the layout of a slot).
    `label` names it in errors and in `SlotBank.label`; `base` is the base it was trained on."""

    label: str
    base: str
    rank: int
    factors: dict[str, Factors]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(t.numel() * t.element_size() for f in self.factors.values() for t in f if t is not None)

    def to(self, device: torch.device | str, pin: bool = False) -> Prepared:
        """A copy on `device` (pinned host memory with `pin`, for asynchronous copies to a GPU)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.to(device)
            return t.pin_memory() if pin else t

        moved = {p: cast(Factors, tuple(move(t) for t in f)) for p, f in self.factors.items()}
        return Prepared(self.label, self.base, self.rank, moved)


@dataclass(frozen=True)
class BankConfig:
    slots: int
    max_rank: int


class BankAdapter(Adapter):
    """The slot tensors at one linear site (buffers: not trainable, not in `state_dict`)."""

    action = Action.OUTPUT
    A: (
        torch.Tensor
    )  # [slots + 1, max_rank, in] (LoRA's layout: a slot is filled without a transpose); the last is zeros
    B: torch.Tensor  # [slots + 1, out, max_rank]
    mul: torch.Tensor  # [slots + 1, out]
    add: torch.Tensor  # [slots + 1, out]

    def __init__(self, slots: int, max_rank: int, in_f: int, out_f: int, like: torch.Tensor, dtype: Any) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": like.device, "dtype": dtype or like.dtype}
        self.in_f, self.out_f = in_f, out_f
        self.register_buffer("A", torch.zeros(slots + 1, max_rank, in_f, **kw), persistent=False)
        self.register_buffer("B", torch.zeros(slots + 1, out_f, max_rank, **kw), persistent=False)
        self.register_buffer("mul", torch.ones(slots + 1, out_f, **kw), persistent=False)
        self.register_buffer("add", torch.zeros(slots + 1, out_f, **kw), persistent=False)
        self.bank: Any = None  # the SlotBank (set by serve): where the call's route is read

    def extra_repr(self) -> str:
        s, r, i = self.A.shape
        return f"slots={s - 1}, max_rank={r}, in={i}, out={self.out_f}"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}  # a bank holds no learned tensors of its own: it is not a delta to save

    def merge(self, site: SiteView) -> NotMergeable:
        return NotMergeable("a slot bank serves many deltas per row; merge one delta into the base instead")

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        plan = self.bank.current() if self.bank is not None else None
        if plan is None:
            return out
        n = x.shape[0]
        if n != plan.rows:
            plan = plan.expanded(n)
        x3 = x.reshape(n, -1, self.in_f)
        if x3.dtype != self.A.dtype:
            x3 = x3.to(self.A.dtype)
        o3 = out.view(n, -1, self.out_f)
        cast_back = o3.dtype != self.A.dtype
        if cast_back:
            o3, inplace = o3.to(self.A.dtype), True
        if plan.scaled:  # DoRA's magnitude, IA3 on the output: m * out + c per row
            o3 = torch.addcmul(self.add[plan.idx].unsqueeze(1), o3, self.mul[plan.idx].unsqueeze(1))
            inplace = True
        compiling = torch.compiler.is_compiling()
        groups = (plan.full,) if compiling else plan.groups
        grad = torch.is_grad_enabled() and x3.requires_grad
        cache = None if compiling or grad else plan.cache
        for g in groups:
            got = None if cache is None else cache.get((id(self), g.rank))
            if got is None:
                got = (
                    self.A[:, : g.rank].index_select(0, g.idx).transpose(1, 2),  # [rows, in, r]
                    self.B[:, :, : g.rank].index_select(0, g.idx).transpose(1, 2),  # [rows, r, out]
                )
                if cache is not None:
                    cache[id(self), g.rank] = got
            A, B = got
            if g.rows is None:
                h = torch.bmm(x3, A)
                o3 = o3.baddbmm_(h, B) if inplace and not grad else torch.baddbmm(o3, h, B)
            else:
                h = torch.bmm(x3.index_select(0, g.rows), A)
                o3 = (o3.index_add_ if inplace and not grad else o3.index_add)(0, g.rows, torch.bmm(h, B))
            inplace = True
        o3 = o3.to(out.dtype) if cast_back else o3
        return o3.view(out.shape)


class BankMethod(Method):
    """The engine's view of a bank: it attaches `BankAdapter`s like any delta (so `remove`,
    `summary`, `.to()` and hooks work unchanged) but is not in the method table: it is made
    by `surgery.serve`, never by `inject`."""

    name = "slots"
    Config = BankConfig
    tensor_suffixes: ClassVar[tuple[str, ...]] = ()

    def supports(self, module: nn.Module) -> bool:
        return SiteView(module, "", module).kind in ("linear", "conv1d_tf")

    def make(self, site: SiteView, cfg: BankConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        raise SlotError("a slot bank is made by surgery.serve(model, slots=..., max_rank=..., targets=...)")


_BANK = BankMethod()


class SlotBank:
    """Preallocated slots for low-rank deltas at a model's linear sites (`surgery.serve`).

    ``load(slot, delta)`` copies a delta (a `Delta`, or a `Prepared` from `prepare`) into a
    slot, ``unload(slot)`` empties it; `surgery.route(model, [slot per row])` runs a batch
    with each row on its slot. A slot that a running `route` uses cannot be loaded or
    unloaded (`SlotError`): swap into the others while it runs."""

    def __init__(self, model: nn.Module, name: str, slots: int, max_rank: int, adapters: dict[str, BankAdapter]):
        self.model_ref = weakref.ref(model)
        self.name, self.slots, self.max_rank = name, slots, max_rank
        self.adapters = adapters
        self.base = fingerprint(model)
        self.ranks: list[int] = [-1] * slots  # -1: empty
        self.scaled: list[bool] = [False] * slots
        self.labels: list[str | None] = [None] * slots
        self.busy: list[int] = [0] * slots  # routes in flight per slot
        self.written: list[int] = [0] * slots  # rank of what a slot's tensors hold (kept when unloaded)
        self.scaled_rows: list[bool] = [False] * slots  # whether its output scales differ from 1, 0
        self.spare: dict[tuple[str, str, str], list[dict[str, Adapter]]] = {}  # adapters prepare reuses
        self.lock = threading.Lock()
        ad = next(iter(adapters.values()))
        self.device, self.dtype = ad.A.device, ad.A.dtype
        self.state = engine.state_of(model)
        proxy = cast(nn.Module, weakref.proxy(model))
        self.views = {p: SiteView(proxy, p, engine.site_module(model, p)) for p in adapters}

    def __repr__(self) -> str:
        used = sum(r >= 0 for r in self.ranks)
        return (
            f"SlotBank(name={self.name!r}, slots={self.slots}, max_rank={self.max_rank}, sites={len(self.adapters)}, "
            f"loaded={used}, device={self.device}, dtype={self.dtype})"
        )

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ad in self.adapters.values() for t in ad.buffers())

    def model(self) -> nn.Module:
        m = self.model_ref()
        if m is None:
            raise SlotError("the model of this slot bank no longer exists")
        return m

    def current(self) -> Any:
        """The route of this call (`surgery.route`), or None."""
        st = self.state
        plan = st.route() if st is not None else None
        return plan if plan is not None and plan.bank is self else None

    def label(self, slot: int) -> str | None:
        """What slot `slot` holds (the label it was loaded with), or None when it is empty."""
        return self.labels[self.check_slot(slot)]

    def check_slot(self, slot: Any) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise SlotError(f"a slot id is an int in 0..{self.slots - 1}, got {slot!r}")
        if not 0 <= slot < self.slots:
            raise SlotError(
                f"slot {slot} is out of range: this bank has {self.slots} slots (0..{self.slots - 1}); "
                "-1 or None routes a row to the base"
            )
        return slot

    # ---- converting and loading deltas
    @torch.no_grad()
    def prepare(self, delta: Delta, label: str | None = None, *, allow_other_base: bool = False) -> Prepared:
        """`delta` as this bank serves it: per site, low-rank factors and output scales (on the
        bank's device and dtype). Refuses a delta for another base (unless `allow_other_base`),
        one with sites the bank does not hold, a rank above `max_rank`, a method whose update is
        not low-rank here, and NaN / Inf; the bank is not touched."""
        if not isinstance(delta, Delta):
            raise SlotError(f"a slot bank loads a surgery.Delta (hub.pull(ref)), got {type(delta).__name__}")
        label = label or delta.name
        if not allow_other_base:
            check_base(delta, self.base, label)
        method = get_method(delta.method)
        by_site = delta.sites()
        check_finite(delta)
        method.check_tensors(self.model(), by_site, delta.config)  # what shapes do not show (a LoftQ base)
        shapes = {p: {k: t.shape for k, t in ts.items()} for p, ts in by_site.items()}
        key = (delta.method, json.dumps(delta.config, sort_keys=True, default=str), repr(shapes))
        with self.lock:
            made = self.spare.get(key, []).pop() if self.spare.get(key) else None
        if made is None:  # the first delta of this method, config and shapes builds the adapters
            cfg = method.config(**config_kwargs(method, delta.config))
            made = {p: ad for p, _, ad in make_adapters(self.model(), delta, cfg)}
            method.attached(made)
            for ad in made.values():
                ad.eval()
        try:
            factors: dict[str, Factors] = {}
            for path, ad in made.items():
                ts = by_site[path]
                for suf, t in ad.tensors().items():  # shapes checked when made (the spares are keyed by them)
                    t.data = ts[suf].to(t.device, t.dtype)
                factors[path] = self._factors(label, delta.method, path, ad)
        finally:  # kept for the next delta of the same kind: building adapters is most of a prepare
            with self.lock:
                if len(self.spare) > 16:
                    self.spare.clear()
                self.spare.setdefault(key, []).append(made)
        other = sorted(set(by_site) - set(self.adapters))
        if other:
            raise SlotError(
                f"delta {label!r} has sites this bank does not hold: {other[:3]}{' ...' if len(other) > 3 else ''} "
                f"({len(other)} of {len(by_site)}). Serve a bank whose targets cover them "
                f"(surgery.serve(model, ..., targets=...)), or merge this delta into the base"
            )
        rank = max((f[0].shape[0] for f in factors.values()), default=0)
        return Prepared(label, delta.base, rank, factors)

    def _factors(self, label: str, method: str, path: str, ad: Adapter) -> Factors:
        site = self.views.get(path) or SiteView(self.model(), path, engine.site_module(self.model(), path))
        got = ad.low_rank(site)
        refuse = f"delta {label!r} ({method}) cannot be served from a slot bank at {path!r}: "
        if isinstance(got, NotMergeable):
            raise SlotError(refuse + got.reason)
        kind = site.kind
        if kind not in ("linear", "conv1d_tf"):
            raise SlotError(refuse + f"it sits on a {type(site.module).__name__}; a bank serves linear layers")
        unknown = sorted(set(got) - {"weight", "bias"})
        if unknown or "weight" not in got:
            raise SlotError(refuse + f"it updates {sorted(got)}, a bank serves weight and bias updates only")
        w: WeightUpdate = got["weight"]
        tr = kind == "conv1d_tf"  # weight [in, out]: rows scale the input, cols the output
        out_scale, in_scale = (w.cols, w.rows) if tr else (w.rows, w.cols)
        if in_scale is not None:
            raise SlotError(refuse + "it scales the site's input (IA3 on a feed-forward input); a bank adds to outputs")
        if w.delta is not None and not isinstance(w.delta, tuple):
            raise SlotError(
                refuse + "its update is a dense matrix, not low-rank factors; merge it into a copy of the base instead"
            )
        kw: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        if w.delta is None:
            A, B = torch.zeros(0, cast(int, site.in_features), **kw), torch.zeros(0, cast(int, site.out_features), **kw)
        else:
            left, right = w.delta
            A, B = (left.t(), right) if tr else (right, left.t())  # delta x = B^T (A x)
            if out_scale is not None:  # m * (W + D) x: the scale rides on D's output side too
                B = B.float() * out_scale.detach().float()[None, :]
            A, B = A.detach().to(**kw), B.detach().to(**kw)
            # laid out as the slot holds them (B transposed), so the copy into a slot is a plain one
            A = A if A.is_contiguous() else A.contiguous()
            B = B if B.t().is_contiguous() else B.t().contiguous().t()
        if A.shape[0] > self.max_rank:
            raise SlotError(
                refuse + f"its rank there is {A.shape[0]}, above this bank's max_rank={self.max_rank}; serve a bank "
                f"with max_rank >= {A.shape[0]}"
            )
        mul = add = None
        bias = site.bias
        if out_scale is not None:
            mul = out_scale.detach().to(torch.float32)
            # the bias is added after the scale unless the method scales (or updates) it too
            add = torch.zeros_like(mul, device="cpu") if bias is None else bias.detach().float().cpu() * (1 - mul.cpu())
        bu = got.get("bias")
        if bu is not None:
            if bias is None:
                raise SlotError(refuse + "it updates a bias the site does not have")
            b0 = bias.detach().float()
            nb = b0 if bu.delta is None else b0 + cast(torch.Tensor, bu.delta).detach().float()
            nb = nb if bu.rows is None else nb * bu.rows.detach().float()
            m = mul if mul is not None else torch.ones_like(b0)
            mul = m
            add = (nb - b0 * m.to(b0.device)).cpu()  # out = m * (W x + b) + (b' - m b)
        if mul is not None:
            mul, add = mul.to(**kw), cast(torch.Tensor, add).to(**kw)
        return A, B, mul, add

    def load(self, slot: int, delta: Delta | Prepared, label: str | None = None) -> None:
        """Copy a delta into `slot` (a `Delta` is prepared first): its tensors overwrite the slot's
        in place, so nothing is re-injected or recompiled. Refused while a route uses the slot."""
        slot = self.check_slot(slot)
        prep = delta if isinstance(delta, Prepared) else self.prepare(delta, label)
        if not isinstance(prep, Prepared):
            raise SlotError(f"load takes a surgery.Delta or a Prepared, got {type(delta).__name__}")
        if set(prep.factors) - set(self.adapters):
            raise SlotError(f"{prep.label!r} was prepared for another bank: it has sites this bank does not hold")
        if prep.rank > self.max_rank:
            raise SlotError(f"{prep.label!r} has rank {prep.rank}, above this bank's max_rank={self.max_rank}")
        with self.lock:
            self._check_free(slot, "load into")
            self.ranks[slot] = -1  # empty while written: a route started now is refused
            self.busy[slot] += 1  # so is another load into it
        try:
            scaled = self._write(slot, prep)
        except BaseException:
            with self.lock:
                self.busy[slot] -= 1
                self.labels[slot] = None
            raise
        with self.lock:
            self.busy[slot] -= 1
            self.ranks[slot], self.scaled[slot] = prep.rank, scaled
            self.labels[slot] = label or prep.label

    @torch.no_grad()
    def _write(self, slot: int, prep: Prepared) -> bool:
        # only what the slot's previous content set is cleared: ranks up to `written`, scales if set
        old, old_scaled, scaled = self.written[slot], self.scaled_rows[slot], False
        self.written[slot], self.scaled_rows[slot] = self.max_rank, True  # if this write fails: clear all next time
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        full = self.max_rank
        for path, ad in self.adapters.items():
            A, B, mul, add = prep.factors.get(path) or (None, None, None, None)
            r = 0 if A is None or B is None else A.shape[0]
            if A is not None and B is not None and r:
                dst += (ad.A[slot] if r == full else ad.A[slot, :r], ad.B[slot] if r == full else ad.B[slot, :, :r])
                src += (A, B.t())
            if r < old:
                ad.A[slot, r:old].zero_()
                ad.B[slot, :, r:old].zero_()
            if mul is not None:
                dst += (ad.mul[slot], ad.add[slot])
                src += (mul, cast(torch.Tensor, add))
                scaled = True
            elif old_scaled:
                ad.mul[slot].fill_(1)
                ad.add[slot].zero_()
        if dst:
            torch._foreach_copy_(dst, src, non_blocking=True)  # one dispatch for every site's tensors
        self.written[slot], self.scaled_rows[slot] = prep.rank, scaled
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return scaled

    def unload(self, slot: int) -> None:
        """Empty `slot` (its rows route to nothing until it is loaded again). Refused while a route uses it."""
        slot = self.check_slot(slot)
        with self.lock:
            self._check_free(slot, "unload")
            self.ranks[slot], self.scaled[slot], self.labels[slot] = -1, False, None

    def _check_free(self, slot: int, what: str) -> None:
        if self.busy[slot]:
            raise SlotError(
                f"cannot {what} slot {slot}: {self.busy[slot]} running route(s) use it ({self.labels[slot]!r}); "
                "wait for them to finish, or use another slot"
            )

    # ---- what routes take while they run
    def acquire(self, slots: list[int]) -> None:
        with self.lock:
            empty = [s for s in slots if self.ranks[s] < 0]
            if empty:
                raise SlotError(
                    f"slot(s) {empty[:5]} hold no delta: load one (bank.load(slot, delta)) or route those rows "
                    "to the base with -1 / None"
                )
            for s in slots:
                self.busy[s] += 1

    def release(self, slots: list[int]) -> None:
        with self.lock:
            for s in slots:
                self.busy[s] -= 1


def serve(
    model: nn.Module,
    slots: int = 8,
    max_rank: int = 16,
    targets: Any = "@linear",
    *,
    name: str = "slots",
    dtype: torch.dtype | None = None,
) -> SlotBank:
    """Preallocate a slot bank on the model's device: at every linear site `targets` selects,
    room for `slots` low-rank deltas of rank up to `max_rank` (in the sites' dtype, or `dtype`).
    Rows are routed to slots per call with `surgery.route`; `surgery.remove(model, name)` takes
    the bank out again. The model's base weights are not touched."""
    engine.check_model(model)
    for what, v in (("slots", slots), ("max_rank", max_rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"serve: {what} must be a positive integer, got {v!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"serve: dtype must be a floating torch.dtype, got {dtype!r}")
    if bank_of(model, name, missing_ok=True) is not None:
        raise SlotError(f"this model already has a slot bank named {name!r}; surgery.remove(model, {name!r}) first")
    engine.check_name(model, name)
    hits = engine.resolve_sites(model, _BANK, targets)
    made: list[tuple[str, nn.Module, Adapter]] = []
    for path, mod in hits:
        view = SiteView(model, path, mod)
        w = cast(torch.Tensor, view.weight)
        made.append(
            (
                path,
                mod,
                BankAdapter(slots, max_rank, cast(int, view.in_features), cast(int, view.out_features), w, dtype),
            )
        )
    engine.attach(model, name, _BANK, BankConfig(slots, max_rank), made, activate=False)
    adapters = {p: cast(BankAdapter, a) for p, _, a in made}
    bank = SlotBank(model, name, slots, max_rank, adapters)
    for ad in adapters.values():
        ad.bank = bank
    return bank


def bank_of(model: nn.Module, name: str | None = None, *, missing_ok: bool = False) -> SlotBank | None:
    """The slot bank `serve` put in `model` (by name when it has several)."""
    found = [
        cast(BankAdapter, next(iter(engine.adapters(model, n).values()))).bank
        for n in engine.names(model)
        if engine.method_of(model, n) is _BANK and (name is None or n == name)
    ]
    if len(found) == 1:
        return found[0]
    if missing_ok and not found:
        return None
    if not found:
        raise SlotError(
            "this model has no slot bank"
            + (f" named {name!r}" if name else "")
            + ": bank = surgery.serve(model, slots=..., max_rank=..., targets=...) first"
        )
    raise SlotError(f"this model has {len(found)} slot banks: pass the bank itself (or its name)")
