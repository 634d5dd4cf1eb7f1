r"""GRPO (DeepSeekMath): `group` completions per prompt, each one's advantage its reward against its
group's, :math:`A_i = (r_i - \bar r) / (\sigma_r + 10^{-4})` (``scale_rewards=False``: no division,
as Dr. GRPO), a token-level clipped surrogate and a KL penalty to the reference by the k3 estimator
:math:`\exp(\log\pi_{ref} - \log\pi) - (\log\pi_{ref} - \log\pi) - 1`. No value model.

The policy is a delta on the base and the reference is that base with every delta off (or with the
deltas `ref_delta` names on, e.g. the SFT delta the policy was copied from): one model.
The loss is normalised as TRL's default ``loss_type="dapo"`` (over all completion tokens of the
batch); ``"grpo"`` averages per sequence first, ``"dr_grpo"`` divides by batch x max_new_tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from surgery import engine
from surgery.errors import ConfigError
from surgery.rl.reference import keep_names, reference
from surgery.rl.rollout import (
    Rollout,
    check_policy,
    check_reward_funcs,
    eval_mode,
    forward_kwargs,
    masked_mean,
    prompt_batch,
    rollout,
    score,
    token_stats,
    train_steps,
)

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """Each reward against the mean of its group (consecutive `group` rows), divided by the group's
    standard deviation (unbiased, + 1e-4) when `scale`."""
    r = rewards.reshape(-1, group)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "dapo",
    max_new_tokens: int = 1,
    *,
    rows: int | None = None,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One loss from per-token losses (batch, seq) over the completion tokens `mask` marks: ``dapo``
    the mean over all of them, ``grpo`` the mean of each sequence's mean, ``dr_grpo`` the sum over
    batch x `max_new_tokens`. For a minibatch, `rows` and `tokens` are the whole batch's (sequences,
    completion tokens): the minibatches' losses then add up to the whole batch's."""
    rows = mask.shape[0] if rows is None else rows
    if loss_type == "grpo":
        return masked_mean(per_token, mask, 1).sum() / rows
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (rows * max_new_tokens)
    return (per_token * mask).sum() / (mask.sum() if tokens is None else tokens).clamp(min=1)


