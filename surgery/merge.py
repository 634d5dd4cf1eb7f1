"""Exact merge and unmerge of a weight delta.

Adding a delta D to a weight W rounds, so ``(W + D) - D`` is not W in general
(PEFT's bf16 merge/unmerge alters about a fifth of the weights in one cycle).
We compute in float32 (float64 for float64 weights) and round once:
``W' = round(W + D)``. For every element where ``round(W' - D)`` does not give W
back (where W + D landed in a coarser binade than W; their share grows with
|D| / |W|) we keep the original value, with an int32 index, in host memory.

Unmerge recomputes D from a snapshot of the factors, taken at merge time, with
the same chunking and thread count, so D comes out bit for bit the same; a
sampled checksum of D per chunk guards that before anything is written, as
one of the merged weight guards against edits made while merged (and
chunks already written are merged back if a later one fails), so unmerge
either restores W bit for bit or raises with the merged weight as it was.

Work goes row-chunk by row-chunk (at most an eighth of the layer and 4M
elements, layers under 2M elements in one piece), so transient memory stays
under one layer's weight, and there is one host sync per chunk in merge and
one per site in unmerge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from surgery.errors import MergeError

_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
_MAX_CHUNK = 1 << 22
_MIN_CHUNK = 1 << 19
_SAMPLE = 61  # checksum every 61st element of D: a reproducibility check, not a hash

Factors = tuple[torch.Tensor, torch.Tensor] | torch.Tensor


@dataclass
class MergeRecord:
    factors: Factors | None  # detached snapshot, so later training cannot break unmerge
    rows: torch.Tensor | None  # W' = rows * (W + D) * cols: snapshots of the scales (or None)
    cols: torch.Tensor | None
    idx: torch.Tensor  # flat indices where round(W' - D) != W (host memory)
    vals: torch.Tensor  # the original values there (host memory)
    sums: torch.Tensor  # per chunk: sampled checksum of D (on the weight's device)
    wsums: torch.Tensor  # per chunk: sampled checksum of the merged weight
    threads: int

    @property
    def nbytes(self) -> int:
        f = self.factors if isinstance(self.factors, tuple) else (self.factors,)
        ts = (*f, self.rows, self.cols, self.idx, self.vals)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.dtype])


def _sample_sum(d: torch.Tensor) -> torch.Tensor:
    return _bits(d).reshape(-1)[::_SAMPLE].sum(dtype=torch.int64)


def _delta_rows(
    factors: Factors | None, lo: int, hi: int, dtype: torch.dtype, shape: torch.Size, device: torch.device | None = None
) -> torch.Tensor:
    if factors is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    if isinstance(factors, tuple):
        left, right = factors
        return (left[lo:hi].to(dtype) @ right.to(dtype)).reshape(shape)
    return factors[lo:hi].to(dtype=dtype, copy=True).reshape(shape)  # merge overwrites it


def _chunks(w: torch.Tensor) -> list[tuple[int, int]]:
    # an eighth of the layer at most (the fp32 temporaries of a chunk then stay
    # well under one layer's weight), never more than 4M elements, and no tiny
    # chunks: small layers go in one piece, since per-chunk overhead would dominate
    rows = max(w.shape[0], 1)
    per_row = max(1, w.numel() // rows)
    want = min(_MAX_CHUNK, max(w.numel() // 8, _MIN_CHUNK))
    step = max(1, want // per_row)
    return [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]


def _snapshot(factors: Factors | None, device: torch.device) -> Factors | None:
    if factors is None:
        return None
    if isinstance(factors, tuple):
        return tuple(f.detach().to(device).clone() for f in factors)  # type: ignore[return-value]
    return factors.detach().to(device).clone()


class _Threads:
    """Run with a given intra-op thread count (CPU matmul blocking depends on it)."""

    def __init__(self, n: int) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n != self.old:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.n != self.old:
            torch.set_num_threads(self.old)


def _scales(
    rec_rows: torch.Tensor | None, rec_cols: torch.Tensor | None, lo: int, hi: int, w: torch.Tensor, cd: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The row and column scales of rows lo..hi, shaped to broadcast over them (None: no scale)."""
    r = None if rec_rows is None else rec_rows[lo:hi].to(cd).reshape(-1, *([1] * (w.dim() - 1)))
    c = None if rec_cols is None else rec_cols.to(cd).reshape(1, -1, *([1] * (w.dim() - 2)))
    return r, c


