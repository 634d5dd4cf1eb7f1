r"""Mixture of experts by upcycling a feed-forward block (Switch Transformer, Fedus et al., 2021;
sparse upcycling, Komatsuzaki et al., 2022), and the routing shared with ``lora_moe``.

Method ``"moe"`` replaces an FFN :math:`F` (a site from `surgery.sublayers`) by ``experts``
copies :math:`E_i = F` and a router :math:`W_r`: :math:`y = \sum_{i \in \mathcal{T}(x)} g_i(x)\, E_i(x)`
over the top-k experts :math:`\mathcal{T}(x)` of :math:`p(x) = \mathrm{softmax}(W_r x)`, with
gates :math:`g_i = p_i / \mathrm{sg}[\sum_{j \in \mathcal{T}(x)} p_j]` (sg = stop-gradient).
Switch's gate :math:`p_i` alone is about :math:`1/n` for a fresh router and would scale the
upcycled FFN down by :math:`n`; these gates sum to 1 in value (exactly 1 for top-1), so at
injection the output is the dense FFN's whatever the router, while the router still gets the
Switch gradient. Capacity, the load-balancing loss (``surgery.aux_loss``), the sites, the
tensors and the dispatch are described in docs/moe.md.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from surgery.engine.state import CHILD
from surgery.errors import ConfigError, InjectionError, SelectorError
from surgery.fourbit import is_quantized, to_linear
from surgery.methods.base import Action, Adapter, Method, MethodConfig, NotMergeable, SiteView, register
from surgery.sublayers import (
    check_forward,
    ffn_sublayers,
    fused_beside,
    fused_experts,
    fused_refusal,
    out_width,
    split_fused,
    with_fused,
)

# ---------------------------------------------------------------------------- routing (shared with lora_moe)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_routing(method: str, experts: Any, top_k: Any, router_std: Any) -> None:
    """ConfigError for bad expert counts / top-k / router init."""
    if not (is_int(experts) and experts >= 1):
        raise ConfigError(f"{method}: experts must be a positive integer, got {experts!r}")
    if not (is_int(top_k) and top_k >= 1):
        raise ConfigError(f"{method}: top_k must be a positive integer, got {top_k!r}")
    if top_k > experts:
        raise ConfigError(
            f"{method}: top_k={top_k} is larger than experts={experts}; each token picks top_k distinct "
            f"experts, so use top_k <= {experts}"
        )
    if not (is_number(router_std) and router_std >= 0):
        raise ConfigError(f"{method}: router_std must be a number >= 0, got {router_std!r}")


def make_router(d_in: int, experts: int, std: float, like: torch.Tensor) -> nn.Linear:
    """The router: `Linear(d_in, experts, bias=False)`, fp32 on half-precision bases."""
    dt = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    router = nn.Linear(d_in, experts, bias=False, device=like.device, dtype=dt)
    if not like.is_meta:
        with torch.no_grad():
            nn.init.normal_(router.weight, std=std)
    return router


def route(
    router: nn.Linear, x2: torch.Tensor, top_k: int, jitter: float = 0.0, training: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens `x2` [T, d]: returns (probs [T, n], gates [T, k], experts [T, k]).

    gates = p_topk / sg(sum p_topk): they sum to 1 in value and give the router the
    Switch gradient (see the module docstring)."""
    w = router.weight
    xr = x2 if x2.dtype == w.dtype else x2.to(w.dtype)
    if jitter and training:
        xr = xr * torch.empty_like(xr).uniform_(1.0 - jitter, 1.0 + jitter)
    probs = F.linear(xr, w).softmax(-1)
    if top_k == 1:
        p, idx = probs.max(-1, keepdim=True)
    else:
        p, idx = probs.topk(top_k, dim=-1)
    gates = p / p.sum(-1, keepdim=True).detach()
    return probs, gates, idx


def balance_loss(probs: torch.Tensor, counts: torch.Tensor, assignments: int) -> torch.Tensor:
    """Switch's load-balancing loss n * sum_i f_i P_i (f_i = counts_i / assignments)."""
    if not assignments:
        return probs.new_zeros(())
    f = counts.to(probs.dtype) / assignments
    return probs.shape[-1] * torch.dot(f, probs.mean(0))


