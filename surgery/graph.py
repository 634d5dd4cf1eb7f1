"""The model's dataflow graph and the *roles* its modules play, found without name tables.

A role says what a leaf module does in the computation, read off the dataflow graph:

* ``q`` / ``k`` / ``v``: a linear whose output reaches an attention op as query / key / value;
  ``qkv``: one fused linear that feeds all three; ``o``: the linear that consumes the
  attention output. All of these also get ``attn``.
* ``mlp.up`` / ``mlp.gate`` / ``mlp.down``: a feed-forward block, i.e. linears -> activation
  (times an ungated branch, for gated FFNs) -> a linear whose output joins the residual stream.
  ``mlp.gate`` is the branch that goes through the activation. All of these also get ``mlp``.
* ``head``: the linear (or tied embedding) whose output is a model output, ``embed``: every
  ``nn.Embedding``, ``linear``: every linear-like leaf that is not the head.

The graph comes from `torch.fx.symbolic_trace` (plain modules) or, failing that,
`torch.export.export(strict=False)` on dummy inputs built from a `transformers` model's config
(or on a batch given to ``surgery.trace(model, inputs)``). Large `transformers` models are read
through a few-layer stand-in on the meta device, mapped back layer by layer, so that finding
roles stays fast for 7B-sized models. Every failure is a `GraphError` saying what to do.
More in docs/graph.md.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import fx, nn
from torch.export.graph_signature import OutputKind

from surgery.errors import GraphError

__all__ = ["build_graph", "clear_cache", "roles"]

_T = TypeVar("_T")

# Op-name families (normalised: aten overload packet / function / method name, "_" stripped).
_VIEW = frozenset(
    "view reshape unsafe_view transpose t permute contiguous clone to to_copy type type_as float "
    "half bfloat16 double unsqueeze squeeze expand expand_as flatten unflatten getitem split "
    "split_with_sizes tensor_split chunk unbind slice select narrow repeat repeat_interleave "
    "dropout native_dropout feature_dropout alpha_dropout alias detach movedim swapaxes index "
    "index_select contiguous lift_fresh_copy".split()
)
_SLICE = frozenset("getitem split split_with_sizes tensor_split chunk unbind slice select narrow".split())
_ELEMENTWISE = frozenset(
    "add sub rsub mul div neg cat concat concatenate stack where masked_fill pow rsqrt sqrt mean "
    "layer_norm rms_norm clamp".split()
)
_SCALE = frozenset({"mul", "div"})
_ACT = frozenset(
    "act gelu relu silu tanh sigmoid erf hardtanh hardswish hardsigmoid elu selu celu leaky_relu "
    "softplus mish relu6 glu".split()
)
_SOFTMAX = frozenset({"softmax", "safe_softmax"})
_MATMUL = frozenset({"matmul", "bmm", "mm", "einsum", "baddbmm"})
_LINEAR_OPS = frozenset({"linear", "addmm", "mm", "matmul", "conv1d", "conv2d", "convolution"})
_RESIDUAL = frozenset({"add", "index_add", "scatter_add"})
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
_MODULE_KINDS = ((_NORM_TYPES, "layer_norm"), ((nn.Dropout, nn.Identity), "dropout"), (nn.Softmax, "softmax"))
_ATTN_ROLES = frozenset({"q", "k", "v", "qkv", "o"})


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear, nn.Conv1d, nn.Conv2d]
    # transformers is slow to import: only look for Conv1D if the model could use it.
    if (pu := sys.modules.get("transformers.pytorch_utils")) is not None:
        types.append(pu.Conv1D)
    return tuple(types)


def _is_activation(module: nn.Module) -> bool:
    # torch.nn.modules.activation also holds softmaxes and MultiheadAttention, which are not.
    return type(module).__module__ in ("torch.nn.modules.activation", "transformers.activations") and not isinstance(
        module, (nn.MultiheadAttention, nn.Softmax, nn.LogSoftmax, nn.Softmin)
    )


@dataclass
class _Entry:
    graph: fx.Graph | None = None
    roles: dict[str, frozenset[str]] | None = None


# Keyed by the model object, so parameter values (and their changes) never matter.
_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def clear_cache(model: nn.Module) -> None:
    """Forget the graph and roles cached for `model` (after changing its structure)."""
    _CACHE.pop(model, None)


def build_graph(model: nn.Module, example_inputs: tuple | dict | torch.Tensor | None = None) -> fx.Graph:
    """The dataflow graph of `model`, built once and cached: `symbolic_trace`, else non-strict `torch.export`.

    Module paths in the graph (``call_module`` targets, ``meta["nn_module_stack"]``) are the
    model's `named_modules()` paths. `example_inputs` (positional args as a tuple or one tensor,
    keyword args as a dict) are needed only when export must run a plain module; `transformers`
    models get small ones built from their config. Once cached, `example_inputs` are ignored.
    """
    entry = _CACHE.setdefault(model, _Entry())
    if entry.graph is None:
        from surgery import context  # the graph is the base's: injected deltas stay out of the trace
        from surgery.fourbit import traceable  # torch.export cannot fake a 4-bit weight: trace plain linears

        with context.base_only(model), traceable(model):
            entry.graph = _guarded(model, "tracing", lambda: _trace(model, example_inputs))
    return entry.graph


def roles(model: nn.Module, example_inputs: tuple | dict | torch.Tensor | None = None) -> dict[str, frozenset[str]]:
    """Map dotted module path (as in ``model.named_modules()``) -> roles of that module. Cached per model.

    Only modules with a role are listed. A large `transformers` model is read through a few-layer
    stand-in on the meta device (unless its graph is already cached or `example_inputs` are
    given); when the stand-in's structure does not match the model's, the model itself is traced.
    """
    entry = _CACHE.setdefault(model, _Entry())
    if entry.roles is None:
        found = None
        if entry.graph is None and example_inputs is None and _is_hf(model):
            from surgery.fourbit import traceable  # a 4-bit layer maps back to the stand-in's nn.Linear

            with traceable(model):
                found = _standin_roles(model)
        if found is None:
            g = build_graph(model, example_inputs)
            found = _guarded(model, "reading roles from the graph of", lambda: _find_roles(model, g))
        entry.roles = found
    return dict(entry.roles)


# ----------------------------------------------------------------------------- tracing

_FIX = (
    "call surgery.trace(model, inputs) once with a batch its forward accepts (a tensor, a tuple of "
    "positional args or a dict of keyword args; `example_inputs=` of surgery.find / graph.roles is the same), "
    "then role selectors read that graph; or select sites by name instead of role"
)


def _guarded(model: nn.Module, what: str, run: Callable[[], _T]) -> _T:
    """Run `run()`; any exception but a GraphError becomes a GraphError that says what to do."""
    try:
        return run()
    except GraphError:
        raise
    except Exception as err:
        raise GraphError(f"{what} {type(model).__name__} failed ({_short(err)}); {_FIX}") from err


class _LeafTracer(fx.Tracer):
    """Keeps linear-like leaves and embeddings as ``call_module`` nodes so their owner is known.

    torch.nn containers (nn.TransformerEncoderLayer, ...) are traced into, since their linears are
    what roles are about; MultiheadAttention stays opaque, its forward cannot be traced.
    """

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (*_linear_types(), nn.Embedding, nn.MultiheadAttention)):
            return True
        return super().is_leaf_module(m, qualname) and next(m.children(), None) is None


def _is_hf(model: nn.Module) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _trace(model: nn.Module, example_inputs: tuple | dict | torch.Tensor | None) -> fx.Graph:
    """Trace `model` (no caching); parameter placeholders of an export graph get ``meta["surgery.param"]``."""
    try:
        return _LeafTracer().trace(model)
    except Exception as err:  # any tracing failure just means "try export"
        fx_error = _short(err)
    candidates: Sequence[tuple | dict | torch.Tensor]
    if example_inputs is not None:
        candidates, built = [_complete(model, example_inputs)], False
    else:
        try:
            candidates, built = _hf_inputs(model), True
        except Exception as err:  # a config our builder does not understand: same advice as no inputs
            fx_error += f"; building dummy inputs from its config failed ({_short(err)})"
            candidates = []
    if not candidates:
        raise GraphError(
            f"cannot build the dataflow graph of {type(model).__name__}: torch.fx.symbolic_trace failed "
            f"({fx_error}), and torch.export needs example inputs to run the model; {_FIX}"
        )
    flags = {m: m.training for m in model.modules()}
    errors: list[str] = []
    program = None
    # A failed export logs a full traceback from fake-tensor dispatch; our GraphError says it in one line.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    try:
        model.eval()  # dropout and training-only branches are noise for dataflow
        fake_log.setLevel(logging.CRITICAL)
        for inputs in candidates:
            args, kwargs = _split(inputs)
            try:
                program = torch.export.export(model, args, kwargs=kwargs, strict=False)
                break
            except Exception as err:  # the next candidate (fewer optional inputs) may run
                errors.append(f"{sorted(kwargs) or 'positional args'}: {_short(err)}" if built else _short(err))
    finally:
        fake_log.setLevel(level)
        for m, flag in flags.items():
            m.training = flag
    if program is None:
        tried = "dummy inputs built from its config " if built else ""
        raise GraphError(
            f"cannot build the dataflow graph of {type(model).__name__}: torch.fx.symbolic_trace failed "
            f"({fx_error}); torch.export.export(strict=False) on {tried}failed ({'; '.join(errors)}); {_FIX}"
        )
    sig = program.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    user_outputs = {s.arg.name for s in sig.output_specs if s.kind == OutputKind.USER_OUTPUT and hasattr(s.arg, "name")}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            node.meta["surgery.param"] = names[node.name]
        elif node.op == "output":
            node.meta["surgery.user_outputs"] = user_outputs
    return program.graph


def _split(inputs: tuple | dict | torch.Tensor) -> tuple[tuple, dict]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    return ((), dict(inputs)) if isinstance(inputs, Mapping) else (tuple(inputs), {})


def _complete(model: nn.Module, inputs: tuple | dict | torch.Tensor) -> tuple | dict | torch.Tensor:
    """A user's batch for a `transformers` model, as export needs it: keyword args, without a KV cache
    (a cache object in the output is not a pytree export can return)."""
    if not _is_hf(model):
        return inputs
    if isinstance(inputs, torch.Tensor):
        inputs = {getattr(model, "main_input_name", "input_ids"): inputs}
    if isinstance(inputs, Mapping):  # a tokenizer's BatchEncoding is a Mapping, not a dict
        inputs = dict(inputs)
    if isinstance(inputs, dict) and "use_cache" in inspect.signature(model.forward).parameters:
        inputs = {**inputs, "use_cache": inputs.get("use_cache", False)}
    return inputs


_SEQ = 8  # tokens in dummy text inputs
_IMAGE = 64  # pixels a side when a vision config has no image_size (ResNet, ConvNeXt): fits their strides
_SAMPLES = 1600  # raw audio samples (wav2vec2-style input_values): past the feature encoder's receptive field


def _configs(cfg: Any) -> list[Any]:
    """`cfg` and its sub-configs (text_config, vision_config, audio_config, encoder, decoder, ...), outer first."""
    out: list[Any] = []
    todo = [cfg]
    while todo:
        c = todo.pop(0)
        if any(c is o for o in out):
            continue
        out.append(c)
        todo.extend(v for v in vars(c).values() if hasattr(v, "to_dict") and not isinstance(v, dict))
    return out


def _lookup(cfgs: list, name: str, prefer: str = "") -> Any:
    """The first value of config attribute `name`: in sub-configs whose attribute name contains `prefer`
    first (``vision`` for image sizes, ``text`` for vocabularies), then in the others, outermost first.
    Any: config attributes are untyped (an int, a tuple, a list, ...); callers check what they use."""
    first = [v for c in cfgs for k, v in vars(c).items() if prefer and prefer in k and hasattr(v, "to_dict")]
    return next((v for c in (*first, *cfgs) if (v := getattr(c, name, None)) is not None), None)


def _hf_inputs(model: nn.Module) -> list[dict]:
    """Candidate dummy inputs for a `transformers` model, fullest first; [] for other models.

    Built from the model alone (``main_input_name``, its forward's parameters, its config), never from
    a per-architecture table. The first candidate also fills optional inputs a model may need (CLIP
    wants ``pixel_values`` next to ``input_ids``); the second leaves them out (image tokens, ...).
    """
    if not _is_hf(model):
        return []
    cfgs = _configs(model.config)
    params = inspect.signature(model.forward).parameters
    floats = [p for p in model.parameters() if p.is_floating_point()]
    device, dtype = (floats[0].device, floats[0].dtype) if floats else (torch.device("cpu"), torch.float32)
    main = getattr(model, "main_input_name", "input_ids")

    def ids(vocab: object, n: int = _SEQ, start: object = None) -> torch.Tensor:
        v = vocab if isinstance(vocab, int) and vocab > 0 else 2
        out = (torch.arange(n) + 3) % v
        if isinstance(start, int) and 0 <= start < v:
            out[0] = start
        return out.unsqueeze(0).to(device)

    def pixels() -> torch.Tensor:
        size = _lookup(cfgs, "image_size", "vision") or _IMAGE
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        channels = _lookup(cfgs, "num_channels", "vision") or 3
        return torch.zeros(1, channels, *size[-2:], dtype=dtype, device=device)

    def features() -> torch.Tensor:
        mels = _lookup(cfgs, "num_mel_bins", "audio")
        positions = _lookup(cfgs, "max_source_positions", "audio")
        if mels and positions:
            # Whisper-style encoders take 2 frames per position (a stride-2 conv) and insist on the full length.
            return torch.zeros(1, mels, 2 * positions, dtype=dtype, device=device)
        per_channel = _lookup(cfgs, "input_feat_per_channel", "audio")
        if per_channel:  # Speech2Text-style: [batch, frames, features], any frame count
            width = per_channel * (_lookup(cfgs, "input_channels", "audio") or 1)
            return torch.zeros(1, 4 * _SEQ, width, dtype=dtype, device=device)
        raise GraphError(
            "no num_mel_bins + max_source_positions or input_feat_per_channel in the config to size input_features"
        )

    makers = {
        "input_ids": lambda: ids(_lookup(cfgs, "vocab_size", "text")),
        "pixel_values": pixels,
        "input_features": features,
        "input_values": lambda: torch.zeros(1, _SAMPLES, dtype=dtype, device=device),
    }
    if main not in makers:
        return []
    base: dict[str, Any] = {main: makers[main]()}
    if main == "input_ids" and "attention_mask" in params:
        base["attention_mask"] = torch.ones_like(base["input_ids"])
    if "use_cache" in params:
        base["use_cache"] = False
    if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        start = _lookup(cfgs, "decoder_start_token_id")
        vocab = _lookup(cfgs, "vocab_size", "decoder")
        base["decoder_input_ids"] = ids(vocab, 4, start)
    full = dict(base)
    vision = _lookup(cfgs, "image_size", "vision") is not None or any("vision" in k for c in cfgs for k in vars(c))
    if main != "pixel_values" and "pixel_values" in params and vision:  # the image tower of a dual encoder
        full["pixel_values"] = pixels()
    if main != "input_ids" and "input_ids" in params and _lookup(cfgs, "vocab_size", "text"):  # its text tower
        full["input_ids"] = makers["input_ids"]()
        if "attention_mask" in params and main == "pixel_values":
            full["attention_mask"] = torch.ones_like(full["input_ids"])
    return [full, base] if full.keys() != base.keys() else [base]


# ------------------------------------------------------------------- stand-in for large models

_LAYER_COUNT = re.compile(r"(num_(hidden_|encoder_|decoder_)?layers|n_layers?|(encoder|decoder)_layers)")
_STANDIN_LAYERS = 2


def _shrink(cfg) -> bool:
    """Cut every layer count in `cfg` (and its sub-configs) to a few layers; True if any changed."""
    changed = False
    for key, value in list(vars(cfg).items()):
        if hasattr(value, "to_dict") and not isinstance(value, dict):
            changed |= _shrink(value)
        elif _LAYER_COUNT.fullmatch(key) and isinstance(value, int) and value > _STANDIN_LAYERS:
            setattr(cfg, key, _STANDIN_LAYERS)
            # Per-layer lists (layer_types, ...) must stay as long as the layer count.
            for k, v in vars(cfg).items():
                if isinstance(v, (list, tuple)) and len(v) == value:
                    setattr(cfg, k, type(v)(v[:_STANDIN_LAYERS]))
            changed = True
    return changed


def _standin_roles(model: nn.Module) -> dict[str, frozenset[str]] | None:
    """Roles from a few-layer copy on the meta device, mapped back; None if that cannot be trusted."""
    if any("forward" in vars(m) for m in model.modules()):
        return None  # a patched forward the copy would not have
    try:
        cfg = copy.deepcopy(model.config)
        if not _shrink(cfg):
            return None  # already small: nothing to gain
        with torch.device("meta"):
            standin = type(model)(cfg)
        found = _find_roles(standin, _trace(standin, None))
    except Exception:
        return None  # the real model's own graph is the fallback, with its own errors
    return _map_back(model, standin, found)


def _map_back(model: nn.Module, standin: nn.Module, found: dict[str, frozenset[str]]) -> dict | None:
    """Give each module of `model` the roles of its counterpart in `standin` (same layer structure)."""
    real, small = dict(model.named_modules()), dict(standin.named_modules())
    sigs: dict[int, tuple] = {}

    def sig(m: nn.Module) -> tuple:  # the module tree's paths and types
        if id(m) not in sigs:
            sigs[id(m)] = tuple((path, type(sub)) for path, sub in m.named_modules())
        return sigs[id(m)]

    out: dict[str, frozenset[str]] = {}
    hit = set()
    for path, module in real.items():
        rp, sp = "", ""
        for part in path.split(".") if path else []:
            rlist, slist = real[rp], small.get(sp)
            if (
                part.isdigit()
                and isinstance(rlist, nn.ModuleList)
                and isinstance(slist, nn.ModuleList)
                and len(rlist) != len(slist)
            ):
                # Layer i maps to a stand-in layer of identical structure (i itself if it can).
                want = sig(rlist[int(part)])
                order = sorted(range(len(slist)), key=lambda j: j != int(part) % len(slist))
                match = next((j for j in order if sig(slist[j]) == want), None)
                if match is None:
                    return None
                part_s = str(match)
            else:
                part_s = part
            rp, sp = f"{rp}.{part}".lstrip("."), f"{sp}.{part_s}".lstrip(".")
        if type(small.get(sp)) is not type(module):
            return None
        hit.add(sp)
        if sp in found:
            out[path] = found[sp]
    return out if hit == set(small) else None


# ----------------------------------------------------------------------------- roles


class _Flow:
    """Read-only helpers over one traced graph: op kinds, owners, data edges."""

    def __init__(self, module: nn.Module, graph: fx.Graph) -> None:
        self.graph = graph
        self.mods = dict(module.named_modules())
        lin = _linear_types()
        self.linears = {p for p, m in self.mods.items() if isinstance(m, lin)}
        self.embeds = {p for p, m in self.mods.items() if isinstance(m, nn.Embedding)}
        self.acts = {p for p, m in self.mods.items() if _is_activation(m)}
        self.scope = {n: self._scope(n) for n in graph.nodes}
        self.kind = {n: self._kind(n) for n in graph.nodes}
        self.owner = {n: self._owner(n) for n in graph.nodes}

    def _scope(self, node: fx.Node) -> str | None:
        if node.op == "call_module":
            return cast(str, node.target)  # fx: a call_module target is the module's qualified name
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        path = list(stack.values())[-1][0]
        path = re.sub(r"@\d+$", "", re.sub(r"^L\['self'\]\.?|^L__self__\.?", "", path))
        path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).replace("._modules", "").lstrip(".")
        return path if path in self.mods else None

    def _kind(self, node: fx.Node) -> str:
        if node.op == "call_module":
            m = self.mods.get(node.target)
            for types, kind in _MODULE_KINDS:
                if isinstance(m, types):
                    return kind
            return "act" if m is not None and _is_activation(m) else "module"
        if node.op == "call_method":
            name = cast(str, node.target)  # fx: a call_method target is the method's name
        elif node.op == "call_function":
            t = node.target
            name = getattr(getattr(t, "_overloadpacket", None) or t, "__name__", str(t))
        else:
            return node.op
        name = name.strip("_")
        return {"iadd": "add", "imul": "mul", "truediv": "div", "itruediv": "div", "isub": "sub"}.get(name, name)

    def param(self, node: fx.Node) -> str | None:
        for _ in range(4):  # look through weight.t() / .T / .to(...)
            if node.op == "get_attr":
                return cast(str, node.target)  # fx: a get_attr target is the attribute's qualified name
            if "surgery.param" in node.meta:
                return node.meta["surgery.param"]
            if self._kind(node) not in _VIEW or not node.args or not isinstance(node.args[0], fx.Node):
                return None
            node = node.args[0]
        return None

    def _owner(self, node: fx.Node) -> str | None:
        if self.scope[node] in self.linears:
            return self.scope[node]
        if self.kind[node] in _LINEAR_OPS:  # functional use of a module's weight (tied heads, MHA out_proj)
            for a in node.args[1:3]:
                p = self.param(a) if isinstance(a, fx.Node) else None
                owner = p.rpartition(".")[0] if p else None
                if owner in self.linears or owner in self.embeds:
                    return owner
        return None

    def inputs(self, node: fx.Node, first_only: bool = False) -> list[fx.Node]:
        if first_only:
            return [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []
        out: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a))
        return [a for a in out if self.kind[a] not in ("getattr", "size", "sym_size")]

    def tensors(self, node: fx.Node) -> list[fx.Node]:
        """Inputs that are activations, not parameters, buffers or constants."""
        return [a for a in self.inputs(node) if self.param(a) is None]

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        return self.inputs(node, first_only=self.kind[node] in _VIEW)

    def back(
        self, starts: Iterable[fx.Node], through: frozenset[str], want: frozenset[str] = frozenset()
    ) -> tuple[set[str], list[fx.Node]]:
        """Walk back through ops of kinds `through`: (linear owners reached, nodes of kinds `want` reached)."""
        return self._walk(starts, through, want, lambda n: self.data_inputs(n))

    def forward(
        self, start: fx.Node, through: frozenset[str], want: frozenset[str] = frozenset()
    ) -> tuple[set[str], list[fx.Node]]:
        """Walk forward from `start`'s users likewise (other owners than `start`'s own count)."""
        return self._walk(start.users, through, want, lambda n: n.users, skip=self.owner[start])

    def _walk(
        self,
        starts: Iterable[fx.Node],
        through: frozenset[str],
        want: frozenset[str],
        step: Callable[[fx.Node], Iterable[fx.Node]],
        skip: str | None = None,
    ) -> tuple[set[str], list[fx.Node]]:
        owners: set[str] = set()
        hits: list[fx.Node] = []
        seen: set[fx.Node] = set()
        todo = list(starts)
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            owner = self.owner[n]
            if owner is not None and owner != skip:
                owners.add(owner)
            elif self.kind[n] in want:
                hits.append(n)
            elif self.kind[n] in through:
                todo.extend(step(n))
        return owners, hits

    def operands(self, node: fx.Node) -> list[fx.Node]:
        """The two matrix operands of a matmul-like node (einsum's list, baddbmm's batch1/batch2)."""
        k = self.kind[node]
        nodes: list[fx.Node] = []
        fx.node.map_arg(node.args[1:] if k == "einsum" else node.args, nodes.append)
        return nodes[1:3] if k == "baddbmm" else nodes[:2]


_QKV_PASS = _VIEW | _ELEMENTWISE
_SCORE_PASS = _VIEW | {"add", "sub", "mul", "div", "masked_fill", "where", "clamp", "tanh", "max", "maximum"}
_PROB_PASS = _VIEW | {"mul", "div", "masked_fill", "where"}
_OUT_PASS = _VIEW | {"mul", "div", "cat"}


def _attention(flow: _Flow) -> Iterator[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(query, key, value, output) of each attention op: sdpa / flex, or matmul -> softmax -> matmul."""
    for n in flow.graph.nodes:
        kind = flow.kind[n]
        if "scaled_dot_product" in kind or kind == "flex_attention":
            qkv = [
                n.args[i] if len(n.args) > i else n.kwargs.get(name) for i, name in enumerate(("query", "key", "value"))
            ]
            if all(isinstance(x, fx.Node) for x in qkv):
                yield *qkv, n
        elif kind in _SOFTMAX and isinstance(n.args[0], fx.Node):
            _, scores = flow.back([n.args[0]], _SCORE_PASS, want=_MATMUL)
            _, outs = flow.forward(n, _PROB_PASS, want=_MATMUL)
            for s in scores:
                for out in outs:
                    (q, k), (_, v) = flow.operands(s), flow.operands(out)
                    yield q, k, v, out


