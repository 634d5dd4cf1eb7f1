"""registry.AdapterPool: hub -> CPU -> slot tiers behind per-row leases (issue 11, part 3).

Every served row is checked against the single-tenant reference: the same version applied alone
with `surgery.apply` to a copy of the base (fp32, atol 1e-5); base rows against the base."""

from __future__ import annotations

import asyncio
import copy
import random
import threading
import time

import pytest
import torch
from models import batch_for, tiny_gpt2, tiny_llama

import registry
import surgery
from registry import AdapterPool, Lease, NotFoundError, PoolError, RefError

ROWS = 4
NAMES = [f"acme/a{i:02d}" for i in range(25)]  # two versions each: 50 adapters


def _lora(template: surgery.Delta, seed: int, name: str) -> surgery.Delta:
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(t.shape, generator=g) * 0.2 for k, t in template.tensors.items()}
    return surgery.Delta("lora", name, dict(template.config), tensors, template.base)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A hub of 25 names x 2 versions (LoRA r=2..4 on @attn, alias prod -> 1) and each version's
    single-tenant reference output on one batch."""
    base = tiny_llama()
    templates = {}
    for r in (2, 3, 4):
        m = copy.deepcopy(base)
        surgery.inject(m, "lora", targets="@attn", r=r, alpha=2 * r)
        templates[r] = surgery.delta(m)
    hub = registry.Hub(tmp_path_factory.mktemp("pool") / "hub")
    batch = batch_for(base, batch=ROWS)
    with torch.no_grad():
        expect = {None: base(**batch).logits}
    deltas = {}
    for i, name in enumerate(NAMES + ["acme/moving"]):
        for v in (1, 2):
            d = _lora(templates[2 + (i + v) % 3], 100 * i + v, name.split("/")[1])
            ref = hub.push(d, name, alias="prod" if v == 1 else None)
            single = copy.deepcopy(base)
            surgery.apply(single, d)
            with torch.no_grad():
                expect[ref.digest] = single(**batch).logits
            deltas[ref.digest] = d
    other = tiny_gpt2()
    surgery.inject(other, "lora", targets="@attn", r=2)
    hub.push(other, "other/gpt2")
    return {"base": base, "hub": hub, "batch": batch, "expect": expect, "deltas": deltas}


def _pool(world, slots: int = 4, cpu_cache: int = 8, **kw) -> tuple[AdapterPool, torch.nn.Module]:
    model = copy.deepcopy(world["base"])
    bank = surgery.serve(model, slots=slots, max_rank=4, targets="@linear")
    return AdapterPool(bank, registry.Hub(world["hub"].root), cpu_cache=cpu_cache, **kw), model


def _run(model, lease: Lease, batch) -> torch.Tensor:
    with surgery.route(model, lease), torch.no_grad():
        return model(**batch).logits


def _mismatches(world, out: torch.Tensor, lease: Lease) -> list[str]:
    bad = []
    for i, r in enumerate(lease.refs):
        want = world["expect"][None if r is None else r.digest][i]
        if not torch.allclose(out[i], want, atol=1e-5, rtol=0):
            bad.append(f"row {i} ({r}): off by {(out[i] - want).abs().max().item():.2e}")
    return bad


def _check(world, model, lease: Lease) -> None:
    assert _mismatches(world, _run(model, lease, world["batch"]), lease) == []


def test_lease_rows_equal_single_tenant(world):
    pool, model = _pool(world)
    hub = world["hub"]
    with pool, pool.lease(["acme/a01@prod", "acme/a02@2", None, "acme/a01@prod"]) as slots:
        assert isinstance(slots, Lease) and isinstance(slots, list)
        assert slots[0] == slots[3] != slots[1] and slots[2] == -1 and min(slots[0], slots[1]) >= 0
        assert slots.refs == [hub.resolve("acme/a01@1"), hub.resolve("acme/a02@2"), None, hub.resolve("acme/a01@1")]
        _check(world, model, slots)
        # generate: the route repeats each row's slot over its beams; greedy tokens equal the reference's
        ids = world["batch"]["input_ids"][:2]
        with surgery.route(model, slots[:2]), torch.no_grad():
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        for i, r in enumerate(slots.refs[:2]):
            single = copy.deepcopy(world["base"])
            surgery.apply(single, world["deltas"][r.digest])
            with torch.no_grad():
                want = single.generate(ids[i : i + 1], max_new_tokens=3, do_sample=False)
            assert torch.equal(got[i], want[0])
        assert pool.stats()["held"] == 2
    assert pool.stats()["held"] == 0


def test_counts_and_lru_order(world):
    pool, model = _pool(world, slots=2, cpu_cache=2)
    a, b, c = "acme/a03@1", "acme/a04@1", "acme/a05@1"
    steps = [  # lease, then (hits, cpu_hits, misses, evictions, cpu_evictions) so far, resident versions
        (a, (0, 0, 1, 0, 0), {a}),
        (a, (1, 0, 1, 0, 0), {a}),
        (b, (1, 0, 2, 0, 0), {a, b}),
        (c, (1, 0, 3, 1, 1), {b, c}),  # a least recently used: out of its slot; and out of the CPU tier (2)
        (b, (2, 0, 3, 1, 1), {b, c}),
        (a, (2, 0, 4, 2, 2), {a, b}),  # read again; c, not b (used just now), loses its slot
        (c, (2, 1, 4, 3, 2), {a, c}),  # c from the CPU tier; b now least recently used
    ]
    with pool:
        for ref, counts, resident in steps:
            with pool.lease([ref, None, ref, ref]) as slots:
                _check(world, model, slots)
            st = pool.stats()
            assert tuple(st[k] for k in ("hits", "cpu_hits", "misses", "evictions", "cpu_evictions")) == counts
            assert set(st["resident"].values()) == resident
        assert st["loads"] == 5 and st["load_ms"]["n"] == 4 and st["load_ms"]["max"] >= st["load_ms"]["p50"] > 0
        assert st["pull_ms"]["n"] == 4 and st["copy_ms"]["n"] == 5


def test_pinned_and_leased_never_evicted(world):
    pool, model = _pool(world, slots=2)
    a, b, c = "acme/a06@prod", "acme/a07@1", "acme/a08@1"
    with pool:
        ra = pool.pin(a)
        assert pool.pin(a) == ra and pool.stats()["pinned"] == ["acme/a06@1"]
        with pool.lease([b, b, None, None]) as held:
            errors: list[Exception] = []
            t = threading.Thread(target=lambda: errors.append(pytest.raises(PoolError, pool._acquire, [c], 0.2).value))
            t.start()
            t.join(10)
            assert "timed out" in str(errors[0]) and "2 slots are held" in str(errors[0])
            _check(world, model, held)
        with pytest.raises(PoolError, match=r"2 distinct deltas .* 2 slots and 1 are pinned, which leaves 1"):
            pool._acquire([b, c, None, None], 1)
        with pool.lease([c, a, None, c]) as slots:  # b goes, the pinned a stays
            _check(world, model, slots)
        assert set(pool.stats()["resident"].values()) == {"acme/a06@1", "acme/a08@1"}
        with pytest.raises(PoolError, match="not pinned"):
            pool.unpin(b)
        assert pool.unpin(ra) == ra and pool.stats()["pinned"] == []
        with pool.lease([b, c, b, None]) as slots:  # now a can go
            _check(world, model, slots)
        assert set(pool.stats()["resident"].values()) == {"acme/a07@1", "acme/a08@1"}


def test_alias_move_between_leases(world):
    pool, model = _pool(world)
    hub = world["hub"]
    try:
        hub.alias("acme/moving", "prod", version=1)
        with pool, pool.lease(["acme/moving@prod"] * 2 + [None, "acme/moving@prod"]) as first:
            hub.alias("acme/moving", "prod", version=2)
            with pool.lease(["acme/moving@prod", None, "acme/moving@prod", "acme/moving"]) as second:
                assert [str(r) for r in first.refs] == ["acme/moving@1"] * 2 + ["None", "acme/moving@1"]
                assert {str(r) for r in second.refs} == {"acme/moving@2", "None"}
                assert first[0] != second[0]
                _check(world, model, second)
                _check(world, model, first)  # the first lease's rows keep the version it resolved
    finally:
        hub.alias("acme/moving", "prod", version=1)


def test_bad_input_leaves_pool_and_bank_unchanged(world):
    pool, model = _pool(world, slots=2)
    bank = pool.bank
    with pool:
        with pool.lease(["acme/a09@1"] * ROWS):
            pass
        before = ([bank.label(s) for s in range(2)], pool.stats())
        bad = [
            (["acme/nope@1"], NotFoundError, "no delta named 'acme/nope'"),
            (["acme/a09@9"], NotFoundError, "version 9"),
            (["acme/a09@nope"], NotFoundError, "no alias 'nope'"),
            (["Acme/../x"], RefError, "invalid name"),
            (["other/gpt2"], surgery.DeltaMismatchError, "trained on base"),
            (["acme/a10@1", "acme/a11@1", "acme/a12@1"], PoolError, "3 distinct deltas .* 2 slots"),
            ("acme/a09@1", PoolError, "one per row"),
            ([], PoolError, "non-empty list"),
            ([3], PoolError, "a ref is a string"),
        ]
        for refs, err, words in bad:
            with pytest.raises(err, match=words):
                pool._acquire(refs, 1)
            st = pool.stats()
            assert [bank.label(s) for s in range(2)] == before[0] and st["held"] == 0
            assert st["resident"] == before[1]["resident"] and st["loads"] == before[1]["loads"]
        with pytest.raises(PoolError, match="timeout"):
            pool._acquire(["acme/a09@1"], -1)
        with pool.lease(["acme/a10@1", "acme/a11@1"]):  # every slot held: a third version waits, then gives up
            with pytest.raises(PoolError, match="timed out waiting for 1 free slot"):
                pool._acquire(["acme/a12@1"], 0.1)
        assert pool.stats()["held"] == 0
        with pool.lease(["acme/a09@1", None, "acme/a12@2", None]) as slots:  # still serves
            _check(world, model, slots)
    with pytest.raises(PoolError, match="closed"):
        pool._acquire(["acme/a09@1"], 1)


def test_prefetch(world):
    pool, model = _pool(world, slots=2)
    with pool:
        with pytest.raises(RefError):
            pool.prefetch(["Bad/ref"])
        got = [f.result(10) for f in pool.prefetch(["acme/a13@1", "acme/a14@2", "acme/a13@1"])]
        assert [str(r) for r in got] == ["acme/a13@1", "acme/a14@2"]
        st = pool.stats()
        assert st["misses"] == 2 and set(st["resident"].values()) == {"acme/a13@1", "acme/a14@2"}
        with pool.lease(["acme/a13@1", "acme/a14@2", None, None]) as slots:  # both already in slots
            _check(world, model, slots)
        assert pool.stats()["hits"] == 2 and pool.stats()["misses"] == 2
        got = [f.result(10) for f in pool.prefetch(["acme/a15@1"])]  # no empty slot: CPU tier only
        assert set(pool.stats()["resident"].values()) == {"acme/a13@1", "acme/a14@2"}
        with pool.lease(["acme/a15@1"] * ROWS) as slots:
            _check(world, model, slots)
        st = pool.stats()
        assert st["cpu_hits"] == 1 and st["misses"] == 3
        (missing,) = pool.prefetch(["acme/nope"])
        with pytest.raises(NotFoundError):
            missing.result(10)


def test_one_read_per_version_shared_by_leases(world):
    pool, model = _pool(world)
    hub = pool.hub
    reading, go = threading.Event(), threading.Event()
    pull = hub.pull

    def slow_pull(ref, *a, **kw):
        reading.set()
        assert go.wait(10)
        return pull(ref, *a, **kw)

    hub.pull = slow_pull  # type: ignore[method-assign]
    got: list[Lease] = []

    def lease() -> None:
        with pool.lease(["acme/a16@2", None, None, "acme/a16@2"]) as slots:
            got.append(slots)

    with pool:
        threads = [threading.Thread(target=lease) for _ in range(2)]
        threads[0].start()
        assert reading.wait(10)
        threads[1].start()
        deadline = time.monotonic() + 10
        while pool.stats()["joined"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        go.set()
        for t in threads:
            t.join(10)
        st = pool.stats()
        assert (st["misses"], st["joined"], st["loads"]) == (1, 1, 1) and got[0] == got[1]
        with pool.lease(got[0].refs) as slots:
            _check(world, model, slots)


def test_isolation_threads_with_alias_moves(world):
    """8 threads over 50 versions on a 12-slot bank while another thread moves aliases: every row
    equals the single-tenant reference of the version its lease resolved."""
    pool, model = _pool(world, slots=12, cpu_cache=20)
    hub = world["hub"]
    moving = NAMES[:10]
    stop = threading.Event()
    problems: list[str] = []
    seen: set[str] = set()

    def mover() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            hub.alias(rng.choice(moving), "prod", version=rng.choice((1, 2)))

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(12):
                refs = [
                    None if rng.random() < 0.15 else f"{rng.choice(NAMES)}@{rng.choice(('prod', '1', '2', 'latest'))}"
                    for _ in range(ROWS)
                ]
                with pool.lease(refs, timeout=20) as slots:
                    out = _run(model, slots, world["batch"])
                    problems.extend(_mismatches(world, out, slots))
                    seen.update(str(r) for r in slots.refs if r is not None)
        except Exception as e:  # noqa: BLE001  (reported below)
            problems.append(f"worker {seed}: {type(e).__name__}: {e}")

    with pool:
        move = threading.Thread(target=mover)
        move.start()
        workers = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        stop.set()
        move.join(10)
        assert not any(t.is_alive() for t in workers + [move])
        assert problems == []
        st = pool.stats()
        assert st["evictions"] > 0 and st["held"] == 0 and len(seen) > 12
        assert st["hits"] + st["cpu_hits"] + st["misses"] + st["joined"] >= st["loads"]
    for name in moving:
        hub.alias(name, "prod", version=1)


def test_alease_under_gather(world):
    pool, model = _pool(world, slots=6)
    requests = [
        ["acme/a17@1", None, "acme/a18@2", "acme/a17@1"],
        ["acme/a18@2", "acme/a19@1", None, None],
        ["acme/a20@prod", "acme/a17@1", "acme/a21@2", "acme/a19@1"],
        [None, None, None, None],
    ]

    async def one(refs):
        async with pool.alease(refs) as slots:
            await asyncio.sleep(0)  # let the other tasks lease meanwhile
            return slots, _run(model, slots, world["batch"])

    async def all_of():
        return await asyncio.gather(*(one(r) for r in requests))

    with pool:
        for slots, out in asyncio.run(all_of()):
            assert _mismatches(world, out, slots) == []
        assert pool.stats()["held"] == 0 and len(pool.stats()["resident"]) == 5


def test_evict_takes_a_version_out_unless_held(world):
    pool, model = _pool(world, slots=2)
    a, b = "acme/a10@1", "acme/a11@1"
    with pool:
        with pool.lease([a, b, None, None]) as slots:
            with pytest.raises(PoolError, match="in use"):
                pool.evict(a)
        assert pool.evict(a) is True and pool.evict(a) is False
        assert set(pool.stats()["resident"].values()) == {"acme/a11@1"}
        with pool.lease([a, a, b, None]) as slots:  # read from the hub again: the CPU tier let it go too
            _check(world, model, slots)
        assert pool.stats()["misses"] == 3
