"""The hub: a local folder of content-addressed delta blobs, immutable version manifests and
movable aliases with a history. Embedded (no server); safe with several processes at once.

Layout under the hub's root (see docs/hub.md)::

    blobs/sha256/<aa>/<64 hex>            one safetensors file per delta (and per extra), named by its sha256
    names/<org>/<name>/versions/<n>.json  immutable manifest of version n
    names/<org>/<name>/digests.log        "version -> manifest digest" index (JSON lines; a cache)
    names/<org>/<name>/aliases.log        append-only alias moves (JSON lines; the truth)
    names/<org>/<name>/.lock              flock: version allocation and alias moves
    tmp/                                  temp files before their rename (gc removes leftovers)
    .gc.lock                              shared by writers, exclusive for gc
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import datetime as _dt
import getpass
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

import surgery
from registry import store
from registry.errors import BaseMismatchError, IntegrityError, NotFoundError, RefError, RegistryError
from registry.refs import Ref, Spec, check_alias, check_name, parse
from surgery import distributed

FORMAT = "model-surgery.delta/1"
MAX_MANIFEST = 64 * 1024 * 1024
_VERSION_FILE = re.compile(r"([1-9][0-9]{0,11})\.json")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def default_path() -> Path:
    """$SURGERY_HUB, else $XDG_CACHE_HOME/model-surgery/hub, else ~/.cache/model-surgery/hub."""
    env = os.environ.get("SURGERY_HUB")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "model-surgery" / "hub"


def canonical(obj: Any) -> bytes:
    """The bytes a manifest digest is taken over: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return "sha256:" + hashlib.sha256(canonical(body)).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001  (no user name in some containers)
        return "unknown"


