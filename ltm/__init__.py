"""Latent Thought Models: the core library (model, inference, evaluation, FLOPs)."""

from ltm.config import ConfigError, DataConfig, InferenceConfig, ModelConfig, model_preset
from ltm.evaluate import evaluate_bounds, sequence_bounds
from ltm.model import LatentThoughtModel, build_model
from ltm.posterior import Posterior, infer_posterior

__all__ = [
    "ConfigError", "DataConfig", "InferenceConfig", "ModelConfig", "model_preset",
    "LatentThoughtModel", "build_model", "Posterior", "infer_posterior",
    "evaluate_bounds", "sequence_bounds",
]
