"""Benchmark start-up of a trivial 2-worker CPU Ray Train TorchTrainer.

Usage: .venv/bin/python bench.py LABEL [JSON_OPTIONS]
JSON_OPTIONS keys:
  init_kw: dict passed to ray.init (default {})
  rpw: resources_per_worker (default None -> Ray default 1 CPU)
  callback_test: if true, pass a Tune callback to RunConfig and report the error
Environment variables are taken as-is (set them on the command line).
All times are seconds relative to the driver process creation (/proc).
"""
import time

T_SCRIPT = time.time()
import json
import os
import sys

def proc_start():
    """Process creation time (epoch s) from /proc/self/stat + /proc/uptime."""
    import os as _o
    import time as _t
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return _t.time() - (up - int(fields[19]) / _o.sysconf("SC_CLK_TCK"))


def _proc_age():
    import os as _o
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return up - int(fields[19]) / _o.sysconf("SC_CLK_TCK")


# Driver process creation time in epoch seconds (10 ms resolution).
P0 = time.time() - _proc_age()
LABEL = sys.argv[1] if len(sys.argv) > 1 else "default"
OPTS = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
TSDIR = "/tmp/raystart/ts"
os.makedirs(TSDIR, exist_ok=True)


def rel(t):
    return round(t - P0, 3)


def train_fn(config):
    import time as _t

    t_first = _t.time()
    import os as _os
    wproc_start = proc_start()
    import torch
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    model = torch.nn.Linear(10, 1)
    model = ray.train.torch.prepare_model(model)
    t_prep = _t.time()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 10)
    y = torch.randn(8, 1)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    t_step = _t.time()
    with open(f"{config['tsdir']}/{config['label']}_rank{rank}.json", "w") as f:
        json.dump(
            {
                "worker_proc_start": wproc_start,
                "first_line": t_first,
                "after_prepare_model": t_prep,
                "after_first_step": t_step,
                "pid": _os.getpid(),
            },
            f,
        )
    ray.train.report({"x": 1})


def main():
    t_imp0 = time.time()
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t_imp1 = time.time()
    init_kw = OPTS.get("init_kw", {})
    ray.init(**init_kw)
    if OPTS.get("warm_coordinator"):
        # Pre-create Ray Train V2's AutoscalingCoordinator actor (private API) so
        # the controller's 5 s-timeout request_resources call finds it ready.
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    t_init = time.time()
    sc_kw = dict(num_workers=2, use_gpu=False)
    if OPTS.get("rpw") is not None:
        sc_kw["resources_per_worker"] = OPTS["rpw"]
    rc_kw = dict(storage_path="/tmp/raystart/results", name=f"{LABEL}_{int(time.time())}")
    if OPTS.get("callback_test"):
        from ray.tune import Callback

        rc_kw["callbacks"] = [Callback()]
    try:
        trainer = TorchTrainer(
            train_fn,
            train_loop_config={"tsdir": TSDIR, "label": LABEL},
            scaling_config=ScalingConfig(**sc_kw),
            run_config=RunConfig(**rc_kw),
        )
    except Exception as e:  # for the callback test
        print("TRAINER_CONSTRUCT_ERROR:", type(e).__name__, str(e)[:500])
        ray.shutdown()
        return
    t_fit0 = time.time()
    result = trainer.fit()
    t_fit1 = time.time()
    ray.shutdown()
    t_shut = time.time()
    ws = []
    for r in range(2):
        with open(f"{TSDIR}/{LABEL}_rank{r}.json") as f:
            ws.append(json.load(f))
        os.remove(f"{TSDIR}/{LABEL}_rank{r}.json")
    out = {
        "label": LABEL,
        "p0_epoch": P0,
        "opts": OPTS,
        "env": {k: v for k, v in os.environ.items() if k.startswith("RAY_")},
        "script_start": rel(T_SCRIPT),
        "import_ray_train_torch": round(t_imp1 - t_imp0, 3),
        "ray_init": round(t_init - t_imp1, 3),
        "t_after_init": rel(t_init),
        "fit_total": round(t_fit1 - t_fit0, 3),
        "t_fit_start": rel(t_fit0),
        "workers": [
            {k: (rel(v) if k != "pid" else v) for k, v in w.items()} for w in ws
        ],
        "first_step_max": max(rel(w["after_first_step"]) for w in ws),
        "fit_end_after_first_step": round(t_fit1 - max(w["after_first_step"] for w in ws), 3),
        "shutdown": round(t_shut - t_fit1, 3),
        "total_wall": rel(t_shut),
        "metrics": result.metrics,
    }
    print("RESULT " + json.dumps(out))
    with open("/tmp/raystart/results.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
