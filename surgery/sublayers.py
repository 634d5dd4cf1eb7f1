"""Sublayer sites: a feed-forward block as one site, found from roles.

Methods that act on a whole FFN (parallel adapters, MoE upcycling) need its input and its output.
Roles name the FFN's leaves (``mlp.up`` / ``mlp.gate`` / ``mlp.down``); from them:

* if one module holds the FFN and nothing else (Llama's and GPT-2's ``mlp``), that module is the
  site: its input and output are the FFN's;
* otherwise (BERT splits the FFN over ``intermediate`` and ``output``, whose forward also adds the
  residual and normalises) the site is the ``down`` linear, for the output, and its *entry* is the
  module on the way to ``up`` right under the layer that holds both (``intermediate``), for the input.

A module hit by the selector that is not a leaf is taken as a whole FFN site as it is.
`check_forward` refuses, at inject, an FFN site whose forward does not map ``[..., d_in]`` tokens
to ``[..., d_out]`` (ConvNeXt's layer: the FFN is then entered at its up projection).

**Fused experts.** Sparse MoE blocks in transformers 5.x (Mixtral, Qwen-MoE, ...) keep their
experts as fused 3-D parameters, not linears: no role lands on them. `fused_experts` finds such
modules; `with_fused` adds them to a method's default targets so that `fused_refusal` /
`fused_warning` can say what is not covered instead of silently covering less (docs/moe.md).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from surgery import context
from surgery.errors import FusedExpertsWarning, InjectionError, SelectorError
from surgery.selectors import MatchContext, Sel, sel

_FFN_ROLES = frozenset({"mlp", "mlp.up", "mlp.gate", "mlp.down"})


@dataclass
class Sublayer:
    path: str  # the site: the module whose output is the FFN's output
    module: nn.Module
    entry: str | None  # the module whose input is the FFN's input, when it is not the site
    d_in: int
    d_out: int


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def _base_linears(m: nn.Module) -> list[nn.Module]:
    """The linear layers inside `m`, in registration order, leaving out injected adapters."""
    return [sub for path, sub in m.named_modules() if path and _is_linear(sub) and "surgery" not in path.split(".")]


def in_width(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.in_features
    if _is_linear(m):
        return int(cast(torch.Tensor, m.weight).shape[0])  # transformers' Conv1D: weight is (in, out)
    for sub in _base_linears(m):
        return in_width(sub)
    return None


def out_width(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    if _is_linear(m):
        return int(m.nf)  # type: ignore[arg-type]
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    subs = _base_linears(m)
    return out_width(subs[-1]) if subs else None


def is_block(m: nn.Module) -> bool:
    """Whether `m` has children of its own (injected adapters, in a ``surgery`` child, do not count)."""
    return any(name != "surgery" for name, _ in m.named_children())


def _common(paths: list[str]) -> str:
    return ".".join(os.path.commonprefix([p.split(".") for p in paths]))


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + ".")


def ffn_sublayers(model: nn.Module, hits: list[tuple[str, nn.Module]]) -> list[Sublayer]:
    """The FFN sites for what a selector hit: leaves with FFN roles are grouped by their FFN."""
    from surgery.graph import roles as graph_roles

    leaves = [(p, m) for p, m in hits if not is_block(m)]
    roles = graph_roles(model) if leaves else {}
    downs = [p for p, r in roles.items() if "mlp.down" in r]
    ups = [p for p, r in roles.items() if r & {"mlp.up", "mlp.gate"}]
    out: dict[str, Sublayer] = {}
    for p, m in hits:
        if is_block(m):  # a block: the site as it is
            d_in, d_out = in_width(m), out_width(m)
            if d_in is None or d_out is None:
                raise SelectorError(f"module {p!r} holds no linear layer; it cannot be taken as an FFN")
            out.setdefault(p, Sublayer(p, m, None, d_in, d_out))
            continue
        if roles and any(p == f.path or p.startswith(f.path + ".") for f in fused_experts(model)):
            continue  # inside fused experts: the methods refuse or warn (fused_refusal)
        r = roles.get(p, frozenset())
        if not r & _FFN_ROLES:
            raise SelectorError(
                f"{p!r} is not part of a feed-forward block (its roles: {sorted(r) or 'none'}); "
                "point targets at FFN layers ('@mlp') or at FFN modules ('layers.*.mlp')"
            )
        down = p if "mlp.down" in r else max(downs, key=lambda d: len(_common([d, p])), default=None)
        if down is None:
            raise SelectorError(f"found no down projection for the FFN layer {p!r}")
        if any(s.path == down or s.entry is not None and down.startswith(s.path) for s in out.values()):
            continue
        sub = _sublayer(model, down, ups, roles)
        out.setdefault(sub.path, sub)
    return list(out.values())


def _sublayer(model: nn.Module, down: str, ups: list[str], roles: dict) -> Sublayer:
    # this FFN's ups: those whose nearest down is this one
    downs = [p for p, r in roles.items() if "mlp.down" in r]
    mine = [u for u in ups if max(downs, key=lambda d: len(_common([d, u]))) == down]
    if not mine:
        raise SelectorError(f"found no up projection feeding {down!r}")
    lca = _common([*mine, down])
    mods = dict(model.named_modules())
    others = [p for p, r in roles.items() if _under(p, lca) and p not in mine and p != down and r - {"linear"}]
    down_mod = mods[down]
    d_in = next((w for w in (in_width(mods[u]) for u in mine) if w is not None), None)
    d_out = out_width(down_mod)
    if d_in is None or d_out is None:
        raise SelectorError(
            f"cannot tell the widths of the FFN around {down!r}: its up projections {mine} and down projection "
            f"({type(down_mod).__name__}) are not linear layers ({'input' if d_in is None else 'output'} width "
            "unknown); target linear FFN layers or a module holding them"
        )
    if lca and not others and lca != down and _takes_tokens(mods[lca], d_in, d_out):
        return Sublayer(lca, mods[lca], None, d_in, d_out)
    # the FFN is spread over a layer that does more: enter at the child of the LCA leading to `up`
    depth = len(lca.split(".")) + 1 if lca else 1
    entry = ".".join(mine[0].split(".")[:depth])
    if not all(_under(u, entry) for u in mine) or _under(down, entry):
        raise SelectorError(
            f"cannot find the input of the FFN around {down!r}: its up projections {mine} do not sit "
            "under one module apart from the down projection; target the FFN module itself"
        )
    return Sublayer(down, down_mod, entry, d_in, d_out)


# ---------------------------------------------------------------------------- checking an FFN's forward


def _required_positional(m: nn.Module) -> list[str]:
    """Names of the positional parameters of `m.forward` that have no default."""
    try:
        params = inspect.signature(m.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]


def _probe(
    m: nn.Module, shape: tuple[int, ...], model: nn.Module | None = None, perm: torch.Tensor | None = None
) -> tuple[Any, str]:
    """Run `m` on a small input of `shape` (its dtype and device), in eval, with no delta active:
    (output, "") or (None, why it failed). (None, "") when it cannot be run here (meta tensors).
    With `perm`, the input's rows are permuted first."""
    like = next((t for t in m.parameters() if t.is_floating_point()), None)
    if like is not None and like.is_meta:
        return None, ""
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    n = math.prod(shape)
    x = torch.sin(torch.arange(n, dtype=torch.float32) * 0.7).reshape(shape)  # distinct rows, order matters
    if perm is not None:
        x = x[perm]
    x = x.to(device, dtype)
    modes = [(sub, sub.training) for sub in m.modules()]
    try:
        m.eval()  # no dropout, no batch-norm statistics updated by the probe
        ctx = context.base_only(model) if model is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return m(x), ""
    except Exception as err:  # noqa: BLE001  (any failure means: not a tokens x features FFN)
        first = (str(err).strip().splitlines() or [""])[0][:160]
        return None, f"{type(err).__name__}: {first}"
    finally:
        for sub, mode in modes:
            sub.training = mode


