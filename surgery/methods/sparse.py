r"""A sparse weight delta: a few entries of a frozen weight, as flat ``indices`` and their ``values``.

The type DiffPruning and lottery-ticket sparse fine-tuning end in (and a method of its own): per site
``{site}.indices`` (int32 when the weight has fewer than 2**31 entries, else int64; flat, row-major
indices into the weight in its own layout, sorted) and ``{site}.values`` (the weight's dtype), so a
Delta costs about nnz x (index + value) bytes on disk. Repeated indices add up.

The forward runs the site's own operation on :math:`W + D`, the weight with the values added at their
indices (one copy of the weight, no second matmul: about the base's speed), in place of the base's;
behind another delta at the site, or inside a composition block, it adds the site's operation on
:math:`D` alone. `values` is the trainable parameter. A fresh injection (`density`) holds random
positions from zero; `sparse_from_dense` / `sparse_delta` select the largest entries of a dense
difference (`torch.topk` per tensor). Merging adds D to the weight, exactly reversibly; a slot bank
refuses it (not low-rank): `surgery.to_lora` makes a servable LoRA of it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from surgery.errors import ConfigError, DeltaMismatchError
from surgery.methods.base import (
    Action,
    Adapter,
    Merge,
    Method,
    MethodConfig,
    NotMergeable,
    SiteView,
    WeightUpdate,
    kind_of,
    register,
)

Pair = tuple[torch.Tensor, torch.Tensor]
_KINDS = ("linear", "conv1d_tf", "conv", "embedding")  # the sites whose forward `SiteView.forward` runs


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def check_density(density: Any, where: str = "sparse") -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"{where}: density must be a fraction of the weight's entries in (0, 1], got {density!r}")
    return float(density)


def entries(density: float, numel: int) -> int:
    """How many entries `density` keeps of `numel` (at least one)."""
    return min(numel, max(1, round(density * numel)))


def check_pair(indices: torch.Tensor, values: torch.Tensor, shape: torch.Size, where: str) -> None:
    """DeltaMismatchError unless (indices, values) is a sparse delta of a weight of `shape`."""
    numel = math.prod(shape)
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise DeltaMismatchError(
            f"{where}: indices must be a 1-D int32 / int64 tensor of flat positions in the weight, "
            f"got {indices.dtype} of shape {tuple(indices.shape)}"
        )
    if not values.is_floating_point() or values.shape != indices.shape:
        raise DeltaMismatchError(
            f"{where}: values must be a float tensor of the indices' shape {tuple(indices.shape)}, "
            f"got {values.dtype} of shape {tuple(values.shape)}"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise DeltaMismatchError(
            f"{where}: indices run from {int(indices.min())} to {int(indices.max())}, outside the weight "
            f"{tuple(shape)} ({numel} entries): this delta belongs to another model or is damaged"
        )


def sparse_from_dense(diff: torch.Tensor, density: float) -> Pair:
    """The largest `density` fraction of a dense difference by magnitude, as (indices, values):
    flat sorted indices (int32 where they fit) and the entries there (diff's dtype)."""
    density = check_density(density, "sparse_from_dense")
    flat = diff.detach().reshape(-1)
    top = torch.topk(flat.abs(), entries(density, flat.numel()), sorted=False).indices.sort().values
    return top.to(index_dtype(flat.numel())), flat[top].clone()


def sparse_delta(
    model: nn.Module,
    diffs: Mapping[str, torch.Tensor | Pair],
    density: float | None = None,
    name: str = "sparse",
) -> Any:
    """A `surgery.Delta` of method "sparse" for `model`: per site path, a dense difference of the
    site's weight (its top `density` entries are kept) or an (indices, values) pair. Apply it with
    ``surgery.apply(model, delta)``; nothing in the model changes here."""
    from surgery.delta import Delta, fingerprint  # lazy: surgery.delta imports the method table

    if density is not None:
        density = check_density(density, "sparse_delta")
    tensors: dict[str, torch.Tensor] = {}
    for path, d in diffs.items():
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise DeltaMismatchError(f"sparse_delta: the model has no module {path!r}") from None
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or kind_of(mod) not in _KINDS:
            raise DeltaMismatchError(f"sparse_delta: {path!r} ({type(mod).__name__}) has no weight a sparse delta fits")
        if isinstance(d, torch.Tensor):
            if d.shape != w.shape:
                raise DeltaMismatchError(
                    f"sparse_delta: the difference for {path!r} has shape {tuple(d.shape)}, its weight {tuple(w.shape)}"
                )
            if density is None:
                raise ConfigError("sparse_delta: dense differences need density, the fraction kept, in (0, 1]")
            idx, vals = sparse_from_dense(d, density)
        else:
            idx, vals = d
            check_pair(idx, vals, w.shape, f"sparse_delta: {path!r}")
            idx = idx.to(index_dtype(w.numel()))
        tensors[f"{path}.indices"] = idx.detach().cpu().clone()
        tensors[f"{path}.values"] = vals.detach().to("cpu", w.dtype).clone()
    config = {"density": density if density is not None else SparseConfig.density, "seed": 0}
    return Delta("sparse", name, config, tensors, fingerprint(model))


@dataclass
class SparseConfig(MethodConfig):
    """Attributes:
    density: the fraction of each site's weight entries the delta holds, in (0, 1]: a fresh injection
        picks them at random, values from zero (`surgery.sparse_delta` picks the largest of a difference).
    seed: the seed of a fresh injection's random positions (per site, with its path).
    """

    density: float = 0.01
    seed: int = 0


class SparseDelta(Adapter):
    """``values`` added at flat ``indices`` of the site's weight."""

    action = Action.REPLACE  # runs the site's operation on W + D itself: one matmul, not two
    indices: torch.Tensor
    values: nn.Parameter
    host: nn.Module

    def __init__(self, module: nn.Module, indices: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(torch.zeros(indices.shape, dtype=dtype, device=indices.device))
        self.__dict__["host"] = module  # a plain reference, not a submodule
        self.checked = -1  # the indices' version last checked against the weight

    def extra_repr(self) -> str:
        return f"nnz={self.indices.numel()}, of={tuple(self.weight_shape)}"

    @property
    def weight_shape(self) -> torch.Size:
        h = self.host
        if isinstance(h, nn.Linear):  # also a 4-bit one, whose packed weight has another shape
            return torch.Size((h.out_features, h.in_features))
        return cast(torch.Tensor, h.weight).shape

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "values": self.values}

    def check(self) -> None:
        if self.indices._version != self.checked:  # copied into since (surgery.apply): check once
            check_pair(self.indices, self.values, self.weight_shape, f"sparse delta at {type(self.host).__name__}")
            self.checked = self.indices._version

    def dense(self) -> torch.Tensor:
        """D as a dense tensor in the weight's layout."""
        self.check()
        w = cast(torch.Tensor, SiteView(self.host, "", self.host).weight)  # a 4-bit base's: dequantised
        return (
            torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
            .index_add_(0, self.indices, self.values.to(w.dtype))
            .view(w.shape)
        )

    def contribute(self, x: torch.Tensor, out: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
        site = SiteView(self.host, "", self.host)
        if out is not None:  # behind another delta, or under a composition block: add D's part
            return out + site.forward(x, self.dense()).to(out.dtype)
        self.check()
        w = cast(torch.Tensor, site.weight)
        merged = w.reshape(-1).index_add(0, self.indices, self.values.to(w.dtype)).view(w.shape)
        return site.forward(x, merged, site.bias)

    def merge(self, site: SiteView) -> Merge:
        return {"weight": WeightUpdate(delta=self.dense().detach())}

    def low_rank(self, site: SiteView) -> NotMergeable:
        return NotMergeable(
            "a sparse delta is not low-rank; make a servable LoRA of it with surgery.to_lora(model, name, r=...), "
            "or merge it into a copy of the base"
        )


@register
class Sparse(Method):
    name = "sparse"
    Config = SparseConfig
    default_targets = "@linear"
    tensor_suffixes = ("indices", "values")

    def validate(self, cfg: SparseConfig) -> None:
        check_density(cfg.density)
        if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
            raise ConfigError(f"sparse: seed must be an integer, got {cfg.seed!r}")

    def supports(self, module: nn.Module) -> bool:
        return kind_of(module) in _KINDS

    def make(self, site: SiteView, cfg: SparseConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        w = cast(torch.Tensor, site.weight)
        itype = index_dtype(w.numel())
        if shapes:  # a stored delta: its tensors are copied in next
            if shapes.get("indices") != shapes.get("values") or len(shapes.get("indices", ())) != 1:
                raise DeltaMismatchError(
                    f"sparse delta at {site.path!r}: indices {tuple(shapes.get('indices', ()))} and values "
                    f"{tuple(shapes.get('values', ()))} must be 1-D of one length"
                )
            idx = torch.zeros(shapes["indices"], dtype=itype, device=w.device)
        else:  # random positions, seeded per site
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(site.path.encode()))
            pick = torch.rand(w.numel(), generator=g).topk(entries(cfg.density, w.numel()), sorted=False).indices
            idx = pick.sort().values.to(device=w.device, dtype=itype)
        return SparseDelta(site.module, idx, w.dtype)

    def check_tensors(
        self, model: nn.Module, sites: dict[str, dict[str, torch.Tensor]], config: dict[str, Any] | None = None
    ) -> None:
        """Refuse a stored delta whose tensors do not fit the model's weights, before anything is touched."""
        for path, ts in sites.items():
            w = getattr(model.get_submodule(path), "weight", None) if _has(model, path) else None
            if isinstance(w, torch.Tensor) and "indices" in ts and "values" in ts:
                check_pair(ts["indices"], ts["values"], w.shape, f"sparse delta at {path!r}")

    def combine_linear(self, model: nn.Module, weights: dict[str, float], name: str) -> Any:
        """``surgery.combine(model, weights, "linear")`` for sparse deltas: one sparse delta holding
        sum(w * D) over the union of their entries (deltas on other sites too), injected, not active."""
        from surgery import engine  # lazy: the engine imports the method table

        engine.check_name(model, name)
        cfg: Any = None
        by_site: dict[str, list[tuple[SparseDelta, float]]] = {}
        for n, wt in weights.items():
            if engine.method_of(model, n).name != self.name:
                raise ConfigError(f"combine: delta {n!r} is a {engine.method_of(model, n).name!r} delta, not sparse")
            cfg = cfg or engine.config_of(model, n)
            for path, ad in engine.adapters(model, n).items():
                by_site.setdefault(path, []).append((cast(SparseDelta, ad), float(wt)))
        made: list[tuple[str, nn.Module, Adapter]] = []
        for path, present in by_site.items():
            idx = torch.cat([ad.indices.long() for ad, _ in present])
            acc = torch.promote_types(present[0][0].values.dtype, torch.float32)
            vals = torch.cat([ad.values.detach().to(acc) * wt for ad, wt in present])
            uniq, where = torch.unique(idx, return_inverse=True)
            summed = torch.zeros(uniq.shape, dtype=acc, device=vals.device).index_add_(0, where, vals)
            mod = engine.site_module(model, path)
            ad = cast(
                SparseDelta, self.make(SiteView(model, path, mod), cfg, {"indices": uniq.shape, "values": uniq.shape})
            )
            with torch.no_grad():
                ad.indices.copy_(uniq)
                ad.values.copy_(summed)
            made.append((path, mod, ad))
        return engine.attach(model, name, self, cfg, made, activate=False)


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
