"""The Hugging Face Hub as the remote of a hub: push one version as one commit in
PEFT's layout plus our manifest, tagged ``v{version}``; pull a revision, pinned to
its commit sha, through ``huggingface_hub``'s cache.

A pushed repo holds::

    adapter_config.json          PEFT's config       (see registry.peft_format)
    adapter_model.safetensors    PEFT's tensor keys
    surgery_manifest.json        the version manifest as `hub.show(ref)` returns it

so PEFT, vLLM and LoRAX read it as any LoRA adapter, and a pull back into a hub
keeps the original config and base fingerprint. ``HF_HUB_OFFLINE`` is honoured:
offline, the revision is resolved and the files are read from the local cache
only, and a revision that is not cached is a clean `HfTransferError`.

Only the calls at the ``huggingface_hub`` boundary are tested here (no network):
the real upload and download have not been exercised live.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, cast

import huggingface_hub as hfh
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub import errors as hf_errors
from tqdm.auto import tqdm

import surgery
from registry.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_peft_files, save_peft_delta
from registry.refs import Ref
from surgery.errors import SurgeryError
from surgery.selectors import path_matches

MANIFEST_NAME = "surgery_manifest.json"
EXTRA_NAME = "surgery_extra.safetensors"  # tensors pushed with hub.push(..., extra=), when the version has them
PROGRESS_DELAY_S = 1.0  # progress bars appear only for transfers that take longer than this

__all__ = ["MANIFEST_NAME", "HfTransferError", "pull_hf", "push_hf"]

_SHA_RX = re.compile(r"[0-9a-f]{40}")


class HfTransferError(SurgeryError):
    """A push to or pull from the Hugging Face Hub failed (names the repo and what to do)."""


# ------------------------------------------------------------------ progress


class DelayedTqdm(tqdm):
    """huggingface_hub's download bars, shown only once a download has run PROGRESS_DELAY_S."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("delay", PROGRESS_DELAY_S)
        super().__init__(*args, **kwargs)


class _Progress:
    """A byte bar that appears only if the work is still running after `delay` seconds
    (create_commit reports no progress of its own that we can hook)."""

    def __init__(self, desc: str, total: int, delay: float | None = None) -> None:
        self.desc, self.total, self.n = desc, total, 0
        self.bar: Any = None
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(PROGRESS_DELAY_S if delay is None else delay, self._show)
        self._timer.daemon = True

    def _show(self) -> None:
        with self._lock:
            if not self._done:
                self.bar = tqdm(total=self.total, desc=self.desc, unit="B", unit_scale=True, file=sys.stderr)
                self.bar.update(self.n)

    def update(self, n: int) -> None:
        with self._lock:
            self.n += n
            if self.bar is not None:
                self.bar.update(n)

    def __enter__(self) -> _Progress:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._done = True
            if self.bar is not None:
                self.bar.close()


# ------------------------------------------------------------------ push


