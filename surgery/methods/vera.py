r"""VeRA (Kopiczko et al., 2024): LoRA with frozen random A and B shared by every site,
and two learned vectors per site.

For a linear site with weight :math:`W \in \mathbb{R}^{out \times in}`

.. math::  y = W x + \lambda_b \odot B_{:out} \big(\lambda_d \odot A_{:, :in}\, \mathrm{dropout}(x)\big),
           \qquad A \in \mathbb{R}^{r \times in_{max}},\; B \in \mathbb{R}^{out_{max} \times r}

`A` and `B` are drawn, as PEFT draws them (Kaiming-uniform from a CPU `torch.Generator`
seeded with ``projection_prng_key``, A first), at the largest in/out width of the delta's
sites, and each site uses their top-left slices. Only :math:`\lambda_b` (``[out]``, zeros at
init: identity) and :math:`\lambda_d` (``[r]``, ``d_initial``) are learned and stored; the
projections are regenerated from the seed and ``projection_shape`` (``[out_max, in_max]``,
recorded at injection). One pair per delta (per device and dtype) lives in non-persistent
buffers shared by its adapters: out of ``state_dict``, following ``.to()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import ConfigError
from surgery.methods.base import (
    PEFT_PREFIX,
    Adapter,
    Merge,
    Method,
    MethodConfig,
    PeftContext,
    SiteView,
    WeightUpdate,
    register,
)
from surgery.methods.lora import adapter_dtype, is_conv1d_transformers

PEFT_A, PEFT_B = "base_model.vera_A", "base_model.vera_B"  # PEFT's keys of the saved projections


@dataclass
class VeRAConfig(MethodConfig):
    """Attributes:
    r: rank of the shared projections (PEFT's default 256: VeRA wants far higher ranks than LoRA).
    projection_prng_key: seed of the generator that draws A and B (PEFT's projection_prng_key).
    d_initial: initial value of every lambda_d entry (lambda_b starts at zero).
    dropout: dropout on the VeRA branch's input, in training only (PEFT's vera_dropout).
    save_projection: whether A and B are written to PEFT's adapter file (a Delta never stores them).
    init_weights: PEFT's flag; False starts lambda_b at one and lambda_d ~ N(0, 1) (not identity).
    projection_shape: [out_max, in_max] of the projections; recorded at injection from the sites
        (leave it None).
    """

    r: int = 256
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0
    save_projection: bool = True
    init_weights: bool = True
    projection_shape: list[int] | None = None


def projections(key: int, r: int, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_init_vera_A_vera_B`: A [r, in_max] then B [out_max, r], float32 on CPU."""
    out_max, in_max = shape
    g = torch.Generator(device="cpu").manual_seed(key)
    A, B = torch.empty(r, in_max, dtype=torch.float32), torch.empty(out_max, r, dtype=torch.float32)
    for t in (A, B):  # Kaiming-uniform, fan_in = size(1), gain sqrt(2)
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(t.shape[1])
        t.uniform_(-bound, bound, generator=g)
    return A, B


class Projections(nn.Module):
    """The frozen A and B one delta's adapters share (buffers: `.to()` moves them, state_dict skips them)."""

    vera_A: torch.Tensor
    vera_B: torch.Tensor

    def __init__(self, key: int, r: int, shape: list[int], like: torch.Tensor) -> None:
        super().__init__()
        self.key, self.shape = key, list(shape)
        A, B = projections(key, r, shape)
        self.register_buffer("vera_A", A.to(like.device, like.dtype), persistent=False)
        self.register_buffer("vera_B", B.to(like.device, like.dtype), persistent=False)

    @torch.no_grad()
    def reseed(self, key: int) -> None:
        A, B = projections(key, self.vera_A.shape[0], self.shape)
        self.vera_A.copy_(A)
        self.vera_B.copy_(B)
        self.key = key

    def extra_repr(self) -> str:
        return f"r={self.vera_A.shape[0]}, shape={self.shape}, key={self.key}"


class VeRALinear(Adapter):
    """VeRA on `nn.Linear` or transformers' `Conv1D` (same forward; the merge transposes for Conv1D)."""

    projections: Projections  # set by VeRA.attached

    def __init__(self, site: SiteView, cfg: VeRAConfig) -> None:
        super().__init__()
        w = cast(torch.Tensor, site.weight)
        self.in_f, self.out_f = cast(int, site.in_features), cast(int, site.out_features)
        self.fan_in_fan_out = site.kind == "conv1d_tf"
        self.key, self.r, self.shape, self.p = cfg.projection_prng_key, cfg.r, cfg.projection_shape, cfg.dropout
        kw: dict[str, Any] = {"device": w.device, "dtype": adapter_dtype(w)}
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_f, **kw))
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), **kw))
        if not cfg.init_weights and not w.is_meta:  # PEFT's update_layer without reset_vera_parameters
            with torch.no_grad():
                self.vera_lambda_b.fill_(1.0)
                self.vera_lambda_d.copy_(torch.randn(cfg.r))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def extra_repr(self) -> str:
        return f"in={self.in_f}, out={self.out_f}, r={self.r}, dropout={self.p:g}"

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projections.vera_A[:, : self.in_f], self.projections.vera_B[: self.out_f, :]

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        A, B = self._slices()
        lam_b, lam_d = self.vera_lambda_b, self.vera_lambda_d
        x = x.to(lam_d.dtype)
        if self.p and self.training:
            x = F.dropout(x, self.p, training=True)
        # PEFT's order of operations, so fp32 outputs agree with its to the last bits
        return out + (lam_b * F.linear(lam_d * F.linear(x, A), B)).to(out.dtype)

    def merge(self, site: SiteView) -> Merge:
        A, B = self._slices()
        left, right = self.vera_lambda_b[:, None] * B, self.vera_lambda_d[:, None] * A  # delta = left @ right
        return {"weight": WeightUpdate((right.t(), left.t()) if self.fan_in_fan_out else (left, right))}


