r"""Prefix tuning (Li & Liang, 2021) and P-tuning v2 (Liu et al., 2022): learned keys and
values prepended at every attention layer.

At an attention layer with queries :math:`Q` (one head shown), keys :math:`K` and values :math:`V`
of the :math:`T` input positions (after RoPE, after the KV-cache update), a prefix adds :math:`P`
learned positions :math:`P_K, P_V \in \mathbb{R}^{P \times d}` in front:

.. math::  \mathrm{Attn}(Q, K, V) = \mathrm{softmax}\!\Big(\frac{Q\,[P_K; K]^\top}{\sqrt d} + [\,0 \;|\; M\,]\Big)\,[P_V; V]

where :math:`M` is the layer's own mask (causal, padding) and the :math:`P` columns are never
masked. The prefix has the layer's *key/value* heads (grouped-query attention: shared by the query
heads of a group as the layer's own keys are) and is not rotated: it acts like a KV cache of
:math:`P` tokens that every query sees, as PEFT's ``past_key_values`` prefix does. It is never
written to the KV cache but prepended at every call, so ``generate()``, padding and changing batch
sizes need nothing special.

With ``reparam="mlp"`` the keys and values come from a per-layer embedding through an MLP
(one per layer, unlike PEFT's shared one, so every site stays self-contained); `surgery.merge`
folds it into plain tensors. Sites are the self-attention modules (cross-attention is left out,
see `_is_cross`); ``layers=`` keeps some depths. `surgery.attention` says how the attention
call is reached; docs/prefix.md has the details (masks, cache, PEFT, stored tensors).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn

from surgery import attention, engine
from surgery.errors import ConfigError, GraphError, InjectionError, MergeError, SelectorError, SurgeryError
from surgery.methods.base import Action, Adapter, Merge, Method, MethodConfig, NotMergeable, SiteView, register
from surgery.selectors import MatchContext, Sel, layer_index, layers
from surgery.sublayers import in_width, is_block, out_width

_QKV = frozenset({"q", "k", "v", "qkv"})
_HEAD_ATTRS = ("num_heads", "heads", "n_heads", "n_head", "num_attention_heads")
_MLP = tuple(f"prefix_mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias"))


@dataclass
class PrefixConfig(MethodConfig):
    """Attributes:
    n_tokens: P, the positions (keys and values) added to every attention layer.
    reparam: "mlp": keys/values come from an embedding through an MLP (foldable by merge); None: direct.
    hidden: width of that MLP.
    layers: which depths get a prefix: "6:", an int, a range, a list, or a selector; None: all.
    init_std: keys/values (or the embedding, with reparam) start ~ N(0, init_std).
    """

    n_tokens: int = 20  # P: positions added to every attention layer
    reparam: str | None = None  # "mlp": keys/values from an embedding through an MLP (foldable by merge)
    hidden: int = 512  # width of that MLP
    layers: Any = None  # which depths: "6:", an int, a range, a list, or a selector; None: all
    init_std: float = 0.5  # keys/values (or the embedding, with reparam) start ~ N(0, init_std)


def _param_dtype(like: torch.Tensor) -> torch.dtype:
    return torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype


class PrefixKV(Adapter):
    """The learned positions of one attention layer (see the module docstring)."""

    action = Action.ATTENTION  # surgery.attention prepends its kv() at every attention call
    # set by PrefixTuning.make as plain references (not submodules), read by attached/detached
    surgery_model: nn.Module
    surgery_site: nn.Module
    surgery_kind: str
    surgery_rewrite: Callable[..., Any] | None

    def __init__(
        self,
        n_kv: int,
        p: int,
        d_k: int,
        d_v: int,
        d_in: int,
        reparam: str | None,
        hidden: int,
        init_std: float,
        like: torch.Tensor,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": like.device, "dtype": _param_dtype(like)}
        self.n_kv, self.p, self.d_k, self.d_v, self.reparam = n_kv, p, d_k, d_v, reparam
        if reparam is None:
            self.prefix_key = nn.Parameter(torch.empty(n_kv, p, d_k, **kw))
            self.prefix_value = nn.Parameter(torch.empty(n_kv, p, d_v, **kw))
            start: tuple[nn.Parameter, ...] = (self.prefix_key, self.prefix_value)
        else:
            self.prefix_embedding = nn.Parameter(torch.empty(p, d_in, **kw))
            self.prefix_mlp = nn.Sequential(
                nn.Linear(d_in, hidden, **kw), nn.Tanh(), nn.Linear(hidden, n_kv * (d_k + d_v), **kw)
            )
            start = (self.prefix_embedding,)
        if not like.is_meta:
            with torch.no_grad():
                for t in start:
                    t.normal_(0.0, init_std)
        self._trainable: list[bool] | None = None  # flags of the MLP form while folded

    def extra_repr(self) -> str:
        mlp = f", reparam=mlp(hidden={self.prefix_mlp[0].out_features})" if self.reparam else ""
        fold = ", merged" if self.folded else ""
        return f"n_tokens={self.p}, kv_heads={self.n_kv}, head_dim={self.d_k}{mlp}{fold}"

    # the engine's hook: the work happens inside the attention call, the output is left as it is
    def contribute(self, x: torch.Tensor, out: Any, inplace: bool = False) -> Any:
        site = cast(nn.Module, self.__dict__.get("surgery_site"))  # make sets it with the kind: never None here
        if self.__dict__.get("surgery_kind") == "interface" and not attention.interface_active(site):
            raise SurgeryError(
                f"the prefix at {type(site).__name__} did not run: the model's attention implementation was "
                f"switched to {attention.config_of(site)._attn_implementation!r} after it was injected. Switch back, or "
                "surgery.remove the prefix deltas, set the implementation, and apply them again"
            )
        return out

    @property
    def folded(self) -> bool:
        return "folded_key" in self._buffers

    def _from_mlp(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.prefix_mlp(self.prefix_embedding)  # [P, n_kv * (d_k + d_v)]
        k, v = out.split((self.n_kv * self.d_k, self.n_kv * self.d_v), dim=-1)
        return (
            k.reshape(self.p, self.n_kv, self.d_k).transpose(0, 1),
            v.reshape(self.p, self.n_kv, self.d_v).transpose(0, 1),
        )

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [n_kv, P, d_k] and values [n_kv, P, d_v]."""
        if self.reparam is None:
            return self.prefix_key, self.prefix_value
        b = self._buffers
        if "folded_key" in b:
            return b["folded_key"], b["folded_value"]  # type: ignore[return-value]
        return self._from_mlp()

    @torch.no_grad()
    def merge(self, site: SiteView) -> Merge | NotMergeable:
        if self.reparam is None:
            return NotMergeable(
                "its keys and values are plain tensors already (no reparameterisation to fold), and "
                "extra attention positions cannot be merged into the base weights"
            )
        return {}  # merge folds its MLP within its own tensors (PrefixTuning.fold): no base tensor changes

    def fold(self) -> None:
        k, v = self._from_mlp()
        self.register_buffer("folded_key", k.contiguous(), persistent=False)
        self.register_buffer("folded_value", v.contiguous(), persistent=False)
        params = [self.prefix_embedding, *self.prefix_mlp.parameters()]
        self._trainable = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)

    def unfold(self) -> None:
        del self._buffers["folded_key"], self._buffers["folded_value"]
        params = [self.prefix_embedding, *self.prefix_mlp.parameters()]
        for p, flag in zip(params, self._trainable or [True] * len(params), strict=False):
            p.requires_grad_(flag)
        self._trainable = None


