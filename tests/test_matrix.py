"""The cross-architecture matrix (issue 9): every architecture x every method, with default targets.

Each cell's outcome is explicit data in `EXPECTED`: "works" or "refused". A cell that works must keep
every promise of its method (identity at injection, one real training step that touches only the delta,
exact merge/unmerge or a MergeError, `remove` bit-exact, `generate()` with the cache for generative
models); a refused cell must raise a `SurgeryError` at inject and leave the model untouched. Any other
behaviour (a crash later, a raw exception, a silent no-op) fails the cell. Cells that fail today are
marked `xfail(strict=True)` in `KNOWN_FAILING` with the diagnosis, so a fix turns them into XPASS: then
remove the mark. `python tests/test_matrix.py` prints the table shown in docs/matrix.md.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script too (docs table)

import models  # noqa: E402
from _helpers import assert_snapshot_equal, assert_state_equal, snapshot, state_bits  # noqa: E402

import surgery  # noqa: E402
from surgery import graph  # noqa: E402

# ----------------------------------------------------------------------------- the table

ARCHS: dict[str, str] = {  # matrix row -> factory in tests/models.py
    "llama": "tiny_llama",
    "gpt2": "tiny_gpt2",
    "gptj": "tiny_gptj",
    "bert": "tiny_bert",
    "roberta": "tiny_roberta",
    "deberta_v2": "tiny_deberta_v2",
    "t5": "tiny_t5",
    "bart": "tiny_bart",
    "whisper": "tiny_whisper",
    "clip": "tiny_clip",
    "vit": "tiny_vit",
    "resnet": "tiny_resnet",
    "convnext": "tiny_convnext",
    "bloom": "tiny_bloom",
    "falcon": "tiny_falcon",
    "mixtral": "tiny_mixtral",
    "qwen2_moe": "tiny_qwen2_moe",
    "mamba": "tiny_mamba",
    "mlp": "tiny_mlp",
    "cnn": "tiny_cnn",
}

# matrix column -> (method, config). Targets are the method's defaults unless the column names them.
COLUMNS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {"r": 4}),
    "lora@linear": ("lora", {"r": 4, "targets": "@linear"}),
    "lora@attn": ("lora", {"r": 4, "targets": "@attn"}),
    "houlsby": ("adapter", {"style": "houlsby", "bottleneck": 8}),
    "pfeiffer": ("adapter", {"style": "pfeiffer", "bottleneck": 8}),
    "parallel": ("adapter", {"style": "parallel", "bottleneck": 8}),
    "fusion": ("fusion", {}),  # surgery.fuse over two default (pfeiffer) adapters
    "moe": ("moe", {"experts": 2}),
    "lora_moe": ("lora_moe", {"experts": 2, "r": 4}),
    "prefix": ("prefix", {"n_tokens": 4}),
    "prompt": ("prompt", {"n_tokens": 4}),
    "ia3": ("ia3", {}),  # keys, values, the FFN's input
    "dora": ("dora", {"r": 4}),
    "vera": ("vera", {"r": 8}),
    "loha": ("loha", {"r": 4}),
    "lokr": ("lokr", {"r": 4}),
    "bitfit": ("bitfit", {}),  # every bias, and every linear layer
    "sparse": ("sparse", {"density": 0.05}),  # @linear
    "diffpruning": ("diffpruning", {"sparsity": 0.05}),  # @linear
}

# the columns that merge; the others must raise MergeError on merge
MERGEABLE = {
    "lora",
    "lora@linear",
    "lora@attn",
    "ia3",
    "dora",
    "vera",
    "loha",
    "lokr",
    "bitfit",
    "sparse",
    "diffpruning",
}
CHANGES_OUTPUT = {"prefix", "prompt"}  # by design; every other column is the identity at injection

FUSED_EXPERTS = {"mixtral", "qwen2_moe"}
ATTENTION = {
    "llama",
    "gpt2",
    "gptj",
    "bert",
    "roberta",
    "deberta_v2",
    "t5",
    "bart",
    "whisper",
    "clip",
    "vit",
    "bloom",
    "falcon",
    "mixtral",
    "qwen2_moe",
}
# A sublayer the FFN adapters sit after (@mlp.down) or around (@mlp). Mixtral's and Qwen2-MoE's experts are
# fused 3-D tensors with no Linear to sit on (Qwen2-MoE's shared expert beside them is one, by name). Mamba's
# mixer is its blocks' one sublayer. ResNet, the plain MLP and CNN have none.
FFN = ATTENTION - FUSED_EXPERTS | {"convnext", "mamba"}
# The FFN is one module that computes it from its input alone, so it can be copied as an expert. Not BART,
# Whisper, ConvNeXt (bare Linears, the activation called in the layer's forward), Bloom (its MLP adds the
# residual itself: forward(x, residual)), Mamba (the mixer is not position-wise).
FFN_MODULE = FFN - {"bart", "whisper", "convnext", "bloom", "mamba"}
# Attention reached through transformers' attention interface or a traceable sdpa call. DeBERTa-v2
# (disentangled attention), Bloom (alibi, baddbmm) and Falcon call their own attention code.
PREFIX = ATTENTION - {"deberta_v2", "bloom", "falcon"}
# Token ids through the input embedding (CLIP: its text tower). Whisper reads audio features, ViT / ResNet /
# ConvNeXt / the CNN pixels, the plain MLP features.
PROMPT = ATTENTION - {"whisper", "vit"} | {"mamba"}


def _expected() -> dict[tuple[str, str], str]:
    """What a PEFT user would expect; the reasons are in docs/matrix.md."""
    exp: dict[tuple[str, str], str] = {}
    for arch in ARCHS:
        attn, ffn = arch in ATTENTION, arch in FFN

        def ok(cond: bool) -> str:
            return "works" if cond else "refused"

        exp[arch, "lora"] = ok(attn)  # @q @v @qkv: none without attention
        exp[arch, "lora@linear"] = "works"
        exp[arch, "lora@attn"] = ok(attn)
        exp[arch, "houlsby"] = ok(attn or ffn)  # @o and @mlp.down: either is enough
        exp[arch, "pfeiffer"] = ok(ffn)  # @mlp.down
        exp[arch, "parallel"] = ok(ffn)  # @mlp
        exp[arch, "fusion"] = ok(ffn)  # over two pfeiffer adapters
        exp[arch, "moe"] = ok(arch in FFN_MODULE)  # @mlp, copied as experts
        exp[arch, "lora_moe"] = ok(attn)  # LoRA's targets
        exp[arch, "prefix"] = ok(arch in PREFIX)
        exp[arch, "prompt"] = ok(arch in PROMPT)
        exp[arch, "ia3"] = ok(attn or ffn)  # @k @v @qkv @mlp.down: either is enough
        for column in ("dora", "vera", "loha", "lokr"):
            exp[arch, column] = ok(attn)  # LoRA's targets
        exp[arch, "bitfit"] = exp[arch, "sparse"] = exp[arch, "diffpruning"] = (
            "works"  # every architecture has linear layers
        )
    return exp


EXPECTED: dict[tuple[str, str], str] = _expected()

# Works, but covers less than the targets mean (the FFN's fused experts are left out): inject must say so
# with a FusedExpertsWarning. No other cell may warn it.
PARTIAL = {
    (arch, column)
    for arch in FUSED_EXPERTS
    for column in ("houlsby", "lora@linear", "ia3", "bitfit", "sparse", "diffpruning")
}

# Cells whose behaviour today differs from EXPECTED (a later crash, a raw exception, a silent no-op, or a
# refusal where the table says works): (arch, column) -> diagnosis. strict: a fix makes it XPASS.
KNOWN_FAILING: dict[tuple[str, str], str] = {}


# ----------------------------------------------------------------------------- models and inputs


@dataclass
class Base:
    model: nn.Module
    inputs: dict[str, Any] | torch.Tensor
    out: torch.Tensor
    gen: torch.Tensor | None  # greedy tokens of the base model (generative models only)


_BASES: dict[str, Base] = {}
_GRAPHS: dict[str, Any] = {}  # arch -> a graph-cache entry to seed each copy with (tracing is the slow part)
GEN_TOKENS = 3


def _output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    return out[0]


def forward(model: nn.Module, inputs: dict[str, Any] | torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _output(model(**inputs) if isinstance(inputs, dict) else model(inputs)).detach().clone()


def generative(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(callable(can) and can())


def generate(model: nn.Module, inputs: dict[str, Any], use_cache: bool = True) -> torch.Tensor:
    kw = {k: v for k, v in inputs.items() if not k.startswith("decoder_") and k != "labels"}
    pad = getattr(model.config, "pad_token_id", None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            **kw,
            max_new_tokens=GEN_TOKENS,
            min_new_tokens=GEN_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0 if pad is None else pad,
        )


def base(arch: str) -> Base:
    if arch not in _BASES:
        factory: Callable[[], nn.Module] | None = getattr(models, ARCHS[arch], None)
        if factory is None:
            pytest.skip(f"tests/models.py has no {ARCHS[arch]}() yet")
        model = factory()
        inputs = models.batch_for(model)
        gen = generate(model, inputs) if generative(model) else None  # type: ignore[arg-type]
        _BASES[arch] = Base(model, inputs, forward(model, inputs), gen)
    return _BASES[arch]


def fresh(arch: str) -> nn.Module:
    """A deep copy of the architecture's model, its role graph seeded from earlier cells when known."""
    model = copy.deepcopy(base(arch).model)
    known = _GRAPHS.get(arch)
    cache = getattr(graph, "_CACHE", None)  # private: only a speed-up, skipped if it moves
    if known is not None and cache is not None:
        cache[model] = type(known)(graph=known.graph, roles=known.roles)
    return model


