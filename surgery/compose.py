r"""Composition blocks: how several active deltas combine at a site.

``surgery.use(model, "a", "b")`` runs ``a`` then ``b`` at every site (for
additive methods like LoRA the order does not matter; for bottleneck adapters
at one site it is a stack). The blocks say more:

* ``Stack(a, b, ...)``: each child transforms the output of the one before.
* ``Average({"a": 0.7, "b": 0.3})``: :math:`y = \sum_i w_i\, y_i` over the
  children's outputs from the same input, weights normalised to sum to 1.
* ``Fuse(a, b, ...)``: AdapterFusion: a fusion delta made by `surgery.fuse`
  over exactly these adapters mixes their outputs with learned attention.
* ``BatchSplit(a, b, batch_sizes=[2, 3])``: rows 0-1 of the batch through
  ``a``, rows 2-4 through ``b``, in one call.
* ``Parallel(a, b)``: the batch is repeated once per child at the model's
  input, and copy *i* runs through child *i*: one call gives
  ``len(children) * batch`` rows, child by child.

Children are delta names or blocks. Nesting is allowed where the math is
defined: a ``Fuse`` takes names only (its fusion layer was trained over those
adapters), and a ``Parallel`` must be the only, outermost block (it repeats the
model's inputs). A merged delta runs for every row, so it may only be active as
a plain name. Validation happens in `use` / `activate`, before any forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch

from surgery.errors import CompositionError
from surgery.methods.base import Action


class SiteView(Protocol):
    """What the evaluator reads of one site."""

    @property
    def path(self) -> str: ...

    @property
    def live(self) -> Mapping[str, Any]: ...  # delta name -> adapter, injected here and not merged

    def entry_input(self, path: str) -> torch.Tensor: ...  # the input of module `path` in this call

    def apply(self, ad: Any, x: Any, out: Any, inplace: bool) -> Any: ...  # one adapter's effect, by its action


__all__ = ["Average", "BatchSplit", "Block", "Fuse", "Parallel", "Stack"]


class Block:
    """A composition of deltas (see the module docstring)."""

    children: tuple[Any, ...]

    def __init__(self, *children: Any) -> None:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        if not children:
            raise CompositionError(f"{type(self).__name__}() needs at least one delta name or block")
        for c in children:
            if not isinstance(c, (str, Block)):
                raise CompositionError(
                    f"{type(self).__name__}: {c!r} is neither a delta name nor a block "
                    "(Stack, Fuse, Average, Parallel, BatchSplit)"
                )
        self.children = tuple(children)
        # every delta name inside, once, in order: read on each forward (a tuple, so compiled code guards
        # on it cheaply; a generator there broke the graph)
        self.members: tuple[str, ...] = tuple(dict.fromkeys(self.names()))

    def names(self) -> Iterable[str]:
        for c in self.children:
            if isinstance(c, str):
                yield c
            else:
                yield from c.names()

    def _args(self) -> str:
        return ", ".join(repr(c) for c in self.children)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._args()})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.children))


class Stack(Block):
    """Children one after another: each transforms the output of the previous."""


class Fuse(Block):
    """AdapterFusion over these adapters (a fusion made by `surgery.fuse` over exactly them;
    `name=` picks one when several fusions cover the same adapters)."""

    def __init__(self, *children: Any, name: str | None = None) -> None:
        super().__init__(*children)
        bad = [c for c in self.children if not isinstance(c, str)]
        if bad:
            raise CompositionError(
                f"Fuse takes adapter names only, not {bad[0]!r}: a fusion layer is trained over "
                "named adapters. Compose around it instead, e.g. Stack('lang', Fuse('a', 'b'))"
            )
        self.name = name
        self.fusion: str | None = None  # resolved by `normalize`

    def __repr__(self) -> str:
        return f"Fuse({self._args()}{f', name={self.name!r}' if self.name else ''})"


class Average(Block):
    """The weighted average of the children's outputs (weights normalised to sum to 1).
    ``Average({"a": 0.7, "b": 0.3})`` or ``Average("a", "b", weights=[0.7, 0.3])``."""

    def __init__(self, *children: Any, weights: Iterable[float] | None = None) -> None:
        if len(children) == 1 and isinstance(children[0], dict):
            if weights is not None:
                raise CompositionError("Average: give weights either as a dict or as weights=, not both")
            weights = list(children[0].values())
            children = tuple(children[0].keys())
        super().__init__(*children)
        w = [1.0] * len(self.children) if weights is None else [float(v) for v in weights]
        if len(w) != len(self.children):
            raise CompositionError(f"Average: {len(w)} weights for {len(self.children)} children")
        total = sum(w)
        if not all(v == v and abs(v) != float("inf") for v in w) or total == 0:
            raise CompositionError(f"Average: weights {w} must be finite and not sum to 0")
        self.weights = tuple(v / total for v in w)

    def __repr__(self) -> str:
        return f"Average({self._args()}, weights={list(self.weights)})"


class BatchSplit(Block):
    """Rows of the batch through different children: ``batch_sizes[i]`` rows through child i."""

    def __init__(self, *children: Any, batch_sizes: Iterable[int]) -> None:
        super().__init__(*children)
        sizes = tuple(batch_sizes)
        if len(sizes) != len(self.children) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes
        ):
            raise CompositionError(
                f"BatchSplit: batch_sizes must be {len(self.children)} non-negative integers "
                f"(one per child), got {list(sizes)}"
            )
        self.batch_sizes = sizes

    def __repr__(self) -> str:
        return f"BatchSplit({self._args()}, batch_sizes={list(self.batch_sizes)})"


class Parallel(Block):
    """Each child on its own copy of the batch, in one call (outputs stacked child by child)."""


# ---------------------------------------------------------------------------- validation


def normalize(deltas: Mapping[str, tuple[str, ...]], items: tuple[Any, ...], merged: set[str]) -> tuple[Any, ...]:
    """Check an active spec against the model's deltas (name -> the members a fusion runs over,
    () for the others) and resolve fusions; return the spec to store."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Parallel) and len(items) > 1:
            raise CompositionError(
                f"Parallel must be the only block active (it repeats the model's inputs); got {list(items)}"
            )
        out.append(_check(deltas, item, merged, top=True, inside=None, index=i))
    seen: set[str] = set()
    for n in _names(out):
        if n in seen:
            raise CompositionError(f"delta {n!r} appears twice in {list(items)}; it would run twice")
        seen.add(n)
    return tuple(out)