def _ffn_sources(flow: _Flow, inputs: Iterable[fx.Node]) -> dict[str, set[tuple[bool, tuple[fx.Node, ...]]]]:
    """Linears feeding `inputs` through activations and gating muls: owner -> {(activated, slices)}.

    The slices (split/getitem nodes passed on the way) tell a fused gate+up linear (two different
    slices) from a composite activation such as tanh-GELU (one tensor, reached both ways).
    """
    found: dict[str, set[tuple[bool, tuple[fx.Node, ...]]]] = {}
    seen: set[tuple[fx.Node, bool, tuple[fx.Node, ...]]] = set()
    todo: list[tuple[fx.Node, bool, tuple[fx.Node, ...]]] = [(n, False, ()) for n in inputs]
    while todo:
        state = todo.pop()
        if state in seen:
            continue
        seen.add(state)
        n, act, pieces = state
        kind, owner = flow.kind[n], flow.owner[n]
        if owner is not None:
            found.setdefault(owner, set()).add((act, pieces))
            continue
        if flow.scope[n] in flow.acts or kind in _ACT:
            act, nxt = True, flow.inputs(n)
        elif kind in _VIEW:
            nxt = flow.data_inputs(n)
        elif kind in _SCALE or kind in {"add", "sub", "pow"} and (act or len(flow.tensors(n)) == 1):
            nxt = flow.inputs(n)  # a sum is only passed inside an activation (1 + tanh(...)), not a residual
        else:
            continue
        pieces = (*pieces, n) if kind in _SLICE else pieces
        todo.extend((a, act, pieces) for a in nxt)
    return found


