r"""(IA)^3 (Liu et al., 2022): learned vectors that rescale activations, as PEFT's IA3.

At a key / value site (any site not feed-forward) the output is scaled,
:math:`y = l \odot (W x + b)`; at a feed-forward site the input is,
:math:`y = W (l \odot x) + b`. The vectors start at ones (the model is unchanged at
injection). Each is stored as PEFT stores it, ``{site}.ia3_l``: ``[out, 1]`` (output)
or ``[1, in]`` (input) for linear and GPT-2 ``Conv1D`` sites, ``[1, C, 1, 1(, 1)]`` for
``Conv2d`` / ``Conv3d``. Merging scales W's rows (and the bias) or its columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from surgery.errors import ConfigError, SelectorError
from surgery.methods.base import (
    PEFT_PREFIX,
    Action,
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
from surgery.selectors import MatchContext, path_matches, sel, select


@dataclass
class IA3Config(MethodConfig):
    """Attributes:
    feedforward: which targeted sites scale their input instead of their output (PEFT's
        feedforward_modules): None = those whose role is mlp.down (down_proj, fc2, GPT-2's
        mlp.c_proj, T5's wo); else a selector string or list of them (globs such as PEFT's
        module names, 're:', '@role'); [] = none. It must hit only targeted sites.
    init: True: the vectors start at ones (identity); False: standard normal (PEFT's
        init_ia3_weights=False).
    """

    feedforward: str | list[str] | None = None
    init: bool = True


class _IA3(Adapter):
    ia3_l: nn.Parameter

    def __init__(self, shape: tuple[int, ...], like: torch.Tensor, init: bool) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": like.device, "dtype": adapter_dtype(like)}
        self.ia3_l = nn.Parameter(torch.ones(shape, **kw) if init else torch.randn(shape, **kw))

    def extra_repr(self) -> str:
        return f"ia3_l={tuple(self.ia3_l.shape)}"

    def scale(self) -> torch.Tensor:
        """The vector shaped to broadcast over the channel dim: last for linear, 1 for conv
        (batched or not)."""
        t = self.ia3_l
        return t.flatten() if t.dim() == 2 else t.flatten().view(-1, *(1,) * (t.dim() - 2))


class IA3Output(_IA3):
    """Scales the site's output (key / value sites): ia3_l [out, 1], conv [1, out, 1, ...]."""

    action = Action.OUTPUT

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        s = self.scale()
        if inplace and not (torch.is_grad_enabled() and (out.requires_grad or s.requires_grad)):
            # one kernel, no temporary: computed in the promoted dtype (fp32 vectors on a bf16 base,
            # as PEFT does) and stored in out's
            return out.mul_(s)
        return (out * s).to(out.dtype)

    def merge(self, site: SiteView) -> Merge:
        vec = self.ia3_l.flatten()
        # the output channels are W's rows, or its columns for Conv1D's [in, out]; PEFT scales the bias too
        w = WeightUpdate(cols=vec) if site.kind == "conv1d_tf" else WeightUpdate(rows=vec)
        return {"weight": w, "bias": WeightUpdate(rows=vec)} if site.bias is not None else {"weight": w}


