r"""Task samplers for multi-task training: which task the next batch comes from.

With :math:`n_i` examples in task :math:`i` (capped at `cap`, T5's "artificial limit" K), a task is
drawn with probability :math:`p_i \propto n_i` ("proportional"), :math:`1/k` ("equal") or
:math:`n_i^{1/T}` ("temperature", T5 / mT5 mixing: T = 1 is proportional, T -> inf equal).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from surgery.errors import ConfigError

STRATEGIES = ("proportional", "equal", "temperature")


class TaskSampler:
    """An endless, seeded stream of task names: ``for task in TaskSampler({"a": 900, "b": 100},
    "temperature", temperature=2.0)``. `probs` says each task's probability; `state_dict` /
    `load_state_dict` resume the stream exactly where it was."""

    def __init__(
        self,
        sizes: dict[str, int],
        strategy: str = "proportional",
        temperature: float = 2.0,
        seed: int = 0,
        cap: int | None = None,
    ) -> None:
        if not isinstance(sizes, dict) or not sizes:
            raise ConfigError("TaskSampler: sizes must be a non-empty dict, task name -> number of examples")
        if bad := {t: n for t, n in sizes.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1}:
            raise ConfigError(f"TaskSampler: sizes must be integers >= 1 (examples per task), got {bad}")
        if strategy not in STRATEGIES:
            raise ConfigError(f"TaskSampler: unknown strategy {strategy!r}; strategies: {list(STRATEGIES)}")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
            raise ConfigError(f"TaskSampler: temperature must be a number > 0, got {temperature!r}")
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise ConfigError(f"TaskSampler: cap must be an integer >= 1 or None, got {cap!r}")
        self.tasks = list(sizes)
        n = [min(s, cap) if cap else s for s in sizes.values()]
        if strategy == "equal":
            w = [1.0] * len(n)
        else:
            w = [float(x) ** (1.0 / temperature if strategy == "temperature" else 1.0) for x in n]
        total = sum(w)
        self.probs = {t: x / total for t, x in zip(self.tasks, w, strict=True)}
        self.strategy, self.temperature, self.seed, self.drawn = strategy, temperature, seed, 0
        self._rng = random.Random(seed)
        self._weights = w

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        self.drawn += 1
        return self._rng.choices(self.tasks, weights=self._weights)[0]

    def sample(self, n: int) -> list[str]:
        """The next `n` tasks."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream after `state["drawn"]` draws of the same seed (a checkpoint's)."""
        if state.get("seed") != self.seed:
            raise ConfigError(f"TaskSampler: the state is of seed {state.get('seed')!r}, this sampler's is {self.seed}")
        self._rng, self.drawn = random.Random(self.seed), 0
        for _ in range(int(state["drawn"])):
            next(self)

    def __repr__(self) -> str:
        shown = ", ".join(f"{t}: {p:.3f}" for t, p in self.probs.items())
        return f"TaskSampler({self.strategy}, {{{shown}}})"