@torch.no_grad()
def merge_weight(weight: torch.Tensor, update: Factors | Any) -> MergeRecord:
    """Apply a weight update (`WeightUpdate`: ``W' = rows * (W + delta) * cols``, or bare
    factors: ``W' = W + delta``) to `weight` in place; return what unmerge needs."""
    if weight.dtype not in _INT:
        raise MergeError(f"cannot merge into a weight of dtype {weight.dtype}; merging needs a float weight")
    if not weight.is_contiguous():
        raise MergeError("cannot merge into a non-contiguous weight; make it contiguous first")
    factors: Factors | None
    if isinstance(update, (tuple, torch.Tensor)):
        factors, rows, cols = update, None, None
    else:
        factors, rows, cols = update.delta, update.rows, update.cols
    factors = _snapshot(factors, weight.device)
    rows = None if rows is None else rows.detach().to(weight.device).clone()
    cols = None if cols is None else cols.detach().to(weight.device).clone()
    cd = _compute_dtype(weight)
    row_elems = weight[0].numel() if weight.dim() > 1 else 1
    idxs, vals, sums, wsums = [], [], [], []
    threads = torch.get_num_threads()
    for lo, hi in _chunks(weight):
        w = weight[lo:hi]
        d = _delta_rows(factors, lo, hi, cd, w.shape, w.device)
        sums.append(_sample_sum(d))  # before D is overwritten below
        r, c = _scales(rows, cols, lo, hi, w, cd)
        new = w.to(cd) + d
        if r is not None:
            new = new * r
        if c is not None:
            new = new * c
        new = new.to(weight.dtype)
        # what unmerge computes: (W' / cols / rows - D), rounded (reusing D's memory)
        back = new.to(cd)
        if c is not None:
            back = back / c
        if r is not None:
            back = back / r
        back = d.neg_().add_(back).to(weight.dtype)
        bad = (_bits(back) != _bits(w)).reshape(-1).nonzero().squeeze(1)
        if bad.numel():
            idxs.append((bad + lo * row_elems).cpu())
            vals.append(w.reshape(-1)[bad].cpu())
        w.copy_(new)
        wsums.append(_sample_sum(w))
    # the fixups live in host memory: they cost no accelerator memory while merged
    itype = torch.int32 if weight.numel() < 2**31 else torch.int64
    idx = torch.cat(idxs).to(itype) if idxs else torch.empty(0, dtype=itype)
    val = torch.cat(vals) if vals else torch.empty(0, dtype=weight.dtype)
    return MergeRecord(factors, rows, cols, idx, val, torch.stack(sums), torch.stack(wsums), threads)


@torch.no_grad()
def unmerge_weight(weight: torch.Tensor, rec: MergeRecord) -> None:
    """Restore the weight `merge_weight` was given, bit for bit, or raise."""
    cd = _compute_dtype(weight)
    factors = (
        _snapshot(rec.factors, weight.device) if _device(rec.factors) not in (None, weight.device) else rec.factors
    )
    chunks = _chunks(weight)
    if len(chunks) != len(rec.sums):
        raise MergeError("unmerge: the weight's shape changed since it was merged; cannot restore it")
    with _Threads(rec.threads):
        # check everything first (one host sync), write only then
        wsums = torch.stack([_sample_sum(weight[lo:hi]) for lo, hi in chunks])
        if not torch.equal(wsums, rec.wsums.to(wsums.device)):
            raise MergeError(
                "the merged weight was changed since it was merged (trained, cast or edited?), so the "
                "base cannot be restored exactly; it is left as it is. surgery.remove(model, name, "
                "keep_merged=True) drops the delta and keeps the weights as they are."
            )
        one = len(chunks) == 1  # the usual case: D is computed once
        ds = (
            [_delta_rows(factors, lo, hi, cd, weight[lo:hi].shape, weight.device) for lo, hi in chunks] if one else None
        )
        sums = torch.stack(
            [_sample_sum(d) for d in ds]
            if ds
            else [
                _sample_sum(_delta_rows(factors, lo, hi, cd, weight[lo:hi].shape, weight.device)) for lo, hi in chunks
            ]
        )
        if not torch.equal(sums, rec.sums.to(sums.device)):
            raise MergeError(
                "unmerge could not recompute the delta exactly as at merge time (another device "
                "or library?); the merged weight is left as it was. Move the model back to the "
                "device it was merged on and unmerge again."
            )
        for i, (lo, hi) in enumerate(chunks):
            w = weight[lo:hi]
            d = ds[i] if ds else _delta_rows(factors, lo, hi, cd, w.shape, w.device)
            back = w.to(cd)
            r, c = _scales(rec.rows, rec.cols, lo, hi, w, cd)
            if c is not None:
                back = back / c
            if r is not None:
                back = back / r
            w.copy_((back - d).to(weight.dtype))
    if rec.idx.numel():
        weight.view(-1)[rec.idx.to(weight.device, torch.int64)] = rec.vals.to(weight.device)


def _device(factors: Factors | None) -> torch.device | None:
    if factors is None:
        return None
    return factors[0].device if isinstance(factors, tuple) else factors.device


def update_of(rec: MergeRecord) -> Any:
    """The update a record was merged with (to merge it again after lifting it)."""
    from surgery.methods.base import WeightUpdate

    return WeightUpdate(rec.factors, rec.rows, rec.cols)
