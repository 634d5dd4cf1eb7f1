"""Slot banks and per-row routing (`surgery.serve`, `surgery.route`): every row of one batch runs
its own delta, and its output equals that delta's single-tenant output (1e-5, fp32) for prefill,
decoding with the KV cache, left padding and `generate`; slots are swapped with a copy, without
re-injection or recompilation; bad input is refused with the bank untouched."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from models import VOCAB, tiny_gpt2, tiny_llama

import surgery
from surgery import SlotError

TOL = 1e-5


def _trained(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _donor(base, method: str, seed: int, targets="@linear", **cfg):
    """A copy of the base with one trained-looking delta: the single-tenant reference."""
    m = copy.deepcopy(base)
    surgery.inject(m, method, targets=targets, **cfg)
    _trained(m, seed)
    return m


def _ids(rows: int, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


DELTAS = [  # (method, config): every method whose update is low-rank at a linear site
    ("lora", dict(r=4)),
    ("lora", dict(r=8, alpha=16, rslora=True)),
    ("dora", dict(r=4)),
    ("vera", dict(r=8)),
    ("loha", dict(r=2)),
    ("lokr", dict(r=2)),
]


@pytest.fixture(scope="module", params=[tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def served(request):
    base = request.param()
    donors = [_donor(base, m, seed=i, **cfg) for i, (m, cfg) in enumerate(DELTAS)]
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=8, max_rank=16, targets="@linear")
    for i, d in enumerate(donors):
        bank.load(i, surgery.delta(d), label=DELTAS[i][0])
    return base, donors, model, bank


def _reference(base, donors, slot):
    return base if slot is None or slot < 0 else donors[slot]


@torch.no_grad()
def test_each_row_equals_its_single_tenant_output(served):
    base, donors, model, bank = served
    route = [5, None, 0, 1, 2, 3, 4, 0, -1]
    ids = _ids(len(route))
    with surgery.route(model, route):
        out = model(input_ids=ids).logits
    for row, s in enumerate(route):
        ref = _reference(base, donors, s)(input_ids=ids[row : row + 1]).logits
        torch.testing.assert_close(out[row : row + 1], ref, atol=TOL, rtol=0)
    # outside the route the bank does nothing: the base, bit for bit
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


@torch.no_grad()
def test_left_padding_kv_cache_and_generate(served):
    base, donors, model, bank = served
    route = [0, 2, None, 3]
    ids = _ids(4, seq=6, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[3, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with surgery.route(model, route):
        got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    for row, s in enumerate(route):
        ref = _reference(base, donors, s).generate(
            input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1], **kw
        )
        assert torch.equal(got.sequences[row], ref.sequences[0])
        for a, b in zip(got.scores, ref.scores, strict=True):  # every decoding step, through the KV cache
            torch.testing.assert_close(a[row : row + 1], b, atol=TOL, rtol=0)


@torch.no_grad()
def test_beams_repeat_each_rows_slot(served):
    base, donors, model, bank = served
    route = [1, 4]
    ids = _ids(2, seq=5, seed=4)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0)
    with surgery.route(model, route):
        got = model.generate(input_ids=ids, **kw)
    for row, s in enumerate(route):
        ref = _reference(base, donors, s).generate(input_ids=ids[row : row + 1], **kw)
        assert torch.equal(got[2 * row : 2 * row + 2], ref)


@torch.no_grad()
def test_mixed_ranks_group_without_padding_beyond_2x():
    base = tiny_llama()
    donors = [_donor(base, "lora", seed=i, r=r) for i, r in enumerate((1, 3, 16, 5))]
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=4, max_rank=16)
    for i, d in enumerate(donors):
        bank.load(i, surgery.delta(d))
    route = [0, 1, 2, 3, None, 2, 0]
    ids = _ids(len(route), seed=5)
    with surgery.route(model, route) as plan:
        out = model(input_ids=ids).logits
    ranks = {0: 1, 1: 3, 2: 16, 3: 5}
    for g in plan.groups:  # every routed row computes at most twice its delta's rank
        rows = g.rows.tolist()
        assert all(g.rank < 2 * ranks[route[r]] or g.rank == 1 for r in rows)
    assert sorted(r for g in plan.groups for r in g.rows.tolist()) == [0, 1, 2, 3, 5, 6]  # base rows skip it
    for row, s in enumerate(route):
        ref = _reference(base, donors, s)(input_ids=ids[row : row + 1]).logits
        torch.testing.assert_close(out[row : row + 1], ref, atol=TOL, rtol=0)


@torch.no_grad()
def test_output_scales_of_ia3_on_attention_are_served():
    base = tiny_llama()
    ia3 = _donor(base, "ia3", seed=2, targets=["k_proj", "v_proj"], feedforward=[])
    lora = _donor(base, "lora", seed=3, r=2)
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=2, max_rank=4)
    bank.load(0, surgery.delta(ia3))
    bank.load(1, surgery.delta(lora))
    ids = _ids(3, seed=6)
    with surgery.route(model, [0, 1, None]):
        out = model(input_ids=ids).logits
    for row, ref in enumerate((ia3, lora, base)):
        torch.testing.assert_close(out[row : row + 1], ref(input_ids=ids[row : row + 1]).logits, atol=TOL, rtol=0)


@torch.no_grad()
def test_hot_swap_is_a_copy_and_remove_restores_the_base():
    base = tiny_llama()
    want = {k: v.clone() for k, v in base.state_dict().items()}
    a, b = _donor(base, "lora", seed=1, r=4), _donor(base, "lora", seed=2, r=8)
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=2, max_rank=8)
    buffers = {n: t.data_ptr() for n, t in model.named_buffers()}
    ids = _ids(2, seed=7)
    for donor in (a, b, a):
        bank.load(1, surgery.delta(donor))
        with surgery.route(model, [1, None]):
            out = model(input_ids=ids).logits
        torch.testing.assert_close(out[:1], donor(input_ids=ids[:1]).logits, atol=TOL, rtol=0)
    assert {n: t.data_ptr() for n, t in model.named_buffers()} == buffers  # written in place, nothing new
    assert "slots" not in model.state_dict().__repr__()  # the bank is not part of the model's weights
    surgery.remove(model, "slots")
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_compiled_model_does_not_recompile_on_swaps_or_new_routes():
    dynamo = pytest.importorskip("torch._dynamo")
    base = tiny_llama()
    donors = [_donor(base, "lora", seed=i, r=4) for i in range(4)]
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=2, max_rank=4)
    bank.load(0, surgery.delta(donors[0]))
    bank.load(1, surgery.delta(donors[1]))
    ids = _ids(3, seed=8)
    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        with surgery.route(model, [0, 1, None]):
            compiled(input_ids=ids)
        graphs = dynamo.utils.counters["stats"]["unique_graphs"]
        holds = {0: donors[0], 1: donors[1]}
        for step in range(4):
            slot, donor = step % 2, donors[2 + step % 2] if step < 2 else donors[step % 2]
            bank.load(slot, surgery.delta(donor))  # hot-swap into a slot
            holds[slot] = donor
            route = [[1, 0, None], [0, 0, 1], [None, 1, 0], [1, 1, 1]][step]
            with surgery.route(model, route):
                out = compiled(input_ids=ids).logits
            for row, s in enumerate(route):
                ref = base if s is None else holds[s]
                torch.testing.assert_close(
                    out[row : row + 1], ref(input_ids=ids[row : row + 1]).logits, atol=TOL, rtol=0
                )
        assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile
    dynamo.reset()


@torch.no_grad()
def test_routes_are_context_local_and_swaps_run_beside_rows_in_flight():
    base = tiny_llama()
    donors = [_donor(base, "lora", seed=i, r=4) for i in range(4)]
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=4, max_rank=4)
    for i in range(2):
        bank.load(i, surgery.delta(donors[i]))
    ids = _ids(2, seed=9)
    refs = [d(input_ids=ids).logits for d in donors]
    deltas = [surgery.delta(d) for d in donors]
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve_rows(slot: int) -> None:
        try:
            for _ in range(15):
                with surgery.route(model, [slot, slot]):
                    out = model(input_ids=ids).logits
                torch.testing.assert_close(out, refs[slot], atol=TOL, rtol=0)
        except BaseException as e:  # reported below
            errors.append(e)

    def swap_others() -> None:
        i = 0
        while not stop.is_set():  # slots 2 and 3 change while slots 0 and 1 are in flight
            bank.load(2 + i % 2, deltas[2 + (i // 2) % 2])
            i += 1
        try:  # a slot in flight cannot be written
            with surgery.route(model, [0]), pytest.raises(SlotError, match="running route"):
                bank.load(0, deltas[3])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=serve_rows, args=(s,)) for s in (0, 1, 0, 1)]
    swapper = threading.Thread(target=swap_others)
    for t in (*threads, swapper):
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    swapper.join(60)
    assert not errors, errors[0]
    assert bank.busy == [0, 0, 0, 0]  # every route released its slots


def test_bad_input_is_refused_and_the_bank_is_unaffected():
    base = tiny_llama()
    good = _donor(base, "lora", seed=1, r=4)
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=2, max_rank=4, targets="@attn")
    ids = _ids(2, seed=10)
    good_attn = _donor(base, "lora", seed=1, targets="@attn", r=4)
    bank.load(0, surgery.delta(good_attn))
    with torch.no_grad():
        want = torch.cat([good_attn(input_ids=ids[:1]).logits, base(input_ids=ids[1:]).logits])

    def check_unaffected() -> None:
        with torch.no_grad(), surgery.route(model, [0, None]):
            torch.testing.assert_close(model(input_ids=ids).logits, want, atol=TOL, rtol=0)

    check_unaffected()
    cases = [
        (lambda: bank.load(2, surgery.delta(good_attn)), SlotError, "out of range"),
        (
            lambda: bank.load(1, surgery.delta(_donor(base, "lora", seed=2, targets="@attn", r=8))),
            SlotError,
            "max_rank",
        ),
        (lambda: bank.load(1, surgery.delta(good)), SlotError, "does not hold"),  # mlp sites: not in this bank
        (
            lambda: bank.load(1, surgery.delta(_donor(base, "prefix", seed=2, targets=None))),
            SlotError,
            "cannot be served",
        ),
        (
            lambda: bank.load(1, surgery.delta(_donor(tiny_gpt2(), "lora", seed=2, r=2))),
            surgery.DeltaMismatchError,
            "base",
        ),
        (lambda: surgery.route(model, [0, 7]).__enter__(), SlotError, "out of range"),
        (lambda: surgery.route(model, [1]).__enter__(), SlotError, "hold no delta"),
        (lambda: surgery.route(model, "0").__enter__(), SlotError, "one slot id per row"),
        (lambda: surgery.route(model, [0.5]).__enter__(), SlotError, "slot id"),
        (lambda: surgery.route(tiny_llama(), [0]).__enter__(), SlotError, "no slot bank"),
        (lambda: surgery.serve(model, slots=2), SlotError, "already has"),
        (lambda: surgery.delta(model, "slots"), surgery.InjectionError, "slot bank"),
        (lambda: surgery.serve(tiny_llama(), slots=0), surgery.ConfigError, "slots"),
        (lambda: surgery.serve(tiny_llama(), max_rank=2.5), surgery.ConfigError, "max_rank"),
    ]
    for call, err, words in cases:
        with pytest.raises(err, match=words):
            call()
        check_unaffected()
    with torch.no_grad(), surgery.route(model, [0, 0, 0]), pytest.raises(SlotError, match="3 rows"):
        model(input_ids=ids)  # 2 rows for a route of 3
    assert bank.label(1) is None and bank.busy == [0, 0]


def test_nan_delta_is_refused_before_the_slot_is_touched():
    base = tiny_llama()
    bad = surgery.delta(_donor(base, "lora", seed=1, r=2))
    next(iter(bad.tensors.values()))[0, 0] = float("nan")
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=1, max_rank=2)
    with pytest.raises(surgery.DeltaMismatchError, match="NaN"):
        bank.load(0, bad)
    assert bank.label(0) is None
    assert all(not t.any() for n, t in model.named_buffers() if n.endswith(".A"))
