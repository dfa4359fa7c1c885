"""What a pruned network costs as a function of how many units each gated group keeps, and the cut
that meets a budget exactly.

Each layer's multiply-accumulates and parameters are products of its two channel widths (plus bias
and per-channel terms), and each width is a constant plus a multiple of the kept count of the unit
group that sets it, so the cost is a polynomial of degree two in the per-group kept counts x:

    cost(x) = c0 + a . x + x^T b x / 2        (b symmetric; its diagonal is a group read and written
                                               by one layer)

`distswitch.counting.exact_cost_model` builds it from one traced forward pass; the training loop
evaluates it on the device without a host sync (the switcher's budget controller) and every method
cuts to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CostModel:
    """cost(x) for per-layer kept counts x [layers]; `dense` = cost(units)."""

    kind: str
    units: tuple[int, ...]
    c0: float
    a: tuple[float, ...]
    b: tuple[tuple[float, ...], ...]  # symmetric

    @property
    def dense(self) -> float:
        return self.evaluate_list(list(self.units))

    def evaluate_list(self, x: list[float]) -> float:
        v = np.asarray(x, dtype=np.float64)
        return float(self.c0 + np.dot(self.a, v) + 0.5 * v @ np.asarray(self.b, dtype=np.float64) @ v)

    def marginal_list(self, x: list[float]) -> list[float]:
        """What the last kept unit of each group costs at widths x: cost(x) - cost(x - e_s)."""
        v = np.asarray(x, dtype=np.float64)
        b = np.asarray(self.b, dtype=np.float64)
        return (np.asarray(self.a) + b @ v - 0.5 * np.diag(b)).tolist()

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c0, a, b) as float64 tensors on `device`, for `evaluate` and `marginal`."""
        return (
            torch.tensor(self.c0, dtype=torch.float64, device=device),
            torch.tensor(self.a, dtype=torch.float64, device=device),
            torch.tensor(self.b, dtype=torch.float64, device=device).reshape(len(self.a), len(self.a)),
        )

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


def cut_to_budget(
    cost: CostModel, scores: list[torch.Tensor], fraction: float, min_units: list[int]
) -> list[torch.Tensor]:
    """0/1 masks (one per group, shaped like its scores) keeping the highest-scored units such that
    cost <= fraction * dense, as close to it as single units allow (or up to OVERSHOOT of the dense
    cost above it, where that is closer).

    Units go lowest score first (a group never below its `min_units`) until the cost fits; then
    the highest-scored removed units that still fit come back (cheap units fill the gap a costly
    one leaves). Scores are compared across groups: rank-normalise them per group for a uniform
    allocation. Ties break by group, then index, so the cut is deterministic.
    """
    target = fraction * cost.dense
    flat = np.concatenate([sc.detach().flatten().cpu().double().numpy() for sc in scores]) if scores else np.zeros(0)
    group = np.concatenate([np.full(sc.numel(), s) for s, sc in enumerate(scores)]) if scores else np.zeros(0, int)
    index = np.concatenate([np.arange(sc.numel()) for sc in scores]) if scores else np.zeros(0, int)
    order = np.lexsort((index, group, flat))  # by score, then group, then index
    a, b = np.asarray(cost.a, dtype=np.float64), np.asarray(cost.b, dtype=np.float64)
    half_diag = 0.5 * np.diag(b)
    x = np.asarray(cost.units, dtype=np.float64)
    # grad = a + b x: removing a unit of group s saves grad[s] - half_diag[s]; adding one costs
    # grad[s] + half_diag[s] (exact: the polynomial is quadratic); kept up to date in O(groups).
    grad = a + b @ x
    keep = [np.ones(sc.numel()) for sc in scores]
    current = cost.evaluate_list(x.tolist())
    floor = np.asarray(min_units, dtype=np.float64)
    removed = []
    for u in order:
        if current <= target + 1e-9:
            break
        s, i = int(group[u]), int(index[u])
        if x[s] <= floor[s]:
            continue
        current -= grad[s] - half_diag[s]
        x[s] -= 1
        grad -= b[:, s]
        keep[s][i] = 0.0
        removed.append((s, i))
    # Then the removed units come back, highest-scored first, while they fit; and where a gap is left
    # that no unit fits into from below (every cheap unit already kept: a LeNet5 whose FC units all
    # survived was left 1.1% short of 50%), a unit that lands closer, at most OVERSHOOT over.
    for fits in (
        lambda new: new <= target + 1e-9,
        lambda new: abs(new - target) < abs(current - target) and new <= target + OVERSHOOT * cost.dense,  # noqa: B023
    ):
        for s, i in reversed(removed):
            extra = grad[s] + half_diag[s]
            if not keep[s][i] and fits(current + extra):
                current += extra
                x[s] += 1
                grad += b[:, s]
                keep[s][i] = 1.0
    return [torch.from_numpy(k).float().view_as(sc).to(sc.device) for k, sc in zip(keep, scores)]


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
