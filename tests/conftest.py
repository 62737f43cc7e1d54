import pytest
import torch

import ltm


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
