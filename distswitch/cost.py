"""What a pruned network costs as a function of how many units each gated layer keeps, and the cut
that meets a budget exactly.

For networks whose layers form a chain (MLP, LeNet5, VGG), a layer's multiply-accumulates and
parameters are products of the kept widths on its two sides (plus bias and per-channel terms), so
the cost is a polynomial of degree two in the per-layer kept counts x:

    cost(x) = c0 + sum_s a_s x_s + sum_{s<t} b_st x_s x_t

`distswitch.export.fit_cost_model` fits it from exact counts of real compact models and checks it
on a random width vector; the training loop then evaluates it on the device without a host sync
(the switcher's budget controller) and the baselines cut to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CostModel:
    """cost(x) for per-layer kept counts x [layers]; `dense` = cost(units)."""

    kind: str
    units: tuple[int, ...]
    c0: float
    a: tuple[float, ...]
    b: tuple[tuple[float, ...], ...]  # symmetric, zero diagonal

    @property
    def dense(self) -> float:
        return self.evaluate_list(list(self.units))

    def evaluate_list(self, x: list[float]) -> float:
        total = self.c0 + sum(a * v for a, v in zip(self.a, x))
        n = len(x)
        total += sum(self.b[s][t] * x[s] * x[t] for s in range(n) for t in range(s + 1, n))
        return total

    def marginal_list(self, x: list[float]) -> list[float]:
        """d cost / d x_s: what one more unit of layer s costs at widths x."""
        n = len(x)
        return [self.a[s] + sum(self.b[s][t] * x[t] for t in range(n) if t != s) for s in range(n)]

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c0, a, b) as float64 tensors on `device`, for `evaluate` and `marginal`."""
        return (torch.tensor(self.c0, dtype=torch.float64, device=device),
                torch.tensor(self.a, dtype=torch.float64, device=device),
                torch.tensor(self.b, dtype=torch.float64, device=device).reshape(len(self.a), len(self.a)))

    @staticmethod
    def evaluate(coeffs, x: torch.Tensor) -> torch.Tensor:
        c0, a, b = coeffs
        return c0 + a @ x + 0.5 * x @ b @ x

    @staticmethod
    def marginal(coeffs, x: torch.Tensor) -> torch.Tensor:
        _, a, b = coeffs
        return a + b @ x

    def floor(self, min_units: list[int]) -> float:
        return self.evaluate_list([float(m) for m in min_units])


def units_cost_model(units: list[int]) -> CostModel:
    """kind "units": the cost is the number of kept gated units."""
    n = len(units)
    return CostModel("units", tuple(units), 0.0, (1.0,) * n, tuple((0.0,) * n for _ in range(n)))


# How far above the budget a cut may land to come closer to it (half of the 1% a run must meet).
OVERSHOOT = 0.005


def cut_to_budget(cost: CostModel, scores: list[torch.Tensor], fraction: float, min_units: list[int]) -> list[torch.Tensor]:
    """0/1 masks (one per layer, shaped like its scores) keeping the highest-scored units such that
    cost <= fraction * dense, as close to it as single units allow (or up to OVERSHOOT of the dense
    cost above it, where that is closer).

    Units go lowest score first (a layer never below its `min_units`) until the cost fits; then
    the highest-scored removed units that still fit come back (cheap units fill the gap a costly
    one leaves). Scores are compared across layers: rank-normalise them per layer for a uniform
    allocation. Ties break by layer, then index, so the cut is deterministic.
    """
    target = fraction * cost.dense
    flat = [(float(v), s, i) for s, sc in enumerate(scores) for i, v in enumerate(sc.detach().flatten().tolist())]
    order = sorted(flat, key=lambda t: (t[0], t[1], t[2]))
    x = [float(n) for n in cost.units]
    keep = [torch.ones(sc.numel()) for sc in scores]
    current = cost.evaluate_list(x)
    removed = []
    for _, s, i in order:
        if current <= target + 1e-9:
            break
        if x[s] <= min_units[s]:
            continue
        current -= cost.marginal_list(x)[s]
        x[s] -= 1
        keep[s][i] = 0.0
        removed.append((s, i))
    # Then the removed units come back, highest-scored first, while they fit; and where a gap is left
    # that no unit fits into from below (every cheap unit already kept: a LeNet5 whose FC units all
    # survived was left 1.1% short of 50%), a unit that lands closer, at most OVERSHOOT over.
    for fits in (lambda new: new <= target + 1e-9,
                 lambda new: abs(new - target) < abs(current - target) and new <= target + OVERSHOOT * cost.dense):
        for s, i in reversed(removed):
            extra = cost.marginal_list(x)[s]
            if not keep[s][i] and fits(current + extra):
                current += extra
                x[s] += 1
                keep[s][i] = 1.0
    return [k.view_as(sc).to(sc.device) for k, sc in zip(keep, scores)]


def cut_to_widths(scores: list[torch.Tensor], widths: list[int]) -> list[torch.Tensor]:
    """0/1 masks keeping the widths[s] highest-scored units of each layer (ties by index)."""
    masks = []
    for sc, k in zip(scores, widths):
        m = torch.zeros(sc.numel())
        m[torch.argsort(sc.detach().flatten().cpu(), descending=True, stable=True)[:k]] = 1.0
        masks.append(m.view_as(sc).to(sc.device))
    return masks


def scheduled_fraction(target: float, epoch: int, start: int, end: int) -> float:
    """Gradual pruning's budget for `epoch` (Zhu & Gupta 2017's cubic ramp): 1 before `start`,
    `target` from the last epoch before `end` on, falling fastest at first while many units are
    redundant."""
    span = end - start
    if epoch < start:
        return 1.0
    if span <= 0 or epoch >= end - 1:
        return target
    done = (epoch - start + 1) / span
    return target + (1 - target) * (1 - done) ** 3


def kept_counts(factors: list[torch.Tensor]) -> torch.Tensor:
    """Kept units per layer (nonzero factors) as a float64 device tensor: no host sync."""
    return torch.stack([(f.detach() != 0).sum(dtype=torch.float64) for f in factors])