def _find_roles(module: nn.Module, graph: fx.Graph) -> dict[str, frozenset[str]]:
    flow = _Flow(module, graph)
    out: dict[str, set[str]] = {}

    def give(path: str, *names: str) -> None:
        out.setdefault(path, set()).update(names)

    for q, k, v, o in _attention(flow):
        srcs = {r: flow.back([x], _QKV_PASS)[0] for r, x in (("q", q), ("k", k), ("v", v))}
        if not (srcs["q"] and srcs["k"]):
            continue  # a softmax over something else (router logits, ...)
        for path in set().union(*srcs.values()):
            got = [r for r, s in srcs.items() if path in s]
            give(path, "attn", *(["qkv"] if len(got) == 3 else got))
        for path in flow.forward(o, _OUT_PASS)[0]:
            give(path, "attn", "o")

    # Module -> its input nodes and output nodes (its ops may be several, e.g. Conv1D's addmm).
    ins: dict[str, set[fx.Node]] = {}
    outs: dict[str, set[fx.Node]] = {}
    for n in graph.nodes:
        if (owner := flow.owner[n]) is None:
            continue
        ins.setdefault(owner, set()).update(
            a for a in flow.inputs(n) if flow.owner[a] != owner and flow.param(a) is None
        )
        if any(flow.owner[u] != owner for u in n.users):
            outs.setdefault(owner, set()).add(n)

    for down in ins:
        if _ATTN_ROLES & out.get(down, set()) or _mixes_positions(flow.mods[down]):
            continue
        feeds = {  # not `srcs`: that name holds the attention's q/k/v owners above
            p: s
            for p, s in _ffn_sources(flow, ins[down]).items()
            if not _ATTN_ROLES & out.get(p, set()) and not _mixes_positions(flow.mods[p])
        }
        activated = {p for p, s in feeds.items() if any(a for a, _ in s)}
        plain = {p for p, s in feeds.items() if {x for a, x in s if not a} - {x for a, x in s if a}}
        joins = any(flow.forward(o, _VIEW | _SCALE, want=_RESIDUAL)[1] for o in outs[down])
        if not activated or not joins:
            continue  # no activation in between, or not added back into a residual stream
        give(down, "mlp", "mlp.down")
        for p in activated:
            give(p, "mlp", "mlp.gate" if plain else "mlp.up")
        for p in plain:
            give(p, "mlp", "mlp.up")

    for head in _heads(flow):
        give(head, "head")
    for path in flow.linears:
        if "head" not in out.get(path, ()):
            give(path, "linear")
    for path in flow.embeds:
        give(path, "embed")
    return {p: frozenset(r) for p, r in out.items()}


