"""A servable LoRA of any mergeable delta: the truncated SVD of each site's weight change.

    fit = surgery.to_lora(model, "dp", r=16)   # injects "dp_lora" (a plain "lora" delta, scale 1)
    fit.error, fit.errors                        # relative Frobenius error, overall and per site
    registry.save_peft(model, "out/", adapter=fit.name)   # what PEFT and serving engines load

The change comes from the delta's own merge rule (``W' = rows * (W + delta) * cols``), so sparse,
DoRA, LoHa, LoKr, IA3, VeRA ... all convert; the best rank-r approximation of each site's dW
(Eckart-Young) is split evenly, B = U sqrt(S), A = sqrt(S) V^T. LoRA holds no bias: a change of the
bias (IA3 on a biased layer) is left out and counted in the error; a bias-only delta (BitFit) is
refused. The new delta joins the model inactive (the model computes what it did before);
``fit.delta`` is the same as a `surgery.Delta` (``registry.save_peft_delta`` writes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from surgery.errors import ConfigError
from surgery.methods.base import NotMergeable, SiteView, WeightUpdate

_TRANSPOSED = ("conv1d_tf", "embedding")  # LoRA's B @ A is the weight's transpose there


@dataclass(frozen=True)
class LoraFit:
    """What `to_lora` made: the injected delta's `name`, the `delta` itself, the relative Frobenius
    error ||dW - BA|| / ||dW|| per site (`errors`; a dropped bias change counts in) and overall."""

    name: str
    delta: Any
    errors: dict[str, float]
    error: float


def _change(w: torch.Tensor, up: WeightUpdate) -> torch.Tensor:
    """The update's change of `w` (float32): rows * (w + delta) * cols - w."""
    w32 = w.detach().float()
    d = up.delta
    new = w32 if d is None else w32 + (d[0].float() @ d[1].float() if isinstance(d, tuple) else d.float()).view(w.shape)
    if up.rows is not None:
        new = new * up.rows.float().view(-1, *(1,) * (w.dim() - 1))
    if up.cols is not None:
        new = new * up.cols.float().view(1, -1, *(1,) * (w.dim() - 2))
    return new - w32


@torch.no_grad()
def to_lora(model: nn.Module, name: str, r: int = 16, new_name: str | None = None) -> LoraFit:
    """Inject a rank-`r` LoRA (`new_name`, default ``name + "_lora"``, inactive) approximating the
    injected, unmerged delta `name` at each of its sites; returns a `LoraFit` with the errors."""
    from surgery import engine
    from surgery.delta import Delta, apply, fingerprint

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"to_lora: r must be a positive integer rank, got {r!r}")
    new_name = new_name or f"{name}_lora"
    engine.check_name(model, new_name)
    ads = engine.adapters(model, name)  # unknown name: the engine's error
    if name in engine.merged(model):
        raise ConfigError(f"to_lora: delta {name!r} is merged into the weights; surgery.unmerge(model, {name!r}) first")
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    total = missed = 0.0
    for path, ad in ads.items():
        site = SiteView(model, path, engine.site_module(model, path))
        rule = ad.merge(site)
        if isinstance(rule, NotMergeable):
            raise ConfigError(f"to_lora: delta {name!r} at {path!r} has no weight change to approximate: {rule.reason}")
        w = cast(torch.Tensor, site.weight)
        lost = 0.0
        if "bias" in rule and site.bias is not None:
            lost = float(_change(site.bias, rule["bias"]).square().sum())
        if "weight" not in rule:
            errors[path] = 1.0 if lost else 0.0
            total, missed = total + lost, missed + lost
            continue
        if site.kind not in ("linear", *_TRANSPOSED):
            raise ConfigError(
                f"to_lora: {path!r} is a {site.kind!r} site; LoRA by SVD handles linear layers, GPT-2 Conv1D and embeddings"
            )
        m = _change(w, rule["weight"])
        m = m.t() if site.kind in _TRANSPOSED else m
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        k, root = min(r, S.numel()), S[:r].sqrt()
        B = torch.zeros(m.shape[0], r, device=m.device)
        A = torch.zeros(r, m.shape[1], device=m.device)
        B[:, :k], A[:k] = U[:, :k] * root, root[:, None] * Vh[:k]
        norm, res = float(m.square().sum()) + lost, float(S[k:].square().sum()) + lost
        errors[path] = math.sqrt(res / norm) if norm else 0.0
        total, missed = total + norm, missed + res
        tensors[f"{path}.lora_A.weight"] = A.to("cpu", w.dtype)
        tensors[f"{path}.lora_B.weight"] = B.to("cpu", w.dtype)
    if not tensors:
        raise ConfigError(
            f"to_lora: delta {name!r} changes only biases (BitFit), which a LoRA cannot hold; "
            "keep it as a surgery delta (registry.Hub.push) or merge it into a copy of the base"
        )
    delta = Delta("lora", new_name, {"r": r, "alpha": float(r)}, tensors, fingerprint(model))
    was = engine.active(model)
    apply(model, delta)
    engine.activate(model, *was)
    return LoraFit(new_name, delta, errors, math.sqrt(missed / total) if total else 0.0)