def _rank_ok(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):  # also a 4-bit one, whose packed weight has another shape
        return module.out_features, module.in_features
    w = cast(torch.Tensor, module.weight)
    return (int(w.shape[1]), int(w.shape[0])) if is_conv1d_transformers(module) else (int(w.shape[0]), int(w.shape[1]))


def _max_shape(modules: list[nn.Module]) -> list[int]:
    """[out_max, in_max] over the sites, as PEFT's `_find_dim`."""
    shapes = [_widths(m) for m in modules]
    return [max(o for o, _ in shapes), max(i for _, i in shapes)]


@register
class VeRA(Method):
    name = "vera"
    Config = VeRAConfig
    default_targets = ["@q", "@v", "@qkv"]  # PEFT's VeRA defaults: q and v (GPT-2's fused c_attn)
    tensor_suffixes = ("vera_lambda_b", "vera_lambda_d")
    peft_type = "VERA"

    def validate(self, cfg: VeRAConfig) -> None:
        if not _rank_ok(cfg.r):
            raise ConfigError(f"vera: r must be a positive integer, got {cfg.r!r}")
        k = cfg.projection_prng_key
        if not (isinstance(k, int) and not isinstance(k, bool) and -(2**63) <= k < 2**64):
            raise ConfigError(f"vera: projection_prng_key must be an integer seed (a 64-bit value), got {k!r}")
        d = cfg.d_initial
        if not (isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d)):
            raise ConfigError(f"vera: d_initial must be a finite number, got {d!r}")
        if not (isinstance(cfg.dropout, (int, float)) and not isinstance(cfg.dropout, bool) and 0 <= cfg.dropout < 1):
            raise ConfigError(f"vera: dropout must be in [0, 1), got {cfg.dropout!r}")
        for flag in ("save_projection", "init_weights"):
            if not isinstance(getattr(cfg, flag), bool):
                raise ConfigError(f"vera: {flag} must be True or False, got {getattr(cfg, flag)!r}")
        s = cfg.projection_shape
        if s is not None and not (isinstance(s, (list, tuple)) and len(s) == 2 and all(_rank_ok(v) for v in s)):
            raise ConfigError(
                f"vera: projection_shape must be [out_max, in_max] (two positive integers) or None, got {s!r}; "
                "it is recorded at injection: leave it unset"
            )

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_conv1d_transformers(module)

    def place(self, model: nn.Module, hits: list[tuple[str, nn.Module]], cfg: Any) -> list[tuple[str, nn.Module]]:
        sites = super().place(model, hits, cfg)
        if sites and cfg is not None:  # the projections' size is the sites' largest (PEFT's _find_dim): record it
            shape = _max_shape([m for _, m in sites])
            if cfg.projection_shape is not None and list(cfg.projection_shape) != shape:
                raise ConfigError(
                    f"vera: projection_shape={list(cfg.projection_shape)} but these sites need {shape} "
                    "([out_max, in_max], as PEFT sizes them); leave projection_shape unset"
                )
            cfg.projection_shape = shape
        return sites

    def make(self, site: SiteView, cfg: VeRAConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        if cfg.projection_shape is not None:  # a stored delta: the sites must fit in its projections
            out_max, in_max = cfg.projection_shape
            if site.out_features > out_max or site.in_features > in_max:  # type: ignore[operator]
                raise ConfigError(
                    f"vera: site {site.path!r} ({site.out_features}x{site.in_features}) does not fit the "
                    f"delta's projections {out_max}x{in_max} (projection_shape)"
                )
        return VeRALinear(site, cfg)

    def attached(self, adapters: dict[str, Adapter]) -> None:
        # one A/B pair per delta (per device and dtype), referenced by every adapter
        ads = [cast(VeRALinear, a) for a in adapters.values()]
        shape = next((a.shape for a in ads if a.shape is not None), None)
        if shape is None:
            shape = [max(a.out_f for a in ads), max(a.in_f for a in ads)]
        shared: dict[tuple, Projections] = {}
        for a in ads:
            like = a.vera_lambda_d
            where = (like.device, like.dtype)
            if where not in shared:
                shared[where] = Projections(a.key, a.r, list(shape), like)
            a.projections = shared[where]

    def refresh(self, adapter: Adapter, path: str, cfg: VeRAConfig) -> None:
        ad = cast(VeRALinear, adapter)
        ad.p = cfg.dropout
        if ad.projections.key != cfg.projection_prng_key:  # shared: the first site's refresh reseeds all
            ad.projections.reseed(cfg.projection_prng_key)
        ad.key = cfg.projection_prng_key

    # ---- PEFT's layout
    def _model_shape(self, ctx: PeftContext, paths: list[str]) -> list[int] | None:
        if ctx.model is None:
            return None
        try:
            mods = [ctx.model.get_submodule(p) for p in paths]
        except AttributeError:
            return None  # the registry names the missing module
        return _max_shape(mods) if all(self.supports(m) for m in mods) else None

    def to_peft(
        self, config: dict[str, Any], sites: dict[str, dict[str, torch.Tensor]], ctx: PeftContext
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        paths = list(sites)
        recorded, found = config.get("projection_shape"), self._model_shape(ctx, paths)
        if recorded is not None and found is not None and list(recorded) != found:
            raise ConfigError(
                f"projection_shape {list(recorded)} differs from {found}, what PEFT derives from these sites "
                "in this model: PEFT would build other projections"
            )
        shape = found or (list(recorded) if recorded is not None else None)
        fields = {
            "r": config["r"],
            "target_modules": ctx.target_modules(paths),
            "projection_prng_key": config["projection_prng_key"],
            "save_projection": config["save_projection"],
            "vera_dropout": config["dropout"],
            "d_initial": config["d_initial"],
            "fan_in_fan_out": any(ctx.kinds.get(p) == "conv1d_tf" for p in paths),
            "bias": "none",
            "modules_to_save": None,
            "init_weights": config["init_weights"],
            "layers_to_transform": None,
            "layers_pattern": None,
        }
        tensors = {PEFT_PREFIX + f"{p}.{suf}": t for p, ts in sites.items() for suf, t in ts.items()}
        if config["save_projection"]:
            if shape is None:
                raise ConfigError(
                    "save_projection=True needs the projections' shape, and this delta does not record it: "
                    "pass the model it was trained on (model=...)"
                )
            tensors[PEFT_A], tensors[PEFT_B] = projections(config["projection_prng_key"], config["r"], shape)
        return fields, tensors

    _PEFT_IGNORED = frozenset(
        {
            "peft_type",
            "task_type",
            "auto_mapping",
            "peft_version",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "target_modules",  # the tensors name the sites
            "layers_to_transform",
            "layers_pattern",
            "fan_in_fan_out",  # PEFT sets it per module from its type, as the site kind does here
            "r",
            "projection_prng_key",
            "save_projection",
            "vera_dropout",
            "d_initial",
            "init_weights",
            "bias",
        }
    )

    def from_peft(
        self, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: PeftContext
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        c = peft_config
        if c.get("bias", "none") not in ("none", None):
            raise ConfigError(f"field bias={c['bias']!r}: trained biases of the base layers are not part of a delta")
        for f, v in c.items():
            if f not in self._PEFT_IGNORED and v not in (None, False, 0, "", [], {}):
                raise ConfigError(f"field {f}={v!r} is not supported by model-surgery's VeRA, so it cannot be read")
        config = {
            "r": c.get("r", 256),
            "projection_prng_key": c.get("projection_prng_key", 0),
            "d_initial": c.get("d_initial", 0.1),
            "dropout": float(c.get("vera_dropout") or 0.0),
            "save_projection": bool(c.get("save_projection", True)),
            "init_weights": bool(c.get("init_weights", True)),
        }
        self.validate(VeRAConfig(**config))  # names the bad value
        r, key = config["r"], config["projection_prng_key"]
        ours: dict[str, torch.Tensor] = {}
        for k, t in tensors.items():
            if k in (PEFT_A, PEFT_B):
                continue
            path, _, suf = k[len(PEFT_PREFIX) :].rpartition(".")
            if not k.startswith(PEFT_PREFIX) or suf not in self.tensor_suffixes or t.dim() != 1:
                raise ConfigError(f"tensor {k!r} is not a VeRA lambda vector (vera_lambda_b / vera_lambda_d)")
            if suf == "vera_lambda_d" and t.shape[0] != r:
                raise ConfigError(f"tensor {k!r} has {t.shape[0]} entries but r={r}")
            ours[f"{path}.{suf}"] = t
        paths = sorted({k.rpartition(".")[0] for k in ours})
        for p in paths:
            if f"{p}.vera_lambda_b" not in ours or f"{p}.vera_lambda_d" not in ours:
                raise ConfigError(f"site {p!r} lacks vera_lambda_b or vera_lambda_d")
        shape = self._model_shape(ctx, paths)
        if (PEFT_A in tensors) != (PEFT_B in tensors):
            raise ConfigError(f"the file holds only one of {PEFT_A} and {PEFT_B}")
        if PEFT_A in tensors:  # we regenerate them from the seed: they must be exactly those
            A, B = tensors[PEFT_A], tensors[PEFT_B]
            saved = [int(B.shape[0]), int(A.shape[1])] if A.dim() == 2 and B.dim() == 2 else None
            want = shape or saved
            if saved is None or A.shape[0] != r or B.shape[1] != r or saved != want:
                raise ConfigError(
                    f"{PEFT_A} {tuple(A.shape)} / {PEFT_B} {tuple(B.shape)} are not the [r, in_max] / "
                    f"[out_max, r] projections (r={r}, [out_max, in_max]={want}) of these sites"
                )
            A0, B0 = projections(key, r, saved)
            # PEFT draws in float32 and casts with the model: compare in the file's dtype
            if not (torch.equal(A, A0.to(A.dtype)) and torch.equal(B, B0.to(B.dtype))):
                raise ConfigError(
                    f"{PEFT_A} / {PEFT_B} differ from the projections projection_prng_key={key} draws, and "
                    "model-surgery regenerates them from the seed (never stores them): this adapter cannot be read"
                )
            shape = saved
        if shape is not None and any(ours[f"{p}.vera_lambda_b"].shape[0] > shape[0] for p in paths):
            raise ConfigError(f"a vera_lambda_b is longer than the projections' {shape[0]} rows")
        return {**config, "projection_shape": shape}, ours
