"""PEFT's on-disk LoRA layout, read and written: ``adapter_config.json`` +
``adapter_model.safetensors``, so PEFT, vLLM and LoRAX users can consume our
deltas and we can load theirs.

Mapping (ours -> PEFT)::

    Delta.config r / alpha / dropout / rslora   r / lora_alpha / lora_dropout / use_rslora
    per-site rank (from tensor shapes)          rank_pattern  {"^<escaped site path>": r}   (where != r)
    per-site alpha (our alpha_pattern)          alpha_pattern {"^<escaped site path>": a}   (where != lora_alpha)
    sites                                       target_modules: suffix list when unambiguous in
                                                the model, else a regex of the exact paths
    "{site}.lora_A.weight" / "lora_B.weight"    "base_model.model.{site}.lora_A.weight" / ...
      (embedding sites)                         "base_model.model.{site}.lora_embedding_A" / "_B"

PEFT matches rank/alpha pattern keys with ``re.match(rf"(.*\\.)?({key})$", path)``;
a key ``^`` + ``re.escape(path)`` matches that one path only. On reading, every
site's rank comes from its tensor shapes and its alpha is resolved with PEFT's
own rule, then written as exact ``re:`` patterns, so nothing depends on the two
pattern languages agreeing.

A PEFT folder carries no base fingerprint: `load_peft_delta` without a model
gives a Delta with ``base=""`` (apply it with ``allow_other_base=True``); with a
model, the Delta's base is ``surgery.fingerprint(model)``. Only safetensors is
read; ``adapter_model.bin`` (pickle) is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery import distributed, engine
from surgery.errors import ConfigError, SurgeryError
from surgery.methods import METHODS, get_method
from surgery.methods.base import Method, PeftContext, kind_of, peft_pattern
from surgery.selectors import path_matches

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PeftFormatError",
    "load_peft",
    "load_peft_delta",
    "read_peft_files",
    "save_peft",
    "save_peft_delta",
    "site_kinds",
]


class PeftFormatError(SurgeryError, ValueError):
    """A PEFT adapter cannot be read or written as a LoRA Delta (names the field or key)."""


# ------------------------------------------------------------------ site kinds


def site_kinds(model: nn.Module, delta: surgery.Delta) -> dict[str, str]:
    """Site path -> ``"linear" | "conv1d_tf" | "embedding" | "conv"`` for a delta's sites in `model`.

    A Delta alone cannot tell an embedding site from a linear one (both are 2-D
    A/B pairs), and PEFT stores them under different keys. Keep this in the
    Delta's ``lineage["site_kinds"]`` when it is stored without its model, and
    `save_peft_delta` will use it."""
    out = {}
    for path in delta.sites():
        try:
            out[path] = kind_of(engine.site_module(model, path))
        except AttributeError:
            raise PeftFormatError(f"delta {delta.name!r}: the model has no module {path!r}") from None
    return out


def _kinds_for(delta: surgery.Delta, model: nn.Module | None, kinds: dict[str, str] | None) -> dict[str, str]:
    if model is not None:
        return site_kinds(model, delta)
    given = dict(delta.lineage.get("site_kinds") or {})
    given.update(kinds or {})
    out = {}
    for path, ts in delta.sites().items():
        out[path] = given.get(path) or ("conv" if ts["lora_A.weight"].dim() > 2 else "linear")
    return out


# ------------------------------------------------------------------ writing


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mode(values: list[Any]) -> Any:
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)  # first of the most common, stable


def _exact_key(path: str) -> str:
    return "^" + re.escape(path)


def _infer_task_type(model: nn.Module | None) -> str | None:
    if model is None:
        return None
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("ForConditionalGeneration") or name.endswith("ForSeq2SeqLM"):
        return "SEQ_2_SEQ_LM"
    # the other task types make PEFT wrap the head in modules_to_save: leave them unset
    return None


def _target_modules(sites: list[str], model: nn.Module | None) -> list[str] | str:
    """A list of last-segment names when, in `model`, it hits exactly the sites
    (PEFT: ``name == t or name.endswith("." + t)``); else a regex of the exact paths."""
    if model is not None:
        suffixes = sorted({p.rsplit(".", 1)[-1] for p in sites})
        hit = {
            n
            for n, _ in model.named_modules()
            if n and not engine.is_adapter_path(model, n) and any(n == s or n.endswith("." + s) for s in suffixes)
        }
        if hit == set(sites):
            return suffixes
    return "^(?:" + "|".join(re.escape(p) for p in sorted(sites)) + ")$"


def _peft_config(
    delta: surgery.Delta,
    kinds: dict[str, str],
    model: nn.Module | None,
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    cfg = delta.config
    alpha0 = cfg.get("alpha", 8)
    alpha_pat = cfg.get("alpha_pattern") or {}
    sites = delta.sites()
    ranks: dict[str, int] = {p: int(ts["lora_A.weight"].shape[0]) for p, ts in sites.items()}
    alphas: dict[str, float] = {}
    for p in sites:
        alphas[p] = next((v for pat, v in alpha_pat.items() if path_matches(pat, p)), alpha0)
    paths = list(sites)
    r = int(cfg["r"]) if cfg.get("r") in ranks.values() else _mode([ranks[p] for p in paths])
    alpha = alpha0 if alpha0 in alphas.values() else _mode([alphas[p] for p in paths])
    # longest paths first: PEFT takes the first key that matches
    order = sorted(paths, key=lambda p: (-len(p), p))
    return {
        "peft_type": "LORA",
        "task_type": task_type if task_type is not None else _infer_task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(cfg.get("dropout", 0.0)),
        "use_rslora": bool(cfg.get("rslora", False)),
        "target_modules": _target_modules(paths, model),
        "rank_pattern": {_exact_key(p): ranks[p] for p in order if ranks[p] != r},
        "alpha_pattern": {_exact_key(p): alphas[p] for p in order if alphas[p] != alpha},
        "fan_in_fan_out": any(k == "conv1d_tf" for k in kinds.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": delta.method == "dora",
        "lora_bias": False,
    }


def save_peft_delta(
    delta: surgery.Delta,
    out_dir: str | os.PathLike[str],
    base_model_name_or_path: str | None = None,
    *,
    model: nn.Module | None = None,
    kinds: dict[str, str] | None = None,
    task_type: str | None = None,
) -> Path:
    """Write a LoRA Delta in PEFT's layout; returns the folder.

    `model` (the base the delta fits, injected or not) tells embedding and GPT-2
    ``Conv1D`` sites apart and lets ``target_modules`` be a suffix list; without
    it the kinds come from `kinds`, then ``delta.lineage["site_kinds"]``, else
    every 2-D site is written as a linear one (an embedding site would then be
    mis-keyed: pass the model). Each file is written to a temp file, fsynced and
    renamed; the config last."""
    if delta.config.get("init") == "loftq":
        raise PeftFormatError(
            f"delta {delta.name!r} is a LoftQ LoRA: it corrects the NF4 rounding of its 4-bit base, and PEFT's "
            "adapter_config.json cannot say which base that is (PEFT's own LoftQ adapters ship with their "
            "quantised base); save it with registry's format, or dequantize and merge it into the base"
        )
    if delta.method not in ("lora", "dora"):  # DoRA is PEFT's LoRA with use_dora and a magnitude per site
        return _save_other(delta, out_dir, base_model_name_or_path, model, kinds, task_type)
    kinds_ = _kinds_for(delta, model, kinds)
    config = _peft_config(delta, kinds_, model, base_model_name_or_path, task_type)
    tensors: dict[str, torch.Tensor] = {}
    for path, ts in delta.sites().items():
        A, B = ts["lora_A.weight"], ts["lora_B.weight"]
        if kinds_[path] == "embedding":
            ka, kb = f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
        else:
            ka, kb = f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"
        tensors[ka] = A.detach().to("cpu").contiguous()
        tensors[kb] = B.detach().to("cpu").contiguous()
        if delta.method == "dora":
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = (
                ts["lora_magnitude_vector"].detach().to("cpu").contiguous()
            )
    return _write_folder(Path(out_dir), config, tensors)


def _write_folder(out: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    _check_out_dir(out)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    try:  # an existing folder keeps its other files; these two are replaced, each atomically
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8"))
    except OSError as e:
        raise PeftFormatError(
            f"cannot write the PEFT adapter into {out}: {e.strerror or e} "
            f"({e.filename or out}); pass a folder you can write to"
        ) from None
    return out


def _peft_method(delta_method: str) -> Method:
    try:
        method = get_method(delta_method)
    except ConfigError:
        method = None
    if method is None or method.peft_type is None:
        have = sorted(n for n, m in METHODS.items() if m.peft_type)
        raise PeftFormatError(
            f"a {delta_method!r} delta has no PEFT layout (field: method); PEFT's format holds "
            f"{sorted({'lora', 'dora', *have})}. surgery.to_lora(model, name, r=16) makes a LoRA of any "
            "mergeable delta (reporting its error), which PEFT and serving engines load"
        ) from None
    return method


def _context(delta: surgery.Delta, model: nn.Module | None, kinds: dict[str, str] | None) -> PeftContext:
    if model is not None:
        found = site_kinds(model, delta)
    else:
        found = {**dict(delta.lineage.get("site_kinds") or {}), **(kinds or {})}
        found = {p: found.get(p, "linear") for p in delta.sites()}
    return PeftContext(model, found, lambda paths: _target_modules(list(paths), model))


def _save_other(
    delta: surgery.Delta,
    out_dir: str | os.PathLike[str],
    base_model_name_or_path: str | None,
    model: nn.Module | None,
    kinds: dict[str, str] | None,
    task_type: str | None,
) -> Path:
    """A Delta of any method with a PEFT layout: the method writes its fields and tensors."""
    method = _peft_method(delta.method)
    try:
        fields, tensors = method.to_peft(dict(delta.config), delta.sites(), _context(delta, model, kinds))
    except ConfigError as e:
        raise PeftFormatError(f"delta {delta.name!r} cannot be written in PEFT's layout: {e}") from None
    config = {
        "peft_type": method.peft_type,
        "task_type": task_type if task_type is not None else _infer_task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        **fields,
    }
    return _write_folder(Path(out_dir), config, {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()})


def _read_other(cfg: dict[str, Any], weights_path: Any, model: nn.Module | None, name: str | None) -> surgery.Delta:
    """A PEFT adapter of another type than LoRA, read by the method that declares that peft_type."""
    ptype = cfg.get("peft_type")
    method = next((m for m in METHODS.values() if m.peft_type == ptype), None)
    if method is None:
        have = sorted({m.peft_type for m in METHODS.values() if m.peft_type})
        raise PeftFormatError(
            f"PEFT adapter field peft_type={ptype!r} cannot be represented: model-surgery reads {have}"
        )
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own types for a malformed header
        raise PeftFormatError(f"cannot read {weights_path} as safetensors: {e}") from None
    ctx = PeftContext(model, {}, lambda paths: _target_modules(list(paths), model))
    try:
        config, ours = method.from_peft(cfg, tensors, ctx)
        delta = surgery.Delta(method.name, name or "default", config, ours, "", {})
        sites = delta.sites()
    except ConfigError as e:
        raise PeftFormatError(f"PEFT {ptype} adapter cannot be represented: {e}") from None
    if model is not None:
        for p in sites:
            if _module_or_none(model, p) is None:
                raise PeftFormatError(f"PEFT adapter has tensors for {p!r}, but the model has no such module")
        kinds = site_kinds(model, delta)
        base = surgery.fingerprint(model)
    else:
        kinds, base = {}, ""
    peft_info = {
        k: cfg.get(k)
        for k in ("base_model_name_or_path", "revision", "task_type", "peft_version")
        if cfg.get(k) is not None
    }
    lineage = {"source": "peft", "peft": peft_info, "site_kinds": kinds}
    return surgery.Delta(method.name, name or "default", config, ours, base, lineage)


def _check_out_dir(out: Path) -> None:
    """PEFT's layout is a folder: refuse a path that is a file or lies inside one (nothing is touched)."""
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "is a file" if p == out else f"lies inside {p}, which is a file"
                raise PeftFormatError(
                    f"{out} {where}: PEFT's layout is a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}; "
                    "pass a folder path (it is created if missing)"
                )
            return


