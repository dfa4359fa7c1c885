"""One run as the driver sees it (`RunHandle`): its out_dir, its Ray storage and name, and its
MLflow run; opened before Ray starts, then failed or finished exactly once. `distswitch train`,
the search of `distswitch tune` and each of its trials all go through it.

The summary is written once, here: the worker's record from the final checkpoint, plus what only
the driver knows (where Ray stored that checkpoint, the MLflow run), then MLflow gets the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distswitch.checkpoint import collect_final
from distswitch.config import Config
from distswitch.io import write_json
from distswitch.summary import Summary


@dataclass(frozen=True)
class RunHandle:
    cfg: Config
    out: Path
    storage: str  # Ray Train's storage_path
    name: str  # Ray Train's run name: checkpoints live in <storage>/<name>
    uri: str | None = None  # MLflow tracking URI; None: tracking off
    run_id: str | None = None

    @classmethod
    def open(
        cls, cfg: Config, storage: str, name: str, run_key: str | None = None, parent: "RunHandle | None" = None
    ) -> "RunHandle":
        """The handle, with its MLflow run opened (or found again by `run_key`: a relaunch continues
        the same run) when tracking is on; a nested run under `parent`'s when given."""
        if not cfg.tracking.enabled:
            return cls(cfg, Path(cfg.out_dir), storage, name)
        from distswitch.tracking import open_run

        uri, run_id = open_run(
            cfg, run_key=run_key or f"{storage}/{name}", parent_run_id=parent.run_id if parent is not None else None
        )
        return cls(cfg, Path(cfg.out_dir), storage, name, uri, run_id)

    @property
    def tracking(self) -> tuple[str, str, str] | None:
        """(uri, run_id, out_dir) as plain data for the workers (rank 0 logs its epochs there, through
        an outbox in out_dir), or None."""
        return (self.uri, self.run_id, str(self.out.resolve())) if self.run_id is not None else None

    def fail(self, error: BaseException) -> None:
        """The MLflow run ends FAILED with the error (no-op without tracking)."""
        if self.run_id is not None:
            from distswitch.tracking import fail_run

            # Seconds at most: the run is ending on an error or a signal (the rest waits in the outbox).
            fail_run(self.uri, self.run_id, self.out, error, timeout=min(self.cfg.tracking.send_timeout, 10.0))

    def end(self) -> None:
        """The MLflow run ends FINISHED (a search's: its results are logged; no-op without tracking)."""
        if self.run_id is not None:
            from distswitch.tracking import end_run

            end_run(self.uri, self.run_id, self.out, timeout=self.cfg.tracking.send_timeout)

    def collect(self, result) -> Summary:
        """A finished Ray Train result's final checkpoint into out_dir (model, best.pt); returns
        its summary, completed with what only the driver knows, not yet written. A stop for good
        comes back as TrainingStopped, naming where its checkpoint is kept."""
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train finished without a final checkpoint; see {self.storage}/{self.name}")
        with result.checkpoint.as_directory() as folder:
            from distswitch.stop import Stop

            if (stopped := Stop.read(Path(folder))) is not None:  # the worker's stop for good, raised here
                raise stopped.exception(kept=result.checkpoint.path)
            collect_final(Path(folder), self.out, skip=("summary.json",))
            summary = Summary.read(Path(folder) / "summary.json")
        summary.checkpoint_path = str(result.checkpoint.path)  # known here only: where Ray stored it
        if not summary.git_sha:  # a worker without the repository (or git) next to its code
            from distswitch.tracking import git_sha

            summary.git_sha = git_sha()
        return summary

    def finish(self, summary: Summary) -> dict:
        """out_dir/summary.json written (once), then the MLflow run gets the results and ends
        FINISHED (FAILED if MLflow refuses them: a run never stays RUNNING; a server that is away
        gets them later, out of its outbox)."""
        if self.run_id is not None:
            from distswitch.tracking import experiment_name

            summary.mlflow = {"tracking_uri": self.uri, "run_id": self.run_id, "experiment": experiment_name(self.cfg)}
        data = summary.to_dict()
        write_json(self.out / "summary.json", data)
        if self.run_id is not None:
            from distswitch.tracking import finish_run

            try:
                finish_run(self.uri, self.run_id, self.out, data, timeout=self.cfg.tracking.send_timeout)
            except BaseException as exc:  # the results are on disk; the run must not stay RUNNING
                self.fail(exc)
                raise
        return data
