r"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022) with every role on one frozen base: the
policy is a delta, the value a second delta (LoRA) with a linear head over the final hidden states,
the reward a `RewardModel` on a third delta (or any callable), the reference the base with every
delta off (or with the deltas `ref_delta` names on: the SFT delta the policy was copied from).

Per token :math:`t` of a completion the reward is :math:`-\beta(\log\pi(a_t) - \log\pi_{ref}(a_t))`,
plus the sequence's score at its last token. Advantages are GAE,
:math:`\delta_t = r_t + \gamma V_{t+1} - V_t`, :math:`A_t = \delta_t + \gamma\lambda A_{t+1}` (0 past
the last token), whitened over the batch's completion tokens; returns :math:`A_t + V_t`. The loss
is the clipped surrogate :math:`\max(-A\rho, -A\,\mathrm{clip}(\rho, 1\pm\epsilon))` plus
`vf_coef` times the clipped value loss, each averaged over completion tokens.

With ``batch_split=True`` policy and value run in one forward: the batch twice, the first half through
the policy delta, the second through the value delta (`surgery.BatchSplit`). Off by default: within
fp32 rounding of two forwards, not bit-identical, and not faster on CPU for SmolLM2 (docs/rl-ppo-grpo.md)."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from surgery import engine
from surgery.compose import BatchSplit
from surgery.errors import CompositionError, ConfigError
from surgery.methods.head import head_deltas
from surgery.recipes.heads import heads
from surgery.rl.reference import keep_names, reference
from surgery.rl.rollout import (
    Rollout,
    check_policy,
    check_reward_funcs,
    eval_mode,
    forward_kwargs,
    masked_mean,
    rollout,
    score,
    token_stats,
    train_steps,
)


