"""Replicas across workers: which gradients each phase all-reduces, and keeping replicas identical.

Every worker holds the TNN and the factor source (the switcher). Each is wrapped in its own
DistributedDataParallel, and a phase trains through the wrapper of the side it updates only:

- TNN step: the TNN's DDP runs forward/backward, so its buckets are all-reduced while the backward
  pass is still running (DDP's overlap); the switcher runs unwrapped under no_grad.
- SNN step: the switcher's DDP runs; the TNN runs unwrapped in eval mode, so its reducer never
  expects gradients it will not get (`backward(inputs=...)` gives the TNN none).

A comm hook around DDP's all-reduce counts the bytes each phase sends. Buffers (BatchNorm running
statistics) follow DDP's rule -- rank 0's are broadcast before each TNN forward -- and are broadcast
once more at the end of an epoch, so evaluation and checkpoints see identical replicas.

No Ray here: the process group is whatever the launcher set up (Ray Train's TorchConfig).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from distswitch.schedule import Phase


class Replicas:
    """One process, no process group: the modules themselves, nothing to reduce."""

    rank = 0
    world_size = 1

    def __init__(self, tnn: nn.Module, source: nn.Module | None) -> None:
        self.tnn, self.source = tnn, source
        self.comm_bytes = {ph: 0 for ph in Phase}

    def tnn_for(self, phase: Phase) -> Callable:
        """What runs the TNN's forward in a step of `phase`."""
        return self.tnn

    def source_for(self, phase: Phase) -> Callable | None:
        """What runs the factor source's forward when its parameters train in `phase`."""
        return self.source

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the sum of `tensor` over all workers."""
        return tensor

    def sync_buffers(self) -> None:
        """Make every worker's buffers equal rank 0's."""

    def gather(self, obj) -> list:
        """`obj` from every worker, in rank order."""
        return [obj]

    def broadcast_state(self) -> None:
        """Make every worker's parameters and buffers equal rank 0's (after rank 0 loads a state)."""


def gather_object(obj) -> list:
    """`obj` from every worker of the process group, in rank order ([obj] without one: also before
    the replicas exist, e.g. while the data are opened)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class DDPReplicas(Replicas):
    """TNN and source each in a DistributedDataParallel; phases select which one trains."""

    def __init__(
        self,
        tnn: nn.Module,
        source: nn.Module | None,
        source_phase: Phase,
        device: torch.device,
        bucket_cap_mb: float = 25.0,
    ) -> None:
        super().__init__(tnn, source)
        if not dist.is_initialized():
            raise RuntimeError("DDPReplicas needs an initialised torch.distributed process group")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device
        ids = [device.index] if device.type == "cuda" else None
        # DDP's constructor broadcasts rank 0's parameters and buffers: replicas start identical.
        self.tnn_ddp = nn.parallel.DistributedDataParallel(
            tnn, device_ids=ids, forward_sync_buffers=True, bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True
        )
        self.tnn_ddp.register_comm_hook(_Counter(self.comm_bytes, Phase.TNN), _counting_allreduce)
        self.source_phase = source_phase
        self.source_ddp = None
        if source is not None and any(p.requires_grad for p in source.parameters()):
            self.source_ddp = nn.parallel.DistributedDataParallel(
                source,
                device_ids=ids,
                forward_sync_buffers=True,
                bucket_cap_mb=bucket_cap_mb,
                gradient_as_bucket_view=True,
            )
            self.source_ddp.register_comm_hook(_Counter(self.comm_bytes, source_phase), _counting_allreduce)
        elif source is not None:
            _broadcast_tensors(_state_tensors(source))  # fixed masks: equal from the start

    def tnn_for(self, phase: Phase) -> Callable:
        return self.tnn_ddp if phase == Phase.TNN else self.tnn

    def source_for(self, phase: Phase) -> Callable | None:
        if self.source_ddp is not None and phase == self.source_phase:
            return self.source_ddp
        return self.source

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj) -> list:
        return gather_object(obj)

    def sync_buffers(self) -> None:
        _broadcast_tensors(list(self.tnn.buffers()) + (list(self.source.buffers()) if self.source is not None else []))

    def broadcast_state(self) -> None:
        _broadcast_tensors(_state_tensors(self.tnn) + (_state_tensors(self.source) if self.source is not None else []))


class _Counter:
    """Comm-hook state: adds each bucket's size to `totals[phase]` (a host int: no device sync)."""

    def __init__(self, totals: dict, phase: Phase) -> None:
        self.totals, self.phase = totals, phase

    def add(self, nbytes: int) -> None:
        self.totals[self.phase] += nbytes


def _counting_allreduce(state, bucket):  # no annotations: DDP checks them, and ours are strings
    """DDP's default all-reduce (sum, then divide by world size), counting the bucket's bytes."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    state.add(buffer.numel() * buffer.element_size())
    return allreduce_hook(None, bucket)


def _state_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [p.data for p in module.parameters()] + list(module.buffers())


def _broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        dist.broadcast(t, src=0)


def state_digest(*modules: nn.Module | None) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes) of `modules`."""
    h = hashlib.sha256()
    for m, module in enumerate(modules):
        if module is None:
            continue
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            h.update(f"{m}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
