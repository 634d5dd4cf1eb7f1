"""Depth of every parameter, read off the model's graph: the axis of layer-wise learning rates,
gradual unfreezing and partial fine-tuning.

A *stack* is an `nn.ModuleList` (or `nn.Sequential`) whose children are transformer blocks: each
holds a module with the ``@attn`` or ``@mlp`` role (`surgery.graph.roles`); the outermost such
list counts (T5's ``block.0.layer`` list sits inside a block). Every stack is its own depth axis
(a CLIP vision tower and its text tower; T5's encoder and decoder). On a stack of ``n`` blocks:

* block ``i`` has depth ``i + 1``;
* a module outside the blocks that computes on what a stack's blocks produced (a final norm, a
  pooler, a projection, the head) has depth ``n + 1`` of that stack (of the latest one when
  several feed it, as CLIP's ``logit_scale``);
* one whose output flows into a stack's blocks and not out of one (embeddings, an embedding
  norm, a class token) has depth 0 of that stack (of the earliest one);
* a module the forward never uses goes by registration order next to its nearest stack.

This comes from the dataflow graph (`surgery.graph.build_graph`, cached per model), never from
name patterns. Parameters of injected deltas take their site's depth (task heads, the 'head'
method's, the top depth of their site's stack). With no stack at all (a plain
MLP), each top-level child with parameters is one depth, in registration order (`Layout.found`
is False). ``overrides`` (selector -> depth, or -> ``(stack, depth)``) fix what the graph gets wrong.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from surgery import engine, graph
from surgery.errors import ConfigError
from surgery.selectors import no_hit_error, select

__all__ = ["CHILDREN", "Layout", "depths", "layout", "module_depths"]

CHILDREN = "<children>"  # the one stack of a model without blocks: its top-level children
Where = tuple[str, int]  # (stack, depth)


@dataclass(frozen=True)
class Layout:
    """Stacks (name -> top depth, i.e. blocks + 1), and the (stack, depth) of every module that owns
    parameters directly and of every parameter (`named_parameters` names, deltas' included)."""

    stacks: dict[str, int]
    modules: dict[str, Where]
    params: dict[str, Where]
    found: bool  # False: no block stack, one depth per top-level child

    def blocks(self, stack: str) -> int:
        """The number of blocks of a stack (depths 1..blocks; 0 below them, blocks + 1 above)."""
        return self.stacks[stack] - 1


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[fx.Graph, dict[str, int], dict[str, Where], bool]] = (
    weakref.WeakKeyDictionary()
)


def layout(model: nn.Module, overrides: Mapping[Any, Any] | None = None) -> Layout:
    """The stacks of `model` and the depth of each of its modules and parameters (see the module doc)."""
    engine.check_model(model)
    g = graph.build_graph(model)
    hit = _CACHE.get(model)
    if hit is None or hit[0] is not g:  # a rebuilt graph (surgery.trace, a changed structure): read it again
        hit = _CACHE[model] = (g, *_base_layout(model, g))
    _, stacks, mods, found = hit
    mods = dict(mods)
    if overrides:
        _override(model, stacks, mods, overrides)
    delta_at: dict[int, Where] = {}  # a delta's tensors: their site's depth; task heads: the top of its stack
    for path, ads in engine.sites_of(model).items():
        for name, a in ads.items():
            stack, depth = _at(path, mods, stacks)
            top = engine.method_of(model, name).name == "head"
            delta_at |= {id(p): (stack, stacks[stack]) if top else (stack, depth) for p in a.parameters()}
    params = {n: delta_at.get(id(p)) or _at(n.rpartition(".")[0], mods, stacks) for n, p in model.named_parameters()}
    return Layout(dict(stacks), mods, params, found)


def depths(model: nn.Module, overrides: Mapping[Any, Any] | None = None) -> dict[str, Where]:
    """Parameter name -> (stack, depth): embeddings 0, block i -> i + 1, final norm / head -> blocks + 1."""
    return layout(model, overrides).params


