"""Iteration-level batching (`surgery.serving.batcher.Batcher`): requests for different slots join
and leave a running batch between decode steps, and each request's tokens equal what its delta
alone gives on its prompt alone (`generate`), greedy or seeded sampling; cancel, eos, stop
sequences, slot pinning, submissions from other threads; bad input refused with nothing queued."""

from __future__ import annotations

import copy
import functools
import threading

import pytest
import torch
from models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

import surgery
from surgery import ConfigError, SlotError
from surgery.serving.batcher import Batcher, Request, Sampling

EOS = 2  # the tiny models' eos


def _donor(base, seed: int):
    """A copy of the base with a trained-looking LoRA: the single-tenant reference of a slot."""
    m = copy.deepcopy(base)
    surgery.inject(m, "lora", targets="@linear", r=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


@functools.cache
def _served(factory):
    base = factory()
    donors = [_donor(base, seed=i) for i in range(3)]
    model = copy.deepcopy(base)
    bank = surgery.serve(model, slots=4, max_rank=8)  # slot 3 stays empty
    for i, d in enumerate(donors):
        bank.load(i, surgery.delta(d))
    return base, donors, model, bank


@pytest.fixture
def llama():
    return _served(tiny_llama)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _generate(model, prompt: list[int], n: int, **kw) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, pad_token_id=0, **kw)
    return out[0, len(prompt) :].tolist()


def _reference(base, donors, slot):
    return base if slot is None or slot < 0 else donors[slot]


def _drive(b: Batcher, arrivals: dict[int, list[Request]]) -> tuple[dict[int, list[tuple]], list[int]]:
    """Submit `arrivals[step]` before that step, step until done; events per request (in
    submit order) and the rows of every step."""
    rids: list[int] = []
    events: dict[int, list[tuple]] = {}
    rows, step = [], 0
    while b.pending or any(k >= step for k in arrivals):
        rids += [b.submit(r) for r in arrivals.get(step, [])]
        got = b.step()
        rows.append(len(got))
        for rid, tok, fin, why in got:
            events.setdefault(rid, []).append((tok, fin, why))
        if b.running:  # leaving trims the padding no row needs: the cache is as wide as the longest row
            assert b.mask is not None and b.mask.shape[1] == max(len(s.prompt) + len(s.tokens) - 1 for s in b.running)
        step += 1
    return {i: events[r] for i, r in enumerate(rids)}, rows


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_greedy_rows_equal_their_delta_alone(factory):
    base, donors, model, bank = _served(factory)
    # (step it arrives, slot, prompt length, max_tokens): joins mid-decode, early finishes, a queue (max_batch 4)
    plan = [(0, 0, 5, 12), (0, None, 9, 3), (2, 1, 3, 10), (3, 2, 11, 6), (3, 0, 7, 9), (5, 1, 4, 8)]
    arrivals: dict[int, list[Request]] = {}
    for i, (at, slot, n, k) in enumerate(plan):
        arrivals.setdefault(at, []).append(Request(_prompt(n, seed=i), slot, Sampling(max_tokens=k)))
    got, rows = _drive(Batcher(model, bank=bank, max_batch=4), arrivals)
    assert max(rows) == 4 and b_model_untouched(model, base)
    for i, (_, slot, n, k) in enumerate(plan):
        ref = _generate(_reference(base, donors, slot), _prompt(n, seed=i), k, do_sample=False)
        toks = [t for t, _, _ in got[i]]
        assert toks == ref, f"request {i} (slot {slot})"
        assert [f for _, f, _ in got[i]] == [False] * (len(ref) - 1) + [True]
        assert got[i][-1][2] == ("eos" if ref[-1] == EOS else "length")
    # the slots matter: the same prompt continues differently on each delta and on the base
    p = _prompt(5, seed=0)
    assert len({tuple(_generate(m, p, 12, do_sample=False)) for m in (base, *donors)}) == 4