def _files_for(delta: surgery.Delta, manifest: dict[str, Any]) -> dict[str, bytes]:
    meta = manifest.get("meta")
    base_name = meta.get("base_model_name_or_path") if isinstance(meta, dict) else None
    with tempfile.TemporaryDirectory(prefix="surgery-push-") as tmp:
        save_peft_delta(delta, tmp, base_name)
        files = {name: (Path(tmp) / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    files[MANIFEST_NAME] = (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode()
    return files


def _extra_file(hub: Any, ref: str | Ref, manifest: dict[str, Any]) -> dict[str, bytes]:
    """The version's extra tensors (an EWC state, say) as one more file; its meta rides in the manifest."""
    if "extra" not in manifest:
        return {}
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in hub.extra(ref).items() if k != "__meta__"}
    return {EXTRA_NAME: save(tensors)}


def push_hf(
    hub: Any,
    ref: str | Ref,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    api: Any = None,
    commit_message: str | None = None,
) -> str:
    """Upload the version `ref` of `hub` to the model repo `repo_id` as one commit
    (``adapter_config.json``, ``adapter_model.safetensors``, ``surgery_manifest.json``, and
    ``surgery_extra.safetensors`` when the version holds extra tensors),
    create the repo first if needed, tag the commit ``v{version}``; return the commit sha.

    `hub` needs ``resolve(ref) -> Ref``, ``show(ref) -> dict`` and ``pull(ref) -> Delta``;
    `api` defaults to ``HfApi(token=token)``."""
    r = hub.resolve(ref)
    manifest = dict(hub.show(ref))
    delta = hub.pull(ref)
    files = _files_for(delta, manifest) | _extra_file(hub, ref, manifest)
    api = api if api is not None else HfApi(token=token)
    tag = f"v{r.version}"
    try:
        api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]
        message = commit_message or f"{r.name}@{r.version} ({r.digest})"
        with _Progress(f"push {repo_id}", sum(map(len, files.values()))) as progress:
            info = api.create_commit(repo_id, operations=ops, commit_message=message, token=token, repo_type="model")
            progress.update(sum(map(len, files.values())))
        sha = getattr(info, "oid", None)
        if not sha:
            raise HfTransferError(f"push to {repo_id}: the Hub returned no commit sha ({info!r})")
        api.create_tag(
            repo_id,
            tag=tag,
            revision=sha,
            tag_message=f"{r.name}@{r.version} {r.digest}",
            token=token,
            repo_type="model",
        )
    except (hf_errors.HfHubHTTPError, OSError) as e:  # OSError: no network, DNS, ...
        if getattr(getattr(e, "response", None), "status_code", None) == 409:
            raise HfTransferError(
                f"push to {repo_id}: tag {tag!r} already exists there (a version is pushed once; "
                f"delete the tag on the Hub to push it again): {e}"
            ) from None
        raise HfTransferError(f"push of {ref!r} to {repo_id} failed: {e}") from None
    return str(sha)


# ------------------------------------------------------------------ pull


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(hfh.constants.HF_HUB_OFFLINE) or env.upper() in {"1", "ON", "YES", "TRUE"}


def _name_from_repo(repo_id: str) -> str:
    parts = [re.sub(r"[^a-z0-9._-]+", "-", p.lower()).strip(".-") or "x" for p in repo_id.split("/")]
    return "/".join(parts[-2:]) if len(parts) > 1 else f"hf/{parts[0]}"


def _cached_sha(repo_id: str, revision: str, cache_dir: str | None) -> str | None:
    hit = hfh.try_to_load_from_cache(repo_id, CONFIG_NAME, cache_dir=cache_dir, revision=revision)
    return Path(hit).parent.name if isinstance(hit, str) else None  # .../snapshots/<commit sha>/adapter_config.json


def _not_cached(what: str, cache: str | None) -> HfTransferError:
    return HfTransferError(
        f"HF_HUB_OFFLINE is set and {what} is not in the local Hugging Face cache "
        f"({cache or hfh.constants.HF_HUB_CACHE}); pull it once with network access, or unset HF_HUB_OFFLINE"
    )


def _site_alphas(config: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    pats = config.get("alpha_pattern") or {}
    return {p: next((v for k, v in pats.items() if path_matches(k, p)), config.get("alpha")) for p in paths}


def _merge_manifest(delta: surgery.Delta, manifest: dict[str, Any]) -> None:
    """Keep what our manifest knows and PEFT's config cannot say: the base fingerprint,
    the original config (glob patterns, init), its lineage, when it agrees with the tensors."""
    base = manifest.get("base") or manifest.get("base_fingerprint")
    if isinstance(base, str):
        delta.base = base
    cfg = manifest.get("config")
    if manifest.get("method", "lora") in ("lora", "dora") and isinstance(cfg, dict):
        paths = list(delta.sites())
        if _site_alphas(cfg, paths) == _site_alphas(delta.config, paths) and bool(cfg.get("rslora")) == bool(
            delta.config.get("rslora")
        ):
            delta.config = dict(cfg)
        else:
            warnings.warn(
                f"{MANIFEST_NAME}: its config does not give the alphas the PEFT config gives; the PEFT config is used",
                stacklevel=3,
            )
    if isinstance(manifest.get("lineage"), dict):
        delta.lineage = {**manifest["lineage"], **delta.lineage}


def pull_hf(
    hub: Any,
    repo_id: str,
    revision: str = "main",
    name: str | None = None,
    *,
    token: str | None = None,
    api: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> Any:
    """Download the LoRA adapter at `revision` (branch, tag such as ``v3``, or commit sha)
    of `repo_id`, pinned to the commit sha it resolves to, and push it into `hub` as
    `name` (default: from the repo id) with ``{"hf_repo", "hf_revision", "hf_sha"}`` in
    its metadata and lineage. Returns the hub's Ref.

    Downloads go through ``hf_hub_download`` and its cache. With ``HF_HUB_OFFLINE=1`` the
    revision is resolved and read from the cache alone; nothing cached is an error."""
    cache = str(cache_dir) if cache_dir is not None else None
    offline = _offline()
    where = f"{repo_id}@{revision}"
    names: set[str] | None = None
    sha: str | None
    if _SHA_RX.fullmatch(revision):
        sha = revision
    elif offline:
        sha = _cached_sha(repo_id, revision, cache)
    else:
        api = api if api is not None else HfApi(token=token)
        try:
            info = api.model_info(repo_id, revision=revision, token=token)
        except hf_errors.RepositoryNotFoundError:
            raise HfTransferError(f"{repo_id} is not a model repo on the Hub (or it is private: pass token=)") from None
        except hf_errors.RevisionNotFoundError:
            raise HfTransferError(f"{repo_id} has no revision {revision!r} (branch, tag or commit sha)") from None
        except (hf_errors.HfHubHTTPError, OSError) as e:
            raise HfTransferError(f"cannot resolve {where}: {e}; set HF_HUB_OFFLINE=1 to use the local cache") from None
        sha = getattr(info, "sha", None)
        siblings = getattr(info, "siblings", None)
        if siblings:
            names = {s.rfilename for s in siblings}
    if not sha:
        if offline:
            raise _not_cached(where, cache)
        raise HfTransferError(f"the Hub gave no commit sha for {where}")
    if names is not None:
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in names]
        if missing:
            note = " (adapter_model.bin is pickle and never loaded here)" if "adapter_model.bin" in names else ""
            raise HfTransferError(f"{where} ({sha[:12]}) has no {', '.join(missing)}{note}; files: {sorted(names)}")

    def get(filename: str, required: bool) -> str | None:
        try:
            return hfh.hf_hub_download(
                repo_id,
                filename,
                revision=sha,
                token=token,
                cache_dir=cache,
                local_files_only=offline,
                tqdm_class=DelayedTqdm,
            )
        except hf_errors.LocalEntryNotFoundError:
            if not required:
                return None
            if offline:
                raise _not_cached(f"{filename} of {where} ({sha[:12]})", cache) from None
            raise HfTransferError(
                f"cannot download {filename} of {where}: not cached and the Hub cannot be reached"
            ) from None
        except hf_errors.EntryNotFoundError:
            if not required:
                return None
            raise HfTransferError(f"{where} ({sha[:12]}) has no {filename}") from None
        except (hf_errors.HfHubHTTPError, OSError) as e:
            raise HfTransferError(f"cannot download {filename} of {where}: {e}") from None

    config_path = get(CONFIG_NAME, True)
    weights_path = get(WEIGHTS_NAME, True)
    extra: dict[str, Any] | None = None
    manifest_path = get(MANIFEST_NAME, False) if names is None or MANIFEST_NAME in names else None
    assert config_path is not None and weights_path is not None
    target = name or _name_from_repo(repo_id)
    short = re.sub(r"[^A-Za-z0-9_-]", "_", target.rsplit("/", 1)[-1])[:64] or "default"
    delta = read_peft_files(config_path, weights_path, name=short)
    if manifest_path is not None:
        try:
            manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HfTransferError(f"{MANIFEST_NAME} of {where} is not valid JSON: {e}") from None
        if isinstance(manifest, dict):
            _merge_manifest(delta, manifest)
            if isinstance(manifest.get("extra"), dict):  # pushed with extra tensors: they come too, or nothing does
                extra = _read_extra(cast(str, get(EXTRA_NAME, True)), manifest["extra"], where)
    hf = {"hf_repo": repo_id, "hf_revision": revision, "hf_sha": sha}
    delta.lineage.update(hf)
    if extra is not None:
        return hub.push(delta, target, meta={**(meta or {}), **hf}, extra=extra)
    return hub.push(delta, target, meta={**(meta or {}), **hf})


def _read_extra(path: str, entry: dict[str, Any], where: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors: dict[str, Any] = load_file(path)
    except (OSError, SafetensorError) as e:
        raise HfTransferError(f"{EXTRA_NAME} of {where} cannot be read: {e}") from None
    if sorted(tensors) != sorted(k for k, _ in entry.get("tensors", [])):
        raise HfTransferError(f"{EXTRA_NAME} of {where} does not hold the tensors its manifest names")
    if entry.get("meta"):
        tensors["__meta__"] = entry["meta"]
    return tensors
