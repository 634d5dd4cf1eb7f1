r"""Diff pruning (Guo et al., 2021): a dense difference :math:`w` per weight behind hard-concrete gates.

Each site's weight becomes :math:`W + z \odot w` (run as one operation on that weight, `Action.REPLACE`, as the
"sparse" deltas do: not the base's matmul and a second one): ``diff`` (:math:`w`, from zero, so a fresh
injection is the base) and ``log_alpha`` (the gates' :math:`\log\alpha`, one per entry, or one per output
row with ``structured=True``). In training :math:`z = \min(1, \max(0, s(\zeta - \gamma) + \gamma))` with
:math:`s = \sigma((\log u - \log(1 - u) + \log\alpha) / \beta)`, :math:`u \sim U(0, 1)` (Louizos et al.,
2018); in eval the deterministic :math:`z = \min(1, \max(0, \sigma(\log\alpha)(\zeta - \gamma) + \gamma))`.
Each adapter keeps the expected L0 norm of its last forward, :math:`\sum \sigma(\log\alpha - \beta \log(-\gamma
/ \zeta))` (entries whose gate is open), in `aux`; `l0_loss` sums it over a delta:

    loss = task_loss + lam * diffpruning.l0_loss(model, "dp") / diffpruning.numel(model, "dp")

`finalize` projects :math:`z \odot w` to the target density ``sparsity`` by magnitude (per tensor or over all
sites), replaces the delta by a "sparse" one of the same name (indices + values: `surgery.delta` stores a few
bytes per kept entry), and may train those values for a few steps with the mask fixed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from surgery.errors import ConfigError, InjectionError
from surgery.methods.base import Action, Adapter, Merge, Method, MethodConfig, SiteView, WeightUpdate, kind_of, register
from surgery.methods.lora import adapter_dtype
from surgery.methods.sparse import SparseDelta, check_density, entries, index_dtype, sparse_delta

_KINDS = ("linear", "conv1d_tf", "conv", "embedding")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class DiffPruningConfig(MethodConfig):
    """Attributes:
    sparsity: the target fraction of each weight's entries the final delta keeps, in (0, 1] (0.005: 0.5 %).
    structured: False: one gate per entry; True: one gate per output row (a row is kept or dropped whole).
    temperature: the hard-concrete's beta (the paper's 2/3 ... 1; Guo et al. use 1).
    stretch: (gamma, zeta), the interval the concrete is stretched to before clamping to [0, 1].
    init_log_alpha: the gates' starting log alpha (Guo et al.'s 5: open, so w learns from the first step).
    """

    sparsity: float = 0.005
    structured: bool = False
    temperature: float = 1.0
    stretch: tuple[float, float] = (-1.5, 1.5)
    init_log_alpha: float = 5.0


class DiffPruningAdapter(Adapter):
    """``diff`` (w) gated by hard-concrete ``log_alpha``: the forward adds z * w to the site's weight."""

    action = Action.REPLACE  # the site's operation on W + z * w: one matmul, not the base's and a second
    diff: nn.Parameter
    log_alpha: nn.Parameter
    aux: torch.Tensor | None
    host: nn.Module

    def __init__(self, module: nn.Module, w: torch.Tensor, gate_shape: tuple[int, ...], cfg: DiffPruningConfig) -> None:
        super().__init__()
        self.__dict__["host"] = module  # a plain reference, not a submodule
        dt = adapter_dtype(w)
        self.diff = nn.Parameter(torch.zeros(w.shape, dtype=dt, device=w.device))
        self.log_alpha = nn.Parameter(torch.full(gate_shape, float(cfg.init_log_alpha), dtype=dt, device=w.device))
        self.beta, (self.gamma, self.zeta) = float(cfg.temperature), map(float, cfg.stretch)
        self.aux = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "aux": None}  # a graph's output: not copied or pickled with the module

    def extra_repr(self) -> str:
        return f"diff={tuple(self.diff.shape)}, gates={tuple(self.log_alpha.shape)}, beta={self.beta:g}"

    def gates(self, sample: bool) -> torch.Tensor:
        la = self.log_alpha
        if sample:
            u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + la) / self.beta)
        else:
            s = torch.sigmoid(la)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def expected_l0(self) -> torch.Tensor:
        """The expected number of nonzero gates, in entries (a row's gate counts for its row)."""
        per_gate = self.diff.numel() // self.log_alpha.numel()
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta)).sum() * per_gate

    def dense(self, sample: bool = False) -> torch.Tensor:
        """z * w in the weight's layout (deterministic gates unless `sample`)."""
        return self.gates(sample) * self.diff

    def contribute(self, x: torch.Tensor, out: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
        self.aux = self.expected_l0()
        site = SiteView(self.host, "", self.host)
        dw = self.dense(self.training).to(site.dtype)
        if out is not None:  # behind another delta, or under a composition block: add this one's part
            return out + site.forward(x, dw).to(out.dtype)
        return site.forward(x, cast(torch.Tensor, site.weight) + dw, site.bias)

    def merge(self, site: SiteView) -> Merge:
        return {"weight": WeightUpdate(delta=self.dense().detach().to(site.dtype))}  # never a sampled gate


@register
class DiffPruning(Method):
    name = "diffpruning"
    Config = DiffPruningConfig
    default_targets = "@linear"
    tensor_suffixes = ("diff", "log_alpha")

    def validate(self, cfg: DiffPruningConfig) -> None:
        check_density(cfg.sparsity, "diffpruning: sparsity (the target fraction of nonzeros)")
        if not isinstance(cfg.structured, bool):
            raise ConfigError(f"diffpruning: structured must be True or False, got {cfg.structured!r}")
        if not (_number(cfg.temperature) and cfg.temperature > 0):
            raise ConfigError(f"diffpruning: temperature must be a number > 0, got {cfg.temperature!r}")
        st = cfg.stretch
        if not (isinstance(st, (tuple, list)) and len(st) == 2 and all(map(_number, st)) and st[0] < 0 and st[1] > 1):
            raise ConfigError(f"diffpruning: stretch must be (gamma < 0, zeta > 1), as (-1.5, 1.5); got {st!r}")
        cfg.stretch = (float(st[0]), float(st[1]))
        if not _number(cfg.init_log_alpha):
            raise ConfigError(f"diffpruning: init_log_alpha must be a finite number, got {cfg.init_log_alpha!r}")

    def supports(self, module: nn.Module) -> bool:
        return kind_of(module) in _KINDS and isinstance(getattr(module, "weight", None), torch.Tensor)

    def make(self, site: SiteView, cfg: DiffPruningConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        w = cast(torch.Tensor, site.weight)
        gate_shape = tuple(w.shape)
        if cfg.structured:  # one gate per output row: the output dim kept, the others broadcast
            out_dim = 1 if site.kind == "conv1d_tf" else 0
            gate_shape = tuple(n if d == out_dim else 1 for d, n in enumerate(w.shape))
        return DiffPruningAdapter(site.module, w, gate_shape, cfg)


def _adapters(model: nn.Module, name: str, where: str) -> dict[str, DiffPruningAdapter]:
    from surgery import engine  # lazy: the engine imports the method table

    if name not in engine.names(model):
        raise ConfigError(f"{where}: no delta named {name!r} in this model; injected: {engine.names(model) or 'none'}")
    if engine.method_of(model, name).name != DiffPruning.name:
        raise ConfigError(f"{where}: delta {name!r} is a {engine.method_of(model, name).name!r} delta, not diffpruning")
    return cast(dict[str, DiffPruningAdapter], engine.adapters(model, name))


def l0_loss(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """The expected number of nonzero entries at the last forward (Guo et al.'s L0 penalty, before its weight
    lambda) of delta `name`, or summed over the active diffpruning deltas; differentiable in the gates.
    A 0-dim tensor, zero when there are none."""
    from surgery import engine  # lazy: the engine imports the method table

    todo: list[dict[str, Any]]
    if name is not None:
        todo = [_adapters(model, name, "l0_loss")]
    else:
        active = [n for n in dict.fromkeys(engine.spec_names(engine.active(model))) if n in engine.names(model)]
        todo = [engine.adapters(model, n) for n in active if engine.method_of(model, n).name == DiffPruning.name]
    auxes = [ad.aux for ads in todo for ad in ads.values() if isinstance(ad, DiffPruningAdapter) and ad.aux is not None]
    if not auxes:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack([a.to(auxes[0].device) for a in auxes]).sum()


def numel(model: nn.Module, name: str) -> int:
    """The entries delta `name` spans (to normalize `l0_loss` to an expected density)."""
    return sum(ad.diff.numel() for ad in _adapters(model, name, "numel").values())


@torch.no_grad()
def expected_density(model: nn.Module, name: str) -> float:
    """The expected fraction of nonzero gates over the delta's entries."""
    ads = _adapters(model, name, "expected_density")
    return float(sum(float(ad.expected_l0()) for ad in ads.values())) / numel(model, name)


@torch.no_grad()
def finalize(
    model: nn.Module,
    name: str,
    *,
    per_tensor: bool = True,
    steps: int = 0,
    train_step: Callable[[nn.Module], torch.Tensor] | None = None,
    lr: float = 1e-3,
) -> dict[str, float]:
    """End diff pruning: keep the largest ``sparsity`` fraction of |z * w| (deterministic gates) per tensor
    (or over all the delta's sites with ``per_tensor=False``), and put a "sparse" delta of the same name in the
    delta's place (indices + values). With `steps`, train those values for `steps` Adam steps with the mask
    fixed: ``train_step(model)`` returns the loss of one batch. Warns when the gates left more entries open
    than the target (the projection then cut them). Returns {"density": the fraction stored, "nonzero": the
    fraction nonzero after the projection, "gates_density": the fraction the gates kept}."""
    from surgery import engine  # lazy: the engine imports the method table
    from surgery.delta import apply

    ads = _adapters(model, name, "finalize")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"finalize: steps must be an integer >= 0, got {steps!r}")
    if steps and train_step is None:
        raise ConfigError("finalize: steps > 0 needs train_step(model) -> loss, the fixed-mask phase's batch loss")
    if not (_number(lr) and lr > 0):
        raise ConfigError(f"finalize: lr must be a number > 0, got {lr!r}")
    if engine.merged(model) and name in engine.merged(model):
        raise InjectionError(f"finalize: delta {name!r} is merged; surgery.unmerge(model, {name!r}) first")
    cfg = cast(DiffPruningConfig, engine.config_of(model, name))
    dense = {p: ad.dense().to(cast(torch.Tensor, engine.site_module(model, p).weight).dtype) for p, ad in ads.items()}
    total = sum(d.numel() for d in dense.values())
    opened = sum(int(d.count_nonzero()) for d in dense.values())
    if per_tensor:
        keep = {p: entries(cfg.sparsity, d.numel()) for p, d in dense.items()}
    else:  # one threshold over all sites: the k-th largest |z * w|
        k = entries(cfg.sparsity, total)
        flat = torch.cat([d.reshape(-1).abs().float().cpu() for d in dense.values()])
        cut = flat.topk(k, sorted=True).values[-1]
        above = {p: int((d.abs() > cut).sum()) for p, d in dense.items()}
        ties = k - sum(above.values())  # entries equal to the threshold, handed out in site order
        keep = {}
        for p, d in dense.items():
            extra = min(ties, int((d.abs() == cut).sum()))
            keep[p], ties = above[p] + extra, ties - extra
    pairs = {}
    for p, d in dense.items():
        flat = d.reshape(-1)
        top = torch.topk(flat.abs(), keep[p], sorted=False).indices.sort().values if keep[p] else flat[:0].long()
        pairs[p] = (top.to(index_dtype(flat.numel())), flat[top].clone())
    stored = sum(keep.values())
    if opened > stored:
        warnings.warn(
            f"diffpruning {name!r}: the gates kept {opened / total:.4%} of the entries, more than the target "
            f"sparsity {cfg.sparsity:.4%}; the magnitude projection cut the rest (train longer, or with a larger "
            f"L0 weight, for the gates to reach it)",
            stacklevel=3,  # past torch.no_grad's wrapper: the caller's line
        )
    delta = sparse_delta(model, pairs, name=name)
    delta.config["density"] = cfg.sparsity
    st = engine.state_of(model)
    default = st.default_active if st is not None else ()  # what is on outside any `use`, kept as it was
    engine.remove(model, name)
    apply(model, delta, name)
    engine.activate(model, *default)
    sparse = cast(dict[str, SparseDelta], engine.adapters(model, name))
    if steps and train_step is not None:
        opt = torch.optim.Adam([ad.values for ad in sparse.values()], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                train_step(model).backward()
                opt.step()
    nonzero = sum(int(ad.values.count_nonzero()) for ad in sparse.values())
    return {"density": stored / total, "nonzero": nonzero / total, "gates_density": opened / total}


__all__ = [
    "DiffPruning",
    "DiffPruningAdapter",
    "DiffPruningConfig",
    "expected_density",
    "finalize",
    "l0_loss",
    "numel",
]
