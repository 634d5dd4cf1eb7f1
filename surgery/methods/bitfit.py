r"""BitFit (Ben Zaken et al., 2022): only bias terms train, as a delta on the frozen base.

Each site gets a vector :math:`\Delta b` added to its output, :math:`y = f(x) + \Delta b` (over the
output channels: the last dim of a linear / GPT-2 ``Conv1D`` / ``LayerNorm`` output, dim 1 of a conv or
batch / group norm output). It starts at zero; the base's own bias is never touched, so `disable` and
`remove` give the base back bit for bit. Stored as ``{site}.bias_delta``.

Default sites: every module that has a bias (linear layers, ``Conv1D``, convs and the norms: LayerNorm's
:math:`\beta` too, as in the paper) and every linear layer (``@linear``) without one, which gets a
:math:`\Delta b` from zero (Llama has no bias anywhere). Merging adds :math:`\Delta b` to the module's bias,
exactly reversibly (`surgery.merge`'s arithmetic); a module without a bias gets one holding
:math:`\Delta b`, which unmerge takes away again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from surgery.errors import ConfigError, MergeError
from surgery.merge import MergeRecord, merge_weight, unmerge_weight
from surgery.methods.base import Action, Adapter, Merge, Method, MethodConfig, SiteView, WeightUpdate, kind_of, register
from surgery.methods.lora import adapter_dtype

# norms whose bias is per channel; LayerNorm's spans its normalized_shape (the last dims)
_CHANNEL_NORMS = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("bias"), torch.Tensor)


def supported(module: nn.Module) -> bool:
    return kind_of(module) in ("linear", "conv1d_tf", "conv") or isinstance(module, (nn.LayerNorm, *_CHANNEL_NORMS))


def with_bias(path: str, module: nn.Module) -> bool:
    """Selector: the modules BitFit supports that have a bias of their own."""
    return supported(module) and _has_bias(module)


def _bias_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape)
    if isinstance(module, nn.GroupNorm):
        return (module.num_channels,)
    if isinstance(module, _CHANNEL_NORMS):
        return (cast(Any, module).num_features,)
    if isinstance(module, nn.Linear):  # also a 4-bit one, whose packed weight has another shape
        return (module.out_features,)
    w = cast(torch.Tensor, module.weight)
    return (w.shape[1] if kind_of(module) == "conv1d_tf" else w.shape[0],)


@dataclass
class BitFitConfig(MethodConfig):
    """Attributes:
    add_missing: True: a targeted module without a bias gets a delta from zero (merged, the module gets a
        bias, which unmerge takes away again); False: such modules are skipped.
    """

    add_missing: bool = True


class BiasDelta(Adapter):
    """Adds ``bias_delta`` over the output channels; merged (`fold`), it lives in the module's bias."""

    action = Action.OUTPUT
    bias_delta: nn.Parameter
    host: nn.Module

    def __init__(self, module: nn.Module, shape: tuple[int, ...], like: torch.Tensor) -> None:
        super().__init__()
        self.bias_delta = nn.Parameter(torch.zeros(shape, dtype=adapter_dtype(like), device=like.device))
        # channels at dim 1: convs, batch / group norms, ConvNeXt's channels_first LayerNorm
        first = kind_of(module) == "conv" or isinstance(module, _CHANNEL_NORMS)
        self.channel_dim = 1 if first or getattr(module, "data_format", None) == "channels_first" else -1
        # plain attributes (no submodule): the module the delta merges into, and what unmerge needs
        self.__dict__["host"] = module
        self.record: MergeRecord | None = None  # merged into an existing bias
        self.added: torch.Tensor | None = None  # merged as a new bias (its value when merged)

    def extra_repr(self) -> str:
        return f"bias_delta={tuple(self.bias_delta.shape)}"

    @property
    def merged(self) -> bool:
        return self.record is not None or self.added is not None

    def shaped(self, out: torch.Tensor) -> torch.Tensor:
        d = self.bias_delta
        return d if self.channel_dim == -1 else d.view(-1, *(1,) * (out.dim() - 2))

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if self.merged:  # its value is in the module's bias now
            return out
        d = self.shaped(out)
        if inplace and not (torch.is_grad_enabled() and (out.requires_grad or d.requires_grad)):
            return out.add_(d)
        return (out + d).to(out.dtype)

    def merge(self, site: SiteView) -> Merge:
        return {"bias": WeightUpdate(delta=self.bias_delta)}

    def low_rank(self, site: SiteView) -> Merge:
        return {"weight": WeightUpdate(), "bias": WeightUpdate(delta=self.bias_delta)}  # a bank adds it per row

    @torch.no_grad()
    def fold(self) -> None:
        host = self.host
        bias = host._parameters.get("bias")
        if isinstance(bias, torch.Tensor):
            self.record = merge_weight(bias, WeightUpdate(delta=self.bias_delta))
            return
        w = host._parameters.get("weight")
        dtype = w.dtype if isinstance(w, torch.Tensor) else self.bias_delta.dtype
        new = nn.Parameter(self.bias_delta.detach().to(dtype=dtype, copy=True), requires_grad=False)
        host._parameters["bias"] = new
        self.added = new.detach().clone()

    @torch.no_grad()
    def unfold(self) -> None:
        host, bias = self.host, self.host._parameters.get("bias")
        if self.record is not None:
            unmerge_weight(cast(torch.Tensor, bias), self.record)
            self.record = None
        elif self.added is not None:
            if not isinstance(bias, torch.Tensor) or not torch.equal(bias, self.added):
                raise MergeError(
                    "the bias BitFit added when merging was changed since (trained, or another delta merged into "
                    "it?); unmerge the deltas merged after it first"
                )
            host._parameters["bias"] = None
            self.added = None


