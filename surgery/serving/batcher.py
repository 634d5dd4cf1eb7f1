"""Iteration-level (continuous) batching: requests for different slots of a bank share every
decode step, one model call with each row routed to its request's slot.

    b = Batcher(model, bank=bank, max_batch=32, eos_token_id=tok.eos_token_id)
    rid = b.submit(Request(prompt_ids=ids, slot=3, sampling=Sampling(max_tokens=64, temperature=0.7, seed=1)))
    for rid, token, finished, reason in b.step():   # reason: "eos" | "stop" | "length" | None
        ...

A step admits waiting requests (one left-padded prefill, routed per row, gives their first
token), runs one decode step over the rows already running (their next token), then merges the
two KV caches (each left-padded to the longer, concatenated on the batch dim) and drops the
rows that finished. Rows are aligned by an attention mask (0 on padding) and explicit position
ids counting real tokens only, so each row's logits are those of its request alone.

transformers' own continuous batching (`generate_batch`, `init_continuous_batching`) packs the
tokens of all requests into one row of a paged cache; a route gives each batch *row* its slot,
so those packed calls cannot be routed per request and are not used here.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import secrets
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery import engine
from surgery.errors import ConfigError, SlotError
from surgery.serving.bank import SlotBank
from surgery.serving.route import Plan, build, install

Event = tuple[int, int, bool, "str | None"]  # (request id, token id, finished, reason)


@dataclass(frozen=True)
class Sampling:
    """How a request's tokens are chosen: greedy at ``temperature == 0``, else sampled from the
    top-`top_p` mass with a generator seeded by `seed` (the same seed gives the same tokens
    whatever else is in the batch). It stops after `max_tokens`, on the batcher's eos (unless
    `ignore_eos`), or when its tokens end with one of `stop_token_ids` (token-id sequences); the
    stopping token is kept."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[Sequence[int]] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(what: str) -> ConfigError:
            return ConfigError(f"Sampling: {what}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        t, p = self.temperature, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise bad(f"temperature must be a finite number >= 0 (0: greedy), got {t!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise bad(f"top_p must be in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad(f"seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise bad(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not isinstance(stops, Iterable):
            raise bad(f"stop_token_ids is a list of token-id sequences, e.g. [[13, 13]], got {stops!r}")
        norm = tuple(tuple(s) if isinstance(s, Iterable) and not isinstance(s, (str, bytes)) else s for s in stops)
        for s in norm:
            if not isinstance(s, tuple) or not s or not all(_is_int(i) and i >= 0 for i in s):
                raise bad(f"stop_token_ids is a list of non-empty token-id sequences, e.g. [[13, 13]]; got {s!r}")
        object.__setattr__(self, "stop_token_ids", norm)


@dataclass(frozen=True)
class Request:
    """A prompt (token ids) to continue on `slot` of the batcher's bank (-1 or None: the base)."""

    prompt_ids: Sequence[int]
    slot: int | None = None
    sampling: Sampling = field(default_factory=Sampling)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@contextlib.contextmanager
def _closing(model: nn.Module, plan: Plan) -> Any:
    try:
        with install(model, plan):
            yield plan
    finally:
        plan.close()


@dataclass(eq=False)
class _Seq:
    """A submitted request while it waits or runs."""

    rid: int
    slot: int  # -1: the base
    prompt: list[int]
    sampling: Sampling
    gen: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # generated so far; the last is not in the cache yet


class Batcher:
    """Runs many requests as rows of one batch, each row on its request's slot of `bank`
    (None: base only); at most `max_batch` rows run at once, the others wait in submit order.
    A step admits waiting requests while their prefill (padded to the longest prompt) stays within
    `max_prefill_tokens` (always at least one), so a burst of long prompts delays the running
    rows' next token by a bounded prefill rather than one of every waiting prompt.

    `submit` and `cancel` may be called from any thread while one thread runs `step`. A request
    pins its slot from `submit` until it finishes or is cancelled: the bank refuses to load or
    unload that slot meanwhile (`SlotError`), so a request never changes delta mid-way."""

    def __init__(
        self,
        model: nn.Module,
        bank: SlotBank | None = None,
        max_batch: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        max_prefill_tokens: int = 2048,
    ) -> None:
        engine.check_model(model)
        for what, v in (("max_batch", max_batch), ("max_prefill_tokens", max_prefill_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Batcher: {what} must be an integer >= 1, got {v!r}")
        if bank is not None and (not isinstance(bank, SlotBank) or bank.model_ref() is not model):
            raise SlotError("Batcher: bank must be the SlotBank that surgery.serve(model, ...) made for this model")
        cfg = getattr(model, "config", None)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = next((a for a in ("cache", "past_key_values") if a in params), None)
        can_generate = getattr(model, "can_generate", lambda: False)()
        if self.cache_arg is None or not can_generate or getattr(cfg, "is_encoder_decoder", False):
            raise ConfigError("Batcher runs a decoder-only transformers model with a KV cache (a ...ForCausalLM)")
        self._check_cache_layers(cfg)
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = list(eos_token_id) if isinstance(eos_token_id, Iterable) else [eos_token_id]
        eos = [] if eos_token_id is None else eos
        if not all(_is_int(e) for e in eos):
            raise ConfigError(f"Batcher: eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
        self.model, self.bank, self.max_batch, self.eos = model, bank, max_batch, frozenset(eos)
        self.max_prefill_tokens = max_prefill_tokens
        self.vocab: int | None = getattr(cfg, "vocab_size", None)
        self.max_positions: int | None = getattr(cfg, "max_position_embeddings", None)
        self.logits_arg = "logits_to_keep" in params
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()  # guards waiting, live, cancelled (submit / cancel run on other threads)
        self.stepping = threading.Lock()  # one step at a time
        self.waiting: deque[_Seq] = deque()
        self.live: dict[int, _Seq] = {}  # waiting and running, by request id
        self.cancelled: set[int] = set()  # running requests to drop before the next step
        self.running: list[_Seq] = []  # the rows of the batch, in order
        self.cache: Any = None  # the running rows' KV cache (a DynamicCache)
        self.mask: torch.Tensor | None = None  # [rows, cache length]: 0 on left padding
        # the running rows' route, kept over the decoding steps while the rows stay the same: its gathered
        # factors are reused (their slots are held by the rows' requests, so they cannot change meanwhile)
        self.plan: Plan | None = None
        self.ids = itertools.count()

    @staticmethod
    def _check_cache_layers(cfg: Any) -> None:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        other = {type(layer).__name__ for layer in DynamicCache(config=cfg).layers if type(layer) is not DynamicLayer}
        if other:
            raise ConfigError(
                f"Batcher: this model's cache has {sorted(other)} layers (sliding window or recurrent state); "
                "rows are merged by left-padding full-attention caches only"
            )

    @property
    def pending(self) -> int:
        """Requests submitted and not finished or cancelled yet."""
        with self.lock:
            return len(self.live)

    # ---- other threads
    def submit(self, request: Request) -> int:
        """Queue `request`; its id is in the events `step` returns. Bad input raises `ConfigError`
        or `SlotError` (a slot out of range or empty) and queues nothing."""
        if not isinstance(request, Request):
            raise ConfigError(f"submit takes a Request(prompt_ids=..., slot=..., sampling=...), got {request!r}")
        sp = request.sampling
        if not isinstance(sp, Sampling):
            raise ConfigError(f"Request.sampling must be a Sampling, got {sp!r}")
        ids = request.prompt_ids
        prompt = ids.tolist() if isinstance(ids, torch.Tensor) and ids.dim() == 1 else ids
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Iterable):
            raise ConfigError(f"Request.prompt_ids is a list of token ids, got {type(ids).__name__}")
        prompt = list(prompt)
        if not prompt:
            raise ConfigError("Request.prompt_ids is empty: a request needs at least one prompt token")
        if not all(_is_int(i) and 0 <= i < (self.vocab or math.inf) for i in prompt):
            raise ConfigError(f"Request.prompt_ids must be token ids in 0..{(self.vocab or 0) - 1}")
        if self.max_positions and len(prompt) + sp.max_tokens > self.max_positions:
            raise ConfigError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({sp.max_tokens}) is above the model's "
                f"{self.max_positions} positions; shorten the prompt or lower max_tokens"
            )
        gen = None
        if sp.temperature > 0:
            gen = torch.Generator(self.device).manual_seed(secrets.randbits(63) if sp.seed is None else sp.seed)
        slot = -1 if request.slot is None or request.slot == -1 and _is_int(request.slot) else request.slot
        if slot != -1:
            if self.bank is None:
                raise SlotError(f"request for slot {slot} but this Batcher has no bank; serve one, or use -1 / None")
            self.bank.acquire([self.bank.check_slot(slot)])  # pinned until the request finishes
        with self.lock:
            seq = _Seq(next(self.ids), slot, prompt, sp, gen)
            self.waiting.append(seq)
            self.live[seq.rid] = seq
        return seq.rid

    def cancel(self, rid: int) -> bool:
        """Drop request `rid` (waiting: now; running: its row leaves before the next step).
        False when it is unknown or already finished."""
        with self.lock:
            seq = self.live.get(rid)
            if seq is None or rid in self.cancelled:
                return False
            if seq in self.waiting:
                self.waiting.remove(seq)
                self._forget(seq)
            else:
                self.cancelled.add(rid)
            return True

    def _forget(self, seq: _Seq) -> None:  # under self.lock
        del self.live[seq.rid]
        if seq.slot >= 0 and self.bank is not None:
            self.bank.release([seq.slot])

    # ---- the stepping thread
    @torch.no_grad()
    def step(self) -> list[Event]:
        """One iteration: admit waiting requests (prefill, their first token), one decode step
        for the rows already running; returns one event per row that got a token."""
        with self.stepping:
            with self.lock:
                for seq in [s for s in self.waiting if s.rid in self.cancelled]:  # cancelled while admitted
                    self.waiting.remove(seq)
                    self.cancelled.discard(seq.rid)
                    self._forget(seq)
                drop = {i for i, s in enumerate(self.running) if s.rid in self.cancelled}
                new = self._admit(self.max_batch - len(self.running) + len(drop))
            if drop:
                self._leave(drop)
            old = self.running
            if not old and not new:
                return []
            mask, saved = self.mask, [(layer.keys, layer.values) for layer in self.cache.layers] if old else []
            admitted, new = new, [s for g in self._by_length(new) for s in g]
            try:  # nothing is kept until every row has its token
                prefills = [self._prefill(g) for g in self._by_length(new)]
                logits = self._decode() if old else None
                parts = ([] if logits is None else [logits]) + [p[2] for p in prefills]
                tokens = self._sample(torch.cat(parts), old + new)
            except BaseException:
                self.mask = mask
                for layer, (k, v) in zip(self.cache.layers if old else (), saved, strict=True):
                    layer.keys, layer.values = k, v  # the layers a failed call already grew
                with self.lock:  # the admitted requests wait again, first in line
                    self.waiting.extendleft(reversed(admitted))
                raise
            for cache, mask, _ in prefills:
                self._merge(cache, mask)
            self.running = old + new
            events: list[Event] = []
            done: set[int] = set()
            for i, (seq, tok) in enumerate(zip(self.running, tokens, strict=True)):
                seq.tokens.append(tok)
                reason = self._stop_reason(seq)
                events.append((seq.rid, tok, reason is not None, reason))
                if reason is not None:
                    done.add(i)
            if done:
                self._leave(done)
            return events

    def _admit(self, room: int) -> list[_Seq]:  # under self.lock
        new: list[_Seq] = []
        width = 0
        while self.waiting and len(new) < room:
            w = max(width, len(self.waiting[0].prompt))
            if new and w * (len(new) + 1) > self.max_prefill_tokens:
                break
            new.append(self.waiting.popleft())
            width = w
        return new

    def run_until_done(self) -> dict[int, list[int]]:
        """Step until no request waits or runs; the tokens each request got meanwhile."""
        out: dict[int, list[int]] = {}
        while self.pending:
            for rid, tok, _, _ in self.step():
                out.setdefault(rid, []).append(tok)
        return out

    def _stop_reason(self, seq: _Seq) -> str | None:
        toks, sp = seq.tokens, seq.sampling
        if toks[-1] in self.eos and not sp.ignore_eos:
            return "eos"
        if any(len(toks) >= len(s) and tuple(toks[-len(s) :]) == s for s in sp.stop_token_ids):
            return "stop"
        return "length" if len(toks) >= sp.max_tokens else None

    def _route(self, seqs: list[_Seq]) -> contextlib.AbstractContextManager[Any]:
        slots = [s.slot for s in seqs]
        if self.bank is None or all(s < 0 for s in slots):
            return contextlib.nullcontext()
        if seqs is not self.running:  # a prefill: its own plan, for one call
            return _closing(self.model, build(self.bank, slots))
        if self.plan is None or self.plan.ids != slots:
            if self.plan is not None:
                self.plan.close()
            self.plan = build(self.bank, slots)
        return install(self.model, self.plan)

    def _forward(self, seqs: list[_Seq], ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> Any:
        kw: dict[str, Any] = {self.cache_arg or "cache": cache} if cache is not None else {}
        if self.logits_arg:
            kw["logits_to_keep"] = 1
        with self._route(seqs):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        got = out.get("cache", out.get("past_key_values"))
        return out.logits[:, -1], got

    @staticmethod
    def _by_length(seqs: list[_Seq]) -> list[list[_Seq]]:
        """Prompts of similar length, each group one prefill: a group's padding stays within 1/8 of its
        tokens (one call for prompts of 40 and 150 tokens would spend 40 % of it on padding)."""
        groups: list[list[_Seq]] = []
        real = 0
        for s in sorted(seqs, key=lambda s: len(s.prompt)):
            n = len(s.prompt)
            if groups and n * (len(groups[-1]) + 1) <= 1.125 * (real + n):
                groups[-1].append(s)
                real += n
            else:
                groups.append([s])
                real = n
        return groups

    def _prefill(self, seqs: list[_Seq]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        width = max(len(s.prompt) for s in seqs)
        ids = torch.tensor([[0] * (width - len(s.prompt)) + s.prompt for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in seqs], device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        logits, cache = self._forward(seqs, ids, mask, pos, None)
        return cache, mask, logits

    def _decode(self) -> torch.Tensor:
        assert self.mask is not None
        seqs, dev = self.running, self.device
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)
        pos = torch.tensor([[len(s.prompt) + len(s.tokens) - 1] for s in seqs], device=dev)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(seqs), 1)], 1)
        logits, self.cache = self._forward(seqs, ids, self.mask, pos, self.cache)
        return logits

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Append the rows of a prefill's cache to the running rows' (both padded on the left to the longer)."""
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:  # on the left of `dim` (-1 mask, -2 keys / values)
            n = width - t.shape[dim]
            return t if n == 0 else F.pad(t, (0, 0, n, 0) if dim == -2 else (n, 0))

        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, -2), pad(theirs.keys, -2)])
            mine.values = torch.cat([pad(mine.values, -2), pad(theirs.values, -2)])
        self.mask = torch.cat([pad(self.mask, -1), pad(mask, -1)])

    def _leave(self, rows: set[int]) -> None:
        """Remove `rows` from the batch and the cache, and the leading columns that are padding in every row left."""
        assert self.mask is not None
        keep = [i for i in range(len(self.running)) if i not in rows]
        gone = [s for i, s in enumerate(self.running) if i in rows]
        self.running = [self.running[i] for i in keep]
        with self.lock:
            for s in gone:
                self.cancelled.discard(s.rid)
                self._forget(s)
        if not self.running:
            self.cache = self.mask = None
            if self.plan is not None:
                self.plan.close()
                self.plan = None
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, idx)
        start = int(mask.any(0).to(torch.int8).argmax())  # the first column some row uses
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        logits = logits.float()
        chosen = logits.argmax(-1).tolist()  # greedy rows
        hot = [i for i, s in enumerate(seqs) if s.sampling.temperature > 0]
        if hot:
            temps = torch.tensor([seqs[i].sampling.temperature for i in hot], device=logits.device)
            top_p = torch.tensor([seqs[i].sampling.top_p for i in hot], device=logits.device)
            probs, order = torch.softmax(logits[hot] / temps[:, None], -1).sort(-1, descending=True)
            # keep the most likely tokens up to top_p of the mass (the first always)
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], 0)
            for j, i in enumerate(hot):
                pick = torch.multinomial(probs[j], 1, generator=seqs[i].gen)
                chosen[i] = int(order[j, pick])
        return chosen
