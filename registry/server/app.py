"""The OpenAI-compatible server: `/v1/completions`, `/v1/chat/completions` (SSE streaming),
`/v1/models`, `/health`, `/metrics` and admin endpoints, over one model with a slot bank.

Requests for different adapters share every decode step: a scheduler thread runs the
`Batcher` (iteration-level batching through per-row slot routing) while the event loop admits
requests. A request first takes a lease on its adapter from the `AdapterPool` (in a worker
thread: a miss is read from the hub without stalling the running rows), then joins the batch
between two steps, and leaves it when it finishes; its lease ends with it.

    app = create_app(model, tokenizer, pool=pool, keys=Keys.load("keys.toml"))
    uvicorn.run(app, host="0.0.0.0", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from registry.errors import NotFoundError, PoolError, RefError
from registry.pool import AdapterPool
from registry.refs import parse
from registry.server.metrics import Metrics
from registry.server.tenancy import (
    ApiError,
    ConcurrencyGate,
    Keys,
    Limits,
    Tenant,
    parse_completion_request,
    parse_json_object,
)
from surgery.errors import SurgeryError
from surgery.serving.batcher import Batcher, Request, Sampling


@dataclass
class Job:
    """One admitted request: its tokens arrive from the scheduler thread on `queue`."""

    rid: Any
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: float = field(default_factory=time.perf_counter)


class Scheduler:
    """Runs `Batcher.step()` on its own thread while there is work; hands each new token to
    its request's event loop."""

    def __init__(self, batcher: Batcher, metrics: Metrics) -> None:
        self.batcher, self.metrics = batcher, metrics
        self.jobs: dict[Any, Job] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="surgery-scheduler", daemon=True)
        self.thread.start()

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Job:
        with self.lock:
            rid = self.batcher.submit(request)
            job = self.jobs[rid] = Job(rid, loop)
        self.wake.set()
        return job

    def cancel(self, job: Job) -> None:
        with self.lock:
            if self.jobs.pop(job.rid, None) is not None:
                self.batcher.cancel(job.rid)

    def _loop(self) -> None:
        while not self.stopping:
            with self.lock:
                idle = not self.jobs
            if idle:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            t = time.perf_counter()
            try:
                events = self.batcher.step()
            except BaseException as e:  # a failed step fails the requests in it, never the server
                with self.lock:
                    jobs, self.jobs = list(self.jobs.values()), {}
                for failed in jobs:
                    failed.loop.call_soon_threadsafe(failed.queue.put_nowait, e)
                continue
            self.metrics.step(time.perf_counter() - t, len(events))
            for rid, token, finished, reason in events:
                with self.lock:
                    job: Job | None = self.jobs.pop(rid, None) if finished else self.jobs.get(rid)
                if job is not None:
                    job.loop.call_soon_threadsafe(job.queue.put_nowait, (token, finished, reason))

    def close(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(10)


class Server:
    """The state behind the app: model, tokenizer, pool, keys, limits, the scheduler, metrics."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pool: AdapterPool,
        keys: Keys | None,
        limits: Limits,
        model_id: str,
        max_batch: int,
        max_prefill_tokens: int = 2048,
    ) -> None:
        self.model, self.tokenizer, self.pool, self.keys, self.limits = model, tokenizer, pool, keys, limits
        self.model_id = model_id
        self.metrics = Metrics()
        self.gate = ConcurrencyGate(limits.max_concurrent_per_key)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.batcher = Batcher(
            model, bank=pool.bank, max_batch=max_batch, eos_token_id=eos, max_prefill_tokens=max_prefill_tokens
        )
        self.scheduler = Scheduler(self.batcher, self.metrics)
        self.draining = False
        self.in_flight = 0

    # ---- requests
    def tenant(self, authorization: str | None) -> Tenant | None:
        return None if self.keys is None else self.keys.authenticate(authorization)

    def check_model(self, tenant: Tenant | None, name: str) -> str | None:
        """The adapter ref a request names (None: the base), or a 404 as if it did not exist."""
        if name == self.model_id:
            return None
        try:
            spec = parse(name)
        except RefError:
            raise ApiError.model_not_found(name) from None
        if tenant is not None and not tenant.may_use(spec.name):
            raise ApiError.model_not_found(name)
        return name

    def prompt_ids(self, req: dict[str, Any], chat: bool) -> list[int]:
        tok = self.tokenizer
        if chat:
            ids = tok.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) else ids
        else:
            ids = tok(req["prompt"])["input_ids"]
        return list(ids)

    async def run(
        self, req: dict[str, Any], tenant: Tenant | None, chat: bool, info: dict[str, Any]
    ) -> AsyncGenerator[tuple[str, str | None], None]:
        """Text pieces of one request as they are decoded, then ("", finish_reason). `info` gets
        the version the ref resolved to at admission ("version") and the token counts."""
        if self.draining:
            raise ApiError.draining()
        ref = self.check_model(tenant, req["model"])
        ids = self.prompt_ids(req, chat)
        max_tokens = self.limits.check_request(req, len(ids))
        stops = list(req["stop"])
        with self.gate.acquire(tenant):
            self.in_flight += 1
            self.metrics.requests.inc()
            try:
                async with self._lease(ref) as (slot, version):
                    info["version"], info["prompt_tokens"] = version, len(ids)
                    greedy = req["temperature"] == 0 or req["top_p"] == 0  # OpenAI's ranges include both
                    sampling = Sampling(
                        max_tokens=max_tokens,
                        temperature=0.0 if greedy else float(req["temperature"]),
                        top_p=1.0 if greedy else float(req["top_p"]),
                        seed=req["seed"],
                        ignore_eos=req["ignore_eos"],
                    )
                    job = self.scheduler.submit(
                        Request(prompt_ids=ids, slot=slot, sampling=sampling), asyncio.get_running_loop()
                    )
                    try:
                        async for piece in self._pieces(job, stops, info):
                            yield piece
                    finally:
                        self.scheduler.cancel(job)
            finally:
                self.in_flight -= 1

    @contextlib.asynccontextmanager
    async def _lease(self, ref: str | None) -> AsyncIterator[tuple[int, str]]:
        if ref is None:
            yield -1, self.model_id
            return
        try:
            async with self.pool.alease([ref]) as slots:
                yield slots[0], str(slots.refs[0])
        except (NotFoundError, RefError):
            raise ApiError.model_not_found(ref) from None

    async def _pieces(self, job: Job, stops: list[str], info: dict[str, Any]) -> AsyncIterator[tuple[str, str | None]]:
        tokens: list[int] = []
        sent = ""
        first = True
        last = time.perf_counter()
        while True:
            item = await job.queue.get()
            if isinstance(item, BaseException):
                raise item
            token, finished, reason = item
            now = time.perf_counter()
            self.metrics.latency("ttft" if first else "itl", now - (job.started if first else last))
            first, last = False, now
            self.metrics.tokens.inc()
            if reason != "eos":
                tokens.append(token)
            info["completion_tokens"] = len(tokens)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:  # a stop string: cut there and finish (the scheduler drops the row)
                text, finished, reason = text[:hit], True, "stop"
            if not finished and text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            if len(text) > len(sent):
                yield text[len(sent) :], None
                sent = text
            if finished:
                self.metrics.latency("request", time.perf_counter() - job.started)
                yield "", "stop" if reason in ("eos", "stop") else "length"
                return


def _envelope(rid: str, obj: str, model: str, info: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
    # system_fingerprint: the version the request's ref resolved to at admission (an alias may move later)
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": info.get("version"),
        "choices": [choice],
    }


def _usage(info: dict[str, Any]) -> dict[str, int]:
    p, c = info.get("prompt_tokens", 0), info.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chunk(kind: str, rid: str, model: str, info: dict[str, Any], text: str, reason: str | None) -> dict[str, Any]:
    if kind == "chat":
        choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason}
        return _envelope(rid, "chat.completion.chunk", model, info, choice)
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return _envelope(rid, "text_completion", model, info, choice)


def create_app(
    model: Any,
    tokenizer: Any,
    *,
    pool: AdapterPool,
    keys: Keys | None = None,
    limits: Limits | None = None,
    model_id: str = "base",
    max_batch: int = 32,
    max_prefill_tokens: int = 2048,
) -> Any:
    """The FastAPI app serving `model` (with `pool.bank` in it) and the hub's adapters through `pool`;
    `max_batch` rows decode at once, and one step's prefill of newcomers stays within
    `max_prefill_tokens` (the `Batcher`'s)."""
    srv = Server(model, tokenizer, pool, keys, limits or Limits(), model_id, max_batch, max_prefill_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        srv.draining = True  # drain: no new request; those in flight finish
        for _ in range(600):
            if not srv.in_flight:
                break
            await asyncio.sleep(0.05)
        srv.scheduler.close()

    app = FastAPI(title="model-surgery", lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, e: ApiError) -> JSONResponse:
        srv.metrics.errors.inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers())

    @app.exception_handler(SurgeryError)
    async def surgery_error(request: HttpRequest, e: SurgeryError) -> JSONResponse:
        # the pool or bank refused (a slot in use, no room within the timeout, a delta it cannot serve)
        status = 409 if isinstance(e, PoolError) else 400
        return await api_error(request, ApiError(status, str(e), code="conflict" if status == 409 else "invalid_value"))

    async def body_of(request: HttpRequest, chat: bool) -> tuple[dict[str, Any], Tenant | None]:
        tenant = srv.tenant(request.headers.get("authorization"))
        return parse_completion_request(await read_body(request), chat=chat), tenant

    async def read_body(request: HttpRequest) -> bytes:
        """The body, refused (413) past the limit before it is all in memory."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            srv.limits.check_body(int(declared))
        raw = bytearray()
        async for part in request.stream():
            raw += part
            srv.limits.check_body(len(raw))
        return bytes(raw)

    async def complete(request: HttpRequest, chat: bool) -> Any:
        req, tenant = await body_of(request, chat)
        kind = "chat" if chat else "text"
        kind_obj = "chat.completion.chunk" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        info: dict[str, Any] = {}
        pieces = srv.run(req, tenant, chat, info)
        if req.get("stream"):
            first = await anext(pieces)  # errors before the first token are HTTP errors, not a broken stream

            async def events() -> AsyncIterator[bytes]:
                item: tuple[str, str | None] | None = first
                try:
                    while item is not None:
                        yield f"data: {json.dumps(_chunk(kind, rid, req['model'], info, *item))}\n\n".encode()
                        item = await anext(pieces, None)
                    if req["include_usage"]:  # OpenAI's last chunk: no choices, the counts
                        usage = _envelope(rid, kind_obj, req["model"], info, {}) | {
                            "choices": [],
                            "usage": _usage(info),
                        }
                        yield f"data: {json.dumps(usage)}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                finally:
                    await pieces.aclose()

            return StreamingResponse(events(), media_type="text/event-stream")
        text, reason = "", None
        async for piece, r in pieces:
            text, reason = text + piece, r or reason
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            out = _envelope(rid, "chat.completion", req["model"], info, choice)
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            out = _envelope(rid, "text_completion", req["model"], info, choice)
        return {**out, "usage": _usage(info)}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Any:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models(request: HttpRequest) -> Any:
        tenant = srv.tenant(request.headers.get("authorization"))
        hub = srv.pool.hub
        names = hub.names() if tenant is None else tenant.visible(hub.names())
        data: list[dict[str, Any]] = [{"id": srv.model_id, "object": "model", "owned_by": "base"}]
        for n in names:
            versions = [r.version for r in hub.versions(n)]
            data.append(
                {
                    "id": n,
                    "object": "model",
                    "owned_by": n.split("/")[0],
                    "versions": versions,
                    "aliases": hub.aliases(n),
                }
            )
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Any:
        return {"status": "draining" if srv.draining else "ok", "in_flight": srv.in_flight}

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(
            srv.metrics.render(srv.pool.stats(), srv.batcher), media_type="text/plain; version=0.0.4"
        )

    async def admin(request: HttpRequest) -> dict[str, Any]:
        tenant = srv.tenant(request.headers.get("authorization"))
        if srv.keys is not None and (tenant is None or not tenant.admin):
            raise ApiError.admin_needed()
        body = parse_json_object(await read_body(request) or b"{}")
        if not isinstance(body.get("model"), str):
            raise ApiError.invalid('give the adapter as {"model": "org/name@ref"}', param="model")
        return body

    @app.post("/admin/load")
    async def admin_load(request: HttpRequest) -> Any:
        ref = (await admin(request))["model"]
        futures = srv.pool.prefetch([ref])
        got = await asyncio.wrap_future(futures[0])
        return {"model": ref, "version": str(got)}

    @app.post("/admin/pin")
    async def admin_pin(request: HttpRequest) -> Any:
        ref = (await admin(request))["model"]
        got = await asyncio.to_thread(srv.pool.pin, ref)
        return {"model": ref, "pinned": str(got)}

    @app.post("/admin/unpin")
    async def admin_unpin(request: HttpRequest) -> Any:
        ref = (await admin(request))["model"]
        srv.pool.unpin(ref)
        return {"model": ref, "pinned": False}

    @app.post("/admin/evict")
    async def admin_evict(request: HttpRequest) -> Any:
        ref = (await admin(request))["model"]
        return {"model": ref, "evicted": srv.pool.evict(ref)}

    return app