def value_head(model: nn.Module, value: str, targets: Any = None, r: int = 8) -> nn.Linear:
    """The value head of the value delta `value`: a LoRA `value` and a one-output token head (the
    head delta ``f"{value}-head"``), injected here when neither exists, outside the default active set."""
    head = f"{value}-head"
    held = head_deltas(model).get(head)
    have = [n for n in (value, head) if n in engine.names(model)]
    if have and not (len(have) == 2 and engine.method_of(model, value).name == "lora" and held and value in held.tasks):
        raise ConfigError(
            f"PPO: delta {have[0]!r} exists and is not part of a value delta (LoRA {value!r} + token head {head!r}); "
            "pass another value= name, or surgery.remove(model, name) first"
        )
    if not have:
        before = contextvars.Context().run(engine.active, model)  # the default set, outside any use()
        engine.inject(model, "lora", targets=targets, name=value, r=r)
        try:
            heads(model, {value: ("token", 1)}, name=head)
        except BaseException:
            engine.remove(model, value)
            raise
        engine.activate(model, *before)  # the value is not part of the model's plain calls
    lin = head_deltas(model)[head][value]
    assert isinstance(lin, nn.Linear)
    return lin


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns over the tokens `mask` marks (batch, seq; each
    row's marked tokens contiguous); the value past a row's last token is 0."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    n = rewards.shape[1]
    for t in reversed(range(n)):
        nxt = mask[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        nxt_v = values[:, t + 1] * nxt if t + 1 < n else nxt
        delta = rewards[:, t] + gamma * nxt_v - values[:, t]
        last = delta + gamma * lam * last * nxt
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit variance over the marked entries (0 elsewhere)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


class PPO:
    """PPO on the delta `delta` of `policy` against `reward` (see the module doc). ``step(prompts)``
    samples one completion per prompt, scores it, and runs `ppo_epochs` epochs of `minibatch`-row
    updates of the policy delta and the value delta and head (the optimizer holds these alone)."""

    def __init__(
        self,
        policy: nn.Module,
        *,
        delta: str = "default",
        value: str = "v",
        reward: Any,
        kl: float = 0.05,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip: float = 0.2,
        value_clip: float = 0.2,
        vf_coef: float = 0.1,
        ppo_epochs: int = 4,
        minibatch: int | None = None,
        lr: float = 1e-5,
        tokenizer: Any = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        value_targets: Any = None,
        value_r: int = 8,
        max_grad_norm: float | None = 1.0,
        missing_eos_penalty: float = 0.0,
        ref_delta: str | list[str] | None = None,
        batch_split: bool = False,
    ) -> None:
        params = check_policy(policy, delta)
        self.ref_delta = keep_names(ref_delta, "PPO", delta)
        (self.reward,), _ = check_reward_funcs([reward], None)
        need = {
            "kl >= 0": kl >= 0,
            "0 <= gamma <= 1": 0 <= gamma <= 1,
            "0 <= lam <= 1": 0 <= lam <= 1,
            "0 < clip < 1": 0 < clip < 1,
            "value_clip > 0": value_clip > 0,
            "vf_coef >= 0": vf_coef >= 0,
            "ppo_epochs >= 1": ppo_epochs >= 1,
            "minibatch >= 1": minibatch is None or minibatch >= 1,
            "lr > 0": lr > 0,
            "temperature > 0": temperature > 0,
            "0 < top_p <= 1": 0 < top_p <= 1,
            "max_new_tokens >= 1": max_new_tokens >= 1,
        }
        if not all(need.values()):
            raise ConfigError(f"PPO: needs {', '.join(k for k, ok in need.items() if not ok)}")
        if value == delta:
            raise ConfigError(f"PPO: value={value!r} names the policy delta; the value needs its own delta")
        if value in self.ref_delta:
            raise ConfigError(f"PPO: value={value!r} is also ref_delta; the value needs a delta of its own")
        self.head = value_head(policy, value, value_targets, value_r)
        value_params = [
            p for n in (value, f"{value}-head") for ad in engine.adapters(policy, n).values() for p in ad.parameters()
        ]
        self.params = params + value_params
        for p in value_params:
            p.requires_grad_(True)
        self.policy, self.delta, self.value = policy, delta, value
        self.kl, self.gamma, self.lam, self.clip, self.value_clip, self.vf_coef = (
            kl,
            gamma,
            lam,
            clip,
            value_clip,
            vf_coef,
        )
        self.ppo_epochs, self.minibatch, self.max_grad_norm = ppo_epochs, minibatch, max_grad_norm
        self.tokenizer, self.max_new_tokens, self.temperature, self.top_p = (
            tokenizer,
            max_new_tokens,
            temperature,
            top_p,
        )
        self.batch_split = batch_split  # off again if a delta refuses to run inside a BatchSplit
        self.missing_eos_penalty = missing_eos_penalty
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)

    def forward(self, ro: Rollout, rows: Any = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities and entropies under the policy delta, and values under the
        value delta, aligned with the labels (batch, seq)."""
        kw, labels = forward_kwargs(self.policy, ro, rows), ro.labels[rows]
        n = labels.shape[0]
        out = None
        if self.batch_split:
            both = {k: v.repeat(2, 1) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            try:
                with engine.use(self.policy, BatchSplit(self.delta, self.value, batch_sizes=[n, n])):
                    out = self.policy(**both, output_hidden_states=True)
                logits, hidden = out.logits[:n], out.hidden_states[-1][n:]
            except CompositionError:  # a delta that cannot split rows (prompt tuning changes the inputs)
                out, self.batch_split = None, False
        if out is None:
            with engine.use(self.policy, self.delta):
                logits = self.policy(**kw).logits
            with engine.use(self.policy, self.value):
                hidden = self.policy(**kw, output_hidden_states=True).hidden_states[-1]
        logp, entropy = token_stats(logits, labels, self.temperature)
        v = (
            self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()
        )  # the value of the state before token t: the hidden state at t - 1
        values = torch.cat([v.new_zeros(n, 1), v[:, :-1]], 1) * (labels != -100)
        return logp, entropy, values

    def step(self, prompts: Any) -> dict[str, float]:
        """One PPO step on a batch of prompts (texts with `tokenizer`, `rl.data.Encoded` rows, or a
        left-padded ``rl.data.prompts`` dict): ``reward`` (mean score), ``kl`` (summed over a
        completion, mean over the batch), ``policy_loss``, ``value_loss``, ``clip_fraction``,
        ``entropy``, ``length`` (the losses averaged over the updates)."""
        with eval_mode(self.policy):
            ro = rollout(
                self.policy,
                prompts,
                delta=self.delta,
                tokenizer=self.tokenizer,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
            )
            mask = ro.mask
            scores = score([self.reward], [1.0], ro, self.tokenizer, self.missing_eos_penalty)
            with torch.no_grad():
                old_logp, _, old_values = self.forward(ro)
                with reference(self.policy, *self.ref_delta):
                    logits = self.policy(**forward_kwargs(self.policy, ro)).logits
                ref_logp = token_stats(logits, ro.labels, self.temperature)[0]
                kl = (old_logp - ref_logp) * mask
                rewards = -self.kl * kl
                last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # each completion's last token
                rewards[torch.arange(len(last)), last] += scores
                adv, returns = gae(rewards, old_values, mask, self.gamma, self.lam)
                adv = whiten(adv, mask)
            totals = dict.fromkeys(("policy_loss", "value_loss", "clip_fraction", "entropy"), 0.0)
            n, updates = len(ro.completions), 0
            size = self.minibatch or n
            for _ in range(self.ppo_epochs):
                for idx in torch.randperm(n, device=mask.device).split(size):
                    m = mask[idx]
                    logp, entropy, values = self.forward(ro, idx)
                    v_clipped = old_values[idx] + (values - old_values[idx]).clamp(-self.value_clip, self.value_clip)
                    vf = 0.5 * masked_mean(torch.max((values - returns[idx]) ** 2, (v_clipped - returns[idx]) ** 2), m)
                    ratio = torch.exp(logp - old_logp[idx])
                    pg1, pg2 = -adv[idx] * ratio, -adv[idx] * ratio.clamp(1 - self.clip, 1 + self.clip)
                    pg = masked_mean(torch.max(pg1, pg2), m)
                    self.optimizer.zero_grad(set_to_none=True)
                    (pg + self.vf_coef * vf).backward()
                    if self.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                    self.optimizer.step()
                    for k, x in zip(
                        totals, (pg, vf, masked_mean((pg2 > pg1).float(), m), masked_mean(entropy, m)), strict=True
                    ):
                        totals[k] += x.item()
                    updates += 1
        return {
            "reward": scores.mean().item(),
            "kl": kl.sum(1).mean().item(),
            **{k: v / updates for k, v in totals.items()},
            "length": mask.sum(1).mean().item(),
        }

    def train(
        self,
        rows: Any,
        *,
        steps: int,
        batch_size: int = 8,
        seed: int = 0,
        on_step: Callable[[int, dict[str, float]], Any] | None = None,
    ) -> list[dict[str, float]]:
        """`steps` PPO steps over `rows` (prompts, as `step` takes them), `batch_size` prompts a step,
        shuffled by `seed`; the statistics of every step, each also handed to `on_step(step, record)`."""
        return train_steps(self.step, rows, steps=steps, batch_size=batch_size, seed=seed, on_step=on_step)
