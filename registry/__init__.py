"""registry: the storage side of model-surgery (versioned hub of deltas).

Depends on `surgery`; `surgery` never imports it. The hub itself is the next
issue's work; for now this package holds the console script entry point.
"""

from __future__ import annotations

__all__: list[str] = []
