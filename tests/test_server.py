"""The OpenAI-compatible server (`registry.server`): completions and chat, streaming by SSE, models,
health, metrics, admin, tenancy and limits, and correctness under load with alias moves and
evictions. Every response is checked against the single-tenant reference: the version its ref
resolved to at admission, applied alone to a copy of the base, decoded greedily."""

from __future__ import annotations

import contextlib
import copy
import json
import random
import threading
import time

import pytest
import torch
from _helpers import greedy_tokens
from models import CharTokenizer, tiny_llama

import registry
import surgery

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from registry.pool import AdapterPool  # noqa: E402
from registry.server.app import create_app  # noqa: E402
from registry.server.tenancy import Keys, Limits  # noqa: E402

TOK = CharTokenizer()
TOKENS = {"acme-key": (["acme/*"], False), "other-key": (["other/*"], False), "root-key": (["*"], True)}


def _lora(template: surgery.Delta, seed: int) -> surgery.Delta:
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(t.shape, generator=g) * 0.3 for k, t in template.tensors.items()}
    return surgery.Delta("lora", "d", dict(template.config), tensors, template.base)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tiny_llama()
    m = copy.deepcopy(base)
    surgery.inject(m, "lora", targets="@attn", r=4)
    template = surgery.delta(m)
    hub = registry.Hub(tmp_path_factory.mktemp("server") / "hub", create=True)
    deltas = {}
    for i in range(15):  # 30 adapters: 15 names x 2 versions
        for v in (1, 2):
            d = _lora(template, 10 * i + v)
            ref = hub.push(d, f"acme/a{i}", alias="prod" if v == 1 else None)
            deltas[str(ref)] = d
    hub.push(_lora(template, 99), "other/x")
    return {"base": base, "hub": hub, "deltas": deltas}


def _reference(world, version: str | None, prompt_ids: list[int], max_tokens: int) -> str:
    delta = world["deltas"][version] if version is not None else None
    return TOK.decode(greedy_tokens(world["base"], delta, prompt_ids, max_tokens))


@pytest.fixture()
def client(world):
    model = copy.deepcopy(world["base"])
    bank = surgery.serve(model, slots=3, max_rank=4, targets="@attn")
    pool = AdapterPool(bank, registry.Hub(world["hub"].root), cpu_cache=4)
    keys = Keys.from_tokens({t: {"namespaces": ns, "admin": admin} for t, (ns, admin) in TOKENS.items()})
    app = create_app(
        model, TOK, pool=pool, keys=keys, limits=Limits(max_tokens=32, max_body_bytes=4096), model_id="tiny"
    )
    with TestClient(app) as c:
        yield c
    pool.close()


