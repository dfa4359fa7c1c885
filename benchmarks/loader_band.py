"""The default job, shortened (4 epochs), through both loaders in one process: accuracy and speed.

    uv run python benchmarks/loader_band.py
"""

import json, tempfile
from distswitch.config import load_config
from distswitch.run import train
out = {}
for loader in ("ffcv", "torch"):
    d = tempfile.mkdtemp()
    s = train(load_config("configs/fashion_lenet5.yaml", ["train.progress=false", "train.device=cpu", f"data.loader={loader}",
                                                          "train.epochs=4", "schedule.warmup_epochs=1", "schedule.finetune_epochs=1", f"out_dir={d}/run"]))
    out[loader] = {k: s[k] for k in ("val_acc", "test_acc", "kept_fraction", "seconds_per_epoch", "images_per_s")}
print(json.dumps(out, indent=1))
