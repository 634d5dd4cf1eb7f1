"""A 4-bit NF4 base (QLoRA, Dettmers et al., 2023) under any delta, through bitsandbytes.

`quantize(model, "nf4")` replaces the frozen linear layers, in place, by bitsandbytes'
`Linear4bit`: weights in 4-bit NormalFloat, one absmax per block of 64, the absmax values
themselves quantised to 8 bits in blocks of 256 (double quantisation): 4.127 bits a weight.
These are the very layers `transformers` builds for ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")``, so a model quantised here and one loaded that way are the same
to every delta method (docs/qlora.md: why bitsandbytes rather than torchao).

Deltas then go on top (`surgery.inject`): those that add to the output (LoRA, adapters, IA3,
prefixes, prompts, bias deltas) never read the 4-bit weight; those that read the base weight
(DoRA's column norm, the weight-space methods' shapes) read it dequantised (`weight_of`).
A delta never merges into a 4-bit weight: `surgery.merge` refuses, and `dequantize(model)`
turns the layers back into plain linears first (with the error against the original weights).

`quantize(..., loftq_rank=k)` also keeps, per layer, the best rank-k approximation L R of what
rounding lost, W - W_nf4 (LoftQ, Li et al., 2023, one iteration: the 4-bit codes are those of
plain NF4); a LoRA injected with ``init="loftq"`` starts from it, so QLoRA starts from (nearly)
the full-precision model rather than the rounded one.

bitsandbytes is an optional dependency: ``pip install model-surgery[qlora]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from surgery.errors import ConfigError, InjectionError, ModelTypeError
from surgery.fourbit import ERROR_ATTR, LOFTQ_ATTR, is_quantized, quantized_bytes, to_linear, weight_of
from surgery.fourbit import bnb as _bnb
from surgery.selectors import select

SCHEMES = ("nf4",)
BLOCK = 64  # QLoRA's block; the absmax values' block of 256 is bitsandbytes' fixed choice


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """What `quantize` did: the layers it replaced, the bytes of their weights before and after,
    the largest absolute difference between a 4-bit weight and its original, and the mean over
    layers of ‖W - W_nf4‖ / ‖W‖; with `loftq_rank`, the same with LoftQ's correction added,
    ‖W - W_nf4 - L R‖ / ‖W‖ (what a LoRA with ``init="loftq"`` starts from)."""

    scheme: str
    layers: tuple[str, ...]
    bytes_before: int
    bytes_after: int
    max_abs_error: float
    rel_error: float = 0.0
    loftq_rank: int | None = None
    loftq_rel_error: float | None = None

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


def _head_paths(model: nn.Module) -> set[str]:
    """The output head: `get_output_embeddings()` of a transformers model, and any linear whose
    weight is an embedding's (tied): transformers' bitsandbytes loader keeps these too."""
    heads: set[str] = set()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for path, m in model.named_modules():
        if m is out or (isinstance(m, nn.Linear) and id(m.weight) in emb):
            heads.add(path)
    return heads


def quantize(
    model: nn.Module,
    scheme: str = "nf4",
    *,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    targets: Any = None,
    skip: Any = None,
    loftq_rank: int | None = None,
) -> QuantReport:
    """Quantise the model's linear layers to 4-bit NF4, in place; returns a `QuantReport`.

    `targets`: a selector (as for `surgery.inject`) of the linears to quantise; default every
    `nn.Linear`. `skip`: a selector of linears to keep in full precision; default the output
    head (and linears tied to an embedding), as transformers does. `double_quant` quantises the
    per-block absmax too (0.127 instead of 0.5 bits a weight); `compute_dtype` is the dtype the
    4-bit layers compute in (default: the dtype of the weight they replace). `loftq_rank`: keep
    on each layer the best rank-`loftq_rank` approximation of its rounding error (an SVD of
    W - W_nf4 per layer), for LoRAs injected with ``init="loftq"`` of rank up to it; it takes
    the memory of one such LoRA and is never saved.

    Quantise the base before injecting deltas; a layer is quantised once."""
    from surgery.engine.state import check_model, state_of

    check_model(model)
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantisation scheme {scheme!r}; known: {list(SCHEMES)}")
    st = state_of(model)
    if st is not None and st.entries:
        raise InjectionError(
            f"the model has deltas injected ({sorted(st.entries)}): quantise the base first, then inject "
            "(surgery.remove(model) takes them out; save them with surgery.delta first)"
        )
    bnb = _bnb()
    skipped = _head_paths(model) if skip is None else {p for p, _ in select(model, skip)}
    hits = [(p, m) for p, m in select(model, targets if targets is not None else nn.Linear) if p not in skipped]
    done = [p for p, m in hits if is_quantized(m)]
    if done:
        raise ConfigError(f"layers {done[:4]}{'...' if len(done) > 4 else ''} are already 4-bit; quantise a layer once")
    layers = [(p, m) for p, m in hits if type(m) is nn.Linear]
    if not layers:
        raise ConfigError(
            f"targets {targets!r} (less skip {skip!r}) hit no nn.Linear to quantise; "
            "use surgery.find(model, targets) to preview a selector"
        )
    if loftq_rank is not None:
        if not isinstance(loftq_rank, int) or isinstance(loftq_rank, bool) or loftq_rank <= 0:
            raise ConfigError(
                f"loftq_rank must be a positive integer (the largest LoRA rank to start), got {loftq_rank!r}"
            )
        small = [
            (p, min(m.in_features, m.out_features))
            for p, m in layers
            if min(m.in_features, m.out_features) < loftq_rank
        ]
        if small:
            raise ConfigError(
                f"loftq_rank={loftq_rank} exceeds the rank of layer {small[0][0]!r} ({small[0][1]}); "
                "use a lower loftq_rank or leave that layer out with skip="
            )
    before = after = 0
    err = 0.0
    rel: list[float] = []
    rel_loftq: list[float] = []
    for path, lin in layers:
        w = lin.weight.detach()
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=compute_dtype or w.dtype,
            compress_statistics=double_quant,
            quant_type=scheme,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            w, requires_grad=False, blocksize=BLOCK, compress_statistics=double_quant, quant_type=scheme, module=q
        )._quantize(w.device)
        if lin.bias is not None:
            q.bias = lin.bias
        q.train(lin.training)
        # bitsandbytes' AVX512-BF16 CPU inference path repacks the weight in place on the first eval
        # forward (absmax rounded to bf16: the stored weight changes) and computes in bf16 whatever
        # compute_dtype says; kept off, the layer computes the dequantised weight in compute_dtype on every CPU
        q.support_avx512bf16_for_cpu = False
        residual = w.float() - weight_of(q).float()
        layer_err = float(residual.abs().max())
        q.__dict__[ERROR_ATTR] = layer_err
        norm = float(w.float().norm()) or 1.0
        rel.append(float(residual.norm()) / norm)
        if loftq_rank is not None:
            q.__dict__[LOFTQ_ATTR] = lr = _low_rank(residual, loftq_rank)
            rel_loftq.append(float((residual - lr[0] @ lr[1]).norm()) / norm)
        del residual
        err = max(err, layer_err)
        before += w.numel() * w.element_size()
        after += quantized_bytes(q)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, q)
    done_paths = {p for p, _ in layers}
    kept = [p for p, m in model.named_modules() if type(m) is nn.Linear and p not in done_paths]
    _record_in_config(model, scheme, double_quant, compute_dtype or layers[0][1].weight.dtype, kept)
    return QuantReport(
        scheme,
        tuple(p for p, _ in layers),
        before,
        after,
        err,
        sum(rel) / len(rel),
        loftq_rank,
        sum(rel_loftq) / len(rel_loftq) if rel_loftq else None,
    )


def _low_rank(residual: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R the best rank-k approximation of `residual` (fp32), the singular values split
    evenly between the factors as LoftQ does: L = U sqrt(S), R = sqrt(S) V^T."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:k].sqrt()
    return (U[:, :k] * root).contiguous(), (root[:, None] * Vh[:k]).contiguous()


def _record_in_config(model: nn.Module, scheme: str, double_quant: bool, dtype: torch.dtype, kept: list[str]) -> None:
    """A transformers model says in its config how it is quantised, as a 4-bit load does: then
    `save_pretrained` writes a checkpoint `from_pretrained` loads back 4-bit (the linears left in
    full precision named, escaped, in `llm_int8_skip_modules`)."""
    import re

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return
    from transformers import BitsAndBytesConfig

    config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=scheme,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=[re.escape(p) for p in kept] or None,
    )


@dataclasses.dataclass(frozen=True)
class DequantReport:
    """What `dequantize` did: the layers it turned back into `nn.Linear`, and the largest
    absolute difference of their weights from the original full-precision ones (known for
    layers `quantize` made; None when some came 4-bit from elsewhere, a transformers load)."""

    layers: tuple[str, ...]
    max_abs_error: float | None


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> DequantReport:
    """Turn every 4-bit layer back into a plain `nn.Linear` holding its dequantised weight (in
    `dtype`, default the dtype it was quantised from), in place: the outputs stay those of the
    4-bit model, and deltas can then merge (`surgery.merge`). Works with deltas injected (each
    layer keeps its identity, so its deltas stay attached)."""
    from surgery.engine.state import check_model

    check_model(model)
    layers = [(p, m) for p, m in model.named_modules() if is_quantized(m) and isinstance(m, nn.Linear)]
    if not layers:
        raise ModelTypeError(f"{type(model).__name__} has no 4-bit layer to dequantise")
    errs = [to_linear(m, dtype) for _, m in layers]
    known = [e for e in errs if e is not None]
    return DequantReport(tuple(p for p, _ in layers), max(known) if len(known) == len(errs) else None)
