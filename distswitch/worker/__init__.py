"""The worker: one process of a run, on a Ray Train worker or in-process. It builds the parts,
resumes from the session's latest checkpoint, trains (the epoch's end in `callbacks.EpochEnd`),
then selects, tests and exports. It never imports the driver: they meet in the checkpoint format
and the loop config (plain data)."""

from distswitch.worker.session import RaySession, Session
from distswitch.worker.train import ray_main, train

__all__ = ["RaySession", "Session", "ray_main", "train"]
