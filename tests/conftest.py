from pathlib import Path

import pytest
import torch

import ltm
from ltm.data import DataNotFoundError
from ltm.data.paths import data_path


@pytest.fixture(scope="session")
def local_data():
    """`local_data("gsm8k")`: that file or folder of the local data sets ($LTM_DATA_DIR, `ltm.data.paths`);
    the test skips, naming the variable and the path, where it is absent (a clone without the team's copy)."""
    def find(name: str) -> Path:
        try:
            return data_path(name)
        except DataNotFoundError as e:
            pytest.skip(str(e))
    return find


@pytest.fixture
def smoke_cfg() -> ltm.ModelConfig:
    return ltm.model_preset("smoke")


@pytest.fixture
def smoke_model(smoke_cfg) -> ltm.LatentThoughtModel:
    torch.manual_seed(0)
    return ltm.build_model(smoke_cfg)


@pytest.fixture
def tokens(smoke_cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, smoke_cfg.vocab_size, (3, smoke_cfg.ctx + 1), generator=g)


@pytest.fixture
def stub_checkpoint():
    """Makes a `Checkpoint` of nothing but what a test of the checkpoint files sets (tokens, and any field)."""
    from ltm.checkpoint import Checkpoint

    def make(tokens: int, **fields) -> Checkpoint:
        return Checkpoint(**{"model": {}, "optimizer": {}, "step": 0, "samples": 0, "tokens": tokens, "run_id": "",
                             "config": {}, "model_overrides": {}, "rng": {}, **fields})
    return make


@pytest.fixture(autouse=True)
def _logging_as_imported():
    """Every test starts with the library's logging unconfigured, as a program that imports `ltm` finds it: a
    command an earlier test ran (`ltm.cli.configure_logging`) does not decide what this one shows."""
    import logging

    from ltm import cli

    yield
    for name in cli.LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.NOTSET)
        logger.removeHandler(cli._HANDLER)
    logging.captureWarnings(False)
