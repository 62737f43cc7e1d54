"""Latent Thought Models: the core library (model, inference, evaluation, FLOPs).

The names below load on first use (PEP 562): `import ltm`, or a light part of it (`ltm.names`,
`ltm.config`, `ltm.signals`), costs no torch import, so a command's --help answers at once, a command
installs its signal handlers before torch loads, and `python -m ltm.kl_floor` finds its module not yet
imported."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "ltm.config", "DataConfig": "ltm.config", "InferenceConfig": "ltm.config",
    "ModelConfig": "ltm.config", "model_preset": "ltm.config",
    "LatentThoughtModel": "ltm.model", "build_model": "ltm.model", "Posterior": "ltm.posterior",
    "infer_posterior": "ltm.posterior", "evaluate_bounds": "ltm.evaluate", "sequence_bounds": "ltm.evaluate",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ltm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
