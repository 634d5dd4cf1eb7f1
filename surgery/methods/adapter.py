r"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021; He et al., 2022).

A bottleneck adapter adds :math:`a(h) = s\, W_{up} f(W_{down} h + b_{down}) + b_{up}`
(:math:`W_{down} \in \mathbb{R}^{b \times d}`) to a site's output. ``houlsby``: :math:`h` is the
output of the attention's and of the FFN's output projections (``@o``, ``@mlp.down``), before
their residual add; ``pfeiffer``: the same after the FFN only; ``parallel``: :math:`h` is the
FFN's *input* (a sublayer site, see `surgery.sublayers`), beside the FFN, with s = 4.
:math:`W_{up}` and :math:`b_{up}` start at zero, so the output is unchanged at injection; the
activation keeps it from merging into the base (`surgery.merge` raises). Sizes, defaults and
parameter counts: docs/adapters.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import ConfigError
from surgery.methods.base import Adapter, Method, MethodConfig, SiteView, register
from surgery.methods.lora import adapter_dtype
from surgery.sublayers import (
    check_forward,
    ffn_sublayers,
    fused_beside,
    fused_refusal,
    fused_warning,
    out_width,
    split_fused,
    with_fused,
)

STYLES = ("houlsby", "pfeiffer", "parallel")
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "swish": F.silu,
    "silu": F.silu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}
_DEFAULT_ACT = {"houlsby": "swish", "pfeiffer": "relu", "parallel": "relu"}


@dataclass
class AdapterConfig(MethodConfig):
    """Attributes:
    style: "houlsby" (after attention and FFN), "pfeiffer" (after the FFN) or "parallel" (beside the FFN).
    bottleneck: the adapter's width in units; give this or reduction.
    reduction: hidden size / bottleneck (default 16 when neither is given).
    scale: output scale s: 4.0 for parallel, 1.0 otherwise.
    activation: the bottleneck's nonlinearity: swish for houlsby, relu otherwise.
    dropout: dropout on the adapter's input, in training only.
    """

    style: str = "pfeiffer"
    bottleneck: int | None = None  # units; or
    reduction: float | None = None  # hidden size / bottleneck (default 16 when neither is given)
    scale: float | None = None  # output scale: 4.0 for parallel, 1.0 otherwise
    activation: str | None = None  # swish for houlsby, relu otherwise
    dropout: float = 0.0  # on the adapter's input, in training


def _scale(cfg: AdapterConfig) -> float:
    return float(cfg.scale if cfg.scale is not None else (4.0 if cfg.style == "parallel" else 1.0))


class Bottleneck(Adapter):
    """down-projection, activation, up-projection, added to the site's output."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        bottleneck: int,
        scale: float,
        activation: str,
        dropout: float,
        parallel: bool,
        like: torch.Tensor,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": like.device, "dtype": adapter_dtype(like)}
        self.adapter_down = nn.Linear(d_in, bottleneck, **kw)
        self.adapter_up = nn.Linear(bottleneck, d_out, **kw)
        self.scale, self.activation, self.p, self.parallel = scale, activation, dropout, parallel
        self.act = _ACTIVATIONS[activation]
        if not like.is_meta:
            with torch.no_grad():
                self.adapter_up.weight.zero_()
                self.adapter_up.bias.zero_()

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        return f"{kind}, bottleneck={self.adapter_down.out_features}, scale={self.scale:g}, act={self.activation}"

    def delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to the site's output."""
        h = (x if self.parallel else out).to(self.adapter_down.weight.dtype)
        if self.p and self.training:
            h = F.dropout(h, self.p, training=True)
        a = self.adapter_up(self.act(self.adapter_down(h)))
        if self.scale != 1.0:
            a = a * self.scale
        return a.to(out.dtype)

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        d = self.delta(x, out)
        if inplace and not (torch.is_grad_enabled() and (out.requires_grad or d.requires_grad)):
            return out.add_(d)
        return out + d