def module_depths(model: nn.Module, overrides: Mapping[Any, Any] | None = None) -> dict[str, Where]:
    """Module path -> (stack, depth), for every module of the base that owns parameters directly."""
    return layout(model, overrides).modules


def _at(path: str, mods: dict[str, Where], stacks: dict[str, int]) -> Where:
    """The depth of a path: its own, else its nearest ancestor's, else its first descendant's."""
    probe = path
    while True:
        if probe in mods:
            return mods[probe]
        if not probe:
            break
        probe = probe.rpartition(".")[0]
    below = next((w for p, w in mods.items() if p.startswith(path + ".")), None)
    return below or (next(iter(stacks)), 0)


def _base_layout(model: nn.Module, g: fx.Graph) -> tuple[dict[str, int], dict[str, Where], bool]:
    roles = graph.roles(model)
    named = [(p, m) for p, m in model.named_modules() if not engine.is_adapter_path(model, p)]
    owners = [p for p, m in named if next(m.parameters(recurse=False), None) is not None]
    stacks = _stacks(named, roles)
    if not stacks:
        kids = [n for n, c in model.named_children() if next(c.parameters(), None) is not None]
        last = max(len(kids) - 1, 0)
        index = {k: i for i, k in enumerate(kids)}
        return {CHILDREN: last}, {p: (CHILDREN, index.get(p.split(".")[0], last)) for p in owners}, False
    block_of: dict[str, Where] = {  # block path -> (stack, depth)
        f"{s}.{name}": (s, i + 1) for s, kids in stacks.items() for i, name in enumerate(kids)
    }
    top = {s: len(kids) + 1 for s, kids in stacks.items()}

    def in_block(path: str | None) -> Where | None:
        probe = path
        while probe:
            if probe in block_of:
                return block_of[probe]
            probe = probe.rpartition(".")[0]
        return None

    mods: dict[str, Where] = {}
    outside = []
    for p in owners:
        w = in_block(p)
        if w is None:
            outside.append(p)
        else:
            mods[p] = w
    if outside:
        mods |= _by_dataflow(model, g, outside, in_block, top, [p for p, _ in named])
    return top, {p: mods[p] for p in owners}, True


def _stacks(named: list[tuple[str, nn.Module]], roles: Mapping[str, frozenset[str]]) -> dict[str, list[str]]:
    """Outermost lists whose children hold @attn / @mlp modules: stack path -> child names in order."""
    block_roles = [p for p, r in roles.items() if "attn" in r or "mlp" in r]
    out: dict[str, list[str]] = {}
    for path, m in named:
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or any(path.startswith(s + ".") for s in out):
            continue
        kids = [n for n, _ in m.named_children()]
        pre = f"{path}." if path else ""
        if any(r.startswith(f"{pre}{k}.") for k in kids for r in block_roles):
            out[path] = kids
    return out


