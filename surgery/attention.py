r"""Reaching a model's attention: extra key/value positions at every attention call.

Methods that add positions to attention (prefix tuning) need the keys and values *inside* each
attention call, after RoPE and after the KV-cache update. Two ways in, chosen per attention module
(details, masks and the KV cache: docs/prefix.md):

* ``transformers`` 5.x models call ``ALL_ATTENTION_FUNCTIONS.get_interface(...)``:
  `install_interface` registers ``"surgery_<impl>"`` (with the mask function of ``<impl>``) and
  points the configs the attention modules read at it; the wrapper prepends the active positions
  and ``P`` always-visible mask columns, then calls the original function.
* plain modules calling ``F.scaled_dot_product_attention`` in their own ``forward``: `rewrite_sdpa`
  traces that forward with `torch.fx` and routes each sdpa call through
  `prefixed_scaled_dot_product_attention`; the result is installed as the instance's ``forward``.

The active positions are read from the engine's context-local active set on every call.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgery.engine.runtime import active_at
from surgery.engine.state import CHILD
from surgery.errors import SurgeryError
from surgery.methods.base import Action

__all__ = [
    "SUPPORTED",
    "active_kv",
    "calls_interface",
    "extend_mask",
    "find_sdpa_calls",
    "install_interface",
    "prefixed_scaled_dot_product_attention",
    "rewrite_sdpa",
    "uninstall_interface",
]

WRAP = "surgery_"
SUPPORTED = ("sdpa", "eager")  # implementations the wrapper can extend (others: flash, flex, paged)


# ----------------------------------------------------------------------------- active positions


def config_of(module: nn.Module) -> Any:
    """A transformers module's ``config`` (a PretrainedConfig, read dynamically: nn.Module's
    ``__getattr__`` would type it as Tensor | Module)."""
    return module.config


def active_kv(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The keys and values ``[n_kv, P, d]`` active at `module` in this context, or None: from
    the adapters there that declare `Action.ATTENTION` and give them with ``kv()``."""
    return adapters_kv(module._modules.get(CHILD))