class Hub:
    """A versioned, content-addressed store of deltas in a local folder.

    >>> hub = registry.Hub()                       # $SURGERY_HUB or ~/.cache/model-surgery/hub
    >>> ref = hub.push(model, "acme/sql", adapter="sql", alias="staging")
    >>> hub.load(model2, "acme/sql@staging")       # verified, hot-swapped in place if it fits

    `Hub(path)` creates nothing: reads of a folder that does not exist raise NotFoundError ("no hub
    at PATH"), so a mistyped path leaves nothing behind. `push` creates the hub; so does `create=True`.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, recheck: bool = False, *, create: bool = False
    ) -> None:
        self.recheck = recheck
        self._checked = store.CheckedCache()
        self.root = Path(path).expanduser() if path is not None else default_path()
        self.blobs = self.root / "blobs" / "sha256"
        self.names_dir = self.root / "names"
        self.tmp = self.root / "tmp"
        self._gc_lock = self.root / ".gc.lock"
        if create:
            self._create()

    def _create(self) -> None:
        """Make the hub's folders (push, the only command that may start a hub)."""
        try:
            for d in (self.blobs, self.names_dir, self.tmp):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(
                f"cannot create the hub at {self.root}: {e}; pass Hub(path=...) or set "
                "$SURGERY_HUB to a writable folder"
            ) from e

    def _require(self) -> None:
        """Reads need an existing hub folder: a missing one is a mistyped path more often than an empty hub."""
        if not self.root.is_dir():
            what = "is a file, not a hub folder" if self.root.exists() else "does not exist"
            raise NotFoundError(
                f"no hub at {self.root} ({what}); push creates one (hub.push, surgery hub "
                "import-peft / pull-hf); check the path (--hub, $SURGERY_HUB)"
            )

    def __repr__(self) -> str:
        return f"Hub({str(self.root)!r})"

    # ------------------------------------------------------------------------- paths

    def _name_dir(self, name: str) -> Path:
        org, short = check_name(name).split("/")
        return self.names_dir / org / short

    def _blob_path(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.blobs / hexd[:2] / hexd

    def _version_numbers(self, name: str) -> list[int]:
        vdir = self._name_dir(name) / "versions"
        try:
            entries = os.listdir(vdir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(n[:-5]) for n in entries if _VERSION_FILE.fullmatch(n))

    # ------------------------------------------------------------------------- push

    def push(
        self,
        model_or_delta: nn.Module | surgery.Delta,
        name: str,
        adapter: str = "default",
        alias: str | None = None,
        meta: dict[str, Any] | None = None,
        parent: int | str | Ref | None = None,
        extra: dict[str, Any] | None = None,
        *,
        rank: int | None = None,
    ) -> Ref:
        """Store a delta (a `surgery.Delta`, or the delta `adapter` of a model) as the next version
        of `name`; move `alias` to it if given. All or nothing: blobs first, manifest last.
        Pushing the same tensors again stores no new tensor bytes (the blob is shared).

        `extra`: tensors kept next to the delta (name -> tensor, plus an optional ``"__meta__"`` dict
        of JSON values), e.g. ``EWC.state()``: a blob of their own, referenced from the manifest and
        read back, verified, by `hub.extra(ref)`; pulling the delta does not read them.

        A sharded (FSDP2) or DDP-wrapped model, or a `rank=` given in a process group of several ranks:
        a collective. Every rank calls it; the full tensors are gathered, rank `rank` (default 0) writes
        once, and every rank returns the same Ref (or raises the writer's error). Called on some ranks
        only, it raises `surgery.distributed.CollectiveError` after `distributed.TIMEOUT` instead of
        hanging. A plain model (a DDP wrapper's `.module`) without `rank=` is pushed by each caller."""
        check_name(name)
        if alias is not None:
            check_alias(alias)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise RegistryError(f"meta must be a dict of JSON values, not {type(meta).__name__}")
        try:
            canonical(meta)
        except (TypeError, ValueError) as e:
            raise RegistryError(
                f"meta must hold only JSON values (str, int, float, bool, None, lists, dicts; no NaN): {e}"
            ) from None
        together = isinstance(model_or_delta, nn.Module) and distributed.is_collective(model_or_delta)
        if together or (rank is not None and distributed.world_size() > 1):
            distributed.guard("registry push", [name, adapter if isinstance(model_or_delta, nn.Module) else None])
            if isinstance(model_or_delta, nn.Module):
                model = distributed.unwrap(model_or_delta)
                one = surgery.delta(model, adapter)  # gathered on every rank
                one.lineage = {**one.lineage, "site_kinds": _site_kinds(model, one)}
            else:
                one = model_or_delta
            return distributed.write_once(
                lambda: self.push(one, name, adapter, alias, meta, parent, extra),
                writer=0 if rank is None else rank,
                what=f"push to {name!r}",
                encode=lambda r: [r.name, r.version, r.digest],
                decode=lambda v: Ref(v[0], v[1], v[2]),
                error=RegistryError,
            )
        if isinstance(model_or_delta, surgery.Delta):
            delta = model_or_delta
        elif isinstance(model_or_delta, nn.Module):
            delta = surgery.delta(model_or_delta, adapter)
            # a Delta alone cannot tell an embedding site from a linear one; PEFT keys them apart
            delta.lineage = {**delta.lineage, "site_kinds": _site_kinds(model_or_delta, delta)}
        else:
            raise RegistryError(f"push takes a model or a surgery.Delta, not {type(model_or_delta).__name__}")
        try:
            config = json.loads(canonical(delta.config))
            lineage = json.loads(canonical({k: v for k, v in delta.lineage.items() if k != "hub"}))
        except (TypeError, ValueError) as e:
            raise RegistryError(f"delta {delta.name!r}: config and lineage must be JSON values: {e}") from None
        tensors = delta.tensors
        for key, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dtype not in store.DTYPE_NAMES:
                raise RegistryError(
                    f"delta {delta.name!r}: tensor {key!r} is not a tensor of a dtype "
                    f"safetensors stores ({sorted(store.DTYPES)})"
                )
        extra_tensors, extra_meta = _check_extra(extra) if extra is not None else ({}, {})
        parent_info = self._parent(name, parent) if parent is not None else None

        data, blob, tensor_list = _blob_of(tensors)
        digest = blob["digest"]
        extra_data, extra_blob, extra_list = _blob_of(extra_tensors) if extra is not None else (b"", {}, [])
        ndir = self._name_dir(name)
        vdir = ndir / "versions"
        self._create()
        with store.file_lock(self._gc_lock, shared=True):
            self._ensure_dirs(vdir)
            blob_jobs = self._store_blob(self._blob_path(digest), data, digest)
            try:
                if extra is not None:
                    blob_jobs += self._store_blob(
                        self._blob_path(extra_blob["digest"]), extra_data, extra_blob["digest"]
                    )
                with store.file_lock(ndir / ".lock"):
                    nums = self._version_numbers(name)
                    version = (nums[-1] if nums else 0) + 1
                    manifest: dict[str, Any] = {
                        "format": FORMAT,
                        "name": name,
                        "version": version,
                        "method": delta.method,
                        "delta_name": delta.name,
                        "config": config,
                        "base": delta.base,
                        "parent": parent_info,
                        "lineage": lineage,
                        "created": _now(),
                        "user": _user(),
                        "meta": meta,
                        "blob": blob,
                        "tensors": tensor_list,
                    }
                    if extra is not None:
                        manifest["extra"] = {"blob": extra_blob, "tensors": extra_list, "meta": extra_meta}
                    manifest["digest"] = manifest_digest(manifest)
                    body = json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False).encode()
                    tmp_man = store.write_temp(self.tmp, f"v{version}", body, fsync=True)
                    try:
                        while blob_jobs:
                            blob_jobs.pop().result()
                        os.replace(tmp_man, vdir / f"{version}.json")
                    except BaseException:
                        _unlink(tmp_man)
                        raise
                    store.fsync_dir(vdir)
                    store.append_line(ndir / "digests.log", {"v": version, "d": manifest["digest"]}, fsync=False)
                    ref = Ref(name, version, manifest["digest"])
                    if alias is not None:
                        self._move_alias_locked(name, alias, version)
            finally:
                for job in blob_jobs:  # an error before the manifest: let the blob finish
                    with contextlib.suppress(Exception):  # the first error is the one raised
                        job.result()
        return ref

    def _store_blob(self, blob: Path, data: bytes, digest: str) -> builtins.list[Future[None]]:
        """Put `data` at its content address and start making it durable on worker threads; returns
        jobs whose results mean the blob's bytes and its name are on disk. The manifest naming the
        blob is renamed into place only after that, so no version can reference a blob a crash lost."""
        pool = store.get_pool()
        if blob.is_file() and blob.stat().st_size == len(data) and self._check_blob_file(digest) is None:
            return [pool.submit(store.fsync_file, blob)]  # dedupe: reuse it (durable, if another push is mid-way)
        shard = blob.parent
        if not shard.is_dir():
            shard.mkdir(exist_ok=True)
            store.fsync_dir(shard.parent)
        tmp_blob = store.write_temp(self.tmp, "blob", data, fsync=False)
        try:
            # rename before fsync: the three fsyncs (blob, its folder, the manifest's temp file) then run
            # at once and the file system commits them together. Until they finish, the blob is named
            # but not referenced; a blob a crash left incomplete is never reused (the hash is checked
            # above), verify() reports it and gc() removes it.
            os.replace(tmp_blob, blob)
        except BaseException:
            _unlink(tmp_blob)
            raise
        return [pool.submit(store.fsync_file, blob), pool.submit(store.fsync_dir, shard)]

    def _ensure_dirs(self, vdir: Path) -> None:
        made = list(itertools.takewhile(lambda d: not d.is_dir(), (vdir, *vdir.parents)))
        for d in reversed(made):
            d.mkdir(exist_ok=True)
        for d in {m.parent for m in made}:
            store.fsync_dir(d)

    def _parent(self, name: str, parent: int | str | Ref) -> dict[str, Any]:
        if isinstance(parent, bool) or not isinstance(parent, (int, str, Ref)):
            raise RefError(f"parent must be a version number, a ref string or a Ref, not {type(parent).__name__}")
        ref = self.resolve(f"{name}@{parent}" if isinstance(parent, int) else parent)
        return {"name": ref.name, "version": ref.version, "digest": ref.digest}

    # ------------------------------------------------------------------------- resolve

    def resolve(self, ref: str | Ref) -> Ref:
        """The `Ref` a ref string names (latest, version, alias or digest prefix)."""
        return self._resolve(parse(ref))[0]

    def _resolve(self, spec: Spec, recheck: bool = True) -> tuple[Ref, dict[str, Any]]:
        self._require()
        name = spec.name
        if spec.kind == "latest":
            nums = self._version_numbers(name)
            if not nums:
                raise self._no_name(name)
            version = nums[-1]
        elif spec.kind == "version":
            version = int(spec.value)  # type: ignore[arg-type]
        elif spec.kind == "alias":
            table = self.aliases(name)
            if spec.value not in table:
                if not self._version_numbers(name):
                    raise self._no_name(name)
                raise NotFoundError(
                    f"{name} has no alias {spec.value!r}; its aliases are {sorted(table) or 'none'}; "
                    f"set one with hub.alias({name!r}, {spec.value!r}, version=N)"
                )
            version = table[spec.value]
        else:
            version = self._by_digest(name, str(spec.value))
        man = self._manifest(name, version, str(spec), recheck)
        if spec.kind == "digest" and not man["digest"].removeprefix("sha256:").startswith(str(spec.value)):
            raise IntegrityError(
                f"{spec}: version {version}'s manifest has digest {man['digest']}, not the one "
                "asked for; the digest index is damaged: run hub.verify()"
            )
        return Ref(name, version, man["digest"]), man

    def _no_name(self, name: str) -> NotFoundError:
        known = [r.name for r in self.list()]
        close = [k for k in known if k.split("/")[-1] == name.split("/")[-1] or k.split("/")[0] == name.split("/")[0]]
        hint = f"; names like it: {close[:5]}" if close else ""
        return NotFoundError(
            f"no delta named {name!r} in the hub at {self.root}{hint}; push one with hub.push(model, {name!r})"
        )

    def _digest_index(self, name: str) -> dict[int, str]:
        """version -> manifest digest, from digests.log, completed from the manifests it lacks."""
        ndir = self._name_dir(name)
        index: dict[int, str] = {}
        for line in store.read_lines(ndir / "digests.log"):
            v, d = line.get("v"), line.get("d")
            if type(v) is int and isinstance(d, str):
                index[v] = d
        for v in self._version_numbers(name):
            if v not in index:
                try:
                    index[v] = self._manifest(name, v, f"{name}@{v}")["digest"]
                except RegistryError:
                    index[v] = "unreadable"
        return index

    def _by_digest(self, name: str, hexprefix: str) -> int:
        index = self._digest_index(name)
        hits = sorted({v for v, d in index.items() if d.removeprefix("sha256:").startswith(hexprefix)})
        if not hits:
            if not index:
                raise self._no_name(name)
            raise NotFoundError(
                f"no version of {name} has a digest starting with sha256:{hexprefix}; see hub.versions({name!r})"
            )
        if len(hits) > 1:
            raise RefError(f"sha256:{hexprefix} is ambiguous in {name}: versions {hits}; give more hex digits")
        return hits[0]

    def _manifest(self, name: str, version: int, what: str, recheck: bool = True) -> dict[str, Any]:
        """The checked manifest of name@version (not to be mutated: it may be cached)."""
        path = self._name_dir(name) / "versions" / f"{version}.json"
        try:
            with open(path, "rb") as f:
                key = store.stat_key(os.fstat(f.fileno()))
                if not recheck:
                    hit = self._checked.get(str(path), key)
                    if hit is not None:
                        return hit  # type: ignore[return-value]
                raw = f.read(MAX_MANIFEST + 1)
        except FileNotFoundError:
            nums = self._version_numbers(name)
            if not nums:
                raise self._no_name(name) from None
            raise NotFoundError(
                f"{name} has no version {version} (versions {nums[0]}..{nums[-1]}, {len(nums)} in all)"
            ) from None
        except OSError as e:
            raise IntegrityError(f"{what}: cannot read manifest {path}: {e}") from None
        man = check_manifest(raw, name, version, f"{what} (manifest {path})")
        self._checked.put(str(path), key, man)
        return man

    # ------------------------------------------------------------------------- pull / load

    def pull(self, ref: str | Ref, recheck: bool | None = None) -> surgery.Delta:
        """The delta a ref names, as a `surgery.Delta`, after checking the manifest's digest, the blob's
        size, the sha256 of every byte and the tensors' names, dtypes and shapes.

        A manifest or blob already checked by this Hub object and not modified since (same inode,
        size, mtime and ctime) is not hashed again unless `recheck=True` (or `Hub(recheck=True)`);
        `verify()` always hashes everything."""
        spec = parse(ref)
        recheck = self.recheck if recheck is None else recheck
        r, man = self._resolve(spec, recheck)
        tensors = self._read_blob(man, str(r), recheck)
        lineage = copy.deepcopy(man["lineage"])
        lineage["hub"] = {"name": r.name, "version": r.version, "digest": r.digest, "parent": man["parent"]}
        return surgery.Delta(
            man["method"], man["delta_name"], copy.deepcopy(man["config"]), tensors, man["base"], lineage
        )

    def extra(self, ref: str | Ref, recheck: bool | None = None) -> dict[str, Any]:
        """The tensors pushed with `extra=` next to a version's delta (and their ``"__meta__"`` if one
        was given), checked as `pull` checks the delta: manifest digest, blob size, every byte's sha256."""
        r, man = self._resolve(parse(ref), self.recheck if recheck is None else recheck)
        if "extra" not in man:
            raise NotFoundError(f"{r} has no extra tensors; push them with hub.push(..., extra={{name: tensor}})")
        out: dict[str, Any] = self._read_blob(
            man["extra"], f"{r} (extra)", self.recheck if recheck is None else recheck
        )
        if man["extra"]["meta"]:
            out["__meta__"] = copy.deepcopy(man["extra"]["meta"])
        return out

    def _read_blob(self, man: dict[str, Any], what: str, recheck: bool = True) -> dict[str, torch.Tensor]:
        b = man["blob"]
        path = self._blob_path(b["digest"])
        name = f"blob {b['digest']}"
        try:
            data, skey = store.read_file(path)
        except FileNotFoundError:
            raise IntegrityError(
                f"{what}: {name} is missing ({path}); push the delta again or restore the file"
            ) from None
        except OSError as e:
            raise IntegrityError(f"{what}: cannot read {name}: {e}") from None
        if len(data) != b["size"]:
            raise IntegrityError(
                f"{what}: {name} is {len(data)} bytes but the manifest records {b['size']}: "
                "the file is damaged; push the delta again to repair it"
            )
        stamp = (b["digest"], b["chunk_size"], tuple(b["chunks"]))
        known = not recheck and self._checked.get(str(path), skey) == stamp
        started = [] if known else store.start_chunk_check(data, b["chunk_size"])
        header_error: IntegrityError | None = None
        try:
            entries, start = store.read_header(data, f"{what}: {name}")
        except IntegrityError as e:
            header_error = e
        got = b["chunks"] if known else store.finish_chunk_check(started)
        if got != b["chunks"]:
            bad = [i for i, (x, y) in enumerate(zip(got, b["chunks"], strict=False)) if x != y]
            raise IntegrityError(
                f"{what}: {name} is corrupted: sha256 mismatch in chunk(s) {bad} of "
                f"{b['chunk_size']} bytes ({path}); push the delta again to repair it, "
                "and run hub.verify() for other damage"
            )
        if header_error is not None:
            raise header_error
        order = [k for k, _ in man["tensors"]]
        if set(entries) != set(order):
            raise IntegrityError(
                f"{what}: {name} holds tensors {sorted(set(entries) ^ set(order))[:5]} that disagree with the manifest"
            )
        for key, info in man["tensors"]:
            ent = entries[key]
            if ent["dtype"] != info["dtype"] or ent["shape"] != info["shape"]:
                raise IntegrityError(
                    f"{what}: {name}: tensor {key!r} is {ent['dtype']}{ent['shape']} in the blob "
                    f"but {info['dtype']}{info['shape']} in the manifest"
                )
        if not known:
            self._checked.put(str(path), skey, stamp)
        return store.tensors_from(data, entries, start, order)

    def load(
        self, model: nn.Module, ref: str | Ref, as_name: str | None = None, allow_other_base: bool = False
    ) -> surgery.Injection:
        """Pull `ref` and put it into `model` under `as_name` (default: the delta's own name): a hot-swap
        in place when a delta of that name and shapes is there, else an injection."""
        delta = self.pull(ref)
        if not allow_other_base:
            arch = surgery.fingerprint(model)
            base = delta.base.split("+", 1)[0]
            if base != arch:
                raise BaseMismatchError(
                    f"{ref} was trained on base {base}, but this model is {arch}: another architecture. "
                    "Load it into the base it was trained on, or pass allow_other_base=True if you know it fits"
                )
        return surgery.apply(model, delta, name=as_name, allow_other_base=True)

    # ------------------------------------------------------------------------- queries

    def versions(self, name: str) -> list[Ref]:
        """Every version of `name`, oldest first."""
        index = self._digest_index(name)
        if not index:
            raise self._no_name(name)
        return [_ref(name, v, index[v]) for v in sorted(index)]

    def names(self) -> list[str]:
        """Every name with at least one version, sorted."""
        self._require()
        return [name for name in self._all_name_dirs() if self._version_numbers(name)]

    def list(self) -> list[Ref]:
        """The latest version of every name in the hub, sorted by name."""
        out = []
        for name in self.names():
            try:
                out.append(self.resolve(name))
            except RegistryError:
                out.append(Ref(name, self._version_numbers(name)[-1], "unreadable"))
        return out

    def show(self, ref: str | Ref) -> dict[str, Any]:
        """The manifest of a version, plus its ref, the aliases pointing at it and its size in bytes."""
        r, man = self._resolve(parse(ref))
        aliases = sorted(a for a, v in self.aliases(r.name).items() if v == r.version)
        return {**copy.deepcopy(man), "ref": str(r), "aliases": aliases, "nbytes": man["blob"]["size"]}

    def aliases(self, name: str) -> dict[str, int]:
        """alias -> version for `name` (replayed from its append-only aliases.log)."""
        self._require()
        table: dict[str, int] = {}
        for e in self._alias_log(name):
            if e["version"] is None:
                table.pop(e["alias"], None)
            else:
                table[e["alias"]] = e["version"]
        return table

    def _alias_log(self, name: str) -> Iterator[dict[str, Any]]:
        for e in store.read_lines(self._name_dir(name) / "aliases.log"):
            a, v = e.get("alias"), e.get("version")
            if isinstance(a, str) and (v is None or (type(v) is int and v > 0)):
                yield e

    @contextlib.contextmanager
    def _name_locked(self, name: str) -> Iterator[Path]:
        """Hold the name's lock (and keep gc out) for an alias change; the name must exist."""
        ndir = self._name_dir(name)
        self._require()
        with store.file_lock(self._gc_lock, shared=True):
            if not ndir.is_dir():
                raise self._no_name(name)
            with store.file_lock(ndir / ".lock"):
                yield ndir

    def alias(self, name: str, alias: str, version: int | str | Ref | None = None) -> Ref:
        """Point `name@alias` at `version` (an int, a ref string or a Ref; default: the latest)."""
        check_name(name)
        check_alias(alias)
        with self._name_locked(name):
            if version is None:
                target = self.resolve(name)
            elif isinstance(version, int) and not isinstance(version, bool):
                target = self.resolve(f"{name}@{version}")
            elif isinstance(version, (str, Ref)):
                target = self.resolve(version)
            else:
                raise RefError(f"version must be an int, a ref string or a Ref, not {type(version).__name__}")
            if target.name != name:
                raise RefError(f"alias {name}@{alias} cannot point at another name's version ({target})")
            self._move_alias_locked(name, alias, target.version)
        return target

    def unalias(self, name: str, alias: str) -> int:
        """Remove `name@alias`; returns the version it pointed at. The removal is a line in the
        alias's history (``"version": null``), like every move."""
        check_name(name)
        check_alias(alias)
        with self._name_locked(name):
            table = self.aliases(name)
            if alias not in table:
                raise NotFoundError(f"{name} has no alias {alias!r}; its aliases are {sorted(table) or 'none'}")
            self._move_alias_locked(name, alias, None)
        return table[alias]

    def _move_alias_locked(self, name: str, alias: str, version: int | None) -> None:
        previous = self.aliases(name).get(alias)
        store.append_line(
            self._name_dir(name) / "aliases.log",
            {"alias": alias, "version": version, "previous": previous, "time": _now(), "user": _user()},
        )

    def history(self, ref: str | Ref) -> builtins.list[dict[str, Any]]:
        """`name@alias`: every move of the alias, oldest first. `name@N` or a digest: the lineage,
        this version first, then its parent, and so on. A bare `name`: every version created and
        every alias moved, in time order."""
        spec = parse(ref)
        name = spec.name
        if spec.kind == "alias":
            moves = [dict(e) for e in self._alias_log(name) if e["alias"] == spec.value]
            if not moves:
                self._resolve(spec)  # raises the right NotFoundError
            return moves
        if spec.kind == "latest" and not isinstance(ref, Ref):
            events: list[dict[str, Any]] = []
            for r in self.versions(name):
                event = {"event": "push", "version": r.version, "digest": r.digest}
                try:
                    m = self._manifest(name, r.version, str(r))
                    event.update(time=m["created"], user=m.get("user"), parent=m["parent"])
                except RegistryError as e:
                    event.update(time="", error=str(e))
                events.append(event)
            events.extend({"event": "alias", **move} for move in self._alias_log(name))
            events.sort(key=lambda e: str(e.get("time", "")))
            return events
        r, man = self._resolve(spec)
        chain: list[dict[str, Any]] = []
        seen: set[tuple[str, int]] = set()
        while True:
            fields = {k: man[k] for k in ("created", "base", "meta", "parent")}
            chain.append({"ref": str(r), "name": r.name, "version": r.version, "digest": r.digest, **fields})
            seen.add((r.name, r.version))
            p = man["parent"]
            if p is None or (p["name"], p["version"]) in seen or len(chain) > 10_000:
                return chain
            try:
                r, man = self._resolve(Spec(p["name"], "version", p["version"]))
            except RegistryError as e:
                chain.append({"ref": f"{p['name']}@{p['version']}", "error": str(e)})
                return chain

    # ------------------------------------------------------------------------- verify / gc

    def verify(self) -> builtins.list[str]:
        """Every problem in the hub, one line each (an empty list when it is clean): unreadable or
        tampered manifests, missing, truncated or corrupted blobs, blobs whose bytes do not match
        their name, a digest index or alias that disagrees with the versions."""
        self._require()
        problems: list[str] = []
        checked: dict[str, str | None] = {}  # blob digest -> problem (None: fine)
        for name in self._all_name_dirs(problems):
            nums = self._version_numbers(name)
            vdir = self._name_dir(name) / "versions"
            for entry in sorted(os.listdir(vdir)) if vdir.is_dir() else []:
                if not _VERSION_FILE.fullmatch(entry):
                    problems.append(f"{name}: stray file {vdir / entry} (not a version manifest)")
            digests: dict[int, str] = {}
            for v in nums:
                what = f"{name}@{v}"
                try:
                    man = self._manifest(name, v, what)
                except RegistryError as e:
                    problems.append(str(e))
                    continue
                digests[v] = man["digest"]
                for part, label in ((man, what), (man.get("extra"), f"{what} (extra)")):
                    if part is None:
                        continue
                    key = part["blob"]["digest"]
                    if key not in checked:
                        checked[key] = self._check_blob_file(key)
                    if checked[key] is not None:
                        problems.append(f"{label}: {checked[key]}")
                        continue
                    try:
                        self._read_blob(part, label)
                    except RegistryError as e:
                        problems.append(str(e))
            for line in store.read_lines(self._name_dir(name) / "digests.log"):
                lv, ld = line.get("v"), line.get("d")
                if type(lv) is int and lv in digests and ld != digests[lv]:
                    problems.append(f"{name}@{lv}: digests.log records {ld} but the manifest's digest is {digests[lv]}")
                elif type(lv) is int and lv not in nums:
                    problems.append(f"{name}: digests.log names version {lv}, which has no manifest")
            for alias, v in self.aliases(name).items():
                if v not in nums:
                    problems.append(f"{name}@{alias} points at version {v}, which does not exist")
        for path in self._blob_files():
            key = "sha256:" + path.name
            if key not in checked:
                if not _HEX64.fullmatch(path.name) or path.parent.name != path.name[:2]:
                    problems.append(f"stray file in the blob store: {path}")
                    continue
                checked[key] = self._check_blob_file(key)
                if checked[key] is not None:
                    problems.append(f"unreferenced {checked[key]}")
        return problems

    def _check_blob_file(self, digest: str) -> str | None:
        path = self._blob_path(digest)
        h = hashlib.sha256()
        try:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
        except FileNotFoundError:
            return f"blob {digest} is missing ({path})"
        except OSError as e:
            return f"blob {digest} cannot be read: {e}"
        if "sha256:" + h.hexdigest() != digest:
            return f"blob {digest} is corrupted: its bytes hash to sha256:{h.hexdigest()} ({path})"
        return None

    def _blob_files(self) -> builtins.list[Path]:
        """Every file in the blob store, shard by shard (a stray file beside the shards included)."""
        shards = self.blobs.iterdir() if self.blobs.is_dir() else []
        return sorted(p for shard in shards for p in (shard.iterdir() if shard.is_dir() else [shard]))

    def _all_name_dirs(self, problems: builtins.list[str] | None = None) -> builtins.list[str]:
        out = []
        for org in sorted(self.names_dir.iterdir()) if self.names_dir.is_dir() else []:
            for nm in sorted(org.iterdir()) if org.is_dir() else []:
                full = f"{org.name}/{nm.name}"
                try:
                    check_name(full)
                except RefError:
                    if problems is not None:
                        problems.append(f"stray entry {nm} in names/ (not a valid name)")
                    continue
                out.append(full)
        return out

    def gc(self) -> dict[str, Any]:
        """Remove blobs no manifest references and temp files left by interrupted writes.
        Returns {"blobs": [digests removed], "temp": [file names removed], "bytes": bytes freed}.
        Blobs are kept if any manifest cannot be read (it might reference them)."""
        self._require()
        removed: dict[str, Any] = {"blobs": [], "temp": [], "bytes": 0, "skipped": []}
        with store.file_lock(self._gc_lock):
            referenced: set[str] = set()
            unreadable = []
            for name in self._all_name_dirs():
                for v in self._version_numbers(name):
                    try:
                        man = self._manifest(name, v, f"{name}@{v}")
                        referenced.update(part["blob"]["digest"] for part in (man, man.get("extra")) if part)
                    except RegistryError as e:
                        unreadable.append(str(e))
            for p in sorted(self.tmp.iterdir()) if self.tmp.is_dir() else []:
                size = p.stat().st_size if p.is_file() else 0
                _unlink(p)
                removed["temp"].append(p.name)
                removed["bytes"] += size
            if unreadable:
                removed["skipped"] = [
                    f"blobs kept: {len(unreadable)} manifest(s) cannot be read ({unreadable[0]}); run hub.verify()"
                ]
                return removed
            for path in self._blob_files():
                if not _HEX64.fullmatch(path.name) or "sha256:" + path.name in referenced:
                    continue
                size = path.stat().st_size
                _unlink(path)
                removed["blobs"].append("sha256:" + path.name)
                removed["bytes"] += size
        return removed

    # ------------------------------------------------------------------------- PEFT and the HF Hub

    def import_peft(self, path: str | os.PathLike[str], name: str, **push_kw: Any) -> Ref:
        """Push a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) as a new version."""
        from registry.peft_format import load_peft_delta

        check_name(name)
        return self.push(load_peft_delta(path), name, **push_kw)

    def export_peft(self, ref: str | Ref, path: str | os.PathLike[str]) -> Path:
        """Write a version in PEFT's layout, readable by `peft.PeftModel.from_pretrained`."""
        from registry.peft_format import save_peft_delta

        save_peft_delta(self.pull(ref), path)
        return Path(path)

    def push_hf(self, ref: str | Ref, repo_id: str, **kw: Any) -> Any:
        """Upload one version to the Hugging Face Hub (PEFT layout + manifest), tagged v{version}."""
        from registry.hf import push_hf

        return push_hf(self, ref, repo_id, **kw)

    def pull_hf(self, repo_id: str, revision: str | None = None, name: str | None = None, **kw: Any) -> Ref:
        """Download a version from the Hugging Face Hub and push it here as `name`."""
        from registry.hf import pull_hf

        return pull_hf(self, repo_id, revision or "main", name, **kw)


