"""Ray Train V2 'local mode': ScalingConfig(num_workers=0) launched under torchrun.
Run:  T0=$(date +%s.%N) .venv/bin/torchrun --standalone --nproc-per-node=2 local_bench.py
Times are relative to T0 (the shell launching torchrun)."""
import os, time
T0 = float(os.environ["T0"])
import torch
import ray.train, ray.train.torch
from ray.train import ScalingConfig, RunConfig
from ray.train.torch import TorchTrainer
t_imp = time.time()

def train_fn():
    t_first = time.time()
    model = ray.train.torch.prepare_model(torch.nn.Linear(10, 1))
    t_prep = time.time()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.mse_loss(model(torch.randn(8, 10)), torch.randn(8, 1))
    opt.zero_grad(); loss.backward(); opt.step()
    t_step = time.time()
    ctx = ray.train.get_context()
    print(f"LOCAL rank={ctx.get_world_rank()}/{ctx.get_world_size()} imports_done={t_imp-T0:.2f} "
          f"first_line={t_first-T0:.2f} after_prepare_model={t_prep-T0:.2f} after_first_step={t_step-T0:.2f}", flush=True)
    ray.train.report({"x": 1})

res = TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=0),
                   run_config=RunConfig(name="local")).fit()
print(f"LOCAL rank_env={os.environ.get('RANK')} fit_done={time.time()-T0:.2f} metrics={res.metrics}", flush=True)
