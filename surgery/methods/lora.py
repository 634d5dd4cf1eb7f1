r"""LoRA (Hu et al., 2021): a low-rank update of a frozen weight.

For a linear site with weight :math:`W \in \mathbb{R}^{out \times in}`

.. math::  y = W x + s \, B A \, \mathrm{dropout}(x), \qquad
           A \in \mathbb{R}^{r \times in},\; B \in \mathbb{R}^{out \times r},\;
           s = \alpha / r \;(\text{or } \alpha / \sqrt{r} \text{ with rsLoRA})

`A` starts Kaiming-uniform and `B` at zero, so the output is unchanged at
injection. Merging adds :math:`s B A` to `W` (see `surgery.merge`). Tensors are
stored as PEFT stores them on disk: ``{site}.lora_A.weight`` of shape
``[r, in]`` and ``{site}.lora_B.weight`` of shape ``[out, r]`` (for convolutions
``[r, in, *kernel]`` and ``[out, r, 1, ...]``; for embeddings ``[r, num]`` and
``[dim, r]``).
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import ConfigError, DeltaMismatchError, InjectionError
from surgery.fourbit import is_quantized, loftq_factors
from surgery.methods.base import Adapter, Merge, Method, MethodConfig, SiteView, WeightUpdate, kind_of, register
from surgery.selectors import path_matches


def is_conv1d_transformers(module: nn.Module) -> bool:
    """transformers' GPT-2 style `Conv1D`: a linear layer with weight [in, out]."""
    return kind_of(module) == "conv1d_tf"


@dataclass
class LoRAConfig(MethodConfig):
    """Attributes:
    r: rank of the update B A.
    alpha: scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora); PEFT's default.
    dropout: dropout on the LoRA branch's input, in training only.
    init: "default" (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero), or "loftq" (on a
        base quantised with `quantize(..., loftq_rank=k)`, k >= r: s B A starts as the best rank-r
        approximation of what rounding to 4 bits lost, so the model starts near its full-precision
        self; such a delta fits only that 4-bit base, and `apply` refuses it elsewhere).
    rslora: rank-stabilised scale alpha / sqrt(r) (Kalajdzievski, 2023) instead of alpha / r.
    rank_pattern: module path pattern (glob or 're:') -> rank, overriding r at the sites it matches.
    alpha_pattern: module path pattern -> alpha, overriding alpha at the sites it matches.
    """

    r: int = 8
    alpha: float = 8  # scale alpha / r, PEFT's default
    dropout: float = 0.0
    init: str = "default"  # "default": A Kaiming-uniform, B zero; "gaussian": A ~ N(0, 1/r); "loftq"
    rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


INITS = ("default", "gaussian", "loftq")


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Half-precision bases train their LoRA in fp32, as PEFT does by default.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class _LoRABase(Adapter):
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, scale: float, dropout: float) -> None:
        super().__init__()
        self.scale = scale
        self.p = dropout

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scale={self.scale:g}, dropout={self.p:g}"

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=True) if self.p and self.training else x


def add_low_rank(out: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: float, inplace: bool) -> torch.Tensor:
    """`out + scale * h @ B^T`, with `out` of any shape ending in B's rows and h [tokens, r]."""
    o2 = out.reshape(-1, B.shape[0])
    if o2.dtype != B.dtype:
        return (o2 + (F.linear(h, B) * scale).to(o2.dtype)).view(out.shape)
    # The scale rides in the GEMM's alpha. In inference, when nothing else has seen `out`,
    # the add is in place: one kernel. Under autograd it is not: an in-place op through the
    # view `o2` makes backward clone the gradient, and a custom Function that avoids that
    # measured no faster than this out-of-place addmm.
    if inplace and not (torch.is_grad_enabled() and (o2.requires_grad or h.requires_grad)):
        return o2.addmm_(h, B.t(), alpha=scale).view(out.shape)
    return torch.addmm(o2, h, B.t(), alpha=scale).view(out.shape)


