"""Who may call the server and what a request may ask for (issue 12): API keys hashed at rest and
mapped to adapter namespaces, OpenAI-style error bodies, request limits, a per-key concurrency gate
and the validation of `/v1/completions` and `/v1/chat/completions` bodies.

Pure Python, no web stack: the HTTP layer turns an `ApiError` into `status`, `headers` and `body()`.

    keys = Keys.load("keys.toml", base_model="HuggingFaceTB/SmolLM2-135M")
    tenant = keys.authenticate(request.headers.get("authorization")) or Tenant.local(base_model)
    req = parse_completion_request(raw, chat=True)
    ref = tenant.check_model(req["model"], hub.resolve)      # 404 for missing and foreign alike
    with gate.acquire(tenant):                               # 429 beyond the per-key limit
        ...
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from registry.errors import NotFoundError, RefError, RegistryError
from registry.refs import parse

T = TypeVar("T")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_GLOB_PART = re.compile(r"[a-z0-9._*?-]+")
_KEY_FIELDS = ("sha256", "namespaces", "admin", "name")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServerConfigError(RegistryError, ValueError):
    """The server's configuration (limits, keys) is malformed: the server must not start."""


class KeysFileError(ServerConfigError):
    """keys.toml is unreadable or malformed; the message names the `[[key]]` table and the field."""


class ApiError(RegistryError):
    """A request is refused. `status` is the HTTP status, `headers` extra response headers (Retry-After,
    WWW-Authenticate) and `body()` the OpenAI error JSON. Never carries a token or another tenant's names."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self._headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (Ray, multiprocessing): __init__ takes the status first
        return type(self), (self.status, self.message, self.type, self.code, self.param, self._headers)

    @classmethod
    def bad_json(cls, why: str) -> ApiError:
        return cls(400, f"We could not parse the JSON body of your request ({why}). Send a JSON object.")

    @classmethod
    def missing(cls, param: str) -> ApiError:
        return cls(400, f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param)

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
        return cls(400, f"Invalid '{param}': {message}" if param else message, code=code, param=param)

    @classmethod
    def invalid_api_key(cls, message: str) -> ApiError:
        return cls(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @classmethod
    def admin_needed(cls) -> ApiError:
        return cls(403, "This endpoint needs an admin API key.", code="insufficient_permissions")

    @classmethod
    def model_not_found(cls, model: object) -> ApiError:
        shown = str(model) if len(str(model)) <= 200 else str(model)[:197] + "..."
        return cls(404, f"The model `{shown}` does not exist or you do not have access to it.", code="model_not_found")

    @classmethod
    def too_large(cls, nbytes: int, limit: int) -> ApiError:
        return cls(
            413, f"The request body is {nbytes} bytes; this server accepts at most {limit}.", code="request_too_large"
        )

    @classmethod
    def too_many_requests(cls, limit: int, retry_after_s: int = 1) -> ApiError:
        return cls(
            429,
            f"Too many concurrent requests for this API key (at most {limit}); retry when one has finished.",
            type="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after_s)},
        )

    @classmethod
    def draining(cls, retry_after_s: int = 5) -> ApiError:
        return cls(
            503,
            "The server is shutting down and takes no new requests; retry on another replica or later.",
            type="server_error",
            code="server_draining",
            headers={"Retry-After": str(retry_after_s)},
        )


def hash_token(token: str) -> str:
    """The hex sha256 of an API token: what keys.toml stores instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """An authenticated caller: the adapter namespaces (globs on 'org/name') it may use, and whether
    it may call admin endpoints. `base_model` (the served base's id) is always allowed."""

    name: str
    namespaces: tuple[str, ...]
    admin: bool = False
    base_model: str | None = None

    @classmethod
    def local(cls, base_model: str | None = None) -> Tenant:
        """The caller in open mode (no keys file, localhost only): every namespace, admin."""
        return cls("local", ("*",), True, base_model)

    def may_use(self, model: object) -> bool:
        """Whether `model` (the base's id, or a ref 'org/name[@...]') is in this tenant's namespaces.
        A malformed ref is never allowed, so '..' or extra '/' cannot slip through a glob."""
        if self.base_model is not None and model == self.base_model:
            return True
        try:
            name = parse(model).name
        except RefError:
            return False
        return any(fnmatchcase(name, glob) for glob in self.namespaces)

    def visible(self, names: Iterable[str]) -> list[str]:
        """The names (in their order) this tenant may see, e.g. for `/v1/models`."""
        return [n for n in names if self.may_use(n)]

    def check_model(self, model: object, resolve: Callable[[str], T] | None = None) -> T | None:
        """`resolve(model)` (e.g. `hub.resolve`) if this tenant may use `model`, else a 404. A ref that
        is malformed or does not resolve gets the same 404 as a foreign one: the hub's own message
        names other deltas, so it never reaches the caller. Without `resolve`, only the check."""
        if not isinstance(model, str) or not self.may_use(model):
            raise ApiError.model_not_found(model)
        if resolve is None:
            return None
        try:
            return resolve(model)
        except (NotFoundError, RefError):
            raise ApiError.model_not_found(model) from None

    def require_admin(self) -> None:
        if not self.admin:
            raise ApiError.admin_needed()