class GRPO:
    """Group-relative policy optimisation of the delta `delta` of `policy` (see the module doc).
    ``step(prompts)`` samples, scores, updates once per `iterations` and returns its statistics."""

    def __init__(
        self,
        policy: nn.Module,
        *,
        delta: str = "default",
        reward_funcs: Any,
        reward_weights: Any = None,
        group: int = 8,
        beta: float = 0.04,
        clip: float = 0.2,
        lr: float = 1e-5,
        tokenizer: Any = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        scale_rewards: bool = True,
        loss_type: str = "dapo",
        iterations: int = 1,
        minibatch: int | None = None,
        max_grad_norm: float | None = 1.0,
        missing_eos_penalty: float = 0.0,
        ref_delta: str | list[str] | None = None,
    ) -> None:
        self.params = check_policy(policy, delta)
        self.ref_delta = keep_names(ref_delta, "GRPO", delta)
        self.reward_funcs, self.reward_weights = check_reward_funcs(reward_funcs, reward_weights)
        if group < 2:
            raise ConfigError(f"GRPO: group must be >= 2 (advantages compare completions of one prompt), got {group}")
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"GRPO: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if minibatch is not None and minibatch < 1:
            raise ConfigError(f"GRPO: minibatch must be >= 1 (completions per forward), got {minibatch}")
        need = {
            "beta >= 0": beta >= 0,
            "0 < clip < 1": 0 < clip < 1,
            "lr > 0": lr > 0,
            "temperature > 0": temperature > 0,
            "0 < top_p <= 1": 0 < top_p <= 1,
            "iterations >= 1": iterations >= 1,
            "max_new_tokens >= 1": max_new_tokens >= 1,
        }
        if not all(need.values()):
            raise ConfigError(f"GRPO: needs {', '.join(k for k, ok in need.items() if not ok)}")
        self.policy, self.delta, self.group, self.beta, self.clip = policy, delta, group, beta, clip
        self.tokenizer, self.max_new_tokens, self.temperature, self.top_p = (
            tokenizer,
            max_new_tokens,
            temperature,
            top_p,
        )
        self.scale_rewards, self.loss_type, self.iterations, self.max_grad_norm = (
            scale_rewards,
            loss_type,
            iterations,
            max_grad_norm,
        )
        self.minibatch = minibatch
        self.missing_eos_penalty = missing_eos_penalty
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)

    def _logp(self, ro: Rollout, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.policy(**forward_kwargs(self.policy, ro, idx)).logits
        return token_stats(logits, ro.labels[idx], self.temperature)

    def step(self, prompts: Any) -> dict[str, float]:
        """One GRPO step on a batch of prompts (texts with `tokenizer`, `rl.data.Encoded` rows, or a
        left-padded ``rl.data.prompts`` dict): ``reward`` (mean), ``reward_std`` (within groups),
        ``kl`` (k3, mean per token), ``loss``, ``clip_fraction``, ``entropy``, ``length`` (of the
        last update). Forwards and backwards run `minibatch` completions at a time, the gradients
        accumulated into one update."""
        batch = {k: v.repeat_interleave(self.group, 0) for k, v in prompt_batch(prompts, self.tokenizer).items()}
        with eval_mode(self.policy):
            ro = rollout(
                self.policy,
                batch,
                delta=self.delta,
                tokenizer=self.tokenizer,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
            )
            rewards = score(self.reward_funcs, self.reward_weights, ro, self.tokenizer, self.missing_eos_penalty)
            adv = group_advantages(rewards, self.group, self.scale_rewards).unsqueeze(1)
            mask, n = ro.mask, len(ro.completions)
            chunks = torch.arange(n, device=mask.device).split(self.minibatch or n)
            with torch.no_grad():
                ref = old = None
                if self.beta:
                    with reference(self.policy, *self.ref_delta):
                        ref = torch.cat([self._logp(ro, idx)[0] for idx in chunks])
                if self.iterations > 1:  # with one update per batch the ratio is 1 at its only step
                    with engine.use(self.policy, self.delta):
                        old = torch.cat([self._logp(ro, idx)[0] for idx in chunks])
            tokens = mask.sum()
            for _ in range(self.iterations):
                self.optimizer.zero_grad(set_to_none=True)
                sums = dict.fromkeys(("kl", "loss", "clip_fraction", "entropy"), 0.0)
                for idx in chunks:
                    m, a = mask[idx], adv[idx]
                    with engine.use(self.policy, self.delta):
                        logp, entropy = self._logp(ro, idx)
                    ratio = torch.exp(logp - (logp.detach() if old is None else old[idx]))
                    clipped = ratio.clamp(1 - self.clip, 1 + self.clip)
                    per_token = -torch.min(ratio * a, clipped * a)
                    kl = torch.zeros_like(logp)
                    if ref is not None:
                        kl = torch.exp(ref[idx] - logp) - (ref[idx] - logp) - 1
                        per_token = per_token + self.beta * kl
                    loss = aggregate(per_token, m, self.loss_type, self.max_new_tokens, rows=n, tokens=tokens)
                    loss.backward()
                    sums["loss"] += loss.item()
                    for k, x in (("kl", kl), ("clip_fraction", (ratio - clipped).abs() > 0), ("entropy", entropy)):
                        sums[k] += (x.detach().float() * m).sum().item() / tokens.clamp(min=1).item()
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                self.optimizer.step()
        return {
            "reward": rewards.mean().item(),
            "reward_std": rewards.reshape(-1, self.group).std(1).mean().item(),
            **sums,
            "length": mask.sum(1).mean().item(),
        }

    def train(
        self,
        rows: Any,
        *,
        steps: int,
        batch_size: int = 4,
        seed: int = 0,
        on_step: Callable[[int, dict[str, float]], Any] | None = None,
    ) -> list[dict[str, float]]:
        """`steps` GRPO steps over `rows` (prompts, as `step` takes them), `batch_size` prompts a step
        (each sampled `group` times), shuffled by `seed`; the statistics of every step, each also handed
        to `on_step(step, record)`."""
        return train_steps(self.step, rows, steps=steps, batch_size=batch_size, seed=seed, on_step=on_step)
