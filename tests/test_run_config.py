import dataclasses

import pytest

from ltm.config import ConfigError, RunConfig, run_preset


def test_overrides_parse_values_by_the_fields_type():
    cfg = run_preset("micro").with_overrides(["inference.steps=32", "model.window=none", "train.tokens=1e5",
                                              "inference.reuse_noise=true", "train.lr=3e-4", "seed=7",
                                              "data.name=/tmp/corpus.txt"])
    assert (cfg.inference.steps, cfg.model.window, cfg.train.tokens) == (32, None, 100_000)
    assert cfg.inference.reuse_noise is True and cfg.train.lr == 3e-4 and cfg.seed == 7
    assert cfg.data.name == "/tmp/corpus.txt"


def test_unknown_keys_and_unparsable_values_say_what_is_accepted():
    with pytest.raises(ConfigError, match="unknown config key 'inference.step'.*inference.steps"):
        run_preset("smoke").with_overrides(["inference.step=3"])
    with pytest.raises(ConfigError, match="cannot parse inference.steps='many' as int"):
        run_preset("smoke").with_overrides(["inference.steps=many"])
    with pytest.raises(ConfigError, match="expected key=value"):
        run_preset("smoke").with_overrides(["inference.steps"])
    with pytest.raises(ConfigError, match="not divisible by model.n_layers"):
        run_preset("smoke").with_overrides(["model.n_latents=5"])


def test_run_key_is_stable_and_changes_with_the_config_and_seed():
    a = run_preset("smoke")
    assert a.run_key() == RunConfig.from_dict(a.to_dict()).run_key()
    assert a.run_key() != a.with_overrides(["seed=1"]).run_key()
    assert a.run_key() != a.with_overrides(["inference.steps=8"]).run_key()
    # where the token cache lives does not change what the run computes
    assert a.run_key() == dataclasses.replace(a, data=dataclasses.replace(a.data, cache_dir="/elsewhere")).run_key()


def test_run_key_ignores_only_what_the_run_does_not_use():
    ltm_run = run_preset("smoke")

    def same(cfg, *sets):
        return cfg.run_key() == cfg.with_overrides(list(sets)).run_key()

    # the vocabulary always comes from the data
    assert same(ltm_run, "model.vocab_size=999")
    # an AR has no latents and no inference loop: one baseline whatever T a grid gives it
    ar = ltm_run.with_overrides(["model.kind=ar", "inference.steps=0"])
    assert same(ar, "inference.steps=16", "inference.lr_max=1.0", "model.n_latents=8", "model.latent_rope=true")
    assert not same(ar, "model.window=8") and not same(ar, "train.iw_samples=0")
    # ... while an LTM uses every one of them
    for field in ("inference.steps=16", "inference.lr_max=1.0", "model.n_latents=8", "model.latent_rope=true"):
        assert not same(ltm_run, field), field
    # corpus knobs count only for the corpus they shape, the BPE size only for a BPE
    text = ltm_run.with_overrides(["data.name=/tmp/corpus.txt"])
    assert same(text, "data.synthetic_slots=8", "data.bpe_vocab_size=300")
    assert not same(ltm_run, "data.synthetic_slots=8")
    assert not same(text.with_overrides(["data.tokenizer=bpe"]), "data.bpe_vocab_size=300")


def test_flat_params_use_the_design_names():
    flat = run_preset("smoke").flat()
    for key in ("model.kind", "model.n_layers", "model.d_model", "model.n_latents", "inference.steps",
                "train.tokens", "data.name", "seed"):
        assert key in flat


def test_unknown_run_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known presets: smoke, micro, micro-rf, ltm-s"):
        run_preset("huge")


def test_train_config_errors_carry_the_numbers():
    with pytest.raises(ConfigError, match="batch_size=10 is not a multiple of train.micro_batch_size=4"):
        run_preset("smoke").with_overrides(["train.batch_size=10", "train.micro_batch_size=4"])


@pytest.mark.parametrize("override,message", [("train.grad_clip=-1", "train.grad_clip must be > 0"),
                                              ("train.grad_clip=0", "train.grad_clip must be > 0"),
                                              ("train.betas=1.5,0.9", r"train.betas must be two numbers in \[0, 1\)")])
def test_train_options_that_would_corrupt_training_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        run_preset("smoke").with_overrides([override])
