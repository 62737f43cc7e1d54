import dataclasses

import pytest
import torch

import ltm


def latents(cfg, batch, seed=0):
    return torch.randn(batch, cfg.n_latents, cfg.d_model, generator=torch.Generator().manual_seed(seed))


def test_logits_have_batch_time_vocab_shape(smoke_model, smoke_cfg, tokens):
    x = tokens[:, :-1]
    assert smoke_model(x, latents(smoke_cfg, 3)).shape == (3, smoke_cfg.ctx, smoke_cfg.vocab_size)


def test_changing_a_future_token_leaves_earlier_logits_unchanged(smoke_model, smoke_cfg, tokens):
    x, z = tokens[:, :-1], latents(smoke_cfg, 3)
    changed = x.clone()
    changed[:, 20] = (changed[:, 20] + 1) % smoke_cfg.vocab_size
    a, b = smoke_model(x, z), smoke_model(changed, z)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20], b[:, 20])


def test_window_limits_receptive_field(smoke_model, smoke_cfg, tokens):
    # Each layer looks back window-1 tokens, so L layers reach L * (window - 1) tokens back.
    reach = smoke_cfg.n_layers * (smoke_cfg.window - 1)
    assert reach + 1 < smoke_cfg.ctx
    x, z = tokens[:, :-1], latents(smoke_cfg, 3)
    changed = x.clone()
    changed[:, 0] = (changed[:, 0] + 1) % smoke_cfg.vocab_size
    a, b = smoke_model(x, z), smoke_model(changed, z)
    torch.testing.assert_close(a[:, reach + 1:], b[:, reach + 1:])
    assert not torch.allclose(a[:, reach], b[:, reach])


def test_full_context_window_sees_the_first_token_everywhere(smoke_cfg, tokens):
    torch.manual_seed(0)
    model = ltm.build_model(dataclasses.replace(smoke_cfg, window=None))
    x, z = tokens[:, :-1], latents(smoke_cfg, 3)
    changed = x.clone()
    changed[:, 0] = (changed[:, 0] + 1) % smoke_cfg.vocab_size
    assert not torch.allclose(model(x, z)[:, -1], model(changed, z)[:, -1])


def test_ltm_logits_depend_on_z(smoke_model, smoke_cfg, tokens):
    x = tokens[:, :-1]
    assert not torch.allclose(smoke_model(x, latents(smoke_cfg, 3, 0)), smoke_model(x, latents(smoke_cfg, 3, 1)))


def test_each_layer_reads_only_its_own_latents(smoke_model, smoke_cfg, tokens):
    # Perturbing layer 1's latents must leave layer 0's output (hence nothing upstream) alone,
    # and must change the logits.
    x, z = tokens[:, :-1], latents(smoke_cfg, 3)
    per_layer = smoke_cfg.latents_per_layer
    z2 = z.clone()
    z2[:, per_layer:] += 1.0
    seen = []
    hook = smoke_model.blocks[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o))
    a, b = smoke_model(x, z), smoke_model(x, z2)
    hook.remove()
    torch.testing.assert_close(seen[0], seen[1])
    assert not torch.allclose(a, b)


def test_ar_parameters_are_the_ltms_minus_the_cross_attention(smoke_cfg):
    ltm_params = dict(ltm.build_model(smoke_cfg).named_parameters())
    ar_params = dict(ltm.build_model(dataclasses.replace(smoke_cfg, kind="ar")).named_parameters())
    cross = {n for n in ltm_params if ".cross." in n or ".norm_cross." in n}
    assert cross and set(ar_params) == set(ltm_params) - cross
    for name, p in ar_params.items():
        assert p.shape == ltm_params[name].shape


def test_ar_model_runs_without_latents_and_rejects_them(smoke_cfg, tokens):
    model = ltm.build_model(dataclasses.replace(smoke_cfg, kind="ar"))
    assert model(tokens[:, :-1], None).shape[-1] == smoke_cfg.vocab_size
    with pytest.raises(ValueError, match="AR model takes no latents"):
        model(tokens[:, :-1], latents(smoke_cfg, 3))


def test_wrong_latent_shape_names_the_expected_shape(smoke_model, tokens):
    with pytest.raises(ValueError, match=r"z of shape \(3, 4, 32\)"):
        smoke_model(tokens[:, :-1], torch.zeros(3, 5, 32))
    with pytest.raises(ValueError, match="longer than model.ctx=32"):
        smoke_model(torch.zeros(1, 40, dtype=torch.long), torch.zeros(1, 4, 32))


def test_stem_split_equals_the_full_forward(smoke_model, smoke_cfg, tokens):
    x, z = tokens[:, :-1], latents(smoke_cfg, 3)
    torch.testing.assert_close(smoke_model.forward_from_stem(smoke_model.stem(x), z), smoke_model(x, z))


def test_embeddings_are_tied_and_counted_once(smoke_model, smoke_cfg):
    assert smoke_model.unembed.weight is smoke_model.embed.weight
    embedding = smoke_model.num_params() - smoke_model.num_params(non_embedding=True)
    assert embedding == smoke_cfg.vocab_size * smoke_cfg.d_model


def test_latent_rope_option_changes_the_cross_attention(smoke_cfg, tokens):
    torch.manual_seed(0)
    plain = ltm.build_model(smoke_cfg)
    torch.manual_seed(0)
    rotated = ltm.build_model(dataclasses.replace(smoke_cfg, latent_rope=True))
    x, z = tokens[:, :-1], latents(smoke_cfg, 3)
    assert not torch.allclose(plain(x, z), rotated(x, z))


def test_latent_rope_places_latents_as_the_released_code(tokens):
    # ctx 128 with 8 latents over 2 layers: latent j of every layer at j * (128 // 8), not j * (128 // 4)
    cfg = dataclasses.replace(ltm.model_preset("micro"), latent_rope=True)
    torch.manual_seed(0)
    model = ltm.build_model(cfg)
    assert model.latent_positions().tolist() == [0, 16, 32, 48]
    x, z = tokens[:, :-1] % cfg.vocab_size, latents(cfg, 3)
    before = model(x, z)
    model.latent_positions = lambda: torch.arange(4) * 32  # the per-layer spacing this option used to have
    assert not torch.allclose(before, model(x, z))


def test_residual_output_projections_get_the_scaled_init():
    torch.manual_seed(0)
    model = ltm.build_model(ltm.model_preset("micro-m"))
    expected = 0.02 / (2 * model.cfg.n_layers) ** 0.5
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
