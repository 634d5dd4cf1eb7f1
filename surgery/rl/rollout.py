"""Rollouts for PPO and GRPO: completions sampled from the policy delta with `generate()` and its KV
cache, returned as right-padded prompt + completion sequences (labels -100 on prompt and padding),
the layout every role (policy, value, reward, reference) scores in one forward each.

Generation runs on left-padded prompts; the result is re-packed without the left padding so that a
plain forward (positions 0..n) sees each sequence exactly as `generate()` did."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery import engine
from surgery.errors import ConfigError
from surgery.rl import data
from surgery.rl.data import IGNORE
from surgery.rl.logprobs import label_logprobs


@dataclass
class Rollout:
    """Sampled completions: ``input_ids`` / ``attention_mask`` / ``labels`` (batch, seq), prompt +
    completion right-padded, labels the completion's ids (eos kept) and -100 elsewhere; the ids of
    each prompt and completion as lists; whether each completion ended with eos (else `max_new_tokens`
    cut it)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompts: list[list[int]]
    completions: list[list[int]]
    ended: list[bool]

    @property
    def mask(self) -> torch.Tensor:
        """1.0 on completion tokens, 0.0 elsewhere (batch, seq)."""
        return (self.labels != IGNORE).float()


def prompt_batch(prompts: Any, tokenizer: Any = None) -> dict[str, torch.Tensor]:
    """Prompts for `rollout`: a left-padded dict (``rl.data.prompts``), rows of `rl.data.Encoded`,
    or texts / rows with a ``prompt`` key (these need the tokenizer)."""
    if isinstance(prompts, Mapping) and "input_ids" in prompts:
        return {"input_ids": prompts["input_ids"], "attention_mask": prompts["attention_mask"]}
    rows = list(prompts)
    if not rows:
        raise ConfigError("rl: an empty batch of prompts")
    if all(isinstance(r, data.Encoded) for r in rows):
        if tokenizer is None:  # the pad id only fills the left; any id serves, attention_mask hides it
            return data.prompts(rows, 0)
        return data.prompts(rows, data.pad_id_of(tokenizer))
    if tokenizer is None:
        raise ConfigError("rl: prompts as text need tokenizer=; or pass rl.data.prompts(encoded, pad_id)")
    texts = [str(r["prompt"]) if isinstance(r, Mapping) else str(r) for r in rows]
    enc = [data.Encoded(data.prompt_ids(tokenizer, t), [], []) for t in texts]
    return data.prompts(enc, data.pad_id_of(tokenizer))


def _eos_of(model: nn.Module, tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ConfigError("rl: no eos_token_id (tokenizer or model.generation_config); completions could not end")
    return int(eos)


@torch.no_grad()
def rollout(
    model: nn.Module,
    prompts: Any,
    *,
    delta: str = "default",
    tokenizer: Any = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
) -> Rollout:
    """Sample one completion per prompt with `model.generate()` (KV cache) under the delta `delta`
    alone; each completion is cut after its first eos (kept)."""
    batch = prompt_batch(prompts, tokenizer)
    eos = _eos_of(model, tokenizer)
    pad = data.pad_id_of(tokenizer) if tokenizer is not None else eos
    ids, attn = batch["input_ids"], batch["attention_mask"]
    device = next(model.parameters()).device
    with engine.use(model, delta):
        out = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=0 if do_sample else None,  # generation_config's default top_k=50 would bias the sampling
            eos_token_id=eos,
            pad_token_id=pad,
        )
    prompt_rows = [row[m.bool()].tolist() for row, m in zip(ids, attn, strict=True)]
    completions = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        completions.append(row[:cut])
    seqs = data.sequences(prompt_rows, completions, pad)
    return Rollout(
        seqs["input_ids"].to(device),
        seqs["attention_mask"].to(device),
        seqs["labels"].to(device),
        prompt_rows,
        completions,
        [c[-1] == eos for c in completions],
    )