@register
class BottleneckAdapter(Method):
    name = "adapter"
    Config = AdapterConfig
    tensor_suffixes = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
    handles_fused: ClassVar[bool] = True  # refuses / warns about fused experts itself (surgery.sublayers)

    def targets(self, cfg: AdapterConfig | None) -> Any:
        style = cfg.style if cfg is not None else "pfeiffer"
        # fused experts are hit too: refused by name (or warned about, for houlsby's attention half)
        return with_fused({"houlsby": ["@o", "@mlp.down"], "pfeiffer": "@mlp.down", "parallel": "@mlp"}[style])

    def validate(self, cfg: AdapterConfig) -> None:
        if cfg.style not in STYLES:
            raise ConfigError(f"adapter: unknown style {cfg.style!r}; use one of {list(STYLES)}")
        if cfg.bottleneck is not None and cfg.reduction is not None:
            raise ConfigError("adapter: give bottleneck= (units) or reduction= (hidden size / bottleneck), not both")
        if cfg.bottleneck is not None and not (
            isinstance(cfg.bottleneck, int) and not isinstance(cfg.bottleneck, bool) and cfg.bottleneck > 0
        ):
            raise ConfigError(f"adapter: bottleneck must be a positive integer, got {cfg.bottleneck!r}")
        if cfg.reduction is not None and not (
            isinstance(cfg.reduction, (int, float)) and not isinstance(cfg.reduction, bool) and cfg.reduction >= 1
        ):
            raise ConfigError(f"adapter: reduction must be a number >= 1, got {cfg.reduction!r}")
        if cfg.scale is not None and not (isinstance(cfg.scale, (int, float)) and not isinstance(cfg.scale, bool)):
            raise ConfigError(f"adapter: scale must be a number, got {cfg.scale!r}")
        if cfg.activation is not None and cfg.activation not in _ACTIVATIONS:
            raise ConfigError(f"adapter: unknown activation {cfg.activation!r}; use one of {sorted(_ACTIVATIONS)}")
        if not (isinstance(cfg.dropout, (int, float)) and 0 <= cfg.dropout < 1):
            raise ConfigError(f"adapter: dropout must be in [0, 1), got {cfg.dropout!r}")

    def supports(self, module: nn.Module) -> bool:
        return out_width(module) is not None

    def place(self, model: nn.Module, hits: list[tuple[str, nn.Module]], cfg: AdapterConfig) -> list:
        who = f"adapter (style={cfg.style!r})"
        fused, hits = split_fused(model, hits)
        if cfg.style == "parallel":
            if fused:
                raise fused_refusal(model, who, fused)
            sites = [(s.path, s.module) for s in ffn_sublayers(model, hits)]
        else:
            sites = super().place(model, hits, cfg)
            if fused and (cfg.style != "houlsby" or not sites):
                raise fused_refusal(model, who, fused)
            if fused:  # houlsby: the attention half is there, the FFN half is not
                fused_warning(model, who, fused, [p for p, _ in sites])
                return sites
        fused_beside(model, who, sites)
        return sites

    def make(self, site: SiteView, cfg: AdapterConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        module, path, model = site.module, site.path, site.model
        entry = None
        d_in = d_out = out_width(module)
        if cfg.style == "parallel":
            if model is None:
                raise ConfigError("adapter: a parallel adapter needs the model to find its FFN's input")
            sub = next(iter(ffn_sublayers(model, [(path, module)])))
            entry, d_in, d_out = sub.entry, sub.d_in, sub.d_out
            if sub.path != path:
                raise ConfigError(f"adapter: {path!r} is not an FFN site (its FFN is {sub.path!r})")
            check_forward(model, sub, "adapter (style='parallel')", alone=False)
        if d_in is None or d_out is None:
            raise ConfigError(
                f"adapter: cannot tell the output width of {path!r} ({type(module).__name__}); "
                "point targets at linear layers or modules holding them"
            )
        if shapes:
            b = int(shapes["adapter_down.weight"][0])
        elif cfg.bottleneck is not None:
            b = cfg.bottleneck
        else:
            b = max(1, int(d_in // (cfg.reduction or 16)))
        if b > d_in:
            raise ConfigError(
                f"adapter: bottleneck {b} is larger than the hidden size {d_in} at {path!r}; "
                f"a bottleneck adapter must narrow: use bottleneck <= {d_in}"
            )
        like = next((p for p in module.parameters() if p.is_floating_point()), torch.empty(0))
        act = cfg.activation or _DEFAULT_ACT[cfg.style]
        ad = Bottleneck(d_in, d_out, b, _scale(cfg), act, cfg.dropout, cfg.style == "parallel", like)
        ad.entry = entry
        return ad

    def refresh(self, adapter: Adapter, path: str, cfg: AdapterConfig) -> None:
        adapter.scale = _scale(cfg)  # type: ignore[assignment]


__all__ = ["AdapterConfig", "Bottleneck", "BottleneckAdapter"]
