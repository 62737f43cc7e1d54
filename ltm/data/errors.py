"""Errors for bad data input; each message says what to change."""

from ltm.config import ConfigError


class DataError(ConfigError):
    """Data that cannot be used as configured (unknown name, empty or too short corpus, ...)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file, folder or tokenizer that does not exist where it was looked for."""
