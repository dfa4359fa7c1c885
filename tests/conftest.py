"""Shared fixtures: repository paths, the Fashion-MNIST location, small configs and fake data."""

from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path

# Before anything imports ray (Ray reads it once, at import): workers run in this environment,
# not in an uploaded copy of the working directory re-launched through `uv run`.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import numpy as np
import pytest
import torch

from distswitch.config import Config
from distswitch.data import DatasetInfo
from distswitch.data.datasets import FASHION_MNIST_DEBIAN

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "fashion_lenet5.yaml"

# What Fashion-MNIST looks like to the models: 1x28x28 images, 10 classes.
FASHION_INFO = DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), "none")


@pytest.fixture(scope="session")
def fashion_mnist_root() -> Path:
    """The Debian Fashion-MNIST folder; its absence fails the test (it is part of `make setup`)."""
    root = Path(FASHION_MNIST_DEBIAN)
    names = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        pytest.fail(f"Fashion-MNIST is missing under {root} ({', '.join(missing)}); run `make setup`", pytrace=False)
    return root


@pytest.fixture(scope="session", autouse=True)
def session_store(tmp_path_factory):
    """Runs made by module-scoped fixtures log here, not to the default store of the directory
    pytest runs in (the repository): MLflow's default is ./mlflow.db, one for every launch there."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


class TrackingServer:
    """`make tracking-server` as a team runs it (`mlflow server`, PostgreSQL store, artifacts proxied
    by the server) on `port`, in a process group of its own; `stop` and `start` again (an outage)
    keep its store and artifacts."""

    def __init__(self, port: int, folder: Path, host: str = "127.0.0.1") -> None:
        self.port, self.folder, self.host = port, folder, host
        self.uri = f"http://{host}:{port}"
        self.log = folder / "server.log"
        self.proc = None

    def start(self) -> None:
        import subprocess
        import time
        import urllib.request

        with self.log.open("a") as sink:
            self.proc = subprocess.Popen(
                [
                    "make",
                    "-s",
                    "tracking-server",
                    f"TRACKING_PORT={self.port}",
                    f"TRACKING_ARTIFACTS={self.folder / 'artifacts'}",
                    f"TRACKING_HOST={self.host}",
                    *([f"TRACKING_ALLOWED_HOSTS={self.host}:{self.port}"] if self.host != "127.0.0.1" else []),
                ],
                cwd=REPO_ROOT,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"`make tracking-server` did not come up: {self.log.read_text()[-3000:]}", pytrace=False)
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        import signal
        import subprocess

        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory) -> str:
    """One team tracking server for the whole test run, on a free port; its URI. The database outlives
    the test run: tests name an experiment of their own (`server_experiment`)."""
    server = TrackingServer(free_port(), tmp_path_factory.mktemp("tracking-server"))
    server.start()
    try:
        yield server.uri
        assert server.alive(), f"the tracking server died during the tests: {server.log.read_text()[-3000:]}"
    finally:
        server.stop()


@pytest.fixture
def server_experiment(request) -> str:
    """An MLflow experiment name no other test (or earlier test run) on the server uses."""
    import uuid

    return f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def no_leaked_tracking_uri():
    """A test that leaves MLFLOW_TRACKING_URI changed sends every later run in the session to its
    store (it once put a stray run into the tune test's experiment)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    after = os.environ.get("MLFLOW_TRACKING_URI")
    assert after == before, f"the test left MLFLOW_TRACKING_URI={after!r} (was {before!r})"


@pytest.fixture(autouse=True)
def mlflow_store(no_leaked_tracking_uri, monkeypatch, tmp_path):
    """Each test's runs (its subprocesses' too) log to a store of its own; tests of the default
    location unset MLFLOW_TRACKING_URI themselves (monkeypatch puts it back before the leak check)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session", autouse=True)
def fashion_betons(fashion_mnist_root) -> Path:
    """Fashion-MNIST as .beton files where `data.loader: ffcv` looks by default (data/ffcv/ under
    the repository, as `make train` writes them); a no-op when they are up to date."""
    from distswitch.data.beton import default_dir, prepare

    folder = REPO_ROOT / default_dir("fashion-mnist")
    prepare("fashion-mnist", folder, log=lambda line: None)
    return folder


# A config owned by the tests: configs/*.yaml are tuned independently and must not move these tests.
TEST_CONFIG_YAML = """\
model: {name: lenet5, gated: all}
method: switch
switcher: {arch: rowwise, width: 16, granularity: neuron}
schedule: {update_ratio: 4, warmup_epochs: 1}
train: {epochs: 8, batch_size: 128, seed: 0, device: cpu, progress: false}
optim:
  tnn: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4, scheduler: cosine}
  snn: {name: adam, lr: 1.0e-3, momentum: 0.0, weight_decay: 0.0, scheduler: cosine}
data: {dataset: fashion-mnist}
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "test_config.yaml"
    path.write_text(TEST_CONFIG_YAML)
    return path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """A fresh run directory (never the repository's outputs/)."""
    return tmp_path / "run"


def make_config(**sections) -> Config:
    """A validated Config for tests: CPU, no progress bars, plus the given sections (dicts or values)."""
    data: dict = {"train": {"device": "cpu", "progress": False}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Config.from_dict(data)


def fake_batch(batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images shaped like normalised Fashion-MNIST and random labels of its 10 classes."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST IDX file (gzip), as the datasets' readers expect it."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def indexed_mnist(root: Path, n_train: int, n_test: int) -> Path:
    """MNIST-layout IDX files whose image i carries i in its first two pixels (i % 256, i // 256)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28))
        images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def kill_ray_processes() -> None:
    """Every Ray process on this machine SIGKILLed and waited for: a killed driver's local cluster
    goes down with it, as when its machine dies (on its own it would notice about a minute later),
    and no old trial writes into the checkpoints a rerun resumes from."""
    import contextlib

    import psutil

    for leftover in ray_processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    psutil.wait_procs(ray_processes(), timeout=30)


def ray_processes() -> list:
    """Ray's workers and actors (ray::...), GCS servers and raylets on this machine."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::") or "gcs_server" in cmdline or "/raylet" in cmdline:
            found.append(proc)
    return found
