"""What crosses a process boundary between the driver, the backends and the point workers.

Typed here, serialised only at the boundary (`to_dict` / `from_dict`: JSON spec and result files,
submitit's pickles).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from ltm.names import Status
from studies.study import Task


@dataclass(frozen=True)
class CheckpointSource:
    """An evaluation of a checkpoint given with --checkpoint (`ltm.checkpoint.resolve`)."""

    checkpoint: str
    """The absolute checkpoint file or folder."""
    run_id: str | None = None
    """The training run that owns it; None when it is not in the store."""

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "run_id": self.run_id}


@dataclass(frozen=True)
class TrainSource:
    """An evaluation of a grid point's model, trained first (skipped when FINISHED, resumed when interrupted)."""

    train_key: str
    """The training point's run key."""

    def to_dict(self) -> dict:
        return {"train": True, "train_key": self.train_key}


Source = CheckpointSource | TrainSource
"""What an evaluation point evaluates."""


def source_from_dict(data: dict) -> Source:
    """The source a `to_dict` wrote."""
    if data.get("train"):
        return TrainSource(data["train_key"])
    return CheckpointSource(data["checkpoint"], data.get("run_id"))


@dataclass(frozen=True)
class Point:
    """One grid point: a training run (config), or an evaluation task on a checkpoint."""

    key: str
    """The run key of a training point; the evaluation's key (checkpoint identity + task) otherwise."""
    config: dict
    """The run config (`RunConfig.to_dict()`)."""
    label: dict
    """The grid's overrides that made this point, for tables."""
    task: Task | None = None
    """An evaluation task (`studies.study.Task`, run by `studies.tasks`), or None for a training point."""
    source: Source | None = None
    """An evaluation's checkpoint: one given, or the training point's model."""
    stop: int | None = None
    """A trunk segment (`studies.points`): the tokens where it stops its trunk run, which other segments share
    (train.tokens is not part of a trunk's key); None: the point is its run's whole budget."""
    after: tuple[str, ...] = ()
    """The ids of the points that must be done before this one starts (a segment's previous segment, a
    branch's segment): the backends start it only after them (`studies.order`)."""
    resumes: int = 0
    """Tokens its run has trained before this point starts (a segment: the previous segment's stop; a branch:
    its branch point, trained by its trunk): what the point trains is its budget less these."""

    @property
    def id(self) -> str:
        """The point's identity in a study: its run key, with the stop tokens of a trunk segment ("<key>@<stop>")."""
        return self.key if self.stop is None else f"{self.key}@{self.stop}"

    def to_dict(self) -> dict:
        return {"key": self.key, "config": self.config, "label": self.label,
                "task": self.task.to_dict() if self.task else None,
                "source": self.source.to_dict() if self.source else None,
                "stop": self.stop, "after": list(self.after), "resumes": self.resumes}

    @classmethod
    def from_dict(cls, data: dict) -> "Point":
        task, source = data.get("task"), data.get("source")
        return cls(key=data["key"], config=data["config"], label=data["label"],
                   task=Task.from_dict(task) if task else None, source=source_from_dict(source) if source else None,
                   stop=data.get("stop"), after=tuple(data.get("after", ())), resumes=data.get("resumes", 0))


@dataclass(frozen=True)
class TrialContext:
    """What every point of a study needs besides its own spec (absolute paths; never a password:
    a trial reads `credentials_file`)."""

    tracking_uri: str
    experiment: str
    runs_dir: str
    parent_run_id: str | None
    tags: dict = field(default_factory=dict)
    cpus: float = 1
    credentials_file: str | None = None
    driver: str = ""
    """The study driver that started the trial (`studies.interrupt.driver_id`), recorded in its run locks."""
    log_level: int = logging.INFO
    """The level of the messages a trial's process shows (the study's -v/-q, `ltm.cli.log_level`): the process
    that runs the point configures its logging with it (`ltm.cli.configure_logging`)."""
    verify: bool = True
    """Check each checkpoint's sha256 before it is read (`ltm.checkpoint.verify_checksum`); False: --no-verify."""

    @property
    def threads(self) -> int:
        """torch threads of a trial: its whole CPUs, at least one."""
        return max(1, int(self.cpus))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrialContext":
        return cls(**data)


@dataclass(frozen=True)
class Result:
    """How a point ended, its MLflow run and its final metrics."""

    status: Status
    run_id: str | None = None
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "status": self.status.value}

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        return cls(**{**data, "status": Status(data["status"])})