def keep_graph(arch: str, model: nn.Module) -> None:
    entry = getattr(graph, "_CACHE", {}).get(model)
    if entry is None or not hasattr(entry, "roles"):
        return
    known = _GRAPHS.setdefault(arch, type(entry)())
    known.graph = known.graph if known.graph is not None else entry.graph
    known.roles = known.roles if known.roles is not None else entry.roles


def loss_of(model: nn.Module, inputs: dict[str, Any] | torch.Tensor) -> torch.Tensor:
    """A real loss: the model's own (LM, seq2seq, classification, contrastive) where it has one."""
    if not isinstance(inputs, dict):
        return _output(model(inputs)).float().pow(2).mean()
    kw = dict(inputs)
    cls = type(model).__name__
    if cls.endswith("ForCausalLM"):
        kw["labels"] = kw["input_ids"].clone()
    elif cls.endswith("ForConditionalGeneration") and "decoder_input_ids" in kw:
        kw["labels"] = kw["decoder_input_ids"].clone()
    elif cls.endswith("ForImageClassification"):
        n = next(iter(kw.values())).shape[0]
        kw["labels"] = torch.arange(n) % model.config.num_labels
    elif cls in ("CLIPModel", "SiglipModel"):
        kw["return_loss"] = True
    out = model(**kw)
    loss = getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else _output(out).float().pow(2).mean()


