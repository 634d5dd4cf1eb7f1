"""Exceptions of the hub. All subclass `surgery.SurgeryError`, so one `except` catches both packages."""

from __future__ import annotations

from surgery.errors import DeltaMismatchError, SlotError, SurgeryError


class RegistryError(SurgeryError):
    """Base class of every error `registry` raises on purpose."""


class RefError(RegistryError, ValueError):
    """A name, ref or alias is malformed (bad characters, `..`, too long, ...): nothing was touched."""


class NotFoundError(RegistryError, LookupError):
    """A name, version, alias or digest is not in the hub."""


class IntegrityError(RegistryError):
    """Stored bytes do not match what was recorded (size, sha256, manifest or header): the hub is damaged.
    Run `hub.verify()` to list every problem; push the delta again to repair a blob."""


class BaseMismatchError(RegistryError, DeltaMismatchError):
    """A delta was trained on another base than the model it is loaded into."""


class PoolError(RegistryError, SlotError):
    """An `AdapterPool` refuses: more distinct deltas than its unpinned slots, no slot free within
    the timeout, a closed pool, malformed arguments. The pool and its bank are unchanged."""


__all__ = ["BaseMismatchError", "IntegrityError", "NotFoundError", "PoolError", "RefError", "RegistryError"]