def _shape_ok(out: Any, shape: tuple[int, ...]) -> bool:
    return isinstance(out, torch.Tensor) and tuple(out.shape) == shape


def _got(out: Any, why: str) -> str:
    if why:
        return f"it raised {why}"
    return f"it returned {type(out).__name__}" + (
        f" of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else ""
    )


def _takes_tokens(m: nn.Module, d_in: int, d_out: int) -> bool:
    """Whether `m` maps [..., d_in] to [..., d_out] (True when it needs more inputs or cannot run here)."""
    if len(_required_positional(m)) > 1:
        return True  # e.g. Bloom's MLP(hidden_states, residual): its output is still the FFN's, plus the residual
    out, why = _probe(m, (1, 2, d_in))
    return (out is None and not why) or _shape_ok(out, (1, 2, d_out))


def check_forward(model: nn.Module, sub: Sublayer, who: str, *, alone: bool) -> None:
    """Refuse, at inject, an FFN site a method cannot use, by running it once on a small input.

    `alone=False` (a parallel adapter: reads the FFN's input, adds to its output): the FFN's first
    module must take [batch, tokens, d_in] and, taken whole, return [batch, tokens, d_out].
    `alone=True` (moe: copies of the FFN run on the tokens routed to them): the expert (the site,
    or entry + site) must take the flattened tokens [T, d_in], return [T, d_out], and act on each
    token alone (the same rows in another order give the same rows in that order): a block that
    mixes positions (a convolution over the sequence, a state-space scan) cannot be an expert."""
    entry = model.get_submodule(sub.entry) if sub.entry is not None else None
    first = entry if entry is not None else sub.module
    where = sub.entry if sub.entry is not None else sub.path
    name = type(first).__name__
    if extra := _required_positional(first)[1:]:
        if alone:
            raise InjectionError(
                f"{who}: the FFN module {where!r} ({name}) takes {extra} besides its input "
                f"(forward{inspect.signature(first.forward)}): an expert copy must compute the FFN's output "
                "from the FFN's input alone, and the engine passes it nothing else. Use 'lora_moe' on the "
                "FFN's linears instead (targets='@mlp'), or a parallel adapter (style='parallel')"
            )
        return  # the adapter reads the first input and adds to the output: nothing more to check
    if not alone:
        out, why = _probe(first, (1, 2, sub.d_in), model)
        if out is None and not why:
            return  # meta tensors: nothing to run
        if entry is not None and not why or _shape_ok(out, (1, 2, sub.d_out)):
            return
        raise InjectionError(
            f"{who}: the FFN site {where!r} ({name}) does not map tokens x features: on an input of shape "
            f"[1, 2, {sub.d_in}] ([batch, tokens, features]) it should return [1, 2, {sub.d_out}], but "
            f"{_got(out, why)}. Its forward does more than the FFN or works in another layout; point targets at "
            "a module holding the FFN alone, or use a sequential adapter on the FFN's output (style='pfeiffer')"
        )
    expert = first if entry is None else nn.Sequential(entry, sub.module)
    t = 5
    out, why = _probe(expert, (t, sub.d_in), model)
    if out is None and not why:
        return
    if not _shape_ok(out, (t, sub.d_out)):
        raise InjectionError(
            f"{who}: the FFN site {where!r} ({name}) cannot be an expert: experts run on the tokens routed to "
            f"them, flattened to [tokens, {sub.d_in}], and should return [tokens, {sub.d_out}], but on a "
            f"[{t}, {sub.d_in}] input {_got(out, why)}. Its forward is not a position-wise FFN (or works in "
            "another layout); use 'lora_moe' on its linears, or point targets at a module holding the FFN alone"
        )
    perm = torch.tensor([3, 0, 4, 1, 2])
    again, _ = _probe(expert, (t, sub.d_in), model, perm)
    mixed = (
        not isinstance(again, torch.Tensor)
        or again.shape != out.shape
        or not torch.allclose(
            again.float(), out[perm.to(out.device)].float(), rtol=1e-2, atol=1e-3 * (1.0 + float(out.abs().max()))
        )
    )
    if mixed:
        raise InjectionError(
            f"{who}: the FFN site {where!r} ({name}) cannot be an expert: its output for a token depends on the "
            "other tokens (it mixes positions, as a convolution over the sequence or a state-space scan does), "
            "while experts see only the tokens routed to them, in no particular order. Use 'lora_moe' on its "
            "linears (targets='@mlp'), or a parallel adapter beside it (style='parallel')"
        )


