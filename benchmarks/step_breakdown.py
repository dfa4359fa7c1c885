"""Where switch-training's extra time per step goes: one step of dense training against a switch
TNN step, a switch TNN step with the factors cached (the gate hooks' cost alone), a switch SNN step,
and the switcher's forward pass alone, each also with the switcher compiled (train.compile=switcher),
and the dense and switch TNN steps in the contiguous (NCHW) layout (train.channels_last=false), on one
fixed batch, interleaved in one process. Each block's minor page faults per step are reported too;
--default-heap leaves glibc's heap as it is (`distswitch.process.keep_freed_memory` not applied).

    uv run python benchmarks/step_breakdown.py [--config C] [--threads N] [--rounds 8] [--steps 30]
        [--default-heap] [--out F]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

from common import engine_for, environment, write_report
from distswitch.data import check_data
from distswitch.schedule import Phase


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_lenet5.yaml")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="steps per timed block")
    parser.add_argument("--default-heap", action="store_true", help="glibc's default heap, not the worker's")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = (
        ["method=dense"],
        ["method=switch"],
        ["method=switch"],
        ["method=switch", "train.compile=switcher"],
        ["method=dense", "train.channels_last=false"],
        ["method=switch", "train.channels_last=false"],
    )
    dense, switch, cached, compiled, dense_nchw, switch_nchw = (
        engine_for(args.config, ["train.device=cpu", *v, *args.overrides], loaders=False, heap=not args.default_heap)[1]
        for v in variants
    )
    info, _ = check_data(dense.cfg, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(dense.cfg.train.batch_size, info.channels, info.image_size, info.image_size, generator=gen)
    y = torch.randint(0, info.num_classes, (len(x),), generator=gen)
    x_nchw, x = x.contiguous(), x.contiguous(memory_format=dense.memory_format)  # each engine's loader layout
    factors = cached.compute_factors(0)
    cached.compute_factors = lambda epoch, phase=None: factors  # the hooks run, the switcher does not

    def switcher_only(engine):
        with torch.no_grad():
            engine.source(engine.gates.views())

    blocks = {
        "dense step": lambda: dense.step(0, Phase.TNN, x, y),
        "switch TNN step": lambda: switch.step(0, Phase.TNN, x, y),
        "switch TNN step, factors cached": lambda: cached.step(0, Phase.TNN, x, y),
        "switch SNN step": lambda: switch.step(0, Phase.SNN, x, y),
        "switcher forward (no grad)": lambda: switcher_only(switch),
        "switch TNN step, compiled switcher": lambda: compiled.step(0, Phase.TNN, x, y),
        "switch SNN step, compiled switcher": lambda: compiled.step(0, Phase.SNN, x, y),
        "compiled switcher forward (no grad)": lambda: switcher_only(compiled),
        "dense step, NCHW": lambda: dense_nchw.step(0, Phase.TNN, x_nchw, y),
        "switch TNN step, NCHW": lambda: switch_nchw.step(0, Phase.TNN, x_nchw, y),
    }
    ms: dict[str, list[float]] = {k: [] for k in blocks}
    faults: dict[str, list[float]] = {k: [] for k in blocks}
    for fn in blocks.values():
        for _ in range(10):  # warm-up: allocator, first-call paths, torch.compile
            fn()
    for _ in range(args.rounds):
        for name, fn in blocks.items():
            faulted, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            for _ in range(args.steps):
                fn()
            ms[name].append((time.perf_counter() - start) / args.steps * 1e3)
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted) / args.steps)
    median = {k: statistics.median(v) for k, v in ms.items()}
    median_faults = {k: statistics.median(v) for k, v in faults.items()}
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "batch_size": len(x),
        "threads": args.threads,
        "gates": [(s.layer, s.side, s.units, s.fan) for s in switch.gates.specs],
        "heap": "glibc default" if args.default_heap else "kept",
        "median_ms": median,
        "ms": ms,
        "median_page_faults_per_step": median_faults,
        **environment(),
    }
    for name, value in median.items():
        print(
            f"{name:38s} {value:7.2f} ms  ({value / median['dense step']:.2f} x dense)  {median_faults[name]:6.0f} page faults"
        )
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
