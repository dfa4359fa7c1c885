"""Against the reference figure: the authors' MLP-Neurons experiment took 187-243 s per
Fashion-MNIST epoch (185-270 ms per step, batch 64, 2 CPU cores) and reached 84.4% test accuracy
after 4 epochs (2 TNN + 2 SNN epochs, whole-epoch alternation). Those figures are the issue's and
the method notes' (the authors' code is not here to rerun); everything else is measured here.

The same network (MLP 784-300-100-10, hidden neurons gated), batch and schedule
(`configs/paper_mlp_neurons.yaml`: SGD lr 0.1, no momentum, TNN and SNN epochs alternating), for
4 epochs in this process, with distswitch's rowwise switcher by default (`switcher.arch=unet` for
the papers' U-Net; add `data.train_limit=N` to time it on fewer steps: per-step figures then still
compare). Reports seconds per epoch and per step of each phase, and the test accuracy after 4 epochs.

    uv run python benchmarks/reference_mlp.py [--epochs 4] [--out F] [overrides ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from common import engine_for, environment, write_report

REFERENCE = {
    "s_per_epoch": [187.0, 243.0],
    "ms_per_step": [185.0, 270.0],
    "test_acc_after_4_epochs": 0.844,
    "source": "method notes, 'Reference figures to beat' (the authors' code, 2 CPU cores, batch 64)",
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper_mlp_neurons.yaml")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="e.g. switcher.arch=unet data.train_limit=3200")
    args = parser.parse_args(argv)
    cfg, engine, loaders = engine_for(
        args.config, ["switcher.arch=rowwise", f"train.epochs={args.epochs}", *args.overrides], steady=False
    )
    rows = []
    for epoch in range(args.epochs):
        stats = engine.train_epoch(epoch, loaders.train, loaders.val)
        phase = next(ph for ph, n in stats.steps.items() if n)  # whole-epoch alternation: one phase per epoch
        rows.append(
            {
                "epoch": epoch + 1,
                "phase": phase,
                "seconds": round(stats.seconds, 2),
                "steps": stats.steps[phase],
                "ms_per_step": round(stats.seconds / stats.steps[phase] * 1e3, 2),
                "val_acc": round(stats.val_acc, 4),
                "kept_fraction": round(stats.kept_fraction, 4),
            }
        )
        print(rows[-1], flush=True)
    _, test_acc = engine.evaluate(loaders.test, args.epochs - 1)
    s_per_epoch = statistics.mean(r["seconds"] for r in rows)
    ms_per_step = sum(r["seconds"] for r in rows) / sum(r["steps"] for r in rows) * 1e3
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "switcher": cfg.switcher.arch,
        "width": cfg.switcher.width,
        "batch_size": cfg.train.batch_size,
        "train_examples": loaders.train_examples,
        "epochs": rows,
        "mean_s_per_epoch": round(s_per_epoch, 2),
        "mean_ms_per_step": round(ms_per_step, 2),
        f"test_acc_after_{args.epochs}_epochs": round(test_acc, 4),
        # Against the fastest reference figures: the conservative ratios. Per step is the fair
        # one (same batch); our epoch has 55,000 images (5,000 held out for validation).
        "faster_than_reference_per_step": round(REFERENCE["ms_per_step"][0] / ms_per_step, 1),
        "faster_than_reference_per_epoch": (
            round(REFERENCE["s_per_epoch"][0] / s_per_epoch, 1) if cfg.data.train_limit is None else None
        ),
        "reference": REFERENCE,
        "device": str(engine.device),
        **environment(),
    }
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
