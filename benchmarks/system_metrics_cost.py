"""What MLflow's system-metrics monitor costs a worker: the CPU time of a process that only runs the
monitor (`distswitch.delivery.system_metrics`, against a SQLite store as the embedded default has)
for a while, against the same process without it, interleaved.

    uv run python benchmarks/system_metrics_cost.py [--interval 10] [--seconds 60] [--rounds 2] [--out F]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from common import environment, write_report
from distswitch.delivery import mlflow_client, system_metrics


def cpu_seconds(uri: str, monitored: bool, interval: float, seconds: float) -> tuple[float, int]:
    """CPU seconds this process spent over `seconds` of wall time, and the samples logged."""
    client = mlflow_client(uri)
    run = client.create_run(client.get_experiment_by_name("cost").experiment_id)
    start = time.process_time()
    outbox = tempfile.mkdtemp()  # the samples' journal, as a run's out_dir holds it
    monitor = system_metrics(uri, run.info.run_id, outbox, node="node", interval=interval) if monitored else None
    time.sleep(seconds)
    if monitor is not None:
        monitor.finish()
    spent = time.process_time() - start
    return spent, len(client.get_metric_history(run.info.run_id, "system/node/cpu_utilization_percentage"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
    mlflow_client(uri).create_experiment("cost")
    cpu_seconds(uri, True, args.interval, 2 * args.interval)  # imports and the store's first use, untimed
    rounds = {"off": [], "on": []}
    samples = []
    for _ in range(args.rounds):
        for variant in ("off", "on"):
            spent, logged = cpu_seconds(uri, variant == "on", args.interval, args.seconds)
            rounds[variant].append(spent)
            if variant == "on":
                samples.append(logged)
    extra = statistics.mean(rounds["on"]) - statistics.mean(rounds["off"])
    result = {
        "interval_s": args.interval,
        "seconds": args.seconds,
        "cpu_s": rounds,
        "samples_logged": samples,
        "extra_cpu_share_of_one_core": extra / args.seconds,
        "environment": environment(),
    }
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
