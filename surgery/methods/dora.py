r"""DoRA (Liu et al., 2024): LoRA with the weight split into a learned magnitude and a direction.

For a site with frozen weight :math:`W` (bias :math:`b`), LoRA factors :math:`A, B` and scale :math:`s`

.. math::  W' = \frac{m}{\lVert W + s B A \rVert} \,(W + s B A), \qquad
           y = g \odot (W x + s B A x) + (1 - g) \odot b, \quad g = m / \lVert W + s B A \rVert

with the norm taken per output row (per output channel for convolutions, per embedding
dimension for embeddings) and, as the paper (sec. 4.3) and PEFT do, treated as a constant:
it gets no gradient and is computed without autograd. :math:`m` starts at
:math:`\lVert W + s B A \rVert = \lVert W \rVert` (B or A is zero), so the output is unchanged
at injection. This is PEFT's ``LoraConfig(use_dora=True)``: same tensors (``lora_A.weight``,
``lora_B.weight``, ``lora_magnitude_vector``), same forward, including with dropout, where
the base term is recomputed on the dropped-out input as PEFT does. The update is one GEMM
for :math:`B A` (no identity matmul) and one multiply-add over the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import ConfigError
from surgery.fourbit import weight_of  # a 4-bit base: its norm is taken of the dequantised weight
from surgery.methods.base import Adapter, Merge, SiteView, WeightUpdate, register
from surgery.methods.lora import ConvLoRA, EmbeddingLoRA, LinearLoRA, LoRA, LoRAConfig


@dataclass
class DoRAConfig(LoRAConfig):
    __doc__ = LoRAConfig.__doc__  # LoRA's keys, the same meanings: the magnitude needs none


class DoRAAdapter(Adapter):
    """A LoRA adapter (`lora`) and the magnitude vector that rescales the site's output.

    The base module is read at every forward (the norm depends on its weight) through a plain
    attribute, not a child: it is the adapter's parent, so it stays out of parameters and state."""

    def __init__(self, lora: LinearLoRA | EmbeddingLoRA | ConvLoRA, site: SiteView) -> None:
        super().__init__()
        self.lora = lora
        self.kind = site.kind
        object.__setattr__(self, "base", site.module)
        with torch.no_grad():
            norm = self.weight_norm()
        self.lora_magnitude_vector = nn.Parameter(norm)

    base: nn.Module

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.lora.tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def extra_repr(self) -> str:
        return f"kind={self.kind}"

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`\\lVert W + s B A \\rVert` per output row (channel; embedding dimension),
        shaped as the magnitude (PEFT's shapes), without autograd."""
        lora = self.lora
        A, B, s = lora.lora_A, lora.lora_B, lora.scale
        W = (weight_of(self.base) if weight is None else weight).to(A.dtype)
        if self.kind == "linear":
            return torch.addmm(W, B, A, alpha=s).norm(dim=1)
        if self.kind in ("conv1d_tf", "embedding"):  # weight [in, out] / [num, dim]: norm per column
            return torch.addmm(W, A.t(), B.t(), alpha=s).norm(dim=0)
        r = A.shape[0]
        full = torch.addmm(W.reshape(W.shape[0], -1), B.reshape(-1, r), A.reshape(r, -1), alpha=s)
        return full.norm(dim=1).view(1, -1, *([1] * (W.dim() - 2)))  # PEFT's conv magnitude [1, out, 1, ...]

    def _bias(self, like: torch.Tensor) -> torch.Tensor | None:
        b = getattr(self.base, "bias", None)
        if not isinstance(b, torch.Tensor):
            return None
        return b.to(like.dtype).view(1, -1, *([1] * (like.dim() - 2))) if self.kind == "conv" else b.to(like.dtype)

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        lora, m = self.lora, self.lora_magnitude_vector
        g = m / self.weight_norm()  # the norm is a constant: only m gets a gradient through g
        dtype = out.dtype
        if dtype != m.dtype:  # half-precision base: the update runs in the adapter's fp32, as PEFT's
            out, inplace = out.to(m.dtype), True
        if lora.p and self.training and self.kind != "embedding":  # PEFT's embedding LoRA has no dropout
            y = self._dropped(x, out, g)
        else:
            # g (Wx + b + s BAx) + (1 - g) b, which is PEFT's out + (g - 1)(out - b) + g s BAx
            y = lora.contribute(x, out, inplace)
            b = self._bias(y)
            if inplace and not (torch.is_grad_enabled() and (y.requires_grad or m.requires_grad)):
                y = y.mul_(g) if b is None else y.mul_(g).add_((1 - g) * b)
            else:
                y = y * g if b is None else torch.addcmul((1 - g) * b, y, g)
        return y.to(dtype)

    def _dropped(self, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """PEFT with dropout active: out + (g - 1) W xd + g s B A xd, xd the dropped-out input
        (the base term recomputed on xd, without bias)."""
        lora = self.lora
        A, B, s = lora.lora_A, lora.lora_B, lora.scale
        W = weight_of(self.base).to(A.dtype)
        if isinstance(lora, ConvLoRA):
            xd = F.dropout(x.to(A.dtype), lora.p, training=True)
            bd = lora.conv(xd, W, None, lora.stride, lora.padding, lora.dilation)  # PEFT's: zero padding
            if lora.pad is not None:
                h = lora.conv(F.pad(xd, lora.pad, mode=lora.pad_mode), A, None, lora.stride, 0, lora.dilation)
            else:
                h = lora.conv(xd, A, None, lora.stride, lora.padding, lora.dilation)
            return out + torch.addcmul(-bd, bd + lora.conv(h, B) * s, g)
        x2 = F.dropout(x.reshape(-1, A.shape[1]).to(A.dtype), lora.p, training=True)
        bd = x2 @ W if self.kind == "conv1d_tf" else F.linear(x2, W)
        t = torch.addmm(bd, F.linear(x2, A), B.t(), alpha=s)  # W xd + s B A xd
        return out + torch.addcmul(-bd, t, g).view(out.shape)

    def merge(self, site: SiteView) -> Merge:
        delta = self.lora.merge(site)["weight"].delta
        g = (self.lora_magnitude_vector / self.weight_norm()).detach().flatten()
        if self.kind in ("conv1d_tf", "embedding"):  # g scales the weight's columns there
            return {"weight": WeightUpdate(delta, cols=g)}
        return {"weight": WeightUpdate(delta, rows=g)}


@register
class DoRA(LoRA):
    name = "dora"
    Config = DoRAConfig
    # LoRA's class attribute is inferred as a pair: mypy takes a third suffix for a type change
    tensor_suffixes = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")

    def validate(self, cfg: LoRAConfig) -> None:
        try:
            super().validate(cfg)
        except ConfigError as e:  # LoRA's checks, under this method's name
            raise ConfigError("dora" + str(e).removeprefix("lora")) from None
        if cfg.init == "loftq":  # its magnitude is taken of W: a non-zero B A at injection would change the output
            raise ConfigError(
                "dora: init='loftq' is not supported (DoRA's magnitude starts from the base weight); use lora"
            )

    def make(self, site: SiteView, cfg: LoRAConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        lora = cast("LinearLoRA | EmbeddingLoRA | ConvLoRA", super().make(site, cfg, shapes))
        return DoRAAdapter(lora, site)

    def attached(self, adapters: dict[str, Adapter]) -> None:
        # LoRA's shared-input groups: q, k, v project their input through their A's in one GEMM
        super().attached({p: cast(DoRAAdapter, a).lora for p, a in adapters.items()})

    def refresh(self, adapter: Adapter, path: str, cfg: Any) -> None:
        super().refresh(cast(DoRAAdapter, adapter).lora, path, cfg)


__all__ = ["DoRA", "DoRAAdapter", "DoRAConfig"]
