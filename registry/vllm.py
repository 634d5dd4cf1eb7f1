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

import json
import os
from pathlib import Path
from typing import Any

from registry.errors import RegistryError
from registry.hub import Hub
from registry.refs import Ref


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
