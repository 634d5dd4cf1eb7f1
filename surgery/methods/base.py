"""What every method provides, and the table methods register in."""

from __future__ import annotations

import abc
import copy
import dataclasses
import difflib
import enum
import re
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import ConfigError


class MethodConfig:
    """Base of every method's config dataclass: a config is validated when it is built
    (``LoRAConfig(r=-1)`` raises `ConfigError`), by its method's `validate`, wherever it is
    built (`inject`, `dataclasses.replace`, a Delta read back)."""

    def __post_init__(self) -> None:
        method = _BY_CONFIG.get(type(self))
        if method is not None:
            method.validate(self)


# PEFT's names for what our configs call otherwise: the usual slip of a PEFT user
_PEFT_NAMES = {
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "use_rslora": "rslora",
    "init_lora_weights": "init",
    "num_virtual_tokens": "n_tokens",
    "target_modules": "targets",
    "prompt_tuning_init": "init",
    "encoder_hidden_size": "encoder_hidden",
    "num_experts": "experts",
}


def _did_you_mean(key: str, known: list[str]) -> str:
    if key == "target_modules":
        return " (did you mean targets=, an argument of inject?)"
    peft = _PEFT_NAMES.get(key)
    close = [peft] if peft in known else difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Action(str, enum.Enum):
    """How an adapter acts at its site, declared by its class (`Adapter.action`); the engine
    runs each kind at its place and nothing else is looked for."""

    OUTPUT = "output"  # contribute(x, out) -> the new output: add to it, or rescale it (LoRA, adapters, IA3 on k/v)
    INPUT = "input"  # transform_input(x) -> the input the base runs on (IA3 on the FFN's input)
    WEIGHT = "weight"  # weight_delta(site) -> (dW, db): the forward uses W + dW, b + db (parameter-space deltas)
    REPLACE = "replace"  # contribute(x, None) -> the whole output; the base is skipped when it runs first (MoE)
    ATTENTION = "attention"  # kv(...) -> key/value positions the site's attention prepends (prefixes)
    COMPOSE = "compose"  # fuse(out, contributions) over the deltas named in `members` (AdapterFusion)
    # (a method that changes the model's inputs, prompts, declares it on the Method: `changes_inputs`)


_KINDS = {"linear", "conv1d_tf", "conv", "embedding"}


def kind_of(m: nn.Module) -> str:
    """A module's kind as `SiteView.kind` names it."""
    if isinstance(m, nn.Embedding):
        return "embedding"
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):  # transformers' GPT-2 style Conv1D
        return "conv1d_tf"
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return "linear" if isinstance(m, nn.Linear) else "other"


