"""The checkpoint format: a run's folder of checkpoints, its config, and finding the one to load.

A run's folder holds ckpt-<tokens>.pt files, each with its sha256 in ckpt-<tokens>.sha256, and
config.json; a constant-rate trunk's also at-<tokens>.pt snapshots where it stopped (its branch points).
A folder belongs to exactly one MLflow run, its owner (the run id in its config.json
and in every checkpoint): the first run of a run key gets <runs>/checkpoints/<run key>, any other
run of the same key (another experiment or store sharing the runs folder, a --force rerun) gets
<run key>.<run id> (`run_folder`). Nothing removes or resumes from a folder another run owns.
Checkpoints hold tensors and plain Python values only, so they load with weights_only=True and a
checkpoint file can never run code (numpy's RNG state is stored as a list for that reason). Every
file is written through a temporary and a rename, so a reader sees the old file or the new one. The
checkpoint a run folder stands for is the newest one whose checksum verifies (`latest_verified`):
resuming, loading and planning an evaluation all take that one. Every read of a checkpoint file goes
through one door, `verify_checksum`: a file that does not match its .sha256 is refused (a folder falls
back past it), one without a .sha256 (a .pt copied alone) is read with a warning, and `verify=False`
(the commands' --no-verify) reads any with a warning of what that risks.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ltm.cli import UNVERIFIED_RISK
from ltm.config import ConfigError, ModelConfig, RunConfig
from ltm.files import atomic_file, atomic_write, free_space, no_space
from ltm.model import LatentThoughtModel, build_model
from ltm.names import ROLE_EVAL, ROLE_TAG, RUN_KEY_TAG, TOKENS, Status
from ltm.paths import folder_name

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
"""Beside the checkpoints: the run's config as plain JSON, readable without loading a checkpoint."""


_UNVERIFIED: set[Path] = set()
"""Checkpoint files this process has warned it reads unverified."""


class CheckpointError(ConfigError):
    """A checkpoint file refused: it does not match its .sha256, or it cannot be read (truncated, damaged,
    not a checkpoint of this suite, or one that would run code). A ConfigError: commands exit 2 with it."""


@dataclass(frozen=True)
class Checkpoint:
    """A training loop's saved state: what a run resumes from and a trained model is rebuilt from."""

    model: dict[str, torch.Tensor]
    """The model's state_dict."""
    optimizer: dict
    """The optimiser's state_dict."""
    step: int
    """Updates done."""
    samples: int
    """Training sequences consumed."""
    tokens: int
    """Training tokens consumed: the file's name (ckpt-<tokens>.pt)."""
    run_id: str
    """The MLflow run that wrote it (the folder's owner)."""
    config: dict
    """The run config as `RunConfig.to_dict()` wrote it: a dict, so a resume never depends on parsing it."""
    model_overrides: dict
    """ModelConfig fields taken from the data (vocab_size)."""
    rng: dict
    """torch's, numpy's and Python's RNG states (`rng_state`)."""
    run_key: str | None = None
    """The run's key (None: not recorded)."""
    eval_pending: bool = False
    """A signal stopped the evaluation at this step: it is done first on resume (absent in older files)."""
    unsent_metrics: list[list] = field(default_factory=list)
    """Metrics logged but not yet stored when it was written (`Tracker.unsent`; absent in older files)."""
    start_tokens: int = 0
    """Tokens the run started from: a wsd branch's branch point (its trunk trained them), else 0."""

    def to_dict(self) -> dict:
        """The file's content: tensors and plain values only, so it loads with weights_only=True."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # not asdict: it copies tensors

    @classmethod
    def from_dict(cls, data: dict) -> Checkpoint:
        """The checkpoint a file holds (any version's: a key added later takes its default, one unknown
        is ignored); ValueError when a key every version writes is missing."""
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ValueError(f"not a checkpoint of this suite: it has no {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})


@dataclass(frozen=True)
class CheckpointRef:
    """What a checkpoint reference names (`resolve`), found without loading a model."""

    checkpoint: str
    """The absolute checkpoint file or folder."""
    run_id: str | None
    """The training run that owns it; None when it is not in the store."""
    config: dict
    """Its run config as a dict (`RunConfig.to_dict()`), as an evaluation point carries it."""
    identity: str
    """"<file>:<size>" of the checkpoint `load_model` loads: what an evaluation's run key hashes."""


