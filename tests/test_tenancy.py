"""registry.server.tenancy: API keys, namespaces, OpenAI error bodies, limits, the per-key gate and
request validation of the multi-tenant server (issue 12, part 3), without a web stack."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading

import pytest
import torch

import registry
import surgery
from registry import RegistryError
from registry.server.tenancy import (
    ApiError,
    ConcurrencyGate,
    Keys,
    KeysFileError,
    Limits,
    ServerConfigError,
    Tenant,
    hash_token,
    parse_completion_request,
    parse_json_object,
)

BASE = "tiny/llama-base"
ACME, OTHER, OPS = "tok-acme-1234", "tok-other-5678", "tok-ops-9999"


def _keys() -> Keys:
    return Keys.from_tokens(
        {
            ACME: ["acme/*"],
            OTHER: {"namespaces": ["other/x", "shared/*"], "name": "other"},
            OPS: {"namespaces": ["*"], "admin": True, "name": "ops"},
        },
        base_model=BASE,
    )


def _raises(status: int, code: str | None, param: str | None = None, type: str = "invalid_request_error"):
    """Checks an ApiError's status, and its OpenAI body's type, code and param."""

    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(ApiError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            self.ctx.__exit__(*exc)
            e = self.info.value
            err = e.body()["error"]
            assert (e.status, err["type"], err["code"], err["param"]) == (status, type, code, param), err
            assert set(err) == {"message", "type", "param", "code"} and err["message"] == str(e)
            json.dumps(e.body())
            return True

    return Check()


# ----------------------------------------------------------------------------- keys.toml


def _write(tmp_path, text: str):
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_keys_file_is_parsed_and_tokens_authenticate(tmp_path):
    acme, ops = hash_token(ACME), hash_token(OPS)
    assert acme == hashlib.sha256(ACME.encode()).hexdigest()
    path = _write(
        tmp_path,
        f'[[key]]\nsha256 = "{acme.upper()}"\nnamespaces = ["acme/*"]\n\n'
        f'[[key]]\nsha256 = "{ops}"\nnamespaces = ["*"]\nadmin = true\nname = "ops"\n',
    )
    keys = Keys.load(path, base_model=BASE)
    assert keys.configured and len(keys) == 2
    assert keys.authenticate(f"Bearer {ACME}") == Tenant(acme[:12], ("acme/*",), False, BASE)
    assert keys.authenticate(f"  bearer   {OPS} ") == Tenant("ops", ("*",), True, BASE)
    assert keys.listen_host("0.0.0.0") == ("0.0.0.0", None)


def _table(**fields) -> str:
    return "[[key]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())


GOOD = {"sha256": hash_token("a"), "namespaces": ["acme/*"]}


@pytest.mark.parametrize(
    "second, words",
    [
        ({**GOOD, "sha256": hash_token("b"), "role": "x"}, ["#2", "'role'", "unknown field"]),
        ({"namespaces": ["acme/*"]}, ["#2", "'sha256'", "64-hex"]),
        ({**GOOD, "sha256": "tok-plain-token"}, ["#2", "'sha256'", "never the token itself"]),
        ({**GOOD, "sha256": hash_token("a")[:63] + "g"}, ["#2", "'sha256'"]),
        (GOOD, ["#2", "'sha256'", "same key"]),
        ({"sha256": hash_token("b"), "namespaces": []}, ["#2", "'namespaces'", "non-empty list"]),
        ({"sha256": hash_token("b"), "namespaces": "acme/*"}, ["#2", "'namespaces'", "list"]),
        ({"sha256": hash_token("b")}, ["#2", "'namespaces'"]),
        ({"sha256": hash_token("b"), "namespaces": ["acme"]}, ["#2", "'namespaces'", "'acme'", "acme/*"]),
        ({"sha256": hash_token("b"), "namespaces": ["acme/../x"]}, ["#2", "'namespaces'", "acme/../x"]),
        ({"sha256": hash_token("b"), "namespaces": ["Acme/*"]}, ["#2", "'namespaces'"]),
        ({"sha256": hash_token("b"), "namespaces": ["a/b/c"]}, ["#2", "'namespaces'"]),
        ({"sha256": hash_token("b"), "namespaces": ["a/*", "a/*"]}, ["#2", "'namespaces'", "twice"]),
        ({**GOOD, "sha256": hash_token("b"), "admin": "true"}, ["#2", "'admin'", "true or false"]),
        ({**GOOD, "sha256": hash_token("b"), "name": 5}, ["#2", "'name'", "printable"]),
        ({**GOOD, "sha256": hash_token("b"), "name": ""}, ["#2", "'name'"]),
        ({**GOOD, "sha256": hash_token("b"), "name": "first"}, ["#2", "'name'", "'first'", "unique"]),
    ],
)
def test_keys_file_errors_name_the_table_and_the_field(tmp_path, second, words):
    path = _write(tmp_path, _table(**GOOD, name="first") + _table(**second))
    with pytest.raises(KeysFileError) as info:
        Keys.load(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RegistryError)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("", ["no [[key]] tables"]),
        ("[key]\nsha256 = 'x'\n", ["no [[key]] tables"]),
        ("key = [1]\n", ["#1", "must be a table"]),
        (_table(**GOOD) + "[server]\nport = 1\n", ["unknown top-level", "server"]),
        ("[[key]\nsha256 =", ["not valid TOML"]),
        ("[[key]]\nsha256 = 'a'\nsha256 = 'b'\n", ["not valid TOML"]),
    ],
)
def test_malformed_keys_files(tmp_path, text, words):
    with pytest.raises(KeysFileError) as info:
        Keys.load(_write(tmp_path, text))
    for w in words:
        assert w in str(info.value)


def test_a_missing_keys_file_and_bad_tokens_are_refused(tmp_path):
    with pytest.raises(KeysFileError, match="cannot read the keys file"):
        Keys.load(tmp_path / "nope.toml")
    with pytest.raises(KeysFileError, match="'admin'"):
        Keys.from_tokens({"t": {"namespaces": ["*"], "admin": 1}})


# ----------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", f"Basic {ACME}", ACME])
def test_a_missing_or_malformed_authorization_is_401(header):
    with _raises(401, "invalid_api_key") as info:
        _keys().authenticate(header)
    assert "Authorization: Bearer" in str(info.value)
    assert info.value.headers() == {"WWW-Authenticate": "Bearer"}


def test_an_unknown_key_is_401_without_echoing_it():
    with _raises(401, "invalid_api_key") as info:
        _keys().authenticate("Bearer tok-stolen-0000")
    assert "Incorrect API key" in str(info.value) and "stolen" not in json.dumps(info.value.body())


def test_every_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = _keys()
    for token, name in ((ACME, hash_token(ACME)[:12]), (OPS, "ops")):
        calls.clear()
        assert keys.authenticate(f"Bearer {token}").name == name
        # one comparison per key, the match wherever it is: no early exit to time
        assert len(calls) == 3 and {a for a, _ in calls} == {hash_token(token).encode()}
    calls.clear()
    with pytest.raises(ApiError):
        keys.authenticate("Bearer nobody")
    assert len(calls) == 3


def test_open_mode_lets_everyone_in_on_localhost_only():
    keys = Keys.open(BASE)
    assert not keys.configured and keys.authenticate(None) is None and keys.authenticate("Bearer x") is None
    host, notice = keys.listen_host("0.0.0.0")
    assert host == "127.0.0.1" and "without authentication" in notice and "--keys" in notice and "0.0.0.0" in notice
    host, notice = keys.listen_host("::1")
    assert host == "::1" and "without authentication" in notice
    local = Tenant.local(BASE)
    assert local.admin and local.may_use("anyone/x@3") and local.may_use(BASE)


# ----------------------------------------------------------------------------- namespaces


def test_a_key_reaches_only_its_namespaces():
    acme = _keys().authenticate(f"Bearer {ACME}")
    assert acme.may_use("acme/sql") and acme.may_use("acme/sql@prod") and acme.may_use("acme/sql@sha256:abcd")
    assert acme.may_use(BASE)  # the base model is everyone's
    for foreign in ("other/x", "other/x@3", "acmex/sql", "acme/../other/x", "acme/sql/x", "ACME/sql", "", 5, None):
        assert not acme.may_use(foreign), foreign
    names = ["other/x", "acme/b", "shared/y", "acme/a", BASE]
    assert acme.visible(names) == ["acme/b", "acme/a", BASE]
    other = _keys().authenticate(f"Bearer {OTHER}")
    assert other.visible(names) == ["other/x", "shared/y", BASE] and not other.may_use("other/xy")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))  # no transformers: the hub only needs a delta
    surgery.inject(model, "lora", targets="0", r=2)
    hub = registry.Hub(tmp_path_factory.mktemp("tenancy") / "hub")
    for name in ("acme/sql", "other/x", "other/sql"):
        hub.push(model, name, alias="prod")
    return hub


def test_foreign_missing_and_malformed_models_get_the_same_404(hub):
    acme = _keys().authenticate(f"Bearer {ACME}")
    ref = acme.check_model("acme/sql@prod", hub.resolve)
    assert ref == hub.resolve("acme/sql@1")
    assert acme.check_model(BASE) is None
    with pytest.raises(registry.NotFoundError, match="other/x"):
        hub.resolve("acme/x")  # the hub's own message names another tenant's delta...
    bodies = {}
    for model in ("other/x", "other/x@prod", "acme/x", "acme/sql@9", "acme/sql@nope", "acme/../other/x"):
        with _raises(404, "model_not_found") as info:
            acme.check_model(model, hub.resolve)
        assert "does not exist or you do not have access to it" in str(info.value)
        bodies[model] = json.dumps(info.value.body()).replace(model, "<model>")
    assert len(set(bodies.values())) == 1 and "other/sql" not in bodies["acme/x"]  # ...ours names none
    ops = _keys().authenticate(f"Bearer {OPS}")
    assert ops.check_model("other/x@prod", hub.resolve).name == "other/x"


def test_admin_endpoints_need_an_admin_key():
    _keys().authenticate(f"Bearer {OPS}").require_admin()
    with _raises(403, "insufficient_permissions"):
        _keys().authenticate(f"Bearer {ACME}").require_admin()


# ----------------------------------------------------------------------------- errors and limits


def test_error_helpers_give_openai_bodies():
    with _raises(413, "request_too_large"):
        Limits(max_body_bytes=100).check_body(101)
    Limits(max_body_bytes=100).check_body(100)
    with _raises(429, "rate_limit_exceeded", type="requests") as info:
        raise ApiError.too_many_requests(3, retry_after_s=2)
    assert info.value.headers() == {"Retry-After": "2"} and "at most 3" in str(info.value)
    with _raises(503, "server_draining", type="server_error") as info:
        raise ApiError.draining()
    assert "Retry-After" in info.value.headers()
    with _raises(400, "invalid_value", "model"):
        raise ApiError.invalid("give an adapter ref", param="model")


def test_limits_refuse_too_many_tokens_and_long_prompts():
    limits = Limits(max_tokens=64, max_prompt_tokens=100, max_body_bytes=1000)
    chat = {"model": "m", "messages": [], "max_tokens": None}
    assert limits.check_request(chat, 100) == 64
    assert limits.check_request({**chat, "max_tokens": 10}, 5, body_bytes=1000) == 10
    with _raises(400, "invalid_value", "max_tokens") as info:
        limits.check_request({**chat, "max_tokens": 65}, 5)
    assert "at most 64" in str(info.value) and "65" in str(info.value)
    with _raises(400, "context_length_exceeded", "messages") as info:
        limits.check_request(chat, 101)
    assert "101" in str(info.value) and "100" in str(info.value)
    with _raises(400, "context_length_exceeded", "prompt"):
        limits.check_request({"model": "m", "prompt": "x"}, 101)
    with _raises(413, "request_too_large"):
        limits.check_request(chat, 5, body_bytes=1001)
    for bad in (0, -1, True, 2.5, "8"):
        with pytest.raises(ServerConfigError, match="max_concurrent_per_key"):
            Limits(max_concurrent_per_key=bad)
        with pytest.raises(ServerConfigError, match="max_per_key"):
            ConcurrencyGate(bad)


# ----------------------------------------------------------------------------- concurrency gate


def test_the_gate_admits_exactly_the_limit_of_8_threads_at_once():
    gate, acme, other = ConcurrencyGate(3), Tenant("acme", ("acme/*",)), Tenant("other", ("other/*",))
    tried, done = threading.Barrier(8), threading.Barrier(8)
    results: list[int] = []

    def call():
        tried.wait()
        try:
            with gate.acquire(acme):
                results.append(200)
                done.wait()  # holds its permit until every thread has tried
        except ApiError as e:
            results.append(e.status)
            done.wait()

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] * 3 + [429] * 5
    assert gate.in_flight() == 0
    held = [gate.acquire(acme) for _ in range(3)]
    gate.acquire(other).release()  # another key has its own budget
    with _raises(429, "rate_limit_exceeded", type="requests"):
        gate.acquire(acme)
    held[0].release()
    held[0].release()  # idempotent: frees one permit, not two
    assert gate.in_flight(acme) == 2
    gate.acquire(acme)
    with pytest.raises(ApiError):
        gate.acquire(acme)


def _round_of_8(gate: ConcurrencyGate, tenant: Tenant) -> tuple[dict[int, int], int]:
    """8 threads try at once; the admitted ones hold their permit until all 8 tried.
    Returns the statuses counted and the most permits held at one time."""
    lock, tried, all_tried = threading.Lock(), [0], threading.Event()
    inside, peak, outcomes = [0], [0], {200: 0, 429: 0}

    def attempt() -> None:
        try:
            permit = gate.acquire(tenant)
        except ApiError as e:
            status, permit = e.status, None
        else:
            status = 200
        with lock:
            outcomes[status] += 1
            if permit is not None:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            tried[0] += 1
            if tried[0] == 8:
                all_tried.set()
        if permit is not None:
            all_tried.wait(10)
            with lock:
                inside[0] -= 1
            permit.release()

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return outcomes, peak[0]


def test_the_gate_never_admits_more_than_the_limit_under_8_threads():
    """Exactly the limit get in each round, the rest get 429, whatever the interleaving."""
    gate, tenant = ConcurrencyGate(2), Tenant("t", ("*",))
    for _ in range(25):
        assert _round_of_8(gate, tenant) == ({200: 2, 429: 6}, 2)
        assert gate.in_flight() == 0


def test_the_gate_in_asyncio_tasks_and_draining():
    gate, tenant = ConcurrencyGate(2), Tenant("t", ("*",))

    async def one(started: asyncio.Event) -> int:
        try:
            async with gate.acquire(tenant):
                await started.wait()
                return 200
        except ApiError as e:
            return e.status

    async def main() -> list[int]:
        started = asyncio.Event()
        tasks = [asyncio.create_task(one(started)) for _ in range(5)]
        await asyncio.sleep(0.01)
        started.set()
        return await asyncio.gather(*tasks)

    assert sorted(asyncio.run(main())) == [200, 200, 429, 429, 429]
    permit = gate.acquire(None)  # open mode counts as one caller
    gate.drain()
    with _raises(503, "server_draining", type="server_error"):
        gate.acquire(tenant)
    assert not gate.wait_idle(timeout=0.01)
    threading.Timer(0.05, permit.release).start()
    assert gate.wait_idle(timeout=5)


# ----------------------------------------------------------------------------- request bodies


def _body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_a_chat_request_is_normalised():
    raw = _body(
        model="acme/sql@prod",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
        ],
        max_completion_tokens=7,
        temperature=0,
        stop="\n",
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
        user="u-1",
        n=1,
        logprobs=False,
        frequency_penalty=0,
        tools=[],
        some_future_field={"x": 1},
    )
    assert parse_completion_request(raw, chat=True) == {
        "model": "acme/sql@prod",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}],
        "max_tokens": 7,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": ["\n"],
        "seed": 3,
        "n": 1,
        "stream": True,
        "include_usage": True,
        "ignore_eos": False,
    }


def test_a_completion_request_is_normalised():
    got = parse_completion_request(_body(model="m", prompt=["once"], max_tokens=5, top_p=0.5, stop=["a", "b"]), False)
    assert got == {
        "model": "m",
        "prompt": "once",
        "max_tokens": 5,
        "temperature": 1.0,
        "top_p": 0.5,
        "stop": ["a", "b"],
        "seed": None,
        "n": 1,
        "stream": False,
        "include_usage": False,
        "ignore_eos": False,
    }


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "raw, chat, code, param",
    [
        (b"{not json", True, None, None),
        (b'{"model": "m", "temperature": NaN, "messages": []}', True, None, None),
        (b"[" * 100_000 + b"]" * 100_000, True, None, None),
        (b'{"model": "\xff"}', True, None, None),
        (b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}", True, None, None),
        (b"[1, 2]", True, None, None),
        (b"", False, None, None),
        (_body(messages=MSG), True, "missing_required_parameter", "model"),
        (_body(model=3, messages=MSG), True, "invalid_type", "model"),
        (_body(model="", messages=MSG), True, "invalid_type", "model"),
        (_body(model="m"), True, "missing_required_parameter", "messages"),
        (_body(model="m", messages="hi"), True, "invalid_type", "messages"),
        (_body(model="m", messages=[]), True, "invalid_value", "messages"),
        (_body(model="m", messages=["hi"]), True, "invalid_type", "messages[0]"),
        (_body(model="m", messages=[{"content": "x"}]), True, "missing_required_parameter", "messages[0].role"),
        (
            _body(model="m", messages=[*MSG, {"role": "tool", "content": "x"}]),
            True,
            "invalid_value",
            "messages[1].role",
        ),
        (_body(model="m", messages=[{"role": "user"}]), True, "missing_required_parameter", "messages[0].content"),
        (_body(model="m", messages=[{"role": "user", "content": 5}]), True, "invalid_type", "messages[0].content"),
        (
            _body(model="m", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            True,
            "invalid_value",
            "messages[0].content[0]",
        ),
        (_body(model="m", messages=MSG), False, "missing_required_parameter", "prompt"),
        (_body(model="m", prompt=["a", "b"]), False, "invalid_value", "prompt"),
        (_body(model="m", prompt=[1, 2]), False, "invalid_type", "prompt"),
        (_body(model="m", messages=MSG, max_tokens=0), True, "invalid_value", "max_tokens"),
        (_body(model="m", messages=MSG, max_tokens="5"), True, "invalid_type", "max_tokens"),
        (_body(model="m", messages=MSG, max_tokens=True), True, "invalid_type", "max_tokens"),
        (_body(model="m", messages=MSG, max_tokens=2.5), True, "invalid_type", "max_tokens"),
        (
            _body(model="m", messages=MSG, max_tokens=5, max_completion_tokens=6),
            True,
            "invalid_value",
            "max_completion_tokens",
        ),
        (_body(model="m", messages=MSG, max_completion_tokens=-1), True, "invalid_value", "max_completion_tokens"),
        (_body(model="m", messages=MSG, temperature=2.5), True, "invalid_value", "temperature"),
        (_body(model="m", messages=MSG, temperature="hot"), True, "invalid_type", "temperature"),
        (_body(model="m", messages=MSG, top_p=1.5), True, "invalid_value", "top_p"),
        (_body(model="m", messages=MSG, top_p=-0.1), True, "invalid_value", "top_p"),
        (_body(model="m", messages=MSG, stop=list("abcde")), True, "invalid_value", "stop"),
        (_body(model="m", messages=MSG, stop=[1]), True, "invalid_type", "stop"),
        (_body(model="m", messages=MSG, stop=""), True, "invalid_value", "stop"),
        (_body(model="m", messages=MSG, seed=1.5), True, "invalid_type", "seed"),
        (_body(model="m", messages=MSG, seed=2**63), True, "invalid_value", "seed"),
        (_body(model="m", messages=MSG, n=2), True, "invalid_value", "n"),
        (_body(model="m", messages=MSG, n=0), True, "invalid_value", "n"),
        (_body(model="m", messages=MSG, stream="yes"), True, "invalid_type", "stream"),
        (_body(model="m", messages=MSG, stream_options=[]), True, "invalid_type", "stream_options"),
        (
            _body(model="m", messages=MSG, stream_options={"include_usage": 1}),
            True,
            "invalid_type",
            "stream_options.include_usage",
        ),
        (_body(model="m", messages=MSG, logprobs=True), True, "unsupported_parameter", "logprobs"),
        (_body(model="m", prompt="x", best_of=3), False, "unsupported_parameter", "best_of"),
        (_body(model="m", messages=MSG, tools=[{"type": "function"}]), True, "unsupported_parameter", "tools"),
        (_body(model="m", messages=MSG, presence_penalty=0.5), True, "unsupported_parameter", "presence_penalty"),
    ],
)
def test_bad_requests_get_openai_400s(raw, chat, code, param):
    with _raises(400, code, param) as info:
        parse_completion_request(raw, chat=chat)
    if code is None:
        assert "could not parse the JSON body" in str(info.value)
    if param is not None:
        assert f"'{param}'" in str(info.value)


def test_n_above_one_says_so_and_json_objects_are_parsed_for_admin_bodies():
    with pytest.raises(ApiError, match="only n=1 is supported"):
        parse_completion_request(_body(model="m", prompt="x", n=4), chat=False)
    assert parse_json_object(b'{"model": "acme/sql@prod"}') == {"model": "acme/sql@prod"}
    with _raises(400, None) as info:
        parse_json_object(b'"acme/sql"')
    assert "string, not an object" in str(info.value)


def test_api_errors_pickle_whole():
    """Across processes (Ray replicas) an ApiError arrives with its status, body and headers."""
    import pickle

    e = ApiError(429, "slow down", code="rate_limit_exceeded", headers={"Retry-After": "1"})
    got = pickle.loads(pickle.dumps(e))
    assert (type(got), got.status, got.body(), got.headers()) == (ApiError, 429, e.body(), {"Retry-After": "1"})