class Keys:
    """The API keys of a server: `Keys.load(path)` from keys.toml, `Keys.open()` without one (every
    request is let in; `listen_host` keeps the server on localhost)."""

    def __init__(self, tenants: Mapping[str, Tenant] | None, base_model: str | None = None) -> None:
        self._by_digest = dict(tenants) if tenants is not None else None  # None: open mode
        self.base_model = base_model

    @classmethod
    def open(cls, base_model: str | None = None) -> Keys:
        return cls(None, base_model)

    @classmethod
    def load(cls, path: str | Path, base_model: str | None = None) -> Keys:
        """Parse keys.toml strictly: one `[[key]]` table per key with `sha256` (hex digest of the token),
        `namespaces` (globs like "acme/*"), optional `admin` (bool) and `name` (str)."""
        try:
            import tomllib  # the stdlib's from Python 3.11
        except ImportError:
            raise KeysFileError("reading keys.toml needs Python 3.11 or newer (tomllib)") from None
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise KeysFileError(f"cannot read the keys file {str(path)!r}: {e.strerror or e}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise KeysFileError(f"{path}: not valid TOML ({e})") from None
        extra = sorted(set(doc) - {"key"})
        if extra:
            raise KeysFileError(f"{path}: unknown top-level entries {extra}; the file holds only [[key]] tables")
        tables = doc.get("key")
        if not isinstance(tables, list) or not tables:
            raise KeysFileError(
                f'{path}: no [[key]] tables; write one per key: [[key]] sha256 = "<hex>" namespaces = ["acme/*"]'
            )
        return cls(_tenants(tables, str(path), base_model), base_model)

    @classmethod
    def from_tokens(cls, tokens: Mapping[str, Any], base_model: str | None = None) -> Keys:
        """Keys from plain tokens (tests, demos): {token: ["acme/*"]} or {token: {"namespaces": [...],
        "admin": True, "name": "ops"}}; checked like a keys file."""
        tables = [
            {**(spec if isinstance(spec, Mapping) else {"namespaces": spec}), "sha256": hash_token(token)}
            for token, spec in tokens.items()
        ]
        return cls(_tenants(tables, "from_tokens", base_model), base_model)

    @property
    def configured(self) -> bool:
        """False in open mode (no keys file)."""
        return self._by_digest is not None

    def __len__(self) -> int:
        return len(self._by_digest or ())

    def listen_host(self, requested: str) -> tuple[str, str | None]:
        """The address to bind and a notice to print. Without keys the server listens on localhost only."""
        if self.configured:
            return requested, None
        host = requested if requested in _LOOPBACK else "127.0.0.1"
        moved = "" if host == requested else f" (not {requested})"
        return host, (
            f"no --keys: serving without authentication, on {host} only{moved}; "
            "pass --keys keys.toml to require API keys and listen on other addresses"
        )

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of an `Authorization: Bearer <token>` header; None in open mode (the caller
        decides, see `Tenant.local`); 401 if the header is missing, malformed or the key unknown.
        The digest is compared with every key in constant time, whichever matches."""
        if self._by_digest is None:
            return None
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if not authorization or scheme.lower() != "bearer" or not token:
            raise ApiError.invalid_api_key(
                "You didn't provide an API key. Send it in the header 'Authorization: Bearer <key>'."
            )
        digest = hash_token(token).encode()
        found = None
        for known, tenant in self._by_digest.items():
            if hmac.compare_digest(digest, known.encode()):
                found = tenant
        if found is None:
            raise ApiError.invalid_api_key("Incorrect API key provided.")
        return found


def _tenants(tables: list[Any], where: str, base_model: str | None) -> dict[str, Tenant]:
    out: dict[str, Tenant] = {}
    names: set[str] = set()
    for i, table in enumerate(tables, 1):

        def bad(field: str, why: str) -> KeysFileError:
            return KeysFileError(f"{where}: [[key]] #{i}, field '{field}': {why}")  # noqa: B023 (raised at once)

        if not isinstance(table, Mapping):
            raise KeysFileError(f"{where}: [[key]] #{i} must be a table, not {type(table).__name__}")
        for field in table:
            if field not in _KEY_FIELDS:
                raise bad(field, f"unknown field; a key has only {list(_KEY_FIELDS)}")
        digest = table.get("sha256")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise bad(
                "sha256",
                "must be the 64-hex sha256 of the token (printf %s TOKEN | sha256sum), never the token itself",
            )
        digest = digest.lower()
        if digest in out:
            raise bad("sha256", f"the same key as [[key]] '{out[digest].name}'")
        globs = table.get("namespaces")
        if not isinstance(globs, list) or not globs:
            raise bad("namespaces", 'must be a non-empty list of globs like ["acme/*"]')
        for g in globs:
            if not isinstance(g, str) or not _glob_ok(g):
                raise bad(
                    "namespaces",
                    f"{g!r} is not a namespace glob: '*', or 'org/name' with * and ? (e.g. 'acme/*', 'acme/sql')",
                )
        if len(set(globs)) != len(globs):
            raise bad("namespaces", "lists the same glob twice")
        admin = table.get("admin", False)
        if not isinstance(admin, bool):
            raise bad("admin", f"must be true or false, not {admin!r}")
        name = table.get("name", digest[:12])
        if not isinstance(name, str) or not name.strip() or len(name) > 64 or not name.isprintable():
            raise bad("name", "must be a printable string of 1-64 characters")
        if name in names:
            raise bad("name", f"{name!r} names another key too; names must be unique")
        names.add(name)
        out[digest] = Tenant(name, tuple(globs), admin, base_model)
    return out


def _glob_ok(glob: str) -> bool:
    if glob == "*":
        return True
    parts = glob.split("/")
    return len(parts) == 2 and all(_GLOB_PART.fullmatch(p) and ".." not in p for p in parts)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The HTTP layer checks the body size (`check_body`, from
    Content-Length before reading) and, once tokenized, the request (`check_request`)."""

    max_tokens: int = 1024
    max_prompt_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    max_concurrent_per_key: int = 8

    def __post_init__(self) -> None:
        for field in ("max_tokens", "max_prompt_tokens", "max_body_bytes", "max_concurrent_per_key"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ServerConfigError(f"Limits.{field} must be a positive integer, not {value!r}")

    def check_body(self, nbytes: int) -> None:
        if nbytes > self.max_body_bytes:
            raise ApiError.too_large(nbytes, self.max_body_bytes)

    def check_request(self, body: Mapping[str, Any], prompt_tokens: int, body_bytes: int | None = None) -> int:
        """The number of tokens to generate (the request's max_tokens, else the limit); 400 with the
        field in `param` if it asks for more than the limits allow, 413 if `body_bytes` is too many."""
        if body_bytes is not None:
            self.check_body(body_bytes)
        asked = body.get("max_tokens")
        if asked is not None and asked > self.max_tokens:
            raise ApiError.invalid(f"at most {self.max_tokens} on this server, but got {asked}.", "max_tokens")
        if prompt_tokens > self.max_prompt_tokens:
            param = "messages" if "messages" in body else "prompt"
            raise ApiError(
                400,
                f"The prompt is {prompt_tokens} tokens; this server accepts at most {self.max_prompt_tokens}. "
                "Shorten it.",
                code="context_length_exceeded",
                param=param,
            )
        return int(asked if asked is not None else self.max_tokens)


class Permit:
    """One admitted request. Released by leaving its `with`/`async with` or by `release()` (idempotent),
    e.g. when a streamed response ends."""

    def __init__(self, gate: ConcurrencyGate, key: str) -> None:
        self._gate, self._key, self._held = gate, key, True

    def release(self) -> None:
        self._gate._release(self)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class ConcurrencyGate:
    """At most `max_per_key` requests in flight per tenant; the next one gets a 429 at once (no queue),
    so it never blocks an event loop. Safe from threads and asyncio tasks alike. `drain()` refuses
    new requests with a 503; `wait_idle` waits for those in flight."""

    def __init__(self, max_per_key: int, retry_after_s: int = 1) -> None:
        if not isinstance(max_per_key, int) or isinstance(max_per_key, bool) or max_per_key < 1:
            raise ServerConfigError(f"max_per_key must be a positive integer, not {max_per_key!r}")
        self.max_per_key, self.retry_after_s = max_per_key, retry_after_s
        self._in_flight: dict[str, int] = {}
        self._cond = threading.Condition()
        self.draining = False

    def acquire(self, tenant: Tenant | None) -> Permit:
        """A `Permit` for one request of `tenant` (None: open mode, counted as "local"), taken now:
        use it in `with` or release it."""
        key = tenant.name if tenant else "local"
        with self._cond:
            if self.draining:
                raise ApiError.draining()
            n = self._in_flight.get(key, 0)
            if n >= self.max_per_key:
                raise ApiError.too_many_requests(self.max_per_key, self.retry_after_s)
            self._in_flight[key] = n + 1
            return Permit(self, key)

    def _release(self, permit: Permit) -> None:
        with self._cond:
            if not permit._held:
                return
            permit._held = False
            left = self._in_flight[permit._key] - 1
            if left:
                self._in_flight[permit._key] = left
            else:
                del self._in_flight[permit._key]
                self._cond.notify_all()

    def in_flight(self, tenant: Tenant | None = None) -> int:
        """Requests in flight for `tenant`, or for all."""
        with self._cond:
            return self._in_flight.get(tenant.name, 0) if tenant else sum(self._in_flight.values())

    def drain(self) -> None:
        with self._cond:
            self.draining = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once nothing is in flight, False if `timeout` seconds passed first (blocks: call it from
        a thread, not the event loop)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._in_flight, timeout)


# ----------------------------------------------------------------------------- request bodies

_ROLES = ("system", "developer", "user", "assistant")
# known OpenAI fields this server cannot honour: refused rather than silently ignored (value: the
# one value that is fine)
_UNSUPPORTED: dict[str, Any] = {
    "logprobs": False,
    "top_logprobs": 0,
    "echo": False,
    "suffix": None,
    "best_of": 1,
    "logit_bias": {},
    "tools": [],
    "functions": [],
    "frequency_penalty": 0,
    "presence_penalty": 0,
}
_INT64 = 2**63


def parse_completion_request(raw: bytes, chat: bool) -> dict[str, Any]:
    """The validated body of a `/v1/chat/completions` (`chat`) or `/v1/completions` request, as
    {"model", "messages" [{"role", "content": str}] | "prompt": str, "max_tokens": int | None,
    "temperature", "top_p", "stop": [str], "seed": int | None, "stream": bool, "include_usage": bool,
    "ignore_eos": bool, "n": 1}. Unknown fields are ignored as OpenAI does; known ones this server cannot honour, wrong
    types and out-of-range values get a 400 naming the field in `param`."""
    body = parse_json_object(raw)
    for field, fine in _UNSUPPORTED.items():
        value = body.get(field)
        if value is not None and value != fine:
            raise ApiError.invalid(
                f"{field}={json.dumps(value)[:80]} is not supported by this server.", field, "unsupported_parameter"
            )
    model = body.get("model")
    if model is None:
        raise ApiError.missing("model")
    if not isinstance(model, str) or not model:
        raise _wrong_type("model", "a non-empty string", model)
    out: dict[str, Any] = {"model": model}
    if chat:
        out["messages"] = _messages(body.get("messages"))
    else:
        out["prompt"] = _prompt(body.get("prompt"))
    max_tokens = body.get("max_tokens")
    newer = body.get("max_completion_tokens")
    if max_tokens is not None and newer is not None and max_tokens != newer:
        raise ApiError.invalid("differs from max_tokens; send one of them.", "max_completion_tokens")
    field = "max_tokens" if max_tokens is not None else "max_completion_tokens"
    out["max_tokens"] = _number(body, field, 1, None, integer=True)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    out["temperature"] = 1.0 if temperature is None else float(temperature)
    out["top_p"] = 1.0 if top_p is None else float(top_p)
    out["stop"] = _stop(body.get("stop"))
    out["seed"] = _number(body, "seed", -_INT64, _INT64 - 1, integer=True)
    n = _number(body, "n", 1, None, integer=True)
    if n not in (None, 1):
        raise ApiError.invalid(f"only n=1 is supported, but got {n}; send {n} requests instead.", "n")
    out["n"] = 1
    out["stream"] = _bool(body, "stream")
    out["ignore_eos"] = _bool(body, "ignore_eos")  # vLLM's extension: run to max_tokens
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _wrong_type("stream_options", "an object", options)
    out["include_usage"] = _bool(options or {}, "include_usage", "stream_options.include_usage")
    return out


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object (also for admin endpoints), else a 400: never a 500
    for bad UTF-8, NaN, absurd nesting or a 5000-digit number."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError.bad_json("nested too deeply") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError, NaN, int digits limit
        raise ApiError.bad_json(str(e)[:200]) from None
    if not isinstance(body, dict):
        raise ApiError.bad_json(f"the body is a JSON {_kind(body)[2:].lstrip('n ')}, not an object")
    return body


def _no_constant(c: str) -> Any:
    raise ValueError(f"{c} is not a JSON number")


def _kind(value: object) -> str:
    return {bool: "a boolean", str: "a string", list: "an array", dict: "an object", type(None): "null"}.get(
        type(value), "a number"
    )


def _wrong_type(param: str, expected: str, value: object) -> ApiError:
    return ApiError(
        400,
        f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.",
        code="invalid_type",
        param=param,
    )


def _number(
    body: Mapping[str, Any], field: str, low: float, high: float | None, integer: bool = False
) -> int | float | None:
    value = body.get(field)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or isinstance(value, bool):
        raise _wrong_type(field, "an integer" if integer else "a number", value)
    if value < low or (high is not None and value > high):
        limits = f">= {low}" if high is None else f"between {low} and {high}"
        raise ApiError.invalid(f"expected a value {limits}, but got {value} instead.", field)
    return value


def _bool(body: Mapping[str, Any], field: str, param: str | None = None) -> bool:
    value = body.get(field)
    if value is not None and not isinstance(value, bool):
        raise _wrong_type(param or field, "a boolean", value)
    return bool(value)


def _stop(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong_type("stop", "a string or an array of strings", stop)
    if len(stops) > 4:
        raise ApiError.invalid(f"at most 4 stop sequences, but got {len(stops)}.", "stop")
    if not all(stops):
        raise ApiError.invalid("a stop sequence is empty.", "stop")
    return stops


def _prompt(prompt: object) -> str:
    if prompt is None:
        raise ApiError.missing("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        raise ApiError.invalid(f"one prompt per request, but got {len(prompt)}.", "prompt")
    if not isinstance(prompt, str):
        raise _wrong_type("prompt", "a string", prompt)
    return prompt


def _messages(messages: object) -> list[dict[str, str]]:
    if messages is None:
        raise ApiError.missing("messages")
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise ApiError.invalid("expected at least one message, but got none.", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _wrong_type(where, "an object", m)
        role = m.get("role")
        if role is None:
            raise ApiError.missing(f"{where}.role")
        if role not in _ROLES:
            raise ApiError.invalid(f"expected one of {list(_ROLES)}, but got {str(role)[:40]!r}.", f"{where}.role")
        content = m.get("content")
        if content is None:
            raise ApiError.missing(f"{where}.content")
        if isinstance(content, list):  # content parts: text only
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError.invalid(
                        "only text parts ({'type': 'text', 'text': ...}) are supported.", f"{where}.content[{j}]"
                    )
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise _wrong_type(f"{where}.content", "a string or an array of text parts", content)
        out.append({"role": role, "content": content})
    return out