# ---------------------------------------------------------------------------- fused experts

_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class Fused:
    """A module that holds a sparse MoE block's experts as fused tensors."""

    path: str
    kind: str  # its class name
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # its fused parameters

    @property
    def block(self) -> str:
        """The sparse MoE block holding it (its parent)."""
        return self.path.rpartition(".")[0]

    def __str__(self) -> str:
        return f"{self.path} ({self.kind}: " + ", ".join(f"{n} {list(s)}" for n, s in self.shapes) + ")"


def _counts(model: nn.Module) -> set[int]:
    cfg = next((c for m in model.modules() if (c := getattr(m, "config", None)) is not None), None)  # the outermost
    values = [getattr(c, a, None) for c in (cfg, getattr(cfg, "text_config", None)) for a in _EXPERT_COUNTS]
    return {v for v in values if isinstance(v, int) and v > 1}


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules(), leaving out injected adapters (a ``surgery`` child and what it holds)."""
    for p, m in model.named_modules():
        if "surgery" not in p.split("."):
            yield p, m


def fused_experts(model: nn.Module) -> list[Fused]:
    """The modules of `model` holding experts as fused parameters of 3 or more dimensions whose
    leading dimension is the number of experts (by the module's name or the model's config)."""
    counts = None
    out = []
    for p, m in _walk(model):
        if isinstance(m, nn.modules.conv._ConvNd):
            continue  # conv kernels are 3-D and more
        big = [(n, t) for n, t in m.named_parameters(recurse=False) if t.dim() >= 3 and t.is_floating_point()]
        if not big or len({t.shape[0] for _, t in big}) != 1:
            continue
        named = "expert" in p.rpartition(".")[2].lower() or "expert" in type(m).__name__.lower()
        if not named:
            counts = _counts(model) if counts is None else counts
            if big[0][1].shape[0] not in counts:
                continue
        out.append(Fused(p, type(m).__name__, tuple((n, tuple(t.shape)) for n, t in big)))
    return out


class _WithFused(Sel):
    """A method's default targets, plus the fused expert modules (which no role names), so that
    the method can say it cannot cover them rather than cover less without a word."""

    uses_roles = True

    def __init__(self, base: Any) -> None:
        self.base = sel(base)
        self.text = base

    def match(self, path: str, module: nn.Module, ctx: MatchContext) -> bool:
        fused = ctx.__dict__.get("_fused_paths")
        if fused is None:
            fused = ctx.__dict__["_fused_paths"] = {f.path for f in fused_experts(ctx.model)}
        return path in fused or self.base.match(path, module, ctx)

    def __repr__(self) -> str:
        return repr(self.text)


def with_fused(targets: Any) -> Sel:
    """`targets` plus the model's fused expert modules (see `fused_refusal`)."""
    return _WithFused(targets)


