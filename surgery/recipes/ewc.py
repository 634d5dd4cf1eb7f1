"""Elastic weight consolidation (Kirkpatrick et al., 2017) with a per-example diagonal Fisher.

    ewc = surgery.EWC(model, data_a, lam=100.0)     # Fisher of the trainable parameters on task A
    loss = loss_b + ewc.penalty(model)             # lam/2 * sum_i F_i (theta_i - theta*_i)^2
    ewc.consolidate(model, data_b)                 # after task B: online F = decay*F + F_B, or one more task
    hub.push(model, "acme/a", adapter="a", extra=ewc.state())
    ewc = surgery.EWC.from_state(model, hub.extra("acme/a"))

F_i is the mean over examples of the squared gradient of each example's own loss, computed with
`torch.func` (`vmap(grad(...))` over the examples of a batch); squaring the gradient of a batch's
mean loss (a common bug) lets opposing examples cancel and underestimates F by up to the batch size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import ConfigError

LossFn = Callable[[nn.Module, Any], torch.Tensor]
KIND = "surgery.EWC/1"
_MODES = ("online", "separate")
_FISHERS = ("empirical", "true")
_CHUNK_BYTES = 1 << 28  # per-example gradients held at once: chunk * (trainable parameters) * 4 bytes


def _map(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`fn` over the tensors of a batch (dicts, tuples and lists of tensors; anything else as is)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch


def _tensors(batch: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _map(batch, out.append)
    return out


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"EWC: cannot find logits in the model's output ({type(out).__name__}); pass loss_fn=")


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class targets (positions with -100 ignored), squared error for real ones."""
    if target.is_floating_point():
        return F.mse_loss(logits.reshape(target.shape), target)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """A dict batch: the model's own `.loss` (as an HF model computes it from `labels`), else
    cross-entropy of its logits against `labels`. An `(inputs, target)` batch: cross-entropy of the
    logits against integer targets, squared error against real ones."""
    if isinstance(batch, dict):
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if isinstance(loss, torch.Tensor):
            return loss
        if "labels" not in batch:
            raise ConfigError("EWC: a dict batch needs 'labels' (or pass loss_fn=)")
        return _nll(_logits(out), batch["labels"])
    inputs, target = batch
    return _nll(_logits(_call(model, inputs)), target)


class _LossOf(nn.Module):
    """`loss_fn(model, batch)` as a module, so `functional_call` can swap the model's parameters in."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _check_batch(batch: Any, i: int) -> int:
    """The batch's number of examples (the leading size of its tensors)."""
    if isinstance(batch, dict):
        pass
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        pass
    else:
        raise ConfigError(
            f"EWC: batch {i} is a {type(batch).__name__}; each batch must be a dict of tensors (as for an "
            "HF model, with labels) or an (inputs, target) pair"
        )
    sizes = {t.shape[0] for t in _tensors(batch) if t.dim() > 0}
    if len(sizes) != 1:
        raise ConfigError(f"EWC: batch {i}'s tensors must share one leading (example) size, got {sorted(sizes)}")
    return sizes.pop()


