"""model-surgery: locate sites in a pretrained model, inject small trainable
modules there, merge, unmerge, and move what they learned as Deltas.

    import surgery
    surgery.inject(model, "lora", targets="attn.*", r=8)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from surgery import methods as _methods  # noqa: F401  (fills the method table)
from surgery import rl
from surgery.combine import combine
from surgery.compose import Average, BatchSplit, Fuse, Parallel, Stack
from surgery.delta import Delta, apply, delta, fingerprint
from surgery.engine import (
    Injection,
    activate,
    active,
    base_state_dict,
    disable,
    freeze,
    inject,
    merge,
    merged,
    names,
    remove,
    unfreeze,
    unmerge,
    use,
)
from surgery.errors import (
    CollectiveError,
    CompositionError,
    ConfigError,
    DeltaMismatchError,
    GraphError,
    InjectionError,
    MergeError,
    ModelTypeError,
    SelectorError,
    SlotError,
    SurgeryError,
)
from surgery.methods import METHODS
from surgery.methods.diffpruning import l0_loss
from surgery.methods.fusion import fuse, fusion_weights
from surgery.methods.moe import aux_loss
from surgery.methods.sparse import sparse_delta, sparse_from_dense
from surgery.quantize import dequantize, quantize
from surgery.recipes.ewc import EWC
from surgery.recipes.heads import heads, heads_from_hf, heads_to_hf, route_tasks, tasks
from surgery.recipes.partial import partial
from surgery.recipes.schedule import Schedule
from surgery.recipes.tasks import TaskSampler
from surgery.rl.reference import ReferenceCheckError, reference
from surgery.rl.reward import RewardModel
from surgery.selectors import Sel, Site, layers, sel
from surgery.serving import Prepared, SlotBank, route, serve
from surgery.sparse_finetune import SparseFinetune
from surgery.summary import Summary, summary
from surgery.template import Template
from surgery.to_lora import LoraFit, to_lora

if TYPE_CHECKING:
    import torch
    from torch import nn

__import__("surgery.help").help.document(inject)  # help(surgery.inject) lists every method's config keys

__version__ = "0.1.0"


def find(
    model: nn.Module,
    targets: Any = None,
    example_inputs: tuple | dict | torch.Tensor | None = None,
    *,
    method: str | None = None,
    **config: Any,
) -> list[Site]:
    """Preview the modules a selector hits: a list of `Site` (path, type, roles, and the deltas
    injected there).

    With `method=` (and its config), the preview is of what `inject(model, method, targets,
    **config)` would do, without doing it: the sites it would attach to (its default targets when
    `targets` is None), each with the trainable parameters it would add and whether it could
    merge (True, or the reason it cannot).

    Roles are shown when the model's graph can be built (it is built here if the
    selector needs roles, or if `example_inputs` are given; otherwise it is
    tried and skipped quietly when the model cannot be traced without inputs).
    `transformers` models need no inputs: dummy ones are built from the model and
    its config. A role selector on a model that cannot be traced that way raises
    `GraphError`; call `surgery.trace(model, inputs)` once (or pass `example_inputs`)."""
    from surgery import engine, graph
    from surgery.methods.base import NotMergeable, SiteView, get_method
    from surgery.selectors import no_hit_error, select

    engine.check_model(model)

    def skip(path: str) -> bool:
        return engine.is_adapter_path(model, path)

    if example_inputs is not None:
        graph.build_graph(model, example_inputs)
    if method is not None:
        m = get_method(method)
        cfg = m.config(**config)
        hits = engine.resolve_sites(model, m, targets, cfg)
    elif config:
        raise ConfigError(f"config {sorted(config)} given without method=; pass method='lora' (say) with it")
    elif targets is None:
        raise SelectorError("surgery.find needs targets (a selector), or method= to preview its default targets")
    else:
        hits = select(model, targets, skip=skip)
        if not hits:
            raise no_hit_error(model, targets, skip=skip)
    try:
        roles = graph.roles(model)
    except GraphError:
        roles = {}
    here = engine.sites_of(model)
    out = []
    for p, mod in hits:
        site = Site(p, type(mod).__name__, roles.get(p, frozenset()), tuple(here.get(p, {})))
        if method is not None:
            view = SiteView(model, p, mod)
            ad = m.make(view, cfg)  # built aside, never attached
            rule = ad.merge(view)
            merge: bool | str = rule.reason if isinstance(rule, NotMergeable) else True
            if not isinstance(
                rule, NotMergeable
            ):  # a rule that would write into a 4-bit weight is refused at merge time
                merge = engine.refuse_4bit(view, "(preview)", rule) or True
            site = dataclasses.replace(site, trainable=sum(t.numel() for t in ad.parameters()), mergeable=merge)
        out.append(site)
    return out


def trace(model: nn.Module, example_inputs: tuple | dict | torch.Tensor | None = None) -> None:
    """Build (and cache) the model's dataflow graph now; role selectors (`@q`, `@mlp`, ...) then read it.

    `example_inputs` is one batch the model's forward accepts: a tensor, a tuple of positional
    args or a dict of keyword args (values do not matter, shapes and types do). It is needed only
    when the model cannot be traced on its own: a plain module that `torch.fx.symbolic_trace`
    cannot follow, or a `transformers` model whose dummy inputs (built from its config) do not run.
    Given inputs, the graph is rebuilt from them, replacing any cached graph and roles.
    Raises `GraphError` (saying what failed) when even these inputs cannot be traced."""
    from surgery import engine, graph

    engine.check_model(model)
    if example_inputs is not None:
        graph.clear_cache(model)
    graph.build_graph(model, example_inputs)


__all__ = [
    "ReferenceCheckError",
    "RewardModel",
    "dequantize",
    "quantize",
    "reference",
    "rl",
    "Average",
    "BatchSplit",
    "CompositionError",
    "Fuse",
    "Parallel",
    "Stack",
    "fuse",
    "fusion_weights",
    "CollectiveError",
    "ConfigError",
    "Delta",
    "DeltaMismatchError",
    "GraphError",
    "Injection",
    "InjectionError",
    "METHODS",
    "MergeError",
    "Sel",
    "SelectorError",
    "Site",
    "Summary",
    "SurgeryError",
    "Template",
    "activate",
    "active",
    "apply",
    "delta",
    "disable",
    "find",
    "fingerprint",
    "freeze",
    "inject",
    "layers",
    "merge",
    "merged",
    "names",
    "remove",
    "sel",
    "summary",
    "trace",
    "unfreeze",
    "unmerge",
    "use",
    "combine",
    "aux_loss",
    "l0_loss",
    "sparse_delta",
    "sparse_from_dense",
    "SparseFinetune",
    "EWC",
    "Schedule",
    "TaskSampler",
    "heads",
    "heads_from_hf",
    "heads_to_hf",
    "partial",
    "route_tasks",
    "tasks",
    "LoraFit",
    "to_lora",
    "ModelTypeError",
    "base_state_dict",
    "Prepared",
    "SlotBank",
    "SlotError",
    "route",
    "serve",
]
