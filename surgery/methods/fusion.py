r"""AdapterFusion (Pfeiffer et al., 2021): attention over the outputs of trained adapters.

At every site the fused adapters share, with :math:`o` the sublayer output
(the query) and :math:`c_i` what adapter *i* adds to it:

.. math::  p = \mathrm{softmax}_i\big((W_q o + b_q) \cdot (W_k c_i + b_k) / T\big), \qquad
           y = o + W_v \textstyle\sum_i p_i c_i + b_v

:math:`W_v` starts as the identity (and :math:`b_v` at zero), so at the start
the fusion is an attention-weighted average of the adapters; :math:`W_q, W_k`
start small (normal, std 0.02). `surgery.fuse` freezes the adapters and trains
only the fusion; `surgery.fusion_weights` returns the :math:`p` of the last
forward per site, for a plot. Stored tensors: ``query.weight`` / ``.bias``,
``key.*``, ``value.*`` under each site; the config names the fused adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery import engine
from surgery.errors import CompositionError, ConfigError
from surgery.methods.base import Action, Adapter, Method, MethodConfig, NotMergeable, SiteView, get_method, register
from surgery.sublayers import out_width


@dataclass
class FusionConfig(MethodConfig):
    """Attributes:
    adapters: names of the trained adapters the fusion attends over (set by surgery.fuse).
    temperature: softmax temperature of the attention over the adapters' outputs.
    """

    adapters: list[str] = field(default_factory=list)
    temperature: float = 1.0


class FusionLayer(Adapter):
    action = Action.COMPOSE

    def __init__(self, d: int, members: tuple[str, ...], temperature: float, like: torch.Tensor) -> None:
        super().__init__()
        dt = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
        kw: dict[str, Any] = {"device": like.device, "dtype": dt}
        self.query = nn.Linear(d, d, **kw)
        self.key = nn.Linear(d, d, **kw)
        self.value = nn.Linear(d, d, **kw)
        self.members = members
        self.temperature = temperature
        self.last_weights: torch.Tensor | None = None
        if not like.is_meta:
            with torch.no_grad():
                for lin in (self.query, self.key):
                    nn.init.normal_(lin.weight, std=0.02)
                    nn.init.zeros_(lin.bias)
                self.value.weight.copy_(torch.eye(d, **kw))
                nn.init.zeros_(self.value.bias)

    def merge(self, site: SiteView) -> NotMergeable:
        return NotMergeable("it mixes its adapters' outputs by attention over them, which depends on the input")

    def extra_repr(self) -> str:
        return f"over={list(self.members)}, T={self.temperature:g}"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": getattr(getattr(self, n), k) for n in ("query", "key", "value") for k in ("weight", "bias")}

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        raise CompositionError("a fusion runs over its adapters; activate it by name or with surgery.Fuse(...)")

    def fuse(self, query: torch.Tensor, contributions: list[torch.Tensor]) -> torch.Tensor:
        dt = self.query.weight.dtype
        q = self.query(query.to(dt))  # [..., d]
        c = torch.stack([t.to(dt) for t in contributions], dim=-2)  # [..., n, d]
        k = self.key(c)
        p = ((k @ q.unsqueeze(-1)).squeeze(-1) / self.temperature).softmax(-1)  # [..., n]
        self.last_weights = p.detach()
        mix = (p.unsqueeze(-2) @ c).squeeze(-2)
        return query + self.value(mix).to(query.dtype)


@register
class Fusion(Method):
    name = "fusion"
    identity_at_init = False
    Config = FusionConfig
    tensor_suffixes = tuple(f"{n}.{k}" for n in ("query", "key", "value") for k in ("weight", "bias"))

    def validate(self, cfg: FusionConfig) -> None:
        if (
            not isinstance(cfg.adapters, (list, tuple))
            or len(cfg.adapters) < 2
            or not all(isinstance(a, str) for a in cfg.adapters)
        ):
            raise ConfigError(f"fusion: adapters must be a list of at least two delta names, got {cfg.adapters!r}")
        if len(set(cfg.adapters)) != len(cfg.adapters):
            raise ConfigError(f"fusion: adapters {cfg.adapters} name one delta twice")
        if not (isinstance(cfg.temperature, (int, float)) and cfg.temperature > 0):
            raise ConfigError(f"fusion: temperature must be a positive number, got {cfg.temperature!r}")

    def supports(self, module: nn.Module) -> bool:
        return out_width(module) is not None

    def members(self, cfg: FusionConfig) -> tuple[str, ...]:
        return tuple(cfg.adapters)

    def make(self, site: SiteView, cfg: FusionConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        module = site.module
        d = int(shapes["query.weight"][0]) if shapes else out_width(module)
        like = next((p for p in module.parameters() if p.is_floating_point()), torch.empty(0))
        return FusionLayer(d, tuple(cfg.adapters), float(cfg.temperature), like)  # type: ignore[arg-type]


def fuse(model: nn.Module, adapters: list[str], name: str = "fusion", *, temperature: float = 1.0) -> engine.Injection:
    """AdapterFusion over trained adapters: inject a fusion layer at every site they share,
    freeze the adapters and make only the fusion trainable. The fusion becomes active in
    place of its adapters (run it with ``surgery.use(model, surgery.Fuse(*adapters))``
    or by its name)."""
    method = get_method("fusion")
    cfg = method.config(adapters=list(adapters), temperature=temperature)
    engine.check_name(model, name)
    sites: list[str] | None = None
    for a in cfg.adapters:
        inj = engine.injection(model, a)
        if engine.method_of(model, a).members(engine.config_of(model, a)):
            raise ConfigError(f"fusion: {a!r} is itself a fusion; fuse adapters, not fusions")
        if any(ad.replaces for ad in engine.adapters(model, a).values()):
            raise ConfigError(f"fusion: {a!r} ({inj.method}) replaces its sites' output; only additive deltas fuse")
        if a in engine.merged(model):
            raise ConfigError(f"fusion: {a!r} is merged into the base; surgery.unmerge(model, {a!r}) first")
        if sites is None:
            sites, first = list(inj.sites), a
        elif set(inj.sites) != set(sites):
            only = sorted(set(inj.sites) ^ set(sites))
            raise ConfigError(
                f"fusion: adapters {first!r} and {a!r} do not share their sites (e.g. {only[0]!r} has only "
                f"one of them); fuse adapters injected at the same sites (same style and targets)"
            )
    assert sites is not None
    made = [
        (p, engine.site_module(model, p), method.make(SiteView(model, p, engine.site_module(model, p)), cfg))
        for p in sites
    ]
    inj = engine.attach(model, name, method, cfg, made)
    for a in cfg.adapters:
        for ad in engine.adapters(model, a).values():
            ad.requires_grad_(False)
    return inj


def fusion_weights(model: nn.Module, name: str = "fusion") -> dict[str, torch.Tensor]:
    """Site path -> the fusion's attention weights in the last forward that ran it
    (shape [..., n_adapters]; the last axis sums to 1, in the order of the fused adapters)."""
    inj = engine.injection(model, name)
    if inj.method != "fusion":
        raise ConfigError(f"{name!r} is a {inj.method!r} delta, not a fusion")
    out = {
        p: ad.last_weights
        for p, ad in engine.adapters(model, name).items()
        if isinstance(ad, FusionLayer) and ad.last_weights is not None
    }
    if not out:
        raise CompositionError(f"fusion {name!r} has not run yet; call the model with it active first")
    return out


__all__ = ["Fusion", "FusionConfig", "FusionLayer", "fuse", "fusion_weights"]