def _per_example(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0


def _pieces(batch: Any, chunk: int) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(per-example tensors of at most `chunk` examples, what they share). The attention masks of a
    dict batch are shared within a piece: HF models read a mask's values to choose a code path (skip it
    when all ones), which vmap cannot batch, so examples are grouped by their masks."""
    n = _check_batch(batch, 0)
    if not isinstance(batch, dict):
        for s in range(0, n, chunk):
            yield _map(batch, lambda t, s=s: t[s : s + chunk]), {}  # type: ignore[misc]
        return
    masks = [k for k, v in batch.items() if k.endswith("attention_mask") and _per_example(v)]
    if masks:
        rows = torch.cat([batch[k].reshape(n, -1) for k in masks], 1)
        inverse = torch.unique(rows, dim=0, return_inverse=True)[1]
        groups = [torch.nonzero(inverse == g).flatten() for g in range(int(inverse.max()) + 1)]
    else:
        groups = [torch.arange(n)]
    for group in groups:
        for s in range(0, len(group), chunk):
            idx = group[s : s + chunk]
            shared = {k: v for k, v in batch.items() if not _per_example(v)}
            shared |= {k: batch[k][idx[:1].to(batch[k].device)] for k in masks}
            yield {k: v[idx.to(v.device)] for k, v in batch.items() if k not in shared}, shared


def _batches(data: Any) -> Iterator[Any]:
    if isinstance(data, Mapping) or (isinstance(data, tuple) and all(isinstance(t, torch.Tensor) for t in data)):
        data = [data]  # one batch, not an iterable of its keys or tensors
    try:
        it = iter(data)
    except TypeError:
        raise ConfigError(f"EWC: data must be an iterable of batches, not {type(data).__name__}") from None
    for batch in it:
        yield dict(batch) if isinstance(batch, Mapping) else batch  # a tokenizer's BatchEncoding, say


def _check_options(mode: str, decay: float, lam: float, fisher: str) -> None:
    if mode not in _MODES:
        raise ConfigError(f"EWC: mode must be 'online' (one decayed Fisher) or 'separate' (one per task), got {mode!r}")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ConfigError(f"EWC: decay must be in (0, 1] (the old Fisher's weight in online mode), got {decay!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"EWC: lam must be a finite number >= 0, got {lam!r}")
    if fisher not in _FISHERS:
        raise ConfigError(
            f"EWC: fisher must be 'empirical' (the data's labels) or 'true' (labels sampled from the model), "
            f"got {fisher!r}"
        )


class EWC:
    """The EWC penalty of `model`'s trainable parameters (at construction; with adapters injected,
    only the adapters'), anchored at their current values, weighted by the diagonal Fisher on `data`.

    `data`: an iterable of batches, each a dict of tensors as an HF model takes them (with labels)
    or an `(inputs, target)` pair. `loss_fn(model, batch) -> loss` replaces the default (the model
    output's `.loss`, else cross-entropy of its logits); it is called on one example at a time (a batch
    of one), so it must not mix examples. `fisher="true"` samples each example's labels from the
    model's own predictive distribution (the true Fisher) instead of taking the data's.
    `mode="online"` keeps one Fisher, `decay * F_old + F_new` at each `consolidate`; `"separate"`
    keeps one (Fisher, anchor) per task and sums their penalties. `chunk_size` bounds how many
    per-example gradients are held at once (default: what fits in 256 MiB).
    The Fisher is taken in eval mode (no dropout); the model's mode and `.grad`s are left as they were.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFn | None = None,
        *,
        mode: str = "online",
        decay: float = 1.0,
        lam: float = 1.0,
        fisher: str = "empirical",
        chunk_size: int | None = None,
        seed: int = 0,
    ) -> None:
        _check_options(mode, decay, lam, fisher)
        if fisher == "true" and loss_fn is not None:
            raise ConfigError("EWC: fisher='true' scores sampled labels against the model's logits; drop loss_fn=")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ConfigError(f"EWC: chunk_size must be a positive int or None, got {chunk_size!r}")
        self.mode, self.decay, self.lam, self.fisher = mode, float(decay), float(lam), fisher
        self.loss_fn, self.chunk_size, self.seed = loss_fn, chunk_size, seed
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ConfigError(
                "EWC: the model has no trainable parameters; unfreeze (surgery.unfreeze) or inject the ones "
                "the next task trains before building EWC"
            )
        self.base = _fingerprint(model)
        self.per_example = "vmap"  # "loop" once vmap cannot run the model
        fisher_a, n = self._fisher(model, data)
        self.tasks: list[dict[str, dict[str, torch.Tensor]]] = [{"fisher": fisher_a, "anchor": self._now(model)}]
        self.examples = [n]

    # ------------------------------------------------------------------------- Fisher

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        try:
            params = {n: model.get_parameter(n) for n in self.names}
        except AttributeError as e:
            raise ConfigError(
                f"EWC: the model has no parameter {str(e)[:200]}: this EWC state belongs to another model "
                "or parameter set (inject the same adapters under the same names first)"
            ) from None
        return params

    def _now(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self._params(model).items()}

    def _fisher(self, model: nn.Module, data: Iterable[Any]) -> tuple[dict[str, torch.Tensor], int]:
        """(mean over the examples of each trainable parameter's squared per-example gradient, examples)."""
        params = {n: p.detach() for n, p in self._params(model).items()}
        total = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        chunk = self.chunk_size or max(1, _CHUNK_BYTES // (4 * sum(p.numel() for p in params.values())))
        gen = torch.Generator().manual_seed(self.seed)
        was_training, count = model.training, 0
        model.eval()
        try:
            for i, batch in enumerate(_batches(data)):
                size = _check_batch(batch, i)
                batch, loss_fn = self._labelled(model, batch, gen)
                for n, t in self._squares(_LossOf(model, loss_fn), params, batch, chunk).items():
                    total[n] += t
                count += size
        finally:
            model.train(was_training)
        if count == 0:
            raise ConfigError(
                "EWC: the data gave no examples; the Fisher is estimated from the finished task's data, so "
                "build EWC (or consolidate) after that task, with an iterable of its batches"
            )
        return {n: t / count for n, t in total.items()}, count

    def _labelled(self, model: nn.Module, batch: Any, gen: torch.Generator) -> tuple[Any, LossFn]:
        """The batch and the loss to differentiate: the data's labels, or (true Fisher) labels drawn
        from the model's predictive distribution, scored by cross-entropy against its logits."""
        if self.fisher == "empirical":
            return batch, self.loss_fn or default_loss
        inputs = {k: v for k, v in batch.items() if k != "labels"} if isinstance(batch, dict) else batch[0]
        with torch.no_grad():
            probs = _logits(_call(model, inputs)).float().softmax(-1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]).cpu(), 1, generator=gen)
        sampled = drawn.reshape(probs.shape[:-1]).to(probs.device)
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if isinstance(mask, torch.Tensor) and mask.shape == sampled.shape:  # padding scores nothing
            sampled = sampled.masked_fill(mask == 0, -100)
        if not isinstance(inputs, dict):
            return (inputs, sampled), lambda m, b: _nll(_logits(_call(m, b[0])), b[1])

        def loss(m: nn.Module, b: dict[str, Any]) -> torch.Tensor:
            return _nll(_logits(m(**{k: v for k, v in b.items() if k != "labels"})), b["labels"])

        return {**inputs, "labels": sampled}, loss

    def _squares(
        self, wrapped: _LossOf, params: dict[str, torch.Tensor], batch: Any, chunk: int
    ) -> dict[str, torch.Tensor]:
        """Sum over the batch's examples of each parameter's squared per-example gradient, `chunk`
        examples' gradients at a time."""
        prefixed = {f"model.{n}": p for n, p in params.items()}
        out = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}

        def one(ps: dict[str, torch.Tensor], example: Any, shared: dict[str, Any]) -> torch.Tensor:
            batch1 = _map(example, lambda t: t.unsqueeze(0))  # each example is its own batch of one
            return torch.func.functional_call(wrapped, ps, ({**batch1, **shared} if shared else batch1,))

        def add(g: dict[str, torch.Tensor]) -> None:
            for n in params:
                out[n] += g[f"model.{n}"].float().square().sum(0)

        if self.per_example == "vmap":
            try:
                with warnings.catch_warnings():  # vmap runs CPU attention kernels it has no batching rule for
                    warnings.filterwarnings("ignore", "There is a performance drop because we have not yet")
                    for example, shared in _pieces(batch, chunk):
                        add(torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, None))(prefixed, example, shared))
                return out
            except ConfigError:
                raise
            except (RuntimeError, NotImplementedError, ValueError) as e:
                warnings.warn(
                    f"EWC: torch.func.vmap cannot run this model ({type(e).__name__}: {str(e)[:200]}); "
                    "per-example gradients now come from a loop over the examples (same values, slower)",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.per_example = "loop"
                for t in out.values():
                    t.zero_()
        ps = {k: p.detach().requires_grad_(True) for k, p in prefixed.items()}
        for example, shared in _pieces(batch, 1):
            example = _map(example, lambda t: t[0])  # `one` makes it a batch of one again
            grads = torch.autograd.grad(one(ps, example, shared), list(ps.values()), allow_unused=True)
            add(
                {
                    k: (torch.zeros_like(p) if g is None else g).unsqueeze(0)
                    for (k, p), g in zip(ps.items(), grads, strict=True)
                }
            )
        return out

    # ------------------------------------------------------------------------- penalty / consolidate

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """lam/2 * sum over tasks and parameters of F (theta - anchor)^2: differentiable in the model's
        parameters, zero at the anchor."""
        params = self._params(model)
        total = torch.zeros((), device=next(iter(params.values())).device)
        for task in self.tasks:
            for n, p in params.items():
                total = total + (task["fisher"][n] * (p.float() - task["anchor"][n].float()).square()).sum()
        return total * (self.lam / 2)

    def consolidate(self, model: nn.Module, data: Iterable[Any]) -> None:
        """After training on the next task: its Fisher on `data` at the current parameters. Online:
        F = decay * F + F_new, anchor = now; separate: one more (F_new, anchor = now)."""
        fisher_new, n = self._fisher(model, data)  # first: an error leaves the state as it was
        entry = {"fisher": fisher_new, "anchor": self._now(model)}
        if self.mode == "online":
            old = self.tasks[0]["fisher"]
            entry["fisher"] = {k: self.decay * old[k] + v for k, v in fisher_new.items()}
            self.tasks, self.examples = [entry], [self.examples[0] + n]
        else:
            self.tasks, self.examples = [*self.tasks, entry], [*self.examples, n]

    # ------------------------------------------------------------------------- state

    def state(self) -> dict[str, Any]:
        """Tensors `fisher.<task>.<param>` and `anchor.<task>.<param>` plus `"__meta__"` (JSON: kind,
        mode, decay, lam, fisher, the parameter names, examples per task, the base's fingerprint):
        what `Hub.push(..., extra=)` stores and `EWC.from_state` reads."""
        out: dict[str, Any] = {
            f"{part}.{k}.{n}": t
            for k, task in enumerate(self.tasks)
            for part in ("fisher", "anchor")
            for n, t in task[part].items()
        }
        out["__meta__"] = {
            "kind": KIND,
            "mode": self.mode,
            "decay": self.decay,
            "lam": self.lam,
            "fisher": self.fisher,
            "params": list(self.names),
            "examples": list(self.examples),
            "base": self.base,
        }
        return out

    @classmethod
    def from_state(cls, model: nn.Module, state: dict[str, Any], loss_fn: LossFn | None = None) -> EWC:
        """The EWC whose `state()` this is, for `model` (checked: same base architecture, every
        parameter there with the state's shapes); tensors move to the parameters' devices."""
        meta = state.get("__meta__") if isinstance(state, dict) else None
        if not isinstance(meta, dict) or meta.get("kind") != KIND:
            raise ConfigError(
                "EWC.from_state: not an EWC state (no '__meta__' of kind surgery.EWC/1); pass EWC.state()"
            )
        names, examples = meta.get("params"), meta.get("examples")
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise ConfigError("EWC.from_state: the state's '__meta__' has no parameter names")
        if not (isinstance(examples, list) and examples and all(type(n) is int and n > 0 for n in examples)):
            raise ConfigError("EWC.from_state: the state's '__meta__' has no example counts per task")
        mode, decay, lam, fisher = meta.get("mode"), meta.get("decay"), meta.get("lam"), meta.get("fisher")
        _check_options(mode, decay, lam, fisher)  # type: ignore[arg-type]
        if meta.get("base") != _fingerprint(model):
            raise ConfigError(
                f"EWC.from_state: the state is for base {meta.get('base')}, but this model is {_fingerprint(model)}: "
                "load it into the model (architecture) it was computed on"
            )
        keys = {f"{part}.{k}.{n}" for k in range(len(examples)) for part in ("fisher", "anchor") for n in names}
        have = set(state) - {"__meta__"}
        if have != keys:
            raise ConfigError(
                f"EWC.from_state: the state's tensors {sorted(have ^ keys)[:4]} disagree with its parameter list "
                "(damaged or edited state)"
            )
        ewc = cls.__new__(cls)
        ewc.mode, ewc.decay, ewc.lam, ewc.fisher = str(mode), float(decay), float(lam), str(fisher)  # type: ignore[arg-type]
        ewc.loss_fn, ewc.chunk_size, ewc.seed, ewc.per_example = loss_fn, None, 0, "vmap"
        ewc.names, ewc.examples, ewc.base = list(names), list(examples), meta["base"]
        params = ewc._params(model)
        for key in keys:
            t, p = state[key], params[key.split(".", 2)[2]]
            if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                raise ConfigError(
                    f"EWC.from_state: {key} is {tuple(getattr(t, 'shape', ()))} but the model's parameter is "
                    f"{tuple(p.shape)}: a state for another parameter set"
                )
        ewc.tasks = [
            {
                "fisher": {n: state[f"fisher.{k}.{n}"].to(params[n].device, torch.float32) for n in names},
                "anchor": {n: state[f"anchor.{k}.{n}"].to(params[n].device, params[n].dtype) for n in names},
            }
            for k in range(len(examples))
        ]
        return ewc


def _fingerprint(model: nn.Module) -> str:
    from surgery.delta import fingerprint

    return fingerprint(model)
