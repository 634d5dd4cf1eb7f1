r"""LoHa (Hyeon-Woo et al., FedPara, 2021; LyCORIS): a weight update that is the Hadamard
product of two low-rank products,

.. math::  \Delta W = s \, (W_{1a} W_{1b}) \odot (W_{2a} W_{2b}), \qquad s = \alpha / r,

with :math:`W_{\cdot a} \in \mathbb{R}^{out \times r}`, :math:`W_{\cdot b} \in \mathbb{R}^{r \times in}`
(a convolution's kernel is flattened into `in`), so the update's rank can reach :math:`r^2`.
With ``use_effective_conv2d`` a convolution with a kernel larger than 1 keeps the kernel in
two cores ``hada_t1``, ``hada_t2`` of shape ``[r, r, *kernel]`` (FedPara's proposition 3).
It is a weight-space method: the forward is that of :math:`W + \Delta W`, and merging adds
:math:`\Delta W` to `W`. Tensors are named and shaped as PEFT's ``LoHaConfig`` stores them
(``{site}.hada_w1_a`` ...), its training-time ``rank_dropout`` and ``module_dropout`` included.

The shared LyCORIS machinery (config checks, dropouts, PEFT's format) lives here; LoKr
(`surgery.methods.lokr`) builds on it.
"""

from __future__ import annotations

import abc
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import nn

from surgery.errors import ConfigError
from surgery.methods.base import (
    PEFT_PREFIX,
    Action,
    Adapter,
    Merge,
    Method,
    MethodConfig,
    NotMergeable,
    PeftContext,
    SiteView,
    WeightUpdate,
    peft_pattern,
    register,
)
from surgery.methods.lora import adapter_dtype, is_conv1d_transformers
from surgery.selectors import path_matches


