"""The vLLM plugin that serves hub refs: ``model="acme/sql@prod"`` in a request to a vLLM OpenAI server
resolves through the hub to the version the ref names at that moment.

vLLM (0.32) loads it through the entry point ``vllm.general_plugins: surgery_hub`` of this package
(in every vLLM process). Start the server with LoRA and runtime adapter loading on::

    SURGERY_HUB=./hub VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 VLLM_PLUGINS=surgery_hub \\
    SURGERY_VLLM_MAX_LORA_RANK=8 vllm serve ./base --enable-lora --max-lora-rank 8 --max-loras 4

- ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``: without it vLLM never asks a resolver.
- ``VLLM_PLUGINS``: unset loads every installed plugin; a list must name ``surgery_hub``.
- ``SURGERY_HUB``: the hub folder (default: `registry.hub.default_path`).
- ``SURGERY_VLLM_CACHE``: where versions are exported as PEFT folders (default ``<hub>/vllm-cache``).
- ``SURGERY_VLLM_MAX_LORA_RANK``: vLLM's ``--max-lora-rank``; a version above it is refused here.
- ``SURGERY_VLLM_NAMESPACES``: comma-separated globs of names that may be served (default all).

A resolved version is keyed by its content digest (its LoRARequest is named ``org/name@sha256:<16
hex>``, exported to a folder of that name), so two versions never share vLLM's adapter cache, which
is keyed by name (vLLM #42125). vLLM's serving layer also keeps the requested name -> LoRARequest
forever (``OpenAIServingModels.lora_requests``: the resolver is asked once per name), so a moved
alias would keep serving the old version; this plugin swaps that dict for one in which a mutable
ref (alias, latest) whose version changed reads as absent, so vLLM resolves it again. A ref that is
malformed, outside the namespaces, not in the hub, or not servable by vLLM (DoRA, other methods,
rank patterns, ...: `check_vllm`'s reason is logged) resolves to None: vLLM's 404.
"""

from __future__ import annotations

import asyncio
from typing import Any

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from registry.vllm import HubLoRAs

NAME = "surgery-hub"


class HubResolver(LoRAResolver):
    """vLLM's `LoRAResolver` over the hub (see the module docstring)."""

    def __init__(self, loras: HubLoRAs) -> None:
        self.loras = loras

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        found = await asyncio.to_thread(self.loras.folder, lora_name)  # hub reads and the export block
        if found is None:
            return None
        name, folder = found
        return LoRARequest(lora_name=name, lora_int_id=1, lora_path=str(folder))  # vLLM sets the id


class _FreshRequests(dict[str, Any]):
    """vLLM's requested name -> LoRARequest cache, where a mutable hub ref whose version moved is absent."""

    def __init__(self, items: dict[str, Any], loras: HubLoRAs) -> None:
        super().__init__(items)
        self.loras = loras

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or name not in self.keys():
            return False
        return not self.loras.stale(name, self[name].lora_name)


def register() -> None:
    """The entry point vLLM calls (maybe more than once per process): register the resolver and make
    the serving layer's name cache follow alias moves."""
    from vllm.entrypoints.openai.models import serving
    from vllm.logger import init_logger

    loras = HubLoRAs.from_env()
    loras.log = init_logger("vllm.surgery_hub")  # under vLLM's handler, in the server's log
    LoRAResolverRegistry.register_resolver(NAME, HubResolver(loras))
    models = serving.OpenAIServingModels
    if getattr(models, "_surgery_fresh", False):
        return
    init = models.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.lora_requests = _FreshRequests(self.lora_requests, loras)

    models.__init__ = __init__
    models._surgery_fresh = True
