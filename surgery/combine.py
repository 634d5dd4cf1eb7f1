"""Weighted combination of LoRA deltas into a new LoRA delta, as PEFT's
``LoraModel.add_weighted_adapter`` computes it (checked against PEFT 0.21): the same
factors, scale and outputs. The math of each method, the new delta's config and the
order of random draws are in docs/combine.md.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch
from torch import nn

from surgery import engine
from surgery.errors import ConfigError
from surgery.methods.base import SiteView, get_method
from surgery.methods.lora import ConvLoRA, EmbeddingLoRA, LinearLoRA, LoRAConfig
from surgery.methods.moe import is_int, is_number

_FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINE_METHODS = _FACTORWISE + ("cat",) + _SVD
_DENSITY = tuple(m for m in COMBINE_METHODS if m not in ("linear", "cat", "svd"))
_RANDOM = tuple(m for m in COMBINE_METHODS if m.startswith("dare"))


# ---------------------------------------------------------------- merge functions (PEFT's merge_utils)


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:  # PEFT returns the tensor as is (and draws nothing)
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    # one torch.bernoulli over a full_like of t: the draw PEFT makes, on t's device
    return t * torch.bernoulli(torch.full_like(input=t, fill_value=density)) / density


def _weighted(ts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ts * w.view(w.shape + (1,) * (ts.dim() - w.dim()))


def _ties_merge(ts: torch.Tensor, w: torch.Tensor, majority: str) -> torch.Tensor:
    # the sign is elected on the unweighted tensors, then the weighted ones are averaged
    sign = ts.sign()
    mag = ts.sum(dim=0) if majority == "total" else sign.sum(dim=0)
    agree = sign == torch.where(mag >= 0, 1, -1)
    return (_weighted(ts, w) * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _merge(
    kind: str, tensors: list[torch.Tensor], w: torch.Tensor, density: float | None, majority: str
) -> torch.Tensor:
    base = kind.removesuffix("_svd")
    if base in ("linear", "svd"):
        return _weighted(torch.stack(tensors, dim=0), w).sum(dim=0)
    # dare_*: each tensor draws its mask in turn, in the order of `weights`
    prune = _prune_magnitude if base in ("ties", "magnitude_prune") else _prune_random
    ts = torch.stack([prune(t, density) for t in tensors], dim=0)  # type: ignore[arg-type]
    if base in ("ties", "dare_ties"):
        return _ties_merge(ts, w, majority)
    return _weighted(ts, w).sum(dim=0)


# ---------------------------------------------------------------- per-site computation


def _delta_weight(ad: Any, mod: nn.Module) -> torch.Tensor:
    """s B A in the base weight's layout, by PEFT's `get_delta_weight` op for op: the
    same values and the same strides, so magnitude ranks and random masks land alike."""
    A, B = ad.lora_A.detach(), ad.lora_B.detach()
    dtype = B.dtype
    upcast = A.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if upcast:
        A, B = A.float(), B.float()
    if isinstance(ad, LinearLoRA):
        out = B @ A
        out = (out.T if ad.fan_in_fan_out else out) * ad.scale
    elif isinstance(ad, EmbeddingLoRA):
        out = (B @ A).T * ad.scale
    elif tuple(mod.get_parameter("weight").shape[2:4]) == (1, 1):  # conv2d 1x1
        out = (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * ad.scale
    else:
        out = ad.conv(A.transpose(0, 1), B).transpose(0, 1) * ad.scale
    return out.to(dtype) if upcast else out


def _factorwise(
    kind: str, present: list[tuple[Any, float]], density: float | None, majority: str
) -> tuple[torch.Tensor, torch.Tensor]:
    ws = [w * ad.scale for ad, w in present]
    wa = [math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in ws]  # the sign rides on A only, else it cancels in B A
    wb = [math.sqrt(abs(v)) for v in ws]
    A0 = present[0][0].lora_A
    # all A's first, then all B's: the order PEFT draws dare masks in
    A = _merge(kind, [ad.lora_A.detach() for ad, _ in present], torch.tensor(wa).to(A0.device), density, majority)
    B = _merge(kind, [ad.lora_B.detach() for ad, _ in present], torch.tensor(wb).to(A0.device), density, majority)
    return A.to(A0.dtype), B.to(A0.dtype)


def _cat(present: list[tuple[Any, float]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    A0, B0 = present[0][0].lora_A, present[0][0].lora_B
    As = torch.cat([ad.lora_A.detach() * w * ad.scale for ad, w in present], dim=0)
    Bs = torch.cat([ad.lora_B.detach() for ad, _ in present], dim=1)
    # padded with zeros up to the summed configured rank, as PEFT's preallocated adapter is
    A = torch.zeros((rank, *A0.shape[1:]), dtype=A0.dtype, device=A0.device)
    B = torch.zeros((B0.shape[0], rank, *B0.shape[2:]), dtype=B0.dtype, device=B0.device)
    A[: As.shape[0]] = As
    B[:, : Bs.shape[1]] = Bs
    return A, B


def _svd(
    kind: str,
    present: list[tuple[Any, float]],
    mod: nn.Module,
    rank: int,
    density: float | None,
    majority: str,
    clamp: float | None,
    full_matrices: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    ad0 = present[0][0]
    deltas = [_delta_weight(ad, mod) for ad, _ in present]
    d = _merge(kind, deltas, torch.tensor([w for _, w in present]).to(deltas[0].device), density, majority)
    conv = isinstance(ad0, ConvLoRA)
    if conv:  # PEFT: Conv2d only (squeeze for 1x1 is the same matrix); Conv1d the same way here
        d = d.flatten(start_dim=1)
    if (isinstance(ad0, LinearLoRA) and ad0.fan_in_fan_out) or isinstance(ad0, EmbeddingLoRA):
        d = d.T  # back to [out, in], B A's layout
    U, S, Vh = torch.linalg.svd(d, full_matrices=full_matrices)
    U = U[:, :rank] @ torch.diag(S[:rank])
    Vh = Vh[:rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    if conv:
        k = ad0.lora_A.shape[2:]
        U = U.reshape(U.shape[0], rank, *(1,) * len(k))
        Vh = Vh.reshape(rank, ad0.lora_A.shape[1], *k)
    return Vh, U


# ---------------------------------------------------------------- random state


@contextlib.contextmanager
def _rng(devices: set[torch.device], seed: int | None = None) -> Iterator[None]:
    """Keep the random state of the CPU and of these devices' kinds as it was; with a
    seed, seed them first exactly as torch.manual_seed(seed) does."""
    kinds = sorted({d.type for d in devices} - {"cpu", "meta"})
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))  # the CPU generator
        for kind in kinds:
            n = torch.get_device_module(kind).device_count()
            stack.enter_context(torch.random.fork_rng(devices=list(range(n)), device_type=kind))
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            for kind in kinds:
                torch.get_device_module(kind).manual_seed_all(seed)
        yield


def _draw_like_peft_injection(ads: list[Any], rank: int, init: str) -> None:
    """Make the random draws PEFT makes when `add_weighted_adapter` injects the new adapter
    (its values are overwritten afterwards), so the dare masks that follow are drawn from the
    same generator state (the sequence is in docs/combine.md)."""
    for ad in ads:
        a_shape, b_shape = (rank, *ad.lora_A.shape[1:]), (ad.lora_B.shape[0], rank, *ad.lora_B.shape[2:])
        if isinstance(ad, EmbeddingLoRA):
            torch.randn(a_shape)
            nn.init.normal_(torch.randn(b_shape))
            continue
        A = torch.empty(a_shape)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(torch.empty(b_shape), a=math.sqrt(5))
        if init == "gaussian":
            nn.init.normal_(A, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))


# ---------------------------------------------------------------- the entry point


def _check_args(
    weights: Any, method: Any, r: Any, density: Any, majority: Any, seed: Any, svd_clamp: Any, svd_full_matrices: Any
) -> None:
    if method not in COMBINE_METHODS:
        raise ConfigError(f"combine: unknown method {method!r}; known methods: {list(COMBINE_METHODS)}")
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(
            f"combine: weights must be a non-empty dict of delta name -> weight, e.g. {{'a': 0.5, 'b': 0.5}}; "
            f"got {weights!r}"
        )
    for k, v in weights.items():
        if not isinstance(k, str) or not is_number(v):
            raise ConfigError(f"combine: weights[{k!r}] must map a delta name to a finite number, got {v!r}")
    if method in _DENSITY:
        if density is None:
            raise ConfigError(f"combine: method {method!r} needs density, the fraction of entries kept, in (0, 1]")
        if not is_number(density) or not 0 < density <= 1:
            raise ConfigError(f"combine: density must be a number in (0, 1], got {density!r}")
    elif density is not None:
        raise ConfigError(f"combine: density is used by {list(_DENSITY)} only, not by {method!r}")
    if majority not in ("total", "frequency"):
        raise ConfigError(f"combine: majority_sign_method must be 'total' or 'frequency', got {majority!r}")
    if method in _SVD:
        if r is not None and not (is_int(r) and r > 0):
            raise ConfigError(f"combine: r must be a positive integer (or None: the largest input rank), got {r!r}")
        if svd_clamp is not None and (not is_number(svd_clamp) or not 0 < svd_clamp <= 1):
            raise ConfigError(f"combine: svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}")
        if not isinstance(svd_full_matrices, bool):
            raise ConfigError(f"combine: svd_full_matrices must be True or False, got {svd_full_matrices!r}")
    else:
        for key, v in (("r", r), ("svd_clamp", svd_clamp)):
            if v is not None:
                hint = " (cat sums the input ranks; the others keep the common rank)" if key == "r" else ""
                raise ConfigError(
                    f"combine: {key} is used by the svd methods {list(_SVD)} only, not by {method!r}{hint}"
                )
    if seed is not None and not is_int(seed):
        raise ConfigError(f"combine: seed must be an integer or None, got {seed!r}")


def _configured_rank(cfg: LoRAConfig, ads: dict[str, Any]) -> int:
    # PEFT's: r, or the largest rank_pattern value; never below a rank actually held
    r = max(cfg.r, *cfg.rank_pattern.values()) if cfg.rank_pattern else cfg.r
    return max([r, *(ad.lora_A.shape[0] for ad in ads.values())])


def combine(
    model: nn.Module,
    weights: dict[str, float],
    method: str = "linear",
    *,
    name: str = "combined",
    r: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
) -> engine.Injection:
    """Combine injected LoRA deltas into a new LoRA delta `name`, as PEFT's
    ``add_weighted_adapter(list(weights), list(weights.values()), name, method, ...)`` does.

    `weights` maps delta names to weights (negative subtracts). `method` is one of
    `COMBINE_METHODS` (the math is in docs/combine.md). `density` (in (0, 1]) is needed by
    the pruning methods, `majority_sign_method` ("total" or "frequency") is used by the ties
    ones, `r`, `svd_clamp` and `svd_full_matrices` by the svd ones. ``linear`` and the other
    factor-wise methods need deltas of one rank (``linear``: on the same sites too); ``cat``
    and the svd methods take any.

    The new delta is injected but not active: ``surgery.use(model, name)``. The inputs are
    only read (merged ones too). On any error nothing in the model changes.

    Randomness (dare methods): with ``seed=None`` the global generators are used as they
    are; with a seed they are seeded as ``torch.manual_seed(seed)`` would, and restored
    afterwards, so ``torch.manual_seed(s); peft_model.add_weighted_adapter(...)`` gives the
    same result as ``combine(..., seed=s)``: PEFT's draws are repeated in its order.
    """
    _check_args(weights, method, r, density, majority_sign_method, seed, svd_clamp, svd_full_matrices)
    engine.check_name(model, name)
    lora = get_method("lora")
    names = list(weights)
    for n in names:
        engine.injection(model, n)  # InjectionError naming the injected deltas
    kinds = {engine.method_of(model, n).name for n in names}
    own = getattr(get_method(kinds.pop()), "combine_linear", None) if len(kinds) == 1 else None
    if own is not None and method == "linear":  # a method that sums its own deltas (sparse: over the union of entries)
        return own(model, dict(weights), name)
    for n in names:
        have = engine.method_of(model, n).name
        if have != "lora":
            raise ConfigError(f"combine: delta {n!r} is a {have!r} delta; only LoRA deltas can be combined")
    ads = {n: engine.adapters(model, n) for n in names}
    kind = "linear" if len(names) == 1 else method  # PEFT: one delta is always combined linearly
    ranks = {n: _configured_rank(engine.config_of(model, n), ads[n]) for n in names}
    if kind in _FACTORWISE:
        if len(set(ranks.values())) != 1:
            raise ConfigError(
                f"combine: method {kind!r} needs deltas of one rank (PEFT's rule), got ranks {ranks}; "
                "use 'cat' or an svd method for deltas of different ranks"
            )
        new_rank = next(iter(ranks.values()))
    elif kind == "cat":
        new_rank = sum(ranks.values())
    else:
        new_rank = r or max(ranks.values())
    if kind == "linear" and len({frozenset(a) for a in ads.values()}) > 1:
        first = set(ads[names[0]])
        other = next(n for n in names if set(ads[n]) != first)
        diff = sorted(first ^ set(ads[other]))
        raise ConfigError(
            f"combine: method 'linear' needs deltas on the same sites; {names[0]!r} and {other!r} differ at "
            f"{diff[:4]}{' ...' if len(diff) > 4 else ''}. Use 'cat' or 'svd' to combine deltas on different sites"
        )

    union = set().union(*ads.values())
    # (path, module, [(adapter, weight)] of the deltas there), in module order: PEFT's loop order
    sites = [
        (path, engine.site_module(model, path), [(ads[n][path], float(weights[n])) for n in names if path in ads[n]])
        for path, _ in model.named_modules()
        if path in union
    ]
    _check_sites(kind, sites, new_rank)

    first_cfg: LoRAConfig = engine.config_of(model, names[0])
    devices = {
        cast(torch.Tensor, t).device for _, _, present in sites for ad, _ in present for t in (ad.lora_A, ad.lora_B)
    }
    devices.add(torch.empty(0).device)  # PEFT initialises the new adapter on the default device
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad(), _rng(devices, seed) if seed is not None else contextlib.nullcontext():
        if kind in _RANDOM:
            _draw_like_peft_injection([present[0][0] for _, _, present in sites], new_rank, first_cfg.init)
        for path, mod, present in sites:
            if kind == "cat":
                out[path] = _cat(present, new_rank)
            elif kind in _SVD:
                out[path] = _svd(
                    kind, present, mod, new_rank, density, majority_sign_method, svd_clamp, svd_full_matrices
                )
            else:
                out[path] = _factorwise(kind, present, density, majority_sign_method)

    # PEFT gives every site the scale of r = alpha = new_rank; a site whose factors keep
    # another rank (factor-wise methods on rank_pattern deltas) gets an alpha that gives it that scale
    target = new_rank / (math.sqrt(new_rank) if first_cfg.rslora else new_rank)
    rank_pattern = {"re:" + re.escape(p): A.shape[0] for p, (A, _) in out.items() if A.shape[0] != new_rank}
    alpha_pattern = {k: target * (math.sqrt(rs) if first_cfg.rslora else rs) for k, rs in rank_pattern.items()}
    cfg = lora.config(
        r=new_rank,
        alpha=new_rank,
        dropout=first_cfg.dropout,
        init=first_cfg.init,
        rslora=first_cfg.rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    made = []
    with _rng(devices):  # make() draws an init that is overwritten: leave the caller's generators alone
        for path, mod, _ in sites:
            A, B = out[path]
            ad = lora.make(SiteView(model, path, mod), cfg, shapes={"lora_A.weight": A.shape, "lora_B.weight": B.shape})
            with torch.no_grad():
                ad.tensors()["lora_A.weight"].copy_(A)
                ad.tensors()["lora_B.weight"].copy_(B)
            made.append((path, mod, ad))
    return engine.attach(model, name, lora, cfg, made, activate=False)


def _check_sites(kind: str, sites: list[tuple[str, nn.Module, list[tuple[Any, float]]]], rank: int) -> None:
    for path, _, present in sites:
        ad0 = present[0][0]
        for ad, _ in present[1:]:
            if ad.lora_A.dtype != ad0.lora_A.dtype or ad.lora_A.device != ad0.lora_A.device:
                raise ConfigError(
                    f"combine: at {path!r} the deltas' tensors differ in dtype or device "
                    f"({ad0.lora_A.dtype} on {ad0.lora_A.device} vs {ad.lora_A.dtype} on {ad.lora_A.device}); "
                    "bring the model to one dtype and device first"
                )
            if kind in _FACTORWISE and ad.lora_A.shape != ad0.lora_A.shape:
                raise ConfigError(
                    f"combine: method {kind!r} needs one rank per site, but at {path!r} the deltas have ranks "
                    f"{[a.lora_A.shape[0] for a, _ in present]}; use 'cat' or an svd method"
                )
        if kind in _SVD:
            rows, cols = ad0.lora_B.shape[0], math.prod(ad0.lora_A.shape[1:])  # the factored [out, in(*kernel)]
            if rank > min(rows, cols):
                raise ConfigError(
                    f"combine: r={rank} exceeds the largest rank {min(rows, cols)} of an update at {path!r} "
                    f"([{rows}, {cols}]); pass a smaller r"
                )
