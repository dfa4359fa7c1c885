"""Device check: the CUDA paths end to end, in minutes, with torch alone (no Ray, FFCV or MLflow).

For each case (model x precision x compile) it trains the switch method a few hundred steps through
`Engine.train_epoch` (a short untimed epoch first: compilation, cuDNN's autotuning; then the timed
epoch, validation included), exports the compact model through `run.export_compact` (equivalence
checked), saves a checkpoint and resumes it into a fresh eager engine (the same parameter digest,
generators restored, the same next loss), and reports images/s and MFU. It prints one table and
exits 1 if any case failed (2 for bad arguments).

Data are synthetic (a fixed set of random 3x32x32 batches with labels from a fixed linear map of
the pixels, in the loaders' dtype and layout): the device machine has no datasets. MFU = model
FLOPs of a dense TNN training step (forward + backward, counted once by FlopCounterMode on an
eager engine; SNN steps counted the same, as in gpu_throughput.py) x steps / seconds / --peak-tflops,
default 790: the H200's measured dense bf16 matrix rate (8192^3 bf16 products), also for fp32.

Needs torch, torchvision, numpy, pyyaml and torch_pruning, and the package's own code on
PYTHONPATH: the device machine's python3 (3.12, torch 2.11) has all but torch_pruning, which
travels as a wheel. Here, once (`.whl/` is git-ignored):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl torch-pruning==1.6.1

then one device call (run tool, carry [".whl"], timeout_s 600):

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
        --upgrade --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 \\
        python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

On a GPU host with the locked environment: `make gpu-check`. CI runs it on CPU, tiny
(tests/test_benchmarks.py).

    python benchmarks/gpu_check.py [--device cuda] [--models lenet5 resnet18] [--precisions fp32 bf16]
        [--compile none all] [--steps 300] [--warmup 30] [--batch 256] [--peak-tflops 790] [--out F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from distswitch.artifacts import export_compact
from distswitch.build import build
from distswitch.checkpoint import bundle as checkpoint_bundle
from distswitch.checkpoint import read as read_checkpoint
from distswitch.checkpoint import rng_state, set_rng
from distswitch.config import Config, channels_last_on
from distswitch.data.datasets import DatasetInfo
from distswitch.data.transform import AUTOCAST_DTYPES
from distswitch.engine import Engine
from distswitch.io import save_torch
from distswitch.parallel import state_digest
from distswitch.process import configure_process
from distswitch.schedule import Phase

INFO = DatasetInfo("synthetic", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, "none")
H200_BF16_TFLOPS = 790.0  # measured on the lent H200 (8192^3 bf16 products), below the 989 data-sheet peak
BATCHES = 8  # distinct training batches, cycled
NEXT_LOSS_RTOL = 2e-2  # resumed (eager) vs original (maybe compiled, bf16) engine, one step


def case_config(model: str, precision: str, compile_mode: str, batch: int, device: torch.device) -> Config:
    """The GPU job's settings (switch, rowwise, L1 with a target), made safe for a short check:
    no warm-up, no stop on a dark layer (min_kept 0), a constant learning rate."""
    constant = {"scheduler": "constant"}
    return Config.from_dict(
        {
            "model": {"name": model, "gated": "all"},
            "method": "switch",
            "switcher": {"arch": "rowwise", "width": 32, "l1": 0.5, "target_kept": 0.6, "min_kept": 0},
            "schedule": {"update_ratio": 4, "warmup_epochs": 0, "finetune_epochs": 0},
            "train": {
                "epochs": 3,
                "batch_size": batch,
                "device": device.type,
                "precision": precision,
                "compile": compile_mode,
                "progress": False,
            },
            "optim": {
                "tnn": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, **constant},
                "snn": {"name": "adam", "lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, **constant},
            },
            "data": {"channels": 3, "image_size": 32},
            "distributed": {"use_gpu": device.type == "cuda"},
            "tracking": {"enabled": False},
        }
    )


def make_engine(cfg: Config, device: torch.device) -> Engine:
    torch.manual_seed(cfg.train.seed)
    tnn, gates, method = build(cfg, INFO, BATCHES, device)
    return Engine(cfg, tnn, gates, method, device)


def synthetic_batches(cfg: Config, device: torch.device, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches as the loaders hand them (the precision's dtype; channels_last on CUDA), with
    labels a fixed linear map of the pixels decides (learnable)."""
    gen = torch.Generator().manual_seed(0)
    dtype = AUTOCAST_DTYPES[cfg.train.precision] or torch.float32
    layout = torch.channels_last if channels_last_on(cfg.train) else torch.contiguous_format
    w = torch.randn(3 * 32 * 32, INFO.num_classes, generator=gen)
    out = []
    for _ in range(n):
        x = torch.randn(cfg.train.batch_size, 3, 32, 32, generator=gen)
        y = (x.flatten(1) @ w).argmax(1)
        out.append((x.to(device, dtype).contiguous(memory_format=layout), y.to(device)))
    return out