def tracing(x: torch.Tensor) -> bool:
    """Whether `x` flows through a graph capture (torch.export, fx) rather than real data:
    shapes that depend on the routing are not allowed there."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or bool(exporting and exporting())


class Routed(Adapter):
    """An adapter with a router: keeps the load-balancing loss of its last forward in `aux`."""

    router: nn.Linear
    aux: torch.Tensor | None

    def _route(
        self, x2: torch.Tensor, top_k: int, jitter: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gates [T, k], experts [T, k], counts [n] (assignments per expert); sets `aux`
        (not while a graph is captured: the value would be a placeholder)."""
        probs, gates, idx = route(self.router, x2, top_k, jitter, self.training)
        flat = idx.reshape(-1)
        counts = flat.new_zeros(probs.shape[-1]).scatter_add_(0, flat, torch.ones_like(flat))  # unlike bincount: [n]
        if not tracing(x2):
            self.aux = balance_loss(probs, counts, idx.numel())
        return gates, idx, counts


# ---------------------------------------------------------------------------- moe


@dataclass
class MoEConfig(MethodConfig):
    """Attributes:
    experts: number of experts, each a copy of the feed-forward block (upcycling).
    top_k: experts each token is routed to.
    capacity_factor: tokens an expert takes, as a multiple of its even share; None: no token is dropped.
    router_std: the router's weights start ~ N(0, router_std).
    jitter: multiplicative router-input noise in training (Switch Transformer uses 1e-2).
    """

    experts: int = 8
    top_k: int = 1
    capacity_factor: float | None = None  # None: no token is dropped
    router_std: float = 0.02
    jitter: float = 0.0  # multiplicative router-input noise in training (Switch's 1e-2)


