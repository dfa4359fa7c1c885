"""Bad input, each through the real command line: one line saying what is wrong and how to fix it,
exit status 2, no traceback, no MLflow run left RUNNING, no half-written file.

Every case fails before a Ray cluster or a worker starts (the checks run on the driver), so the
table runs in-process in seconds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import FASHION_INFO, TEST_CONFIG_YAML, free_port, make_config
from distswitch.cli import main


def _betons(tmp: Path, fashion_betons: Path, damage=None) -> Path:
    """A copy of the prepared Fashion-MNIST folder (the big splits linked), val damaged by `damage`."""
    folder = tmp / "betons"
    folder.mkdir()
    for item in fashion_betons.iterdir():
        if item.name == "val.beton" or item.name == "metadata.json":
            shutil.copyfile(item, folder / item.name)
        else:
            (folder / item.name).symlink_to(item)
    if damage is not None:
        damage(folder / "val.beton")
    return folder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), dtype=torch.uint8).numpy().tobytes())


def _dense_checkpoint(tmp: Path) -> Path:
    """A real training checkpoint of the dense method: it has no switcher, hence no factors."""
    from distswitch.build import build
    from distswitch.checkpoint import bundle as checkpoint_bundle
    from distswitch.engine import Engine
    from distswitch.io import save_torch

    cfg = make_config(model={"name": "mlp"}, method="dense")
    cpu = torch.device("cpu")
    tnn, gates, method = build(cfg, FASHION_INFO, 10, cpu)
    engine = Engine(cfg, tnn, gates, method, cpu)
    path = tmp / "dense.pt"
    save_torch(checkpoint_bundle(cfg, FASHION_INFO, engine, 0, 10, [], {"val_acc": 0.5, "epoch": 0}, None), path)
    return path


def _previous_run_of_another_model(tmp: Path) -> Path:
    """An out_dir whose earlier launch (config.yaml, a checkpoint in its Ray storage) trained lenet5."""
    out = tmp / "run"
    (out / "ray" / "run" / "epoch_0000").mkdir(parents=True)
    (out / "config.yaml").write_text(make_config(model={"name": "lenet5"}, out_dir=str(out)).to_yaml())
    return out


def _finished(tmp: Path) -> Path:
    out = tmp / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    return out


def _file_in_the_way(tmp: Path) -> Path:
    (tmp / "file").write_text("")
    return tmp / "file" / "run"


# Any host: one worker more than this machine's CPUs.
MORE_THAN_CPUS = (os.cpu_count() or 1) + 1
# In a case's arguments: run it as on a machine where CUDA is not usable (a GPU host included; the
# check under test is the driver's, before any GPU work).
NO_CUDA = "<no usable CUDA>"

# (id, arguments after the command's config (or the whole argv for other commands), what the
# line must name). `{tmp}`, `{out}`, `{port}` are filled in; callables get tmp (and the betons).
CASES = [
    ("unknown key", ["switcher.widht=32"], "switcher.widht: unknown key"),
    ("wrong type", ["train.epochs=three"], "train.epochs"),
    ("out of range", ["switcher.l1=0.1", "switcher.target_kept=1.5"], "switcher.target_kept"),
    ("negative learning rate", ["optim.snn.lr=-1"], "optim.snn.lr"),
    (
        "budget no cut can meet",
        ["schedule.finetune_epochs=1", "switcher.min_kept=20", "budget.fraction=0.05"],
        "budget.fraction: 0.05 of the dense macs cannot be met",
    ),
    (
        "budget beside a per-layer fraction",
        ["method=magnitude", "budget.fraction=0.5", "prune.kept_fraction=0.5"],
        "prune.kept_fraction",
    ),
    ("budget without fine-tuning epochs", ["budget.fraction=0.5"], "schedule.finetune_epochs"),
    ("NaN learning rate", ["optim.tnn.lr=.nan"], "optim.tnn.lr"),
    ("update ratio 0", ["schedule.update_ratio=0"], "schedule.update_ratio"),
    ("switcher width 0", ["switcher.width=0"], "switcher.width"),
    ("min_kept above a layer's units", ["switcher.min_kept=100000"], "switcher.min_kept"),
    ("unknown model", ["model.name=resnet9000"], "model.name: unknown model"),
    ("unknown dataset", ["data.dataset=imagenet-22k"], "data.dataset"),
    ("unknown method", ["method=magic"], "method"),
    ("unknown switcher", ["switcher.arch=transformer"], "switcher.arch"),
    ("missing data root", ["data.loader=torch", "data.root={tmp}/nowhere"], "data.root"),
    ("no prepared betons", ["data.beton_dir={tmp}/nowhere"], "distswitch data prepare"),
    ("truncated beton", lambda tmp, b: [f"data.beton_dir={_betons(tmp, b, _truncate)}"], "truncated"),
    ("foreign beton", lambda tmp, b: [f"data.beton_dir={_betons(tmp, b, _foreign)}"], "not a readable .beton"),
    (
        "betons of another dataset",
        lambda tmp, b: ["data.dataset=mnist", f"data.beton_dir={_betons(tmp, b)}"],
        "holds fashion-mnist, but data.dataset is mnist",
    ),
    (
        "betons of another split",
        lambda tmp, b: ["data.val_size=1000", f"data.beton_dir={_betons(tmp, b)}"],
        "data.val_size/split_seed",
    ),
    ("batch larger than the split", ["data.train_limit=100"], "train.batch_size"),
    (
        "more workers than CPUs",
        lambda tmp, b: [f"distributed.num_workers={MORE_THAN_CPUS}", f"train.batch_size={2 * MORE_THAN_CPUS}"],
        f"{MORE_THAN_CPUS} workers need {MORE_THAN_CPUS} CPU",
    ),
    (
        "GPUs asked on a machine without",
        [NO_CUDA, "distributed.use_gpu=true"],
        "distributed.use_gpu: true, but CUDA is not usable",
    ),
    ("unreachable RAY_ADDRESS", ["RAY_ADDRESS=127.0.0.1:{port}"], "RAY_ADDRESS"),
    ("unreachable MLflow server", ["tracking.uri=http://127.0.0.1:{port}"], "tracking.uri: cannot reach MLflow"),
    ("unwritable out_dir", lambda tmp, b: [f"out_dir={_file_in_the_way(tmp)}"], "out_dir: cannot write"),
    ("finished out_dir", lambda tmp, b: [f"out_dir={_finished(tmp)}"], "already holds a finished run"),
    (
        "checkpoint from another model",
        lambda tmp, b: [f"out_dir={_previous_run_of_another_model(tmp)}", "model.name=mlp"],
        "model: differs from the checkpoint",
    ),
    ("bad override syntax", ["train.epochs"], "train.epochs"),
    ("missing config file", ["train", "{tmp}/missing.yaml"], "missing.yaml"),
    ("invalid YAML", ["train", "{tmp}/broken.yaml"], "broken.yaml"),
    (
        "export of a checkpoint with no factors",
        lambda tmp, b: ["export", str(_dense_checkpoint(tmp)), "--out", f"{tmp}/model.pt"],
        "no switcher factors",
    ),
    ("export of a foreign file", ["export", "{tmp}/broken.yaml", "--out", "{tmp}/model.pt"], "cannot be read"),
    (
        "tune space naming an unknown key",
        ["tune", "{config}", "tune.space={{switcher.widht: {{choice: [8]}}}}"],
        "tune.space",
    ),
    ("prepare of an unknown dataset", ["data", "prepare", "imagenet-22k", "--out", "{tmp}/b"], "imagenet-22k"),
]
COMMANDS = ("train", "export", "tune", "data")


def _argv(spec, tmp: Path, config: Path, betons: Path) -> tuple[list[str], dict]:
    args = spec(tmp, betons) if callable(spec) else [a.format(tmp=tmp, port=free_port(), config=config) for a in spec]
    env = dict(a.split("=", 1) for a in args if a.startswith("RAY_ADDRESS="))
    args = [a for a in args if not a.startswith("RAY_ADDRESS=") and a != NO_CUDA]
    if args and args[0] in COMMANDS:
        return args, env
    out = [f"out_dir={tmp / 'run'}"] if not any(a.startswith("out_dir=") for a in args) else []
    return ["train", str(config), *out, *args], env


@pytest.mark.parametrize("spec, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_half_done(
    spec, needle, tmp_path, capsys, monkeypatch, fashion_betons
):
    assert len(CASES) >= 20
    config = tmp_path / "config.yaml"
    config.write_text(TEST_CONFIG_YAML)
    (tmp_path / "broken.yaml").write_text("model: [lenet5\n")
    if not callable(spec) and NO_CUDA in spec:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    argv, env = _argv(spec, tmp_path, config, fashion_betons)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    status = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("distswitch: error: "), captured.err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in captured.out + captured.err
    for db in tmp_path.rglob("mlflow.db"):
        client = MlflowClient(f"sqlite:///{db}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_id, r.info.status) for r in runs]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def test_debug_shows_the_traceback_of_a_bad_input(tmp_path):
    from distswitch.config import ConfigError

    config = tmp_path / "config.yaml"
    config.write_text(TEST_CONFIG_YAML)
    with pytest.raises(ConfigError, match="switcher.width"):
        main(["--debug", "train", str(config), "switcher.width=0", f"out_dir={tmp_path / 'run'}"])