def b_model_untouched(model, base) -> bool:
    """Outside the batcher the served model is the base again (no route left open)."""
    ids = torch.tensor([_prompt(6, seed=99)])
    with torch.no_grad():
        return torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_seeded_sampling_does_not_depend_on_the_batch(llama):
    base, donors, model, bank = llama
    req = Request(_prompt(6, seed=1), 1, Sampling(max_tokens=14, temperature=0.9, top_p=0.9, seed=7))
    alone = Batcher(model, bank=bank, eos_token_id=[])
    rid = alone.submit(req)
    solo = alone.run_until_done()[rid]
    others = [
        Request(_prompt(9, seed=2), 0, Sampling(max_tokens=5, temperature=1.2, seed=3)),
        Request(_prompt(4, seed=3), None, Sampling(max_tokens=20)),
        Request(_prompt(12, seed=4), 2, Sampling(max_tokens=8, temperature=0.5, top_p=0.5, seed=7)),
    ]
    mixed, _ = _drive(Batcher(model, bank=bank, eos_token_id=[]), {0: others[:2], 2: [req], 4: others[2:]})
    assert [t for t, _, _ in mixed[2]] == solo
    # it does sample: another seed draws other tokens, and not the greedy ones
    other = Batcher(model, bank=bank, eos_token_id=[])
    rid = other.submit(Request(req.prompt_ids, 1, Sampling(max_tokens=14, temperature=0.9, top_p=0.9, seed=8)))
    assert other.run_until_done()[rid] != solo
    assert solo != _generate(donors[1], list(req.prompt_ids), 14, do_sample=False, eos_token_id=None)
    # top_p that keeps only the most likely token is greedy, whatever the temperature and seed
    nucleus = Batcher(model, bank=bank)
    rid = nucleus.submit(Request(req.prompt_ids, 1, Sampling(max_tokens=14, temperature=2.0, top_p=1e-6, seed=5)))
    assert nucleus.run_until_done()[rid] == _generate(donors[1], list(req.prompt_ids), 14, do_sample=False)


def test_eos_and_stop_sequences(llama):
    base, donors, model, bank = llama
    prompt = _prompt(7, seed=5)
    ref = _generate(donors[2], prompt, 16, do_sample=False, eos_token_id=None)
    # the first token (after the first) and the first pair not seen earlier in the output
    k = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])
    j = next(i for i in range(2, len(ref)) if (ref[i - 1], ref[i]) not in zip(ref[: i - 1], ref[1:i], strict=False))
    b, b2 = Batcher(model, bank=bank, eos_token_id=[ref[k], 1000]), Batcher(model, bank=bank, eos_token_id=[])
    stop = Sampling(max_tokens=16, stop_token_ids=[[999, 998], [ref[j - 1], ref[j]]])
    got_eos = _drive(b, {0: [Request(prompt, 2, Sampling(max_tokens=16))]})[0][0]
    got_stop = _drive(b2, {0: [Request(prompt, 2, stop)]})[0][0]
    assert [t for t, _, _ in got_eos] == ref[: k + 1] and got_eos[-1][1:] == (True, "eos")
    assert [t for t, _, _ in got_stop] == ref[: j + 1] and got_stop[-1][1:] == (True, "stop")
    assert b.pending == b2.pending == 0 and b.cache is None and b.running == []
    # ignore_eos: the same batcher's eos does not end this request, which runs to max_tokens
    got_all = _drive(b, {0: [Request(prompt, 2, Sampling(max_tokens=16, ignore_eos=True))]})[0][0]
    assert [t for t, _, _ in got_all] == ref and got_all[-1][1:] == (True, "length")


def test_prefill_admits_within_max_prefill_tokens(llama):
    base, donors, model, bank = llama
    b = Batcher(model, bank=bank, max_batch=8, eos_token_id=[], max_prefill_tokens=25)
    reqs = [Request(_prompt(10, seed=40 + i), i % 3, Sampling(max_tokens=5)) for i in range(4)]
    long = Request(_prompt(30, seed=50), 1, Sampling(max_tokens=3))  # above the cap: admitted alone
    got, rows = _drive(b, {0: reqs, 1: [long]})
    # step 0: 2 prompts (2 x 10 <= 25 < 3 x 10); step 1: 2 more, then the long one alone in step 2
    assert rows[:3] == [2, 4, 5]
    for r, events in zip([*reqs, long], got.values(), strict=True):
        ref = _generate(donors[r.slot], list(r.prompt_ids), r.sampling.max_tokens, do_sample=False, eos_token_id=None)
        assert [t for t, _, _ in events] == ref