def save_peft(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    adapter: str = "default",
    base_model_name_or_path: str | None = None,
    *,
    task_type: str | None = None,
    rank: int | None = None,
) -> Path:
    """Write the injected delta `adapter` of `model` in PEFT's layout, readable by
    ``peft.PeftModel.from_pretrained(base, out_dir)``. ``base_model_name_or_path``
    defaults to the model's ``name_or_path`` when it has one.

    A sharded (FSDP2) or DDP-wrapped model, or a `rank=` given in a process group of several ranks:
    a collective. Every rank calls it; the full tensors are gathered, rank `rank` (default 0) writes
    the folder once (its `out_dir`), and every rank returns that path (or raises the writer's error).
    No shard and no empty tensor is written."""
    together = distributed.is_collective(model) or (rank is not None and distributed.world_size() > 1)
    if together:
        distributed.guard("registry save_peft", adapter)
    model = distributed.unwrap(model)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    delta = surgery.delta(model, adapter)  # gathered on every rank of a sharded model

    def write() -> Path:
        return save_peft_delta(delta, out_dir, base_model_name_or_path, model=model, task_type=task_type)

    if not together:
        return write()
    return distributed.write_once(
        write,
        writer=0 if rank is None else rank,
        what=f"save_peft into {str(out_dir)!r}",
        encode=str,
        decode=Path,
        error=PeftFormatError,
    )


