"""The alternating training loop (no Ray, MLflow or FFCV here: those observe it from outside).

Per epoch::

    method.on_epoch_start(epoch)            # baselines prune here
    for each batch:
        phase = method.phase_at(epoch, step)          # Phase.TNN or Phase.SNN (schedule.snn_steps=extra:
                                                      # an SNN step, then the TNN's on the same batch)
        factors = source(gates.views())               # once per step, from the weights;
                                                      # with grad only in the source's phase
        (the side that trains runs through its replica wrapper, so only its gradients are
         all-reduced across workers: see `distswitch.parallel`)
        gates.set(factors if method.gated(epoch) else None)
        TNN phase: tnn.train();  SNN phase: tnn.eval() (BatchNorm statistics frozen too)
        loss = cross_entropy + method.penalty(factors)   # the TNN's forward under train.precision's autocast
        loss.backward(inputs=params[phase])           # the frozen side gets no gradient at all
        optimizers[phase].step()                      # fp16: through the phase's gradient scaler
    schedulers step; validate with the current factors
    a non-finite loss or factor, or a layer below switcher.min_kept: raise TrainingStopped
    callback.on_epoch_end(stats) for each callback    # (so the epoch is never checkpointed)
"""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distswitch.config import Config, channels_last_on
from distswitch.data.transform import AUTOCAST_DTYPES
from distswitch.gates import GateSet, kept_report
from distswitch.methods import Method
from distswitch.optim import build_optimizer, build_scheduler
from distswitch.parallel import Replicas
from distswitch.schedule import Phase
from distswitch.stop import TrainingStopped

LOSS_FAULT, FACTOR_FAULT = 1, 2  # a step's fault code: its loss, or its factors, not finite


@dataclass
class EpochStats:
    epoch: int
    gated: bool
    steps: dict[str, int]
    train_loss: dict[str, float]
    train_acc: dict[str, float]
    val_loss: float
    val_acc: float
    kept_fraction: float
    kept: dict
    lr: dict[str, float]
    seconds: float
    images_per_s: float
    # Bytes all-reduced per step of each phase (gradient buckets; 0 on one worker).
    comm_bytes_per_step: dict[str, float]
    selectable: bool = True
    # SHA-256 of every parameter and buffer, one per worker (rank order), at checkpoint epochs.
    replica_digests: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class EpochCallback(Protocol):
    """Observes the loop: called after every epoch, in the order given to `Engine.fit`."""

    def on_epoch_end(self, stats: EpochStats) -> None: ...


