"""bitsandbytes' 4-bit layers as the engine meets them (ours from `surgery.quantize`, or loaded by
`transformers` with ``BitsAndBytesConfig(load_in_4bit=True)``): recognise one, read its weight
dequantised, trace the model as if its layers were plain linears. No other surgery module is
imported here: the graph and the methods' site view use it."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from surgery.errors import ConfigError

ERROR_ATTR = "surgery_nf4_error"  # max |W_nf4 - W| of a layer we quantised, kept on the module
# LoftQ's factors (L [out, k], R [k, in]: L R the best rank-k approximation of W - W_nf4), kept on a layer
# `quantize(..., loftq_rank=k)` made, for a LoRA injected with init="loftq"; not state: never saved
LOFTQ_ATTR = "surgery_loftq"
# what bitsandbytes' Linear4bit sets on top of nn.Linear (dropped when a layer turns back into one)
LINEAR4BIT_ATTRS = (
    "quant_state",
    "compute_dtype",
    "compute_type_is_set",
    "quant_storage",
    "support_avx512bf16_for_cpu",
)


def bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "4-bit quantisation needs bitsandbytes, which is not installed: pip install model-surgery[qlora]"
        ) from None
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """Whether `module`'s weight is a 4-bit bitsandbytes weight (ours or one `transformers` loaded)."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None or (
        type(getattr(module, "weight", None)).__name__ == "Params4bit"
    )


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight the module's forward uses: the dequantised one for a 4-bit layer ([out, in],
    in the dtype it was quantised from), else `module.weight` itself."""
    w = cast(torch.Tensor, module.weight)
    if not is_quantized(module):
        return w
    lib = bnb()
    qs = w.quant_state  # type: ignore[attr-defined]
    data = w.data
    if getattr(qs, "packing_format_for_cpu", False):
        # repacked by bitsandbytes' AVX512-BF16 CPU inference path (a layer transformers loaded, used in
        # eval): read it through bnb's inverse on copies, so reading never changes what the layer holds
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, qs = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(qs))
    return cast(torch.Tensor, lib.functional.dequantize_4bit(data, qs))


def loftq_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The LoftQ factors (L, R) `quantize(..., loftq_rank=k)` kept on a 4-bit layer, else None."""
    return cast("tuple[torch.Tensor, torch.Tensor] | None", module.__dict__.get(LOFTQ_ATTR))


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """Within: every 4-bit layer is a plain `nn.Linear` whose weight is a zero of the right shape
    and dtype (a broadcast scalar: no memory), so torch.export can trace the model (it cannot
    fake a bitsandbytes weight). For the graph's roles only: outputs inside are not the model's."""
    swapped: list[tuple[nn.Linear, type, torch.Tensor]] = []
    for m in model.modules():
        if is_quantized(m) and isinstance(m, nn.Linear):
            w = m.weight
            dtype = getattr(w.quant_state, "dtype", torch.float32)  # type: ignore[attr-defined]
            zero = torch.zeros((), dtype=dtype, device=w.device).expand(m.out_features, m.in_features)
            swapped.append((m, m.__class__, w))
            m.__class__ = nn.Linear
            m._parameters["weight"] = nn.Parameter(zero, requires_grad=False)
    try:
        yield
    finally:
        for m, cls, w in swapped:
            m.__class__ = cls
            m._parameters["weight"] = cast(nn.Parameter, w)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes a 4-bit layer's weight takes: packed codes, absmax (8-bit with double quantisation),
    the nested absmax and both code books."""
    w = cast(torch.Tensor, module.weight)
    qs = w.quant_state  # type: ignore[attr-defined]
    parts = [w.data, qs.absmax, qs.code]
    if qs.nested:
        parts += [qs.state2.absmax, qs.state2.code, qs.offset]
    return sum(t.numel() * t.element_size() for t in parts)


def to_linear(m: nn.Module, dtype: torch.dtype | None = None) -> float | None:
    """Turn the 4-bit layer `m` back into a plain `nn.Linear` holding its dequantised weight, in place
    (the same object: hooks and injected deltas stay attached). Returns the layer's recorded
    quantisation error, None when unknown (a layer `transformers` loaded 4-bit)."""
    w = weight_of(m).detach()
    w = w.to(dtype) if dtype is not None else w
    err = m.__dict__.pop(ERROR_ATTR, None)
    m.__dict__.pop(LOFTQ_ATTR, None)
    for attr in LINEAR4BIT_ATTRS:
        m.__dict__.pop(attr, None)
    m.__class__ = nn.Linear
    m._parameters["weight"] = nn.Parameter(w, requires_grad=False)
    return err
