"""Start-up overhead of `distswitch train`: launch to the first training step, with its timeline.

Runs the real command (one short epoch) side by side for: a fresh local cluster with 1 and 2
workers, then 2 workers joining a head started beforehand (`ray start --head`, as on a cluster).
Every figure is read from the run's summary.json (`startup_timeline`, seconds since the CLI's
`main` began), except `process_to_first_step`: seconds from spawning the command to its first step
(the interpreter's start-up and the CLI import included).

`--source-imports` adds, interleaved, 2-worker runs that import every installed package from source,
as in an environment installed without `compile-bytecode` where PYTHONDONTWRITEBYTECODE=1 (this
machine's setting, and many container images'): PYTHONPYCACHEPREFIX points at a folder holding the
standard library's bytecode only.

`--versus-floor REPEATS`: only Ray Train's floor (benchmarks/ray_floor.py: a trivial 2-worker
TorchTrainer job on a fresh local cluster, Ray's defaults) and the 2-worker command above,
alternating, REPEATS pairs; both timed from their process's creation. Reports each one's train
function start and first step, and the medians' ratios (distswitch / floor).

    uv run python benchmarks/startup.py --out outputs/startup [--repeats 2] [--loaders ffcv torch] [--source-imports]
    uv run python benchmarks/startup.py --out outputs/bench/startup_floor --versus-floor 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHORT = [
    "train.epochs=1",
    "schedule.warmup_epochs=0",
    "schedule.finetune_epochs=0",
    "budget.fraction=null",
    "data.train_limit=1024",
    "train.progress=false",
]
MARKS = [
    "driver_ready",
    "ray_connected",
    "fit_called",
    "worker_started",
    "data_loaded",
    "model_built",
    "replicas_ready",
    "first_step",
]


def run(label: str, out: Path, workers: int, env: dict, loader: str) -> dict:
    # Absolute: on a joined cluster relative data paths are the workers' business (cluster/README.md).
    cmd = [
        "distswitch",
        "train",
        "configs/fashion_lenet5.yaml",
        *SHORT,
        f"distributed.num_workers={workers}",
        f"data.loader={loader}",
        f"data.beton_dir={REPO / 'data/ffcv/fashion-mnist'}",
        f"out_dir={out / label}",
    ]
    print("$", shlex.join(cmd), flush=True)
    shutil.rmtree(out / label, ignore_errors=True)  # a rerun into the same --out starts afresh
    spawned = time.time()
    subprocess.run(
        [str(BIN / "distswitch"), *cmd[1:]],
        check=True,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    summary = json.loads((out / label / "summary.json").read_text())
    timeline = summary["startup_timeline"]
    return {
        "label": label,
        "command": shlex.join(cmd),
        "timeline": timeline,
        "startup_seconds": summary["startup_seconds"],
        "process_to_first_step": summary["startup_origin"] - spawned + timeline["first_step"],
        "process_to_worker_started": summary["startup_origin"] - spawned + timeline["worker_started"],
    }


def versus_floor(out: Path, repeats: int, env: dict) -> dict:
    """Ray's trivial job and `distswitch train`, alternating (see the docstring)."""
    import statistics

    pairs = []
    for r in range(repeats):
        floor_json = out / f"floor-{r}.json"
        subprocess.run(
            [sys.executable, str(REPO / "benchmarks/ray_floor.py"), "--out", str(floor_json)],
            check=True,
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        floor = json.loads(floor_json.read_text())
        ours = run(f"versus-floor-{r}", out, 2, env, "ffcv")
        pairs.append(
            {
                "floor_train_fn": floor["train_fn_reached"],
                "floor_first_step": floor["first_step"],
                "train_fn": ours["process_to_worker_started"],
                "first_step": ours["process_to_first_step"],
            }
        )
    med = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
    return {
        "pairs": pairs,
        "median": med,
        "train_fn_ratio": med["train_fn"] / med["floor_train_fn"],
        "first_step_ratio": med["first_step"] / med["floor_first_step"],
    }


IMPORTS = {
    "import torch": "import torch",
    "import ray.train.torch": "import ray.train.torch",
    "import ffcv": "import ffcv",
    "import ffcv via distswitch": "from distswitch.data.beton import import_ffcv; import_ffcv()",
}


def source_imports_env(env: dict) -> dict:
    """`env` where Python finds bytecode for the standard library only (see the docstring)."""
    import sysconfig

    prefix = tempfile.mkdtemp(prefix="stdlib-pycache-")
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", sysconfig.get_paths()["stdlib"]],
        env={**env, "PYTHONPYCACHEPREFIX": prefix},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return {**env, "PYTHONPYCACHEPREFIX": prefix, "PYTHONDONTWRITEBYTECODE": "1"}


def time_imports(repeats: int) -> list[dict]:
    """Each import in a fresh interpreter, with and without bytecode, interleaved: wall and CPU s."""
    import resource
    import statistics

    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    envs = {"bytecode": dict(os.environ), "source": source_imports_env(dict(os.environ))}
    for _ in range(repeats):
        for bytecode, env in envs.items():
            for name, code in IMPORTS.items():
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
                wall = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                samples.setdefault((name, bytecode), []).append((wall, cpu))
    return [
        {
            "import": name,
            "bytecode": bytecode,
            "wall_s": statistics.median(w for w, _ in v),
            "cpu_s": statistics.median(c for _, c in v),
            "samples": v,
        }
        for (name, bytecode), v in samples.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--loaders", nargs="+", default=["ffcv", "torch"], help="data.loader values to compare")
    parser.add_argument("--source-imports", action="store_true", help="also 2 workers with no bytecode (see above)")
    parser.add_argument(
        "--imports-only",
        type=int,
        metavar="REPEATS",
        default=0,
        help="only time the heavy imports in fresh interpreters, REPEATS times each",
    )
    parser.add_argument(
        "--versus-floor",
        type=int,
        metavar="REPEATS",
        default=0,
        help="only Ray's trivial job against distswitch train, alternating, REPEATS pairs",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.versus_floor:
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        env.pop("RAY_ADDRESS", None)
        report = versus_floor(args.out, args.versus_floor, env)
        (args.out / "versus_floor.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return
    if args.imports_only:
        rows = time_imports(args.imports_only)
        table = "| import | bytecode | wall s | CPU s |\n|---|---|---|---|\n" + "\n".join(
            f"| {r['import']} | {r['bytecode']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} |" for r in rows
        )
        (args.out / "imports.md").write_text(table + "\n")
        (args.out / "imports.json").write_text(json.dumps(rows, indent=2))
        print(table)
        return
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    source_env = source_imports_env(env) if args.source_imports else None
    rows = []
    for r in range(args.repeats):
        for loader in args.loaders:
            rows.append(run(f"local-1w-{loader}-{r}", args.out, 1, env, loader))
            rows.append(run(f"local-2w-{loader}-{r}", args.out, 2, env, loader))
            if args.source_imports:
                rows.append(run(f"local-2w-{loader}-source-{r}", args.out, 2, source_env, loader))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head_env = {**env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],
        check=True,
        env=head_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for r in range(args.repeats):
            for loader in args.loaders:
                rows.append(
                    run(f"head-2w-{loader}-{r}", args.out, 2, {**head_env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, loader)
                )
    finally:
        subprocess.run(
            [str(BIN / "ray"), "stop", "--force"], env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    head = "| run | " + " | ".join(MARKS) + " | process_to_first_step |\n|---|" + "---|" * (len(MARKS) + 1)
    lines = [head] + [
        f"| {r['label']} | "
        + " | ".join(f"{r['timeline'].get(m, float('nan')):.1f}" for m in MARKS)
        + f" | {r['process_to_first_step']:.1f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    (args.out / "startup.md").write_text(table + "\n")
    (args.out / "startup.json").write_text(json.dumps(rows, indent=2))
    print(table)


if __name__ == "__main__":
    main()
