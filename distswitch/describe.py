"""What a switcher reads of each unit: fixed-size, scale-free descriptions of its weights.

A unit's rows have any length (a conv channel read by an FC layer has 8,000 outgoing weights) and the
switcher runs every step, so a row is summarised by a few statistics computed in O(fan), with one set
of ops over all the layers' units.
"""

from __future__ import annotations

import math

import torch

from distswitch.unit_weights import UnitWeights

# Thresholds on |standardised weight|: the fractions above them sketch the row's distribution in
# O(fan) without sorting (sorting every row each step cost more than a small TNN's whole step).
_THRESHOLDS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def describe_rows(w: torch.Tensor) -> torch.Tensor:
    """A fixed-size description of each row of `w` [units, fan] -> [units, DESCRIPTION_SIZE].

    Scale-free within a layer (weights divided by the layer's std) so one network serves layers of
    any fan-in and initialisation; the row's norm relative to its layer keeps the magnitude signal.
    Features: fractions of |z| above 6 thresholds, fraction positive, and 7 moments.
    """
    w = w.detach().float()
    units, fan = w.shape
    scale = w.std() if w.numel() > 1 else w.abs().mean()
    z = w / (scale + 1e-8)
    absz = z.abs()
    buffer = torch.empty_like(z)
    tails = [_above(absz, t, buffer) for t in _THRESHOLDS]
    norms = z.square().mean(dim=1).sqrt()
    rel_norm = torch.log(norms / (norms.mean() + 1e-8) + 1e-8)
    mean = z.mean(dim=1)
    std = (norms.square() - mean.square()).clamp_min(0).sqrt()
    feats = tails + [
        _above(z, 0.0, buffer),
        mean,
        std,
        absz.mean(dim=1),
        absz.amax(dim=1),
        norms,
        rel_norm,
        torch.full((units,), math.log(fan) / 10, device=w.device),
    ]
    return torch.stack(feats, dim=1)


DESCRIPTION_SIZE = len(_THRESHOLDS) + 8


def _above(x: torch.Tensor, t: float, buffer: torch.Tensor) -> torch.Tensor:
    """[rows]: the fraction of each row's entries above `t`. The comparison writes floats into
    `buffer` (x's shape) directly: a CPU's bool comparison and its conversion to float took 5x as long."""
    return torch.gt(x, t, out=buffer).mean(dim=1)


# Shape features of a row longer than this are read from evenly spaced entries of it (the row's
# RMS still from all): a distribution's tails need no 8,000 samples, and the switcher runs every step.
_SHAPE_SAMPLES = 256


