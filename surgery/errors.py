"""Exceptions of the package. Every message says what to do next."""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class of every error `surgery` raises on purpose."""


class SelectorError(SurgeryError, LookupError):
    """A selector is malformed or hits no site the method can use."""


class GraphError(SurgeryError):
    """The model's dataflow graph could not be built (needed for role selectors)."""


class ConfigError(SurgeryError, ValueError):
    """A method name or configuration value is not valid."""


class ModelTypeError(SurgeryError, TypeError):
    """A verb got something other than the model (a `torch.nn.Module`) where the model goes."""


class InjectionError(SurgeryError):
    """An injection cannot be done or undone as asked (name taken, unknown name, ...)."""


class MergeError(SurgeryError):
    """Merge or unmerge cannot be done as asked."""


class DeltaMismatchError(SurgeryError):
    """A Delta does not fit the model it is applied to."""


class CompositionError(SurgeryError, ValueError):
    """A composition of deltas (Stack, Fuse, Average, Parallel, BatchSplit) is not possible as given."""


class SlotError(SurgeryError):
    """A slot bank or a per-row route refuses: a slot out of range, empty or in use, a delta it
    cannot serve (rank above max_rank, other sites, not low-rank)."""


class CollectiveError(SurgeryError, RuntimeError):
    """A verb that every rank must call together was not (some ranks missing, or running another
    verb), or the rank that writes failed; raised on every rank that called it."""


class FusedExpertsWarning(UserWarning):
    """A method's targets cover less than they say: the model's experts are fused tensors it cannot attach to."""
