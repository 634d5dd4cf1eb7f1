"""`Schedule`: layer-wise learning rates (LLRD), LP-FT and gradual unfreezing, resume-exact.

    plan = Schedule(model, lr=2e-5, layer_decay=0.8, weight_decay=0.01)
    plan.unfreeze("head", at=0).unfreeze("top", every=100)    # head first, then a block at a time, top down
    opt = plan.optimizer(torch.optim.AdamW)                   # or torch.optim.AdamW(plan.param_groups())
    for step in range(steps):
        plan.step(step)                                       # requires_grad from the step alone
        ...

Every scheduled parameter is in the optimizer from the start, grouped by (stack, depth, decay /
no decay, the step it starts training), each group with its absolute ``lr = lr * layer_decay **
(top - depth)`` and ``initial_lr`` (LR schedulers multiply it, so the depth scale survives).
Freezing is ``requires_grad=False``: no gradient is computed, and optimizers skip a parameter whose
grad is None (no moment update, no weight-decay drift). The optimizer's groups are never touched
after creation, so an optimizer state_dict resumes exactly; `step(s)` is a pure function of ``s``.
Depth comes from the model's graph (`surgery.recipes.depth`). More in docs/schedule.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery import engine
from surgery.errors import ConfigError
from surgery.recipes.depth import CHILDREN, Layout, layout
from surgery.selectors import no_hit_error, select

__all__ = ["Explanation", "Schedule"]

_FORMAT = "surgery.Schedule/1"
_STATE_FILE = "schedule.json"  # written next to the Trainer's optimizer.pt by the callback


@dataclass
class Explanation:
    """`Schedule.explain()`: one row per optimizer group; printable."""

    rows: list[dict[str, Any]]
    step: int | None
    note: str = ""
    columns: tuple[str, ...] = field(default=("group", "stack", "depth", "lr", "scale", "wd", "params", "trains from"))

    def __str__(self) -> str:
        cells = [[_cell(r[c]) for c in self.columns] for r in self.rows]
        width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(self.columns)]

        def line(vals: list[str] | tuple[str, ...]) -> str:
            return "  ".join(
                v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, width, strict=True))
            )

        at = "at step 0 (no step() yet)" if self.step is None else f"at step {self.step}"
        out = [f"scale: lr / base lr {at} (0: frozen now)", line(self.columns), *map(line, cells)]
        return "\n".join(out + ([self.note] if self.note else []))

    __repr__ = __str__


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "never" if v is None else str(v)


class Schedule:
    """Layer-wise learning rates and an unfreezing schedule over `model`'s parameters.

    `targets` (a selector) chooses the parameters to schedule; by default those trainable now (after
    ``surgery.inject``, the deltas'). `layer_decay` in (0, 1]: a parameter at depth d of a stack
    whose top is T gets ``lr * layer_decay ** (T - d)``. `no_decay`: parameters whose name or whose
    module's class name contains one of these (case-insensitive) get no weight decay. `groups`:
    selector -> lr multiplier, or -> ``{"lr_scale": x, "weight_decay": y}`` (e.g. ``{"@head": 10}``).
    `overrides`: selector -> depth or (stack, depth), where the graph's depth is not what you want.
    Without any `unfreeze` call everything scheduled trains (plain LLRD)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        layer_decay: float = 1.0,
        weight_decay: float = 0.0,
        no_decay: tuple[str, ...] = ("bias", "norm"),
        groups: Mapping[Any, Any] | None = None,
        *,
        targets: Any = None,
        overrides: Mapping[Any, Any] | None = None,
    ) -> None:
        engine.check_model(model)
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ConfigError(f"lr must be a positive number, got {lr!r}")
        if not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
            raise ConfigError(f"layer_decay must lie in (0, 1] (1: no decay; ELECTRA uses 0.8), got {layer_decay!r}")
        if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if isinstance(no_decay, str) or not all(isinstance(s, str) for s in no_decay):
            raise ConfigError(f"no_decay must be a tuple of name parts such as ('bias', 'norm'), got {no_decay!r}")
        self.model, self.lr, self.layer_decay, self.weight_decay = model, float(lr), float(layer_decay), weight_decay
        self.no_decay = tuple(s.lower() for s in no_decay)
        self.layout: Layout = layout(model, overrides)
        self._names = list(self._scope(targets))  # by name: fully_shard (FSDP2) replaces the Parameter objects
        self._scale: dict[str, tuple[float, float | None]] = {n: (1.0, None) for n in self.params}
        for selector, value in (groups or {}).items():
            scale, wd = _group_value(selector, value)
            for n in self._hits(selector, "groups"):
                self._scale[n] = (scale, wd)
        self._config = {
            "lr": self.lr,
            "layer_decay": self.layer_decay,
            "weight_decay": float(weight_decay),
            "no_decay": list(self.no_decay),
            "groups": repr(dict(groups or {})),
            "overrides": repr(dict(overrides or {})),
        }
        self.until: dict[str, int | None] = dict.fromkeys(self.params, 0)  # step a parameter starts training
        self._plan: list[list[Any]] = []
        self._built = False
        self.last_step: int | None = None

    # ------------------------------------------------------------------ what is scheduled

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """Scheduled parameter name -> the model's parameter of that name now. Read by name at each use:
        `fully_shard` (FSDP2) replaces a module's Parameters with sharded ones after the Schedule is built
        (build it on the unsharded model: its depths come from the model's graph, which a sharded model
        cannot be traced for), and the optimizer and `step` must act on those."""
        return {n: self.model.get_parameter(n) for n in self._names}

    def _scope(self, targets: Any) -> dict[str, nn.Parameter]:
        named = list(self.model.named_parameters())
        if targets is None:
            out = {n: p for n, p in named if p.requires_grad}
            if not out:
                raise ConfigError(
                    "nothing to schedule: no parameter of the model is trainable. Build the Schedule before "
                    "freezing anything, or pass targets= (a selector) to name the parameters it schedules"
                )
            return out
        hits = select(self.model, targets)
        if not hits:
            raise ConfigError(f"targets: {no_hit_error(self.model, targets)}")
        ids = {id(p) for _, m in hits for p in m.parameters()}
        return {n: p for n, p in named if id(p) in ids and p.is_floating_point()}

    def _hits(self, selector: Any, what: str) -> list[str]:
        hits = select(self.model, selector)
        ids = {id(p) for _, m in hits for p in m.parameters()}
        names = [n for n, p in self.params.items() if id(p) in ids]
        if not names:
            why = str(no_hit_error(self.model, selector)) if not hits else "it hits no scheduled parameter"
            raise ConfigError(f"{what}: selector {selector!r} selects nothing: {why}")
        return names

    def _depth(self, name: str) -> tuple[str, int, int]:
        stack, depth = self.layout.params[name]
        return stack, depth, self.layout.stacks[stack]

    # ------------------------------------------------------------------ the unfreezing plan

    def unfreeze(self, what: Any, at: int = 0, every: int | None = None) -> Schedule:
        """Let `what` train from step `at` on (everything not yet unfrozen is frozen once any
        unfreeze is planned). `what`: ``"head"`` (the top depth of each stack: final norm, pooler,
        head), ``"all"``, ``"top"`` with `every=k` (head and top block at `at`, the next block down at
        ``at + k``, ..., the embeddings last: ULMFiT's gradual unfreezing), or any selector. LP-FT is
        ``unfreeze("head").unfreeze("all", at=N)``. Call it before building the optimizer."""
        if self._built:
            raise ConfigError(
                "unfreeze() after param_groups(): the optimizer's groups are split by the step each part starts "
                "training; plan every unfreeze first, then build the optimizer"
            )
        for key, v in (("at", at), ("every", every)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (key == "every")):
                raise ConfigError(f"unfreeze({what!r}): {key} must be an int >= {int(key == 'every')}, got {v!r}")
        if (what == "top") != (every is not None):
            raise ConfigError(f"unfreeze({what!r}, every={every!r}): every= goes with 'top' (and 'top' needs it)")
        steps: dict[str, int] = {}
        if what == "all":
            steps = dict.fromkeys(self.params, at)
        elif what in ("head", "top"):
            for n in self.params:
                _, d, top = self._depth(n)
                if what == "top":
                    steps[n] = at + max(0, top - 1 - d) * every  # type: ignore[operator]  # every is set for "top"
                elif d == top:
                    steps[n] = at
            if not steps:
                raise ConfigError(f"unfreeze('head'): no scheduled parameter sits above the blocks; {self._where()}")
        else:
            steps = dict.fromkeys(self._hits(what, "unfreeze"), at)
        base = self.until if self._plan else dict.fromkeys(self.params)
        new = {n: min(s, steps[n]) if s is not None and n in steps else steps.get(n, s) for n, s in base.items()}
        self.until = new
        self._plan.append([repr(what), at, every])
        return self

    def _where(self) -> str:
        return "depths: " + ", ".join(f"{s} 0..{t}" for s, t in self.layout.stacks.items())

    def step(self, global_step: int) -> None:
        """Set ``requires_grad`` of every scheduled parameter for optimizer step `global_step` (0-based,
        called before that step's forward): a pure function of the step, so a resumed run is exact."""
        if not isinstance(global_step, int) or isinstance(global_step, bool) or global_step < 0:
            raise ConfigError(f"step must be an int >= 0 (the global optimizer step), got {global_step!r}")
        for n, p in self.params.items():
            flag = self.until[n] is not None and self.until[n] <= global_step  # type: ignore[operator]
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        self.last_step = global_step

    # ------------------------------------------------------------------ optimizer groups

    def _grouping(self) -> list[tuple[tuple, list[str]]]:
        groups: dict[tuple, list[str]] = {}
        for n in self.params:
            stack, depth, _ = self._depth(n)
            module = self.model.get_submodule(n.rpartition(".")[0]) if "." in n else self.model
            low = (n.lower(), type(module).__name__.lower())
            decay = not any(s in t for s in self.no_decay for t in low)
            groups.setdefault((stack, depth, decay, self.until[n], *self._scale[n]), []).append(n)
        return list(groups.items())

    def _group(self, key: tuple) -> dict[str, Any]:
        stack, depth, decay, until, scale, wd = key
        lr = self.lr * self.layer_decay ** (self.layout.stacks[stack] - depth) * scale
        parts = [f"{stack}:{depth}", "" if decay else "no_decay", "" if until == 0 else f"from {_cell(until)}"]
        name = ":".join(p for p in [*parts, "" if scale == 1 else f"x{scale:g}"] if p)
        wd = (self.weight_decay if decay else 0.0) if wd is None else wd
        return {"lr": lr, "initial_lr": lr, "weight_decay": wd, "name": name}

    def param_groups(self) -> list[dict[str, Any]]:
        """Plain torch param groups: every scheduled parameter once (frozen ones included), each group
        with ``params``, an absolute ``lr``, ``initial_lr``, ``weight_decay`` and a ``name``."""
        self._built = True
        params = self.params
        return [{"params": [params[n] for n in names], **self._group(key)} for key, names in self._grouping()]

    def optimizer(self, cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **kwargs: Any) -> torch.optim.Optimizer:
        """``cls(self.param_groups(), **kwargs)``, checked (`check`)."""
        opt = cls(self.param_groups(), **kwargs)
        self.check(opt)
        return opt

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer that misses scheduled parameters or holds one twice."""
        count: dict[int, int] = {}
        for g in optimizer.param_groups:
            for p in g["params"]:
                count[id(p)] = count.get(id(p), 0) + 1
        missing = [n for n, p in self.params.items() if id(p) not in count]
        twice = [n for n, p in self.params.items() if count.get(id(p), 0) > 1]
        if missing or twice:
            what = f"misses {len(missing)} scheduled parameters ({missing[:3]}...)" if missing else ""
            what += (" and " if missing and twice else "") + (f"holds {twice[:3]} twice" if twice else "")
            raise ConfigError(
                f"the optimizer {what}: a parameter outside the optimizer never trains when unfrozen. "
                "Build it from plan.param_groups() (or plan.optimizer(cls, **kw))"
            )

    # ------------------------------------------------------------------ state, explain

    def _fingerprint(self) -> dict[str, Any]:
        table = [[n, *self.layout.params[n], self.until[n], list(p.shape)] for n, p in self.params.items()]
        digest = hashlib.sha256(json.dumps(table).encode()).hexdigest()[:16]
        return {**self._config, "plan": self._plan, "params": f"{len(table)} parameters, {digest}"}

    def state_dict(self) -> dict[str, Any]:
        """Config, plan, scheduled parameters (a digest) and the last step: save it with the optimizer's."""
        return {"format": _FORMAT, "config": self._fingerprint(), "step": self.last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check that `state` is this schedule's (same model, parameters, config, plan) and restore its step."""
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise ConfigError(f"not a Schedule state (expected format {_FORMAT!r}); pass what state_dict() returned")
        mine, theirs = self._fingerprint(), state.get("config", {})
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if diff:
            shown = "; ".join(f"{k}: saved {theirs.get(k)!r}, here {mine.get(k)!r}" for k in diff)
            raise ConfigError(
                f"this Schedule state comes from another model or configuration ({shown}); build the Schedule "
                "as the run that saved it did (same model, deltas, arguments and unfreeze calls)"
            )
        if state.get("step") is not None:
            self.step(state["step"])

    def explain(self) -> Explanation:
        """A table: optimizer group -> stack, depth, lr, scale now (0 while frozen), weight decay,
        parameters (elements), the step it starts training."""
        now = 0 if self.last_step is None else self.last_step
        rows, params = [], self.params
        for key, names in self._grouping():
            g = self._group(key)
            until = key[3]
            rows.append({
                "group": g["name"], "stack": key[0], "depth": key[1], "lr": g["lr"], "wd": g["weight_decay"],
                "scale": 0.0 if until is None or until > now else g["lr"] / self.lr,
                "params": sum(params[n].numel() for n in names), "trains from": until,
            })  # fmt: skip
        note = "" if self.layout.found else (
            f"no block stack found in {type(self.model).__name__} (no list of modules with @attn / @mlp roles): "
            f"one depth per top-level child with parameters, in registration order (stack {CHILDREN!r}); "
            "pass overrides= to set depths"
        )  # fmt: skip
        return Explanation(rows, self.last_step, note)

    # ------------------------------------------------------------------ trainers, DDP

    def freezes(self) -> bool:
        """Whether some scheduled parameter is ever frozen (then DDP needs find_unused_parameters)."""
        return any(u is None or u > 0 for u in self.until.values())

    def ddp(self, **kwargs: Any) -> nn.Module:
        """Wrap the model in `DistributedDataParallel` so the schedule works under it: every scheduled
        parameter is registered with DDP (trainable while wrapping) and, if the schedule freezes any,
        ``find_unused_parameters=True`` lets DDP skip the frozen ones (their grads stay None on every rank).
        A parameter frozen at wrap time would never be synchronised once unfrozen."""
        from torch.nn.parallel import DistributedDataParallel

        if self.freezes() and kwargs.get("find_unused_parameters") is False:
            raise ConfigError("this schedule freezes parameters: DDP needs find_unused_parameters=True with it")
        kwargs.setdefault("find_unused_parameters", self.freezes())
        flags = {n: p.requires_grad for n, p in self.params.items()}
        try:
            for p in self.params.values():
                p.requires_grad_(True)
            return DistributedDataParallel(self.model, **kwargs)
        finally:
            for n, p in self.params.items():
                p.requires_grad_(flags[n])

    def callback(self) -> Any:
        """A `transformers.TrainerCallback`: `step(state.global_step)` on train begin (resume) and at each
        step begin; checks the Trainer's optimizer; saves this schedule's state in each checkpoint
        (``schedule.json``) and checks it on resume."""
        from transformers import TrainerCallback

        plan = self

        class ScheduleCallback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
                if optimizer is not None:
                    plan.check(optimizer)
                saved = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", _STATE_FILE)
                if state.global_step and os.path.isfile(saved):
                    with open(saved) as f:
                        plan.load_state_dict(json.load(f))
                plan.step(state.global_step)

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                plan.step(state.global_step)

            def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                if state.is_world_process_zero and os.path.isdir(folder):
                    with open(os.path.join(folder, _STATE_FILE), "w") as f:
                        json.dump(plan.state_dict(), f)

        return ScheduleCallback()

    def trainer(self, base: type | None = None) -> type:
        """A subclass of `base` (default `transformers.Trainer`) whose `create_optimizer` builds the
        optimizer of ``args.optim`` over `param_groups()` and which adds `callback()`:
        ``plan.trainer()(model=model, args=args, train_dataset=...)``."""
        if base is None:
            from transformers import Trainer

            base = Trainer
        plan, parent = self, base

        class ScheduledTrainer(parent):  # type: ignore[valid-type, misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.add_callback(plan.callback())

            def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
                if getattr(self, "optimizer", None) is None:
                    cls, kw = self.get_optimizer_cls_and_kwargs(self.args, self.model if model is None else model)
                    kw = {k: v for k, v in kw.items() if k not in ("lr", "weight_decay")}  # the groups carry these
                    self.optimizer = plan.optimizer(cls, **kw)
                return self.optimizer

        ScheduledTrainer.__name__ = ScheduledTrainer.__qualname__ = f"Scheduled{parent.__name__}"
        return ScheduledTrainer


def _group_value(selector: Any, value: Any) -> tuple[float, float | None]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value), None
    if isinstance(value, Mapping) and set(value) <= {"lr_scale", "weight_decay"}:
        scale, wd = value.get("lr_scale", 1.0), value.get("weight_decay")
        if isinstance(scale, (int, float)) and scale > 0 and (wd is None or isinstance(wd, (int, float)) and wd >= 0):
            return float(scale), None if wd is None else float(wd)
    raise ConfigError(
        f"groups[{selector!r}] = {value!r}: give an lr multiplier > 0, or {{'lr_scale': x, 'weight_decay': y}}"
    )
