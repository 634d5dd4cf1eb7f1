r"""Task heads on a shared backbone: one delta holds named heads (classification, regression,
token classification, or the reuse of a causal LM's own head), and a call chooses one by
``model(**batch, task="name")``, or routes each row to its head (`surgery.route_tasks`).

A sequence head pools the backbone's last hidden states :math:`H \in \mathbb{R}^{T \times d}`
into one vector :math:`h` ("pooler": the backbone's own pooler output, BERT's; "cls": :math:`H_0`;
"mean": the mean over the attention mask; "last": the last non-pad position, as decoders do) and
gives :math:`W h + b`; a token head gives :math:`W H_t + b` at every position. The delta's tensors
are the heads' weights alone; the backbone runs once per call, unchanged.

How a call gets its head: the model's root forward pre-hook (`Method.prepare_inputs`) takes
``task=`` (and ``labels=``) out of the call, a forward hook on the backbone keeps its output and
its attention mask, and a forward hook on the model puts the head's output in place of the
model's. Without ``task=`` and outside `route_tasks` nothing of this runs: the model's outputs
are the base's, bit for bit. Which rows go to which head is a per-call input (a `ContextVar`),
never module state. Usage, pooling, losses, the hub and transformers' layout: docs/heads.md.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import ConfigError, SurgeryError
from surgery.methods.base import Action, Adapter, Merge, Method, MethodConfig, SiteView, register

KINDS = ("sequence", "token", "lm")
POOLINGS = ("pooler", "cls", "mean", "last")
_KEYS = {"kind", "num_labels", "pooling", "bias", "dropout", "module"}

# token of a model's state -> task -> the batch rows that go to its head (`route_tasks`)
TASK_ROUTES: ContextVar[dict[int, dict[str, torch.Tensor]] | None] = ContextVar("surgery_task_routes", default=None)


@dataclass
class HeadConfig(MethodConfig):
    """Attributes:
    heads: task name -> its head (required): num_labels (an int: classification, 1: regression),
        ("token", num_labels), "lm_head" (a causal LM's own head), or a dict of kind, num_labels,
        pooling, bias, dropout.
    pooling: how sequence heads pool when a head does not say: "pooler", "cls", "mean" or "last"
        (default: the backbone's pooler if it has one, else "cls" for encoders, "last" for decoders).
    """

    heads: dict[str, Any] | None = None
    pooling: str | None = None


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def head_spec(task: Any, v: Any) -> dict[str, Any]:
    """One head's spec as a dict from its short forms; ConfigError for what makes no sense."""
    if not isinstance(task, str) or not task.replace("_", "").replace("-", "").isalnum() or len(task) > 64:
        raise ConfigError(f"head name {task!r} must be 1-64 letters, digits, '_' or '-'")
    if _int(v):
        spec: dict[str, Any] = {"kind": "sequence", "num_labels": v}
    elif isinstance(v, (tuple, list)) and len(v) == 2:
        spec = {"kind": v[0], "num_labels": v[1]}
    elif isinstance(v, str):
        spec = {"kind": "lm", "module": v}
    elif isinstance(v, dict):
        spec = {"kind": "sequence", **v}
    else:
        raise ConfigError(
            f"head {task!r}: {v!r} is no head; give num_labels (8), ('token', 9), 'lm_head' or a dict of "
            f"{sorted(_KEYS)}"
        )
    if unknown := sorted(set(spec) - _KEYS):
        raise ConfigError(f"head {task!r}: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    kind = spec["kind"]
    if kind not in KINDS:
        raise ConfigError(f"head {task!r}: unknown head kind {kind!r}; kinds: {list(KINDS)}")
    if kind == "lm":
        if not isinstance(spec.get("module"), str) or "num_labels" in spec:
            raise ConfigError(f"head {task!r}: an 'lm' head reuses the model's own head: give its module, 'lm_head'")
        return spec
    n = spec.get("num_labels")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"head {task!r}: num_labels must be an integer >= 1, got {n!r}")
    if spec.get("pooling") is not None and (kind != "sequence" or spec["pooling"] not in POOLINGS):
        raise ConfigError(
            f"head {task!r}: pooling is for sequence heads, one of {list(POOLINGS)}; got {spec['pooling']!r}"
        )
    p = spec.get("dropout", 0.0)
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
        raise ConfigError(f"head {task!r}: dropout must be in [0, 1), got {p!r}")
    if not isinstance(spec.get("bias", True), bool):
        raise ConfigError(f"head {task!r}: bias must be True or False, got {spec['bias']!r}")
    return spec


class TaskHeads(Adapter):
    """The heads of one delta: `task_heads[task]` is a task's `nn.Linear` (none for an "lm" head,
    which is the model's own). Indexing by task name gives that module."""

    action = Action.OUTPUT

    def __init__(self, specs: dict[str, dict[str, Any]], dim: int, like: torch.Tensor) -> None:
        super().__init__()
        self.specs: dict[str, dict[str, Any]] = {}
        self.task_heads = nn.ModuleDict()
        self.dim, self.like = (
            dim,
            (like.device, torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype),
        )
        self.folded = False
        # thread -> what the call in flight on it asked for (set by the root pre-hook, taken by the model's hook)
        self.pending: dict[int, Call] = {}
        self.add(specs)

    def add(self, specs: dict[str, dict[str, Any]]) -> None:
        for task, spec in specs.items():
            if spec["kind"] != "lm":
                device, dtype = self.like
                lin = nn.Linear(self.dim, spec["num_labels"], bias=spec["bias"], device=device, dtype=dtype)
                with torch.no_grad():  # transformers' init of its heads
                    lin.weight.normal_(0.0, 0.02)
                    if lin.bias is not None:
                        lin.bias.zero_()
                self.task_heads[task] = lin
            self.specs[task] = spec

    def __getitem__(self, task: str) -> nn.Module:
        if task not in self.task_heads:
            why = "it reuses the model's own head" if task in self.specs else f"heads: {sorted(self.specs)}"
            raise ConfigError(f"no head module {task!r} here ({why})")
        return self.task_heads[task]

    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    def extra_repr(self) -> str:
        return ", ".join(
            f"{t}={s['kind']}" + (f"({s['num_labels']})" if "num_labels" in s else "") for t, s in self.specs.items()
        )

    def contribute(self, x: torch.Tensor, out: Any, inplace: bool = False) -> Any:
        return out  # the heads act from their own hooks, only on a call that names a task

    def merge(self, site: SiteView) -> Merge:
        return {}  # nothing to fold into the base: merge leaves the heads as they are (`HeadMethod.fold`)


@dataclass
class Call:
    """What one model call asked of the heads: its tasks (name -> the heads holding it, rows or
    None for all), its labels, and what the backbone gave."""

    tasks: dict[str, tuple[TaskHeads, torch.Tensor | None]]
    routed: bool
    labels: Any
    seen: dict[str, Any] | None = None


@register
class HeadMethod(Method):
    name = "head"
    Config = HeadConfig
    default_targets = nn.Module  # the heads sit where `place` says, whatever the selector
    tensor_suffixes = ("task_heads.*",)
    changes_inputs: ClassVar[bool] = True

    def validate(self, cfg: HeadConfig) -> None:
        if not isinstance(cfg.heads, dict) or not cfg.heads:
            raise ConfigError(
                "head: heads= is required, task name -> head, e.g. heads={'sections': 8, 'ner': ('token', 9)}"
            )
        for task, v in cfg.heads.items():
            head_spec(task, v)
        if cfg.pooling is not None and cfg.pooling not in POOLINGS:
            raise ConfigError(f"head: pooling must be one of {list(POOLINGS)}, got {cfg.pooling!r}")

    def supports(self, module: nn.Module) -> bool:
        return True

    def place(self, model: nn.Module, hits: list[tuple[str, nn.Module]], cfg: HeadConfig) -> list:
        path, module = home(model)
        if not any(m is module for _, m in hits):
            raise ConfigError(f"head: task heads sit at {path!r} (they read the backbone's output); leave targets= out")
        return [(path, module)]

    def refresh(self, adapter: Adapter, path: str, cfg: HeadConfig) -> None:
        if isinstance(adapter, TaskHeads):  # a hot-swapped Delta's specs (pooling, dropout) come with its tensors
            adapter.specs = {t: dict(v) for t, v in (cfg.heads or {}).items()}

    def make(self, site: SiteView, cfg: HeadConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        model = site.model
        where, _ = home(model)
        if site.path != where:
            raise ConfigError(f"head: task heads sit at {where!r} (the backbone), not {site.path!r}")
        specs = resolve(model, cfg.heads or {}, cfg.pooling)
        cfg.heads = specs  # stored resolved: a Delta read back needs no model to know its heads
        ad = TaskHeads(specs, hidden_size(model), _first_weight(model))
        ad.__dict__["_hooks_for"] = model  # taken by `attached`
        return ad

    def attached(self, adapters: dict[str, Adapter]) -> None:
        for ad in adapters.values():
            model = ad.__dict__.pop("_hooks_for", None)
            if model is not None and isinstance(ad, TaskHeads):
                backbone = backbone_of(model)
                hooks = [backbone.register_forward_hook(_Backbone(ad, backbone, backbone is model), with_kwargs=True)]
                if backbone is not model:
                    hooks.append(model.register_forward_hook(_Root(ad)))
                ad.__dict__["hooks"] = hooks

    def detached(self, adapters: dict[str, Adapter]) -> None:
        for ad in adapters.values():
            for h in ad.__dict__.pop("hooks", []):
                h.remove()

    def fold(self, adapters: dict[str, Adapter]) -> bool:
        for ad in adapters.values():
            ad.__dict__["folded"] = True
        return True

    def unfold(self, adapters: dict[str, Adapter]) -> bool:
        for ad in adapters.values():
            ad.__dict__["folded"] = False
        return True

    def folded(self, adapters: dict[str, Adapter]) -> bool:
        return any(getattr(ad, "folded", False) for ad in adapters.values())

    def prepare_inputs(
        self, model: nn.Module, spec: tuple[Any, ...], args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        from surgery import engine

        heads = head_deltas(model)
        tid = threading.get_ident()
        for ad in heads.values():  # what a failed call may have left
            ad.pending.pop(tid, None)
        task = kwargs.get("task")
        routes = TASK_ROUTES.get()
        route: dict[str, torch.Tensor | None] | None = None
        if routes is not None:
            route = dict(routes.get(engine.context_key(model) or -1) or {}) or None
        if task is None and route is None:
            return None if "task" not in kwargs else (args, {k: v for k, v in kwargs.items() if k != "task"})
        kwargs = {k: v for k, v in kwargs.items() if k != "task"}
        active = {n: ad for n, ad in heads.items() if n in spec}
        if task is not None:  # task= wins over a route_tasks around the call; one per row routes them
            route = {task: None} if isinstance(task, str) else dict(task_rows(model, task))
            task = task if isinstance(task, str) else None
        assert route is not None
        tasks = {t: (find_head(model, t, active, heads), rows) for t, rows in route.items()}
        if task is not None and tasks[task][0].specs[task]["kind"] == "lm":
            return args, kwargs  # the model's own head: its own output, loss and cache
        if not any(ad.specs[t]["kind"] == "lm" for t, (ad, _) in tasks.items()):
            fwd = inspect.signature(type(model).forward).parameters
            if "logits_to_keep" in fwd and "logits_to_keep" not in kwargs:
                kwargs["logits_to_keep"] = 1  # a causal LM's vocabulary logits go unused: compute one position
        lead = next(iter(heads.values()))
        lead.pending[tid] = Call(tasks, task is None, kwargs.pop("labels", None))
        return args, kwargs


def task_rows(model: nn.Module, task_ids: Any) -> dict[str, torch.Tensor]:
    """Task -> its rows, from one task per row (a name, or an index into the model's tasks)."""
    known = [t for ad in head_deltas(model).values() for t in ad.specs]
    if not known:
        raise ConfigError("the model has no task heads; add them with surgery.heads(model, {...})")
    ids = task_ids.tolist() if isinstance(task_ids, torch.Tensor) else task_ids
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or not ids:
        raise ConfigError(f"task ids must be one task per row (names or indices), got {task_ids!r}")
    rows: dict[str, list[int]] = {}
    for i, t in enumerate(ids):
        if isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(known):
            t = known[t]
        if t not in known:
            raise ConfigError(f"row {i} asks for task {t!r}, which has no head; the heads there are: {known}")
        rows.setdefault(t, []).append(i)
    return {t: torch.tensor(r, dtype=torch.long) for t, r in rows.items()}


def head_deltas(model: nn.Module) -> dict[str, TaskHeads]:
    """The model's head deltas by name, in injection order."""
    from surgery import engine

    out: dict[str, TaskHeads] = {}
    for n in engine.names(model):
        if engine.method_of(model, n).name == HeadMethod.name:
            out[n] = next(iter(engine.adapters(model, n).values()))  # type: ignore[assignment]
    return out


def find_head(model: nn.Module, task: str, active: dict[str, TaskHeads], heads: dict[str, TaskHeads]) -> TaskHeads:
    """The active heads delta holding `task`, or ConfigError naming the heads there are."""
    for ad in active.values():
        if task in ad.specs:
            return ad
    off = [n for n, ad in heads.items() if task in ad.specs]
    if off:
        raise ConfigError(
            f"task {task!r} is a head of delta {off[0]!r}, which is not active in this context; "
            f"surgery.use(model, {off[0]!r}) or leave it active"
        )
    have = [t for ad in heads.values() for t in ad.specs]
    raise ConfigError(f"no head for task {task!r}; the heads there are: {have or 'none'}")


def backbone_of(model: nn.Module) -> nn.Module:
    b = getattr(model, "base_model", None)
    return b if isinstance(b, nn.Module) else model


def home(model: nn.Module) -> tuple[str, nn.Module]:
    """Where a model keeps its heads: the backbone (`base_model`) when the model wraps one, else the
    input embedding (a Delta's tensors are keyed by a module path, and the root has none)."""
    backbone = backbone_of(model)
    get = getattr(model, "get_input_embeddings", None)
    want = backbone if backbone is not model else (get() if callable(get) else None)
    for path, m in model.named_modules():
        if want is not None and m is want and path:
            return path, m
    raise ConfigError(
        f"task heads need a transformers model (a backbone with last_hidden_state and an input embedding); "
        f"{type(model).__name__} has neither"
    )


def _text_config(model: nn.Module) -> Any:
    cfg: Any = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def hidden_size(model: nn.Module) -> int:
    d = getattr(_text_config(model), "hidden_size", None)
    if isinstance(d, int):
        return d
    get: Any = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        return emb.embedding_dim
    raise ConfigError(f"task heads: cannot tell the hidden size of {type(model).__name__} (no config.hidden_size)")


def _first_weight(model: nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters() if p.is_floating_point())


def default_pooling(model: nn.Module) -> str:
    """transformers' own choice: the pooler where the backbone has one (BERT), the first token for
    other encoders, the last non-pad token for decoders."""
    if isinstance(getattr(backbone_of(model), "pooler", None), nn.Module):
        return "pooler"
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(getattr(model, "config", None), "model_type", None)
    return "cls" if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"


def resolve(model: nn.Module, heads: dict[str, Any], pooling: str | None) -> dict[str, dict[str, Any]]:
    """The heads' specs with every default filled in for `model`; ConfigError for a name taken
    (a head of another delta, an attribute of the model) or an "lm" head the model lacks."""
    out: dict[str, dict[str, Any]] = {}
    taken = {t: n for n, ad in head_deltas(model).items() for t in ad.specs}
    for task, v in heads.items():
        spec = head_spec(task, v)
        if task in taken:
            raise ConfigError(f"a head named {task!r} exists already (in delta {taken[task]!r}); pick another name")
        if hasattr(model, task):
            raise ConfigError(
                f"{task!r} is an attribute of {type(model).__name__}: a head of that name would be ambiguous; "
                "pick another name"
            )
        if spec["kind"] == "lm":
            get: Any = getattr(model, "get_output_embeddings", None)
            out_emb = get() if callable(get) else None
            try:
                named = model.get_submodule(spec["module"])
            except AttributeError:
                named = None
            if out_emb is None or named is not out_emb:
                raise ConfigError(
                    f"head {task!r}: {spec['module']!r} is not {type(model).__name__}'s own LM head (its output "
                    "embeddings); an 'lm' head reuses a causal LM's head, e.g. {'lm': 'lm_head'} on a ...ForCausalLM"
                )
        elif spec["kind"] == "sequence":
            spec.setdefault("pooling", None)
            spec["pooling"] = spec["pooling"] or pooling or default_pooling(model)
            spec.setdefault("bias", spec["pooling"] != "last")  # transformers' decoder heads have none
        if spec["kind"] != "lm":
            spec.setdefault("bias", True)
            spec.setdefault("dropout", 0.0)
        out[task] = spec
    return out


# ---------------------------------------------------------------------------- the call


class _Backbone:
    """Forward hook on the backbone: keeps its output and the mask of the call for the heads (and,
    when the backbone is the model, puts the heads' output in place of its own)."""

    def __init__(self, heads: TaskHeads, backbone: nn.Module, is_model: bool) -> None:
        self.heads, self.is_model = heads, is_model
        self.params = list(inspect.signature(backbone.forward).parameters)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        call = self.heads.pending.get(threading.get_ident())
        if call is None or call.seen is not None:
            return None
        given = {**dict(zip(self.params, args, strict=False)), **kwargs}
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        call.seen = {
            "hidden": hidden,
            "pooler": getattr(out, "pooler_output", None),
            "mask": given.get("attention_mask"),
            "ids": given.get("input_ids"),
        }
        return _Root(self.heads)(module, args, out) if self.is_model else None


class _Root:
    """Forward hook on the model: the heads' output in place of the model's."""

    def __init__(self, heads: TaskHeads) -> None:
        self.heads = heads

    def __call__(self, module: nn.Module, args: tuple, out: Any) -> Any:
        call = self.heads.pending.pop(threading.get_ident(), None)
        if call is None:
            return None
        if call.seen is None:
            raise SurgeryError("task heads: the backbone did not run in this call; call the whole model")
        return outputs(module, call, out)


def _pad_id(model: nn.Module) -> int | None:
    pad = getattr(_text_config(model), "pad_token_id", None)
    return pad if _int(pad) else None


def pool(how: str, seen: dict[str, Any], rows: torch.Tensor | None, pad: int | None) -> torch.Tensor:
    """One vector per row of `rows` (None: all rows) from the backbone's output."""

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or rows is None else t[rows.to(t.device)]

    h = take(seen["hidden"])
    assert h is not None
    if how == "pooler":
        p = take(seen["pooler"])
        if p is None:
            raise ConfigError(
                "task heads: pooling 'pooler' but the backbone gave no pooler_output; use 'cls' or 'mean'"
            )
        return p
    if how == "cls":
        return h[:, 0]
    mask, ids = take(seen["mask"]), take(seen["ids"])
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == h.shape[:2]):
        mask = None if ids is None or pad is None or how == "mean" else (ids != pad)
    if how == "mean":
        if mask is None:
            return h.mean(1)
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)
    if mask is None:
        return h[:, -1]
    last = (torch.arange(h.shape[1], device=h.device) * mask.to(h.device, torch.long)).argmax(-1)
    return h[torch.arange(h.shape[0], device=h.device), last]


def _loss(spec: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = labels.to(logits.device)
    if spec["kind"] == "lm":  # next-token cross-entropy, -100 ignored (transformers' causal LM loss)
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
        return F.cross_entropy(logits.float().flatten(0, -2), shifted.flatten(), ignore_index=-100)
    n = spec["num_labels"]
    if spec["kind"] == "token":
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten().long(), ignore_index=-100)
    if n == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    if labels.is_floating_point():  # multi-label: one sigmoid per label (transformers' rule by dtype)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels.view(-1).long())


def run_head(
    ads: TaskHeads, task: str, seen: dict[str, Any], rows: torch.Tensor | None, pad: int | None, own: Any
) -> torch.Tensor:
    """One head's logits for `rows` (None: all)."""
    spec = ads.specs[task]
    if spec["kind"] == "lm":
        logits = getattr(own, "logits", None)
        if logits is None:
            raise SurgeryError(f"task {task!r}: the model gave no logits to reuse")
        return logits if rows is None else logits[rows.to(logits.device)]
    lin = ads.task_heads[task]
    assert isinstance(lin, nn.Linear)
    x = pool(spec["pooling"], seen, rows, pad) if spec["kind"] == "sequence" else seen["hidden"]
    if spec["kind"] == "token" and rows is not None:
        x = x[rows.to(x.device)]
    x = F.dropout(x.to(lin.weight.dtype), spec.get("dropout", 0.0), ads.training)
    return lin(x)


@functools.cache
def _output_classes() -> dict[str, Any]:
    from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput, TokenClassifierOutput
    from transformers.utils import ModelOutput

    @dataclasses.dataclass
    class TaskOutputs(ModelOutput):
        """A routed batch's outputs: per task, the logits of its rows (`rows[task]`, in batch order)
        and its loss; `loss` is the tasks' losses weighted by their share of the rows."""

        loss: torch.Tensor | None = None
        logits: dict[str, torch.Tensor] | None = None
        rows: dict[str, torch.Tensor] | None = None
        losses: dict[str, torch.Tensor] | None = None

    TaskOutputs.__module__ = __name__
    return {
        "sequence": SequenceClassifierOutput,
        "token": TokenClassifierOutput,
        "lm": CausalLMOutput,
        "routed": TaskOutputs,
    }


def outputs(model: nn.Module, call: Call, own: Any) -> Any:
    """The heads' output for a call: transformers' output of the task's kind for `task=`, a
    `TaskOutputs` for a routed batch."""
    seen, pad, labels = call.seen or {}, _pad_id(model), call.labels
    classes = _output_classes()
    batch = seen["hidden"].shape[0]
    if not call.routed:
        task, (ads, _) = next(iter(call.tasks.items()))
        one = run_head(ads, task, seen, None, pad, own)
        loss = None if labels is None else _loss(ads.specs[task], one, labels)
        return classes[ads.specs[task]["kind"]](loss=loss, logits=one)
    n = sum(int(r.numel()) for _, r in call.tasks.values() if r is not None)
    if n != batch:
        raise ConfigError(
            f"route_tasks gave {n} task ids but the model got a batch of {batch} rows; give one task per row"
        )
    logits: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    losses: dict[str, torch.Tensor] = {}
    for task, (ads, r) in call.tasks.items():
        assert r is not None
        rows[task] = r
        logits[task] = run_head(ads, task, seen, r, pad, own)
        if labels is not None:
            got = labels[task] if isinstance(labels, dict) else labels[r.to(labels.device)]
            losses[task] = _loss(ads.specs[task], logits[task], got)
    loss = sum(losses[t] * (rows[t].numel() / batch) for t in losses) if losses else None
    return classes["routed"](loss=loss, logits=logits, rows=rows, losses=losses or None)