class MoELayer(Routed):
    """Experts (copies of an FFN) behind a top-k router; computes the site's whole output."""

    action = Action.REPLACE

    def __init__(
        self,
        experts: list[nn.Module],
        d_in: int,
        d_out: int,
        top_k: int,
        capacity_factor: float | None,
        jitter: float,
        router_std: float,
        like: torch.Tensor,
    ) -> None:
        super().__init__()
        self.router = make_router(d_in, len(experts), router_std, like)
        self.experts = nn.ModuleList(experts)
        self.d_in, self.d_out = d_in, d_out
        self.top_k, self.capacity_factor, self.jitter = top_k, capacity_factor, jitter
        self.aux = None

    def merge(self, site: SiteView) -> NotMergeable:
        return NotMergeable("its router picks experts per token, so no single weight computes it")

    def extra_repr(self) -> str:
        cf = "" if self.capacity_factor is None else f", capacity_factor={self.capacity_factor:g}"
        return f"experts={len(self.experts)}, top_k={self.top_k}{cf}"

    def contribute(self, x: torch.Tensor, out: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
        # replacing: the output is the experts' mixture whatever came before (see surgery.compose
        # for blocks: Average / BatchSplit pass the base output, which this takes the place of)
        y = self.mix(x.reshape(-1, self.d_in))
        return (y if out is None else y.to(out.dtype)).view(*x.shape[:-1], self.d_out)

    def capacity(self, tokens: int) -> int | None:
        cf = self.capacity_factor
        return None if cf is None else math.ceil(cf * tokens * self.top_k / len(self.experts))

    def mix(self, x2: torch.Tensor) -> torch.Tensor:
        """The experts' output for tokens x2 [T, d_in] -> [T, d_out]."""
        T, k = x2.shape[0], self.top_k
        gates, idx, counts = self._route(x2, k, self.jitter)
        if tracing(x2):
            return self.mix_dense(x2, gates, idx)
        # assignments choice-major (all first choices, then all second ...), each in token order
        flat = idx.reshape(-1) if k == 1 else idx.t().reshape(-1)
        g = gates.reshape(-1) if k == 1 else gates.t().reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order if k == 1 else order % T
        cap = self.capacity(T)
        if cap is not None and int(counts.max()) > cap:
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=order.device) - starts[flat[order]]
            keep = rank < cap
            order, tok = order[keep], tok[keep]
            sizes = counts.clamp(max=cap).tolist()
            once = False
        else:
            sizes = counts.tolist()
            once = k == 1  # every token exactly once: a permutation
        xs = x2.index_select(0, tok)
        scale = k > 1 or torch.is_grad_enabled() and g.requires_grad  # top-1 gates are exactly 1 in value
        gs = g[order].unsqueeze(1) if scale else None
        res: torch.Tensor | None = None
        start = 0
        for e, size in enumerate(sizes):  # each expert's rows, written straight into the result
            if not size:
                continue
            rows = slice(start, start + size)
            start += size
            y = self.experts[e](xs[rows])
            if gs is not None:
                y = y * gs[rows].to(y.dtype)
            if res is None:  # each row written exactly once (a permutation): no zero fill
                res = y.new_empty(T, y.shape[1]) if once else y.new_zeros(T, y.shape[1])
            res = res.index_copy_(0, tok[rows], y) if once else res.index_add_(0, tok[rows], y)
        return res if res is not None else x2.new_zeros(T, self.d_out)

    def mix_dense(self, x2: torch.Tensor, gates: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The same mixture with static shapes, for graph captures: every expert runs on every
        token and is weighted by its gate (zero where not chosen or past capacity)."""
        T, k, n = x2.shape[0], self.top_k, len(self.experts)
        onehot = gates.new_zeros(T, k, n).scatter_(2, idx.unsqueeze(-1), 1.0)
        cap = self.capacity(T)
        if cap is not None:  # rank of each assignment at its expert, first choices first, in token order
            seq = onehot.transpose(0, 1).reshape(k * T, n)
            keep = (seq.cumsum(0) <= cap).to(seq.dtype) * seq
            onehot = keep.view(k, T, n).transpose(0, 1)
        w = (onehot * gates.unsqueeze(-1)).sum(1)  # [T, n]
        return functools.reduce(
            operator.add, (ex(x2) * w[:, e : e + 1].to(x2.dtype) for e, ex in enumerate(self.experts))
        )


def _check_clean(model: nn.Module, roots: list[tuple[str, nn.Module]]) -> None:
    """Refuse an FFN that holds injected deltas (its copies must be the pretrained FFN alone)."""
    from surgery import engine

    held = engine.held_paths(model)
    for path, mod in roots:
        inner = [p for p in held if p == path or p.startswith(path + ".")]
        inner += [f"{path}.{p}" if p else path for p, m in mod.named_modules() if CHILD in m._modules]
        if inner:
            raise InjectionError(
                f"moe: the FFN module {path!r} already holds injected deltas (at {sorted(set(inner))[:3]}); "
                "its expert copies must be the pretrained FFN alone. Inject moe first, or remove the "
                "other deltas there"
            )


@register
class MoE(Method):
    name = "moe"
    # equal to the base up to rounding only: each expert runs on its tokens alone (smaller GEMMs)
    identity_at_init = False
    Config = MoEConfig
    default_targets = "@mlp"
    tensor_suffixes = ("router.weight", "experts.*")
    handles_fused: ClassVar[bool] = True  # refuses / warns about fused experts itself (surgery.sublayers)

    def targets(self, cfg: MoEConfig | None) -> Any:
        return with_fused(self.default_targets)  # fused experts are hit too, to be refused by name

    def validate(self, cfg: MoEConfig) -> None:
        check_routing("moe", cfg.experts, cfg.top_k, cfg.router_std)
        cf = cfg.capacity_factor
        if cf is not None and not (is_number(cf) and cf > 0):
            raise ConfigError(f"moe: capacity_factor must be a number > 0 or None, got {cf!r}")
        if not (is_number(cfg.jitter) and 0 <= cfg.jitter < 1):
            raise ConfigError(f"moe: jitter must be a number in [0, 1), got {cfg.jitter!r}")

    def supports(self, module: nn.Module) -> bool:
        return out_width(module) is not None

    def place(self, model: nn.Module, hits: list[tuple[str, nn.Module]], cfg: MoEConfig) -> list:
        fused, hits = split_fused(model, hits)
        if fused:
            raise fused_refusal(model, "moe", fused)
        sites = [(s.path, s.module) for s in ffn_sublayers(model, hits)]
        fused_beside(model, "moe", sites)
        return sites

    def make(self, site: SiteView, cfg: MoEConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        module, path, model = site.module, site.path, site.model
        if model is None:
            raise ConfigError("moe: upcycling needs the model to find the FFN around a site")
        sub = next(iter(ffn_sublayers(model, [(path, module)])))
        if sub.path != path:
            raise ConfigError(f"moe: {path!r} is not an FFN site (its FFN is {sub.path!r})")
        n = int(shapes["router.weight"][0]) if shapes and "router.weight" in shapes else cfg.experts
        if cfg.top_k > n:
            raise ConfigError(f"moe: top_k={cfg.top_k} is larger than the {n} experts at {path!r}")
        inner = [f for f in fused_experts(model) if f.path.startswith(path + ".")]
        if inner:  # a sparse MoE block as a whole: n copies of all its experts
            raise fused_refusal(model, "moe", inner)
        check_forward(model, sub, "moe", alone=True)
        if sub.entry is None:
            roots = [(path, module)]
        else:
            entry = model.get_submodule(sub.entry)
            if not any(name != CHILD for name, _ in entry.named_children()):  # a leaf
                raise SelectorError(
                    f"moe: the FFN at {path!r} starts at {sub.entry!r}, a bare {type(entry).__name__}: its "
                    "activation is a function call in the enclosing block's forward, so the FFN cannot be "
                    "copied as an expert. Point targets at a module that holds the whole FFN (its linears "
                    "and activation), or one holding the up projection and the activation (as BERT's "
                    "'intermediate')"
                )
            roots = [(sub.entry, entry), (path, module)]
        _check_clean(model, roots)
        if len(roots) == 1:
            experts = [copy.deepcopy(module) for _ in range(n)]
        else:
            experts = [nn.Sequential(copy.deepcopy(roots[0][1]), copy.deepcopy(module)) for _ in range(n)]
        for e in experts:  # on a 4-bit base (surgery.quantize) the experts train in the dequantised precision
            for m in [m for m in e.modules() if is_quantized(m) and isinstance(m, nn.Linear)]:
                to_linear(m)
        like = next((p for p in experts[0].parameters() if p.is_floating_point()), torch.empty(0))
        ad = MoELayer(
            experts, sub.d_in, sub.d_out, cfg.top_k, cfg.capacity_factor, float(cfg.jitter), float(cfg.router_std), like
        )
        ad.entry = sub.entry
        return ad

    def refresh(self, adapter: Adapter, path: str, cfg: MoEConfig) -> None:
        n = len(adapter.experts)  # type: ignore[arg-type]
        if cfg.top_k > n:
            raise ConfigError(f"moe: top_k={cfg.top_k} is larger than the {n} experts at {path!r}")
        adapter.top_k, adapter.capacity_factor = cfg.top_k, cfg.capacity_factor  # type: ignore[assignment]
        adapter.jitter = float(cfg.jitter)  # type: ignore[assignment]


# ---------------------------------------------------------------------------- the auxiliary loss


def aux_loss(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """The load-balancing loss of the last forward: summed over the routing adapters
    (``moe``, ``lora_moe``) of the active deltas, or of delta `name`. A 0-dim tensor,
    zero when there are none; in training it carries gradients to the routers.

        loss = task_loss + 0.01 * surgery.aux_loss(model)
    """
    from surgery import engine

    def routing(n: str) -> bool:
        return any(isinstance(ad, Routed) for ad in engine.adapters(model, n).values())

    injected = engine.names(model)
    if name is not None:
        if name not in injected:
            raise ConfigError(f"aux_loss: no delta named {name!r} in this model; injected: {injected or 'none'}")
        if not routing(name):
            raise ConfigError(
                f"aux_loss: delta {name!r} is a {engine.method_of(model, name).name!r} delta, which has no router; "
                f"routing deltas here: {[n for n in injected if routing(n)]}"
            )
        todo = [name]
    else:
        active = engine.spec_names(engine.active(model))
        todo = [n for n in dict.fromkeys(active) if n in injected and routing(n)]
    auxes = [
        ad.aux
        for n in todo
        for ad in engine.adapters(model, n).values()
        if isinstance(ad, Routed) and ad.aux is not None
    ]
    if not auxes:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return functools.reduce(lambda total, a: total + a.to(total.device), auxes)


__all__ = ["MoE", "MoEConfig", "MoELayer", "Routed", "aux_loss", "balance_loss", "route"]