@register
class BitFit(Method):
    name = "bitfit"
    Config = BitFitConfig
    default_targets = ["@linear", with_bias]
    tensor_suffixes = ("bias_delta",)

    def validate(self, cfg: BitFitConfig) -> None:
        if not isinstance(cfg.add_missing, bool):
            raise ConfigError(f"bitfit: add_missing must be True or False, got {cfg.add_missing!r}")

    def supports(self, module: nn.Module) -> bool:
        return supported(module)

    def place(self, model: nn.Module, hits: list[tuple[str, nn.Module]], cfg: BitFitConfig) -> list:
        return [(p, m) for p, m in hits if supported(m) and (cfg.add_missing or _has_bias(m))]

    def make(self, site: SiteView, cfg: BitFitConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        like = next((p for p in site.module.parameters(recurse=False) if p.is_floating_point()), None)
        # a norm without affine parameters: the default dtype
        return BiasDelta(
            site.module, _bias_shape(site.module), torch.empty(0, device=site.device) if like is None else like
        )

    # merging goes through fold: a module without a bias gets one, which the engine's merge cannot add
    def fold(self, adapters: dict[str, Adapter]) -> bool:
        done: list[BiasDelta] = []
        try:
            for ad in adapters.values():
                cast(BiasDelta, ad).fold()
                done.append(cast(BiasDelta, ad))
        except BaseException:
            for ad in reversed(done):
                ad.unfold()
            raise
        return True

    def unfold(self, adapters: dict[str, Adapter]) -> bool:
        ads = [cast(BiasDelta, a) for a in adapters.values()]
        if not any(a.merged for a in ads):
            return False
        done: list[BiasDelta] = []
        try:
            for ad in reversed(ads):
                ad.unfold()
                done.append(ad)
        except BaseException:
            for ad in done:
                ad.fold()
            raise
        return True

    def folded(self, adapters: dict[str, Adapter]) -> bool:
        return any(cast(BiasDelta, a).merged for a in adapters.values())
