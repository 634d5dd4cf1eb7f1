"""What every method provides, and the table methods register in."""

from __future__ import annotations

import abc
import dataclasses
import difflib
from typing import Any, ClassVar

import torch
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


class Adapter(nn.Module, abc.ABC):
    """The module a method attaches to one site.

    The engine calls `contribute(x, out)` from a forward hook on the site's
    module, with the site's input and output; it returns the new output.

    `entry`, when set, is the path of another module whose *input* the adapter
    reads instead of the site's (a sublayer site: the FFN's input, its output
    at the site). An adapter that `replaces` computes the site's whole output
    from that input; when it runs first, the engine skips the base computation
    and `contribute` gets `out=None`.
    """

    entry: str | None = None
    replaces: ClassVar[bool] = False

    @abc.abstractmethod
    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Return `out` with this adapter's contribution for input `x`. With
        `inplace`, `out` is owned by the caller alone and may be updated in place."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The learned tensors, keyed by their suffix under the site path."""
        return {k: p for k, p in self.named_parameters()}

    def merge_factors(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None:
        """The weight delta in `base.weight`'s layout: `(left, right)` with
        delta = left @ right, or a full tensor, or None if the method cannot merge."""
        return None


class Method(abc.ABC):
    """One kind of surgery: a config dataclass, which modules it can wrap, and
    how to build the adapter for one site."""

    name: ClassVar[str]
    Config: ClassVar[type]
    default_targets: ClassVar[Any] = None
    tensor_suffixes: ClassVar[tuple[str, ...]] = ()  # the learned tensors' keys under a site path
    changes_inputs: ClassVar[bool] = False  # whether the engine asks `prepare_inputs` on every model call

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
    def make(
        self,
        module: nn.Module,
        path: str,
        cfg: Any,
        shapes: dict[str, torch.Size] | None = None,
        *,
        model: nn.Module | None = None,
    ) -> Adapter:
        """Build the adapter for one site. `shapes`, when given, are the tensor
        shapes of a stored delta for this site (so per-site ranks are kept);
        `model` is the whole model, for methods whose sites span modules."""

    def attached(self, adapters: dict[str, Adapter]) -> None:
        """Called once a delta's adapters are in place (site path -> adapter)."""

    def detached(self, adapters: dict[str, Adapter]) -> None:
        """Called once a delta's adapters are taken out by `remove` (site path -> adapter)."""

    def fold(self, adapters: dict[str, Adapter]) -> bool:
        """`merge` for a method whose merge changes only its own tensors, never the base weights
        (a prefix folds its reparameterisation): do it and return True. False (the default):
        the engine merges `Adapter.merge_factors` into the base weights."""
        return False

    def unfold(self, adapters: dict[str, Adapter]) -> bool:
        """`unmerge` for a method whose `fold` merges: undo it and return True."""
        return False

    def folded(self, adapters: dict[str, Adapter]) -> bool:
        """Whether `fold` merged this delta (it is then listed by `surgery.merged`)."""
        return False

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
