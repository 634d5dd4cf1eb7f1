"""Preference training on a delta: `train_dpo` (a small loop: DPO, IPO, KTO on pairs, ORPO), the
`preference_accuracy` it is judged by, and `DPOLoss` for a `transformers.Trainer`.

The reference is the same model with every delta off (`reference()`), or with the deltas
`ref_delta` names on (an SFT delta the policy started from, trained as a copy), run under no_grad on
each batch: no second copy of the model. The loop runs in eval mode (no dropout, TRL's
``disable_dropout`` default), so policy and reference are the same function at step 0."""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from surgery import engine
from surgery.errors import ConfigError
from surgery.rl.data import IGNORE, Encoded, collate
from surgery.rl.logprobs import logprobs
from surgery.rl.losses import dpo_loss, ipo_loss, kto_loss, orpo_loss
from surgery.rl.reference import keep_names, reference

LOSSES = ("dpo", "ipo", "kto", "orpo")


def _policy(model: nn.Module, delta: str | None) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext() if delta is None else engine.use(_unwrap(model), delta)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _pad_id(model: nn.Module, pad_id: int | None) -> int:
    if pad_id is not None:
        return int(pad_id)
    cfg = getattr(model, "config", None)
    for key in ("pad_token_id", "eos_token_id"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return 0  # padded positions are masked and unscored: any id in the vocabulary does


def _check_pairs(pairs: Any, where: str, need_rejected: bool = True) -> Sequence[Encoded]:
    if not isinstance(pairs, Sequence) or not pairs or not all(isinstance(p, Encoded) for p in pairs):
        raise ConfigError(
            f"rl.{where}: pairs must be a non-empty list of surgery.rl.data.encode(tokenizer, rows) results"
        )
    if need_rejected and not all(p.rejected for p in pairs):
        raise ConfigError(f"rl.{where}: every pair needs a rejected completion (rows with 'rejected')")
    return pairs


def _check_loss(loss: str, beta: float, rpo_alpha: float | None = None) -> None:
    if loss not in LOSSES:
        raise ConfigError(f"rl: loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(beta, (int, float)) or not beta > 0:
        raise ConfigError(f"rl: beta must be > 0, got {beta!r}")
    if rpo_alpha is not None:
        if isinstance(rpo_alpha, bool) or not isinstance(rpo_alpha, (int, float)) or not 0 <= rpo_alpha < float("inf"):
            raise ConfigError(f"rl: rpo_alpha must be None or a finite number >= 0, got {rpo_alpha!r}")
        if loss == "orpo":
            raise ConfigError(
                "rl: ORPO already adds the chosen completion's NLL (its beta weighs the odds ratio); "
                "leave rpo_alpha=None with loss='orpo'"
            )


def _chosen_nll(pol_c: torch.Tensor, batch: Mapping[str, torch.Tensor], average: bool) -> torch.Tensor:
    """The mean NLL over every chosen completion token of the batch (TRL's ``nll_loss``), from the
    per-row chosen log-probs (summed, or their per-token means when `average`)."""
    n = (batch["chosen_labels"][:, 1:] != IGNORE).sum(-1)
    total = pol_c * n if average else pol_c
    return -total.sum() / n.sum()


def _kl_batch(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """KTO's mismatched pairs: prompt i with the chosen completion of row i+1 (rolled), re-padded."""
    ids, labels = batch["chosen_input_ids"], batch["chosen_labels"]
    n = ids.shape[0]
    starts = [int((row != IGNORE).nonzero()[0]) for row in labels]
    rows = [
        Encoded(ids[i, : starts[i]].tolist(), ids[(i + 1) % n][labels[(i + 1) % n] != IGNORE].tolist(), [])
        for i in range(n)
    ]
    return {k: v.to(ids.device) for k, v in collate(rows, 0).items()}


def pair_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    loss: str = "dpo",
    beta: float = 0.1,
    delta: str | None = None,
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    ref_delta: str | Sequence[str] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The preference loss of one collated pair batch: reference log-probs under
    `reference(model, *ref_delta)` (None: the base alone) and no_grad, the policy's under `delta`
    (None: the deltas active now), then `loss`. `rpo_alpha`
    adds that many times the chosen completion's mean NLL (TRL's ``rpo_alpha``, RPO, Pang et al. 2024:
    DPO alone can lower the chosen text's likelihood too, and with it generation quality); the metrics
    get ``nll``."""
    _check_loss(loss, beta, rpo_alpha)
    refs = keep_names(ref_delta, "rl.pair_loss", delta)
    value, metrics, pol_c = _pair_loss(model, batch, loss, beta, delta, label_smoothing, refs)
    if rpo_alpha is not None:
        nll = _chosen_nll(pol_c, batch, average=loss == "ipo")
        value = value + rpo_alpha * nll
        metrics = {**metrics, "nll": float(nll.detach())}
    return value, metrics


def _pair_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    loss: str,
    beta: float,
    delta: str | None,
    label_smoothing: float,
    refs: tuple[str, ...] = (),
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    average = loss in ("ipo", "orpo")
    ref: tuple[torch.Tensor, torch.Tensor | None] | None = None
    if loss != "orpo":  # ORPO has no reference
        with torch.no_grad(), reference(model, *refs):
            ref = logprobs(model, batch, average=average)
    with _policy(model, delta):
        pol_c, pol_r = logprobs(model, batch, average=average)
    if pol_r is None:
        raise ConfigError("rl: the batch has no rejected rows; preference losses need pairs")
    if loss == "orpo":
        return (*orpo_loss(pol_c, pol_r, _chosen_nll(pol_c, batch, average=True), beta), pol_c)
    assert ref is not None and ref[1] is not None
    ref_c, ref_r = ref[0], ref[1]
    if loss == "dpo":
        return (*dpo_loss(pol_c, pol_r, ref_c, ref_r, beta, label_smoothing), pol_c)
    if loss == "ipo":
        return (*ipo_loss(pol_c, pol_r, ref_c, ref_r, beta), pol_c)
    kl_batch = _kl_batch(batch)
    with torch.no_grad():
        with _policy(model, delta):
            kl_pol = logprobs(model, kl_batch)[0]
        with reference(model, *refs):
            kl_ref = logprobs(model, kl_batch)[0]
    return (*kto_loss(pol_c, pol_r, ref_c, ref_r, kl_pol - kl_ref, beta), pol_c)


def _trainable(model: nn.Module, delta: str | None) -> list[nn.Parameter]:
    inner = _unwrap(model)
    if delta is not None:
        if delta not in engine.names(inner):
            raise ConfigError(
                f"rl: the policy has no delta {delta!r} (injected: {engine.names(inner) or 'none'}); "
                f"surgery.inject(policy, 'lora', name={delta!r}, ...) first"
            )
        if delta in engine.merged(inner):
            raise ConfigError(
                f"rl: the policy delta {delta!r} is merged; surgery.unmerge(policy, {delta!r}) to train it"
            )
        params = [p for ad in engine.adapters(inner, delta).values() for p in ad.parameters() if p.requires_grad]
    else:
        params = [p for p in inner.parameters() if p.requires_grad]
    if not params:
        what = f"the delta {delta!r}" if delta is not None else "the policy"
        raise ConfigError(f"rl.train_dpo: {what} has no trainable parameters; inject a delta (surgery.inject) first")
    return params


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def train_dpo(
    policy: nn.Module,
    pairs: Sequence[Encoded],
    *,
    delta: str | None = "default",
    beta: float = 0.1,
    loss: str = "dpo",
    epochs: int = 1,
    lr: float = 5e-5,
    batch_size: int = 8,
    pad_id: int | None = None,
    seed: int = 0,
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    ref_delta: str | Sequence[str] | None = None,
    on_step: Callable[[int, dict[str, float]], Any] | None = None,
) -> list[dict[str, float]]:
    """Train the policy delta `delta` (None: whatever is active, every trainable parameter) on
    preference `pairs` (`surgery.rl.data.encode` with ``rejected``) with `loss` ("dpo", "ipo", "kto"
    on pairs, "orpo") and AdamW. Returns one record per step: ``step``, ``epoch``, ``loss``,
    ``accuracy``, ``margin``, ``rewards_chosen``, ``rewards_rejected`` (and ``nll`` with `rpo_alpha`, see
    `pair_loss`); `on_step(step, record)` sees each. The reference is the base, or the base with the
    deltas `ref_delta` on (see `pair_loss`)."""
    _check_loss(loss, beta, rpo_alpha)
    keep_names(ref_delta, "rl.train_dpo", delta)
    pairs = _check_pairs(pairs, "train_dpo")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"rl.train_dpo: epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    params = _trainable(policy, delta)
    opt = torch.optim.AdamW(params, lr=lr)
    pad = _pad_id(policy, pad_id)
    device = params[0].device
    history: list[dict[str, float]] = []
    order = list(range(len(pairs)))
    with _eval(policy):
        for epoch in range(epochs):
            random.Random(seed + epoch).shuffle(order)
            for i in range(0, len(order), batch_size):
                batch = {
                    k: v.to(device) for k, v in collate([pairs[j] for j in order[i : i + batch_size]], pad).items()
                }
                value, metrics = pair_loss(
                    policy,
                    batch,
                    loss=loss,
                    beta=beta,
                    delta=delta,
                    label_smoothing=label_smoothing,
                    rpo_alpha=rpo_alpha,
                    ref_delta=ref_delta,
                )
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                step = len(history)
                record = {"step": step, "epoch": epoch, "loss": float(value.detach()), **metrics}
                history.append(record)
                if on_step is not None:
                    on_step(step, record)
    return history


@torch.no_grad()
def preference_margins(
    policy: nn.Module,
    pairs: Sequence[Encoded],
    *,
    delta: str | None = None,
    batch_size: int = 8,
    pad_id: int | None = None,
    against_reference: bool = True,
    ref_delta: str | Sequence[str] | None = None,
) -> torch.Tensor:
    """Per pair, the implicit reward margin over beta: (pol_c - ref_c) - (pol_r - ref_r) of summed
    log-probs, the reference `reference(policy, *ref_delta)` (`against_reference=False`: pol_c - pol_r,
    the policy's own preference)."""
    pairs = _check_pairs(pairs, "preference_accuracy")
    refs = keep_names(ref_delta, "rl.preference_accuracy", delta)
    pad = _pad_id(policy, pad_id)
    device = next(policy.parameters()).device
    out = []
    with _eval(policy):
        for i in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in collate(pairs[i : i + batch_size], pad).items()}
            with _policy(policy, delta):
                c, r = logprobs(policy, batch)
            assert r is not None
            h = c - r
            if against_reference:
                with reference(policy, *refs):
                    rc, rr = logprobs(policy, batch)
                assert rr is not None
                h = h - (rc - rr)
            out.append(h.cpu())
    return torch.cat(out)


def preference_accuracy(
    policy: nn.Module,
    pairs: Sequence[Encoded],
    *,
    delta: str | None = None,
    batch_size: int = 8,
    pad_id: int | None = None,
    against_reference: bool = True,
    ref_delta: str | Sequence[str] | None = None,
) -> float:
    """The fraction of `pairs` whose implicit reward margin is > 0: the policy raised the chosen
    completion's log-probability relative to the reference more than the rejected one's (beta > 0 does
    not change the sign). `against_reference=False`: the fraction the policy alone prefers."""
    h = preference_margins(
        policy,
        pairs,
        delta=delta,
        batch_size=batch_size,
        pad_id=pad_id,
        against_reference=against_reference,
        ref_delta=ref_delta,
    )
    return float((h > 0).float().mean())


class DPOLoss:
    """The preference loss for a `transformers.Trainer` over pair batches:
    ``DPOLoss(beta=0.1).trainer()(model=policy, args=args, train_dataset=pairs, data_collator=loss.collator(pad))``
    (pairs: a list of `Encoded`; use ``remove_unused_columns=False``). The policy delta trains as the
    Trainer's optimizer says; the reference is `reference(model, *ref_delta)` on each batch. `history` keeps each training
    step's metrics; `evaluate()` reports the mean pair loss as ``eval_loss``."""

    def __init__(
        self,
        beta: float = 0.1,
        loss: str = "dpo",
        delta: str | None = None,
        label_smoothing: float = 0.0,
        rpo_alpha: float | None = None,
        ref_delta: str | Sequence[str] | None = None,
    ):
        _check_loss(loss, beta, rpo_alpha)
        self.beta, self.loss, self.delta, self.label_smoothing = beta, loss, delta, label_smoothing
        self.rpo_alpha, self.ref_delta = rpo_alpha, keep_names(ref_delta, "rl.DPOLoss", delta)
        self.history: list[dict[str, float]] = []

    @staticmethod
    def collator(pad_id: int) -> Callable[[Sequence[Encoded]], dict[str, torch.Tensor]]:
        return functools.partial(collate, pad_id=pad_id)

    def __call__(
        self,
        model: nn.Module,
        inputs: Mapping[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        value, metrics = pair_loss(
            model,
            inputs,
            loss=self.loss,
            beta=self.beta,
            delta=self.delta,
            label_smoothing=self.label_smoothing,
            rpo_alpha=self.rpo_alpha,
            ref_delta=self.ref_delta,
        )
        if torch.is_grad_enabled():  # training steps; evaluate() runs under no_grad
            self.history.append({"loss": float(value.detach()), **metrics})
        return (value, metrics) if return_outputs else value

    def trainer(self, base: type | None = None) -> type:
        """A subclass of `base` (default `transformers.Trainer`) whose `compute_loss` is this loss."""
        if base is None:
            from transformers import Trainer

            base = Trainer
        compute, parent = self, base

        class PreferenceTrainer(parent):  # type: ignore[valid-type, misc]
            def compute_loss(
                self, model: nn.Module, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
            ) -> Any:
                return compute(model, inputs, return_outputs, num_items_in_batch)

            def prediction_step(
                self, model: nn.Module, inputs: Any, prediction_loss_only: bool, ignore_keys: Any = None
            ) -> Any:
                with torch.no_grad():  # evaluate(): the pair loss (the default would call model(**pair batch))
                    return compute(model, self._prepare_inputs(inputs)).detach(), None, None

        PreferenceTrainer.__name__ = PreferenceTrainer.__qualname__ = f"Preference{parent.__name__}"
        return PreferenceTrainer
