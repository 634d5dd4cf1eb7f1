"""`partial`: the survey's partial fine-tuning presets, over the depths of `surgery.recipes.depth`.

    surgery.partial(model, "top", layers=2)    # the top 2 blocks of each stack + the head train
    surgery.partial(model, "bottom", layers=4) # embeddings and the bottom 4 blocks frozen, the rest trains
    surgery.partial(model, "head")             # the head only (a linear probe)
    surgery.partial(model, "attention")        # @attn modules + the head;  "ffn": @mlp modules + the head

"The head" is what sits above the blocks of each stack (final norm, pooler, projection, head).
Only the base's parameters change; injected deltas keep their flags.
"""

from __future__ import annotations

from torch import nn

from surgery import engine
from surgery.errors import ConfigError
from surgery.recipes.depth import layout
from surgery.selectors import select
from surgery.summary import Summary, summary

__all__ = ["PRESETS", "partial"]

PRESETS = ("top", "bottom", "head", "attention", "ffn")


def partial(model: nn.Module, preset: str, layers: int | None = None) -> Summary:
    """Make exactly the base parameters of `preset` trainable (the others frozen), per stack.
    `layers`: how many blocks, for ``"top"`` and ``"bottom"`` (0..the blocks of the smallest stack).
    Returns `surgery.summary(model)`: what trains now."""
    engine.check_model(model)
    if preset not in PRESETS:
        raise ConfigError(f"unknown partial preset {preset!r}; presets: {', '.join(PRESETS)}")
    lay = layout(model)
    if (layers is not None) != (preset in ("top", "bottom")):
        raise ConfigError(f"partial({preset!r}): layers= goes with 'top' and 'bottom' (and they need it)")
    fewest = min(lay.blocks(s) for s in lay.stacks)
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or not 0 <= layers <= fewest):
        raise ConfigError(
            f"partial({preset!r}): layers must be an int in 0..{fewest} (blocks per stack), got {layers!r}"
        )
    roles = {"attention": "@attn", "ffn": "@mlp"}
    chosen = {id(p) for _, m in select(model, roles[preset]) for p in m.parameters()} if preset in roles else set()
    trains: dict[int, bool] = {}
    for name, p in model.named_parameters():
        if engine.is_adapter_path(model, name.rpartition(".")[0]) or not p.is_floating_point():
            continue
        stack, depth = lay.params[name]
        top = lay.stacks[stack]
        if preset == "top":
            flag = depth >= top - layers  # type: ignore[operator]  # layers is set for "top"
        elif preset == "bottom":
            flag = depth > layers  # type: ignore[operator]
        else:
            flag = depth == top or id(p) in chosen
        trains[id(p)] = flag
    for p in model.parameters():  # decided for all first: nothing is half applied
        if id(p) in trains and p.requires_grad != trains[id(p)]:
            p.requires_grad_(trains[id(p)])
    return summary(model)
