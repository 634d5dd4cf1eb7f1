r"""LoKr (Yeh et al., 2023; LyCORIS): a weight update that is a Kronecker product,

.. math::  \Delta W = s \, W_1 \otimes W_2, \qquad s = \alpha / r,

with :math:`W_1 \in \mathbb{R}^{a \times c}`, :math:`W_2 \in \mathbb{R}^{b \times d}`,
``out = a b`` and ``in = c d`` split by PEFT's `factorization` (factors near the square root,
or near ``decompose_factor``). :math:`W_2` is low-rank (``lokr_w2_a @ lokr_w2_b``) when
``r < max(b, d) / 2``, else a full ``lokr_w2``; :math:`W_1` is full (``lokr_w1``) unless
``decompose_both`` and ``r < max(a, c) / 2``. A convolution's kernel goes into :math:`W_2`
(flattened, or a core ``lokr_t2 [r, r, *kernel]`` with ``use_effective_conv2d``). It is a
weight-space method like LoHa (`surgery.methods.loha`): same dropouts, same PEFT format
(peft_type "LOKR", tensors ``{site}.lokr_w1`` ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from surgery.errors import ConfigError
from surgery.methods.base import Adapter, Merge, MethodConfig, NotMergeable, SiteView, WeightUpdate, register
from surgery.methods.loha import Lycoris, LycorisAdapter, peft_shape
from surgery.methods.lora import adapter_dtype


@dataclass
class LoKrConfig(MethodConfig):
    """Attributes:
    r: rank of the low-rank Kronecker factors (only the scale uses it when both factors are full).
    alpha: scale numerator: the update is scaled by alpha / r (PEFT's default, 8).
    rank_dropout: in training, each output row of the update is dropped with this probability (PEFT's rank_dropout).
    module_dropout: in training, the whole update is skipped for a forward with this probability (PEFT's module_dropout).
    use_effective_conv2d: convolutions with a kernel larger than 1 keep it in a core lokr_t2 [r, r, *kernel] instead of flattening it into W2's columns.
    decompose_both: also factor the left Kronecker factor W1 into lokr_w1_a @ lokr_w1_b when r < max(its dims) / 2.
    decompose_factor: -1 splits each dimension into factors near its square root; k > 0 into factors near k (PEFT's factorization).
    rank_dropout_scale: rescale the rows kept by rank_dropout by 1 / their fraction.
    init: "default" (W1 zero: outputs unchanged at injection), "lycoris" (W2 zero, as the LyCORIS repository) or "random" (all Kaiming-uniform, PEFT's init_weights=False).
    rank_pattern: module path pattern (glob or 're:') -> rank, overriding r at the sites it matches.
    alpha_pattern: module path pattern -> alpha, overriding alpha at the sites it matches.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init: str = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS') split of `dimension` into m <= n with m * n == dimension: m = `factor`
    when it divides, else the pair nearest the square root with m <= factor (any, for -1)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    length = m + n  # fixed, as in PEFT
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrAdapter(LycorisAdapter):
    lokr_w1: nn.Parameter | None
    lokr_w1_a: nn.Parameter | None
    lokr_w1_b: nn.Parameter | None
    lokr_w2: nn.Parameter | None
    lokr_w2_a: nn.Parameter | None
    lokr_w2_b: nn.Parameter | None
    lokr_t2: nn.Parameter | None
    scale_rank_dropout = False

    def __init__(
        self,
        shape: tuple[int, ...],
        ac: tuple[int, int],
        r: int,
        use: tuple[bool, bool, bool],
        transpose: bool,
        like: torch.Tensor,
    ) -> None:
        """`ac`: W1's shape; `use`: full W1, full W2, kernel core (PEFT's use_w1, use_w2, effective)."""
        super().__init__(shape, r, transpose)
        kw: dict[str, Any] = {"device": like.device, "dtype": adapter_dtype(like)}

        def p(*size: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(size, **kw))

        (a, c), (out, inp, *k) = ac, shape
        b, d = out // a, inp // c
        use_w1, use_w2, effective = use
        self.lokr_w1 = p(a, c) if use_w1 else None
        self.lokr_w1_a, self.lokr_w1_b = (None, None) if use_w1 else (p(a, r), p(r, c))
        self.lokr_w2 = p(b, d, *k) if use_w2 else None
        self.lokr_t2 = None
        if use_w2:
            self.lokr_w2_a = self.lokr_w2_b = None
        elif effective:  # Conv1d's kernel gets a trailing 1, as PEFT's core is 4-D
            self.lokr_t2 = p(r, r, *k, 1) if len(k) == 1 else p(r, r, *k)
            self.lokr_w2_a, self.lokr_w2_b = p(r, b), p(r, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = p(b, r), p(r, d * math.prod(k))

    def dense(self) -> torch.Tensor:
        t = cast(dict[str, torch.Tensor], self._parameters)
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # torch.kron as PEFT calls it (a 3-D full W2 of a Conv1d included), then PEFT's reshape
        return (torch.kron(w1, w2.contiguous()) * self.scale).reshape(self.shape)

    def low_rank(self, site: SiteView) -> Merge | NotMergeable:
        # kron(X1 Y1, X2 Y2) = kron(X1, X2) kron(Y1, Y2): a full factor splits as (W, I) or (I, W)
        t = cast(dict[str, torch.Tensor], self._parameters)
        if "lokr_t2" in t or len(self.shape) != 2:
            return NotMergeable("a LoKr update of a convolution does not factor into a low-rank product")

        def split(full: str, a: str, b: str) -> tuple[torch.Tensor, torch.Tensor]:
            if full not in t:
                return t[a], t[b]
            w = t[full]
            eye = torch.eye(min(w.shape), dtype=w.dtype, device=w.device)
            return (w, eye) if w.shape[1] <= w.shape[0] else (eye, w)

        (l1, r1), (l2, r2) = split("lokr_w1", "lokr_w1_a", "lokr_w1_b"), split("lokr_w2", "lokr_w2_a", "lokr_w2_b")
        left, right = torch.kron(l1, l2) * self.scale, torch.kron(r1, r2)
        pair = (right.t(), left.t()) if self.transpose else (left, right)
        return {"weight": WeightUpdate(delta=(pair[0].to(site.dtype), pair[1].to(site.dtype)))}


@register
class LoKr(Lycoris):
    name = "lokr"
    Config = LoKrConfig
    tensor_suffixes = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    peft_type = "LOKR"
    core = "lokr_t2"
    inits = {"default": True, "random": False, "lycoris": "lycoris"}
    zero_at_init = {"default": {"lokr_w1", "lokr_w1_a"}, "lycoris": {"lokr_w2", "lokr_w2_b"}}
    extra_fields = ("decompose_both", "decompose_factor", "rank_dropout_scale")

    def validate(self, cfg: LoKrConfig) -> None:
        super().validate(cfg)
        f = cfg.decompose_factor
        if not (isinstance(f, int) and not isinstance(f, bool) and (f == -1 or f > 0)):
            raise ConfigError(f"lokr: decompose_factor must be -1 or a positive integer, got {f!r}")
        for what in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(cfg, what), bool):
                raise ConfigError(f"lokr: {what} must be True or False, got {getattr(cfg, what)!r}")

    def make(self, site: SiteView, cfg: LoKrConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        shape = peft_shape(site)
        r = self.pattern(cfg.rank_pattern, site.path, cfg.r)
        if shapes:  # a stored delta fixes the factors' shapes and which are low-rank
            r = self.site_rank(shapes, r)
            w1 = shapes.get("lokr_w1")
            ac = (w1[0], w1[1]) if w1 is not None else (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
            use = (w1 is not None, "lokr_w2" in shapes, "lokr_t2" in shapes)
        else:  # PEFT's rules (LoKrLayer.update_layer)
            (a, b), (c, d) = (
                factorization(shape[0], cfg.decompose_factor),
                factorization(shape[1], cfg.decompose_factor),
            )
            ac = (a, c)
            effective = cfg.use_effective_conv2d and site.kind == "conv" and any(k != 1 for k in shape[2:])
            use = (not (cfg.decompose_both and r < max(a, c) / 2), not r < max(b, d) / 2, effective)
        like = cast(torch.Tensor, site.weight)
        return self.finish(
            LoKrAdapter(shape, (int(ac[0]), int(ac[1])), r, use, site.kind == "conv1d_tf", like), site, cfg
        )

    def site_rank(self, shapes: dict[str, torch.Size], default: int) -> int:
        return next((int(shapes[k][0]) for k in ("lokr_w1_b", "lokr_w2_b") if k in shapes), default)

    def complete(self, suffixes: set[str]) -> bool:
        w1 = ("lokr_w1" in suffixes) != ({"lokr_w1_a", "lokr_w1_b"} <= suffixes)
        w2 = ("lokr_w2" in suffixes) != ({"lokr_w2_a", "lokr_w2_b"} <= suffixes)
        return w1 and w2 and not ("lokr_t2" in suffixes and "lokr_w2" in suffixes)
