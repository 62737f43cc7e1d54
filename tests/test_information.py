"""What z carries (`ltm.evaluate.info_lower_bound`): zero for a decoder that ignores z, the known
information of a model whose posterior is exact, and never above the KL beyond its interval."""

import math

import pytest
import torch

import ltm
from ltm.evaluate import block_interval, evaluate_bounds, info_lower_bound


def gaussian_case(noise: float, dims: int, blocks: int = 4000, far: int = 15):
    """z ~ N(0, I), x = z + noise * e: the exact posterior is N(x / (1 + s^2), s^2 / (1 + s^2)), and
    I(x; z) = E KL(q(z | x) || p(z)) = dims / 2 * log(1 + 1 / s^2). Returns (own NLL, far NLLs, I)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(blocks, dims, generator=g, dtype=torch.float64)
    x = z + noise * torch.randn(blocks, dims, generator=g, dtype=torch.float64)
    shrink = 1 / (1 + noise ** 2)
    sample = x * shrink + (noise ** 2 * shrink) ** 0.5 * torch.randn(blocks, dims, generator=g, dtype=torch.float64)

    def nll(zz: torch.Tensor) -> torch.Tensor:
        return (0.5 * ((x - zz) / noise) ** 2).sum(-1) + dims * (math.log(noise) + 0.5 * math.log(2 * math.pi))

    far_nll = torch.stack([nll(sample.roll(-d, 0)) for d in range(3, 3 + far)])  # far blocks: >= 3 apart
    return nll(sample), far_nll, 0.5 * dims * math.log(1 + 1 / noise ** 2)


@pytest.mark.parametrize("noise, dims", [(1.0, 1), (2.0, 4), (3.0, 8)])
def test_it_recovers_the_known_information_of_an_exact_posterior(noise, dims):
    own, far, info = gaussian_case(noise, dims)
    value, half = block_interval(info_lower_bound(own, far), len(own))  # "tokens" = blocks: nats per block
    assert value - half <= info  # a lower bound: never above I(x; z), which here equals the mean KL
    assert value + half >= info - 0.1  # and close to it while I << log K (K = 16 here)


def test_it_is_capped_at_log_k_and_the_retired_measure_overstates_the_information():
    own, far, info = gaussian_case(0.5, 2)  # I = 1.61 nats
    value, half = block_interval(info_lower_bound(own, far), len(own))
    assert value - half <= info and value <= math.log(16)
    # the retired measure: the own sample against a mixture of the others' alone
    retired = -(torch.logsumexp(-far, 0) - math.log(len(far))) - own
    old, old_half = block_interval(retired, len(own))
    assert old - old_half > info  # information that exceeds the KL: why it was retired


def test_a_decoder_that_ignores_z_reads_zero():
    own = torch.full((12,), 50.0)
    value, half = block_interval(info_lower_bound(own, torch.full((8, 12), 50.0)), 12 * 128)
    assert value == 0 and half == 0
    with pytest.raises(ValueError, match=r"far_nll must be \(K - 1, B\) with B = 12"):
        info_lower_bound(own, torch.zeros(8, 11))


@pytest.mark.parametrize("start, steps", [("fixed", 4), ("fixed", 16), ("encoder", 1)])
def test_it_never_exceeds_the_kl_on_smoke_models(start, steps):
    cfg = ltm.model_preset("smoke")
    torch.manual_seed(0)
    model = ltm.build_model(cfg, ltm.InferenceConfig(steps=steps, start=start))
    with torch.no_grad():  # a decoder that leans on z, so that there is information to read
        for block in model.blocks:
            block.cross.o.weight.mul_(8)
    tokens = torch.randint(0, cfg.vocab_size, (12, cfg.ctx + 1), generator=torch.Generator().manual_seed(1))
    m = evaluate_bounds(model, [tokens[:6], tokens[6:]], ltm.InferenceConfig(steps=steps, start=start), seed=3)
    assert m["val/z_info_lb"] - m["val/z_info_lb_ci"] <= m["val/kl"]
    assert m["val/z_info_lb"] <= m["val/z_info_cap"] + 1e-9


def test_own_samples_mixture_against_far_samples_mixture_would_exceed_the_kl():
    """Why the own sample sits in the mixture rather than M own samples against M far ones: for an exact
    posterior (mean KL = I(x; z)) that difference of two mixtures reads above the KL."""
    g = torch.Generator().manual_seed(1)
    blocks, m, s = 4000, 32, 1.0
    z = torch.randn(blocks, generator=g, dtype=torch.float64)
    x = z + s * torch.randn(blocks, generator=g, dtype=torch.float64)
    own = x[:, None] / 2 + 0.5 ** 0.5 * torch.randn(blocks, m, generator=g, dtype=torch.float64)  # q(z | x) exact

    def log_mixture(samples: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(-0.5 * ((x[:, None] - samples) / s) ** 2, 1) - math.log(samples.shape[1])

    far = torch.stack([own[:, 0].roll(-d) for d in range(3, 3 + m)], 1)
    both_mixtures, half = block_interval(log_mixture(own) - log_mixture(far), blocks)
    assert both_mixtures - half > 0.5 * math.log(2)  # I(x; z) = mean KL = log(2) / 2 here