def rng_state() -> dict:
    """torch's, numpy's and Python's global RNG states, as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
            "python": random.getstate()}


def restore_rng(state: dict) -> None:
    """Set the global RNGs to a state from `rng_state`."""
    name, keys, pos, has_gauss, gauss = state["numpy"]
    torch.set_rng_state(state["torch"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def verify_checksum(path: Path, verify: bool = True) -> Path:
    """The one door of every checkpoint read: `path`, once its sha256 matches the .sha256 beside it.

    A mismatch raises CheckpointError naming the file and both hashes. A file without a .sha256 (a .pt
    copied alone), or any file when `verify` is False (--no-verify), is read unverified with a warning."""
    sidecar = path.with_suffix(".sha256")
    if not verify or not sidecar.exists():
        if path.resolve() not in _UNVERIFIED:  # once: a command reads a file when it plans and when it loads
            _UNVERIFIED.add(path.resolve())
            why = "without checking its sha256 (--no-verify)" if not verify else \
                f"unverified: it has no checksum file {sidecar.name} beside it"
            log.warning("checkpoint %s is read %s; %s", path, why, UNVERIFIED_RISK)
        return path
    try:
        expected, actual = sidecar.read_text().strip(), _sha256(path)
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read checkpoint {path} or its checksum file {sidecar.name}: {err}") from err
    if expected != actual:
        raise CheckpointError(f"checkpoint {path} does not match its checksum file {sidecar.name}: expected sha256 "
                              f"{expected}, actual {actual}; the file changed after it was written (corrupt or "
                              "tampered). Use another checkpoint, or pass --no-verify to read it anyway (its numbers "
                              "may be wrong)")
    return path


def _read(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint file's state, unpickling only tensors and plain values (never arbitrary objects); raises
    CheckpointError, naming the file, when it cannot be read. Its checksum must have been checked already.

    The model's tensors go to `device`; everything else stays on the CPU whatever the device: the RNG
    states must (torch.set_rng_state takes a CPU ByteTensor), and optimizer.load_state_dict moves the
    optimiser's state to its parameters' device itself, by its own rules (a step count stays on the CPU
    unless the optimiser is fused)."""
    try:
        state = Checkpoint.from_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # truncated (torch's PytorchStreamReader), unpicklable, not a checkpoint
        text = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:300]  # torch's first words
        raise CheckpointError(f"cannot read checkpoint {path}: {text}; the file is corrupt (truncated or damaged) or "
                              "not a checkpoint of this suite: pass another checkpoint of the run (its folder takes "
                              "the newest good one), or train it again") from err
    if torch.device(device).type != "cpu":
        state = dataclasses.replace(state, model={name: t.to(device) for name, t in state.model.items()})
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of writers that died mid-write (only for the holder of the run's lock)."""
    for tmp in run_dir.glob("*.tmp") if run_dir.is_dir() else []:
        tmp.unlink(missing_ok=True)


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first."""
    return sorted(run_dir.glob("ckpt-*.pt")) if run_dir.is_dir() else []


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(".sha256").unlink(missing_ok=True)


def owner(run_dir: Path) -> str | None:
    """The MLflow run id whose checkpoints the folder holds (from config.json, else from its newest
    readable checkpoint); None when it holds no checkpoint, "" when nothing in it names a run."""
    if not checkpoints(run_dir):
        return None
    try:
        return str(json.loads((run_dir / CONFIG_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError):
        pass
    for path in reversed(checkpoints(run_dir)):
        try:
            return str(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["run_id"])
        except Exception:  # corrupt, or not a checkpoint of this suite
            continue
    return ""


def run_folder(runs_dir: str | Path, key: str, run_id: str) -> Path:
    """The checkpoint folder of MLflow run `run_id` of run key `key`: <runs>/checkpoints/<key> when the
    run owns it (or nobody does yet: it holds no checkpoint), else <runs>/checkpoints/<key>.<run_id>. Both are
    data (a key may come from a store's tag): `folder_name` keeps their folder inside <runs>/checkpoints."""
    base = Path(runs_dir) / "checkpoints" / folder_name(key, "run key")
    own = base.with_name(folder_name(f"{key}.{run_id}", "run key"))
    held_by = owner(base)
    if held_by == run_id:
        return base
    return own if checkpoints(own) or held_by is not None else base


def key_folders(runs_dir: str | Path, key: str) -> list[Path]:
    """Every checkpoint folder of run key `key` that holds a checkpoint: the key's own and per-run ones."""
    root, key = Path(runs_dir) / "checkpoints", folder_name(key, "run key")
    return [f for f in [root / key, *sorted(root.glob(f"{key}.*"))] if checkpoints(f)]


def save_checkpoint(run_dir: Path, state: Checkpoint, keep: int = 2) -> Path:
    """Write ckpt-<tokens>.pt atomically with its sha256 beside it; keep the newest `keep`."""
    path = _write(run_dir / f"ckpt-{state.tokens:015d}.pt", state)
    for old in checkpoints(run_dir)[:-keep]:
        _remove(old)
    return path


def snapshot_name(tokens: int) -> str:
    """A trunk's snapshot at `tokens` (a branch point): at-<tokens>.pt beside its checkpoints, never pruned."""
    return f"at-{tokens:015d}.pt"


def save_snapshot(run_dir: Path, state: Checkpoint) -> Path:
    """A constant-rate trunk's named, checksummed state where it stopped (at-<tokens>.pt, with its .sha256):
    what the wsd branches at those tokens start from (`trunk_snapshot`)."""
    return _write(run_dir / snapshot_name(state.tokens), state)


def trunk_snapshot(runs_dir: str | Path, cfg: RunConfig) -> Path:
    """Where the start of wsd run `cfg` lives: its trunk's snapshot at its branch point, in the folder of
    the trunk's run key that holds it (the key's own folder first), else where the key's own folder would
    hold it (the path need not exist)."""
    key, name = cfg.trunk().run_key(), snapshot_name(cfg.branch_point())
    found = [folder / name for folder in key_folders(runs_dir, key) if (folder / name).is_file()]
    return found[0] if found else Path(runs_dir) / "checkpoints" / folder_name(key, "run key") / name


def read_snapshot(path: Path, device: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """A trunk snapshot's state, through `verify_checksum` (CheckpointError naming the file when it does not
    match its .sha256 or cannot be read; `verify` False: unchecked, with a warning)."""
    return _read(verify_checksum(path, verify), device)


def _write(path: Path, state: Checkpoint) -> Path:
    """`state` to `path` through a temporary and a rename, then its sha256 beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as f:
            torch.save(state.to_dict(), f)
        digest = _sha256(path).encode()
        atomic_write(path.with_suffix(".sha256"), digest)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        _remove(path)
        raise OSError(f"cannot write checkpoint {path}: {_write_error(err)}; {free_space(path.parent)} free on its "
                      "disk. Free space (or raise the file size limit) and run the same command again: it resumes "
                      "from the previous checkpoint") from err
    return path


def _write_error(err: BaseException) -> str:
    """What went wrong writing a file, in words: errno's name where there is one, a full disk named as one
    whatever the writer's own text (torch.save's "unexpected pos")."""
    if no_space(err):
        return f"{os.strerror(errno.ENOSPC)} (errno ENOSPC)"
    if isinstance(err, OSError) and err.errno is not None:
        return f"{err.strerror or os.strerror(err.errno)} (errno {errno.errorcode.get(err.errno, err.errno)})"
    return f"{type(err).__name__}: {str(err).strip()[:200]}"


def _corrupt(reason: object) -> None:
    warnings.warn(f"{reason}; falling back to the previous one", stacklevel=3)


def _verified(run_dir: Path, verify: bool = True, skipped: list[str] | None = None) -> Iterator[Path]:
    """The run's checkpoints that `verify_checksum` passes, newest first; one that it refuses, or without
    its .sha256 (a save that stopped before writing it), is skipped with a warning, its reason appended
    to `skipped`. `verify` False: all of them."""
    for path in reversed(checkpoints(run_dir)):
        sidecar = path.with_suffix(".sha256")
        try:
            if verify and not sidecar.exists():
                raise CheckpointError(f"checkpoint {path} is corrupt: its checksum file {sidecar.name} is missing")
            usable = verify_checksum(path, verify)
        except CheckpointError as err:
            _corrupt(err)
            if skipped is not None:
                skipped.append(str(err))
            continue
        yield usable


def latest_verified(run_dir: Path, verify: bool = True, skipped: list[str] | None = None) -> Path | None:
    """The newest checkpoint of the run whose checksum verifies (`_verified`: why newer ones were skipped
    goes to `skipped`): the one `load_latest_checkpoint` loads, unless unpickling it fails (a file that
    would run code), and so the one `resolve` names."""
    return next(_verified(run_dir, verify, skipped), None)


def load_latest_checkpoint(run_dir: Path, device: str | torch.device = "cpu",
                           run_id: str | None = None, verify: bool = True) -> Checkpoint | None:
    """The state of the newest checkpoint whose checksum verifies (the model's tensors on `device`, the
    rest on the CPU: see `_read`) and, given `run_id`, that this MLflow run wrote; one that does not is
    skipped with a warning. `verify` False (--no-verify): the newest readable one, unchecked."""
    for path in _verified(run_dir, verify):
        try:
            state = _read(path, device)
        except CheckpointError as err:  # verified but unreadable (a file that would run code, not a checkpoint)
            _corrupt(err)
            continue
        if run_id is None or state.run_id == run_id:
            return state
        warnings.warn(f"checkpoint {path} was written by MLflow run {state.run_id}, not by run {run_id}; "
                      "skipped", stacklevel=2)
    return None


def write_run_config(run_dir: Path, cfg: RunConfig, model_cfg: ModelConfig, run_id: str) -> None:
    """<run dir>/config.json: the run config, its key, MLflow run and the vocabulary taken from the data."""
    run_dir.mkdir(parents=True, exist_ok=True)
    blob = json.dumps({"run_key": cfg.run_key(), "run_id": run_id, "config": cfg.to_dict(),
                       "model_overrides": {"vocab_size": model_cfg.vocab_size}}, indent=1).encode()
    atomic_write(run_dir / CONFIG_FILE, blob)


def read_config(checkpoint: Path) -> dict:
    """The run config (a dict) of a checkpoint file `verify_checksum` passed: from the config.json beside
    it, so nothing is unpickled, else from the file itself (a checkpoint copied on its own: tensors and
    plain values only)."""
    beside = checkpoint.parent / CONFIG_FILE
    if beside.is_file():
        return json.loads(beside.read_text())["config"]
    return _read(checkpoint).config


def load_model(path: str | Path, device: str = "cpu", verify: bool = True) -> tuple[LatentThoughtModel, RunConfig]:
    """A trained model and its run config, from a checkpoint file or a run's checkpoint folder; raises
    CheckpointError when the file does not match its .sha256 (`verify_checksum`; `verify` False: read
    unchecked, with a warning) or cannot be read."""
    path = Path(path)
    if path.is_dir():
        state = load_latest_checkpoint(path, device, verify=verify)
    else:
        state = _read(verify_checksum(path, verify), device)
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint in {path}")
    cfg = RunConfig.from_dict(state.config)
    model = build_model(ModelConfig(**{**dataclasses.asdict(cfg.model), **state.model_overrides}),
                        cfg.inference).to(device)
    model.load_state_dict(state.model)
    return model, cfg


def resolve(ref: str, tracking_uri: str, runs_dir: str | Path, verify: bool = True) -> CheckpointRef:
    """What a checkpoint reference (a file, a run's folder, a run key with checkpoints under
    <runs_dir>/checkpoints, or a training run's MLflow id) names, without loading a model. The file it
    names passes `verify_checksum` (`verify` False: unchecked, with a warning). A folder stands for its
    run's final model: when that run FINISHED at more tokens than the folder's newest verified
    checkpoint holds, it is refused. Raises ConfigError (CheckpointError for a file that is refused).
    """
    path = Path(ref).expanduser()
    if not path.exists():
        path = _folder_of(ref, tracking_uri, Path(runs_dir))
    skipped: list[str] = []  # why newer checkpoints of a folder were passed over
    if path.is_dir():
        if not checkpoints(path):
            raise ConfigError(f"no checkpoint (ckpt-*.pt) in {path}")
        file = latest_verified(path, verify, skipped)
        if file is None:
            raise ConfigError(f"no checkpoint in {path} matches its checksum (.sha256); all are corrupt: "
                              + "; ".join(skipped))
    else:
        file = verify_checksum(path, verify)
    config = read_config(file)
    run = _stored_run(tracking_uri, owner(file.parent) or "")
    if run is not None and path.is_dir() and run.info.status == Status.FINISHED:
        final, held = int(run.data.metrics.get(TOKENS, 0)), _tokens_of(file)
        if held is not None and held < final:
            why = f" ({'; '.join(skipped)})" if skipped else ""
            raise ConfigError(f"{path} stands for MLflow run {run.info.run_id}, which FINISHED at {final:,} tokens, "
                              f"but its newest usable checkpoint holds {held:,}: the final checkpoint is missing or "
                              f"corrupt{why}; pass a checkpoint file to use {file.name} anyway")
    return CheckpointRef(checkpoint=str(path.resolve()), run_id=run.info.run_id if run is not None else None,
                         config=config, identity=f"{file.resolve()}:{file.stat().st_size}")


def _tokens_of(file: Path) -> int | None:
    """The tokens a checkpoint file holds, from its name (ckpt-<tokens>.pt)."""
    try:
        return int(file.stem.removeprefix("ckpt-"))
    except ValueError:
        return None


def _folder_of(ref: str, tracking_uri: str, runs_dir: Path) -> Path:
    """The checkpoint folder a run key or a training run's MLflow id names."""
    from ltm.tracking import redact

    folders = key_folders(runs_dir, ref) if ref and Path(ref).name == ref else []
    if len(folders) == 1:
        return folders[0]
    if folders:
        raise ConfigError(f"run key {ref} has checkpoints of {len(folders)} MLflow runs: "
                          f"{', '.join(str(f) for f in folders)}; pass the folder (or the MLflow run id) you mean")
    run = _stored_run(tracking_uri, ref)
    if run is None:
        raise ConfigError(f"checkpoint {ref!r} is neither a checkpoint file or folder, nor a run key with checkpoints "
                          f"under {runs_dir / 'checkpoints'}, nor a run id in {redact(tracking_uri)}; pass a path "
                          "like runs/checkpoints/<key>, or the --runs-dir of the study that trained it")
    path = run_folder(runs_dir, str(run.data.tags.get(RUN_KEY_TAG)), ref)
    if run.data.tags.get(ROLE_TAG) == ROLE_EVAL or owner(path) != ref:
        raise ConfigError(f"run {ref} has no checkpoint of its own under {runs_dir / 'checkpoints'}; pass the "
                          "checkpoint path instead, or --runs-dir of the study that trained it")
    return path


def _stored_run(tracking_uri: str, run_id: str):
    """The MLflow run with this id, or None (also when the store is a sqlite file that does not exist:
    looking must not create one)."""
    if not run_id or (tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).exists()):
        return None
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri).get_run(run_id)
    except Exception:
        return None
