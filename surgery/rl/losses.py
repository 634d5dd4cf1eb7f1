"""Preference losses as plain functions over per-row log-probabilities (`surgery.rl.logprobs`): usable
in our loop (`train_dpo`), in a `transformers.Trainer`, or in any loop of your own.

Each returns ``(loss, metrics)``: the scalar loss (mean over rows) and floats ``rewards_chosen`` /
``rewards_rejected`` (the mean implicit rewards, beta * (policy - reference) log-ratio; ORPO: beta *
the policy's mean log-prob), ``margin`` (their difference) and ``accuracy`` (the fraction of rows whose
chosen reward beats the rejected one). The formulas are TRL 1.16's (`DPOTrainer` ``sigmoid`` / ``ipo``,
`KTOTrainer` ``kto``, ORPO's ``odds_ratio_loss``); the tests check them against TRL's code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from surgery.errors import ConfigError


def _check(name: str, beta: float, *pairs: tuple[str, torch.Tensor, torch.Tensor]) -> None:
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ConfigError(f"rl.{name}: beta must be a finite number > 0, got {beta!r}")
    for what, a, b in pairs:
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() != 1 or a.shape != b.shape:
            shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in (a, b)]
            raise ConfigError(f"rl.{name}: {what} must be 1-d tensors of one shape (one value per row), got {shapes}")


def _metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    c, r = chosen.detach().float(), rejected.detach().float()
    mean = lambda x: float(x.mean()) if x.numel() else float("nan")  # noqa: E731
    out = {"rewards_chosen": mean(c), "rewards_rejected": mean(r)}
    out["margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    out["accuracy"] = float((c > r).float().mean()) if c.shape == r.shape and c.numel() else float("nan")
    return out


def dpo_loss(
    pol_c: torch.Tensor,
    pol_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO: -log sigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r))), over summed log-probs.
    `label_smoothing` eps in [0, 0.5) is conservative DPO (cDPO): the preference is taken as flipped
    with probability eps, -(1 - eps) log s(beta h) - eps log s(-beta h)."""
    _check(
        "dpo_loss", beta, ("pol_c, pol_r", pol_c, pol_r), ("ref_c, ref_r", ref_c, ref_r), ("pol_c, ref_c", pol_c, ref_c)
    )
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"rl.dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    h = beta * ((pol_c - ref_c) - (pol_r - ref_r))
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return loss.mean(), _metrics(beta * (pol_c - ref_c), beta * (pol_r - ref_r))


def ipo_loss(
    pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float = 0.1
) -> tuple[torch.Tensor, dict[str, float]]:
    """IPO (Azar et al., eq. 17): ((pol_c - ref_c) - (pol_r - ref_r) - 1 / (2 beta))^2. Give it mean
    per-token log-probs (``logprobs(..., average=True)``): that is TRL's length normalisation, which the
    IPO authors confirmed is what their results use."""
    _check(
        "ipo_loss", beta, ("pol_c, pol_r", pol_c, pol_r), ("ref_c, ref_r", ref_c, ref_r), ("pol_c, ref_c", pol_c, ref_c)
    )
    h = (pol_c - ref_c) - (pol_r - ref_r)
    return ((h - 1 / (2 * beta)) ** 2).mean(), _metrics(beta * (pol_c - ref_c), beta * (pol_r - ref_r))


def kto_loss(
    pol_c: torch.Tensor,
    pol_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO (Ethayarajh et al., eq. 7), unpaired: `pol_c` / `ref_c` are the summed log-probs of the
    desirable completions, `pol_r` / `ref_r` those of the undesirable ones (any counts, either may be
    empty). `kl` is the reference point z0: a scalar, or the per-row log-ratios (policy - reference) of
    mismatched completions (prompt i with the completion of row i+1, as TRL builds them), whose mean is
    taken; it is detached and clamped at 0. Loss: the mean over all rows of
    w_d (1 - s(beta (pol_c - ref_c - z0))) and w_u (1 - s(beta (z0 - (pol_r - ref_r)))).
    Pairs work too (chosen desirable, rejected undesirable)."""
    _check("kto_loss", beta, ("pol_c, ref_c", pol_c, ref_c), ("pol_r, ref_r", pol_r, ref_r))
    if pol_c.numel() + pol_r.numel() == 0:
        raise ConfigError("rl.kto_loss: no desirable and no undesirable rows")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ConfigError("rl.kto_loss: desirable_weight and undesirable_weight must be >= 0")
    z0 = torch.as_tensor(kl, dtype=pol_c.dtype, device=pol_c.device).detach().float().mean().clamp(min=0)
    lc, lr = pol_c - ref_c, pol_r - ref_r
    losses = torch.cat(
        [
            desirable_weight * (1 - torch.sigmoid(beta * (lc - z0))),
            undesirable_weight * (1 - torch.sigmoid(beta * (z0 - lr))),
        ]
    )
    return losses.mean(), {**_metrics(beta * lc, beta * lr), "kl": float(z0)}


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    pol_c: torch.Tensor, pol_r: torch.Tensor, nll: torch.Tensor, beta: float = 0.1
) -> tuple[torch.Tensor, dict[str, float]]:
    """ORPO (Hong et al., eqs. 4-7), reference-free: `pol_c` / `pol_r` are the policy's MEAN per-token
    log-probs (``logprobs(..., average=True)``), `nll` the SFT loss on the chosen completions (their
    negative log-likelihood, a scalar: TRL takes the mean over all chosen tokens of the batch). Loss:
    nll - beta * mean(log s(log odds(chosen) - log odds(rejected))), odds(y) = p / (1 - p)."""
    _check("orpo_loss", beta, ("pol_c, pol_r", pol_c, pol_r))
    if not isinstance(nll, torch.Tensor) or nll.numel() != 1:
        raise ConfigError("rl.orpo_loss: nll must be a scalar tensor (the chosen completions' mean NLL)")
    c, r = pol_c.float(), pol_r.float()
    ratio = F.logsigmoid((c - r) - (_log1mexp(c) - _log1mexp(r)))
    return nll.reshape(()) - beta * ratio.mean(), {
        **_metrics(beta * c, beta * r),
        "log_odds_ratio": float(ratio.detach().mean()),
    }