def _prefixes(adapters: dict[str, Adapter]) -> list[PrefixKV]:
    """The adapters a PrefixTuning hook gets: all made by its `make`, so all PrefixKV."""
    return [cast(PrefixKV, a) for a in adapters.values()]


# names transformers gives cross-attention (keys and values from the encoder's output):
# T5's EncDecAttention, BART / Whisper / Marian's encoder_attn, BERT's crossattention, cross_attn
_CROSS_NAME = re.compile(r"cross|encdec|enc_dec|encoder_?att", re.IGNORECASE)


def _cross_flag(m: nn.Module) -> bool:
    return getattr(m, "is_cross_attention", False) is True or "crossattention" in type(m).__name__.lower()


def _is_cross(path: str, m: nn.Module, mods: dict[str, nn.Module]) -> bool:
    """Whether the attention module at `path` is a cross-attention: by its flag or class name
    (``is_cross_attention``, ``*CrossAttention``), or by the names of it and its ancestors inside
    its layer (the path after the last layer index: ``layer.1.EncDecAttention``, ``encoder_attn``,
    ``crossattention.self``)."""
    if _cross_flag(m):
        return True
    parts = path.split(".")
    start = max((i + 1 for i, seg in enumerate(parts) if seg.isdigit()), default=0)
    for i in range(len(parts), start, -1):
        anc = mods.get(".".join(parts[:i]))
        if _CROSS_NAME.search(parts[i - 1]) or anc is not None and _cross_flag(anc):
            return True
    return False


