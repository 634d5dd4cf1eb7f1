"""Ray Serve: replicas of the OpenAI-compatible server, each loading adapters from the hub through
`@serve.multiplexed` and its own adapter pool (issue 12's "surgery.serving.ray or similar": it lives in
`registry` because it needs the hub and the pool, and `surgery` never imports `registry`).

    from ray import serve
    from registry.ray_serve import deployment

    app = deployment(load_model, hub="/shared/hub", slots=32, num_replicas=2)   # load_model() -> (model, tok)
    handle = serve.run(app)
    out = handle.options(multiplexed_model_id="acme/sql@prod").generate.remote("SELECT", max_tokens=32).result()
    # {"text": ..., "version": "acme/sql@3", "replica": ..., "finish_reason": ..., "usage": {...}}

    curl localhost:8000/v1/completions -H "serve_multiplexed_model_id: acme/sql@prod" \\
         -d '{"model": "acme/sql@prod", "prompt": "SELECT", "max_tokens": 32}'

Each replica runs `model_loader()`, `surgery.serve` (the slot bank), an `AdapterPool` over the hub and
the server of `registry.server.app` (its continuous-batching scheduler and all its routes). Ray routes a
request to a replica that has its multiplexed model id (the adapter ref) loaded; the loader pins the
ref in the replica's pool, and Ray's LRU eviction (`max_num_models_per_replica = slots - 1`) unpins it.
Ray keys its cache by the ref string, so an alias moved since it was loaded is re-pinned at its new
version on the next request; what a request is served is always the version its ref resolves to when it
is admitted (the pool resolves it then and keys slots by digest), so stale weights are never served.
The header only routes: the body's `model` says what is served. `ray` is imported here only.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from registry.errors import NotFoundError, PoolError, RefError, RegistryError
from registry.hub import Hub
from registry.pool import AdapterPool
from registry.refs import Ref
from registry.server.tenancy import ApiError, Keys, parse_completion_request

ModelLoader = Callable[[], tuple[Any, Any]]


class Resident:
    """What Ray's multiplexer holds per adapter id in one replica: a pin of the ref in the pool.
    Ray calls `__del__` when it evicts the id from its LRU; the pin goes then (once)."""

    def __init__(self, pool: AdapterPool, ref: str) -> None:
        self.pool, self.ref, self.released = pool, ref, False
        self.lock = threading.Lock()
        self.version: Ref | None = None
        self.version = pool.pin(ref)  # resolves the ref: NotFoundError / RefError

    def follow(self, now: Ref) -> None:
        """Re-pin at `now` if the ref (an alias) has moved since it was pinned."""
        with self.lock:
            if not self.released and (self.version is None or self.version.digest != now.digest):
                if self.version is not None:
                    self.pool.unpin(self.ref)  # first: a full bank has room for the new version then
                    self.version = None
                self.version = self.pool.pin(self.ref)

    def __del__(self) -> None:
        lock = getattr(self, "lock", None)  # absent if __init__ failed
        if lock is not None:
            with lock:
                self.released = True
                if self.version is not None:
                    self.version = None
                    try:
                        self.pool.unpin(self.ref)
                    except PoolError:  # the pool was closed and forgot its pins: nothing to let go
                        pass


class AdapterServer:
    """One replica (see the module docstring). `generate` is the handle method; `resident` says what the
    replica holds; HTTP goes to the OpenAI-compatible app of `registry.server.app`."""

    def __init__(
        self,
        model_loader: ModelLoader,
        hub: str,
        slots: int,
        max_rank: int,
        targets: Any,
        max_batch: int,
        model_id: str,
        cpu_cache: int,
        keys: str | None,
        limits: Any,
    ) -> None:
        from ray import serve

        import surgery
        from registry.server.app import create_app

        model, tokenizer = model_loader()
        bank = surgery.serve(model, slots=slots, max_rank=max_rank, targets=targets)
        self.pool = AdapterPool(bank, Hub(hub), cpu_cache=cpu_cache)
        self.http = create_app(
            model,
            tokenizer,
            pool=self.pool,
            keys=None if keys is None else Keys.load(keys, base_model=model_id),
            limits=limits,
            model_id=model_id,
            max_batch=max_batch,
        )
        self.server = self.http.state.server
        self.model_id = model_id
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id

        self._held: dict[str, Resident] = {}  # what Ray's multiplexer holds here (released ones drop out)

        async def load(ref: str) -> Resident:
            held = await asyncio.to_thread(Resident, self.pool, ref)
            self._held = {r: h for r, h in self._held.items() if not h.released} | {ref: held}
            return held

        # per instance: the LRU size follows the bank, known only here; one slot stays unpinned for a version
        # an alias moved to between a request's pin and its lease
        self._load = serve.multiplexed(max_num_models_per_replica=max(1, slots - 1))(load)
        self.http.middleware("http")(self._http)

    def __serve_build_asgi_app__(self) -> Any:
        return self.http

    async def _resident(self, ref: str) -> None:
        """Make `ref` resident here through Ray's multiplexer (which registers the id for routing)."""
        held = await self._load(ref)
        now = await asyncio.to_thread(self.pool.hub.resolve, ref)
        await asyncio.to_thread(held.follow, now)

    async def _http(self, request: Any, call_next: Callable[[Any], Any]) -> Any:
        """Loads the adapter the routing header names (tenancy first: a key never loads what it may not
        use); the route itself then serves the body's `model`. Answers carry the replica's id."""
        from fastapi.responses import JSONResponse
        from ray import serve

        ref = serve.get_multiplexed_model_id()
        if ref and ref != self.model_id:
            try:
                self.server.check_model(self.server.tenant(request.headers.get("authorization")), ref)
                try:
                    await self._resident(ref)
                except (NotFoundError, RefError):
                    raise ApiError.model_not_found(ref) from None
                except PoolError as e:  # no slot within the pool's timeout: as the app's routes answer it
                    raise ApiError(409, str(e), code="conflict") from None
            except ApiError as e:
                return JSONResponse(e.body(), status_code=e.status, headers=e.headers())
        response = await call_next(request)
        response.headers["x-surgery-replica"] = self.replica
        return response

    async def generate(
        self,
        prompt: str | list[dict[str, Any]],
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> dict[str, Any]:
        """Complete `prompt` (a string, or chat messages [{"role", "content"}] for the tokenizer's chat
        template) with the adapter `handle.options(multiplexed_model_id=ref)` names (none, or the model
        id: the base). OpenAI's defaults and limits; `version` is what the ref resolved to at admission.
        A ref that does not resolve raises NotFoundError / RefError, a bad argument ApiError."""
        from ray import serve

        ref = serve.get_multiplexed_model_id() or self.model_id
        chat = not isinstance(prompt, str)
        body: dict[str, Any] = {"model": ref, "messages" if chat else "prompt": prompt, "max_tokens": max_tokens}
        body |= {"temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop}
        req = parse_completion_request(json.dumps(body).encode(), chat=chat)
        if ref != self.model_id:
            await self._resident(ref)
        info: dict[str, Any] = {}
        text, reason = "", None
        async for piece, r in self.server.run(req, None, chat, info):
            text, reason = text + piece, r or reason
        p, c = info.get("prompt_tokens", 0), info.get("completion_tokens", 0)
        out = {"text": text, "finish_reason": reason, "version": info["version"], "replica": self.replica}
        return out | {"usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}

    async def resident(self) -> dict[str, Any]:
        """This replica's id, the adapter ids Ray's multiplexer holds here, the pool's resident and pinned versions."""
        stats = self.pool.stats()
        return {
            "replica": self.replica,
            "adapters": sorted(ref for ref, held in self._held.items() if not held.released),
            "pool": sorted(stats["resident"].values()),
            "pinned": stats["pinned"],
        }


def deployment(
    model_loader: ModelLoader,
    *,
    hub: str | Path | Hub,
    slots: int = 32,
    max_rank: int = 16,
    targets: Any = "@linear",
    num_replicas: int = 2,
    max_batch: int = 32,
    model_id: str = "base",
    cpu_cache: int = 64,
    keys: str | Path | None = None,
    limits: Any = None,
    ray_actor_options: dict[str, Any] | None = None,
    name: str = "surgery",
    **options: Any,
) -> Any:
    """The Ray Serve application (`serve.run(app)`): `num_replicas` replicas of `AdapterServer`, each
    running `model_loader()` (a picklable function returning (model, tokenizer)) and serving the hub at
    `hub` (a path every replica can read) with a bank of `slots` slots. `keys` (a keys.toml path) and
    `limits` (`registry.server.tenancy.Limits`) as in `surgery serve`; `options` go to
    `serve.deployment` (autoscaling_config, ...). Up to `max_batch` requests run at once per replica."""
    from ray import serve

    if not callable(model_loader):
        raise RegistryError(f"model_loader must be a function returning (model, tokenizer), got {model_loader!r}")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise RegistryError(f"slots must be an integer >= 1 (the bank's slots per replica), got {slots!r}")
    root = (hub if isinstance(hub, Hub) else Hub(hub)).root.resolve()
    if not root.is_dir():  # checked here: a replica would fail at its first request
        raise NotFoundError(f"no hub at {root}; give the path of a hub folder every replica can read")
    options.setdefault("max_ongoing_requests", max_batch)  # Ray's default (5) would starve the batcher
    if ray_actor_options is not None:
        options["ray_actor_options"] = ray_actor_options
    replica: Any = serve.deployment(serve.ingress()(AdapterServer))
    cls = replica.options(name=name, num_replicas=num_replicas, **options)
    return cls.bind(
        model_loader, str(root), slots, max_rank, targets, max_batch, model_id, cpu_cache,
        None if keys is None else str(keys), limits,
    )  # fmt: skip


__all__ = ["AdapterServer", "Resident", "deployment"]
