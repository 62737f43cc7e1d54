"""The checkpoint format: a run's folder of checkpoints, its config, and finding the one to load.

A run's folder (<runs>/checkpoints/<run key>) holds ckpt-<tokens>.pt files, each with its sha256
in ckpt-<tokens>.sha256, and config.json. Checkpoints hold tensors and plain Python values only,
so they load with weights_only=True and a checkpoint file can never run code (numpy's RNG state
is stored as a list for that reason). Every file is written through a temporary and a rename, so a
reader sees the old file or the new one. The checkpoint a run folder stands for is the newest one
whose checksum verifies (`latest_verified`): resuming, loading and planning an evaluation all
take that one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ltm.config import ConfigError, ModelConfig, RunConfig
from ltm.model import LatentThoughtModel, build_model
from ltm.names import ROLE_EVAL, ROLE_TAG, RUN_KEY_TAG

CONFIG_FILE = "config.json"
"""Beside the checkpoints: the run's config as plain JSON, readable without loading a checkpoint."""


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


def _load(path: Path, device: str | torch.device = "cpu") -> dict:
    """A checkpoint's state, unpickling only tensors and plain values (never arbitrary objects).

    The model's tensors go to `device`; everything else stays on the CPU whatever the device: the RNG
    states must (torch.set_rng_state takes a CPU ByteTensor), and optimizer.load_state_dict moves the
    optimiser's state to its parameters' device itself, by its own rules (a step count stays on the CPU
    unless the optimiser is fused)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "model" in state and torch.device(device).type != "cpu":
        state["model"] = {name: t.to(device) for name, t in state["model"].items()}
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomically(path: Path, write) -> None:
    """Write through <name>.<pid>.tmp, then rename: readers see the old file or the new one, and a
    failed write (a full disk) leaves nothing behind."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def remove_checkpoints(run_dir: Path) -> None:
    """Delete every checkpoint of the run (a run started afresh)."""
    for path in checkpoints(run_dir):
        _remove(path)


def save_checkpoint(run_dir: Path, state: dict, keep: int = 2) -> Path:
    """Write ckpt-<tokens>.pt atomically with its sha256 beside it; keep the newest `keep`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"ckpt-{state['tokens']:015d}.pt"
    try:
        _write_atomically(path, lambda f: torch.save(state, f))
    except OSError as err:
        raise OSError(f"cannot write checkpoint {path} ({err.strerror or err}); free space in {run_dir.parent} "
                      "and run the same command again: it resumes from the previous checkpoint") from err
    digest = _sha256(path).encode()
    _write_atomically(path.with_suffix(".sha256"), lambda f: f.write(digest))
    for old in checkpoints(run_dir)[:-keep]:
        _remove(old)
    return path


def _corrupt(path: Path, err: object) -> None:
    warnings.warn(f"checkpoint {path} is corrupt ({err}); falling back to the previous one", stacklevel=3)


def _verified(run_dir: Path) -> Iterator[Path]:
    """The run's checkpoints whose checksum verifies, newest first; a corrupt one is skipped with a warning."""
    for path in reversed(checkpoints(run_dir)):
        sidecar = path.with_suffix(".sha256")
        try:
            ok, err = sidecar.exists() and sidecar.read_text().strip() == _sha256(path), "checksum mismatch"
        except Exception as error:  # an unreadable file or sidecar
            ok, err = False, error
        if ok:
            yield path
        else:
            _corrupt(path, err)


