"""AutoencoderTiny (TAESD): shapes, latent scaling, config round trip, argument checks (tiny models, CPU)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from diffusekit import AutoencoderTiny
from diffusekit.models.autoencoder_tiny import AutoencoderTinyOutput
from diffusekit.models.vae import DecoderOutput
from diffusekit.pipelines.vae_codec import latent_sample, vae_scale_factor

#: Three stages: 4x downsampling, as the diffusers pipeline tests' get_autoencoder_tiny_config would make.
TINY = dict(encoder_block_out_channels=(4, 4, 4), decoder_block_out_channels=(4, 4, 4),
            num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))


@pytest.fixture(scope="module")
def vae() -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(**TINY).eval()


def _images(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_encode_decode_forward_shapes(vae):
    images = _images(2, 3, 16, 16)
    with torch.no_grad():
        encoded = vae.encode(images)
        decoded = vae.decode(encoded.latents)
        forward = vae(images)
    assert isinstance(encoded, AutoencoderTinyOutput) and encoded.latents.shape == (2, 4, 4, 4)
    assert isinstance(decoded, DecoderOutput) and decoded.sample.shape == (2, 3, 16, 16)
    assert forward.sample.shape == (2, 3, 16, 16)
    assert vae.encode(images, return_dict=False)[0].shape == (2, 4, 4, 4)
    assert torch.equal(latent_sample(encoded), encoded.latents)


def test_decoder_output_stays_in_range(vae):
    with torch.no_grad():
        images = vae.decode(torch.full((1, 4, 2, 2), 1e6)).sample
    assert torch.isfinite(images).all()


def test_slicing_gives_the_same_images(vae):
    images = _images(3, 3, 8, 8)
    with torch.no_grad():
        whole = vae.encode(images).latents
        vae.enable_slicing()
        try:
            sliced = vae.encode(images).latents
            sliced_images = vae.decode(whole).sample
        finally:
            vae.disable_slicing()
        whole_images = vae.decode(whole).sample
    torch.testing.assert_close(sliced, whole)
    torch.testing.assert_close(sliced_images, whole_images)


def test_tiling_is_not_supported(vae):
    with pytest.raises(NotImplementedError, match="AutoencoderTiny does not support tiling"):
        vae.enable_tiling()


def test_scale_latents_maps_to_unit_range_and_back(vae):
    latents = torch.tensor([-3.0, 0.0, 1.5, 3.0, 9.0])
    scaled = vae.scale_latents(latents)
    torch.testing.assert_close(scaled, torch.tensor([0.0, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(vae.unscale_latents(scaled[:4]), latents[:4])


def test_config_holds_the_pipelines_keys(vae):
    assert vae.config.block_out_channels == [4, 4, 4]
    assert vae.config.scaling_factor == 1.0 and vae.config.shift_factor == 0.0
    assert vae_scale_factor(vae) == 4
    assert vae_scale_factor(AutoencoderTiny()) == 8


def test_force_upcast_is_stored_false():
    assert AutoencoderTiny(**TINY, force_upcast=True).config.force_upcast is False


def test_save_and_load_round_trip(vae, tmp_path, caplog):
    vae.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "AutoencoderTiny" and saved["block_out_channels"] == [4, 4, 4]
    with caplog.at_level(logging.WARNING):
        loaded = AutoencoderTiny.from_pretrained(tmp_path).eval()
    assert "does not use config keys" not in caplog.text
    assert {k: v for k, v in loaded.config.items() if k != "_use_default_values"} == \
        {k: v for k, v in vae.config.items() if k != "_use_default_values"}
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_stage_lengths_must_match(side):
    with pytest.raises(ValueError, match=f"{side}_block_out_channels has 2 entries but num_{side}_blocks has 3"):
        AutoencoderTiny(**{f"{side}_block_out_channels": (4, 4), f"num_{side}_blocks": (1, 1, 1)})


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="act_fn 'tanhh'"):
        AutoencoderTiny(**TINY, act_fn="tanhh")