# ------------------------------------------------------------------ reading

# fields that only choose sites (the tensors name the sites) or carry no math
_IGNORED = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "target_modules",
    "exclude_modules",
    "lora_alpha",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "runtime_config",
    "ensure_weight_tying",
    "megatron_core",
    "qalora_group_size",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "loftq_config",
}
_UNSUPPORTED = {
    "lora_bias": "LoRA with a bias on lora_B is not supported",
    "modules_to_save": "fully trained module copies are not a LoRA delta",
    "trainable_token_indices": "trainable token rows are not a LoRA delta",
    "target_parameters": "LoRA on bare parameters (e.g. MoE experts) is not supported",
    "layer_replication": "it changes the base model's layer stack",
    "use_qalora": "QA-LoRA pools inputs before A",
    "alora_invocation_tokens": "activated LoRA changes the forward per token",
    "arrow_config": "Arrow routing is not a single LoRA",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "megatron_config": "Megatron parallel layers are not supported",
    "velora_config": "VeLoRA is not supported",
    "kasa_config": "KaSA is not supported",
}
# init_lora_weights values that leave the base weights alone (the others rewrite the base: PiSSA,
# OLoRA, CorDA, LoftQ, LoRA-GA; MiCA is a variant with its own forward)
_SAFE_INIT = {True, False, "gaussian", "eva", "orthogonal"}