def adapters_kv(holder: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`active_kv` for the adapters one site holds (its ``surgery`` child)."""
    kvs = [cast(Any, ad).kv() for ad in active_at(holder, Action.ATTENTION)]
    if len(kvs) <= 1:
        return kvs[0] if kvs else None
    ks, vs = zip(*kvs, strict=True)
    return torch.cat(ks, dim=1), torch.cat(vs, dim=1)


def _prepend(
    pk: torch.Tensor, pv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """key, value [batch, heads, seq, d] with the prefix [heads, P, d] in front of seq."""
    b = key.shape[0]
    pk, pv = pk.to(key)[None].expand(b, -1, -1, -1), pv.to(value)[None].expand(b, -1, -1, -1)
    try:
        return torch.cat((pk, key), 2), torch.cat((pv, value), 2)
    except RuntimeError:
        if key.dim() != 4 or value.dim() != 4:
            raise SurgeryError(
                f"{where}: keys of shape {tuple(key.shape)}; extra positions need [batch, heads, seq, dim]"
            ) from None
        raise SurgeryError(
            f"{where}: the prefix has {pk.shape[1]} key/value heads of width {pk.shape[3]}/{pv.shape[3]}, but "
            f"the attention's keys are {key.shape[1]} heads of width {key.shape[3]} (values {value.shape[3]}); "
            "the delta was made for another attention layout"
        ) from None


def extend_mask(
    mask: torch.Tensor | None, p: int, q_len: int, kv_len: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """The attention mask with `p` always-visible key columns in front.

    `mask` None: None unless `causal` (sdpa's flag, top-left aligned) with more than one
    query, when an explicit boolean mask is built."""
    if mask is None:
        if not causal:
            return None
        main = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
        return torch.cat((torch.ones(q_len, p, dtype=torch.bool, device=device), main), dim=1)[None, None]
    # visible: True in a boolean mask, 0 in an additive one
    pre = torch.full((*mask.shape[:-1], p), mask.dtype == torch.bool, dtype=mask.dtype, device=mask.device)
    return torch.cat((pre, mask), dim=-1)


# ----------------------------------------------------------------------------- transformers


_EAGER: dict[type, Callable[..., Any]] = {}


def _eager_of(cls: type) -> Callable[..., Any]:
    if cls not in _EAGER:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is None:
            raise SurgeryError(
                f"{cls.__name__}: its module {cls.__module__} defines no eager_attention_forward to fall back "
                "to; load the model with attn_implementation='sdpa'"
            )
        _EAGER[cls] = fn
    return _EAGER[cls]


@functools.cache
def _functions() -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


def _wrapper(impl: str) -> Callable[..., Any]:
    eager = impl == "eager"

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        base = _eager_of(type(module)) if eager else _functions()[impl]
        kv = adapters_kv(module._modules.get(CHILD))
        if kv is None:
            return base(module, query, key, value, attention_mask, *args, **kwargs)
        pk, pv = kv
        p, q_len, kv_len = pk.shape[1], query.shape[-2], key.shape[-2]
        key, value = _prepend(pk, pv, key, value, type(module).__name__)
        if attention_mask is not None or (not eager and q_len > 1):
            # eager applies no causal pattern of its own: no mask there means nothing is masked;
            # sdpa without a mask is causal by flag (the call's is_causal, else the module's)
            causal = False
            if attention_mask is None:
                flag = kwargs.get("is_causal")
                causal = bool(getattr(module, "is_causal", True) if flag is None else flag)
            attention_mask = extend_mask(attention_mask, p, q_len, kv_len, causal, query.device)
        bias = kwargs.get("position_bias")
        if bias is not None:
            kwargs["position_bias"] = extend_mask(bias, p, q_len, kv_len, False, bias.device)
        return base(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = attention.__qualname__ = f"{WRAP}{impl}_attention"
    return attention


@functools.cache
def _register(impl: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(WRAP + impl, _wrapper(impl))
    # transformers builds masks only for implementations it has a mask function for
    AttentionMaskInterface.register(WRAP + impl, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return WRAP + impl


_SOURCES: dict[type[nn.Module], str] = {}


def forward_source(cls: type[nn.Module]) -> str:
    """The source of `cls.forward`, read once ("" when it cannot be read)."""
    if cls not in _SOURCES:
        try:
            _SOURCES[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _SOURCES[cls] = ""
    return _SOURCES[cls]


def calls_interface(module: nn.Module) -> bool:
    """Whether `module`'s forward calls transformers' attention interface with its config's implementation."""
    cfg = getattr(module, "config", None)
    return "ALL_ATTENTION_FUNCTIONS" in forward_source(type(module)) and hasattr(cfg, "_attn_implementation")


def impl_of(config: Any) -> str:
    """The implementation a config asks for, as its original (our wrapper's name stripped)."""
    impl = config._attn_implementation
    return "eager" if impl is None else impl.removeprefix(WRAP)


def check_interface(module: nn.Module, path: str) -> str | None:
    """None if the wrapper can serve `module`'s attention implementation, else why not."""
    impl = impl_of(config_of(module))
    if impl not in SUPPORTED:
        return (
            f"{path!r} uses attn_implementation={impl!r}, which extra attention positions do not support; "
            f"use one of {list(SUPPORTED)} (model.set_attn_implementation('sdpa'))"
        )
    if impl == "eager":
        try:
            _eager_of(type(module))
        except SurgeryError as e:
            return str(e)
    return None


def install_interface(modules: list[nn.Module]) -> None:
    """Point the configs these attention modules read at our wrapper (remembering the original)."""
    for cfg in {id(config_of(m)): config_of(m) for m in modules}.values():
        impl = cfg._attn_implementation
        if impl is not None and impl.startswith(WRAP):
            continue
        name = _register(impl_of(cfg))
        cfg.__dict__["_surgery_attn_implementation"] = impl
        cfg._attn_implementation_internal = name


def uninstall_interface(modules: list[nn.Module]) -> None:
    """Give the configs of these attention modules their own implementation back."""
    for cfg in {id(config_of(m)): config_of(m) for m in modules}.values():
        if "_surgery_attn_implementation" in cfg.__dict__:
            old = cfg.__dict__.pop("_surgery_attn_implementation")
            now = cfg._attn_implementation
            if now is not None and now.startswith(WRAP):  # not switched by the user meanwhile
                cfg._attn_implementation_internal = old


def interface_active(module: nn.Module) -> bool:
    """Whether `module`'s config still points at our wrapper (a later
    ``set_attn_implementation`` would route around it)."""
    impl = config_of(module)._attn_implementation
    return impl is not None and impl.startswith(WRAP)


# ----------------------------------------------------------------------------- plain modules (fx)


def prefixed_scaled_dot_product_attention(
    holder: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the active extra positions of the module whose
    adapters `holder` holds (the ``surgery`` child, None when it has none)."""
    # under torch.fx tracing (roles of a rewritten model): the plain call, for the dataflow graph
    kv = None if holder is None or isinstance(query, fx.Proxy) else adapters_kv(holder)
    if kv is not None:
        if is_causal and attn_mask is not None:
            raise SurgeryError("scaled_dot_product_attention got both attn_mask and is_causal=True")
        pk, pv = kv
        p, q_len, kv_len = pk.shape[1], query.shape[-2], key.shape[-2]
        key, value = _prepend(pk, pv, key, value, "scaled_dot_product_attention")
        attn_mask, is_causal = extend_mask(attn_mask, p, q_len, kv_len, is_causal, query.device), False
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


class _ChildLeaves(fx.Tracer):
    """Traces one module's own forward: every child module stays a call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "scaled_dot_product_attention"


def find_sdpa_calls(module: nn.Module) -> tuple[fx.Graph | None, str]:
    """Trace `module`'s own forward; (graph, "") if it calls sdpa, else (None, why not)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _ChildLeaves().trace(module)
    except Exception as err:  # noqa: BLE001  (any tracing failure: not reachable this way)
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return None, f"torch.fx could not trace its forward ({type(err).__name__}: {first})"
    if not any(_is_sdpa(n) for n in graph.nodes):
        return None, "its forward calls no F.scaled_dot_product_attention"
    return graph, ""


def rewrite_sdpa(module: nn.Module, path: str) -> Callable[..., Any]:
    """The function to install as `module`'s forward: its own forward, traced, with every
    sdpa call going through `prefixed_scaled_dot_product_attention`."""
    graph, why = find_sdpa_calls(module)
    if graph is None:
        raise SurgeryError(f"cannot reach the attention of {path!r} ({type(module).__name__}): {why}")
    for node in [n for n in graph.nodes if _is_sdpa(n)]:
        with graph.inserting_before(node):
            holder = graph.get_attr(CHILD)  # the site's adapters, looked up on every call
            new = graph.call_function(prefixed_scaled_dot_product_attention, (holder, *node.args), dict(node.kwargs))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    code = graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, f"<surgery: attention of {path}>", "exec"), scope)  # noqa: S102
    fn = scope["forward"]
    fn.__surgery_rewrite__ = True
    return fn


def install_forward(module: nn.Module, fn: Callable[..., Any]) -> None:
    if not getattr(module.__dict__.get("forward"), "__surgery_rewrite__", False):
        if "forward" in module.__dict__:
            raise SurgeryError(
                f"{type(module).__name__} already has a forward of its own instance (patched by something "
                "else); its attention cannot be rewritten"
            )
        module.__dict__["forward"] = types.MethodType(fn, module)


def uninstall_forward(module: nn.Module) -> None:
    if getattr(module.__dict__.get("forward"), "__surgery_rewrite__", False):
        del module.__dict__["forward"]
