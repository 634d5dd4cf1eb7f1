"""Refs: ``org/name``, ``org/name@3``, ``org/name@prod``, ``org/name@sha256:<hex or unique prefix>``.

Everything here is pure string checking: a ref is rejected before any file is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import RefError

MAX_PART = 96  # characters per part of a name (org, name)
MAX_ALIAS = 64
MAX_VERSION_DIGITS = 12
_PART = re.compile(r"[a-z0-9][a-z0-9._-]*")
_ALIAS = re.compile(r"[a-z][a-z0-9._-]*")
_HEX = re.compile(r"[0-9a-f]{4,64}")
RESERVED_ALIASES = frozenset({"latest"})

NAME_RULES = (
    f"a name is 'org/name', each part 1-{MAX_PART} characters of [a-z0-9._-] starting with a "
    f"letter or digit, without '..'"
)


@dataclass(frozen=True)
class Ref:
    """One stored version: its name, its version number and the sha256 of its manifest."""

    name: str
    version: int
    digest: str

    def __repr__(self) -> str:
        return f'Ref(name="{self.name}", version={self.version}, digest="{self.digest}")'

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Spec:
    """A parsed, not yet resolved ref: `kind` is 'latest', 'version', 'alias' or 'digest'."""

    name: str
    kind: str
    value: int | str | None = None

    def __str__(self) -> str:
        if self.kind == "latest":
            return self.name
        if self.kind == "digest":
            return f"{self.name}@sha256:{self.value}"
        return f"{self.name}@{self.value}"


def check_name(name: object) -> str:
    """`name` if it is a valid 'org/name', else RefError saying why."""
    if not isinstance(name, str):
        raise RefError(f"a name must be a string like 'acme/sql', not {type(name).__name__}")
    shown = name if len(name) <= 120 else name[:117] + "..."
    if not name:
        raise RefError(f"empty name: {NAME_RULES}")
    parts = name.split("/")
    if len(parts) != 2:
        raise RefError(f"invalid name {shown!r}: it has {len(parts) - 1} '/' but needs exactly one; {NAME_RULES}")
    for part in parts:
        if not part:
            raise RefError(f"invalid name {shown!r}: empty part; {NAME_RULES}")
        if len(part) > MAX_PART:
            raise RefError(f"invalid name {shown!r}: part of {len(part)} characters (at most {MAX_PART})")
        if ".." in part:
            raise RefError(f"invalid name {shown!r}: '..' is not allowed; {NAME_RULES}")
        if not _PART.fullmatch(part):
            bad = sorted({c for c in part if not re.fullmatch(r"[a-z0-9._-]", c)})
            why = f"characters {''.join(bad)!r} are not allowed" if bad else "it must start with a letter or digit"
            raise RefError(f"invalid name {shown!r}: {why}; {NAME_RULES}")
    return name


def check_alias(alias: object) -> str:
    """`alias` if it can name an alias (not a number, not 'latest', not a digest), else RefError."""
    if not isinstance(alias, str):
        raise RefError(f"an alias must be a string like 'prod', not {type(alias).__name__}")
    shown = alias if len(alias) <= 80 else alias[:77] + "..."
    if not alias or len(alias) > MAX_ALIAS or not _ALIAS.fullmatch(alias) or ".." in alias:
        raise RefError(
            f"invalid alias {shown!r}: 1-{MAX_ALIAS} characters of [a-z0-9._-] starting with a letter, without '..'"
        )
    if alias in RESERVED_ALIASES or alias.startswith("sha256"):
        raise RefError(f"invalid alias {shown!r}: 'latest' and names starting with 'sha256' are reserved")
    return alias


def parse(ref: object) -> Spec:
    """Parse a ref string (or a `Ref`) into a `Spec`; RefError if it is malformed."""
    if isinstance(ref, Ref):
        return Spec(check_name(ref.name), "digest", _digest_hex(ref.digest, str(ref)))
    if not isinstance(ref, str):
        raise RefError(f"a ref must be a string like 'acme/sql@3' or a Ref, not {type(ref).__name__}")
    if len(ref) > 2 * MAX_PART + 80:
        raise RefError(f"ref of {len(ref)} characters is too long: {NAME_RULES}")
    name, at, sel = ref.partition("@")
    check_name(name)
    if not at:
        return Spec(name, "latest")
    if "@" in sel:
        raise RefError(f"invalid ref {ref!r}: more than one '@'")
    if not sel:
        raise RefError(f"invalid ref {ref!r}: nothing after '@' (use a version, an alias or sha256:<hex>)")
    if sel.isascii() and sel.isdigit():
        if len(sel) > MAX_VERSION_DIGITS or int(sel) < 1:
            raise RefError(f"invalid ref {ref!r}: versions are integers from 1")
        return Spec(name, "version", int(sel))
    if sel.startswith("sha256:"):
        return Spec(name, "digest", _digest_hex(sel, ref))
    if sel == "latest":
        return Spec(name, "latest")
    return Spec(name, "alias", check_alias(sel))


def _digest_hex(digest: str, ref: str) -> str:
    hexpart = digest[len("sha256:") :] if isinstance(digest, str) and digest.startswith("sha256:") else None
    if hexpart is None or not _HEX.fullmatch(hexpart):
        raise RefError(f"invalid ref {ref!r}: a digest is 'sha256:' and 4 to 64 lowercase hex digits")
    return hexpart
