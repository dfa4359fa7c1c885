"""Throughput and model-FLOP utilisation: training images/s of a model (ResNet18 at 32x32 by
default), dense and switch side by side in one process, and MFU = model FLOP/s / the device's peak.

Batches are random tensors already on the device, in the dtype and layout the loaders give (bf16
and channels_last on CUDA), with cuDNN's autotuning on as in a worker, so the figure is the
training step's own speed (data loading is measured by data_loading.py). Model FLOPs per step are counted by torch's
FlopCounterMode on one eager dense step (forward + backward of the TNN); the switcher's own FLOPs
are overhead, not model FLOPs, so both variants are divided by the same count. Steps follow each
method's schedule (switch: update ratio TNN:SNN steps). Meant for a GPU; on CPU it runs (the CI
test does, reduced) but --peak-tflops must be given and the MFU means little.

    uv run python benchmarks/gpu_throughput.py [--batch 512] [--steps 100] [--precision bf16]
        [--compile all] [--peak-tflops T] [--out F] [overrides ...]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import engine_for, environment, write_report
from distswitch.data.transform import AUTOCAST_DTYPES
from distswitch.schedule import Phase

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_for(device: torch.device, given: float | None) -> float:
    if given is not None:
        return given
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    raise SystemExit(f"no known peak for {name!r}: pass --peak-tflops (the device's dense bf16 TFLOP/s)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="configs/fashion_lenet5.yaml", help="schedule, optimisers and switcher from here"
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (compile, cuDNN search)")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--compile", default="all")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    common = [
        f"model.name={args.model}",
        "data.channels=3",
        "data.image_size=32",
        f"train.batch_size={args.batch}",
        f"train.precision={args.precision}",
        *args.overrides,
    ]
    runs = {
        m: engine_for(args.config, [f"method={m}", f"train.compile={args.compile}", *common], loaders=False)
        for m in ("dense", "switch")
    }
    engine = runs["dense"][1]
    device = engine.device
    peak = peak_for(device, args.peak_tflops)
    # The worker's step as it runs (engine_for made the worker's process settings), on batches as the
    # loaders hand them (the precision's dtype, channels_last on CUDA).
    gen = torch.Generator().manual_seed(0)
    dtype = AUTOCAST_DTYPES[args.precision] or torch.float32
    x = (
        torch.randn(args.batch, 3, 32, 32, generator=gen)
        .to(device, dtype)
        .contiguous(memory_format=engine.memory_format)
    )
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    # FLOPs of one TNN step, counted on an eager twin (the counter does not see inside compiled code).
    _, counted, _ = engine_for(args.config, ["method=dense", "train.compile=none", *common], loaders=False)
    with FlopCounterMode(display=False) as flops:
        counted.step(0, Phase.TNN, x, y)
    step_flops = flops.get_total_flops()
    result = {
        "model": args.model,
        "batch": args.batch,
        "precision": args.precision,
        "compile": args.compile,
        "channels_last": engine.memory_format == torch.channels_last,
        "device": str(device),
        "model_flops_per_step": step_flops,
        "peak_tflops": peak,
        "variants": {},
    }
    for method, (_, eng, _) in runs.items():
        for step in range(args.warmup):
            eng.step(0, eng.method.phase_at(0, step), x, y)
        _sync(device)
        start = time.perf_counter()
        for step in range(args.steps):
            eng.step(0, eng.method.phase_at(0, step), x, y)
        _sync(device)
        seconds = time.perf_counter() - start
        result["variants"][method] = {
            "images_per_s": round(args.steps * args.batch / seconds, 1),
            "ms_per_step": round(seconds / args.steps * 1e3, 3),
            "mfu": step_flops * args.steps / seconds / (peak * 1e12),
        }
        print(f"{method:6s} {result['variants'][method]}", flush=True)
    v = result["variants"]
    result["switch_over_dense_time"] = v["switch"]["ms_per_step"] / v["dense"]["ms_per_step"]
    result.update(environment())
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