def _names(items: Iterable[Any]) -> Iterable[str]:
    for it in items:
        if isinstance(it, str):
            yield it
        else:
            yield from it.names()


def _check(
    deltas: Mapping[str, tuple[str, ...]], item: Any, merged: set[str], *, top: bool, inside: Block | None, index: int
) -> Any:
    if isinstance(item, str):
        if item not in deltas:
            raise CompositionError(f"no delta named {item!r} in this model; injected: {sorted(deltas) or 'none'}")
        if item in merged and not top:
            raise CompositionError(
                f"delta {item!r} is merged into the base weights, so it runs for every row and branch; "
                f"it cannot sit inside {inside!r}. surgery.unmerge(model, {item!r}) first"
            )
        return item
    if not isinstance(item, Block):
        raise CompositionError(
            f"{item!r} is neither a delta name nor a block (Stack, Fuse, Average, Parallel, BatchSplit)"
        )
    if isinstance(item, Parallel) and not (top and index == 0):
        raise CompositionError(
            f"Parallel cannot be nested inside {inside!r}: it repeats the model's inputs, so it must be "
            "the outermost (and only) block"
        )
    if isinstance(item, Fuse):
        return _resolve_fuse(deltas, item, merged)
    children = tuple(_check(deltas, c, merged, top=False, inside=item, index=i) for i, c in enumerate(item.children))
    new = object.__new__(type(item))
    new.__dict__.update(item.__dict__)
    new.children = children
    new.members = tuple(dict.fromkeys(new.names()))
    return new


def _resolve_fuse(deltas: Mapping[str, tuple[str, ...]], block: Fuse, merged: set[str]) -> Fuse:
    want = set(block.children)
    for n in block.children:
        if n not in deltas:
            raise CompositionError(f"Fuse: no delta named {n!r} in this model; injected: {sorted(deltas)}")
    found = [n for n, members in deltas.items() if set(members) == want]
    if block.name is not None:
        if block.name not in found:
            raise CompositionError(
                f"Fuse(..., name={block.name!r}): that is not a fusion over {sorted(want)}; "
                f"fusions over them: {found or 'none'}"
            )
        found = [block.name]
    if not found:
        raise CompositionError(
            f"no fusion over {list(block.children)} in this model; make one with "
            f"surgery.fuse(model, {list(block.children)}, name=...) and train it"
        )
    new = Fuse(*block.children, name=block.name)
    new.fusion = found[0]
    return new


# ---------------------------------------------------------------------------- running at a site


def parallel_copies(spec: tuple[Any, ...]) -> int:
    """How many copies of the batch the spec asks for (1 unless it is a Parallel)."""
    if len(spec) == 1 and isinstance(spec[0], Parallel):
        return len(spec[0].children)
    return 1