def step_flops(cfg: Config, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> int:
    """Model FLOPs: one TNN step of the dense network on an eager engine (the counter does not see
    inside compiled code; the switcher's FLOPs are overhead, not model FLOPs)."""
    dense = Config.from_dict(
        {**cfg.to_dict(), "method": "dense", "train": {**cfg.to_dict()["train"], "compile": "none"}}
    )
    eager = make_engine(dense, device)
    with FlopCounterMode(display=False) as counter:
        eager.step(0, Phase.TNN, x, y)
    return counter.get_total_flops()


def check_resume(cfg: Config, engine: Engine, device: torch.device, batch, folder: Path) -> dict:
    """Checkpoint `engine`, resume it into a fresh eager engine as a worker resumes: same digest,
    generators restored (CPU ByteTensors, CUDA's too), the same next loss."""
    saved_rng = rng_state()
    path = folder / "state.pt"
    save_torch(checkpoint_bundle(cfg, INFO, engine, 1, BATCHES, [], None, [saved_rng]), path)
    eager = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile="none"))
    resumed = make_engine(eager, device)  # draws from the generators: restored below
    state = read_checkpoint(path)
    resumed.load_state_dict(state["engine"])
    set_rng(state["rng"], 0)
    rng_ok = torch.equal(torch.get_rng_state(), saved_rng["torch"])
    if "cuda" in saved_rng:
        rng_ok = rng_ok and torch.equal(torch.cuda.get_rng_state(), saved_rng["cuda"])
    same = state_digest(engine.tnn, engine.source) == state_digest(resumed.tnn, resumed.source)
    a = float(engine.step(2, Phase.TNN, *batch)[0])
    b = float(resumed.step(2, Phase.TNN, *batch)[0])
    return {
        "same_digest": same,
        "rng_restored": rng_ok,
        "next_loss": [a, b],
        "ok": same and rng_ok and abs(a - b) <= NEXT_LOSS_RTOL * abs(a),
    }