class SiteView:
    """What a method may read about one site, read-only: the base module, its weight and bias,
    path, roles, dtype and device, and the site's own operation run with other tensors.
    `model` is the whole model, for methods whose sites span modules (a sublayer's entry)."""

    __slots__ = ("path", "module", "model", "_roles")

    def __init__(self, model: nn.Module, path: str, module: nn.Module) -> None:
        self.model, self.path, self.module = model, path, module
        self._roles: frozenset[str] | None = None

    def __repr__(self) -> str:
        return f"SiteView({self.path!r}, {type(self.module).__name__}, kind={self.kind!r})"

    @property
    def weight(self) -> torch.Tensor | None:
        """The weight the site's forward uses; for a 4-bit layer (`surgery.quantize`, or a
        transformers 4-bit load) a dequantised copy, made on every read."""
        w = getattr(self.module, "weight", None)
        if getattr(w, "quant_state", None) is not None:
            from surgery.fourbit import weight_of

            return weight_of(self.module)
        return w if isinstance(w, torch.Tensor) else None

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        return b if isinstance(b, torch.Tensor) else None

    @property
    def dtype(self) -> torch.dtype:
        t = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        return t.dtype if t is not None else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        t = next(iter(self.module.parameters()), None)
        return t.device if t is not None else torch.device("cpu")

    @property
    def kind(self) -> str:
        """`kind_of` the module: "linear" (weight [out, in]), "conv1d_tf" (transformers' Conv1D,
        weight [in, out]), "conv" (nn.Conv1d/2d/3d), "embedding", or "other"."""
        return kind_of(self.module)

    @property
    def in_features(self) -> int | None:
        w, k = self.weight, self.kind
        if w is None or k not in _KINDS:
            return None
        return int(w.shape[0] if k in ("conv1d_tf", "embedding") else w.shape[1] * (getattr(self.module, "groups", 1)))

    @property
    def out_features(self) -> int | None:
        w, k = self.weight, self.kind
        if w is None or k not in _KINDS:
            return None
        return int(w.shape[1] if k in ("conv1d_tf", "embedding") else w.shape[0])

    @property
    def roles(self) -> frozenset[str]:
        """The site's roles in the model's dataflow graph (`q`, `k`, `v`, `o`, `mlp.up`,
        `mlp.down`, ...); empty when the graph cannot be built without example inputs."""
        if self._roles is None:
            from surgery.errors import GraphError
            from surgery.graph import roles  # lazy: tracing only for methods that ask

            try:
                self._roles = roles(self.model).get(self.path, frozenset())
            except GraphError:
                self._roles = frozenset()
        return self._roles

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The site's own operation on `x` with `weight` / `bias` in place of its own
        (for linear, Conv1D, conv and embedding sites): what a weight delta adds is
        ``site.forward(x, dW, db)``, the forward being linear in its tensors."""
        m, k = self.module, self.kind
        if k == "linear":
            return F.linear(x, weight, bias)
        if k == "conv1d_tf":
            out = x.reshape(-1, weight.shape[0]) @ weight
            out = out if bias is None else out + bias
            return out.view(*x.shape[:-1], weight.shape[1])
        if k == "conv":
            return cast(Any, m)._conv_forward(x, weight, bias)
        if k == "embedding":
            e = cast(nn.Embedding, m)
            return F.embedding(x, weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        raise TypeError(f"site {self.path!r} ({type(m).__name__}) has no functional form")


@dataclasses.dataclass(frozen=True)
class WeightUpdate:
    """How a merge changes one tensor of the base module (its weight or bias), in that tensor's
    layout: ``W' = rows * (W + delta) * cols``, each part optional. `delta` is low-rank factors
    ``(left, right)`` with delta = left @ right, or a dense tensor; `rows` a vector over dim 0,
    `cols` one over dim 1. The merge keeps what unmerge needs to give W back bit for bit (see
    `surgery.merge`): a scaling method never relies on dividing by its scale."""

    delta: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class NotMergeable:
    """An adapter's answer to `merge` when its output is not a weight update, with the reason."""

    reason: str


Merge = dict[str, WeightUpdate]  # base tensor name ("weight", "bias") -> its update