class Engine:
    """Trains one TNN (+ the method's factor source) on one device, as one of `replicas.world_size`
    workers (metrics are summed over all workers, so every worker returns the same figures)."""

    def __init__(
        self,
        cfg: Config,
        tnn: nn.Module,
        gates: GateSet,
        method: Method,
        device: torch.device,
        replicas: Replicas | None = None,
    ) -> None:
        self.cfg, self.tnn, self.gates, self.method, self.device = cfg, tnn, gates, method, device
        self.source = method.source
        self.replicas = replicas if replicas is not None else Replicas(tnn, method.source)
        self.first_step_at: float | None = None  # wall clock (time.time) when the first step ended
        source_params = [p for p in self.source.parameters() if p.requires_grad] if self.source is not None else []
        self.params = {Phase.TNN: [p for p in tnn.parameters() if p.requires_grad], Phase.SNN: []}
        self.params[method.source_phase] += source_params
        opt_cfg = {Phase.TNN: cfg.optim.tnn, Phase.SNN: cfg.optim.snn}
        self.optimizers = {ph: build_optimizer(ps, opt_cfg[ph]) for ph, ps in self.params.items() if ps}
        self.schedulers = {ph: build_scheduler(o, opt_cfg[ph], cfg.train.epochs) for ph, o in self.optimizers.items()}
        self.amp_dtype = AUTOCAST_DTYPES[cfg.train.precision]
        # One scaler per phase: the two sides' gradients have unrelated ranges. Disabled ones are
        # pass-throughs (scale() returns the loss, step() steps).
        self.scalers = {
            ph: torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16") for ph in self.optimizers
        }
        self.memory_format = torch.channels_last if channels_last_on(cfg.train) else torch.contiguous_format
        self.loss_weight = 1.0  # set by the worker: its share of the global batch x workers / batch size
        if cfg.train.compile != "none" and self.source is not None:
            self.source.compile()  # in place: DDP wrappers and state_dict keys are unchanged
        if cfg.train.compile == "all":
            tnn.compile()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if x.dim() == 4:  # a no-op for distswitch's loaders (their transform gives this layout)
            x = x.contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    # -- factors ---------------------------------------------------------------------------
    def compute_factors(self, epoch: int, phase: Phase | None = None) -> list[torch.Tensor] | None:
        """The source's factors for the current weights; None where the method runs dense.

        With grad (through the source's replica wrapper) only in a training step of its phase."""
        if self.source is None or not self.method.gated(epoch):
            return None
        if phase is not None and phase == self.method.source_phase:
            return self.replicas.source_for(phase)(self.gates.views())
        with torch.no_grad():
            return self.source(self.gates.views())

    # -- one step --------------------------------------------------------------------------
    def step(self, epoch: int, phase: Phase, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One optimisation step of `phase`; returns (loss, correct predictions, fault: 0, or
        LOSS_FAULT / FACTOR_FAULT when the loss / the factors were not finite) as device scalars
        (read them sparingly: each read waits for the device)."""
        if self.source is not None:
            self.source.train(phase == self.method.source_phase)
        factors = self.compute_factors(epoch, phase)
        self.gates.set(factors)
        self.tnn.train(phase == Phase.TNN)
        with self._autocast():  # the factors above stay fp32: the switcher is small
            logits = self.replicas.tnn_for(phase)(x)
        loss = F.cross_entropy(logits.float(), y)
        # A worker's share of an unevenly split global batch (`data.datasets.batch_share`): weighted
        # by its size, DDP's average over workers is the global batch's mean. 1.0 when shares are equal.
        total = loss * self.loss_weight if self.loss_weight != 1.0 else loss
        if factors is not None and phase == self.method.source_phase:
            total = total + self.method.penalty(factors, epoch)
        if phase == Phase.TNN and self.method.shrink is not None:  # sparse learning
            total = total + self.method.weight_penalty(self.gates.unit_sq_norms())
        opt = self.optimizers.get(phase)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            scaler = self.scalers[phase]
            scaler.scale(total).backward(inputs=self.params[phase])
            scaler.step(opt)  # fp16: skipped when a gradient is inf/nan (then the scale backs off)
            scaler.update()
        fault = torch.where(torch.isfinite(loss), 0, LOSS_FAULT)
        for f in factors or ():
            fault = torch.where(torch.isfinite(f).all(), fault, FACTOR_FAULT)
        return loss.detach(), (logits.argmax(1) == y).sum(), fault

    # -- epochs ----------------------------------------------------------------------------
    def evaluate(self, loader: Iterable, epoch: int) -> tuple[float, float]:
        """(mean loss, accuracy) with the factors of the current weights, TNN in eval mode."""
        self.gates.set(self.compute_factors(epoch))
        return self._measure(loader)

    @torch.no_grad()
    def _measure(self, loader: Iterable) -> tuple[float, float]:
        """(mean loss, accuracy) with the gates as they are set; sums stay on the device."""
        self.tnn.eval()
        # [loss sum, correct, examples] in float64: exact counts, one all-reduce over workers.
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)
        for x, y in loader:
            x, y = self._to_device(x, y)
            with self._autocast():
                logits = self.tnn(x).float()
            sums[0] += F.cross_entropy(logits, y, reduction="sum")
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
        loss_sum, correct, n = self.replicas.sum_(sums).tolist()
        return loss_sum / max(n, 1), correct / max(n, 1)

    def train_epoch(self, epoch: int, loader, val_loader, progress: Callable | None = None) -> EpochStats:
        self.method.on_epoch_start(epoch, self.gates.views())
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        comm_start = dict(self.replicas.comm_bytes)
        start = time.perf_counter()
        bar = progress(loader, epoch) if progress else None
        sums, first_fault = self._steps(epoch, loader, bar)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self._step_schedulers()
        if bar is not None:
            bar.close()
        self._check_finite(epoch, self.replicas.gather(int(first_fault)))
        self.replicas.sync_buffers()
        factors = self.compute_factors(epoch)
        kept = kept_report(self.gates.specs, factors)
        self._check_kept(epoch, kept)
        self.gates.set(factors)  # computed once for the kept report and the validation
        val_loss, val_acc = self._measure(val_loader)
        if not math.isfinite(val_loss):
            raise TrainingStopped(
                f"training diverged: validation loss is {val_loss} after epoch {epoch + 1}, "
                "with finite training losses; lower optim.tnn.lr / optim.snn.lr"
            )
        # Steps are equal on all workers; losses, correct and examples add up.
        local_steps = {ph: int(s[0]) for ph, s in sums.items()}
        totals = self.replicas.sum_(torch.stack([sums[ph] for ph in Phase])).tolist()
        sums = {ph: [local_steps[ph], t[1], int(t[2]), int(t[3])] for ph, t in zip(Phase, totals)}
        # Images read (an extra SNN step reads its batch again, for the TNN step after it).
        images = sums[Phase.TNN][3] if self.cfg.schedule.snn_steps == "extra" else sum(s[3] for s in sums.values())
        comm = {
            ph.value: (self.replicas.comm_bytes[ph] - comm_start[ph]) / local_steps[ph]
            for ph in Phase
            if local_steps[ph]
        }
        return EpochStats(
            epoch=epoch,
            gated=self.method.gated(epoch),
            steps={ph.value: s[0] for ph, s in sums.items()},
            train_loss={ph.value: s[1] / s[3] for ph, s in sums.items() if s[3]},
            train_acc={ph.value: s[2] / s[3] for ph, s in sums.items() if s[3]},
            val_loss=val_loss,
            val_acc=val_acc,
            kept_fraction=kept["kept_fraction"],
            kept=kept,
            lr={ph.value: opt.param_groups[0]["lr"] for ph, opt in self.optimizers.items()},
            seconds=seconds,
            images_per_s=images / seconds if seconds > 0 else float("nan"),
            comm_bytes_per_step=comm,
            selectable=self.method.selectable(epoch),
        )

    def _steps(self, epoch: int, loader, bar) -> tuple[dict, torch.Tensor]:
        """One pass over `loader`. Returns, per phase, [steps, loss sum, correct, examples] and the
        first faulty step as step * 4 + fault (-1: none), both still on the device."""
        sums = {ph: torch.zeros(4, device=self.device, dtype=torch.float64) for ph in Phase}
        first_fault = torch.full((), -1, device=self.device, dtype=torch.int64)
        extra = self.cfg.schedule.snn_steps == "extra"
        for step, (x, y) in enumerate(loader):
            x, y = self._to_device(x, y)
            phase = self.method.phase_at(epoch, step)
            # schedule.snn_steps=extra: the batch of an SNN step also gets its TNN step, after it.
            for ph in (phase, Phase.TNN) if extra and phase == Phase.SNN else (phase,):
                loss, correct, fault = self.step(epoch, ph, x, y)
                first_fault = torch.where((fault == 0) | (first_fault >= 0), first_fault, step * 4 + fault)
                s = sums[ph]
                s[0] += 1
                s[1] += loss * len(y)
                s[2] += correct
                s[3] += len(y)
            if self.first_step_at is None:
                self.first_step_at = time.time()
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:  # reading the loss waits for the device: not every step
                    bar.set_description(f"epoch {epoch + 1} {phase.value} loss {float(loss):.3f}")
        return sums, first_fault

    def _step_schedulers(self) -> None:
        with warnings.catch_warnings():
            # Schedules count epochs, not the phase's own steps: a phase that took no step this
            # epoch (warm-up, whole-epoch alternation) still advances, which torch warns about.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for sched in self.schedulers.values():
                sched.step()

    def _check_finite(self, epoch: int, faults: list[int]) -> None:
        """Stop at the first faulty step of any worker (the same decision on every worker)."""
        found = [(code // 4, code % 4, rank) for rank, code in enumerate(faults) if code >= 0]
        if not found:
            return
        step, fault, rank = min(found)
        phase = self.method.phase_at(epoch, step)
        where = f"at step {step + 1} of epoch {epoch + 1} ({phase.value.upper()} phase, worker {rank})"
        if fault == FACTOR_FAULT:
            raise TrainingStopped(
                f"training diverged: the switcher's factors are not finite {where}; "
                "lower optim.snn.lr; the last checkpoint is the previous epoch's"
            )
        # Either side's last update may be the cause: name the phase, suggest both rates.
        raise TrainingStopped(
            f"training diverged: the loss is not finite {where}; lower optim.tnn.lr or "
            "optim.snn.lr, or check the data; the last checkpoint is the previous epoch's"
        )

    def _check_kept(self, epoch: int, kept: dict) -> None:
        """switcher.min_kept: a layer switched (almost) off is stopped on, never trained on silently."""
        floor = self.cfg.switcher.min_kept
        if self.source is None or floor == 0:
            return
        dark = {layer: row["kept"] for layer, row in kept["layers"].items() if row["kept"] < floor}
        # Each worker's factors come from its own replica: a factor at the ReLU's edge can differ in
        # the last bit. Stop on every worker or on none (the first report naming a layer, in rank
        # order), or the others would wait in the next collective for ever (NCCL hangs).
        dark = next((d for d in self.replicas.gather(dark) if d), None)
        if dark:
            layers = ", ".join(f"{layer} ({n} of {kept['layers'][layer]['units']})" for layer, n in dark.items())
            raise TrainingStopped(
                f"the switcher kept fewer than switcher.min_kept={floor} units in {layers} after epoch {epoch + 1}; "
                "lower switcher.l1 or optim.snn.lr, raise switcher.target_kept (or budget.fraction), or set switcher.min_kept=0 "
                "to allow empty layers; the last checkpoint is the previous epoch's"
            )

    def fit(
        self,
        train_loader,
        val_loader,
        start_epoch: int = 0,
        callbacks: Sequence[EpochCallback] = (),
        progress: Callable | None = None,
    ) -> list[EpochStats]:
        """Epochs from `start_epoch` on; after each, every callback's `on_epoch_end(stats)`, in order."""
        history = []
        for epoch in range(start_epoch, self.cfg.train.epochs):
            stats = self.train_epoch(epoch, train_loader, val_loader, progress)
            history.append(stats)
            for callback in callbacks:
                callback.on_epoch_end(stats)
        return history

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "tnn": self.tnn.state_dict(),
            "source": self.source.state_dict() if self.source is not None else None,
            "optimizers": {ph.value: o.state_dict() for ph, o in self.optimizers.items()},
            "schedulers": {ph.value: s.state_dict() for ph, s in self.schedulers.items()},
            "scalers": {ph.value: s.state_dict() for ph, s in self.scalers.items()},
        }

    def retune(self, saved: dict) -> None:
        """After `load_state_dict`: optimiser settings changed in the config since the checkpoint
        (`saved`: its config's `optim` section) take effect. A loaded optimiser and scheduler bring
        back the old learning rate, so a run resumed with a lower rate would otherwise keep the old
        one. Cosine, multistep and constant schedules scale with the base rate: rescaling is exact."""
        for ph, opt in self.optimizers.items():
            old, new = saved[ph.value], getattr(self.cfg.optim, ph.value)
            if old["lr"] != new.lr:
                ratio = new.lr / old["lr"]
                for group in opt.param_groups:
                    group["lr"] *= ratio
                    if "initial_lr" in group:
                        group["initial_lr"] *= ratio
                sched = self.schedulers[ph]  # through its state dict, the scheduler's public form
                state = sched.state_dict()
                state["base_lrs"] = [lr * ratio for lr in state["base_lrs"]]
                state["_last_lr"] = [lr * ratio for lr in state["_last_lr"]]
                sched.load_state_dict(state)
            for group in opt.param_groups:
                group["weight_decay"] = new.weight_decay
                if "momentum" in group:
                    group["momentum"] = new.momentum

    def load_state_dict(self, state: dict) -> None:
        self.tnn.load_state_dict(state["tnn"])
        if self.source is not None:
            self.source.load_state_dict(state["source"])
        for ph, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][ph.value])
        for ph, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][ph.value])
        for ph, s in self.scalers.items():
            saved = state.get("scalers", {}).get(ph.value)
            if s.is_enabled() and saved:  # a run switched to fp16 on resume starts a fresh scale
                s.load_state_dict(saved)
