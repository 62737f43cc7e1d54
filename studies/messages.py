"""What crosses a process boundary between the driver, the backends and the point workers.

Typed here, serialised only at the boundary (`to_dict` / `from_dict`: JSON spec and result files,
submitit's pickles).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ltm.names import Status


@dataclass(frozen=True)
class Point:
    """One grid point: a training run (config), or an evaluation task on a checkpoint."""

    key: str
    """The run key of a training point; the evaluation's key (checkpoint identity + task) otherwise."""
    config: dict
    """The run config (`RunConfig.to_dict()`)."""
    label: dict
    """The grid's overrides that made this point, for tables."""
    task: dict | None = None
    """An evaluation task (`studies.tasks`), or None for a training point."""
    source: dict | None = None
    """An evaluation's checkpoint: {"checkpoint", "run_id"} or {"train": True, "train_key"}."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Point":
        return cls(**data)


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