class Adapter(nn.Module, abc.ABC):
    """The module a method attaches to one site (a child of the site's module, so it is a
    parameter of the model: optimizers, the Trainer, DDP and `.to()` see it).

    Its class declares how it acts (`action`); the engine calls, per forward of the site and
    only while the adapter's delta is active:

    * `Action.OUTPUT`: ``contribute(x, out, inplace)`` from a forward hook with the site's
      input and output; it returns the new output. With `inplace`, `out` is owned by the
      caller alone and may be updated in place.
    * `Action.INPUT`: ``transform_input(x)`` from a forward pre-hook; the base (and the
      site's OUTPUT adapters) run on what it returns.
    * `Action.WEIGHT`: ``weight_delta(site)`` -> ``(dW, db)``; the forward is that of
      ``W + dW, b + db`` (run as ``out + site.forward(x, dW, db)``).
    * `Action.REPLACE`: ``contribute(x, None)`` computes the whole output while it runs
      first at its site; the base is skipped.
    * `Action.ATTENTION`: ``kv()``, the key / value positions the site's attention prepends
      (run inside the attention rewrite, `surgery.attention`).
    * `Action.COMPOSE`: ``fuse(out, contributions)`` over what the deltas in `members` add.

    `entry`, when set, is the path of another module whose *input* the adapter reads instead
    of the site's (a sublayer site: the FFN's input, its output at the site).
    `members` names the deltas a COMPOSE adapter runs over.
    """

    action: ClassVar[Action] = Action.OUTPUT
    entry: str | None = None
    members: tuple[str, ...] = ()

    @property
    def replaces(self) -> bool:
        return self.action is Action.REPLACE

    def contribute(self, x: torch.Tensor, out: Any, inplace: bool = False) -> Any:
        """`Action.OUTPUT` / `REPLACE`: return `out` with this adapter's effect for input `x`.
        ATTENTION adapters are called here too, after their attention ran (to check it did)."""
        if self.action is Action.ATTENTION:
            return out
        raise TypeError(
            f"{type(self).__name__} declares action {self.action.value!r}, not 'output': the engine never calls this"
        )

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """`Action.INPUT`: the input the base module runs on instead of `x`."""
        raise TypeError(
            f"{type(self).__name__} declares action {self.action.value!r}, not 'input': the engine never calls this"
        )

    def weight_delta(self, site: SiteView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`Action.WEIGHT`: ``(dW, db)`` in the layout of the site's weight and bias."""
        raise TypeError(
            f"{type(self).__name__} declares action {self.action.value!r}, not 'weight': the engine never calls this"
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The learned tensors, keyed by their suffix under the site path (what a Delta stores)."""
        return {k: p for k, p in self.named_parameters()}

    def merge(self, site: SiteView) -> Merge | NotMergeable:
        """How this adapter folds into the base: updates of the site's tensors, or why it cannot.
        A WEIGHT adapter merges its delta by default."""
        if self.action is Action.WEIGHT:
            dw, db = self.weight_delta(site)
            out = {"weight": WeightUpdate(delta=dw)}
            if db is not None:
                out["bias"] = WeightUpdate(delta=db)
            return out
        return NotMergeable("its output is not a weight update (an activation or a per-token router is in the way)")

    def low_rank(self, site: SiteView) -> Merge | NotMergeable:
        """This adapter as a slot bank serves it (`surgery.serve`): a `merge` whose weight update
        is low-rank factors ``(left, right)`` and, at most, a scale of the output channels (and
        a bias update). The default is `merge`; a method whose merge is a dense tensor that
        factors exactly (LoHa's Hadamard product, LoKr's Kronecker product) gives the factors
        here. A dense update is refused by the bank."""
        return self.merge(site)


class Method(abc.ABC):
    """One kind of surgery: a config dataclass, which modules it can wrap, and
    how to build the adapter for one site."""

    name: ClassVar[str]
    Config: ClassVar[type]
    default_targets: ClassVar[Any] = None
    tensor_suffixes: ClassVar[tuple[str, ...]] = ()  # the learned tensors' keys under a site path
    changes_inputs: ClassVar[bool] = False  # whether the engine asks `prepare_inputs` on every model call
    # whether a fresh injection leaves the model's outputs exactly as they were (the contract tests check it)
    identity_at_init: ClassVar[bool] = True

    def __deepcopy__(self, memo: dict[int, Any]) -> Method:
        # a registered method is the one table entry every model refers to (delta, save and serve check it
        # by identity): a copied model shares it; an unregistered one (a serving slot bank) is copied
        if METHODS.get(self.name) is self:
            return self
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def targets(self, cfg: Any) -> Any:
        """The selector used when `inject` gets no `targets=`."""
        return self.default_targets

    def place(self, model: nn.Module, hits: list[tuple[str, nn.Module]], cfg: Any) -> list[tuple[str, nn.Module]]:
        """The sites for the modules a selector hit (default: those this method supports)."""
        return [(p, m) for p, m in hits if self.supports(m)]

    def members(self, cfg: Any) -> tuple[str, ...]:
        """Names of the deltas a composing delta (a fusion) runs over; () for others."""
        return ()

    def config(self, **kwargs: Any) -> Any:
        fields = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            hints = "".join(_did_you_mean(k, sorted(fields)) for k in unknown)
            raise ConfigError(
                f"unknown config key(s) {unknown} for method {self.name!r}{hints}; known keys: {sorted(fields)}"
            )
        cfg = self.Config(**kwargs)
        if not isinstance(cfg, MethodConfig):  # a Config that is not a MethodConfig is validated here
            self.validate(cfg)
        return cfg

    def validate(self, cfg: Any) -> None:
        """Raise ConfigError for values that make no sense."""

    @abc.abstractmethod
    def supports(self, module: nn.Module) -> bool:
        """Whether this method can attach to `module`."""

    @abc.abstractmethod
    def make(self, site: SiteView, cfg: Any, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        """Build the adapter for one site. `shapes`, when given, are the tensor shapes of a
        stored delta for this site (so per-site ranks are kept)."""

    def attached(self, adapters: dict[str, Adapter]) -> None:
        """Called once a delta's adapters are in place (site path -> adapter)."""

    def detached(self, adapters: dict[str, Adapter]) -> None:
        """Called once a delta's adapters are taken out by `remove` (site path -> adapter)."""

    def fold(self, adapters: dict[str, Adapter]) -> bool:
        """`merge` for a method whose merge changes only its own tensors, never the base weights
        (a prefix folds its reparameterisation): do it and return True. False (the default):
        the engine merges what `Adapter.merge` gives into the base tensors."""
        return False

    def unfold(self, adapters: dict[str, Adapter]) -> bool:
        """`unmerge` for a method whose `fold` merges: undo it and return True."""
        return False

    def folded(self, adapters: dict[str, Adapter]) -> bool:
        """Whether `fold` merged this delta (it is then listed by `surgery.merged`)."""
        return False

    def check_tensors(
        self, model: nn.Module, sites: dict[str, dict[str, torch.Tensor]], config: dict[str, Any] | None = None
    ) -> None:
        """Refuse a stored delta's tensors that cannot be applied to `model` for what their shapes do not
        show (a sparse delta's indices outside the weight, a LoftQ LoRA on a full-precision base): raise
        DeltaMismatchError, before anything is touched (`surgery.apply`). `sites` is the Delta's tensors
        per site path, keyed by suffix; `config` its config."""

    def refresh(self, adapter: Adapter, path: str, cfg: Any) -> None:
        """Update an adapter's non-tensor settings from `cfg` (on a hot-swap)."""

    def config_dict(self, cfg: Any) -> dict[str, Any]:
        return dataclasses.asdict(cfg)

    def prepare_inputs(
        self, model: nn.Module, spec: tuple[Any, ...], args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """For methods with `changes_inputs`: called by the model's root forward pre-hook with
        the active spec of this call and the model's inputs; return new (args, kwargs), or None
        to leave them (a prompt puts its positions in front of the input here)."""
        return None

    # ---- PEFT's on-disk format (registry.save_peft / load_peft): None where PEFT has no such method
    peft_type: ClassVar[str | None] = None

    def to_peft(
        self, config: dict[str, Any], sites: dict[str, dict[str, torch.Tensor]], ctx: PeftContext
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A Delta of this method in PEFT's layout: the method's fields of ``adapter_config.json``
        (the registry adds peft_type, task_type, base_model_name_or_path, revision, inference_mode)
        and the tensors by PEFT key (full keys, ``PEFT_PREFIX + site + ...``). `sites` is the
        Delta's tensors per site path, keyed by suffix."""
        raise ConfigError(f"method {self.name!r} has no PEFT format")

    def from_peft(
        self, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: PeftContext
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT's config and tensors (full keys, as saved) -> (this method's config dict, tensors
        by ``{site}.{suffix}``). Raise `ConfigError` naming the PEFT field or key that cannot be
        represented: nothing is ever dropped silently."""
        raise ConfigError(f"method {self.name!r} has no PEFT format")


PEFT_PREFIX = "base_model.model."  # PEFT's key prefix of a site path in adapter_model.safetensors


def peft_pattern(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first key with ``re.match(rf"(.*\\.)?({key})$", path)``."""
    for key, v in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return v
        except re.error as e:
            raise ConfigError(f"PEFT pattern key {key!r} is not a valid regular expression: {e}") from None
    return default


@dataclasses.dataclass
class PeftContext:
    """What a method's `to_peft` / `from_peft` may use besides the Delta: the model when one is
    given, each site's kind (`SiteView.kind`), and PEFT's ``target_modules`` for a list of paths
    (a suffix list when it hits exactly them in the model, else a regex of the paths)."""

    model: nn.Module | None
    kinds: dict[str, str]
    target_modules: Any  # Callable[[list[str]], list[str] | str]


METHODS: dict[str, Method] = {}
_BY_CONFIG: dict[type, Method] = {}  # Config class -> its method, for MethodConfig.__post_init__


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = _BY_CONFIG[cls.Config] = cls()
    return cls


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        hint = _did_you_mean(name, sorted(METHODS)) if isinstance(name, str) else ""
        raise ConfigError(f"unknown method {name!r}{hint}; known methods: {sorted(METHODS)}") from None
