"""Models that torch.distributed has wrapped or sharded, and the few collectives the library's verbs
need on them. A leaf module: it imports nothing of the library but its errors.

* DDP (`DistributedDataParallel`, `DataParallel`): a wrapper whose `.module` is the model; every verb
  works on the inner model (`unwrap`).
* FSDP2 (`fully_shard`), and tensor parallelism: parameters are `DTensor`s, each rank holding a slice
  (a "shard") of the full tensor. Reading what a delta learned gathers the full tensors (a collective:
  every rank calls it); writing a full tensor puts each rank's rows into its own shard (no
  communication); a merge computes the update from the full small tensors and adds its local rows to
  the local shard (`local_rows`).
* A verb that communicates first passes `guard`: a barrier with a timeout (gloo's
  `monitored_barrier`) and a check that every rank runs the same verb on the same delta, so a verb
  called on some ranks only raises `CollectiveError` instead of hanging.
* A write (a hub push, a PEFT folder) happens once, on one rank (`write_once`); the others get its
  result, or its error, by broadcast. What travels between ranks is JSON bytes (no pickle).

Nothing here imports `torch.distributed.tensor` or `torch.distributed.fsdp`: a model can hold a
`DTensor` only once they are imported, so `sys.modules` tells whether to look at all (the checks cost
nothing in a process that never shards).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from surgery.errors import CollectiveError

T = TypeVar("T")

# how long `guard` waits for every rank to arrive ($SURGERY_DIST_TIMEOUT seconds; set it lower in tests)
TIMEOUT = timedelta(seconds=float(os.environ.get("SURGERY_DIST_TIMEOUT", "300")))


# ----------------------------------------------------------------------------- what a model is


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel wrappers (the model itself if it is not wrapped)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


_FOUND: dict[str, type] = {}  # "DTensor" -> the class, once torch.distributed.tensor is imported


def _dtensor_type() -> type | None:
    cls = _FOUND.get("DTensor")
    if cls is None:
        mod = sys.modules.get("torch.distributed.tensor")
        cls = getattr(mod, "DTensor", None) if mod is not None else None
        if cls is not None:
            _FOUND["DTensor"] = cls
    return cls


def _fsdp_type() -> type | None:
    mod = sys.modules.get("torch.distributed.fsdp")
    return getattr(mod, "FSDPModule", None) if mod is not None else None


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a `DTensor` (a sharded or replicated tensor of a device mesh)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter or buffer of the (unwrapped) model is a `DTensor` (FSDP2, tensor parallel)."""
    if _dtensor_type() is None:
        return False
    m = unwrap(model)
    return any(is_dtensor(t) for t in (*m.parameters(), *m.buffers()))


def is_collective(model: nn.Module) -> bool:
    """Whether a write from this model is a collective (every rank calls it, one writes): the model is
    a DDP wrapper or is sharded, in an initialized process group of more than one rank."""
    if world_size() <= 1:
        return False
    return unwrap(model) is not model or is_sharded(model)


def model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 swaps an instance's class for a subclass named ``FSDP<class>``;
    this is the class under it (so a sharded model has the fingerprint of its unsharded base)."""
    m = unwrap(model)
    fsdp = _fsdp_type()
    cls = type(m)
    if fsdp is None or not isinstance(m, fsdp):
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, fsdp))


def rank() -> int:
    """This process's rank (0 without an initialized process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without an initialized process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ----------------------------------------------------------------------------- shards


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a `DTensor` (a collective: every rank calls it), else `t` itself."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.full_tensor()  # type: ignore[attr-defined]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of a `DTensor` (its storage: writes to it change the shard), else `t`."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()  # type: ignore[attr-defined]