def run(site: SiteView, spec: tuple[Any, ...], x: Any, out: Any) -> Any:
    """The output of `site` under an active spec holding blocks."""
    if len(spec) == 1 and isinstance(spec[0], Parallel):
        n = len(spec[0].children)
        rows = out.shape[0] if out is not None else _rows(x)
        if rows % n:
            raise CompositionError(
                f"Parallel with {n} children: site {site.path!r} got a batch of {rows} rows, not a "
                "multiple of the copies made at the model's input; call the model itself, not a submodule"
            )
        spec = (BatchSplit(*spec[0].children, batch_sizes=[rows // n] * n),)
    for item in spec:
        out = _run(site, item, x, out, None)
    return out


def _rows(x: Any) -> int:
    return x.shape[0]


def _input(site: SiteView, ad: Any, x: Any, rows: slice | None) -> Any:
    t = x if ad.entry is None else site.entry_input(ad.entry)
    return t if rows is None else t[rows]


def _run(site: SiteView, item: Any, x: Any, out: Any, rows: slice | None, stacked: bool = True) -> Any:
    if isinstance(item, str):
        ad = site.live.get(item)
        if ad is None:
            return out
        if ad.action is Action.COMPOSE:
            return _fuse(site, ad, ad.members, x, out, rows)
        if ad.action is Action.INPUT:
            if stacked:  # it ran before the base, in the site's pre-hook
                return out
            raise CompositionError(
                f"delta {item!r} transforms its sites' input, which runs before the base and so only as a plain "
                "name or in a Stack, not inside Average or BatchSplit; activate it by name"
            )
        return site.apply(ad, _input(site, ad, x, rows), out, False)
    if isinstance(item, Fuse):
        ad = site.live.get(item.fusion)  # type: ignore[arg-type]
        # a Fuse names a fusion delta, whose adapter holds its members' names
        return out if ad is None else _fuse(site, ad, ad.members, x, out, rows)
    if isinstance(item, Stack):
        for c in item.children:
            out = _run(site, c, x, out, rows, stacked)
        return out
    if isinstance(item, Average):
        acc = None
        for c, w in zip(item.children, item.weights, strict=True):
            o = _run(site, c, x, out, rows, False)
            if o is out:
                continue
            d = (o - out) * w
            acc = d if acc is None else acc + d
        return out if acc is None else out + acc
    if isinstance(item, BatchSplit):
        n = out.shape[0] if out is not None else _rows(x)
        if sum(item.batch_sizes) != n:
            raise CompositionError(
                f"{item!r}: batch_sizes sum to {sum(item.batch_sizes)} but site {site.path!r} got a batch "
                f"of {n} rows; give sizes that sum to the batch size"
            )
        pieces, start = [], 0
        base = rows.start if rows is not None else 0
        for c, s in zip(item.children, item.batch_sizes, strict=True):
            sub = slice(base + start, base + start + s)
            pieces.append(_run(site, c, x, None if out is None else out[start : start + s], sub, False))
            start += s
        return torch.cat(pieces)
    raise CompositionError(f"{item!r} cannot run at a site")  # Parallel is unwrapped in `run`


def _fuse(site: SiteView, fusion: Any, members: tuple[str, ...], x: Any, out: Any, rows: slice | None) -> Any:
    contributions = []
    for m in members:
        ad = site.live.get(m)
        if ad is not None:
            contributions.append(site.apply(ad, _input(site, ad, x, rows), out, False) - out)
    if not contributions:
        return out
    if len(contributions) != len(members):
        raise CompositionError(
            f"fusion at {site.path!r} needs all of {list(members)} there, but only "
            f"{len(contributions)} are present; re-inject the missing adapters"
        )
    return fusion.fuse(out, contributions)


def stacked_names(spec: tuple[Any, ...]) -> list[str]:
    """The names that run one after the other at a site, in order: plain names and Stacks
    (the only places an input transform is defined; `use` checks the others)."""
    out: list[str] = []
    for item in spec:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Stack):
            out.extend(stacked_names(item.children))
    return out


def replacing_first(spec: tuple[Any, ...], live: dict[str, Any]) -> tuple[Any, ...]:
    """A plain spec with the deltas that replace this site's output moved to the front (stable)."""
    if any(type(n) is not str for n in spec):
        return spec
    return tuple(sorted(spec, key=lambda n: not (n in live and live[n].replaces)))


def first_live(spec: tuple[Any, ...], live: dict[str, Any]) -> Any | None:
    """The adapter that runs first at a site whose spec is plain names, else None."""
    for item in spec:
        if type(item) is not str:
            return None
        ad = live.get(item)
        if ad is not None:
            return ad
    return None
