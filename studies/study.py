"""Declaring a study: named presets, each a base run recipe and a grid of override dicts, and the
evaluation tasks a preset may run on its checkpoints.

A study script is a `Study` and a call to `studies.launcher.main`; nothing here runs anything.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from ltm.config import ConfigError
from ltm.names import VAL_BOUND, VAL_PPL_BOUND, VAL_PPL_IW

RECIPE = "recipe"
"""A grid point's key naming its run recipe (`ltm.config.run_preset`) instead of the preset's base."""


class Task:
    """An evaluation run on each checkpoint of an evaluation study: one frozen dataclass per task, its
    arguments as fields, checked when made (ConfigError). As JSON (`to_dict`) it is {"name", arguments...}
    in the fields' order: an evaluation's run key hashes it, its MLflow params are its items."""

    name: ClassVar[str]
    positive: ClassVar[tuple[str, ...]] = ()
    """The arguments that must be positive integers."""

    def __post_init__(self) -> None:
        for key in self.positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"task {self.name}: {key} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict) -> Task:
        """The task a `to_dict` wrote; raises ConfigError on an unknown task or argument."""
        kind = TASKS.get(data.get("name"))
        if kind is None:
            raise ConfigError(f"unknown task {data.get('name')!r}; known: {', '.join(TASKS)}")
        args = {k: v for k, v in data.items() if k != "name"}
        unknown = set(args) - {f.name for f in dataclasses.fields(kind)}
        if unknown:
            raise ConfigError(f"task {kind.name}: unknown arguments {sorted(unknown)}")
        return kind(**args)

    def arguments(self) -> list[str]:
        """The task's argument names, in order (what --task KEY=VALUE may set)."""
        return [f.name for f in dataclasses.fields(self)]


@dataclass(frozen=True)
class Gsm8kTask(Task):
    """GSM8K in-context learning (`ltm.gsm8k`): k-shot accuracy, pass@k, on the test split."""

    name: ClassVar[str] = "gsm8k"
    positive: ClassVar[tuple[str, ...]] = ("pass_k", "problems", "max_new_tokens")
    data: str = "gsm8k"
    """The hub name gsm8k, or a folder with train.jsonl and test.jsonl."""
    shots: list[int] = field(default_factory=lambda: [0, 5, 10])
    """The shot counts, each scored."""
    shots_from: str = "train"
    """The split the shots are drawn from: train, or test (the paper's choice)."""
    pass_k: int = 5
    """Independent inferences per problem (an AR decodes once)."""
    problems: int = 1319
    """Test problems scored, from the first."""
    max_new_tokens: int = 50
    steps: int | None = None
    """The inference steps; None: the checkpoint's."""
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.shots or any(not isinstance(k, int) or k < 0 for k in self.shots):
            raise ConfigError(f"task gsm8k: shots must be a list of integers >= 0, got {self.shots!r}")
        if self.shots_from not in ("train", "test"):
            raise ConfigError(f"task gsm8k: shots_from must be train or test, got {self.shots_from!r}")


@dataclass(frozen=True)
class ZeroShotTask(Task):
    """Zero-shot perplexity bounds (`ltm.downstream`) on corpora the checkpoint was not trained on."""

    name: ClassVar[str] = "zero_shot"
    positive: ClassVar[tuple[str, ...]] = ("max_blocks",)
    corpora: list[str] = field(default_factory=lambda: ["wikitext", "ptb", "lambada", "lm1b"])
    """Hub corpora (their test splits) or local files."""
    max_blocks: int = 64
    """Blocks scored per corpus, from the first."""
    iw_samples: int = 8
    """Samples of the importance-weighted bound."""
    steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.corpora:
            raise ConfigError("task zero_shot: corpora is empty; name hub corpora or local files")


@dataclass(frozen=True)
class GenerationTask(Task):
    """Unconditional samples over prior temperatures and continuations of validation prefixes."""

    name: ClassVar[str] = "generation"
    positive: ClassVar[tuple[str, ...]] = ("samples", "length", "prefix")
    samples: int = 16
    length: int = 96
    """Generated tokens per sample."""
    prefix: int = 32
    """Tokens of each validation block that a continuation starts from."""
    prior_temperatures: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])
    top_p: float | None = None
    reference: str | None = None
    """A checkpoint (path or training run id) whose perplexity of the samples is gen_ppl."""
    steps: int | None = None
    seed: int = 0


TASKS: dict[str, type[Task]] = {t.name: t for t in (Gsm8kTask, ZeroShotTask, GenerationTask)}


@dataclass(frozen=True)
class Preset:
    """One size of a study: a base run preset, the grid as override dicts, resources per trial."""

    base: str
    """A run preset: a key of `ltm.config.RUN_PRESETS` (`python -m ltm.train --help` lists them)."""
    points: list[dict]
    """One dict of dotted-key overrides per grid point (see `grid`); "recipe": NAME takes that run
    recipe for the point instead of `base` (LTM-S/M/L are the recipes ltm-s, ltm-m, ltm-l)."""
    description: str = ""
    cpus: float = 1
    """CPUs per trial (Ray resources; SLURM cpus_per_task when the profile does not say)."""
    gpus: float = 0
    """GPUs per trial; fractional values share a GPU between Ray trials."""
    profile: str = "local"
    """Default SLURM profile (slurm/profiles/<name>.yaml)."""
    task: Task | None = None
    """An evaluation (`Gsm8kTask`, `ZeroShotTask`, `GenerationTask`; run by `studies.tasks`) on each
    point's checkpoint, or on the checkpoints given with --checkpoint; None: the points are training runs."""


@dataclass(frozen=True)
class Study:
    """A named study: presets of grids over the paper's axes."""

    name: str
    description: str
    presets: dict[str, Preset]
    default_preset: str = "micro"
    summary_metrics: tuple[str, ...] = (VAL_BOUND, VAL_PPL_BOUND, VAL_PPL_IW)
    """Final metrics shown in the summary table (shell-style patterns, e.g. "gsm8k/*/pass*"); the first that the
    points have is the study's headline, drawn and logged on its parent run (`studies.report`)."""
    data_option: Callable[[str], tuple[dict, dict]] | None = None
    """How --data applies: (config overrides, task overrides); None: it sets data.name."""
    check: Callable[[list], None] | None = None
    """Raises ConfigError, saying what to change, when the planned points (`studies.messages.Point`, after --set
    and --data) cannot answer the study's question (a ladder with too few sizes to fit); before anything runs."""


def grid(*axes: dict[str, list], common: dict | None = None) -> list[dict]:
    """The product of axes; each axis maps dotted keys to equally long value lists (zipped).

    grid({"inference.steps": [1, 4]}, {"model.n_latents": [4, 16]}) -> 4 points;
    grid({"model.kind": ["ar", "ltm"], "inference.steps": [0, 16]}) -> 2 points (zipped).
    """
    options = []
    for axis in axes:
        lengths = {len(v) for v in axis.values()}
        if len(lengths) != 1:
            raise ValueError(f"the lists of one axis must have equal lengths, got {axis}")
        options.append([dict(zip(axis, values)) for values in zip(*axis.values())])
    return [{**(common or {}), **{k: v for part in combo for k, v in part.items()}}
            for combo in itertools.product(*options)]