def _truthy(v: Any) -> bool:
    return v not in (None, False, 0, "", [], {}, ())


def _check_config(cfg: dict[str, Any]) -> None:
    def bad(field: str, why: str) -> PeftFormatError:
        return PeftFormatError(f"PEFT adapter field {field}={cfg.get(field)!r} cannot be represented: {why}")

    if cfg.get("peft_type") not in ("LORA", None):
        raise bad("peft_type", "only LoRA adapters (peft_type 'LORA') can be read")
    if cfg.get("peft_type") is None:
        raise PeftFormatError("PEFT adapter field peft_type is missing; is this an adapter_config.json?")
    for field, why in _UNSUPPORTED.items():
        if _truthy(cfg.get(field)):
            raise bad(field, why)
    if cfg.get("bias", "none") != "none":
        raise bad("bias", "trained biases of the base layers are not part of a LoRA delta")
    init = cfg.get("init_lora_weights", True)
    if init not in _SAFE_INIT:
        raise bad(
            "init_lora_weights",
            "this initialisation rewrites the base weights (or is a LoRA variant), so the "
            "adapter does not fit the original base; convert it with PEFT first "
            "(save_pretrained(path_initial_model_for_weight_conversion=...))",
        )
    if _truthy(cfg.get("loftq_config")):
        raise bad("loftq_config", "LoftQ rewrites the (quantized) base weights")
    if not isinstance(cfg.get("use_dora", False), bool):
        raise bad("use_dora", "it must be true or false")
    for field, v in cfg.items():  # use_dora chooses the method: "dora" rather than "lora"
        if field not in _IGNORED and field not in _UNSUPPORTED and field != "use_dora" and _truthy(v):
            raise bad(field, "this field is unknown to model-surgery, so its effect cannot be reproduced")
    if not isinstance(cfg.get("r"), int) or isinstance(cfg.get("r"), bool) or cfg["r"] <= 0:
        raise bad("r", "it must be a positive integer")
    v = cfg.get("lora_alpha")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise bad("lora_alpha", "it must be a positive number")
    d = cfg.get("lora_dropout", 0.0) or 0.0
    if not isinstance(d, (int, float)) or not 0 <= d < 1:
        raise bad("lora_dropout", "it must be in [0, 1)")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(field) or {}, dict):
            raise bad(field, "it must be a mapping of pattern -> value")