def _reach(module: nn.Module, path: str) -> tuple[str | None, list[str]]:
    """How to reach `module`'s attention call: ("interface" | "fx", []) or (None, what was tried)."""
    why: str | None = "its forward does not call ALL_ATTENTION_FUNCTIONS"
    if attention.calls_interface(module) and (why := attention.check_interface(module, path)) is None:
        return "interface", []
    graph, fx_why = attention.find_sdpa_calls(module)
    if graph is not None:
        return "fx", []
    return None, [
        f"transformers' attention interface: {why}",
        f"torch.fx rewrite of F.scaled_dot_product_attention: {fx_why}",
    ]


def _direct(m: nn.Module) -> bool:
    """Whether `m` itself makes an attention call we may reach (checked for real in `place`)."""
    return is_block(m) and (
        attention.calls_interface(m) or "scaled_dot_product_attention" in attention.forward_source(type(m))
    )


class _Attention(Sel):
    """The default targets: the modules that make attention calls themselves (transformers'
    attention modules, plain modules calling sdpa); in a model with none, the linears with
    roles @q @k @v @qkv (their parents are then checked, and refused with the reasons)."""

    uses_roles = True

    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        direct = ctx.__dict__.get("_prefix_direct")
        if direct is None:
            direct = ctx.__dict__["_prefix_direct"] = {p for p, m in ctx.model.named_modules() if p and _direct(m)}
        if direct:
            return path in direct
        return bool(ctx.roles().get(path, frozenset()) & _QKV)

    def __repr__(self) -> str:
        return "attention modules"


def _layer_sel(spec: Any) -> Sel:
    return spec if isinstance(spec, Sel) else layers(spec)


def _int_attr(obj: Any, names: tuple[str, ...]) -> int | None:
    return next((getattr(obj, a) for a in names if isinstance(getattr(obj, a, None), int)), None)