class IA3Input(_IA3):
    """Scales the site's input (feed-forward sites): ia3_l [1, in], conv [1, in, 1, ...]."""

    action = Action.INPUT

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale()
        if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
            return torch.mul(x, s, out=torch.empty_like(x))  # one kernel, the same numbers as below
        return (x.to(s.dtype) * s).to(x.dtype)

    def merge(self, site: SiteView) -> Merge:
        vec = self.ia3_l.flatten()
        if site.kind == "conv1d_tf":
            return {"weight": WeightUpdate(rows=vec)}
        groups = int(getattr(site.module, "groups", 1))
        if groups == 1:
            return {"weight": WeightUpdate(cols=vec)}
        # grouped conv: each output channel sees its group's slice of the input channels
        w = cast(torch.Tensor, site.weight)
        out_ch, ipg = w.shape[0], w.shape[1]
        s = vec.view(groups, 1, ipg).expand(groups, out_ch // groups, ipg).reshape(out_ch, ipg, *(1,) * (w.dim() - 2))
        return {"weight": WeightUpdate(delta=w.detach() * (s.to(w.dtype) - 1))}


def _patterns(ff: str | list[str]) -> list[str]:
    return [ff] if isinstance(ff, str) else list(ff)


@register
class IA3(Method):
    name = "ia3"
    Config = IA3Config
    # keys, values (GPT-2's fused c_attn: all of it, as PEFT) and the FFN's down projection
    default_targets = ["@k", "@v", "@qkv", "@mlp.down"]
    tensor_suffixes = ("ia3_l",)
    peft_type = "IA3"

    def validate(self, cfg: IA3Config) -> None:
        ff = cfg.feedforward
        if ff is not None:
            pats = _patterns(ff) if isinstance(ff, (str, list, tuple)) else None
            if pats is None or not all(isinstance(p, str) and p.strip() for p in pats):
                raise ConfigError(
                    f"ia3: feedforward must be None, a selector string or a list of them "
                    f"(globs, 're:<regex>', '@role'), got {ff!r}"
                )
            if pats:
                try:
                    sel(pats)
                except SelectorError as e:
                    raise ConfigError(f"ia3: feedforward {ff!r}: {e}") from None
        if not isinstance(cfg.init, bool):
            raise ConfigError(f"ia3: init must be True (ones) or False (standard normal), got {cfg.init!r}")

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)) or is_conv1d_transformers(module)

    def place(self, model: nn.Module, hits: list[tuple[str, nn.Module]], cfg: IA3Config) -> list[tuple[str, nn.Module]]:
        sites = super().place(model, hits, cfg)
        if cfg.feedforward is None or not _patterns(cfg.feedforward):
            return sites
        # PEFT: feedforward_modules must be a subset of target_modules
        inside = {p for p, m in model.named_modules() if isinstance(m, Adapter)}
        skip = lambda p: any(p.startswith(a + ".") for a in inside)  # noqa: E731
        ff = {p for p, m in select(model, _patterns(cfg.feedforward), skip=skip) if self.supports(m)}
        targeted = {p for p, _ in sites}
        if ff - targeted:
            raise ConfigError(
                f"ia3: feedforward {cfg.feedforward!r} hits {sorted(ff - targeted)[:4]}, which are not among "
                "the targeted sites; feed-forward sites must be a subset of the targets (add them to targets=)"
            )
        if not ff:
            raise ConfigError(
                f"ia3: feedforward {cfg.feedforward!r} hits none of the targeted sites; "
                "pass feedforward=[] for none, or None for the sites with role mlp.down"
            )
        return sites

    @staticmethod
    def is_feedforward(site: SiteView, cfg: IA3Config) -> bool:
        if cfg.feedforward is None:
            return "mlp.down" in site.roles
        pats = _patterns(cfg.feedforward)
        return bool(pats) and sel(pats).match(site.path, site.module, MatchContext(site.model))

    def make(self, site: SiteView, cfg: IA3Config, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        ff, w = self.is_feedforward(site, cfg), site.weight
        if w is None or site.kind not in ("linear", "conv1d_tf", "conv"):
            raise ConfigError(f"ia3: site {site.path!r} ({type(site.module).__name__}) is not a linear or conv layer")
        n = cast(int, site.in_features if ff else site.out_features)
        if site.kind == "conv":
            shape: tuple[int, ...] = (1, n, *(1,) * (w.dim() - 2))
        else:
            shape = (1, n) if ff else (n, 1)
        return (IA3Input if ff else IA3Output)(shape, w, cfg.init)

    # ------------------------------------------------------------------ PEFT's layout

    def _ff_of(self, path: str, t: torch.Tensor, cfg: IA3Config, ctx: PeftContext) -> bool:
        if t.dim() == 2 and t.shape[0] != t.shape[1]:  # [1, in] or [out, 1]
            return t.shape[0] == 1
        if ctx.model is not None:
            return self.is_feedforward(SiteView(ctx.model, path, ctx.model.get_submodule(path)), cfg)
        pats = None if cfg.feedforward is None else _patterns(cfg.feedforward)
        if pats is None or any(p.startswith("@") for p in pats):
            raise ConfigError(
                f"ia3: whether {path!r} is feed-forward follows from the model's roles; pass model= to write it"
            )
        return any(path_matches(p, path) for p in pats)

    def to_peft(
        self, config: dict[str, Any], sites: dict[str, dict[str, torch.Tensor]], ctx: PeftContext
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg = IA3Config(**config)
        paths = list(sites)
        ff = [p for p in paths if self._ff_of(p, sites[p]["ia3_l"], cfg, ctx)]
        ff_modules: list[str] | str = ctx.target_modules(ff) if ff else []
        # PEFT tests feedforward names with a bare `path.endswith(name)`: fall back to exact paths if that hits more
        if isinstance(ff_modules, list) and {p for p in paths if any(p.endswith(s) for s in ff_modules)} != set(ff):
            ff_modules = "^(?:" + "|".join(re.escape(p) for p in sorted(ff)) + ")$"
        fields = {
            "target_modules": ctx.target_modules(paths),
            "feedforward_modules": ff_modules,
            "exclude_modules": None,
            "fan_in_fan_out": any(ctx.kinds.get(p) == "conv1d_tf" for p in paths),
            "init_ia3_weights": cfg.init,
            "modules_to_save": None,
        }
        return fields, {f"{PEFT_PREFIX}{p}.ia3_l": sites[p]["ia3_l"] for p in paths}

    _PEFT_FIELDS = frozenset(
        (
            *("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"),
            *("inference_mode", "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out"),
            "init_ia3_weights",
        )
    )

    def from_peft(
        self, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: PeftContext
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if peft_config.get("modules_to_save"):
            raise ConfigError(
                f"PEFT field modules_to_save={peft_config['modules_to_save']!r}: fully trained module copies "
                "are not an IA3 delta"
            )
        for field, v in peft_config.items():
            if field not in self._PEFT_FIELDS and field != "modules_to_save" and v not in (None, False, 0, "", [], {}):
                raise ConfigError(
                    f"PEFT field {field}={v!r} is unknown to model-surgery's ia3: its effect cannot be reproduced"
                )
        spec = peft_config.get("feedforward_modules")
        ours: dict[str, torch.Tensor] = {}
        ff: list[str] = []
        for key, t in tensors.items():
            if not (key.startswith(PEFT_PREFIX) and key.endswith(".ia3_l")):
                raise ConfigError(f"PEFT tensor {key!r} is not an IA3 vector (base_model.model.<module>.ia3_l)")
            path = key[len(PEFT_PREFIX) : -len(".ia3_l")]
            row, col = t.dim() >= 2 and t.shape[0] == 1, t.dim() == 2 and t.shape[1] == 1
            if isinstance(spec, str):
                try:  # PEFT's rule: a string is a regex over the whole path, a list bare suffixes
                    is_ff = re.fullmatch(spec, path) is not None
                except re.error as e:
                    raise ConfigError(f"PEFT field feedforward_modules={spec!r} is not a valid regex: {e}") from None
            elif isinstance(spec, (list, tuple)):
                is_ff = any(path.endswith(s) for s in spec)
            elif spec is None and t.dim() == 2 and row != col:
                is_ff = row
            else:
                raise ConfigError(
                    f"PEFT field feedforward_modules={spec!r} cannot tell whether {path!r} is feed-forward"
                )
            if not (row if is_ff or t.dim() > 2 else col) or (t.dim() > 2 and set(t.shape[2:]) != {1}):
                raise ConfigError(
                    f"PEFT tensor {key!r} has shape {tuple(t.shape)}, which does not fit a "
                    f"{'feed-forward (input, [1, in])' if is_ff else 'output ([out, 1])'} IA3 vector "
                    "(field feedforward_modules)"
                )
            ours[f"{path}.ia3_l"] = t
            if is_ff:
                ff.append(path)
        if not ours:
            raise ConfigError("PEFT IA3 adapter holds no ia3_l tensors")
        init = peft_config.get("init_ia3_weights", True)
        config = {"feedforward": ["re:" + re.escape(p) for p in ff], "init": bool(init)}
        return config, ours