def split_fused(model: nn.Module, hits: list[tuple[str, nn.Module]]) -> tuple[list[Fused], list[tuple[str, nn.Module]]]:
    """(the fused expert modules among or above `hits`, the other hits)."""
    fused = fused_experts(model)
    owner = {p: next((f for f in fused if p == f.path or p.startswith(f.path + ".")), None) for p, _ in hits}
    got = {f.path: f for f in owner.values() if f is not None}
    return list(got.values()), [(p, m) for p, m in hits if owner[p] is None]


def _advice(model: nn.Module, fused: list[Fused]) -> str:
    """What to target instead: the attention, and a shared expert made of linears beside the experts."""
    blocks = {f.block for f in fused}
    shared = [
        p
        for p, m in _walk(model)
        if p.rpartition(".")[0] in blocks and "shared" in p.rpartition(".")[2] and _base_linears(m)
    ]
    tip = (
        "target the attention instead (LoRA on '@q', '@v'; an adapter on '@o'; 'lora_moe' on the attention "
        "linears for experts of your own)"
    )
    if shared:
        name = ".".join(shared[0].split(".")[-2:])
        tip += (
            f", or the shared expert beside them, which is made of linears ({shared[0]}"
            f"{' ...' if len(shared) > 1 else ''}): targets={name!r}"
        )
    return tip


