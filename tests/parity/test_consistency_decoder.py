"""Parity of ConsistencyDecoderVAE and ConsistencyDecoderScheduler with the reference (tiny, float32 CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import ConsistencyDecoderVAE as RefVAE
from diffusers.schedulers.scheduling_consistency_decoder import ConsistencyDecoderScheduler as RefScheduler

from diffusekit import ConsistencyDecoderScheduler, ConsistencyDecoderVAE

TOL = dict(atol=1e-4, rtol=1e-4)
#: The diffusers pipeline tests' tiny config (get_consistency_vae_config((2, 4), 2)).
TINY = dict(
    encoder_block_out_channels=[2, 4], encoder_in_channels=3, encoder_out_channels=4,
    encoder_down_block_types=["DownEncoderBlock2D"] * 2, decoder_add_attention=False,
    decoder_block_out_channels=[2, 4], decoder_down_block_types=["ResnetDownsampleBlock2D"] * 2,
    decoder_downsample_padding=1, decoder_in_channels=7, decoder_layers_per_block=1, decoder_norm_eps=1e-05,
    decoder_norm_num_groups=2, encoder_norm_num_groups=2, decoder_num_train_timesteps=1024,
    decoder_out_channels=6, decoder_resnet_time_scale_shift="scale_shift", decoder_time_embedding_type="learned",
    decoder_up_block_types=["ResnetUpsampleBlock2D"] * 2, scaling_factor=1, latent_channels=4,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(reference model, ours loaded from the reference's saved folder)."""
    folder = tmp_path_factory.mktemp("cdvae")
    torch.manual_seed(0)
    reference = RefVAE(**TINY).eval()
    reference.save_pretrained(folder)
    return reference, ConsistencyDecoderVAE.from_pretrained(folder).eval()


def _images(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _public(config) -> dict:
    """A config without its private keys (``_class_name``, ``_use_default_values``, ...)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def test_seeded_build_gives_the_reference_weights():
    torch.manual_seed(0)
    reference = RefVAE(**TINY)
    after_reference = torch.get_rng_state()
    torch.manual_seed(0)
    ours = ConsistencyDecoderVAE(**TINY)
    expected, actual = reference.state_dict(), ours.state_dict()
    assert list(actual) == list(expected)
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []
    assert torch.equal(torch.get_rng_state(), after_reference)
    assert _public(ours.config) == _public(reference.config)
    assert set(ours.config["_use_default_values"]) == set(reference.config["_use_default_values"])


@torch.no_grad()
def test_encode(pair):
    reference, ours = pair
    x = _images(2, 3, 16, 16)
    expected, actual = reference.encode(x).latent_dist, ours.encode(x).latent_dist
    torch.testing.assert_close(actual.mean, expected.mean, **TOL)
    torch.testing.assert_close(actual.std, expected.std, **TOL)
    torch.testing.assert_close(actual.sample(_seed(5)), expected.sample(_seed(5)), **TOL)


@torch.no_grad()
def test_tiled_encode(pair):
    reference, ours = pair
    x = _images(1, 3, 48, 48)
    for model in pair:
        model.enable_tiling()
    try:
        torch.testing.assert_close(ours.encode(x).latent_dist.mean, reference.encode(x).latent_dist.mean, **TOL)
    finally:
        for model in pair:
            model.disable_tiling()


@torch.no_grad()
@pytest.mark.parametrize("steps", [None, 2])
def test_decode(pair, steps):
    reference, ours = pair
    z = _images(2, 4, 8, 8, seed=2)
    kwargs = {} if steps is None else {"num_inference_steps": steps}
    expected = reference.decode(z, generator=_seed(), **kwargs).sample
    actual = ours.decode(z, generator=_seed(), **kwargs).sample
    assert actual.shape == (2, 3, 16, 16)
    torch.testing.assert_close(actual, expected, **TOL)


@torch.no_grad()
def test_decode_with_a_generator_per_image(pair):
    reference, ours = pair
    z = _images(2, 4, 8, 8, seed=3)
    expected = reference.decode(z, generator=[_seed(1), _seed(2)]).sample
    torch.testing.assert_close(ours.decode(z, generator=[_seed(1), _seed(2)]).sample, expected, **TOL)


@torch.no_grad()
@pytest.mark.parametrize("sample_posterior", [False, True])
def test_forward(pair, sample_posterior):
    reference, ours = pair
    x = _images(2, 3, 16, 16, seed=4)
    expected = reference(x, sample_posterior=sample_posterior, generator=_seed(6)).sample
    actual = ours(x, sample_posterior=sample_posterior, generator=_seed(6)).sample
    torch.testing.assert_close(actual, expected, **TOL)


@torch.no_grad()
def test_reference_loads_our_folder(pair, tmp_path):
    reference, ours = pair
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    reference_keys = set(reference.config) - {"_use_default_values"}
    assert set(saved) - {"_use_default_values"} == reference_keys
    reloaded = RefVAE.from_pretrained(tmp_path)
    z = _images(1, 4, 8, 8)
    torch.testing.assert_close(reloaded.decode(z, generator=_seed()).sample,
                               ours.decode(z, generator=_seed()).sample, **TOL)


def test_scheduler_tables_and_steps():
    reference, ours = RefScheduler(), ConsistencyDecoderScheduler()
    assert _public(ours.config) == _public(reference.config)
    reference.set_timesteps(2)
    ours.set_timesteps(2)
    for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "c_skip", "c_out", "c_in"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name), atol=1e-6, rtol=1e-6)
    assert torch.equal(ours.timesteps, reference.timesteps)
    torch.testing.assert_close(ours.init_noise_sigma, reference.init_noise_sigma)
    sample, output = _images(1, 3, 4, 4, seed=7), _images(1, 3, 4, 4, seed=8)
    for t in reference.timesteps:
        torch.testing.assert_close(ours.scale_model_input(sample, t), reference.scale_model_input(sample, t))
        torch.testing.assert_close(ours.step(output, t, sample, generator=_seed()).prev_sample,
                                   reference.step(output, t, sample, generator=_seed()).prev_sample, **TOL)
