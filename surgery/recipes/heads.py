"""Task heads on a shared backbone, multi-task routing, and transformers' own head layout.

`heads` adds named heads to a model as one delta of the method "head" (surgery/methods/head.py),
so the hub stores and restores them like any delta; ``model(**batch, task=...)`` picks one per
call and `route_tasks` each row's. `heads_to_hf` / `heads_from_hf` move a head to and from
``AutoModelFor{Sequence,Token}Classification``. docs/heads.md.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from surgery import engine
from surgery.errors import ConfigError
from surgery.methods.head import (
    TASK_ROUTES,
    HeadMethod,
    TaskHeads,
    backbone_of,
    head_deltas,
    hidden_size,
    home,
    resolve,
    task_rows,
)


def heads(model: nn.Module, spec: dict[str, Any], *, name: str = "heads", pooling: str | None = None) -> TaskHeads:
    """Add task heads to `model` (task name -> head): ``8`` (classification, 8 labels), ``1``
    (regression), ``("token", 9)`` (token classification), ``"lm_head"`` (a causal LM's own head),
    or a dict of kind / num_labels / pooling / bias / dropout. They go into the delta `name` (added
    to it if it is there already); returns its heads (``heads["sections"]`` is that head's Linear).

    Only the heads train afterwards (with the backbone frozen, as after any injection; unfreeze
    it or inject LoRA to tune it too). ConfigError, with nothing added, for a name already taken
    (a head, an attribute of the model), an unknown kind, num_labels < 1."""
    engine.check_model(model)
    if name not in engine.names(model):
        engine.inject(model, HeadMethod.name, name=name, heads=spec, pooling=pooling)
        return head_deltas(model)[name]
    have = head_deltas(model).get(name)
    if have is None:
        raise ConfigError(
            f"delta {name!r} is a {engine.method_of(model, name).name!r} delta, not heads; pick another name"
        )
    if name in engine.merged(model):
        raise ConfigError(f"heads {name!r} are merged (frozen); surgery.unmerge(model, {name!r}) before adding heads")
    cfg = engine.config_of(model, name)
    HeadMethod.Config(heads=spec, pooling=pooling)  # validated as a whole before anything changes
    new = resolve(model, spec, pooling or cfg.pooling)
    have.add(new)
    cfg.heads = {**cfg.heads, **new}
    engine.reconfigure(model, name, cfg, engine.method_of(model, name).config_dict(cfg))
    return have


def tasks(model: nn.Module) -> list[str]:
    """The model's task names, over all its head deltas, in the order they were added."""
    return [t for ad in head_deltas(model).values() for t in ad.specs]


@contextlib.contextmanager
def route_tasks(model: nn.Module, task_ids: Sequence[str | int] | torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """Within this context (this thread / asyncio task only), row i of each batch `model` runs goes
    to the head of ``task_ids[i]`` (a task name, or its index in `tasks(model)`): one backbone pass,
    and the model returns a `TaskOutputs` (per task: the logits of its rows, `rows[task]` their
    positions, its loss when ``labels=`` is given). Yields task -> rows."""
    engine.check_model(model)
    plan = task_rows(model, task_ids)
    key = engine.context_key(model)
    assert key is not None
    cur = TASK_ROUTES.get()
    tok = TASK_ROUTES.set({**(cur or {}), key: plan})
    try:
        yield plan
    finally:
        TASK_ROUTES.reset(tok)


# ---------------------------------------------------------------------------- transformers' layout


def _find(model: nn.Module, task: str) -> tuple[str, TaskHeads]:
    for n, ad in head_deltas(model).items():
        if task in ad.specs:
            return n, ad
    raise ConfigError(f"no head for task {task!r}; the heads there are: {tasks(model) or 'none'}")


def _hf_class(kind: str) -> Any:
    import transformers

    if kind not in ("sequence", "token"):
        raise ConfigError(f"an {kind!r} head is the model's own; transformers' layout is that of the model itself")
    return getattr(transformers, f"AutoModelFor{'Sequence' if kind == 'sequence' else 'Token'}Classification")


def _hf_pooling(model: nn.Module) -> str:
    """How transformers' one-linear sequence heads pool: the pooler (BERT), else the last non-pad token."""
    return "pooler" if isinstance(getattr(backbone_of(model), "pooler", None), nn.Module) else "last"


def _head_keys(keys: list[str], prefix: str, what: str) -> tuple[str, bool]:
    """The one linear layer of a transformers head: its key prefix and whether it has a bias."""
    rest = sorted(k for k in keys if not k.startswith(prefix + "."))
    stems = {k.rsplit(".", 1)[0] for k in rest}
    if len(stems) != 1 or not {f"{s}.weight" for s in stems} <= set(rest) or len(rest) > 2:
        raise ConfigError(f"{what}'s head is not one linear layer ({rest}); there is no layout to map a task head to")
    stem = stems.pop()
    return stem, f"{stem}.bias" in rest


def heads_to_hf(model: nn.Module, task: str) -> dict[str, torch.Tensor]:
    """A state dict for transformers' ``AutoModelForSequenceClassification`` (a sequence head) or
    ``...ForTokenClassification`` (a token head) of the model's architecture with
    ``config.num_labels`` the head's: the backbone's weights and the head in that class's layout
    (BERT's ``classifier.weight/bias``, Llama's ``score.weight``). Tensors are the model's own
    (detached, not copied). ConfigError when that class's head is not one linear layer, pools
    otherwise than the head, or another unmerged delta would be left out of the backbone."""
    name, ad = _find(model, task)
    spec = ad.specs[task]
    cls = _hf_class(spec["kind"])
    others = [n for n in engine.names(model) if n not in head_deltas(model) and n not in engine.merged(model)]
    if others:
        raise ConfigError(
            f"heads_to_hf: delta(s) {others} change the backbone but are not merged; merge them first "
            f"(surgery.merge(model, {others[0]!r})) so the exported backbone computes what the head was trained on"
        )
    cfg: Any = copy.deepcopy(getattr(model, "config", None))
    cfg.num_labels = spec["num_labels"]
    with torch.device("meta"):
        hf = cls.from_config(cfg)
    prefix = hf.base_model_prefix
    want = hf.state_dict()
    stem, bias = _head_keys(list(want), prefix, type(hf).__name__)
    if spec["kind"] == "sequence" and spec["pooling"] != _hf_pooling(model):
        raise ConfigError(
            f"heads_to_hf: {type(hf).__name__} pools by {_hf_pooling(model)!r} but head {task!r} by "
            f"{spec['pooling']!r}; only a head with pooling={_hf_pooling(model)!r} has its layout"
        )
    lin = ad[task]
    assert isinstance(lin, nn.Linear)
    if lin.bias is not None and not bias:
        raise ConfigError(
            f"heads_to_hf: head {task!r} has a bias and {type(hf).__name__}'s head has none; use bias=False"
        )
    backbone = backbone_of(model)
    have = {k: v for k, v in backbone.state_dict(keep_vars=False).items() if ".surgery." not in f".{k}"}
    out: dict[str, torch.Tensor] = {}
    for key in want:
        if key.startswith(prefix + "."):
            src = key[len(prefix) + 1 :]
            if src not in have:
                raise ConfigError(f"heads_to_hf: {type(hf).__name__} needs {key!r}, which the backbone lacks")
            out[key] = have[src]
    out[f"{stem}.weight"] = lin.weight.detach()
    if bias:
        out[f"{stem}.bias"] = lin.bias.detach() if lin.bias is not None else torch.zeros_like(lin.weight[:, 0])
    return out


def heads_from_hf(
    model: nn.Module,
    task: str,
    hf: nn.Module | dict[str, torch.Tensor],
    *,
    kind: str | None = None,
    name: str = "heads",
) -> TaskHeads:
    """Add a head `task` to `model` from transformers' ``...ForSequenceClassification`` /
    ``...ForTokenClassification`` of the same architecture (a model or its state dict; `kind`
    "sequence" or "token" says which for a state dict). Only the head is taken; it pools as that
    class does. Returns the heads of delta `name`."""
    if isinstance(hf, nn.Module):
        kind = kind or ("token" if "TokenClassification" in type(hf).__name__ else "sequence")
        prefix, sd = str(hf.base_model_prefix), hf.state_dict()
    else:
        prefix, sd = str(getattr(model, "base_model_prefix", "")), hf
    kind = kind or "sequence"
    if kind not in ("sequence", "token"):
        raise ConfigError(f"heads_from_hf: kind must be 'sequence' or 'token', got {kind!r}")
    stem, bias = _head_keys(list(sd), prefix, type(hf).__name__ if isinstance(hf, nn.Module) else "the state dict")
    w = sd[f"{stem}.weight"]
    spec: dict[str, Any] = {"kind": kind, "num_labels": int(w.shape[0]), "bias": bias}
    if kind == "sequence":
        spec["pooling"] = _hf_pooling(model)
    if w.shape[1] != (d := hidden_size(model)):
        raise ConfigError(f"heads_from_hf: the head reads {w.shape[1]} features but this backbone gives {d}")
    out = heads(model, {task: spec}, name=name)
    lin = out[task]
    assert isinstance(lin, nn.Linear)
    with torch.no_grad():
        lin.weight.copy_(w)
        if lin.bias is not None:
            lin.bias.copy_(sd[f"{stem}.bias"])
    return out


__all__ = ["heads", "heads_from_hf", "heads_to_hf", "home", "route_tasks", "tasks"]
