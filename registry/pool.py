"""The adapter pool: which hub deltas are resident in a slot bank, for many requests at once.

    bank = surgery.serve(model, slots=64, max_rank=16, targets="@linear")
    pool = registry.AdapterPool(bank, hub, cpu_cache=512)
    with pool.lease(["acme/sql@prod", "acme/chat@3", None]) as slots:   # one ref per row; None: the base
        with surgery.route(model, slots):
            out = model.generate(**batch)

Three tiers: hub files -> CPU (`Prepared` deltas, LRU over `cpu_cache` entries) -> the bank's slots
(LRU over the slots no lease or pin holds). A lease resolves each ref once, so an alias moved while it
runs never reaches it; the versions it misses are read in parallel on worker threads, one read per
version however many leases wait for it; then it takes all its slots at once or none (waiting up to
`timeout` for leases to end). One lock guards the bookkeeping; hub reads and copies into slots run
outside it. The pool owns the bank's slots: load nothing into them by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from threading import Condition
from typing import Any

from registry.errors import IntegrityError, PoolError
from registry.hub import Hub
from registry.refs import Ref, parse
from surgery.serving import Prepared, SlotBank

RefLike = str | Ref
_COUNTS = ("hits", "cpu_hits", "misses", "joined", "loads", "evictions", "cpu_evictions")


class Lease(list[int]):
    """A lease's slot per row (-1: the base), as `surgery.route` takes it; `refs` holds the
    version each row got (None for base rows)."""

    def __init__(self, slots: Iterable[int], refs: list[Ref | None]) -> None:
        super().__init__(slots)
        self.refs = refs


def _percentiles(ms: Iterable[float]) -> dict[str, float | None]:
    s = sorted(ms)
    at = [round(s[min(len(s) - 1, int(q * len(s)))], 3) if s else None for q in (0.5, 0.99, 1.0)]
    return {"p50": at[0], "p99": at[1], "max": at[2], "n": len(s)}


class AdapterPool:
    """Keeps the hub deltas that requests name resident in `bank`'s slots (see the module docstring).

    `lease(refs)` yields the slot per row for `surgery.route`; `pin(ref)` keeps a version resident
    until `unpin(ref)`; `prefetch(refs)` starts loads and returns at once; `stats()` counts hits,
    misses, evictions and load times. Thread-safe; `alease` is the asyncio form of `lease`."""

    def __init__(self, bank: SlotBank, hub: Hub, cpu_cache: int = 512, *, workers: int = 4) -> None:
        if not isinstance(bank, SlotBank):
            raise PoolError(f"AdapterPool takes a slot bank (surgery.serve(model, ...)), got {type(bank).__name__}")
        if not isinstance(hub, Hub):
            raise PoolError(f"AdapterPool takes a registry.Hub, got {type(hub).__name__}")
        for what, v, least in (("cpu_cache", cpu_cache, 0), ("workers", workers, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise PoolError(f"AdapterPool: {what} must be an integer >= {least}, got {v!r}")
        self.bank, self.hub, self.cpu_cache = bank, hub, cpu_cache
        n = bank.slots
        self._cond = Condition()
        self._digest: list[str | None] = [None] * n  # what each slot holds or is being filled with
        self._ref: list[Ref | None] = [None] * n
        self._ready = [False] * n
        self._holds = [0] * n  # leases and pins holding each slot (a filler holds its slot too)
        self._where: dict[str, int] = {}  # digest -> slot
        self._lru: OrderedDict[int, None] = OrderedDict.fromkeys(range(n))  # least recently used first
        self._cpu: OrderedDict[str, Prepared] = OrderedDict()
        self._loading: dict[str, Future[Prepared]] = {}  # one hub read per digest in flight
        self._pins: dict[RefLike, Ref] = {}
        self._fixed: dict[RefLike, Ref] = {}  # refs that never move (versions, digests), resolved before
        self._counts = dict.fromkeys(_COUNTS, 0)
        self._ms: dict[str, deque[float]] = {k: deque(maxlen=10_000) for k in ("load", "pull", "prepare", "copy")}
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="adapter-pool")
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"AdapterPool(bank={self.bank.name!r}, slots={self.bank.slots}, resident={len(self._where)}, "
            f"cpu={len(self._cpu)}/{self.cpu_cache}, pinned={len(self._pins)}, hub={self.hub.root})"
        )

    def __enter__(self) -> AdapterPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Refuse new leases and wait for the loads under way; the bank keeps its contents."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._executor.shutdown(wait=True)

    # ---- leases
    @contextlib.contextmanager
    def lease(self, refs: Sequence[RefLike | None], timeout: float = 30.0) -> Iterator[Lease]:
        """Make every row's version resident and hold its slot for the block: yields the slot per row
        (-1 for None). Waits up to `timeout` seconds for slots other leases hold, then raises PoolError;
        a failed lease holds nothing and has changed no slot other leases hold."""
        got = self._acquire(refs, timeout)
        try:
            yield got
        finally:
            self._let_go(got)

    @contextlib.asynccontextmanager
    async def alease(self, refs: Sequence[RefLike | None], timeout: float = 30.0) -> AsyncIterator[Lease]:
        """`lease` for asyncio: the blocking part runs in a worker thread (`asyncio.to_thread`)."""
        job = asyncio.ensure_future(asyncio.to_thread(self._acquire, refs, timeout))
        try:
            got = await asyncio.shield(job)
        except asyncio.CancelledError:  # the thread still finishes: let its slots go then

            def let_go(j: asyncio.Future[Lease]) -> None:
                if not j.cancelled() and j.exception() is None:
                    self._let_go(j.result())

            job.add_done_callback(let_go)
            raise
        try:
            yield got
        finally:
            self._let_go(got)

    def pin(self, ref: RefLike, timeout: float = 30.0) -> Ref:
        """Keep `ref`'s version resident (loaded now if needed) until `unpin(ref)`. The ref is
        resolved once: a pinned alias stays pinned at the version it named then."""
        parse(ref)
        with self._cond:
            if self._pins.get(ref) is not None:
                return self._pins[ref]
        r = self._resolve(ref)
        slot = self._take({r.digest: r}, time.monotonic() + self._check_timeout(timeout))[r.digest]
        with self._cond:
            if ref in self._pins:  # pinned by another thread meanwhile
                self._let_go([slot])
            else:
                self._pins[ref] = r
            return self._pins[ref]

    def unpin(self, ref: RefLike) -> Ref:
        """Let the version `pin(ref)` pinned be evicted again (`ref` as given to pin, or the Ref it returned)."""
        if not isinstance(ref, (str, Ref)):
            raise PoolError(f"unpin takes the ref given to pin, or the Ref it returned; got {ref!r}")
        with self._cond:
            key = ref if ref in self._pins else next((k for k, v in self._pins.items() if v == ref), None)
            if key is None:
                raise PoolError(f"{ref!r} is not pinned; pinned: {sorted(map(str, self._pins))}")
            r = self._pins.pop(key)
            self._let_go([self._where[r.digest]])
            return r

    def evict(self, ref: RefLike) -> bool:
        """Take the version `ref` resolves to out of its slot and the CPU tier (an admin's "unload").
        False if it was not resident; `PoolError` if a lease or a pin holds it (unpin first)."""
        r = self._resolve(ref)
        with self._cond:
            self._cpu.pop(r.digest, None)
            slot = self._where.get(r.digest)
            if slot is None or not self._ready[slot]:
                return False
            if self._holds[slot]:
                raise PoolError(f"{r} is in use ({self._holds[slot]} lease(s) or pin(s) hold it); unpin it or retry")
            self.bank.unload(slot)
            self._clear(slot)
            self._lru.move_to_end(slot, last=False)  # the first to be filled again
            return True

    def prefetch(self, refs: Sequence[RefLike]) -> list[Future[Ref]]:
        """Start loading `refs` into the CPU tier (and into an empty slot, evicting nothing) and return
        at once: one future per distinct ref, with its resolved `Ref` or the error."""
        rows = [r for r in self._rows(refs, "prefetch") if r is not None]
        for r in rows:
            parse(r)  # a malformed ref raises now, not in a future
        with self._cond:
            self._check_open()
            return [self._executor.submit(self._prefetch, r) for r in dict.fromkeys(rows)]

    def stats(self) -> dict[str, Any]:
        """Counts since the pool started: hits (versions a lease found in a slot), cpu_hits (found in the
        CPU tier), misses (hub reads), joined (a lease waited for a read under way), loads (copies into
        slots), evictions (slot), cpu_evictions; times in ms (p50, p99, max, n) of hub -> slot loads
        (`load_ms`) and their parts (`pull_ms`: read and verify, `prepare_ms`, `copy_ms`); resident
        (slot -> "name@version"), pinned, cpu (entries in the CPU tier), held (slots leased or pinned)."""
        with self._cond:
            out: dict[str, Any] = dict(self._counts)
            out |= {f"{k}_ms": _percentiles(v) for k, v in self._ms.items()}
            out["resident"] = {s: str(r) for s, r in enumerate(self._ref) if r is not None and self._ready[s]}
            out["pinned"] = sorted({str(r) for r in self._pins.values()})
            out["cpu"], out["held"] = len(self._cpu), sum(h > 0 for h in self._holds)
        return out

    # ---- resolving
    def _rows(self, refs: Any, what: str = "lease") -> list[RefLike | None]:
        if isinstance(refs, (str, bytes, Ref)) or not isinstance(refs, Sequence) or not refs:
            raise PoolError(f"{what} takes a non-empty list of refs, one per row (None: the base), got {refs!r}")
        bad = [r for r in refs if r is not None and not isinstance(r, (str, Ref))]
        if bad:
            raise PoolError(f"{what}: a ref is a string like 'acme/sql@3' or a registry.Ref, got {bad[0]!r}")
        return list(refs)

    def _resolve(self, ref: RefLike) -> Ref:
        got = self._fixed.get(ref)
        if got is None:
            kind = parse(ref).kind
            got = self.hub.resolve(ref)
            if kind in ("version", "digest"):  # these never move: resolve once
                if len(self._fixed) >= 65_536:
                    self._fixed.clear()
                self._fixed[ref] = got
        return got

    @staticmethod
    def _check_timeout(timeout: Any) -> float:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise PoolError(f"timeout is a number of seconds >= 0, got {timeout!r}")
        return float(timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError("this AdapterPool is closed; make a new one")

    # ---- taking slots
    def _acquire(self, refs: Sequence[RefLike | None], timeout: float) -> Lease:
        rows = self._rows(refs)
        deadline = time.monotonic() + self._check_timeout(timeout)
        by_ref = {r: self._resolve(r) for r in dict.fromkeys(rows) if r is not None}
        wanted = {r.digest: r for r in by_ref.values()}
        slots = self._take(wanted, deadline) if wanted else {}
        row_refs = [None if r is None else by_ref[r] for r in rows]
        return Lease((-1 if r is None else slots[r.digest] for r in row_refs), row_refs)

    def _take(self, wanted: dict[str, Ref], deadline: float) -> dict[str, int]:
        """Hold a slot holding each wanted digest: read what no tier has, then take the slots for all
        at once (or wait for leases to end), copy in the new ones, wait for those others are filling."""
        preps: dict[str, Prepared] = {}
        read_at: dict[str, float] = {}  # digests this lease waited for a hub read of: since when
        count = True
        while True:
            with self._cond:
                self._check_fits(wanted)
                reads, inline = self._reads(wanted, preps, read_at, count)
                count = False
                plan = None if reads else self._assign(wanted)
                if not reads and plan is None:
                    if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                        raise self._no_room(wanted)
                    continue
            if reads:
                if inline is not None:
                    self._read(*inline)
                for d, fut in reads.items():
                    preps[d] = self._result(fut, deadline)
                continue
            assert plan is not None
            slots, fills, pending = plan
            for i, (s, d) in enumerate(fills):
                try:
                    self._load_slot(s, wanted[d], preps[d], read_at.get(d))
                except BaseException:
                    with self._cond:
                        for s2, _ in fills[i + 1 :]:
                            self._clear(s2)
                    self._let_go(slots.values())
                    raise
            ok = False
            try:
                ok = self._await(pending, deadline)
            finally:
                if not ok:  # another lease's copy into a slot we share failed (start over), or a timeout
                    self._let_go(slots.values())
            if ok:
                return slots

    def _check_fits(self, wanted: dict[str, Ref]) -> None:
        self._check_open()
        pinned = {r.digest for r in self._pins.values()}
        extra, room = len(set(wanted) - pinned), self.bank.slots - len(pinned)
        if extra > room:
            raise PoolError(
                f"this needs {len(wanted)} distinct deltas resident at once ({extra} not pinned) but the bank has "
                f"{self.bank.slots} slots and {len(pinned)} are pinned, which leaves {room}: split the batch, unpin, "
                "or serve a bank with more slots"
            )

    def _no_room(self, wanted: dict[str, Ref]) -> PoolError:
        need = sum(d not in self._where for d in wanted)
        held = sum(h > 0 for h in self._holds)
        return PoolError(
            f"timed out waiting for {need} free slot(s): {held} of the bank's {self.bank.slots} slots are held "
            f"by other leases or pins ({len(self._pins)} pinned); retry, pass a longer timeout, or serve more slots"
        )

    def _reads(
        self, wanted: dict[str, Ref], preps: dict[str, Prepared], read_at: dict[str, float], count: bool
    ) -> tuple[dict[str, Future[Prepared]], tuple[Ref, Future[Prepared]] | None]:
        """The hub reads this lease must wait for (started here unless under way), and the one it runs
        itself (the others go to the workers); under the lock."""
        reads, inline = {}, None
        for d, r in wanted.items():
            if d in self._where or d in preps:
                self._counts["hits"] += count and d in self._where
                continue
            if d in self._cpu:
                self._cpu.move_to_end(d)
                preps[d] = self._cpu[d]
                self._counts["cpu_hits"] += count
                continue
            fut = self._loading.get(d)
            if fut is None:
                fut = self._loading[d] = Future()
                self._counts["misses"] += 1
                if inline is None:  # on the leasing thread: no hand-off for the usual single miss
                    inline = (r, fut)
                else:
                    self._executor.submit(self._read, r, fut)
            else:
                self._counts["joined"] += count
            read_at.setdefault(d, time.perf_counter())
            reads[d] = fut
        return reads, inline

    def _assign(
        self, wanted: dict[str, Ref]
    ) -> tuple[dict[str, int], list[tuple[int, str]], list[tuple[int, str]]] | None:
        """All of `wanted` in slots, or None while too few slots are free: digest -> slot, the
        (slot, digest) to copy in, and those another lease is still filling. Under the lock."""
        slots = {d: self._where[d] for d in wanted if d in self._where}
        new = [d for d in wanted if d not in slots]
        free = [s for s in self._lru if self._holds[s] == 0 and self._digest[s] not in wanted]
        if len(free) < len(new):
            return None
        free.sort(key=lambda s: self._digest[s] is not None)  # empty slots first, then least recently used
        pending = [(s, d) for d, s in slots.items() if not self._ready[s]]
        fills = list(zip(free, new, strict=False))  # free may be longer
        for s, d in fills:
            old = self._digest[s]
            if old is not None:
                del self._where[old]
                self._counts["evictions"] += 1
            self._digest[s], self._ref[s], self._ready[s] = d, wanted[d], False
            self._where[d] = slots[d] = s
        for s in slots.values():
            self._holds[s] += 1
            self._lru.move_to_end(s)
        return slots, fills, pending

    def _await(self, pending: list[tuple[int, str]], deadline: float) -> bool:
        """Wait until the slots other leases are filling for us are ready; False if one failed."""
        with self._cond:
            while True:
                if any(self._digest[s] != d for s, d in pending):
                    return False
                if all(self._ready[s] for s, _ in pending):
                    return True
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise PoolError("timed out waiting for another lease's copy of a delta into a slot")

    def _let_go(self, slots: Iterable[int]) -> None:
        with self._cond:
            for s in set(slots) - {-1}:
                self._holds[s] -= 1
                self._lru.move_to_end(s)
            self._cond.notify_all()

    def _clear(self, slot: int) -> None:
        """Forget what `slot` holds (its copy failed or never ran); under the lock."""
        d = self._digest[slot]
        if d is not None and self._where.get(d) == slot:
            del self._where[d]
        self._digest[slot], self._ref[slot], self._ready[slot] = None, None, False
        self._cond.notify_all()

    # ---- moving deltas between tiers
    def _result(self, fut: Future[Prepared], deadline: float) -> Prepared:
        try:
            return fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise PoolError("timed out waiting for a read from the hub; pass a longer timeout") from None

    def _read(self, ref: Ref, fut: Future[Prepared]) -> None:
        """Hub -> CPU tier (and `fut`): pull, check the version is the one resolved, prepare for the bank."""
        try:
            t0 = time.perf_counter()
            delta = self.hub.pull(f"{ref.name}@{ref.version}")  # a version number reads faster than a digest
            if delta.lineage["hub"]["digest"] != ref.digest:
                raise IntegrityError(f"{ref}: the hub holds digest {delta.lineage['hub']['digest']}, not {ref.digest}")
            t1 = time.perf_counter()
            prep = self.bank.prepare(delta, str(ref))
            dev = self.bank.device.type
            kept = prep if dev == "cpu" else prep.to("cpu", pin=dev == "cuda")
            t2 = time.perf_counter()
        except BaseException as e:
            with self._cond:
                self._loading.pop(ref.digest, None)
            fut.set_exception(e)
            return
        with self._cond:
            self._loading.pop(ref.digest, None)
            self._ms["pull"].append((t1 - t0) * 1e3)
            self._ms["prepare"].append((t2 - t1) * 1e3)
            if self.cpu_cache:
                self._cpu[ref.digest] = kept
                while len(self._cpu) > self.cpu_cache:
                    self._cpu.popitem(last=False)
                    self._counts["cpu_evictions"] += 1
        fut.set_result(prep)

    def _load_slot(self, slot: int, ref: Ref, prep: Prepared, read_at: float | None) -> None:
        """CPU tier -> `slot` (held by the caller, assigned to `ref`); on failure the slot is cleared."""
        t0 = time.perf_counter()
        try:
            self.bank.load(slot, prep, str(ref))
        except BaseException:
            with self._cond:
                self._clear(slot)
            raise
        t1 = time.perf_counter()
        with self._cond:
            self._ready[slot] = True
            self._counts["loads"] += 1
            self._ms["copy"].append((t1 - t0) * 1e3)
            if read_at is not None:
                self._ms["load"].append((t1 - read_at) * 1e3)
            self._cond.notify_all()

    def _prefetch(self, ref: RefLike) -> Ref:
        r = self._resolve(ref)
        d, fut = r.digest, None
        with self._cond:
            if d in self._where or d in self._loading:
                return r  # resident, or on its way
            prep = self._cpu.get(d)
            if prep is None:
                fut = self._loading[d] = Future()
                self._counts["misses"] += 1
        t0 = time.perf_counter()
        if fut is not None:
            self._read(r, fut)  # here: a worker never waits for another's job
            prep = fut.result()
        assert prep is not None
        with self._cond:
            slot = next((s for s in self._lru if self._digest[s] is None and self._holds[s] == 0), None)
            if slot is None or d in self._where or self._closed:
                return r
            self._digest[slot], self._ref[slot], self._ready[slot] = d, r, False
            self._where[d] = slot
            self._holds[slot] += 1
        try:
            self._load_slot(slot, r, prep, t0 if fut is not None else None)
        finally:
            self._let_go([slot])
        return r


__all__ = ["AdapterPool", "Lease"]