class LinearLoRA(_LoRABase):
    """LoRA on `nn.Linear` (weight [out, in]) or transformers' `Conv1D` (weight [in, out])."""

    def __init__(
        self, in_f: int, out_f: int, r: int, scale: float, dropout: float, fan_in_fan_out: bool, like: torch.Tensor
    ) -> None:
        super().__init__(scale, dropout)
        kw: dict[str, Any] = {"device": like.device, "dtype": adapter_dtype(like)}
        self.lora_A = nn.Parameter(torch.empty(r, in_f, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, **kw))
        self.fan_in_fan_out = fan_in_fan_out
        self.shared: _SharedInput | None = None  # set by LoRA.attached

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        A, B = self.lora_A, self.lora_B
        x2 = self._drop(x.reshape(-1, A.shape[1]).to(A.dtype))
        # under torch.compile each site projects alone (the group's bookkeeping cannot be traced)
        shared = self.shared is not None and not torch.compiler.is_compiling()
        h = self.shared.project(self, x, x2) if shared else F.linear(x2, A)  # type: ignore[union-attr]
        return add_low_rank(out, h, B, self.scale, inplace)

    def merge(self, site: SiteView) -> Merge:
        if self.fan_in_fan_out:  # weight is [in, out]: delta = (s B A)^T = A^T (s B^T)
            return {"weight": WeightUpdate((self.lora_A.t(), self.lora_B.t() * self.scale))}
        return {"weight": WeightUpdate((self.lora_B * self.scale, self.lora_A))}


class _SharedInput:
    """LoRA sites of one delta, under one parent, that may read the same input tensor
    (q, k, v; gate, up). The first of them to run projects the input through all their A
    matrices in one GEMM; the others take their slice if, and only if, they are called
    with that very tensor, and otherwise project alone (o_proj, say: its slice of the
    group's GEMM, r columns, is computed and dropped).
    Entries keep a weak reference to the input they were computed from, so a slice is
    never used for another input or another call, and are kept per thread.

    The group never changes after injection. A group that dropped the sites it found
    reading another input changed the GEMMs between the first call and the next, so the
    first call's outputs differed from later ones in the last bits, and gradient
    checkpointing, which runs a forward again in backward and requires the very same
    operations and saved tensors, raised torch's CheckpointError on the first backward."""

    def __init__(self, members: list[LinearLoRA]) -> None:
        self.members = members
        # (thread, member) -> the input and its slice: threads running one model never take each other's
        self.pending: dict[tuple[int, int], tuple[weakref.ref, torch.Tensor]] = {}

    def __deepcopy__(self, memo: dict) -> _SharedInput:
        # a copy shares nothing in flight (pending slices may carry autograd graphs); registered
        # in `memo` first so every copied member points at this one copied group
        import copy

        new = _SharedInput.__new__(_SharedInput)
        memo[id(self)] = new
        new.members = [copy.deepcopy(m, memo) for m in self.members]
        new.pending = {}
        return new

    def project(self, ad: LinearLoRA, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        tid = threading.get_ident()
        entry = self.pending.pop((tid, id(ad)), None)
        if entry is not None and entry[0]() is x:
            return entry[1]
        members = self.members
        if entry is not None or len(members) < 2:  # it reads another input than the group's first site
            return F.linear(x2, ad.lora_A)
        hs = F.linear(x2, torch.cat([m.lora_A for m in members])).split([m.lora_A.shape[0] for m in members], dim=1)
        ref = weakref.ref(x)
        mine = hs[0]
        for m, h in zip(members, hs, strict=True):
            if m is ad:
                mine = h
            else:
                self.pending[(tid, id(m))] = (ref, h)
        return mine


class EmbeddingLoRA(_LoRABase):
    """LoRA on `nn.Embedding`: rows of A^T are looked up, then projected by B."""

    def __init__(self, num: int, dim: int, r: int, scale: float, dropout: float, base: nn.Embedding) -> None:
        super().__init__(scale, dropout)
        like = base.weight
        kw: dict[str, Any] = {"device": like.device, "dtype": adapter_dtype(like)}
        self.lora_A = nn.Parameter(torch.empty(r, num, **kw))
        self.lora_B = nn.Parameter(torch.empty(dim, r, **kw))
        self.padding_idx = base.padding_idx
        self.max_norm, self.norm_type = base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        h = F.embedding(
            x, self.lora_A.t(), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return out + (F.linear(h, self.lora_B) * self.scale).to(out.dtype)

    def merge(self, site: SiteView) -> Merge:
        return {"weight": WeightUpdate((self.lora_A.t(), self.lora_B.t() * self.scale))}


class ConvLoRA(_LoRABase):
    """LoRA on `nn.Conv1d` / `nn.Conv2d`: A is a conv with the base's geometry
    into r channels, B a 1x1 conv back out."""

    def __init__(self, base: nn.Conv1d | nn.Conv2d, r: int, scale: float, dropout: float) -> None:
        super().__init__(scale, dropout)
        like = base.weight
        kw: dict[str, Any] = {"device": like.device, "dtype": adapter_dtype(like)}
        k = tuple(base.kernel_size)
        ones = (1,) * len(k)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_channels, *k, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, r, *ones, **kw))
        self.conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        # non-zero padding modes pad the input explicitly, as the base conv does
        self.pad_mode = base.padding_mode
        self.pad = base._reversed_padding_repeated_twice if base.padding_mode != "zeros" else None

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        x = self._drop(x.to(self.lora_A.dtype))
        if self.pad is not None:
            x = F.pad(x, self.pad, mode=self.pad_mode)
            h = self.conv(x, self.lora_A, None, self.stride, 0, self.dilation)
        else:
            h = self.conv(x, self.lora_A, None, self.stride, self.padding, self.dilation)
        return out + (self.conv(h, self.lora_B) * self.scale).to(out.dtype)

    def merge(self, site: SiteView) -> Merge:
        A, B = self.lora_A, self.lora_B
        if all(s == 1 for s in A.shape[2:]):
            d = (B.flatten(1) @ A.flatten(1)).view(B.shape[0], *A.shape[1:])
        else:
            d = self.conv(A.transpose(0, 1), B).transpose(0, 1)
        return {"weight": WeightUpdate(d * self.scale)}