def _peft_pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    try:
        return peft_pattern(patterns, path, default)
    except ConfigError as e:
        raise PeftFormatError(str(e)) from None


def _split_key(key: str) -> tuple[str, str]:
    """A PEFT tensor key -> (site path, our suffix or a marker)."""
    k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    for peft_suf, ours in (
        (".lora_A.weight", "lora_A.weight"),
        (".lora_B.weight", "lora_B.weight"),
        (".lora_embedding_A", "lora_A.weight"),
        (".lora_embedding_B", "lora_B.weight"),
        (".lora_magnitude_vector", "lora_magnitude_vector"),
        (".base_layer.weight", "base_layer.weight"),
    ):
        if k.endswith(peft_suf):
            return k[: -len(peft_suf)], ours
    for marker, field in (
        ("lora_B.bias", "lora_bias"),
        ("modules_to_save", "modules_to_save"),
        ("trainable_tokens", "trainable_token_indices"),
    ):
        if marker in k:
            raise PeftFormatError(
                f"PEFT adapter tensor {key!r} belongs to field {field}, which cannot be represented as a LoRA delta"
            )
    raise PeftFormatError(
        f"PEFT adapter tensor {key!r} is not a LoRA A/B tensor (bias, resized embeddings or "
        "another method's tensor?); it cannot be represented as a LoRA delta"
    )


def _module_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return engine.site_module(model, path)
    except AttributeError:
        return None