@dataclass
class LoHaConfig(MethodConfig):
    """Attributes:
    r: rank of each of the two low-rank products (the update's rank can reach r**2).
    alpha: scale numerator: the update is scaled by alpha / r (PEFT's default, 8).
    rank_dropout: in training, each output row of the update is dropped with this probability, the kept ones rescaled by 1 / their fraction (PEFT's rank_dropout).
    module_dropout: in training, the whole update is skipped for a forward with this probability (PEFT's module_dropout).
    use_effective_conv2d: convolutions with a kernel larger than 1 keep it in cores hada_t1 / hada_t2 [r, r, *kernel] instead of flattening it into the input dimension.
    init: "default" (w1_a, w1_b, w2_a Kaiming-uniform, w2_b zero: outputs unchanged at injection) or "random" (all Kaiming-uniform, PEFT's init_weights=False).
    rank_pattern: module path pattern (glob or 're:') -> rank, overriding r at the sites it matches.
    alpha_pattern: module path pattern -> alpha, overriding alpha at the sites it matches.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init: str = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def _kaiming(p: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))


def peft_shape(site: SiteView) -> tuple[int, ...]:
    """The site's weight shape as PEFT's LyCORIS layers see it: [out, in / groups, *kernel]."""
    w = cast(torch.Tensor, site.weight)
    return (w.shape[1], w.shape[0]) if site.kind == "conv1d_tf" else tuple(w.shape)


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: t.shape for k, t in tensors.items()}


class LycorisAdapter(Adapter):
    """A dense weight update `dense()` in PEFT's layout [out, in, *kernel], with PEFT's
    training-time dropouts; transposed for transformers' Conv1D, cast to the site's dtype."""

    action = Action.WEIGHT
    scale_rank_dropout: ClassVar[bool] = True  # LoHa always rescales the kept rows; LoKr when asked

    def __init__(self, shape: tuple[int, ...], r: int, transpose: bool) -> None:
        super().__init__()
        self.shape, self.r, self.transpose = shape, r, transpose
        self.scale, self.rank_dropout, self.module_dropout = 1.0, 0.0, 0.0
        self.rank_dropout_scale = self.scale_rank_dropout

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, rank_dropout={self.rank_dropout:g}, module_dropout={self.module_dropout:g}"

    @abc.abstractmethod
    def dense(self) -> torch.Tensor:
        """The update W's layout wants before scale, dropouts and transposition (each method's own)."""

    def _site_layout(self, w: torch.Tensor, site: SiteView) -> torch.Tensor:
        return (w.t() if self.transpose else w).to(site.dtype)

    def weight_delta(self, site: SiteView) -> tuple[torch.Tensor, torch.Tensor | None]:
        # PEFT draws the module-dropout coin first and the row mask only for an update that runs
        if self.training and self.module_dropout and not bool(torch.rand(1) > self.module_dropout):
            return torch.zeros_like(cast(torch.Tensor, site.weight)), None
        w = self.dense()
        if self.training and self.rank_dropout:
            drop = (torch.rand(w.shape[0]) > self.rank_dropout).to(w.dtype)
            if self.rank_dropout_scale:
                drop = drop / drop.mean().clamp_min(1e-12)  # all rows dropped: zeros, not PEFT's NaNs
            w = w * drop.view(-1, *[1] * (w.dim() - 1)).to(w.device)
        return self._site_layout(w, site), None

    def merge(self, site: SiteView) -> Merge:
        return {"weight": WeightUpdate(delta=self._site_layout(self.dense(), site))}  # never a dropout


class LoHaAdapter(LycorisAdapter):
    hada_t1: nn.Parameter | None
    hada_t2: nn.Parameter | None

    def __init__(self, shape: tuple[int, ...], r: int, effective: bool, transpose: bool, like: torch.Tensor) -> None:
        super().__init__(shape, r, transpose)
        kw: dict[str, Any] = {"device": like.device, "dtype": adapter_dtype(like)}
        out, inp, *k = shape
        if effective:  # Conv1d's kernel gets a trailing 1, as PEFT's cores are 4-D
            core = (r, r, *k, 1) if len(k) == 1 else (r, r, *k)
            self.hada_w1_a, self.hada_w1_b = (
                nn.Parameter(torch.empty(r, out, **kw)),
                nn.Parameter(torch.empty(r, inp, **kw)),
            )
            self.hada_t1 = nn.Parameter(torch.empty(core, **kw))
            self.hada_w2_a, self.hada_w2_b = (
                nn.Parameter(torch.empty(r, out, **kw)),
                nn.Parameter(torch.empty(r, inp, **kw)),
            )
            self.hada_t2 = nn.Parameter(torch.empty(core, **kw))
        else:
            flat = inp * math.prod(k)
            self.hada_w1_a, self.hada_w1_b = (
                nn.Parameter(torch.empty(out, r, **kw)),
                nn.Parameter(torch.empty(r, flat, **kw)),
            )
            self.hada_w2_a, self.hada_w2_b = (
                nn.Parameter(torch.empty(out, r, **kw)),
                nn.Parameter(torch.empty(r, flat, **kw)),
            )
            self.hada_t1 = self.hada_t2 = None

    def dense(self) -> torch.Tensor:
        if self.hada_t1 is not None and self.hada_t2 is not None:
            cp = "i j k l, j r, i p -> p r k l"
            w1 = torch.einsum(cp, self.hada_t1, self.hada_w1_b, self.hada_w1_a)
            w = w1 * torch.einsum(cp, self.hada_t2, self.hada_w2_b, self.hada_w2_a) * self.scale
        else:
            w = ((self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)) * self.scale
        return w.reshape(self.shape)

    def low_rank(self, site: SiteView) -> Merge | NotMergeable:
        # (W1a W1b) * (W2a W2b) = sum over i, j of (W1a[:, i] * W2a[:, j]) (W1b[i] * W2b[j]): rank r**2
        if self.hada_t1 is not None or len(self.shape) != 2:
            return NotMergeable("a LoHa update of a convolution does not factor into a low-rank product")
        out, inp = self.shape
        r1, r2 = self.hada_w1_a.shape[1], self.hada_w2_a.shape[1]
        left = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(out, r1 * r2) * self.scale
        right = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r1 * r2, inp)
        pair = (right.t(), left.t()) if self.transpose else (left, right)
        return {"weight": WeightUpdate(delta=(pair[0].to(site.dtype), pair[1].to(site.dtype)))}


class Lycoris(Method):
    """What LoHa and LoKr share: PEFT's LyCORIS config fields, their checks, per-site rank and
    alpha, and PEFT's on-disk format (fields and tensors named as PEFT names them)."""

    default_targets = ["@q", "@v", "@qkv"]  # as our LoRA
    inits: ClassVar[dict[str, bool | str]] = {"default": True, "random": False}  # ours -> PEFT's init_weights
    zero_at_init: ClassVar[dict[str, set[str]]] = {}  # init -> the tensors that start at zero
    extra_fields: ClassVar[tuple[str, ...]] = ()  # config fields written to PEFT under the same name
    core: ClassVar[str]  # the tensor only use_effective_conv2d makes

    def validate(self, cfg: Any) -> None:
        n = self.name

        def rank_ok(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        def positive(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

        if not rank_ok(cfg.r):
            raise ConfigError(f"{n}: r must be a positive integer, got {cfg.r!r}")
        if not positive(cfg.alpha):
            raise ConfigError(f"{n}: alpha must be a positive number, got {cfg.alpha!r}")
        for what in ("rank_dropout", "module_dropout"):
            v = getattr(cfg, what)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
                raise ConfigError(f"{n}: {what} must be in [0, 1), got {v!r}")
        if not isinstance(cfg.use_effective_conv2d, bool):
            raise ConfigError(f"{n}: use_effective_conv2d must be True or False, got {cfg.use_effective_conv2d!r}")
        if cfg.init not in self.inits:
            raise ConfigError(f"{n}: init must be one of {sorted(self.inits)}, got {cfg.init!r}")
        for what, patterns, ok in (
            ("rank_pattern", cfg.rank_pattern, rank_ok),
            ("alpha_pattern", cfg.alpha_pattern, positive),
        ):
            if not isinstance(patterns, dict):
                raise ConfigError(f"{n}: {what} must be a dict of path pattern -> value, got {patterns!r}")
            for pat, v in patterns.items():
                if not isinstance(pat, str) or pat.startswith("@"):
                    raise ConfigError(
                        f"{n}: {what} key {pat!r} must be a module path pattern (a glob or 're:'); "
                        "roles are not supported there: inject a second delta for those sites instead"
                    )
                if not ok(v):
                    raise ConfigError(
                        f"{n}: {what}[{pat!r}] must be a positive {'integer' if ok is rank_ok else 'number'}, got {v!r}"
                    )

    def supports(self, module: nn.Module) -> bool:
        # PEFT's LyCORIS layers: Linear, Conv1d, Conv2d; GPT-2's Conv1D is a linear layer here too
        return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or is_conv1d_transformers(module)

    @staticmethod
    def pattern(patterns: dict[str, Any], path: str, default: Any) -> Any:
        return next((v for pat, v in patterns.items() if path_matches(pat, path)), default)

    def set_settings(self, ad: LycorisAdapter, path: str, cfg: Any) -> None:
        ad.scale = self.pattern(cfg.alpha_pattern, path, cfg.alpha) / ad.r
        ad.rank_dropout, ad.module_dropout = cfg.rank_dropout, cfg.module_dropout
        ad.rank_dropout_scale = getattr(cfg, "rank_dropout_scale", ad.scale_rank_dropout)

    def refresh(self, adapter: Adapter, path: str, cfg: Any) -> None:
        self.set_settings(cast(LycorisAdapter, adapter), path, cfg)

    def finish(self, ad: LycorisAdapter, site: SiteView, cfg: Any) -> LycorisAdapter:
        self.set_settings(ad, site.path, cfg)
        zero = self.zero_at_init.get(cfg.init, set())
        with torch.no_grad():
            for name, p in ad.named_parameters():
                if not p.is_meta:
                    nn.init.zeros_(p) if name in zero else _kaiming(p)
        return ad

    # ---- PEFT's format
    @abc.abstractmethod
    def site_rank(self, shapes: dict[str, torch.Size], default: int) -> int:
        """A site's rank: from its tensors' shapes where they hold it, else `default` (the config's)."""

    @abc.abstractmethod
    def complete(self, suffixes: set[str]) -> bool:
        """Whether a site's tensor names make one update of this method."""

    def to_peft(
        self, config: dict[str, Any], sites: dict[str, dict[str, torch.Tensor]], ctx: PeftContext
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg = self.config(**config)
        tf = sorted(p for p in sites if ctx.kinds.get(p) == "conv1d_tf")
        if tf:
            raise ConfigError(
                f"PEFT's {self.peft_type} has no layer for transformers' Conv1D (GPT-2 style) sites {tf[:3]}: "
                "PEFT could not load them; save it in model-surgery's own format (surgery.delta / Hub.push)"
            )
        # exact per-site keys, longest paths first (PEFT takes the first key that matches)
        order = sorted(sites, key=lambda p: (-len(p), p))
        ranks = {p: self.site_rank(_shapes(sites[p]), self.pattern(cfg.rank_pattern, p, cfg.r)) for p in order}
        alphas = {p: self.pattern(cfg.alpha_pattern, p, cfg.alpha) for p in order}
        fields = {
            "r": cfg.r,
            "alpha": cfg.alpha,
            "rank_dropout": float(cfg.rank_dropout),
            "module_dropout": float(cfg.module_dropout),
            "use_effective_conv2d": cfg.use_effective_conv2d or any(self.core in ts for ts in sites.values()),
            "init_weights": self.inits[cfg.init],
            "target_modules": ctx.target_modules(list(sites)),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "modules_to_save": None,
            "rank_pattern": {"^" + re.escape(p): ranks[p] for p in order if ranks[p] != cfg.r},
            "alpha_pattern": {"^" + re.escape(p): alphas[p] for p in order if alphas[p] != cfg.alpha},
            **{f: getattr(cfg, f) for f in self.extra_fields},
        }
        tensors = {f"{PEFT_PREFIX}{p}.{suf}": t for p, ts in sites.items() for suf, t in ts.items()}
        return fields, tensors

    def from_peft(
        self, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: PeftContext
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        pc, kind = peft_config, self.peft_type
        known = {"r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights"}
        known |= {"rank_pattern", "alpha_pattern", *self.extra_fields}
        # fields that only choose sites (the tensors name them) or carry no math
        ignored = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"}
        ignored |= {"inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}
        for f, v in pc.items():
            if f not in known and f not in ignored and v not in (None, False, 0, "", [], {}, ()):
                why = (
                    "fully trained module copies are not a weight delta"
                    if f == "modules_to_save"
                    else "unknown to model-surgery"
                )
                raise ConfigError(f"PEFT {kind} field {f}={v!r} cannot be represented: {why}")
        init = next((ours for ours, theirs in self.inits.items() if theirs == pc.get("init_weights", True)), None)
        if init is None or not isinstance(pc.get("init_weights", True), (bool, str)):
            raise ConfigError(f"PEFT {kind} field init_weights={pc.get('init_weights')!r} cannot be represented")
        for f in ("rank_pattern", "alpha_pattern"):
            if not isinstance(pc.get(f) or {}, dict):
                raise ConfigError(f"PEFT {kind} field {f}={pc.get(f)!r} must be a mapping of pattern -> value")
        sites: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            path, _, suf = key[len(PEFT_PREFIX) :].rpartition(".")
            if not key.startswith(PEFT_PREFIX) or not path or suf not in self.tensor_suffixes:
                raise ConfigError(f"PEFT tensor {key!r} is not a {kind} tensor ({', '.join(self.tensor_suffixes)})")
            sites.setdefault(path, {})[suf] = t
        for path, ts in sites.items():
            if not self.complete(set(ts)):
                raise ConfigError(f"PEFT {kind} tensors of {path!r} are incomplete: {sorted(ts)}")
        r0, alpha0 = pc.get("r", 8), pc.get("alpha", 8)
        rank_pat, alpha_pat = pc.get("rank_pattern") or {}, pc.get("alpha_pattern") or {}
        config = {
            f: pc[f] for f in ("rank_dropout", "module_dropout", "use_effective_conv2d", *self.extra_fields) if f in pc
        }
        ranks = {p: self.site_rank(_shapes(ts), peft_pattern(rank_pat, p, r0)) for p, ts in sites.items()}
        alphas = {p: peft_pattern(alpha_pat, p, alpha0) for p in sites}
        config.update(
            r=r0,
            alpha=alpha0,
            init=init,
            rank_pattern={"re:" + re.escape(p): v for p, v in ranks.items() if v != r0},
            alpha_pattern={"re:" + re.escape(p): v for p, v in alphas.items() if v != alpha0},
        )
        self.config(**config)  # checks the values PEFT gave
        return config, {f"{p}.{suf}": t for p, ts in sites.items() for suf, t in ts.items()}


@register
class LoHa(Lycoris):
    name = "loha"
    Config = LoHaConfig
    tensor_suffixes = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    peft_type = "LOHA"
    core = "hada_t1"
    zero_at_init = {"default": {"hada_w2_b"}}

    def make(self, site: SiteView, cfg: LoHaConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        shape = peft_shape(site)
        if shapes:  # a stored delta fixes the rank and the kernel's layout
            r, effective = self.site_rank(shapes, cfg.r), "hada_t1" in shapes
        else:
            r = self.pattern(cfg.rank_pattern, site.path, cfg.r)
            effective = cfg.use_effective_conv2d and site.kind == "conv" and any(k != 1 for k in shape[2:])
        like = cast(torch.Tensor, site.weight)
        return self.finish(LoHaAdapter(shape, r, effective, site.kind == "conv1d_tf", like), site, cfg)

    def site_rank(self, shapes: dict[str, torch.Size], default: int) -> int:
        return int(shapes["hada_w1_b"][0])

    def complete(self, suffixes: set[str]) -> bool:
        return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= suffixes and ("hada_t1" in suffixes) == (
            "hada_t2" in suffixes
        )
