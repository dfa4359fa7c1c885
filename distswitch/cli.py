"""`distswitch` command line: train | tune | sweep | export | data prepare | runs | compare | sync.

User errors (bad config, missing data, unknown names, every checkpoint damaged) print one line and exit with status 2;
training that stopped for good (it diverged, a layer lost its last units) or that Ray gave up on
(workers lost beyond `distributed.max_failures`) prints one line and exits with status 1. `--debug` shows the traceback instead.
SIGTERM (`kill`, schedulers, `ray job stop`) ends a run as Ctrl-C does: the MLflow run KILLED, the
checkpoints kept, one line, exit status 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from distswitch import signals
from distswitch.config import ConfigError, load_config

# `distswitch runs --sort`: columns where higher is better first, sizes smallest first.
SORTABLE = ("test_acc", "val_acc", "kept", "params", "macs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distswitch", description="Switcher networks: train, prune, export.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also Ray Train's reporting / checkpoint / controller lines and MLflow's INFO logs "
        "(the config key train.verbose)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a TNN (+ switcher) and export the compact model")
    train.add_argument("config", help="YAML config, e.g. configs/fashion_lenet5.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 switcher.width=32")
    train.add_argument("--summary-json", metavar="PATH", help="also write the final summary here")

    tune = sub.add_parser("tune", help="Ray Tune over the config's tune.space (ASHA), one MLflow child run per trial")
    tune.add_argument("config", help="YAML config with a `tune` section, e.g. configs/tune_fashion_lenet5.yaml")
    tune.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=4 train.epochs=2")

    sweep = sub.add_parser(
        "sweep",
        help="methods x budgets x seeds (the config's `sweep` section) as one Ray Tune experiment, compared at the end",
    )
    sweep.add_argument("config", help="YAML config, e.g. configs/sweep_fashion_lenet5.yaml")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sweep.seeds=[0,1] sweep.budgets=[0.3,0.15]")

    _data_parser(sub)

    runs = sub.add_parser("runs", help="a table of the runs of an MLflow store (every experiment, or one)")
    runs.add_argument("--experiment", help="only this MLflow experiment (default: all of them)")
    runs.add_argument("--sort", choices=SORTABLE, help="best first by this column (default: newest first)")
    where = runs.add_mutually_exclusive_group()
    where.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    where.add_argument("--out-dir", help="the store a run's out_dir logged to (its summary.json says which)")

    sync = sub.add_parser(
        "sync", help="send what a run logged while its MLflow server was away (out_dir/mlflow-outbox) to the server"
    )
    sync.add_argument("out_dir", help="the run's out_dir")

    compare = sub.add_parser(
        "compare",
        help="test accuracy against compact MACs and params across a store's runs "
        "(table and figure, seeds aggregated; also logged to MLflow)",
    )
    compare.add_argument("--experiment", help="only this MLflow experiment (default: every run of the store)")
    compare.add_argument("--out", default="compare.png", help="where to write the figure (default: compare.png)")
    where = compare.add_mutually_exclusive_group()
    where.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    where.add_argument("--out-dir", help="the store a run's out_dir logged to (its summary.json says which)")

    export = sub.add_parser("export", help="compact model from a training checkpoint")
    export.add_argument("checkpoint", help="e.g. outputs/run/checkpoints/best.pt")
    export.add_argument("--out", required=True, help="where to write the compact model (.pt)")
    return parser


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="dataset files: `data prepare` writes .beton files for FFCV")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="write train/val/test .beton files and metadata.json")
    prep.add_argument(
        "dataset", help="a registered dataset, e.g. fashion-mnist or imagefolder (an unknown name lists them)"
    )
    prep.add_argument(
        "--out", required=True, help="folder for the files (data.beton_dir), e.g. data/ffcv/fashion-mnist"
    )
    prep.add_argument("--root", help="where the source is (default: the dataset's usual place; imagefolder: required)")
    prep.add_argument("--download", action="store_true", help="fetch the source with torchvision (MNIST, CIFAR)")
    prep.add_argument("--val-size", type=int, default=5000, help="validation examples carved from train (default 5000)")
    prep.add_argument("--split-seed", type=int, default=0, help="seed of the validation split (default 0)")
    prep.add_argument("--workers", type=int, default=0, help="writer processes (default: all cores)")
    prep.add_argument("--max-resolution", type=int, help="imagefolder: longer side stored, in pixels (default: as is)")
    prep.add_argument("--jpeg-quality", type=int, default=90, help="imagefolder: JPEG quality (default 90)")
    prep.add_argument("--force", action="store_true", help="rewrite even when the folder is up to date")


def _console(args):
    """The run's config as this terminal shows it: with --verbose, the libraries' INFO lines too;
    without a terminal (a log file, CI), no live bar (tqdm's own rule). Without --verbose the
    libraries' INFO lines stay out: MLflow's store creation and Ray's note that a local cluster uses
    token authentication (nothing to act on)."""
    import dataclasses
    import logging

    cfg = load_config(args.config, [*args.overrides, *(["train.verbose=true"] if args.verbose else [])])
    if not cfg.train.verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if cfg.train.progress and not sys.stderr.isatty():
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
    return cfg


def _cmd_train(args) -> int:
    cfg = _console(args)  # before the heavy imports: bad input fails fast
    from distswitch.driver.train import launch
    from distswitch.worker import ray_main  # the driver is handed the worker's entry, never imports it

    summary = launch(cfg, ray_main, summary_json=args.summary_json, launched_at=args.started)
    dense, small = summary["dense"], summary["compact"]
    print(
        f"{summary['method']} {summary['model']} on {summary['dataset']}: "
        f"test acc {summary['test_acc']:.4f} (val {summary['val_acc']:.4f}, epoch {summary['selected_epoch'] + 1}), "
        f"kept {summary['kept_fraction']:.1%} of gated units, "
        f"params {dense['params']:,} -> {small['params']:,}, MACs {dense['macs']:,} -> {small['macs']:,}"
    )
    print(f"results: {summary['out_dir']}/summary.json, compact model: {summary['model_path']}")
    return 0


def _cmd_tune(args) -> int:
    cfg = _console(args)
    from distswitch.driver.tune import tune
    from distswitch.worker import ray_main

    summary = tune(cfg, ray_main, launched_at=args.started)
    best = summary["best"]
    print(
        f"{summary['num_trials']} trials; best {summary['metric']} {best['metrics'][summary['metric']]:.4f} with "
        + ", ".join(f"{k}={v}" for k, v in best["config"].items())
    )
    print(f"best config: {summary['best_config_path']} (run it with `distswitch train {summary['best_config_path']}`)")
    return 0


def _cmd_sweep(args) -> int:
    cfg = _console(args)
    from distswitch.driver.tune import tune
    from distswitch.worker import ray_main

    summary = tune(cfg, ray_main, launched_at=args.started, sweep=True)
    failed = [t["trial"] for t in summary["trials"] if t["error"]]
    if summary.get("comparison"):
        print(summary["comparison"]["table"])
        print(f"figure: {summary['comparison']['figure']}")
    print(f"{summary['num_trials']} trials" + (f", {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _cmd_export(args) -> int:
    from distswitch.artifacts import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out)
    print(json.dumps({k: result[k] for k in ("kept_fraction", "dense", "compact", "model_path")}))
    return 0


def _cmd_data(args) -> int:
    from distswitch.data.beton import prepare

    if args.val_size < 1:
        raise ConfigError(f"--val-size: got {args.val_size}; must be >= 1")
    prepare(
        args.dataset,
        args.out,
        root=args.root,
        download=args.download,
        val_size=args.val_size,
        split_seed=args.split_seed,
        workers=args.workers,
        max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality,
        force=args.force,
        log=lambda line: print(line, flush=True),
    )
    return 0


def _store(args) -> str:
    """The store `runs` and `compare` read: --uri, a run's (--out-dir), MLFLOW_TRACKING_URI, or the
    default one of this directory (where `distswitch train` logs when nothing else is set)."""
    import os
    from pathlib import Path

    from distswitch.tracking import default_uri

    if args.out_dir:
        out = Path(args.out_dir).resolve()
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
        if (summary.get("mlflow") or {}).get("tracking_uri"):
            return summary["mlflow"]["tracking_uri"]
        raise ConfigError(
            f"--out-dir: {out} has no summary.json naming its MLflow store; "
            "pass the out_dir of a finished run, or --uri"
        )
    if args.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return args.uri or os.environ["MLFLOW_TRACKING_URI"]
    if not Path("mlflow.db").is_file():
        raise ConfigError(
            f"no MLflow store here ({Path.cwd() / 'mlflow.db'}); run this where the runs were launched, "
            "or pass --uri URI / --out-dir OUT_DIR"
        )
    return default_uri(Path.cwd())


def _cmd_runs(args) -> int:
    from distswitch.compare import format_table, runs_table

    rows = runs_table(_store(args), args.experiment, sort=args.sort)
    where = f"experiment {args.experiment!r}" if args.experiment else "the store"
    print(format_table(rows) if rows else f"no runs in {where}")
    return 0


def _cmd_sync(args) -> int:
    from pathlib import Path

    from distswitch.delivery import Delivery, outbox_dir
    from distswitch.outbox import send_all, unsent

    folder = outbox_dir(args.out_dir)
    if not Path(args.out_dir).is_dir():
        raise ConfigError(f"out_dir: {args.out_dir} is not a folder; pass the out_dir of a run")
    if not folder.is_dir() or unsent(folder) == 0:
        print(f"nothing to send: {folder} holds nothing unsent")
        return 0
    try:
        sent, busy = send_all(folder, Delivery())
    except Exception as exc:
        left = unsent(folder)
        print(
            f"distswitch: error: MLflow did not take all of it ({type(exc).__name__}: {str(exc)[:200]}); "
            f"{left} unsent, kept in {folder}: run this again once the server is reachable",
            file=sys.stderr,
        )
        return 1
    print(f"sent {sent} entries from {folder}" + (f" ({', '.join(busy)}: a live run is sending those)" if busy else ""))
    return 0


def _cmd_compare(args) -> int:
    from distswitch.compare import compare

    _, path, text = compare(_store(args), args.experiment, args.out)
    print(text)
    print(f"figure: {path} (also logged to MLflow, run 'compare')")
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.time()  # origin of the start-up figure (launch to first step)
    args = _parser().parse_args(argv)
    args.started = started
    if args.command in ("train", "tune", "sweep"):  # the driver's cluster start keeps this handler (cluster.connect)
        signals.install()
    try:
        commands = {
            "train": _cmd_train,
            "tune": _cmd_tune,
            "export": _cmd_export,
            "data": _cmd_data,
            "runs": _cmd_runs,
            "compare": _cmd_compare,
            "sync": _cmd_sync,
            "sweep": _cmd_sweep,
        }
        return commands[args.command](args)
    except (Exception, KeyboardInterrupt) as exc:
        from distswitch.stop import for_user  # imported late: `--help` stays fast

        ended = for_user(exc)
        if ended is None or (args.debug and not isinstance(exc, KeyboardInterrupt)):
            raise
        code, line = ended
        print(line, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