@register
class LoRA(Method):
    name = "lora"
    Config = LoRAConfig
    # q and v, as the LoRA paper and PEFT's defaults; GPT-2 style fused qkv counts as both
    default_targets = ["@q", "@v", "@qkv"]
    tensor_suffixes: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight")

    def validate(self, cfg: LoRAConfig) -> None:
        def rank_ok(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        if not rank_ok(cfg.r):
            raise ConfigError(f"lora: r must be a positive integer, got {cfg.r!r}")
        if not (isinstance(cfg.alpha, (int, float)) and not isinstance(cfg.alpha, bool) and cfg.alpha > 0):
            raise ConfigError(f"lora: alpha must be a positive number, got {cfg.alpha!r}")
        if not (isinstance(cfg.dropout, (int, float)) and 0 <= cfg.dropout < 1):
            raise ConfigError(f"lora: dropout must be in [0, 1), got {cfg.dropout!r}")
        if cfg.init not in INITS:
            raise ConfigError(f"lora: init must be one of {list(INITS)}, got {cfg.init!r}")
        for what, patterns in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
            if not isinstance(patterns, dict):
                raise ConfigError(f"lora: {what} must be a dict of path pattern -> value, got {patterns!r}")
            for pat in patterns:
                if not isinstance(pat, str) or pat.startswith("@"):
                    raise ConfigError(
                        f"lora: {what} key {pat!r} must be a module path pattern (a glob or 're:'); "
                        "roles are not supported there: inject a second delta for those sites instead"
                    )
        for pat, v in cfg.rank_pattern.items():
            if not rank_ok(v):
                raise ConfigError(f"lora: rank_pattern[{pat!r}] must be a positive integer, got {v!r}")
        for pat, a in cfg.alpha_pattern.items():
            if not (isinstance(a, (int, float)) and a > 0):
                raise ConfigError(f"lora: alpha_pattern[{pat!r}] must be a positive number, got {a!r}")

    def supports(self, module: nn.Module) -> bool:
        return (
            isinstance(module, (nn.Linear, nn.Embedding))
            or is_conv1d_transformers(module)
            or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1)
        )

    @staticmethod
    def _pattern(patterns: dict[str, Any], path: str, default: Any) -> Any:
        for pat, v in patterns.items():
            if path_matches(pat, path):
                return v
        return default

    def scale(self, cfg: LoRAConfig, path: str, r: int) -> float:
        alpha = self._pattern(cfg.alpha_pattern, path, cfg.alpha)
        return alpha / (math.sqrt(r) if cfg.rslora else r)

    def attached(self, adapters: dict[str, Adapter]) -> None:
        # group linear sites that may share an input: same parent, width, dtype, no dropout
        groups: dict[tuple, list[LinearLoRA]] = {}
        for path, ad in adapters.items():
            if isinstance(ad, LinearLoRA) and not ad.p:
                key = (path.rpartition(".")[0], ad.lora_A.shape[1], ad.lora_A.dtype, ad.lora_A.device)
                groups.setdefault(key, []).append(ad)
        for members in groups.values():
            if len(members) > 1:
                shared = _SharedInput(members)
                for ad in members:
                    ad.shared = shared

    def check_tensors(
        self, model: nn.Module, sites: dict[str, dict[str, torch.Tensor]], config: dict[str, Any] | None = None
    ) -> None:
        if (config or {}).get("init") != "loftq":
            return
        for path in sites:
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                continue  # a missing site is refused by name further on
            if not is_quantized(mod):
                raise DeltaMismatchError(
                    f"lora init='loftq': site {path!r} is not 4-bit: this delta corrects the NF4 rounding of its base, "
                    "so on a full-precision base it would count that correction twice; apply it to the base "
                    "quantised with surgery.quantize(model, 'nf4'), or merge it there after surgery.quantize.dequantize(model)"
                )

    def refresh(self, adapter: Adapter, path: str, cfg: LoRAConfig) -> None:
        ad = cast(_LoRABase, adapter)  # this method made it
        ad.scale = self.scale(cfg, path, ad.lora_A.shape[0])

    def make(self, site: SiteView, cfg: LoRAConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        module, path = site.module, site.path
        # a stored delta fixes the rank; the scale follows from it
        r = int(shapes["lora_A.weight"][0]) if shapes else self._pattern(cfg.rank_pattern, path, cfg.r)
        scale = self.scale(cfg, path, r)
        ad: _LoRABase
        if isinstance(module, nn.Linear):
            like = cast(torch.Tensor, site.weight)  # a 4-bit base's dequantised weight: its dtype, not uint8
            ad = LinearLoRA(module.in_features, module.out_features, r, scale, cfg.dropout, False, like)
        elif is_conv1d_transformers(module):
            weight = cast(torch.Tensor, module.weight)
            in_f, out_f = weight.shape
            ad = LinearLoRA(in_f, out_f, r, scale, cfg.dropout, True, weight)
        elif isinstance(module, nn.Embedding):
            ad = EmbeddingLoRA(module.num_embeddings, module.embedding_dim, r, scale, cfg.dropout, module)
        else:
            ad = ConvLoRA(cast("nn.Conv1d | nn.Conv2d", module), r, scale, cfg.dropout)  # all supports() leaves
        if cfg.init == "loftq" and shapes is None:  # a stored delta brings its tensors; check_tensors its base
            self._init_loftq(site, ad)
        else:
            self._init(ad, cfg)
        return ad

    @staticmethod
    def _init_loftq(site: SiteView, ad: _LoRABase) -> None:
        """B and A from the LoftQ factors `quantize(..., loftq_rank=k)` kept on the site: s B A = L R
        truncated to rank r."""
        where = f"lora init='loftq': site {site.path!r}"
        factors = loftq_factors(site.module)
        r = ad.lora_A.shape[0]
        if not isinstance(ad, LinearLoRA) or factors is None:
            raise InjectionError(
                f"{where} has no LoftQ factors: quantise the full-precision model with "
                f"surgery.quantize(model, 'nf4', loftq_rank={r}) first (a model loaded 4-bit has lost the weights "
                "they are computed from), and target only the layers it quantised"
            )
        L, R = factors
        if L.shape[1] < r:
            raise InjectionError(
                f"{where} has LoftQ factors of rank {L.shape[1]} < r={r}: quantise with loftq_rank >= {r}"
            )
        if ad.lora_A.is_meta:
            return
        with torch.no_grad():
            ad.lora_A.copy_(R[:r])
            ad.lora_B.copy_(L[:, :r] / ad.scale)

    @staticmethod
    def _init(ad: _LoRABase, cfg: LoRAConfig) -> None:
        if ad.lora_A.is_meta:
            return
        with torch.no_grad():
            if isinstance(ad, EmbeddingLoRA):  # PEFT: A zero, B normal, for embeddings
                nn.init.zeros_(ad.lora_A)
                nn.init.normal_(ad.lora_B)
            elif cfg.init == "gaussian":
                nn.init.normal_(ad.lora_A, std=1 / ad.lora_A.shape[0])
            else:
                nn.init.kaiming_uniform_(ad.lora_A, a=math.sqrt(5))