def _dims(module: nn.Module, path: str, model: nn.Module | None) -> tuple[int, int, int, int]:
    """(key/value heads, key head width, value head width, input width) of an attention module."""
    cfg = getattr(module, "config", None)
    heads = _int_attr(module, _HEAD_ATTRS)
    if heads is None and cfg is not None:
        heads = getattr(cfg, "num_attention_heads", None)
    d_in = in_width(module) or getattr(cfg, "hidden_size", None)
    if cfg is not None and heads:  # transformers
        d = _int_attr(module, ("head_dim", "attention_head_size", "head_size"))
        d = d or getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        groups = getattr(module, "num_key_value_groups", None)
        n_kv = (
            heads // groups
            if isinstance(groups, int) and groups > 0
            else (getattr(module, "num_key_value_heads", None) or getattr(cfg, "num_key_value_heads", None) or heads)
        )
        d_v = getattr(module, "v_head_dim", None) or d
        return int(n_kv), int(d), int(d_v), int(d_in or n_kv * d)
    # a plain module: head count from an attribute, widths from its q / k / v (or qkv) linears
    from surgery.graph import roles as graph_roles

    found: dict[str, int] = {}
    try:
        roles = graph_roles(model) if model is not None else {}
    except GraphError:
        roles = {}
    for name, child in module.named_children():
        w = out_width(child)
        if w is not None:
            for role in roles.get(f"{path}.{name}", frozenset()) & _QKV:
                found.setdefault(role, w)
    if "qkv" in found and not {"q", "k", "v"} <= found.keys():
        found = dict.fromkeys(("q", "k", "v"), found["qkv"] // 3)
    if heads is None or not {"q", "k", "v"} <= found.keys():
        raise InjectionError(
            f"prefix: cannot tell the head layout of {path!r} ({type(module).__name__}): it needs an integer "
            f"attribute {' / '.join(_HEAD_ATTRS)} and linears with roles @q @k @v (or @qkv) as children; "
            f"found heads={heads}, widths {found or 'none'}"
        )
    d = found["q"] // heads
    n_kv = found["k"] // d
    return n_kv, d, found["v"] // n_kv, int(d_in or found["q"])


@register
class PrefixTuning(Method):
    name = "prefix"
    identity_at_init = False
    Config = PrefixConfig
    tensor_suffixes = ("prefix_key", "prefix_value", "prefix_embedding", *_MLP)

    def targets(self, cfg: PrefixConfig | None) -> Any:
        return _Attention()

    def validate(self, cfg: PrefixConfig) -> None:
        if not (isinstance(cfg.n_tokens, int) and not isinstance(cfg.n_tokens, bool) and cfg.n_tokens > 0):
            raise ConfigError(f"prefix: n_tokens must be a positive integer, got {cfg.n_tokens!r}")
        if cfg.reparam not in (None, "mlp"):
            raise ConfigError(f"prefix: reparam must be None or 'mlp', got {cfg.reparam!r}")
        if not (isinstance(cfg.hidden, int) and not isinstance(cfg.hidden, bool) and cfg.hidden > 0):
            raise ConfigError(f"prefix: hidden (the MLP's width) must be a positive integer, got {cfg.hidden!r}")
        if not (isinstance(cfg.init_std, (int, float)) and not isinstance(cfg.init_std, bool) and cfg.init_std >= 0):
            raise ConfigError(f"prefix: init_std must be a number >= 0, got {cfg.init_std!r}")
        if cfg.layers is not None:
            try:
                _layer_sel(cfg.layers)
            except SelectorError as e:
                raise ConfigError(f"prefix: layers={cfg.layers!r}: {e}") from None

    def supports(self, module: nn.Module) -> bool:
        return is_block(module) and _reach(module, "")[0] is not None

    def place(self, model: nn.Module, hits: list[tuple[str, nn.Module]], cfg: PrefixConfig) -> list:
        from surgery.graph import roles as graph_roles

        mods = dict(model.named_modules())
        found: dict[str, nn.Module] = {}
        roles: dict[str, frozenset[str]] | None = None
        for path, mod in hits:
            if not is_block(mod):
                if roles is None:
                    try:
                        roles = graph_roles(model)
                    except GraphError as e:
                        raise InjectionError(
                            f"prefix: cannot find the attention modules of {type(model).__name__}: {e}"
                        ) from None
                if roles.get(path, frozenset()) & _QKV and "." in path:
                    parent = path.rpartition(".")[0]
                    found.setdefault(parent, mods[parent])
            elif _direct(mod):
                found.setdefault(path, mod)
        cross = [p for p, m in found.items() if _is_cross(p, m, mods)]
        found = {p: m for p, m in found.items() if p not in cross}
        if cross and not found:
            raise InjectionError(
                f"prefix: the attention modules hit are cross-attention ({', '.join(cross[:3])}"
                f"{', ...' if len(cross) > 3 else ''}): their keys and values come from the encoder's output, "
                "and a prefix attaches to self-attention only; point targets at self-attention modules, or "
                "leave targets= out"
            )
        if not found:
            shown = ", ".join(p for p, _ in hits[:6])
            raise InjectionError(
                f"prefix: found no attention module in what the selector hit ({shown}{', ...' if len(hits) > 6 else ''}): "
                "no linear there feeds an attention op as query, key or value (roles @q @k @v @qkv); "
                "leave targets= out to use every attention layer"
            )
        if cfg.layers is not None:
            s, ctx = _layer_sel(cfg.layers), MatchContext(model)
            kept = {p: m for p, m in found.items() if s.match(p, m, ctx)}
            if not kept:
                have = sorted({i for i in map(layer_index, found) if i is not None})
                raise SelectorError(
                    f"prefix: layers={cfg.layers!r} keeps none of the attention layers; the model's "
                    f"attention layers are at depths {have[0]}..{have[-1]}"
                    if have
                    else f"prefix: layers={cfg.layers!r} keeps none of the attention modules {sorted(found)}"
                )
            found = kept
        bad = [(p, m, tried) for p, m in found.items() for kind, tried in [_reach(m, p)] if kind is None]
        if bad:
            p, m, tried = bad[0]
            mods_found = ", ".join(f"{q} ({type(n).__name__})" for q, n in list(found.items())[:4])
            more = f" and {len(bad) - 1} more alike" if len(bad) > 1 else ""
            raise InjectionError(
                f"prefix: cannot reach the attention call of {len(bad)} of the attention modules found "
                f"[{mods_found}{', ...' if len(found) > 4 else ''}]. Tried, for {p!r} ({type(m).__name__}){more}: "
                + "; ".join(tried)
                + ". Prefix tuning needs a transformers model on 'sdpa' or 'eager' "
                "attention, or a module calling F.scaled_dot_product_attention in a forward torch.fx can trace"
            )
        return list(found.items())

    def make(self, site: SiteView, cfg: PrefixConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        module, path, model = site.module, site.path, site.model
        if model is None:
            raise ConfigError("prefix: needs the model (make(..., model=model)) to read its active deltas")
        kind, tried = _reach(module, path)
        rewrite = None
        if kind is None:
            raise InjectionError(
                f"prefix: cannot reach the attention call of {path!r} ({type(module).__name__}): " + "; ".join(tried)
            )
        if kind == "fx" and not getattr(module.__dict__.get("forward"), "__surgery_rewrite__", False):
            if "forward" in module.__dict__:
                raise InjectionError(
                    f"prefix: {path!r} has a forward patched on the instance by something "
                    "else; its attention cannot be rewritten"
                )
            try:
                rewrite = attention.rewrite_sdpa(module, path)
            except SurgeryError as e:
                raise InjectionError(f"prefix: {e}") from None
        n_kv, d_k, d_v, d_in = _dims(module, path, model)
        p, hidden = cfg.n_tokens, cfg.hidden
        if shapes:
            if "prefix_key" in shapes:
                p = int(shapes["prefix_key"][1])
            if "prefix_embedding" in shapes:
                p, d_in = int(shapes["prefix_embedding"][0]), int(shapes["prefix_embedding"][1])
            if "prefix_mlp.0.weight" in shapes:
                hidden = int(shapes["prefix_mlp.0.weight"][0])
        like = next((t for t in module.parameters() if t.is_floating_point()), torch.empty(0))
        ad = PrefixKV(n_kv, p, d_k, d_v, d_in, cfg.reparam, hidden, float(cfg.init_std), like)
        # plain references, not submodules
        ad.__dict__.update(surgery_model=model, surgery_site=module, surgery_kind=kind, surgery_rewrite=rewrite)
        return ad

    def attached(self, adapters: dict[str, Adapter]) -> None:
        ads = _prefixes(adapters)
        attention.install_interface([ad.surgery_site for ad in ads if ad.surgery_kind == "interface"])
        for ad in ads:
            if ad.surgery_kind == "fx" and ad.surgery_rewrite is not None:
                attention.install_forward(ad.surgery_site, ad.surgery_rewrite)

    def detached(self, adapters: dict[str, Adapter]) -> None:
        if not adapters:
            return
        ads = _prefixes(adapters)
        still = [cast(PrefixKV, a) for a in engine.with_action(ads[0].surgery_model, Action.ATTENTION)]
        configs = {id(attention.config_of(a.surgery_site)) for a in still if a.surgery_kind == "interface"}
        sites = {id(a.surgery_site) for a in still}
        gone = [
            ad.surgery_site
            for ad in ads
            if ad.surgery_kind == "interface" and id(attention.config_of(ad.surgery_site)) not in configs
        ]
        attention.uninstall_interface(gone)
        for ad in ads:
            if ad.surgery_kind == "fx" and id(ad.surgery_site) not in sites:
                attention.uninstall_forward(ad.surgery_site)

    # merge folds the reparameterisation: the base weights are never touched
    def fold(self, adapters: dict[str, Adapter]) -> bool:
        ads = _prefixes(adapters)
        if ads and ads[0].reparam is None:
            raise MergeError(
                "prefix: this prefix has no reparameterisation to fold (its keys and values are plain "
                "tensors already), and extra attention positions cannot be merged into the base weights; "
                "keep it as it is (it costs P extra key/value positions per layer)"
            )
        if any(a.folded for a in ads):
            raise MergeError("prefix: its MLP is already folded (merged); surgery.unmerge(model, name) first")
        for a in ads:
            a.fold()
        return True

    def unfold(self, adapters: dict[str, Adapter]) -> bool:
        ads = [a for a in _prefixes(adapters) if a.folded]
        if not ads:
            raise MergeError("prefix: not merged (its MLP is not folded); nothing to unmerge")
        for a in ads:
            a.unfold()
        return True

    def folded(self, adapters: dict[str, Adapter]) -> bool:
        return any(a.folded for a in _prefixes(adapters))

    def config_dict(self, cfg: PrefixConfig) -> dict[str, Any]:
        out = asdict(cfg)
        out["layers"] = _layers_json(out["layers"])
        return out


def _layers_json(spec: Any) -> Any:
    """`layers=` as JSON. A selector is not: its layer range if it has a plain one, else None
    (the sites it chose travel with the tensors)."""
    if isinstance(spec, range):
        return f"{spec.start}:{'' if spec.stop >= 1 << 30 else spec.stop}" if spec.step == 1 else list(spec)
    if isinstance(spec, (set, frozenset, tuple)):
        return sorted(spec)
    if spec is None or isinstance(spec, (str, int, list)):
        return spec
    rng = getattr(spec, "rng", None)
    plain = isinstance(rng, (set, frozenset)) or isinstance(rng, range) and rng.step == 1
    return _layers_json(rng) if plain else None


__all__ = ["PrefixConfig", "PrefixKV", "PrefixTuning"]