def _mixes_positions(module: nn.Module) -> bool:
    """A convolution with a kernel wider than 1 mixes neighbouring positions: never part of an FFN,
    which works on each position alone (Mamba's causal conv1d -> silu -> x_proj is no FFN)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and any(k > 1 for k in module.kernel_size)


def _heads(flow: _Flow) -> set[str]:
    """Owners of the linears whose output, up to reshapes, scaling or logit soft-capping, is returned."""
    out_node = next(n for n in reversed(flow.graph.nodes) if n.op == "output")
    user = out_node.meta.get("surgery.user_outputs")
    starts: list[fx.Node] = []
    fx.node.map_arg(out_node.args, starts.append)

    def step(n: fx.Node) -> list[fx.Node]:
        kind = flow.kind[n]
        if kind in _VIEW:
            return flow.data_inputs(n)
        if kind in _SCALE | {"add", "sub"} and len(flow.tensors(n)) == 1:
            return flow.tensors(n)  # scaling by a constant, adding a bias (BART's final_logits_bias)
        if kind == "tanh" and flow.scope[n] not in flow.acts and flow.inputs(n):
            # soft-capping tanh(logits / cap) * cap, not a pooler's tanh
            return flow.inputs(n) if flow.kind[flow.inputs(n)[0]] in _SCALE else []
        return []

    starts = [s for s in starts if user is None or s.name in user]
    return flow._walk(starts, _VIEW | _SCALE | {"add", "sub", "tanh"}, frozenset(), step)[0]
