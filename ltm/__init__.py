"""Latent Thought Models: the core library (model, inference, evaluation, FLOPs).

The names below load on first use: `import ltm.signals` (or `python -m ltm.train`, which imports this
package first) must not wait for torch before a command has installed its signal handlers.
"""

import importlib

_EXPORTS = {
    "ConfigError": "ltm.config", "DataConfig": "ltm.config", "InferenceConfig": "ltm.config",
    "ModelConfig": "ltm.config", "model_preset": "ltm.config",
    "LatentThoughtModel": "ltm.model", "build_model": "ltm.model",
    "Posterior": "ltm.posterior", "infer_posterior": "ltm.posterior",
    "evaluate_bounds": "ltm.evaluate", "sequence_bounds": "ltm.evaluate",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ltm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
