"""`surgery.summary`: what is trainable, and what each delta costs."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from surgery import engine


@dataclass
class Summary:
    total: int  # every parameter of the model, deltas included
    trainable: int
    base: int
    deltas: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [
            f"total parameters     {self.total:>14,}",
            f"trainable            {self.trainable:>14,}  ({100 * self.trainable_fraction:.4f} %)",
            f"base                 {self.base:>14,}",
        ]
        if self.deltas:
            lines.append(
                f"{'delta':<16} {'method':<8} {'sites':>6} {'params':>12} {'trainable':>12}  {'state':<7} mergeable"
            )
            for name, d in self.deltas.items():
                m = d["mergeable"]
                lines.append(
                    f"{name:<16} {d['method']:<8} {d['sites']:>6} {d['params']:>12,} "
                    f"{d['trainable']:>12,}  {d['state']:<7} {'yes' if m is True else 'no: ' + str(m)}"
                )
        return "\n".join(lines)

    __repr__ = __str__


def summary(model: nn.Module) -> Summary:
    """Trainable / total parameters, and per delta: method, sites, parameters, trainable ones,
    whether it is active, merged or off in the current context, and whether it can merge
    (True, or the reason it cannot)."""
    engine.check_model(model)
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    deltas: dict[str, dict[str, object]] = {}
    active = set(engine.spec_names(engine.active(model)))
    merged = set(engine.merged(model))
    delta_params = 0
    for name in engine.names(model):
        inj = engine.injection(model, name)
        ps = [p for ad in engine.adapters(model, name).values() for p in ad.parameters()]
        n = sum(p.numel() for p in ps)
        delta_params += n
        deltas[name] = {
            "method": inj.method,
            "sites": len(inj.sites),
            "params": n,
            "trainable": sum(p.numel() for p in ps if p.requires_grad),
            "state": "merged" if name in merged else ("active" if name in active else "off"),
            "mergeable": engine.mergeable(model, name),  # True, or why not
        }
    return Summary(total, trainable, total - delta_params, deltas)