def _shape(sample: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    """Scale-free shape features [units, SHAPE_SIZE] of rows given some of their entries and their RMS
    (the entries divided by it): fractions above the thresholds, fraction positive, mean, mean |z|,
    max |z| / 4."""
    z = sample.float() / (rms[:, None] + 1e-12)
    absz = z.abs()
    # Six compares beat one broadcast against all thresholds on a CPU (no [units, fan, 6] temporary).
    # They write floats into one buffer: a bool comparison and its conversion took 5x as long.
    buffer = torch.empty_like(z)
    sums = [torch.gt(absz, t, out=buffer).sum(dim=1) for t in _THRESHOLDS]
    sums += [torch.gt(z, 0.0, out=buffer).sum(dim=1), z.sum(dim=1), absz.sum(dim=1)]
    return torch.cat([torch.stack(sums, dim=1) / z.shape[1], absz.amax(dim=1, keepdim=True) / 4], dim=1)


SHAPE_SIZE = len(_THRESHOLDS) + 4


def _shapes(samples: list[torch.Tensor], rms: torch.Tensor, plan: "_Plan", side: int) -> torch.Tensor:
    """`_shape` of several layers' rows with one set of ops per row length (the switcher's cost is
    its op count, not its arithmetic): layers whose samples have the same length are stacked."""
    if len(plan.groups[side]) == 1:
        return _shape(torch.cat(samples), rms)
    parts = [
        _shape(torch.cat([samples[k] for k in ks]), torch.cat([rms[plan.rows[k]] for k in ks]))
        for ks in plan.groups[side]
    ]
    return torch.cat(parts)[plan.inverse[side]]


class _Plan:
    """What `describe_layers` derives from the layers' shapes alone, made once per shape on the
    device: per-unit layer index, the constant features, and the grouping by sample length."""

    def __init__(self, key: tuple, device: torch.device) -> None:
        units = [k[0] for k in key]
        starts = [sum(units[:i]) for i in range(len(units))]
        self.rows = [slice(a, a + n) for a, n in zip(starts, units)]
        self.layer = torch.arange(len(key), device=device).repeat_interleave(torch.tensor(units, device=device))
        self.n = torch.tensor(units, device=device, dtype=torch.float32)
        self.const = torch.tensor(
            [[math.log(fan) / 10, math.log(fan_out or 1) / 10, float(fan_out > 0)] for _, fan, fan_out, _, _ in key],
            device=device,
        )[self.layer]
        self.groups, self.inverse = [], []
        for side in (3, 4):  # the in- and out-sample lengths
            lengths = [k[side] for k in key]
            groups = [[k for k in range(len(key)) if lengths[k] == n] for n in dict.fromkeys(lengths)]
            order = torch.cat([torch.arange(self.rows[k].start, self.rows[k].stop) for ks in groups for k in ks])
            self.groups.append(groups)
            self.inverse.append(torch.argsort(order).to(device))


def _sampled(w: torch.Tensor) -> torch.Tensor:
    fan = w.shape[1]
    if fan <= _SHAPE_SAMPLES:
        return w
    positions = torch.linspace(0, fan - 1, _SHAPE_SAMPLES, device=w.device).long()
    return torch.index_select(w, 1, positions)  # 3x faster than w[:, positions] on a CPU


def describe_layers(views: list[UnitWeights], plans: dict | None = None) -> list[torch.Tensor]:
    """Each unit of each layer described from both sides -> [units, BOTH_SIZE] per layer, invariant
    to rescaling; one set of ops over all the layers' units.

    For a ReLU unit, incoming weights times c > 0 and outgoing ones divided by c leave the network's
    function unchanged: rows enter as shapes (divided by their own RMS), and the magnitude only as
    the product of the two sides' RMS (the BatchNorm's |gain| replaces the incoming RMS where one
    follows, since BN normalises the incoming scale away), relative to the layer's mean (log-space).
    A side that is missing (no reader found) contributes zeros and a flag. `plans` keeps what depends
    on shapes only between calls (on a GPU, building it is a host-to-device copy).
    """
    device = views[0].incoming.device
    w_ins = [v.incoming.detach().float() for v in views]
    fan_outs = [v.fan_out if v.has_outgoing else 0 for v in views]
    key = tuple(
        (w.shape[0], w.shape[1], f, min(w.shape[1], _SHAPE_SAMPLES), min(f, _SHAPE_SAMPLES) or 1)
        for w, f in zip(w_ins, fan_outs)
    ) + (str(device),)
    plans = {} if plans is None else plans
    if key not in plans:
        plans[key] = _Plan(key[:-1], device)
    plan = plans[key]
    rms_ins = [w.square().mean(dim=1).sqrt() for w in w_ins]
    in_feats = _shapes([_sampled(w) for w in w_ins], torch.cat(rms_ins), plan, 0)
    log_in = torch.cat(
        [
            torch.log(v.gain.detach().float().norm(dim=1) + 1e-12) if v.gain is not None else torch.log(r + 1e-12)
            for v, r in zip(views, rms_ins)
        ]
    )
    samples, rms_outs = [], []
    for v, w in zip(views, w_ins):
        if v.has_outgoing:
            samples.append(v.outgoing_sample(_SHAPE_SAMPLES))
            rms_outs.append(v.outgoing_rms().float())
        else:  # a zero row with RMS 1: all-zero shape features and log RMS 0
            samples.append(w.new_zeros(w.shape[0], 1))
            rms_outs.append(w.new_ones(w.shape[0]))
    rms_out = torch.cat(rms_outs)
    out_feats = _shapes(samples, rms_out, plan, 1)
    size = log_in + torch.log(rms_out + 1e-12)
    # Per-layer mean and (unbiased) std of the units' sizes, as segment sums: no host sync, no loop.
    rel = size - (size.new_zeros(len(views)).index_add_(0, plan.layer, size) / plan.n)[plan.layer]
    var = size.new_zeros(len(views)).index_add_(0, plan.layer, rel.square()) / (plan.n - 1).clamp_min(1)
    d = torch.cat(
        [in_feats, out_feats, torch.stack([rel, rel.clamp(max=0), var.sqrt()[plan.layer]], dim=1), plan.const], dim=1
    )
    return list(d.split([w.shape[0] for w in w_ins]))


BOTH_SIZE = 2 * SHAPE_SIZE + 6