def latest_verified(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run whose checksum verifies: the one `load_latest_checkpoint` loads,
    unless unpickling it fails (a file that would run code), and so the one `resolve` names."""
    return next(_verified(run_dir), None)


def load_latest_checkpoint(run_dir: Path, device: str | torch.device = "cpu") -> dict | None:
    """The state of the newest checkpoint whose checksum verifies (the model's tensors on `device`, the
    rest on the CPU: see `_load`); a corrupt one is skipped with a warning."""
    for path in _verified(run_dir):
        try:
            return _load(path, device)
        except Exception as err:  # verified but unreadable (a file that would run code): the previous one
            _corrupt(path, err)
    return None


def write_run_config(run_dir: Path, cfg: RunConfig, model_cfg: ModelConfig, run_id: str) -> None:
    """<run dir>/config.json: the run config, its key, MLflow run and the vocabulary taken from the data."""
    run_dir.mkdir(parents=True, exist_ok=True)
    blob = json.dumps({"run_key": cfg.run_key(), "run_id": run_id, "config": cfg.to_dict(),
                       "model_overrides": {"vocab_size": model_cfg.vocab_size}}, indent=1).encode()
    _write_atomically(run_dir / CONFIG_FILE, lambda f: f.write(blob))


def read_config(checkpoint: Path) -> dict:
    """The run config (a dict) of a checkpoint file: from the config.json beside it, so nothing is
    unpickled, else from the file itself (a checkpoint copied on its own: tensors and plain values only)."""
    beside = checkpoint.parent / CONFIG_FILE
    if beside.is_file():
        return json.loads(beside.read_text())["config"]
    return _load(checkpoint)["config"]


def load_model(path: str | Path, device: str = "cpu") -> tuple[LatentThoughtModel, RunConfig]:
    """A trained model and its run config, from a checkpoint file or a run's checkpoint folder."""
    path = Path(path)
    state = load_latest_checkpoint(path, device) if path.is_dir() else _load(path, device)
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint in {path}")
    cfg = RunConfig.from_dict(state["config"])
    model = build_model(ModelConfig(**{**dataclasses.asdict(cfg.model), **state["model_overrides"]})).to(device)
    model.load_state_dict(state["model"])
    return model, cfg


def resolve(ref: str, tracking_uri: str, runs_dir: str | Path) -> dict:
    """What a checkpoint reference (a file, a run's folder or a training run's MLflow id) names, without
    loading a model: {checkpoint: the absolute file or folder, run_id: its training run (None when not
    in the store), config: the run config as a dict, identity: "<file>:<size>" of the checkpoint
    `load_model` loads}. Raises ConfigError when there is none.
    """
    path = Path(ref).expanduser()
    run_id = None
    if not path.exists():
        from mlflow.tracking import MlflowClient

        from ltm.tracking import redact

        try:
            run = MlflowClient(tracking_uri).get_run(ref)
        except Exception:
            raise ConfigError(f"--checkpoint {ref!r} is neither a checkpoint file or folder nor a run id in "
                              f"{redact(tracking_uri)}; pass a path like runs/checkpoints/<key> or a training run's id") from None
        path = Path(runs_dir) / "checkpoints" / str(run.data.tags.get(RUN_KEY_TAG))
        if run.data.tags.get(ROLE_TAG) == ROLE_EVAL or not checkpoints(path):
            raise ConfigError(f"run {ref} has no checkpoint under {path}; pass the checkpoint path instead, or "
                              "--runs-dir of the study that trained it")
        run_id = ref
    if path.is_dir():
        if not checkpoints(path):
            raise ConfigError(f"no checkpoint (ckpt-*.pt) in {path}")
        file = latest_verified(path)
        if file is None:
            raise ConfigError(f"no checkpoint in {path} matches its checksum (.sha256); all are corrupt")
    else:
        file = path
    config = read_config(file)
    if run_id is None:
        run_id = _training_run(tracking_uri, RunConfig.from_dict(config).run_key())
    return {"checkpoint": str(path.resolve()), "run_id": run_id, "config": config,
            "identity": f"{file.resolve()}:{file.stat().st_size}"}


def _training_run(tracking_uri: str, run_key: str) -> str | None:
    """The id of the training run with this run key in the store, if it is there."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1,
                              order_by=["attributes.start_time DESC"]) if experiments else []
    return runs[0].info.run_id if runs else None