# ----------------------------------------------------------------------------- one cell


def is_delta(name: str) -> bool:
    return name.startswith("surgery.") or ".surgery." in name


def inject(model: nn.Module, column: str, caught: list[warnings.WarningMessage] | None = None) -> str:
    """Inject the column's method with its default targets; return the delta's name. The package's
    warnings go to `caught` when given."""
    method, cfg = COLUMNS[column]
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        try:
            if method == "fusion":
                surgery.inject(model, "adapter", name="a", bottleneck=8)
                surgery.inject(model, "adapter", name="b", bottleneck=8)
                surgery.fuse(model, ["a", "b"], name="fusion")
                return "fusion"
            surgery.inject(model, method, name="cell", **cfg)
            return "cell"
        finally:
            if caught is not None:
                caught.extend(w for w in got if w.category.__module__.startswith("surgery"))


def close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=0, atol=atol))


def check_refused(arch: str, column: str) -> None:
    model = fresh(arch)
    before = snapshot(model)
    try:
        inject(model, column)
    except surgery.SurgeryError:
        pass
    except Exception as e:  # noqa: BLE001  (a raw exception is exactly what the matrix reports)
        raise AssertionError(f"refused with a raw {type(e).__name__} instead of a SurgeryError: {e}") from e
    else:
        raise AssertionError(f"{column} was not refused on {arch}: inject succeeded")
    finally:
        keep_graph(arch, model)
    if column == "fusion" and surgery.names(model):  # the adapters went in, fuse refused: drop them
        surgery.remove(model)
    assert_snapshot_equal(before, snapshot(model))