def read_peft_files(
    config_path: str | os.PathLike[str],
    weights_path: str | os.PathLike[str],
    model: nn.Module | None = None,
    name: str | None = None,
) -> surgery.Delta:
    """`load_peft_delta` for a config file and a safetensors file given one by one
    (as ``hf_hub_download`` returns them)."""
    try:
        cfg = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftFormatError(f"cannot read {config_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise PeftFormatError(f"{config_path} does not hold a JSON object")
    if cfg.get("peft_type") not in ("LORA", None):
        return _read_other(cfg, weights_path, model, name)
    _check_config(cfg)
    dora = bool(cfg.get("use_dora"))
    by_site: dict[str, dict[str, torch.Tensor]] = {}
    embedding_sites: set[str] = set()
    base_layer: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                path, suf = _split_key(key)
                t = f.get_tensor(key)
                if suf == "base_layer.weight":
                    base_layer[path] = t
                    continue
                if "lora_embedding_" in key:
                    embedding_sites.add(path)
                by_site.setdefault(path, {})[suf] = t
    except PeftFormatError:
        raise
    except Exception as e:  # safetensors raises its own types for a malformed header
        raise PeftFormatError(f"cannot read {weights_path} as safetensors: {e}") from None
    if not by_site:
        raise PeftFormatError(f"{weights_path} holds no LoRA tensors")
    for path, ts in by_site.items():
        missing = {"lora_A.weight", "lora_B.weight"} - set(ts)
        if missing:
            raise PeftFormatError(f"PEFT adapter site {path!r} lacks {sorted(missing)}")
        A, B = ts["lora_A.weight"], ts["lora_B.weight"]
        if A.dim() < 2 or B.dim() != A.dim() or A.shape[0] != B.shape[1]:
            raise PeftFormatError(
                f"PEFT adapter site {path!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                "are not a LoRA pair (A [r, in], B [out, r])"
            )
        mag = ts.get("lora_magnitude_vector")
        if (mag is not None) != dora:
            raise PeftFormatError(
                f"PEFT adapter field use_dora={cfg.get('use_dora')!r} but site {path!r} "
                + ("has a lora_magnitude_vector" if mag is not None else "lacks its lora_magnitude_vector")
            )
        if mag is not None and mag.numel() != B.shape[0]:
            raise PeftFormatError(
                f"PEFT adapter site {path!r}: lora_magnitude_vector {tuple(mag.shape)} does not have "
                f"lora_B's {B.shape[0]} output rows"
            )
    ignored = []
    for path, w in base_layer.items():
        if path not in by_site:
            raise PeftFormatError(
                f"PEFT adapter tensor {PREFIX}{path}.base_layer.weight is a base weight without a "
                "LoRA site (save_embedding_layers / resized vocabulary): cannot be represented"
            )
        mod = _module_or_none(model, path) if model is not None else None
        if model is not None:
            weight = getattr(mod, "weight", None)
            if (
                weight is None
                or tuple(weight.shape) != tuple(w.shape)
                or not torch.equal(weight.detach().cpu().to(w.dtype), w)
            ):
                raise PeftFormatError(
                    f"PEFT adapter carries the base weight {path}.base_layer.weight (save_embedding_layers) and it "
                    "differs from this model's: the adapter needs a modified base, which a delta cannot represent"
                )
        else:
            warnings.warn(
                f"PEFT adapter carries the base weight {path}.base_layer.weight (save_embedding_layers); "
                "it is not part of the delta and was not checked (pass model= to check it)",
                stacklevel=3,
            )
        ignored.append(f"{path}.base_layer.weight")

    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    ranks = {p: int(ts["lora_A.weight"].shape[0]) for p, ts in by_site.items()}
    alphas = {p: _peft_pattern_value(alpha_pat, p, alpha0) for p in by_site}
    for p in by_site:  # the config's rank must agree with the tensors, else the scale is off
        want = _peft_pattern_value(rank_pat, p, r0)
        if want != ranks[p]:
            raise PeftFormatError(
                f"PEFT adapter field rank_pattern / r says rank {want} for {p!r} but its tensors have rank {ranks[p]}"
            )
    for p, a in alphas.items():
        if not isinstance(a, (int, float)) or isinstance(a, bool) or a <= 0:
            raise PeftFormatError(f"PEFT adapter field alpha_pattern gives {p!r} alpha {a!r}; it must be positive")
    tensors: dict[str, torch.Tensor] = {}
    for p, ts in by_site.items():
        tensors[f"{p}.lora_A.weight"] = ts["lora_A.weight"]
        tensors[f"{p}.lora_B.weight"] = ts["lora_B.weight"]
        if dora:
            tensors[f"{p}.lora_magnitude_vector"] = ts["lora_magnitude_vector"]
    config = {
        "r": r0,
        "alpha": alpha0,
        "dropout": float(cfg.get("lora_dropout") or 0.0),
        "init": "default",
        "rslora": rslora,
        "rank_pattern": {"re:" + re.escape(p): ranks[p] for p in by_site if ranks[p] != r0},
        "alpha_pattern": {"re:" + re.escape(p): alphas[p] for p in by_site if alphas[p] != alpha0},
    }
    if model is not None:
        kinds = {}
        for p in by_site:
            mod = _module_or_none(model, p)
            if mod is None:
                raise PeftFormatError(f"PEFT adapter has a LoRA for {p!r}, but the model has no such module")
            kinds[p] = kind_of(mod)
            if (kinds[p] == "embedding") != (p in embedding_sites):
                how = "lora_embedding_A/B" if p in embedding_sites else "lora_A/B"
                raise PeftFormatError(
                    f"PEFT adapter stores {p!r} as {how} but the model's module there is a {type(mod).__name__}"
                )
        base = surgery.fingerprint(model)
    else:
        kinds = {
            p: "embedding" if p in embedding_sites else ("conv" if by_site[p]["lora_A.weight"].dim() > 2 else "linear")
            for p in by_site
        }
        base = ""
    peft_info = {
        k: cfg.get(k)
        for k in ("base_model_name_or_path", "revision", "task_type", "peft_version", "fan_in_fan_out")
        if cfg.get(k) is not None
    }
    if ignored:
        peft_info["ignored_tensors"] = ignored
    lineage = {"source": "peft", "peft": peft_info, "site_kinds": kinds}
    return surgery.Delta("dora" if dora else "lora", name or "default", config, tensors, base, lineage)


def load_peft_delta(
    peft_dir: str | os.PathLike[str], model: nn.Module | None = None, name: str | None = None
) -> surgery.Delta:
    """Read a LoRA adapter PEFT saved (``adapter_config.json`` + ``adapter_model.safetensors``)
    as a Delta. Ranks come from the tensors; alphas are resolved per site with PEFT's
    pattern rule. What a LoRA Delta cannot represent raises `PeftFormatError` naming
    the field. With `model`, the sites are checked against it and the Delta's base is
    its fingerprint; without, the base is ``""`` (apply with ``allow_other_base=True``)."""
    d = Path(peft_dir)
    if not (d / CONFIG_NAME).is_file():
        raise PeftFormatError(f"{d} has no {CONFIG_NAME}; is it a PEFT adapter folder?")
    if not (d / WEIGHTS_NAME).is_file():
        if (d / "adapter_model.bin").exists():
            raise PeftFormatError(
                f"{d} holds adapter_model.bin (pickle), which is never loaded here; convert it to "
                f"{WEIGHTS_NAME} (PEFT: save_pretrained(..., safe_serialization=True)) in a sandbox"
            )
        raise PeftFormatError(f"{d} has no {WEIGHTS_NAME}")
    return read_peft_files(d / CONFIG_NAME, d / WEIGHTS_NAME, model=model, name=name)


def load_peft(model: nn.Module, peft_dir: str | os.PathLike[str], name: str = "default") -> surgery.Injection:
    """Inject a PEFT LoRA adapter into `model` under `name` (a hot-swap in place if a
    delta of that name and shapes is there). A PEFT folder carries no base fingerprint,
    so none is checked: the sites and shapes must fit the model, or it raises with the
    model unchanged."""
    delta = load_peft_delta(peft_dir, model=model, name=name)
    inj = surgery.apply(model, delta, name)
    # surgery.apply builds new adapters in training mode even in an eval-mode model (so their
    # dropout would run at inference); give them their site's mode
    for path, ad in engine.adapters(model, name).items():
        ad.train(engine.site_module(model, path).training)
    return inj
