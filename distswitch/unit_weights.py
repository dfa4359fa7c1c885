"""What a factor source sees of one gated layer: its units' weights, both sides, read lazily.

A unit's incoming weights are one row of its layer; its outgoing weights are scattered over the layers
that read it (found by `distswitch.coupling`), so they are gathered, or sampled, only when asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class UnitWeights:
    """What the factor source sees of one gated layer (all detached views of the weights).

    Shapes: incoming [units, fan]; outgoing [units, fan_out] or None (``in`` and ``weight`` sides, or
    a unit nobody reads); gain [units, 2] (the following BatchNorm's scale and shift) or None.

    The outgoing side is read from the readers' weights only when asked for: the whole of it
    (`outgoing`, gathered once per view), or its per-unit RMS and a few evenly spaced entries
    (`outgoing_rms`, `outgoing_sample`), which read no more than they return -- a conv channel read by
    an FC layer has 8,000 outgoing weights, and the switcher runs every step.
    """

    incoming: torch.Tensor
    outgoing_given: torch.Tensor | None = None
    gain: torch.Tensor | None = None
    # (reader weight [out, in, *kernel], index [units, per] of the reader's inputs carrying each unit)
    readers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # Per reader: the gated group whose units its outputs are (rows of `GateSet.weights()` in order;
    # a head's rows in a row), or None (an ungated layer: the classifier, a ViT's stream).
    reader_groups: list[int | None] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # sample positions, owned by the GateSet: made once

    @property
    def has_outgoing(self) -> bool:
        return self.outgoing_given is not None or bool(self.readers)

    @property
    def fan_out(self) -> int:
        if self.outgoing_given is not None:
            return self.outgoing_given.shape[1]
        return sum(w.shape[0] * idx.shape[1] * math.prod(w.shape[2:]) for w, idx in self.readers)

    @property
    def outgoing(self) -> torch.Tensor | None:
        if self.outgoing_given is None and self.readers:
            parts = []
            for w, idx in self.readers:  # unit i's row: w[o, idx[i, p], k] in (o, p, k) order
                units, per = idx.shape
                picked = torch.index_select(w, 1, idx.flatten())  # [out, units * per, *kernel]
                parts.append(picked.reshape(w.shape[0], units, -1).transpose(0, 1).reshape(units, -1))
            self.outgoing_given = torch.cat(parts, dim=1)
        return self.outgoing_given

    def outgoing_rms(self) -> torch.Tensor:
        """[units]: the RMS of each unit's whole outgoing row, without gathering it."""
        if self.outgoing_given is not None or self.fan_out <= 1024:  # small: gathering it is cheaper
            return self.outgoing.square().mean(dim=1).sqrt()
        total = 0
        for w, idx in self.readers:
            per_input = w.square().sum(dim=[d for d in range(w.dim()) if d != 1])  # [in]
            total = total + per_input[idx].sum(dim=1)
        return (total / self.fan_out).sqrt()

    def outgoing_sample(self, n: int) -> torch.Tensor:
        """[units, min(n, fan_out)]: the entries of each outgoing row at n evenly spaced positions."""
        fan_out = self.fan_out
        if self.outgoing_given is not None or fan_out <= n:
            out = self.outgoing
            return (
                out
                if fan_out <= n
                else torch.index_select(out, 1, torch.linspace(0, fan_out - 1, n, device=out.device).long())
            )
        readers = [(_dense(w), idx) for w, idx in self.readers]
        key = (n, *(w.stride() for w, _ in readers))
        if key not in self.cache:
            self.cache[key] = self._sample_offsets(n, readers)
        parts = [
            torch.index_select(_flat(w), 0, offsets.flatten()).view(offsets.shape)
            for (w, _), offsets in zip(readers, self.cache[key])
            if offsets.shape[1]
        ]
        return torch.cat(parts, dim=1)

    def _sample_offsets(self, n: int, readers: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Per reader, where each unit's sampled entries lie in its weight's storage [units, m]: fixed
        for fixed shapes and strides, so a step's sample is one gather per reader."""
        q = torch.linspace(0, self.fan_out - 1, n, device=self.incoming.device).long()
        out, start = [], 0
        for w, idx in readers:
            kernel = tuple(w.shape[2:])
            k, per = math.prod(kernel), idx.shape[1]
            local = q[(q >= start) & (q < start + w.shape[0] * per * k)] - start
            o, rest = local // (per * k), local % (per * k)  # unit i's row is w[o, idx[i, p], kernel...]
            taps = torch.unravel_index(rest % k, kernel) if kernel else ()
            base = o * w.stride(0) + sum((t * s for t, s in zip(taps, w.stride()[2:])), torch.zeros_like(o))
            out.append(base[None] + idx.to(q.device)[:, rest // k] * w.stride(1))
            start += w.shape[0] * per * k
        return out


def _dense(w: torch.Tensor) -> torch.Tensor:
    """`w` itself where its storage is one dense block (contiguous or channels_last), else a copy."""
    return (
        w
        if w.is_contiguous() or (w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last))
        else w.contiguous()
    )


def _flat(w: torch.Tensor) -> torch.Tensor:
    """A dense tensor's storage as a 1-d view (offsets by its strides index it)."""
    return w.as_strided((w.numel(),), (1,))
