"""Log-probabilities of completions under a causal LM, from its ``.logits``.

`token_logprobs` gives one log-probability per label (0 where the label is -100); `logprobs` sums (or
averages) them per row for a collated pair batch, chosen and rejected rows in one forward (TRL's
concatenated forward). Two things keep it lean: the model computes logits only from the first
completion token on (``logits_to_keep``, where the model takes it), and the log-softmax is never
materialised: the forward keeps the logits and one logsumexp per position, the backward rebuilds the
softmax row by row (a naive log_softmax + gather holds an fp32 log-softmax beside the logits, and its
backward a vocabulary-size scatter; TRL's `selective_log_softmax` loops over rows the same way)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from surgery.errors import ConfigError
from surgery.rl.data import IGNORE


class _LabelLogProb(torch.autograd.Function):
    """log_softmax(logits)[label] over (batch, seq, vocab) logits; 0 where the label is -100. The
    log-softmax is computed in fp32 one row at a time and never kept."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mask = labels != IGNORE
        idx = labels.clamp(min=0).unsqueeze(-1)
        dt = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.stack([torch.logsumexp(row.to(dt), -1) for row in logits])
        out = (logits.gather(-1, idx).squeeze(-1).to(dt) - lse).masked_fill(~mask, 0.0)
        ctx.save_for_backward(logits, idx, mask, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, idx, mask, lse = ctx.saved_tensors
        g = (grad * mask).unsqueeze(-1)
        out = torch.empty_like(logits)
        for b in range(logits.shape[0]):  # d/dx (x_y - lse) = onehot(y) - softmax(x)
            p = (logits[b].to(lse.dtype) - lse[b].unsqueeze(-1)).exp_().mul_(-g[b])
            out[b] = p.scatter_add_(-1, idx[b], g[b])
        return out, None


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under `logits` (batch, seq, vocab), in fp32 (or fp64), 0 where the label is -100; labels of the
    same (batch, seq) and already aligned with the logits' positions (no shift here)."""
    if logits.shape[:-1] != labels.shape:
        raise ConfigError(f"rl.label_logprobs: logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}")
    return _LabelLogProb.apply(logits, labels)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """(batch, seq) fp32: at position t, log p(labels[:, t] | input_ids[:, :t]); 0 where labels is -100
    and at t = 0 (nothing predicts the first token). Rows may be right- or left-padded (left padding gets
    position ids from the attention mask, as `generate()` does)."""
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ConfigError(
            f"rl.token_logprobs: input_ids and labels must be (batch, seq) of one shape, got "
            f"{tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    n, t = labels.shape
    scored = labels[:, 1:] != IGNORE
    if not bool(scored.any()):
        raise ConfigError("rl.token_logprobs: every label is -100; there is no completion token to score")
    first = int(scored.any(0).float().argmax()) + 1  # the earliest scored position over the batch
    keep = t - first + 1  # logits at positions first-1 .. t-1
    kw: dict[str, Any] = {"input_ids": input_ids}
    if attention_mask is not None and _accepts(model, "attention_mask"):
        kw["attention_mask"] = attention_mask
    if _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = keep
    if attention_mask is not None and bool((attention_mask[:, 0] == 0).any()) and _accepts(model, "position_ids"):
        kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if _accepts(model, "use_cache"):
        kw["use_cache"] = False
    out = model(**kw)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    logits = logits[:, -keep:]  # counted from the end: a prompt delta may prepend virtual positions
    shifted = torch.cat([labels[:, first:], labels.new_full((n, 1), IGNORE)], 1)  # the label each logit predicts
    lp = label_logprobs(logits, shifted)[:, :-1]
    return torch.cat([lp.new_zeros(n, first), lp], 1)


def _rows(batch: Mapping[str, torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys = [f"{side}_input_ids", f"{side}_attention_mask", f"{side}_labels"]
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ConfigError(f"rl.logprobs: the batch lacks {missing}; build it with surgery.rl.data.collate / batches")
    ids, mask, labels = (batch[k] for k in keys)
    return ids, mask, labels


def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)


def logprobs(
    model: nn.Module, batch: Mapping[str, torch.Tensor], *, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed (`average=True`: mean per token) log-probabilities of the completion tokens (labels !=
    -100) of a collated batch (`surgery.rl.data.collate`): ``(chosen, rejected)``, each (batch,) fp32,
    from one forward over chosen and rejected rows; ``rejected`` is None for a batch without rejected
    rows. Runs with whatever deltas are active: wrap it in `surgery.use` / `reference()` to choose."""
    ids, mask, labels = _rows(batch, "chosen")
    n = ids.shape[0]
    if "rejected_input_ids" in batch:
        r_ids, r_mask, r_labels = _rows(batch, "rejected")
        if r_ids.shape[0] != n:
            raise ConfigError(f"rl.logprobs: {n} chosen rows but {r_ids.shape[0]} rejected rows")
        t = max(ids.shape[1], r_ids.shape[1])
        ids = torch.cat([_pad_to(ids, t, 0), _pad_to(r_ids, t, 0)])  # the pad id is masked out: any id does
        mask = torch.cat([_pad_to(mask, t, 0), _pad_to(r_mask, t, 0)])
        labels = torch.cat([_pad_to(labels, t, IGNORE), _pad_to(r_labels, t, IGNORE)])
    lp = token_logprobs(model, ids, mask, labels).sum(-1)
    if average:
        lp = lp / (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)
    return (lp[:n], lp[n:]) if lp.shape[0] > n else (lp, None)
