"""Sublayer sites: a feed-forward block as one site, found from roles.

Methods that act on a whole FFN (parallel adapters, MoE upcycling) need its
input and its output. Roles name the FFN's leaves (``mlp.up`` / ``mlp.gate``
/ ``mlp.down``); from them:

* if one module holds the FFN and nothing else (Llama's ``mlp``, GPT-2's
  ``mlp``), that module is the site: its input and output are the FFN's;
* otherwise (BERT splits the FFN over ``intermediate`` and ``output``, whose
  forward also adds the residual and normalises) the site is the ``down``
  linear, for the output, and its *entry* is the module on the way to ``up``
  right under the layer that holds both (``intermediate``), for the input.

A module hit by the selector that is not a leaf is taken as a whole FFN site as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from surgery.errors import SelectorError

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
    return [sub for path, sub in m.named_modules()
            if path and _is_linear(sub) and "surgery" not in path.split(".")]


def in_width(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.in_features
    if _is_linear(m):
        return int(m.weight.shape[0])
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
    last = None
    for sub in _base_linears(m):
        last = sub
    return None if last is None else out_width(last)


def _is_block(m: nn.Module) -> bool:
    # injected adapters live in a child named "surgery": they do not make a leaf a block
    return any(name != "surgery" for name, _ in m.named_children())


def _common(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for seg in zip(*parts, strict=False):
        if len(set(seg)) != 1:
            break
        out.append(seg[0])
    return ".".join(out)


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + ".")


def ffn_sublayers(model: nn.Module, hits: list[tuple[str, nn.Module]]) -> list[Sublayer]:
    """The FFN sites for what a selector hit: leaves with FFN roles are grouped by their FFN."""
    from surgery.graph import roles as graph_roles

    leaves = [(p, m) for p, m in hits if not _is_block(m)]
    roles = graph_roles(model) if leaves else {}
    downs = [p for p, r in roles.items() if "mlp.down" in r]
    ups = [p for p, r in roles.items() if r & {"mlp.up", "mlp.gate"}]
    out: dict[str, Sublayer] = {}
    for p, m in hits:
        if _is_block(m):  # a block: the site as it is
            d_in, d_out = in_width(m), out_width(m)
            if d_in is None or d_out is None:
                raise SelectorError(f"module {p!r} holds no linear layer; it cannot be taken as an FFN")
            out.setdefault(p, Sublayer(p, m, None, d_in, d_out))
            continue
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
    others = [p for p, r in roles.items()
              if _under(p, lca) and p not in mine and p != down and r - {"linear"}]
    down_mod = mods[down]
    d_in = in_width(mods[mine[0]])
    d_out = out_width(down_mod)
    assert d_in is not None and d_out is not None
    if lca and not others and lca != down:
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
