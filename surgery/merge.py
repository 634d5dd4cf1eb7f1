"""Exact merge and unmerge of a weight delta.

Adding a delta D to a weight W rounds, so ``(W + D) - D`` is not W in general
(PEFT's bf16 merge/unmerge alters about a fifth of the weights in one cycle).
We compute in float32 (float64 for float64 weights) and round once:
``W' = round(W + D)``. For every element where ``round(W' - D)`` does not give W
back (rare: only where W + D crossed a power of two) we keep the original value.
Unmerge recomputes D from a snapshot of the factors, subtracts, puts back those
few originals and checks a checksum of W before writing anything, so it either
restores W bit for bit or raises and leaves the merged weight as it was.

Work goes row-chunk by row-chunk, so the transient memory is a fraction of one
layer's weight; unmerge stages the restored weight in one layer-sized buffer.
The fixups themselves (int32 index + original value per element that needs one;
their share grows with |delta| / |weight|) live in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.errors import MergeError

_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}
_CHUNK_ELEMS = 1 << 22  # ~16 MB of fp32 temporaries per chunk

Factors = tuple[torch.Tensor, torch.Tensor] | torch.Tensor


@dataclass
class MergeRecord:
    factors: Factors  # detached snapshot, so later training cannot break unmerge
    idx: torch.Tensor  # flat indices where round(W' - D) != W
    vals: torch.Tensor  # the original values there
    checksum: tuple[int, int]


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.dtype])


def _checksum_part(t: torch.Tensor) -> tuple[int, int]:
    b = _bits(t).reshape(-1).to(torch.int64)
    return int(b.sum()), int((b * b).sum())  # int64 wraps; equal inputs give equal sums


def _delta_rows(factors: Factors, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(factors, tuple):
        left, right = factors
        return left[lo:hi].to(dtype) @ right.to(dtype)
    return factors[lo:hi].to(dtype)


def _chunks(w: torch.Tensor) -> list[tuple[int, int]]:
    rows = w.shape[0]
    per_row = max(1, w.numel() // max(rows, 1))
    step = max(1, _CHUNK_ELEMS // per_row)
    return [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]


def snapshot(factors: Factors) -> Factors:
    if isinstance(factors, tuple):
        return tuple(f.detach().clone() for f in factors)  # type: ignore[return-value]
    return factors.detach().clone()


@torch.no_grad()
def merge_weight(weight: torch.Tensor, factors: Factors) -> MergeRecord:
    """Add the delta to `weight` in place; return what unmerge needs."""
    if weight.dtype not in _INT:
        raise MergeError(f"cannot merge into a weight of dtype {weight.dtype}; unmerge needs a float weight")
    factors = snapshot(factors)
    cd = _compute_dtype(weight)
    row_elems = weight[0].numel() if weight.dim() > 1 else 1
    idxs, vals = [], []
    s1 = s2 = 0
    for lo, hi in _chunks(weight):
        w = weight[lo:hi]
        d = _delta_rows(factors, lo, hi, cd).reshape(w.shape)
        new = (w.to(cd) + d).to(weight.dtype)
        back = (new.to(cd) - d).to(weight.dtype)
        bad = (_bits(back) != _bits(w)).reshape(-1).nonzero().squeeze(1)
        if bad.numel():
            idxs.append(bad + lo * row_elems)
            vals.append(w.reshape(-1)[bad].clone())
        a, b = _checksum_part(w)
        s1, s2 = s1 + a, s2 + b
        w.copy_(new)
    # the fixups are kept in host memory: they cost no accelerator memory while merged
    itype = torch.int32 if weight.numel() < 2**31 else torch.int64
    idx = torch.cat(idxs).to("cpu", itype) if idxs else torch.empty(0, dtype=itype)
    val = torch.cat(vals).cpu() if vals else torch.empty(0, dtype=weight.dtype)
    return MergeRecord(factors, idx, val, (s1, s2))


@torch.no_grad()
def unmerge_weight(weight: torch.Tensor, rec: MergeRecord) -> None:
    """Restore the weight `merge_weight` was given, bit for bit, or raise."""
    cd = _compute_dtype(weight)
    factors = rec.factors
    if isinstance(factors, tuple):
        factors = tuple(f.to(weight.device) for f in factors)
    else:
        factors = factors.to(weight.device)
    restored = torch.empty_like(weight)
    for lo, hi in _chunks(weight):
        d = _delta_rows(factors, lo, hi, cd).reshape(weight[lo:hi].shape)
        restored[lo:hi] = (weight[lo:hi].to(cd) - d).to(weight.dtype)
    if rec.idx.numel():
        dev = weight.device
        restored.view(-1)[rec.idx.to(dev, torch.int64)] = rec.vals.to(dev)
    s1 = s2 = 0
    for lo, hi in _chunks(restored):
        a, b = _checksum_part(restored[lo:hi])
        s1, s2 = s1 + a, s2 + b
    if (s1, s2) != rec.checksum:
        raise MergeError(
            "unmerge could not reproduce the original weight exactly (the delta was recomputed "
            "differently, e.g. on another device); the merged weight is left as it was. "
            "Move the model back to the device it was merged on and unmerge again."
        )
    weight.copy_(restored)
