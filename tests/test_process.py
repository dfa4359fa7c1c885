"""The process settings a run trains under (distswitch.process)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

ON_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# LeNet5's alternating TNN/SNN steps on one batch, in a process configured as a worker configures its
# own; prints the minor page faults of ten steps after six of warm-up. A fresh
# interpreter per case: a heap setting holds for the life of a process.
_STEPS = """
import json, resource, sys, tempfile, torch
from distswitch.build import build
from distswitch.config import load_config
from distswitch.data.datasets import DatasetInfo
from distswitch.engine import Engine
from distswitch.process import configure_process
from distswitch.schedule import Phase
torch.set_num_threads(1)
cpu = torch.device("cpu")
configure_process(cpu, heap=sys.argv[1] == "kept")
cfg = load_config("configs/fashion_lenet5.yaml", ["train.device=cpu", "train.progress=false",
                  f"out_dir={tempfile.mkdtemp()}/run", "schedule.warmup_epochs=0", "budget.fraction=null"])
info = DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), "none")
engine = Engine(cfg, *build(cfg, info, 10, cpu), cpu)
gen = torch.Generator().manual_seed(0)
x = torch.randn(cfg.train.batch_size, 1, 28, 28, generator=gen).contiguous(memory_format=engine.memory_format)
y = torch.randint(0, 10, (len(x),), generator=gen)
for i in range(16):
    if i == 6:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    engine.step(0, Phase.SNN if i % 2 == 0 else Phase.TNN, x, y)
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _step_faults(heap: str) -> int:
    out = subprocess.run([sys.executable, "-c", _STEPS, heap], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])["faults"]


@pytest.mark.skipif(not ON_GLIBC, reason="a setting of glibc's malloc")
def test_training_steps_reuse_the_memory_the_step_before_freed_instead_of_faulting_in_fresh_pages():
    default, kept = _step_faults("default"), _step_faults("kept")
    # Measured: ~5,000 faults in every step on glibc's default heap; with the kept heap 0 in most steps
    # and a few hundred to ~1,500 in the odd one that grows the heap (0-3,000 over the ten).
    assert default > 20_000, f"even glibc's default heap faulted only {default} pages: the measurement is blind"
    assert kept < default / 10, f"{kept} page faults over ten steps with the kept heap (default heap: {default})"


def test_keep_freed_memory_says_whether_it_took():
    from distswitch.process import keep_freed_memory

    assert keep_freed_memory() is ON_GLIBC