def _auth(token: str = "acme-key") -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_completion_equals_single_tenant_reference(world, client):
    for model, version in (("acme/a1@prod", "acme/a1@1"), ("acme/a2@2", "acme/a2@2"), ("tiny", None)):
        r = client.post(
            "/v1/completions",
            headers=_auth(),
            json={"model": model, "prompt": "hello world", "max_tokens": 8, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == _reference(world, version, TOK("hello world")["input_ids"], 8)
        assert body["object"] == "text_completion" and body["model"] == model


def test_streaming_and_chat(world, client):
    with client.stream(
        "POST",
        "/v1/completions",
        headers=_auth(),
        json={"model": "acme/a3@1", "prompt": "abc", "max_tokens": 6, "stream": True, "temperature": 0},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == _reference(world, "acme/a3@1", TOK("abc")["input_ids"], 6)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    msgs = [{"role": "user", "content": "hi there"}]
    r = client.post(
        "/v1/chat/completions",
        headers=_auth(),
        json={"model": "acme/a4@1", "messages": msgs, "max_tokens": 5, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    want = _reference(world, "acme/a4@1", TOK.apply_chat_template(msgs), 5)
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": want}


def test_tenancy_models_and_errors(world, client):
    r = client.post("/v1/completions", json={"model": "acme/a1", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    other = client.post("/v1/completions", headers=_auth("other-key"), json={"model": "acme/a1", "prompt": "x"})
    missing = client.post("/v1/completions", headers=_auth("other-key"), json={"model": "other/nope", "prompt": "x"})
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"]["code"] == missing.json()["error"]["code"] == "model_not_found"
    ids = [m["id"] for m in client.get("/v1/models", headers=_auth("other-key")).json()["data"]]
    assert ids == ["tiny", "other/x"]
    acme = [m["id"] for m in client.get("/v1/models", headers=_auth()).json()["data"]]
    assert "other/x" not in acme and "acme/a0" in acme
    r = client.post("/v1/completions", headers=_auth(), content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/completions", headers=_auth(), json={"model": "acme/a1", "prompt": "x", "max_tokens": 999})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/completions", headers=_auth(), json={"model": "acme/a1", "prompt": "x" * 5000})
    assert r.status_code == 413
    assert client.post("/admin/pin", headers=_auth(), json={"model": "acme/a1@1"}).status_code == 403
    r = client.post("/admin/pin", headers=_auth("root-key"), json={"model": "acme/a1@1"})
    assert r.status_code == 200, r.text
    assert client.get("/health").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    assert "surgery_requests_total" in metrics and "surgery_ttft_seconds_bucket" in metrics
    values = dict(ln.split() for ln in metrics.splitlines() if ln and not ln.startswith("#"))
    assert values["surgery_queue_depth"] == values["surgery_running_requests"] == "0"  # idle: none waits or runs
    assert values["surgery_pool_loads_total"] == "1"  # the admin pin above loaded one version


def test_correct_under_load_with_alias_moves_and_evictions(world, client):
    prompts = ["the cat", "a dog sat", "hello", "zz top"]
    names = [f"acme/a{i}" for i in range(15)]
    hub = world["hub"]
    expect: dict[tuple, str] = {}
    errors: list[str] = []
    evicted: list[bool] = []
    lock = threading.Lock()

    def want(version: str, p: int) -> str:
        key = (version, p)
        with lock:
            if key not in expect:
                expect[key] = _reference(world, version, TOK(prompts[p])["input_ids"], 4)
            return expect[key]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(100):
            name, p = rng.choice(names), rng.randrange(len(prompts))
            ref = f"{name}@prod" if rng.random() < 0.5 else f"{name}@{rng.choice((1, 2))}"
            r = client.post(
                "/v1/completions",
                headers=_auth(),
                json={"model": ref, "prompt": prompts[p], "max_tokens": 4, "temperature": 0},
            )
            if r.status_code != 200:
                errors.append(f"{ref}: {r.status_code} {r.text}")
                continue
            body = r.json()
            version = body["system_fingerprint"]  # the version the ref resolved to at admission
            if body["choices"][0]["text"] != want(version, p):
                errors.append(f"{ref} -> {version}: {body['choices'][0]['text']!r}")

    workers_done = threading.Event()
    pool = client.app.state.server.pool

    def mover() -> None:
        rng = random.Random(0)
        while not workers_done.is_set():  # move aliases and evict what is resident, all through the run
            hub.alias(rng.choice(names), "prod", version=rng.choice((1, 2)))
            resident = list(pool.stats()["resident"].values())
            if resident:
                r = client.post("/admin/evict", headers=_auth("root-key"), json={"model": rng.choice(resident)})
                if r.status_code not in (200, 409):  # 409: a request holds it now
                    errors.append(f"evict: {r.status_code} {r.text}")
                evicted.append(r.status_code == 200 and r.json()["evicted"])
            time.sleep(0.01)

    workers = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    moving = threading.Thread(target=mover)
    for t in (*workers, moving):
        t.start()
    for t in workers:
        t.join(240)
    workers_done.set()
    moving.join(30)
    assert not any(t.is_alive() for t in (*workers, moving))
    assert errors == []
    assert any(evicted)  # versions really left their slots during the run


def test_usage_chunk_and_ignore_eos(world, client):
    body = {"model": "acme/a5@1", "prompt": "abc", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with client.stream(
        "POST",
        "/v1/completions",
        headers=_auth(),
        json=body | {"stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 12,  # eos does not end it: all 12 tokens
        "total_tokens": 16,
    }
    model = copy.deepcopy(world["base"])
    surgery.apply(model, world["deltas"]["acme/a5@1"])
    with torch.no_grad():
        out = model.generate(
            torch.tensor([TOK("abc")["input_ids"]]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == TOK.decode(out[0, 4:].tolist())
    r = client.post("/v1/completions", headers=_auth(), json=body | {"ignore_eos": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos"


def test_shutdown_drains_requests_in_flight(world):
    """A real uvicorn server told to exit while a stream is running: the listening socket closes to new
    requests, the stream still ends complete and equal to the reference, then the scheduler stops."""
    import urllib.error
    import urllib.request

    model = copy.deepcopy(world["base"])
    model.register_forward_pre_hook(lambda *_: time.sleep(0.02))  # a step of 20 ms: the stream lasts ~1 s
    pool = AdapterPool(surgery.serve(model, slots=2, max_rank=4, targets="@attn"), registry.Hub(world["hub"].root))
    app = create_app(model, TOK, pool=pool, limits=Limits(max_tokens=64), model_id="tiny")
    with _uvicorn(app) as (server, thread, port):
        body = {"model": "acme/a6@2", "prompt": "drain", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
        url = f"http://127.0.0.1:{port}/v1/completions"

        def post(body: dict) -> urllib.request.Request:
            return urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})

        lines: list[str] = []
        with urllib.request.urlopen(post(body | {"stream": True}), timeout=60) as r:
            for raw in r:  # the SSE lines as they arrive
                if raw.strip():
                    if not lines:
                        server.should_exit = True  # the first token is out: shut down now
                    if len(lines) == 30:  # the shutdown is under way: no new connection, this stream goes on
                        with pytest.raises(urllib.error.URLError):
                            urllib.request.urlopen(post(body), timeout=2)
                    lines.append(raw.decode().strip())
        assert lines[-1] == "data: [DONE]"
        text = "".join(json.loads(ln.removeprefix("data: "))["choices"][0]["text"] for ln in lines[:-1])
        single = copy.deepcopy(world["base"])
        surgery.apply(single, world["deltas"]["acme/a6@2"])
        with torch.no_grad():
            ids = TOK("drain")["input_ids"]
            out = single.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, eos_token_id=None)
        assert text == TOK.decode(out[0, len(ids) :].tolist())
        thread.join(30)
        assert not thread.is_alive()
        assert not app.state.server.scheduler.thread.is_alive()  # the lifespan's drain stopped it
    pool.close()


@contextlib.contextmanager
def _uvicorn(app):
    """A real uvicorn server of `app` on a free port of 127.0.0.1, in a thread; stopped on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield server, thread, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)


def test_the_openai_client(world):
    """The `openai` package's client against the server: chat and completions, streamed and not."""
    openai = pytest.importorskip("openai")
    model = copy.deepcopy(world["base"])
    pool = AdapterPool(surgery.serve(model, slots=2, max_rank=4, targets="@attn"), registry.Hub(world["hub"].root))
    keys = Keys.from_tokens({"acme-key": {"namespaces": ["acme/*"]}})
    app = create_app(model, TOK, pool=pool, keys=keys, limits=Limits(max_tokens=32), model_id="tiny")
    with _uvicorn(app) as (_, _, port):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="acme-key", max_retries=0)
        msgs = [{"role": "user", "content": "hi there"}]
        want = _reference(world, "acme/a7@1", TOK.apply_chat_template(msgs), 6)
        stream = client.chat.completions.create(
            model="acme/a7@1", messages=msgs, max_tokens=6, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
        done = client.completions.create(model="acme/a7@1", prompt="hello world", max_tokens=6, temperature=0)
        assert done.choices[0].text == _reference(world, "acme/a7@1", TOK("hello world")["input_ids"], 6)
        assert done.system_fingerprint == "acme/a7@1" and done.usage.completion_tokens <= 6
        assert [m.id for m in client.models.list()][:2] == ["tiny", "acme/a0"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other/x", prompt="x", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    pool.close()
