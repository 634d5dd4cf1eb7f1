r"""A mixture of LoRA experts at each linear site (MoLoRA, Zadouri et al., 2023; top-k
routing as in ``moe``).

For a linear site with frozen weight :math:`W`, ``experts`` LoRA pairs :math:`(A_i, B_i)`
behind the router of `surgery.methods.moe`:
:math:`y = W x + (\alpha / r) \sum_{i \in \mathcal{T}(x)} g_i(x)\, B_i A_i\, \mathrm{dropout}(x)`.
The A's are stored stacked as ``lora_A.weight`` [n r, in] and the B's as ``lora_B.weight``
[out, n r] (zeros: the output equals the base at injection), so a forward is two GEMMs
whatever the number of experts (docs/moe.md). The update depends on the token, so
``surgery.merge`` raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import ConfigError
from surgery.methods.base import Adapter, Method, MethodConfig, NotMergeable, SiteView, register
from surgery.methods.lora import adapter_dtype, add_low_rank, is_conv1d_transformers
from surgery.methods.moe import Routed, check_routing, is_int, is_number, make_router
from surgery.sublayers import fused_beside, fused_refusal, split_fused


@dataclass
class LoRAMoEConfig(MethodConfig):
    """Attributes:
    experts: number of LoRA experts at each site.
    r: rank of each expert's update.
    alpha: scale numerator: each expert's update is scaled by alpha / r.
    top_k: experts each token is routed to.
    dropout: dropout on the experts' input, in training only.
    router_std: the router's weights start ~ N(0, router_std).
    """

    experts: int = 4
    r: int = 8
    alpha: float = 8  # scale alpha / r
    top_k: int = 2
    dropout: float = 0.0
    router_std: float = 0.02


class LoRAMoELayer(Routed):
    """Router + stacked LoRA experts on `nn.Linear` or transformers' `Conv1D`."""

    def __init__(
        self,
        in_f: int,
        out_f: int,
        experts: int,
        r: int,
        scale: float,
        top_k: int,
        dropout: float,
        fan_in_fan_out: bool,
        router_std: float,
        like: torch.Tensor,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": like.device, "dtype": adapter_dtype(like)}
        self.router = make_router(in_f, experts, router_std, like)
        self.lora_A = nn.Parameter(torch.empty(experts * r, in_f, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_f, experts * r, **kw))
        self.n, self.r, self.scale, self.top_k, self.p = experts, r, scale, top_k, dropout
        self.fan_in_fan_out = fan_in_fan_out
        self.aux = None
        if not like.is_meta:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan-in = in, as for one expert

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"router.weight": self.router.weight, "lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def merge(self, site: SiteView) -> NotMergeable:
        return NotMergeable("its router mixes LoRA experts per token, so no single weight update computes it")

    def extra_repr(self) -> str:
        return f"experts={self.n}, r={self.r}, top_k={self.top_k}, scale={self.scale:g}, dropout={self.p:g}"

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        A, B = self.lora_A, self.lora_B
        x2 = x.reshape(-1, A.shape[1]).to(A.dtype)  # no copy when the dtype is A's already
        gates, idx, _ = self._route(x2, self.top_k)
        dense = gates.new_zeros(x2.shape[0], self.n).scatter(1, idx, gates)  # 0 for the unchosen
        if self.p and self.training:
            x2 = F.dropout(x2, self.p, training=True)
        h = F.linear(x2, A).view(-1, self.n, self.r) * dense.unsqueeze(-1).to(A.dtype)
        return add_low_rank(out, h.view(-1, self.n * self.r), B, self.scale, inplace)


@register
class LoRAMoE(Method):
    name = "lora_moe"
    Config = LoRAMoEConfig
    default_targets = ["@q", "@v", "@qkv"]  # as LoRA's
    tensor_suffixes = ("router.weight", "lora_A.weight", "lora_B.weight")
    handles_fused: ClassVar[bool] = True  # refuses / warns about fused experts itself (surgery.sublayers)

    def validate(self, cfg: LoRAMoEConfig) -> None:
        check_routing("lora_moe", cfg.experts, cfg.top_k, cfg.router_std)
        if not (is_int(cfg.r) and cfg.r > 0):
            raise ConfigError(f"lora_moe: r must be a positive integer, got {cfg.r!r}")
        if not (is_number(cfg.alpha) and cfg.alpha > 0):
            raise ConfigError(f"lora_moe: alpha must be a positive number, got {cfg.alpha!r}")
        if not (is_number(cfg.dropout) and 0 <= cfg.dropout < 1):
            raise ConfigError(f"lora_moe: dropout must be in [0, 1), got {cfg.dropout!r}")

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_conv1d_transformers(module)

    def place(self, model: nn.Module, hits: list[tuple[str, nn.Module]], cfg: LoRAMoEConfig) -> list:
        fused, hits = split_fused(model, hits)
        if fused:  # say so, rather than leave them out without a word
            raise fused_refusal(model, "lora_moe", fused)
        sites = [(p, m) for p, m in hits if self.supports(m)]
        fused_beside(model, "lora_moe", sites)
        return sites

    def make(self, site: SiteView, cfg: LoRAMoEConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        n, r = cfg.experts, cfg.r
        if shapes and "router.weight" in shapes and "lora_A.weight" in shapes:
            n = int(shapes["router.weight"][0])
            r = max(1, int(shapes["lora_A.weight"][0]) // n)
        if cfg.top_k > n:
            raise ConfigError(f"lora_moe: top_k={cfg.top_k} is larger than the {n} experts at {site.path!r}")
        in_f, out_f = cast(int, site.in_features), cast(int, site.out_features)  # a linear site (supports())
        fifo, weight = site.kind == "conv1d_tf", cast(torch.Tensor, site.weight)
        return LoRAMoELayer(
            in_f, out_f, n, r, cfg.alpha / r, cfg.top_k, cfg.dropout, fifo, float(cfg.router_std), weight
        )

    def refresh(self, adapter: Adapter, path: str, cfg: LoRAMoEConfig) -> None:
        ad = cast(LoRAMoELayer, adapter)  # this method made it
        if cfg.top_k > ad.n:
            raise ConfigError(f"lora_moe: top_k={cfg.top_k} is larger than the {ad.n} experts at {path!r}")
        ad.scale = cfg.alpha / ad.r
        ad.top_k, ad.p = cfg.top_k, cfg.dropout


__all__ = ["LoRAMoE", "LoRAMoEConfig", "LoRAMoELayer"]