def _by_dataflow(
    model: nn.Module, g: fx.Graph, paths: list[str], in_block: Any, top: dict[str, int], order: list[str]
) -> dict[str, Where]:
    """Depth of modules outside the blocks: fed by a stack -> its top; feeding one -> its depth 0."""
    canon = {id(m): p for p, m in model.named_modules()}
    alias = {p: canon.get(id(m), p) for p, m in model.named_modules(remove_duplicate=False)}
    pcanon = {id(t): n for n, t in model.named_parameters()}
    palias = {n: pcanon.get(id(t), n) for n, t in model.named_parameters(remove_duplicate=False)}
    mods = dict(model.named_modules())

    def scope(n: fx.Node) -> str | None:
        if n.op == "call_module":
            return alias.get(str(n.target))
        stack = n.meta.get("nn_module_stack")
        return alias.get(list(stack.values())[-1][0]) if stack else None

    nodes = list(g.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    scopes = {n: scope(n) for n in nodes}
    blk: dict[fx.Node, str | None] = {}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for n in nodes:
        w = in_block(scopes[n])
        blk[n] = w[0] if w else None
        if w:
            first.setdefault(w[0], pos[n])
            last[w[0]] = pos[n]
    empty: frozenset[str] = frozenset()
    up: dict[fx.Node, frozenset[str]] = {}
    for n in nodes:
        own = frozenset([b]) if (b := blk[n]) else empty
        up[n] = own.union(*(up[a] for a in n.all_input_nodes))
    reach: dict[fx.Node, frozenset[str]] = {}
    for n in reversed(nodes):
        own = frozenset([b]) if (b := blk[n]) else empty
        reach[n] = own.union(*(reach[u] for u in n.users))

    uses: dict[str, list[fx.Node]] = {}  # canonical parameter name -> the nodes computing with it
    for n in nodes:
        name = n.meta.get("surgery.param") if n.op == "placeholder" else n.target if n.op == "get_attr" else None
        if isinstance(name, str) and name in palias:
            uses.setdefault(palias[name], []).extend(n.users)

    def decide(start: Iterable[fx.Node]) -> Where | None:
        todo, seen = sorted(start, key=pos.__getitem__), set()
        while todo:  # breadth-first from the uses, in graph order: the first node on a stack's path decides
            nxt: list[fx.Node] = []
            for n in todo:
                if n in seen:
                    continue
                seen.add(n)
                if blk[n] is not None:  # used inside a block
                    return in_block(scopes[n])
                if up[n]:
                    s = max(up[n], key=last.__getitem__)
                    return s, top[s]
                if reach[n]:
                    return min(reach[n], key=first.__getitem__), 0
                nxt.extend(n.users)
            todo = sorted(set(nxt), key=pos.__getitem__)
        return None

    out: dict[str, Where] = {}
    rank = {p: i for i, p in enumerate(order)}
    for p in paths:
        used = [u for n, _ in mods[p].named_parameters(prefix=p, recurse=False) for u in uses.get(palias.get(n, n), [])]
        call = [n for n in nodes if n.op == "call_module" and alias.get(str(n.target)) == p]
        mine = [u for u in used if scopes[u] == p] + call  # a tied weight: this module's own use of it
        w = decide(mine or used)
        if w is None:  # unused by the forward: beside the nearest stack, before or after it
            near = max(top, key=lambda s: (_common(s, p), -abs(rank.get(s, 0) - rank[p])))
            w = (near, 0 if rank[p] < rank.get(near, 0) else top[near])
        out[p] = w
    return out


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        n += 1
    return n


def _override(model: nn.Module, stacks: dict[str, int], mods: dict[str, Where], overrides: Mapping[Any, Any]) -> None:
    """Apply selector -> depth / (stack, depth) to `mods` (all checked before any is applied)."""
    new: dict[str, Where] = {}
    skip = lambda path: engine.is_adapter_path(model, path)  # noqa: E731
    for selector, value in overrides.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
            stack, depth = value
        elif isinstance(value, int) and not isinstance(value, bool):
            stack, depth = None, value
        else:
            raise ConfigError(f"override {selector!r}: {value!r} must be a depth (int) or a (stack, depth) pair")
        if stack is not None and stack not in stacks:
            raise ConfigError(f"override {selector!r}: no stack {stack!r}; the stacks are {sorted(stacks)}")
        hits = select(model, selector, skip=skip)
        if not hits:
            raise ConfigError(f"override: {no_hit_error(model, selector, skip=skip)}")
        for h, _ in hits:
            for p, (s, _) in mods.items():
                if p == h or p.startswith(h + "."):
                    s = stack or s
                    if not 0 <= depth <= stacks[s]:
                        raise ConfigError(f"override {selector!r}: depth {depth} is outside 0..{stacks[s]} of {s!r}")
                    new[p] = (s, depth)
    mods.update(new)
