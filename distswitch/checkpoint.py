"""The checkpoint format, shared by the worker (writes and resumes it) and the driver (reads the
final and stopped folders Ray hands back).

A checkpoint folder holds `state.pt` (a bundle: everything to continue after its epoch exactly as
if the run had not stopped), optionally `best.pt` (the selected epoch's bundle so far), when
training stopped for good `stopped.json` with the reason, and, written last, `manifest.json`
(`distswitch.manifest`): a resumed run uses the newest folder whose files match it, naming each
damaged one it skips. The final report's folder holds the
files `FINAL_FILES` maps into out_dir. Bundles hold tensors and plain values only: they load with
`weights_only=True`, and format 1 from before the package's redesign still resumes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from distswitch.config import Config, ConfigError
from distswitch.data import DatasetInfo
from distswitch.io import copy_file
from distswitch.manifest import CheckpointDamaged, damage, order

CHECKPOINT_FORMAT = "distswitch.ckpt/2"  # 2: layers by name, every folder sealed
# The final report's folder -> where its files land in out_dir.
FINAL_FILES = {
    "summary.json": "summary.json",
    "model.pt": "model.pt",
    "model.arch.json": "model.arch.json",
    "best.pt": "checkpoints/best.pt",
}
# Sections of the config a resumed run must share with its checkpoint (the rest may change, e.g. a
# lower learning rate after a stop).
RESUME_KEYS = ("model", "method", "switcher", "data")


@dataclass(frozen=True)
class Stored:
    """A checkpoint folder in the run's storage: its name, where it is (for messages) and how to get
    a local copy. `latest`: the one Ray Train would resume."""

    name: str
    where: str
    fetch: Callable[[], Path]
    latest: bool = False


def stored_in(folder: Path) -> list[Stored]:
    """The checkpoint folders directly under a folder on this machine's filesystem, read in place."""
    if not folder.is_dir():
        return []
    return [Stored(p.name, str(p), lambda p=p: p) for p in folder.iterdir() if p.is_dir() and order(p.name)]


def resume_order(stored: list[Stored]) -> list[Stored]:
    """The folders a run may resume from, newest first: the latest (Ray Train's, or the newest by
    name), then the older ones, newest epoch first."""
    ranked = sorted((s for s in stored if order(s.name) is not None), key=lambda s: order(s.name), reverse=True)
    latest = next((s for s in stored if s.latest), ranked[0] if ranked else None)
    if latest is None:
        return []
    top = order(latest.name)
    return [latest] + [s for s in ranked if s is not latest and (top is None or order(s.name)[0] <= top[0])]


def choose(stored: list[Stored], say: Callable[[str], None]) -> tuple[Stored, Path] | None:
    """The newest intact folder that holds a state, with its local copy; each damaged one passed
    over is said in one line. None if there is nothing to resume; CheckpointDamaged if there were
    checkpoints and none is intact."""
    damaged = []
    for candidate in resume_order(stored):
        folder = candidate.fetch()
        problem = verify(folder)
        if problem is not None:
            damaged.append(f"{candidate.where} ({problem})")
            say(f"the checkpoint {candidate.where} is damaged: {problem}; trying the previous one")
        elif (folder / "state.pt").is_file():
            return candidate, folder
        # else: intact and stateless (a stop before the first epoch checkpoint): look further back
    if damaged:
        raise CheckpointDamaged(
            f"no intact checkpoint to resume: {damaged[0]}"
            + (f" and {len(damaged) - 1} more are damaged" if len(damaged) > 1 else " is damaged")
            + "; remove them to start again, or pass another out_dir (or distributed.name)"
        )
    return None


def verify(folder: str | Path) -> str | None:
    """What is wrong with a checkpoint folder, in a few words; None if it is intact."""
    return damage(folder)


def bundle(
    cfg: Config,
    info: DatasetInfo,
    engine,
    epoch: int,
    steps_per_epoch: int,
    history: list,
    best: dict | None = None,
    rng: list[dict] | None = None,
) -> dict:
    """Everything a run needs to continue after `epoch` exactly as if it had not stopped: both
    networks, both optimisers and schedules (`engine.state_dict()`), the history (EpochStats), the
    selection so far and every worker's generators. The phase position follows from (epoch,
    steps_per_epoch): checkpoints are taken at epoch ends, and the data order is a function of
    (seed, epoch)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "data_info": asdict(info),
        "epoch": epoch,
        "steps_per_epoch": steps_per_epoch,
        "engine": engine.state_dict(),
        "history": [h.to_dict() for h in history],
        "best": dict(best) if best is not None else {"val_acc": -1.0, "epoch": None},
        "rng": rng,
    }


def read(path: str | Path) -> dict:
    """A checkpoint bundle with every tensor on the CPU, whatever device trained or resumes it:
    `load_state_dict` places model and optimiser state on the device, while RNG states must stay
    CPU ByteTensors (`torch.set_rng_state` refuses others) and optimiser step counters on the host
    (on a GPU each would cost a host sync per parameter per step)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def check_resumable(cfg: Config, state: dict, where) -> None:
    """A run resumes only a distswitch checkpoint of the same model, method, switcher and data."""
    found = state.get("format")
    if found != CHECKPOINT_FORMAT:
        what = (
            "was written by another version of distswitch"
            if str(found).startswith("distswitch.ckpt/")
            else "is not a distswitch checkpoint"
        )
        raise ConfigError(
            f"{where} {what} (format {found!r}; this version reads {CHECKPOINT_FORMAT!r}); "
            "use another distributed.name or storage_path"
        )
    old = Config.from_dict(state["config"])
    for key in RESUME_KEYS:
        if getattr(old, key) != getattr(cfg, key):
            raise ConfigError(
                f"{key}: differs from the checkpoint at {where} that this run would resume; "
                "use another distributed.name (or out_dir) for a new run"
            )


def rng_state() -> dict:
    """This process's generators (torch, numpy, python; CUDA where initialised)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Tensors and plain values only: checkpoints load with weights_only=True.
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng(states: list[dict] | None, rank: int) -> None:
    """This rank's generators as saved (rank 0's when the run had fewer workers); `states` as
    `read` gives them (on the CPU)."""
    if not states:
        return
    state = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def collect_final(folder: Path, out: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a final report's files into out_dir, each atomically (`skip`: names the caller writes)."""
    missing = [name for name in FINAL_FILES if not (Path(folder) / name).is_file()]
    if missing:
        raise RuntimeError(f"the final checkpoint {folder} lacks {', '.join(missing)}")
    for name, dest in FINAL_FILES.items():
        if name not in skip:
            copy_file(Path(folder) / name, Path(out) / dest)