def check_works(arch: str, column: str) -> None:
    b = base(arch)
    model = fresh(arch)
    before = snapshot(model)
    caught: list[warnings.WarningMessage] = []
    try:
        name = inject(model, column, caught)
    finally:
        keep_graph(arch, model)
    x = b.inputs
    fused = [str(w.message) for w in caught if w.category.__name__ == "FusedExpertsWarning"]
    if (arch, column) in PARTIAL:
        assert fused, "the fused experts are left out silently: inject gave no FusedExpertsWarning"
    else:
        assert not fused, f"a FusedExpertsWarning where nothing is left out: {fused[0][:200]}"

    # 1. identity at injection (prefix / prompt: disabled equals the base, enabled changes the output)
    out = forward(model, x)
    with surgery.disable(model):
        assert close(forward(model, x), b.out, 1e-5), "surgery.disable(model) does not give the base's output"
    if column in CHANGES_OUTPUT:  # exact: a delta that does not run leaves every bit as it was
        assert not torch.equal(out, b.out), f"{column} injected but the output did not change: a silent no-op"
    else:
        assert close(out, b.out, 1e-5), f"not the identity at injection: max |diff| {(out - b.out).abs().max():.3g}"

    # 2. one optimizer step on a real loss changes only the delta, with finite gradients
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing is trainable after inject"
    outside = [n for n in trainable if not is_delta(n)]
    assert not outside, f"base parameters are trainable: {outside[:3]}"
    frozen = {k: v for k, v in state_bits(model).items() if not is_delta(k) or k not in trainable}
    was = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    loss = loss_of(model, x)
    assert torch.isfinite(loss), f"loss is {loss.item()}"
    loss.backward()
    grads = {n: p.grad for n, p in trainable.items() if p.grad is not None}
    assert grads, "no gradient reached the delta"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients on {bad[:3]}"
    assert any(g.abs().max() > 0 for g in grads.values()), "every gradient on the delta is zero"
    opt.step()
    opt.zero_grad(set_to_none=True)
    now = state_bits(model)
    assert_state_equal(frozen, {k: now[k] for k in frozen})
    assert any(not torch.equal(was[n], p.detach()) for n, p in trainable.items()), "the step changed no tensor"
    trained = forward(model, x)
    # exact, not a tolerance: a layer scale (ConvNeXt's) shrinks any FFN change
    assert not torch.equal(trained, out), "one training step did not change the output: the delta does not run"

    # 3. merge / unmerge: bit-exact where mergeable, MergeError otherwise
    pre = state_bits(model)
    if column in MERGEABLE:
        surgery.merge(model, name)
        assert name in surgery.merged(model)
        assert close(forward(model, x), trained, 1e-4), "the merged model's output differs from the live delta's"
        surgery.unmerge(model, name)
        assert_state_equal(pre, state_bits(model))
        assert torch.equal(forward(model, x), trained), "unmerge did not restore the output bit for bit"
    else:
        with pytest.raises(surgery.MergeError):
            surgery.merge(model, name)
        assert_state_equal(pre, state_bits(model))
        assert not surgery.merged(model)

    # 4. generate(): greedy tokens with the cache equal those without; disabled equals the base's
    if b.gen is not None:
        assert isinstance(x, dict)
        cached = generate(model, x, use_cache=True)
        assert cached.shape[-1] >= GEN_TOKENS
        assert torch.equal(cached, generate(model, x, use_cache=False)), "generate() with the cache differs"
        with surgery.disable(model):
            assert torch.equal(generate(model, x), b.gen), "generate() under disable differs from the base"

    # 5. remove: the original model, bit for bit, and its output
    surgery.remove(model)
    assert_snapshot_equal(before, snapshot(model))
    assert torch.equal(forward(model, x), b.out), "after remove the output is not the base's"


def check_cell(arch: str, column: str) -> None:
    (check_works if EXPECTED[arch, column] == "works" else check_refused)(arch, column)


def _params() -> list[Any]:
    out = []
    for arch in ARCHS:
        for column in COLUMNS:
            reason = KNOWN_FAILING.get((arch, column))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(arch, column, id=f"{arch}-{column}", marks=marks))
    return out


@pytest.mark.parametrize(("arch", "column"), _params())
def test_cell(arch: str, column: str) -> None:
    torch.manual_seed(0)
    check_cell(arch, column)


def test_table_is_complete() -> None:
    assert set(EXPECTED) == {(a, c) for a in ARCHS for c in COLUMNS}
    assert set(EXPECTED.values()) <= {"works", "refused"}
    assert set(KNOWN_FAILING) <= set(EXPECTED)
    # task heads are no site-level column: they change no plain output (tests/test_heads.py)
    assert {m for m, _ in COLUMNS.values()} == set(surgery.METHODS) - {"head"}


# ----------------------------------------------------------------------------- the docs table


def table() -> str:
    """Markdown: architecture x column -> works / refused; (warns): a FusedExpertsWarning; bold: fails today."""
    head = "| | " + " | ".join(COLUMNS) + " |\n|" + " --- |" * (len(COLUMNS) + 1) + "\n"
    rows = []
    for arch in ARCHS:
        cells = []
        for column in COLUMNS:
            v = EXPECTED[arch, column] + (" (warns)" if (arch, column) in PARTIAL else "")
            cells.append(f"**{v}: fails today**" if (arch, column) in KNOWN_FAILING else v)
        rows.append(f"| {arch} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table())