def _site_kinds(model: nn.Module, delta: surgery.Delta) -> dict[str, str]:
    from registry.peft_format import site_kinds

    return site_kinds(distributed.unwrap(model), delta)


def _blob_of(tensors: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, Any], builtins.list[Any]]:
    """(safetensors bytes, the manifest's blob record, its tensor list) of `tensors`."""
    data = store.serialize(tensors)
    chunk = store.chunk_size_for(len(data))
    whole, chunks = store.digests(data, chunk)
    blob = {"digest": f"sha256:{whole}", "size": len(data), "chunk_size": chunk, "chunks": chunks}
    return data, blob, [[k, {"dtype": store.DTYPE_NAMES[t.dtype], "shape": list(t.shape)}] for k, t in tensors.items()]


def _check_extra(extra: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a push's `extra`, refused before anything is written if it is not a dict of
    finite tensors safetensors stores plus an optional "__meta__" dict of JSON values."""
    usage = "extra must be a dict of name -> tensor, plus an optional '__meta__' dict of JSON values"
    if not isinstance(extra, dict):
        raise RegistryError(f"{usage}, not {type(extra).__name__}")
    meta = extra.get("__meta__", {})
    try:
        if not isinstance(meta, dict):
            raise TypeError(f"it is a {type(meta).__name__}")
        canonical(meta)
    except (TypeError, ValueError) as e:
        raise RegistryError(f"extra '__meta__' must be a dict of JSON values (no NaN): {e}") from None
    tensors = {k: v for k, v in extra.items() if k != "__meta__"}
    if not tensors:
        raise RegistryError(f"{usage}; it has no tensors (pass extra=None to store none)")
    for key, t in tensors.items():
        if not isinstance(key, str) or not key or key.startswith("__"):
            raise RegistryError(f"{usage}: name {key!r} is not a non-empty string (names starting '__' are reserved)")
        if not isinstance(t, torch.Tensor) or t.dtype not in store.DTYPE_NAMES:
            raise RegistryError(
                f"{usage}: {key!r} is {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}, not a "
                f"tensor of a dtype safetensors stores ({sorted(store.DTYPES)})"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t.detach().float()).all()):
            raise RegistryError(f"extra tensor {key!r} holds NaN or infinite values; fix it before pushing")
    return tensors, meta


def _ref(name: str, version: int, digest: str) -> Ref:
    """Ref(name, version, digest) without the frozen dataclass's slow __init__ (10,000 of them in `versions`)."""
    r = object.__new__(Ref)
    r.__dict__.update(name=name, version=version, digest=digest)
    return r


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- manifest checks


def _fail(what: str, why: str) -> IntegrityError:
    return IntegrityError(
        f"{what}: {why}; the manifest is damaged (run hub.verify(); versions are immutable, so "
        "restore the file from a backup or push the delta again)"
    )


def check_manifest(raw: bytes, name: str, version: int, what: str) -> dict[str, Any]:
    """Parse and check a manifest's bytes: structure, types, its name and version, its digest."""
    if len(raw) > MAX_MANIFEST:
        raise _fail(what, f"larger than {MAX_MANIFEST} bytes")
    try:
        man = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(what, f"not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(man, dict):
        raise _fail(what, "not a JSON object")
    types = {
        "format": str,
        "name": str,
        "version": int,
        "method": str,
        "delta_name": str,
        "config": dict,
        "base": str,
        "lineage": dict,
        "created": str,
        "meta": dict,
        "blob": dict,
        "tensors": list,
        "digest": str,
    }
    for k, t in types.items():
        if k not in man:
            raise _fail(what, f"field {k!r} is missing")
        if not isinstance(man[k], t) or (t is int and isinstance(man[k], bool)):
            raise _fail(what, f"field {k!r} is a {type(man[k]).__name__}, not a {t.__name__}")
    if man["format"] != FORMAT:
        raise _fail(what, f"format {man['format'][:40]!r} is not {FORMAT!r}")
    if man["name"] != name or man["version"] != version:
        raise _fail(what, f"it says it is {str(man['name'])[:100]}@{man['version']}, not {name}@{version}")
    if "parent" not in man:
        raise _fail(what, "field 'parent' is missing")
    p = man["parent"]
    if p is not None and not (
        isinstance(p, dict)
        and isinstance(p.get("name"), str)
        and type(p.get("version")) is int
        and isinstance(p.get("digest"), str)
    ):
        raise _fail(what, "field 'parent' is not null or {name, version, digest}")
    _check_blob_part(man, what)
    x = man.get("extra")
    if x is not None:
        if not (isinstance(x, dict) and isinstance(x.get("blob"), dict) and isinstance(x.get("tensors"), list)):
            raise _fail(what, "field 'extra' is not {blob, tensors, meta}")
        if not isinstance(x.get("meta"), dict):
            raise _fail(what, "field 'extra.meta' is not an object")
        _check_blob_part(x, f"{what} (extra)")
    try:
        digest = manifest_digest(man)
    except (TypeError, ValueError) as e:
        raise _fail(what, f"cannot be hashed ({e})") from None
    if digest != man["digest"]:
        raise _fail(what, f"its content hashes to {digest} but it records {man['digest'][:80]}")
    return man


def _check_blob_part(part: dict[str, Any], what: str) -> None:
    """The "blob" record and "tensors" list of a manifest (or of its "extra")."""
    b = part["blob"]
    if not (
        isinstance(b.get("digest"), str) and b["digest"].startswith("sha256:") and _HEX64.fullmatch(b["digest"][7:])
    ):
        raise _fail(what, "blob digest is not 'sha256:' + 64 hex digits")
    size, chunk, chunks = b.get("size"), b.get("chunk_size"), b.get("chunks")
    if type(size) is not int or size < 0 or type(chunk) is not int or chunk < 1:
        raise _fail(what, "blob size / chunk_size are not valid integers")
    n = max(1, math.ceil(size / chunk))
    if (
        not isinstance(chunks, list)
        or len(chunks) != n
        or not all(isinstance(c, str) and _HEX64.fullmatch(c) for c in chunks)
    ):
        raise _fail(what, f"blob chunks must be {n} sha256 hex digests")
    seen = set()
    for item in part["tensors"]:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], dict)
            and isinstance(item[1].get("dtype"), str)
            and item[1]["dtype"] in store.DTYPES
            and isinstance(item[1].get("shape"), list)
            and all(type(d) is int and d >= 0 for d in item[1]["shape"])
        ):
            raise _fail(what, f"tensor entry {str(item)[:80]} is not [key, {{dtype, shape}}]")
        if item[0] in seen:
            raise _fail(what, f"tensor {item[0][:80]!r} is listed twice")
        seen.add(item[0])


def _no_constant(c: str) -> Any:
    raise ValueError(f"{c} is not allowed")