def _show(fused: list[Fused]) -> str:
    return f"{fused[0]}" + (f" and {len(fused) - 1} more alike" if len(fused) > 1 else "")


def fused_refusal(model: nn.Module, who: str, fused: list[Fused]) -> InjectionError:
    """The error for a method asked to attach to fused experts."""
    return InjectionError(
        f"{who}: the feed-forward experts of this model are fused 3-D tensors, not linear layers: "
        f"{_show(fused)}. {who} cannot attach to them; " + _advice(model, fused)
    )


def fused_warning(model: nn.Module, who: str, fused: list[Fused], covered: list[str]) -> None:
    """Warn that `who` covers only `covered`, not the fused experts its targets meant too."""
    shown = ", ".join(covered[:3]) + (f" and {len(covered) - 3} more" if len(covered) > 3 else "")
    warnings.warn(
        f"{who}: the feed-forward experts of this model are fused 3-D tensors that it cannot attach to "
        f"({_show(fused)}); it covers only {shown}. To cover an FFN, " + _advice(model, fused),
        FusedExpertsWarning,
        stacklevel=5,
    )


def fused_beside(model: nn.Module, who: str, sites: list[tuple[str, nn.Module]]) -> None:
    """Warn when sites sit inside a sparse MoE block whose fused experts they leave out (Qwen2-MoE's
    shared expert, a router): the block's output still comes mostly from experts left as they are."""
    near = [f for f in fused_experts(model) if any(p.startswith(f.block + ".") for p, _ in sites)]
    if near:
        inside = [p for p, _ in sites if any(p.startswith(f.block + ".") for f in near)]
        warnings.warn(
            f"{who}: {inside[0]}{' and others' if len(inside) > 1 else ''} sit in a sparse MoE block whose routed "
            f"experts are fused 3-D tensors ({_show(near)}); those experts are left as they are, only the "
            "modules targeted change (filter FusedExpertsWarning if that is what you want)",
            FusedExpertsWarning,
            stacklevel=5,
        )


_FFN_ROLE_TEXT = frozenset({"linear", "mlp", "mlp.up", "mlp.gate", "mlp.down"})


def _names_ffn_roles(targets: Any) -> bool:
    """Whether a selector (as given) asks for FFN linears by role: '@linear', '@mlp', '@mlp.*'."""
    if isinstance(targets, _WithFused):
        return False  # a method's own defaults: that method says what it covers itself
    if isinstance(targets, str):
        return targets.startswith("@") and targets[1:] in _FFN_ROLE_TEXT
    if isinstance(targets, (list, tuple, set, frozenset)):
        return any(_names_ffn_roles(t) for t in targets)
    role = getattr(targets, "role", None)
    if isinstance(role, str):
        return role in _FFN_ROLE_TEXT
    return any(_names_ffn_roles(p) for p in getattr(targets, "parts", ()))


def note_fused(model: nn.Module, who: str, targets: Any, sites: list[tuple[str, nn.Module]]) -> None:
    """For methods that do not check fused experts themselves (LoRA, ...): warn when `targets` ask
    for the FFN's linears by role ('@linear', '@mlp', ...) on a model whose experts are fused 3-D
    tensors, which no role reaches: the sites then cover less than the selector says."""
    fused = fused_experts(model) if _names_ffn_roles(targets) else []
    if fused:
        fused_warning(model, who, fused, [p for p, _ in sites])
