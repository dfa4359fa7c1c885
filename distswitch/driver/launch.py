"""The launch every command that runs on a cluster shares (train, tune, sweep): what can fail is
checked before Ray starts (names, data, CUDA, whether the workers fit, out_dir), then the cluster is
joined or started and checked (resources, storage, the tracking server from every node), and on
the way out it is closed, a stop signal's training actors halted first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time
from pathlib import Path

from distswitch.build import preflight, validate_names
from distswitch.config import Config, ConfigError
from distswitch.driver import cluster


def prepare(cfg: Config, finished: str, what: str) -> tuple[Config, Path]:
    """The checks before Ray starts; the config with local paths made absolute, and its out_dir
    (refused when it holds a finished `what`, i.e. its `finished` file)."""
    validate_names(cfg)
    if os.environ.get("RAY_ADDRESS"):
        cluster.check_ray_address(os.environ["RAY_ADDRESS"])
    else:  # the data and the cluster are this machine's: fail before Ray starts
        cfg = local_paths(cfg)
        preflight(cfg)
        cluster.check_cuda(cfg)
        cluster.check_fits(cfg, cluster.local_resources(cfg), remote=False)
    out = Path(cfg.out_dir)
    if (out / finished).is_file():
        raise ConfigError(
            f"out_dir: {str(out)!r} already holds a finished {what} ({finished}); pass another out_dir=... or remove it"
        )
    cluster.writable(out, "out_dir")
    return cfg, out


@contextlib.contextmanager
def on_cluster(cfg: Config, storage: str, uri: str | None, marks: dict | None = None):
    """Ray, joined or started (`marks["ray_connected"]` set), with the workers' resources, the
    storage and the tracking server checked from it; our local cluster stopped on the way out."""
    ray, started = cluster.connect(cfg)
    if marks is not None:
        marks["ray_connected"] = time.time()
    try:
        cluster.check_resources(ray, cfg)
        cluster.check_storage(ray, storage)
        cluster.check_tracking(ray, uri)
        yield ray
    except KeyboardInterrupt:  # a stop signal (a joined cluster ends our job's actors once we have gone)
        if started:  # Ray's notices of the actors killed would blame "an unexpected system error"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                cluster.halt_local_training()
                cluster.disconnect(ray, started)
        raise
    finally:
        if started and ray.is_initialized():  # our connection, and our local cluster: closed with us
            cluster.disconnect(ray, started)  # (a joined cluster runs on); also ends Ray's log stream


def local_paths(cfg: Config) -> Config:
    """Data paths made absolute: a local cluster's workers need not share the launcher's directory.
    (On a remote cluster relative paths are left to the workers: `ray job submit --working-dir`.)"""
    from distswitch.data.beton import default_dir

    data = cfg.data
    beton_dir = str(Path(data.beton_dir or default_dir(data.dataset)).expanduser().resolve())
    root = str(Path(data.root).expanduser().resolve()) if data.root else None
    return dataclasses.replace(cfg, data=dataclasses.replace(data, beton_dir=beton_dir, root=root))