def run_case(model: str, precision: str, compile_mode: str, args, device: torch.device) -> dict:
    row = {"model": model, "precision": precision, "compile": compile_mode, "ok": False}
    try:
        cfg = case_config(model, precision, compile_mode, args.batch, device)
        engine = make_engine(cfg, device)
        batches = synthetic_batches(cfg, device, BATCHES)
        val = batches[:2]
        warm = engine.train_epoch(0, [batches[i % BATCHES] for i in range(args.warmup)], val)
        timed = engine.train_epoch(1, [batches[i % BATCHES] for i in range(args.steps)], val)
        flops = step_flops(cfg, device, *batches[0])
        row.update(
            steps=timed.steps,
            images_per_s=timed.images_per_s,
            seconds=timed.seconds,
            mfu=flops * args.steps / timed.seconds / (args.peak_tflops * 1e12),
            flops_per_step=flops,
            tnn_loss=[warm.train_loss.get("tnn"), timed.train_loss.get("tnn")],
            val_acc=timed.val_acc,
            kept_fraction=timed.kept_fraction,
        )
        with tempfile.TemporaryDirectory() as tmp:
            example = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
            export = export_compact(cfg, INFO, engine, 1, example, Path(tmp) / "model.pt")  # raises ExportError
            row.update(
                export_max_abs_diff=export["export_max_abs_diff"],
                params_kept=export["compact"]["params"] / export["dense"]["params"],
            )
            row["resume"] = check_resume(cfg, engine, device, batches[0], Path(tmp))
        finite = all(v == v and abs(v) != float("inf") for v in timed.train_loss.values())
        row["ok"] = finite and row["resume"]["ok"]
        if not finite:
            row["error"] = f"non-finite training loss {timed.train_loss}"
        elif not row["resume"]["ok"]:
            row["error"] = f"resume differs: {row['resume']}"
    except Exception as exc:  # one case's failure is reported in the table; the others still run
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        row["traceback"] = traceback.format_exc()
        print(row["traceback"], file=sys.stderr, flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = (
        f"{'model':9s} {'prec':4s} {'compile':7s} {'steps':>5s} {'img/s':>10s} {'MFU':>7s} "
        f"{'tnn loss':>13s} {'export diff':>11s} {'params':>6s} {'resume':>6s}  result"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        loss = r.get("tnn_loss") or [None, None]
        loss_s = f"{loss[0]:.3f}>{loss[1]:.3f}" if None not in loss else "-"
        diff = f"{r['export_max_abs_diff']:.1e}" if "export_max_abs_diff" in r else "-"
        lines.append(
            f"{r['model']:9s} {r['precision']:4s} {r['compile']:7s} {sum(r.get('steps', {}).values()):5d} "
            f"{r.get('images_per_s', 0):10.0f} {100 * r.get('mfu', 0):6.2f}% {loss_s:>13s} {diff:>11s} "
            f"{r.get('params_kept', 0):6.2f} {('ok' if r.get('resume', {}).get('ok') else '-'):>6s}  "
            f"{'PASS' if r['ok'] else 'FAIL ' + r.get('error', '')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (CI's tiny run)")
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet18"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument(
        "--compile",
        nargs="+",
        default=["none", "all"],
        choices=["none", "switcher", "all"],
        help="compile modes; compiled cases run in the last precision only (bf16 by default)",
    )
    parser.add_argument("--steps", type=int, default=300, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS)
    parser.add_argument("--out", default=None, help="JSON report")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: error: --device {args.device}, but torch {torch.__version__} sees no usable CUDA device "
            "(a CUDA 13 build needs an NVIDIA driver >= 580); pass --device cpu",
            file=sys.stderr,
        )
        return 2
    if args.steps < 1 or args.warmup < 1 or args.batch < 1:
        print("gpu_check: error: --steps, --warmup and --batch must be >= 1", file=sys.stderr)
        return 2
    configure_process(device)  # as a worker sets it
    cases = [(m, p, "none") for m in args.models for p in args.precisions if "none" in args.compile]
    cases += [(m, args.precisions[-1], c) for m in args.models for c in args.compile if c != "none"]
    started = time.time()
    rows = []
    for model, precision, compile_mode in cases:
        rows.append(run_case(model, precision, compile_mode, args, device))
        print(
            f"gpu_check: {model} {precision} compile={compile_mode}: {'PASS' if rows[-1]['ok'] else 'FAIL'} "
            f"({time.time() - started:.0f} s so far)",
            file=sys.stderr,
            flush=True,
        )
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpus": os.cpu_count(),
        "seconds": round(time.time() - started, 1),
        "peak_tflops": args.peak_tflops,
    }
    print(table(rows))
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        clean = [{k: v for k, v in r.items() if k != "traceback"} for r in rows]
        Path(args.out).write_text(json.dumps({"cases": clean, **env}, indent=1) + "\n")
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
