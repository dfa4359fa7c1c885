"""The switcher's cost as networks grow (CPU, step level): per model, the dense step, the switch TNN
step and the switch SNN step on one fixed batch, blocks interleaved round by round, medians; the
switch run's cost per training step at the shipped update ratio (k TNN steps, then one SNN step)
against k + 1 dense steps; the switcher's no-grad forward alone; the gated units and weights it
reads; its parameters; the bytes each phase all-reduces per step under DDP (the phase's gradients);
and the peak memory of each variant's steps, each in a fresh process (--memory-only: that alone).

    uv run python benchmarks/scale.py [--models lenet5 resnet20 resnet56 resnet50 vit_tiny] [--batch 32]
        [--threads 2] [--rounds 8] [--steps 3] [--memory-only] [--switch-set KEY=VALUE ...] [--out F]

Models run on Fashion-MNIST's shape padded to 3x32x32 (CIFAR's), so the ResNets use their CIFAR stems.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from common import engine_for, environment, write_report
from distswitch.schedule import Phase

CONFIG = "configs/fashion_lenet5.yaml"

# Peak memory of one variant's steps in a process of its own: the resident set's high-water mark
# reset after the engine is built (Linux: /proc/self/clear_refs), so building it (the dependency
# graph's trace) does not hide what the steps need.
_PEAK = (
    """
import json, sys
sys.path.insert(0, "benchmarks")
import torch
from common import engine_for
from distswitch.schedule import Phase
model, method, batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
_, engine, _ = engine_for("%s", ["train.device=cpu", f"model.name={model}", "data.channels=3", "data.image_size=32",
                                  f"method={method}", "train.channels_last=false", *sys.argv[5:]], loaders=False)
x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
for phase in (Phase.TNN, Phase.SNN, Phase.TNN) if method == "switch" else (Phase.TNN,) * 3:
    engine.step(0, phase, x, y)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_mb": int(hwm.split()[1]) / 1024}))
"""
    % CONFIG
)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params if p.requires_grad)


def peaks(model: str, batch: int, switch_set: tuple[str, ...] = ()) -> dict:
    out = {}
    for method in ("dense", "switch"):
        extra = list(switch_set) if method == "switch" else []
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK, model, method, str(batch), str(torch.get_num_threads()), *extra],
            capture_output=True,
            text=True,
            check=True,
        )
        out[method] = json.loads(proc.stdout.splitlines()[-1])["peak_mb"]
    return out


def measure(model: str, batch: int, rounds: int, steps: int, switch_set: tuple[str, ...] = ()) -> dict:
    shape = [
        f"model.name={model}",
        "data.channels=3",
        "data.image_size=32",
        "train.device=cpu",
        "train.channels_last=false",
    ]
    _, dense, _ = engine_for(CONFIG, [*shape, "method=dense"], loaders=False)
    cfg, switch, _ = engine_for(CONFIG, [*shape, "method=switch", *switch_set], loaders=False)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)

    def forward():
        with torch.no_grad():
            switch.source(switch.gates.views())

    blocks = {
        "dense step": lambda: dense.step(0, Phase.TNN, x, y),
        "switch TNN step": lambda: switch.step(0, Phase.TNN, x, y),
        "switch SNN step": lambda: switch.step(0, Phase.SNN, x, y),
        "switcher forward (no grad)": forward,
    }
    for fn in blocks.values():
        for _ in range(3):  # warm-up: allocator, first-call paths
            fn()
    ms: dict[str, list[float]] = {k: [] for k in blocks}
    for _ in range(rounds):
        for name, fn in blocks.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            ms[name].append((time.perf_counter() - start) / steps * 1e3)
    median = {k: statistics.median(v) for k, v in ms.items()}
    k = cfg.schedule.update_ratio
    tnn_steps = k + 1 if cfg.schedule.snn_steps == "extra" else k  # per k + 1 batches
    per_step = (tnn_steps * median["switch TNN step"] + median["switch SNN step"]) / ((k + 1) * median["dense step"])
    specs = switch.gates.specs
    row = {
        "batch": batch,
        "update_ratio": k,
        "switch_overrides": list(switch_set),
        "median_ms": median,
        "ms": ms,
        "switch_over_dense_per_training_step": per_step,
        "groups": len(specs),
        "units": sum(s.units for s in specs),
        "weights_read": sum(
            v.incoming.numel() + (v.fan_out * v.incoming.shape[0] if v.has_outgoing else 0)
            for v in switch.gates.views()
        ),
        "tnn_parameters": sum(p.numel() for p in switch.tnn.parameters()),
        "switcher_parameters": sum(p.numel() for p in switch.source.parameters()),
        "allreduce_bytes_per_step": {"tnn": _bytes(switch.tnn.parameters()), "snn": _bytes(switch.source.parameters())},
    }
    row["peak_mb"] = peaks(model, batch, switch_set)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20", "resnet56", "resnet50", "vit_tiny"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--memory-only", action="store_true", help="only the peak memory of each variant's steps")
    parser.add_argument(
        "--switch-set",
        nargs="*",
        default=[],
        help="overrides for the switch variant, e.g. switcher.arch=graph budget.fraction=0.5 "
        "schedule.finetune_epochs=1 switcher.gate=hard (steps of epoch 0: before any cut)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_only:
        result = {
            "batch": args.batch,
            "threads": args.threads,
            "peak_mb": {m: peaks(m, args.batch) for m in args.models},
            **environment(),
        }
        write_report(result, args.out)
        return result
    rows = {}
    for model in args.models:
        rows[model] = r = measure(model, args.batch, args.rounds, args.steps, tuple(args.switch_set))
        m = r["median_ms"]
        print(
            f"{model:10s} {r['groups']:3d} groups {r['units']:6d} units  dense {m['dense step']:8.1f} ms  "
            f"TNN {m['switch TNN step']:8.1f}  SNN {m['switch SNN step']:8.1f}  switcher {m['switcher forward (no grad)']:6.1f}  "
            f"per step {r['switch_over_dense_per_training_step']:.3f}x  peak {r['peak_mb']['dense']:.0f}/{r['peak_mb']['switch']:.0f} MB",
            file=sys.stderr,
        )
    result = {
        "config": CONFIG,
        "rounds": args.rounds,
        "steps": args.steps,
        "threads": args.threads,
        "models": rows,
        **environment(),
    }
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main()
