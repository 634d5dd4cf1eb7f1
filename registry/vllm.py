"""Handing hub deltas to vLLM: `export_vllm` writes a version as the PEFT LoRA folder vLLM loads,
after checking it against what vLLM's LoRA loader accepts, and names the folder by the version's
content digest so an alias move can never serve stale weights (vLLM caches adapters by name).

vLLM (`PEFTHelper`) loads plain LoRA only: one `r` and `lora_alpha` for every module (it reads no
`rank_pattern` / `alpha_pattern`), `use_rslora` allowed, no DoRA, no bias, no `modules_to_save`, on
linear projections (not embeddings or the LM head), at a rank no larger than the server's
`max_lora_rank`. Anything else is refused here with the reason, instead of failing (or loading
wrongly) inside vLLM.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from registry.errors import RefError, RegistryError
from registry.hub import Hub
from registry.refs import Ref, parse

log = logging.getLogger(__name__)


class VllmExportError(RegistryError):
    """A delta that vLLM's LoRA loader would refuse or misread; the message says why."""


def check_vllm(delta: Any, max_lora_rank: int = 512) -> None:
    """Raise `VllmExportError` unless vLLM serves `delta` (a `surgery.Delta`) as it is."""
    why = f"delta {delta.name!r} ({delta.method}) cannot be served by vLLM: "
    if delta.method != "lora":
        hint = " (vLLM's DoRA support is an open PR, #47395: merge it into the base instead)"
        raise VllmExportError(why + f"vLLM loads plain LoRA only{hint if delta.method == 'dora' else ''}")
    cfg = delta.config
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise VllmExportError(
                why + f"it has a per-module {field}, which vLLM does not read (one r and lora_alpha for every module)"
            )
    ranks = {int(ts["lora_A.weight"].shape[0]) for ts in delta.sites().values()}
    if len(ranks) > 1:
        raise VllmExportError(why + f"its sites have different ranks {sorted(ranks)}; vLLM reads one r")
    r = ranks.pop()
    if r > max_lora_rank:
        raise VllmExportError(why + f"rank {r} is above max_lora_rank={max_lora_rank} (start vLLM with a larger one)")
    kinds = delta.lineage.get("site_kinds") or {}
    odd = sorted(p for p, k in kinds.items() if k not in ("linear", "conv1d_tf"))
    leaves = sorted({p.rsplit(".", 1)[-1] for p in delta.sites()})
    head = [p for p in leaves if p in ("lm_head", "embed_tokens", "wte", "embed_out")]
    if odd or head:
        raise VllmExportError(
            why
            + f"it adapts {(odd or head)[:3]}: vLLM applies LoRA to linear projections, not embeddings or the LM head"
        )


def export_vllm(
    ref: str | Ref, path: str | os.PathLike[str], *, hub: Hub | None = None, max_lora_rank: int = 512
) -> Path:
    """Write version `ref` of the hub (default: `Hub()`) as a PEFT LoRA folder vLLM loads:
    ``path/<name>@<digest>/`` with ``adapter_config.json``, ``adapter_model.safetensors`` and
    ``surgery.json`` (name, version, digest). The folder name carries the content digest, so
    `LoRARequest(lora_name=folder.name, ...)` never aliases two versions. Returns the folder."""
    from registry.peft_format import save_peft_delta

    hub = hub if hub is not None else Hub()
    r = hub.resolve(ref)
    delta = hub.pull(r)
    check_vllm(delta, max_lora_rank)
    out = Path(path) / f"{r.name.replace('/', '--')}@{r.digest.removeprefix('sha256:')[:16]}"
    save_peft_delta(delta, out)
    meta = {"name": r.name, "version": r.version, "digest": r.digest}
    (out / "surgery.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def lora_name(ref: Ref) -> str:
    """The name vLLM keys a version by: ``org/name@sha256:<16 hex>``, itself a ref to that version."""
    return f"{ref.name}@sha256:{ref.digest.removeprefix('sha256:')[:16]}"


class HubLoRAs:
    """The hub side of the vLLM resolver plugin (registry.vllm_resolver), without vLLM: a ref to the
    PEFT folder of the version it names now, exported once per digest into `cache` (default
    ``<hub>/vllm-cache``), and whether a ref vLLM has cached has moved since.

    `namespaces` (globs on ``org/name``) limit what may be served; a ref outside them, malformed, not
    in the hub, or not servable by vLLM (`check_vllm`'s reason is logged) resolves to None, which
    vLLM answers with its 404."""

    def __init__(
        self,
        hub: Hub | None = None,
        cache: str | os.PathLike[str] | None = None,
        *,
        max_lora_rank: int = 512,
        namespaces: tuple[str, ...] = ("*",),
    ) -> None:
        self.hub = hub if hub is not None else Hub()
        self.cache = Path(cache) if cache else self.hub.root / "vllm-cache"
        self.max_lora_rank = max_lora_rank
        self.namespaces = namespaces
        self.log = log  # the plugin logs through vLLM's logger instead

    @classmethod
    def from_env(cls) -> HubLoRAs:
        """From $SURGERY_HUB, $SURGERY_VLLM_CACHE, $SURGERY_VLLM_MAX_LORA_RANK (default 512) and
        $SURGERY_VLLM_NAMESPACES (comma-separated globs, default all)."""
        env = os.environ.get
        spaces = tuple(g.strip() for g in env("SURGERY_VLLM_NAMESPACES", "*").split(",") if g.strip())
        rank = env("SURGERY_VLLM_MAX_LORA_RANK", "512")
        if not rank.isdigit():
            raise VllmExportError(f"SURGERY_VLLM_MAX_LORA_RANK={rank!r}: set it to vLLM's --max-lora-rank")
        return cls(cache=env("SURGERY_VLLM_CACHE"), max_lora_rank=int(rank), namespaces=spaces)

    def _allowed(self, ref: str) -> str | None:
        """The name of `ref` where it is a well-formed ref inside the namespaces, else None."""
        try:
            name = parse(ref).name
        except RefError:
            return None
        return name if any(fnmatch.fnmatchcase(name, g) for g in self.namespaces) else None

    def folder(self, ref: str) -> tuple[str, Path] | None:
        """(`lora_name` of the version `ref` names now, its exported folder), or None (see the class)."""
        if self._allowed(ref) is None:
            return None
        try:
            r = self.hub.resolve(ref)
            out = self.cache / f"{r.name.replace('/', '--')}@{r.digest.removeprefix('sha256:')[:16]}"
            if not (out / "surgery.json").is_file():  # written last by export_vllm
                self.cache.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=self.cache, prefix=".export-"))
                try:
                    done = export_vllm(r, tmp, hub=self.hub, max_lora_rank=self.max_lora_rank)
                    with contextlib.suppress(OSError):  # another resolve of the same digest renamed first
                        os.rename(done, out)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        except VllmExportError as e:
            self.log.warning("vLLM resolver: %s refused: %s", ref, e)
            return None
        except RegistryError as e:
            self.log.info("vLLM resolver: %s not resolved: %s", ref, e)
            return None
        return lora_name(r), out

    def stale(self, ref: str, served: str) -> bool:
        """Whether `served` (the `lora_name` a resolve of `ref` gave) is no longer what `ref` names:
        its alias moved, a newer version is latest, or it is gone. Versions and digests never move."""
        name = self._allowed(ref)
        if name is None or not served.startswith(name + "@sha256:") or parse(ref).kind in ("version", "digest"):
            return False
        try:
            return lora_name(self.hub.resolve(ref)) != served
        except RegistryError:
            return True