def test_cancel_frees_the_row_and_the_slot(llama):
    base, donors, model, bank = llama
    b = Batcher(model, bank=bank, max_batch=2)
    reqs = [Request(_prompt(5 + i, seed=10 + i), i, Sampling(max_tokens=10)) for i in range(3)]
    r0, r1, r2 = (b.submit(r) for r in reqs)
    with pytest.raises(SlotError, match="running route"):  # a queued request pins its slot
        bank.load(2, surgery.delta(donors[2]))
    assert b.cancel(r2) and not b.cancel(r2)  # waiting: gone at once
    bank.load(2, surgery.delta(donors[2]))  # its slot is free again
    toks: dict[int, list[int]] = {r0: [], r1: []}
    for rid, tok, _, _ in b.step() + b.step():
        toks[rid].append(tok)
    assert b.cancel(r1)  # running: its row leaves before the next step
    while b.pending:
        for rid, tok, _, _ in b.step():
            assert rid == r0
            toks[rid].append(tok)
    assert toks[r0] == _generate(donors[0], list(reqs[0].prompt_ids), 10, do_sample=False)
    assert toks[r1] == _generate(donors[1], list(reqs[1].prompt_ids), 10, do_sample=False)[:2]
    assert not b.cancel(r0) and not b.cancel(r1) and not b.cancel(12345)  # finished, cancelled, unknown
    bank.load(1, surgery.delta(donors[1]))  # nothing pins the slots any more
    bank.load(0, surgery.delta(donors[0]))


def test_submit_from_other_threads_while_stepping(llama):
    base, donors, model, bank = llama
    b = Batcher(model, bank=bank, max_batch=8)
    reqs = [Request(_prompt(4 + i % 5, seed=20 + i), i % 4 - 1, Sampling(max_tokens=6)) for i in range(8)]
    rids: dict[int, int] = {}
    started = threading.Barrier(5)

    def client(i: int) -> None:
        started.wait()
        for k in (i, i + 4):
            rids[k] = b.submit(reqs[k])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()
    toks: dict[int, list[int]] = {}
    while any(t.is_alive() for t in threads) or b.pending:
        for rid, tok, _, _ in b.step():
            toks.setdefault(rid, []).append(tok)
    for k, r in enumerate(reqs):
        ref = _generate(_reference(base, donors, r.slot), list(r.prompt_ids), 6, do_sample=False)
        assert toks[rids[k]] == ref


@pytest.mark.parametrize(
    "request_, error, words",
    [
        (Request([], 0), ConfigError, "empty"),
        (Request([5, VOCAB], 0), ConfigError, "token ids"),
        (Request("hello", 0), ConfigError, "list of token ids"),
        (Request([5] * 60, 0, Sampling(max_tokens=5)), ConfigError, "positions"),
        (Request([5], 9), SlotError, "out of range"),
        (Request([5], 3), SlotError, "hold no delta"),
        (Request([5], True), SlotError, "slot id"),
        ("not a request", ConfigError, "Request"),
    ],
)
def test_bad_requests_queue_nothing(llama, request_, error, words):
    base, donors, model, bank = llama
    b = Batcher(model, bank=bank)
    with pytest.raises(error, match=words):
        b.submit(request_)
    assert b.pending == 0 and b.step() == [] and bank.busy == [0] * bank.slots


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=1.5), "seed"),
        (dict(stop_token_ids=[13]), "stop_token_ids"),
        (dict(stop_token_ids=[[]]), "stop_token_ids"),
        (dict(ignore_eos=1), "ignore_eos"),
    ],
)
def test_bad_sampling(kw, words):
    with pytest.raises(ConfigError, match=words):
        Sampling(**kw)


def test_bad_batchers(llama):
    base, donors, model, bank = llama
    with pytest.raises(ConfigError, match="max_batch"):
        Batcher(model, bank=bank, max_batch=0)
    with pytest.raises(ConfigError, match="max_prefill_tokens"):
        Batcher(model, bank=bank, max_prefill_tokens=0)
    with pytest.raises(SlotError, match="SlotBank"):
        Batcher(base, bank=bank)  # the bank of another model
    with pytest.raises(ConfigError, match="decoder-only"):
        Batcher(tiny_bert())
    with pytest.raises(ConfigError, match="eos_token_id"):
        Batcher(model, eos_token_id="</s>")
    with pytest.raises(SlotError, match="no bank"):
        Batcher(model).submit(Request([5, 6], 0))


def test_prompts_of_unlike_lengths_prefill_apart(llama):
    """Admitted together, prompts of 4/5 and 16/17 tokens run as two prefills (one would be 40 % padding);
    every request still equals its delta alone."""
    base, donors, model, bank = llama
    calls: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        reqs = [Request(_prompt(n, seed=60 + n), n % 3, Sampling(max_tokens=3)) for n in (4, 16, 5, 17)]
        got, _ = _drive(Batcher(model, bank=bank, eos_token_id=[]), {0: reqs})
    finally:
        hook.remove()
    assert sorted(calls[:2]) == [(2, 5), (2, 17)] and all(c[1] == 1 for c in calls[2:])
    for r, events in zip(reqs, got.values(), strict=True):
        assert [t for t, _, _ in events] == _generate(
            donors[r.slot], list(r.prompt_ids), 3, do_sample=False, eos_token_id=None
        )