def token_stats(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of `labels` and entropies (no grad: a statistic) of the
    distributions that predict them, both (batch, seq) aligned with `labels` (position t: the logits
    at t - 1), 0 where labels == -100. `logits` may cover only the last positions (``logits_to_keep``).
    Logits are divided by the sampling temperature, as the completions were drawn."""
    n, t = labels.shape
    logits = logits[:, -t:]  # counted from the end: a prompt delta may prepend virtual positions
    k = logits.shape[1]
    logits = logits[:, :-1] if temperature == 1 else logits[:, :-1] / temperature
    target = labels[:, t - k + 1 :]
    logp = label_logprobs(logits, target)
    with torch.no_grad():
        logp_all = F.log_softmax(logits.float(), -1)
        entropy = -(logp_all.exp() * logp_all).sum(-1) * (target != IGNORE)
    pad = logp.new_zeros(n, t - k + 1)
    return torch.cat([pad, logp], 1), torch.cat([pad, entropy], 1)


def forward_kwargs(model: nn.Module, ro: Rollout, rows: Any = slice(None)) -> dict[str, Any]:
    """The inputs of one scoring forward over rollout rows: logits only from the first completion
    token on (``logits_to_keep``, where the model takes it: the prompt's are never needed), no cache."""
    ids, labels = ro.input_ids[rows], ro.labels[rows]
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": ro.attention_mask[rows]}
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        first = int((labels != IGNORE).any(0).float().argmax())
        kw["logits_to_keep"] = ids.shape[1] - first + 1
    if "use_cache" in params:
        kw["use_cache"] = False
    return kw


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def score(
    funcs: Sequence[Any], weights: Sequence[float], ro: Rollout, tokenizer: Any, missing_eos_penalty: float = 0.0
) -> torch.Tensor:
    """The weighted sum of rewards of each completion: a module (a `RewardModel`) scores the ids
    ``(input_ids, attention_mask)``; a plain callable gets ``(prompts, completions)`` as texts when
    a tokenizer is given, as lists of ids otherwise, and returns one number per completion.
    `missing_eos_penalty` is taken off each completion that `max_new_tokens` cut before its eos."""
    total = torch.zeros(len(ro.completions), device=ro.input_ids.device)
    for f, w in zip(funcs, weights, strict=True):
        if isinstance(f, nn.Module):
            with torch.no_grad():
                r = f(ro.input_ids, ro.attention_mask)
        elif tokenizer is not None:
            texts = [[tokenizer.decode(x, skip_special_tokens=True) for x in xs] for xs in (ro.prompts, ro.completions)]
            r = f(*texts)
        else:
            r = f(ro.prompts, ro.completions)
        r = torch.as_tensor(r, dtype=torch.float32, device=total.device).reshape(-1)
        if r.numel() != total.numel():
            raise ConfigError(f"rl: reward function {f!r} gave {r.numel()} rewards for {total.numel()} completions")
        total = total + w * r
    return total - missing_eos_penalty * torch.tensor([not e for e in ro.ended], dtype=total.dtype, device=total.device)


def check_reward_funcs(funcs: Any, weights: Any) -> tuple[list[Any], list[float]]:
    funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
    if not funcs or not all(callable(f) for f in funcs):
        raise ConfigError("rl: reward functions must be a RewardModel or callables (prompts, completions) -> rewards")
    weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(funcs):
        raise ConfigError(f"rl: {len(weights)} reward_weights for {len(funcs)} reward functions")
    return funcs, weights


def check_policy(model: nn.Module, delta: str) -> list[nn.Parameter]:
    """The trainable tensors of the policy delta, or a clear error."""
    if delta not in engine.names(model):
        raise ConfigError(
            f"rl: the policy has no delta {delta!r} (injected: {engine.names(model) or 'none'}); "
            f"surgery.inject(model, 'lora', name={delta!r}, ...) first"
        )
    if delta in engine.merged(model):
        raise ConfigError(f"rl: the policy delta {delta!r} is merged; surgery.unmerge(model, {delta!r}) to train it")
    params = [p for ad in engine.adapters(model, delta).values() for p in ad.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"rl: the policy delta {delta!r} has no trainable tensors; unfreeze them first")
    return params


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """No dropout while sampling and scoring: the ratios and KL compare the same functions."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def cycle_batches(rows: Sequence[Any], batch_size: int, seed: int) -> Iterator[list[Any]]:
    """Prompts in shuffled batches, one epoch after another."""
    if batch_size < 1 or not rows:
        raise ConfigError(f"rl: train needs rows and batch_size >= 1 (got {len(rows)} rows, {batch_size})")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(rows), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield [rows[j] for j in order[i : i + batch_size]]


def train_steps(
    step: Callable[[list[Any]], dict[str, float]],
    rows: Sequence[Any],
    *,
    steps: int,
    batch_size: int,
    seed: int,
    on_step: Callable[[int, dict[str, float]], Any] | None = None,
) -> list[dict[str, float]]:
    """`steps` calls of `step` on batches of `rows` (`cycle_batches`); the statistics of every step,
    each also handed to `on_step(step_index, record)` as it is made (``train_dpo`` does the same)."""
    if steps < 1:
        raise ConfigError(f"rl: train needs steps >= 1, got {steps}")
    if on_step is not None and not callable(on_step):
        raise ConfigError(f"rl: on_step must be a callable (step, record), got {type(on_step).__name__}")
    it = cycle_batches(list(rows), batch_size, seed)
    history: list[dict[str, float]] = []
    for i in range(steps):
        history.append(step(next(it)))
        if on_step is not None:
            on_step(i, history[-1])
    return history