def local_rows(t: torch.Tensor) -> tuple[int, int] | None:
    """The rows ``lo:hi`` (of dim 0) of the full tensor that this rank's shard of the `DTensor` `t`
    holds, every row whole (None for a plain tensor). Sharding on dim 0 (FSDP2's default, also over
    several mesh dimensions) and replication are understood; any other placement raises ValueError."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, loc = t.device_mesh, local_tensor(t)  # type: ignore[attr-defined]
    if t.dim() == 0:
        return (0, 0)
    lo, size = 0, t.shape[0]
    for i, pl in enumerate(t.placements):  # type: ignore[attr-defined]
        if type(pl) is Replicate:
            continue
        if type(pl) is not Shard or pl.dim != 0:
            raise ValueError(f"placement {pl} over mesh dimension {i} (only Shard(0) and Replicate are understood)")
        k, r = mesh.size(i), mesh.get_local_rank(i)
        step = math.ceil(size / k) if size else 0  # torch.chunk, as DTensor and FSDP2 split
        a = min(size, r * step)
        lo, size = lo + a, min(size, a + step) - a
    if tuple(loc.shape) != (size, *t.shape[1:]):
        raise ValueError(f"the local shard has shape {tuple(loc.shape)}, not the expected {(size, *t.shape[1:])}")
    return lo, lo + size


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the full tensor `src` into `dst` (call it under `torch.no_grad()`, as for any write into a
    parameter): for a `DTensor`, this rank's rows into its shard (no communication; every rank holds
    `src`)."""
    if not is_dtensor(dst):  # the hot-swap's path: nothing more than the copy
        dst.copy_(src)
        return
    rows = local_rows(dst)
    assert rows is not None
    local_tensor(dst).copy_(src if dst.dim() == 0 else src[rows[0] : rows[1]])


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of the model in the sharded state (its `DTensor` parameters registered;
    after a forward, the root keeps its unsharded copies, which a write would miss). Local, no
    communication; nothing to do on a model without FSDP2."""
    fsdp = _fsdp_type()
    if fsdp is None or not fsdp.__subclasses__():  # no module of this process was ever sharded
        return
    for m in unwrap(model).modules():
        if isinstance(m, fsdp):
            cast(Any, m).reshard()


@contextmanager
def gathered(module: nn.Module, values: bool = True) -> Iterator[bool]:
    """Within: every `DTensor` parameter and buffer of `module` (recursively) is replaced by a plain
    tensor holding its full value (a collective); after it, the sharded ones are back. Writes made
    within are lost (compute from them, write into the shards after). Yields whether anything was
    gathered. With `values=False` they are `meta` tensors of the full shape and dtype instead (no
    communication: for what shapes and types alone decide)."""
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for m in module.modules():
            tables: tuple[dict[str, Any], ...] = (m._parameters, m._buffers)
            for table in tables:
                for key, t in list(table.items()):
                    if is_dtensor(t):
                        full = full_tensor(t) if values else torch.empty(t.shape, dtype=t.dtype, device="meta")
                        new = nn.Parameter(full, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else full
                        swapped.append((table, key, t))
                        table[key] = new
        yield bool(swapped)
    finally:
        for table, key, t in reversed(swapped):
            table[key] = t


# ----------------------------------------------------------------------------- collectives


def _device() -> torch.device:
    backend = dist.get_backend()
    if backend == "nccl":  # object traffic rides the backend's device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_json(obj: Any) -> list[Any]:
    data = json.dumps(obj, sort_keys=True).encode()
    dev, n = _device(), world_size()
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(size) for _ in range(n)]
    dist.all_gather(sizes, size)
    most = max(int(s) for s in sizes)
    buf = torch.zeros(most, dtype=torch.uint8, device=dev)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
    bufs = [torch.empty_like(buf) for _ in range(n)]
    dist.all_gather(bufs, buf)
    return [json.loads(bytes(b[: int(s)].cpu().tolist()).decode()) for b, s in zip(bufs, sizes, strict=True)]


def broadcast_json(obj: Any, src: int = 0) -> Any:
    """`obj` (JSON values) of rank `src`, on every rank (a collective; other ranks pass anything)."""
    dev = _device()
    data = json.dumps(obj).encode() if rank() == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src)
    buf = torch.empty(int(size), dtype=torch.uint8, device=dev)
    if rank() == src and data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def guard(what: str, key: Any = None, timeout: timedelta | None = None) -> None:
    """Before a collective: wait (at most `timeout`, default `TIMEOUT`) until every rank has called
    `what` on `key` (a delta name, a hub ref), and raise `CollectiveError` on the ranks that did if
    some did not arrive or another rank runs something else. Nothing to do with a single rank.
    On gloo (or a mixed "cpu:gloo,..." backend) the wait is `monitored_barrier`; other backends
    wait at a plain barrier, bounded by the process group's own timeout."""
    if world_size() <= 1:
        return
    timeout = timeout or TIMEOUT
    backend = str(dist.get_backend())
    me = rank()
    try:
        if "gloo" in backend:
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveError(
            f"{what} on a sharded or DDP-wrapped model is a collective: every rank must call it, with the "
            f"same arguments; rank {me} waited {timeout.total_seconds():g} s and not every rank came "
            f"({first}). Call it on every rank, not under `if rank == 0:` (one rank writes, the others "
            "get its result)"
        ) from None
    mine = hashlib.sha256(json.dumps([what, key], sort_keys=True, default=str).encode()).hexdigest()[:16]
    tags = _all_gather_json([what, str(key), mine])
    if any(t[2] != tags[0][2] for t in tags):
        shown = "; ".join(f"rank {r}: {t[0]}({t[1]})" for r, t in enumerate(tags))
        raise CollectiveError(
            f"ranks disagree on the collective they run ({shown}): every rank must call the same verb on "
            "the same delta, in the same order"
        )


def write_once(
    fn: Callable[[], T],
    *,
    writer: int = 0,
    what: str,
    encode: Callable[[T], Any],
    decode: Callable[[Any], T],
    error: Callable[[str], Exception] = CollectiveError,
) -> T:
    """Run `fn` (a write) on rank `writer` alone and give every rank its result (`encode` makes it
    JSON values, `decode` the result back). If it raises there, the writer raises the error and every
    other rank raises `error(message)` naming it: no rank hangs, no rank goes on as if it was written."""
    n = world_size()
    if n <= 1:
        return fn()
    if isinstance(writer, bool) or not isinstance(writer, int) or not 0 <= writer < n:
        raise CollectiveError(f"{what}: rank={writer!r} is not a rank of this process group (0..{n - 1})")
    failed: BaseException | None = None
    msg: Any = None
    if rank() == writer:
        try:
            out = fn()
            msg = {"ok": encode(out)}
        except BaseException as e:  # noqa: BLE001  (the others must hear of it, then it is raised here)
            failed = e
            msg = {"error": f"{type(e).__name__}: {e}"}
    got = broadcast_json(msg, writer)
    if failed is not None:
        raise failed
    if "error" in got:
        raise error(f"{what} failed on rank {writer}, the rank that writes: {got['error']}")
    return out if rank() == writer else decode(got["ok"])


def plain(ts: Iterable[torch.Tensor]) -> bool:
    """Whether none of the tensors is a `DTensor`."""
    cls = _dtensor_type()
    return cls is None or not any(isinstance(t, cls) for t in ts)
