"""ConsistencyDecoderVAE and its two-step ConsistencyDecoderScheduler (tiny models, CPU)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from diffusekit import ConsistencyDecoderScheduler, ConsistencyDecoderVAE
from diffusekit.models.autoencoder_kl import AutoencoderKLOutput
from diffusekit.models.consistency_decoder_vae import ConsistencyDecoderVAEOutput

#: The diffusers pipeline tests' tiny config (get_consistency_vae_config((2, 4), 2)).
TINY = dict(
    encoder_block_out_channels=(2, 4), encoder_down_block_types=("DownEncoderBlock2D",) * 2,
    encoder_norm_num_groups=2, decoder_add_attention=False, decoder_block_out_channels=(2, 4),
    decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2, decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2,
    decoder_layers_per_block=1, decoder_norm_num_groups=2, scaling_factor=1, latent_channels=4,
)


@pytest.fixture(scope="module")
def vae() -> ConsistencyDecoderVAE:
    torch.manual_seed(0)
    return ConsistencyDecoderVAE(**TINY).eval()


def _images(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_config_adds_the_pipelines_keys(vae):
    assert vae.config.block_out_channels == [2, 4]
    assert vae.config.force_upcast is False
    assert vae.config.decoder_num_train_timesteps == 1024


@torch.no_grad()
def test_encode_gives_a_kl_output(vae):
    out = vae.encode(_images(2, 3, 16, 16))
    assert isinstance(out, ConsistencyDecoderVAEOutput) and isinstance(out, AutoencoderKLOutput)
    assert out.latent_dist.mean.shape == (2, 4, 8, 8)
    (posterior,) = vae.encode(_images(2, 3, 16, 16), return_dict=False)
    assert torch.equal(posterior.mean, out.latent_dist.mean)


@torch.no_grad()
def test_decode_is_seeded_sampling(vae):
    z = _images(2, 4, 8, 8, seed=2)
    first = vae.decode(z, generator=_seed(0)).sample
    assert first.shape == (2, 3, 16, 16)
    assert torch.equal(vae.decode(z, generator=_seed(0), return_dict=False)[0], first)
    assert not torch.allclose(vae.decode(z, generator=_seed(1)).sample, first)
    assert torch.equal(vae(_images(2, 3, 16, 16), generator=_seed(0)).sample,
                       vae.decode(vae.encode(_images(2, 3, 16, 16)).latent_dist.mode(), generator=_seed(0)).sample)


@torch.no_grad()
def test_decode_leaves_the_models_scheduler_alone(vae):
    vae.decode(_images(1, 4, 8, 8), generator=_seed())
    assert vae.decoder_scheduler.num_inference_steps is None  # each decode steps its own copy


def test_decode_refuses_other_step_counts(vae):
    with pytest.raises(ValueError, match="num_inference_steps must be 2 .* got 3"):
        vae.decode(_images(1, 4, 8, 8), num_inference_steps=3)


@torch.no_grad()
def test_slicing_and_tiling_encode(vae):
    x = _images(2, 3, 16, 16)
    whole = vae.encode(x).latent_dist.mean
    vae.enable_slicing()
    try:
        torch.testing.assert_close(vae.encode(x).latent_dist.mean, whole, atol=1e-6, rtol=1e-6)
    finally:
        vae.disable_slicing()
    vae.enable_tiling()
    try:
        assert vae.encode(_images(1, 3, 48, 48)).latent_dist.mean.shape == (1, 4, 24, 24)
    finally:
        vae.disable_tiling()


def test_attention_processors_can_be_reset(vae):
    assert vae.attn_processors  # the encoder's mid-block attention
    vae.set_default_attn_processor()


@torch.no_grad()
def test_save_and_load_round_trip(vae, tmp_path, caplog):
    vae.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "ConsistencyDecoderVAE"
    assert saved["block_out_channels"] == [2, 4] and saved["force_upcast"] is False
    with caplog.at_level(logging.INFO):
        loaded = ConsistencyDecoderVAE.from_pretrained(tmp_path)
    assert "block_out_channels" not in caplog.text  # a derived key, not an unknown one
    public = lambda config: {k: v for k, v in config.items() if k != "_use_default_values"}  # noqa: E731
    assert public(loaded.config) == public(vae.config)
    expected, actual = vae.state_dict(), loaded.state_dict()
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    z = _images(1, 4, 8, 8)
    assert torch.equal(loaded.decode(z, generator=_seed()).sample, vae.decode(z, generator=_seed()).sample)


def test_scheduler_has_the_decoders_two_steps():
    scheduler = ConsistencyDecoderScheduler()
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [1008, 512]
    assert scheduler.timesteps.dtype == torch.long
    torch.testing.assert_close(scheduler.init_noise_sigma, scheduler.sqrt_one_minus_alphas_cumprod[1008])
    sample = _images(1, 3, 4, 4)
    noisy = scheduler.step(torch.zeros_like(sample), scheduler.timesteps[0], sample, generator=_seed()).prev_sample
    last = scheduler.step(torch.zeros_like(sample), scheduler.timesteps[1], noisy, return_dict=False)[0]
    torch.testing.assert_close(last, scheduler.c_skip[512] * noisy)  # the last step adds no noise


@pytest.mark.parametrize("steps", [1, 3, None])
def test_scheduler_refuses_other_step_counts(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        ConsistencyDecoderScheduler().set_timesteps(steps)


def test_scheduler_step_refuses_a_foreign_timestep():
    scheduler = ConsistencyDecoderScheduler()
    scheduler.set_timesteps(2)
    sample = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match=r"timestep 700 is not one of the scheduler's timesteps \[1008, 512\]"):
        scheduler.step(sample, torch.tensor(700), sample)


def test_scheduler_config_round_trip(tmp_path):
    ConsistencyDecoderScheduler(sigma_data=0.25).save_pretrained(tmp_path)
    loaded = ConsistencyDecoderScheduler.from_pretrained(tmp_path)
    assert loaded.config.sigma_data == 0.25 and loaded.config.num_train_timesteps == 1024
