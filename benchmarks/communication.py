"""Communication per phase: bytes all-reduced per TNN step and per SNN step, from DDP's own buckets
(the comm hook in `distswitch.parallel` counts them), with 2 real gloo workers on this machine.

Model ResNet18 at 32x32 (CIFAR-10's shape; random images: bytes do not depend on them), one TNN and
one SNN step per gate setting: every conv channel and FC neuron gated (`all`, distswitch's default)
with the rowwise switcher, and the classifier only (`classifier`, the papers' setting for ResNets)
with the rowwise switcher and with the papers' U-Net. The goal: SNN bytes <= 5% of TNN bytes.

    uv run python benchmarks/communication.py [--model resnet18] [--out F]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import environment, write_report
from distswitch.build import build, make_replicas
from distswitch.config import load_config
from distswitch.data.datasets import DatasetInfo
from distswitch.engine import Engine
from distswitch.schedule import Phase

CIFAR_SHAPE = DatasetInfo("cifar10", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, "none")
# The U-Net over every ResNet18 layer (512 x 4608 weight images) is left out: its activations took
# both workers past this machine's 24 GiB (SIGKILL); the papers gate only a ResNet's classifier.
SETTINGS = [("all", "rowwise"), ("classifier", "rowwise"), ("classifier", "unet")]


def _measure(model: str, gated: str, arch: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    cpu = torch.device("cpu")
    cfg = load_config(
        None,
        [
            f"model.name={model}",
            f"model.gated={gated}",
            "method=switch",
            f"switcher.arch={arch}",
            "train.device=cpu",
            "schedule.warmup_epochs=0",
            f"out_dir={tempfile.gettempdir()}/distswitch-comm",
        ],
    )
    tnn, gates, method = build(cfg, CIFAR_SHAPE, 10, cpu)
    engine = Engine(cfg, tnn, gates, method, cpu, make_replicas(tnn, method, cpu))
    for phase in (Phase.TNN, Phase.SNN):
        engine.step(0, phase, x, y)
    params = {
        "tnn": sum(p.numel() for p in tnn.parameters()),
        "snn": sum(p.numel() for p in method.source.parameters()),
    }
    sent = {ph.value: engine.replicas.comm_bytes[ph] for ph in Phase}
    return {
        "gated": gated,
        "switcher": arch,
        "gated_layers": len(gates.specs),
        "parameters": params,
        "bytes_per_step": sent,
        "snn_over_tnn": sent["snn"] / sent["tnn"],
    }


def _worker(rank: int, world: int, tmp: str, model: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(rank)
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        # Each setting's DDP replicas are built and freed inside _measure, so none outlives the group.
        rows = [_measure(model, gated, arch, x, y) for gated, arch in SETTINGS]
        if rank == 0:
            Path(tmp, "rows.json").write_text(json.dumps(rows))
        # Both ranks done with every collective before either tears gloo down: a rank that exits while
        # its peer's gloo threads still run aborted once in CI ("terminate called without an active
        # exception", SIGABRT).
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:  # a file store (no port to pick); rank 0 writes the rows
        mp.start_processes(_worker, args=(2, tmp, args.model), nprocs=2, start_method="spawn")
        rows = json.loads(Path(tmp, "rows.json").read_text())
    for r in rows:
        print(
            f"{r['gated']:10s} {r['switcher']:8s} TNN {r['bytes_per_step']['tnn']:>12,d} B  "
            f"SNN {r['bytes_per_step']['snn']:>10,d} B  SNN/TNN {r['snn_over_tnn']:.2%}",
            flush=True,
        )
    result = {
        "model": args.model,
        "input": [3, 32, 32],
        "workers": 2,
        "backend": "gloo",
        "settings": rows,
        **environment(),
    }
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
