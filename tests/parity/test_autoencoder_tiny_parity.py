"""Parity of AutoencoderTiny (TAESD) with the reference (tiny random models, float32 CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderTiny as RefAutoencoderTiny
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock as RefBlock

from diffusekit.models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyBlock

TOL = dict(atol=1e-4, rtol=1e-4)
#: Uneven block counts, encoder and decoder widths that differ, a non-default activation
#: and magnitude, so that every argument reaches the model.
CONFIG = dict(encoder_block_out_channels=(4, 4, 4), decoder_block_out_channels=(8, 8, 8),
              num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(1, 2, 1), latent_channels=3,
              act_fn="silu", latent_magnitude=2, latent_shift=0.4)


def _seeded(cls, *args, **config):
    torch.manual_seed(0)
    return cls(*args, **config).eval()


@pytest.fixture(scope="module")
def pair():
    return _seeded(RefAutoencoderTiny, **CONFIG), _seeded(AutoencoderTiny, **CONFIG)


def _images(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _plain(config, drop: set[str]) -> dict:
    """The config as its JSON file would hold it (tuples as lists), without the ``drop`` keys."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in drop}))


def _assert_same_weights(ref: torch.nn.Module, ours: torch.nn.Module) -> None:
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert list(our_state) == list(ref_state)
    for key, value in ref_state.items():
        assert torch.equal(our_state[key], value), key


@pytest.mark.parametrize("config", [{}, CONFIG], ids=["default", "tiny"])
def test_seeded_init_equals_reference(config):
    _assert_same_weights(_seeded(RefAutoencoderTiny, **config), _seeded(AutoencoderTiny, **config))


def test_block_with_skip_conv_equals_reference():
    ref, ours = _seeded(RefBlock, in_channels=2, out_channels=4, act_fn="relu"), \
        _seeded(AutoencoderTinyBlock, 2, 4, "relu")
    _assert_same_weights(ref, ours)
    x = _images(1, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_config_equals_reference(pair):
    ref, ours = pair
    drop = {"_use_default_values", "_class_name", "_diffusers_version"}
    assert _plain(ours.config, drop) == _plain(ref.config, drop)
    assert (ours.scaling_factor, ours.latent_magnitude, ours.latent_shift) == \
        (ref.scaling_factor, ref.latent_magnitude, ref.latent_shift)


def test_encode_decode_forward_equal_reference(pair):
    ref, ours = pair
    images = _images(2, 3, 16, 16)
    with torch.no_grad():
        ref_latents, our_latents = ref.encode(images).latents, ours.encode(images).latents
        torch.testing.assert_close(our_latents, ref_latents, **TOL)
        torch.testing.assert_close(ours.decode(ref_latents).sample, ref.decode(ref_latents).sample, **TOL)
        torch.testing.assert_close(ours(images).sample, ref(images).sample, **TOL)
        torch.testing.assert_close(ours.scale_latents(ref_latents), ref.scale_latents(ref_latents), **TOL)
        torch.testing.assert_close(ours.unscale_latents(ref_latents), ref.unscale_latents(ref_latents), **TOL)


def test_sliced_equals_reference(pair):
    ref, ours = pair
    images = _images(2, 3, 8, 8)
    ref.enable_slicing()
    ours.enable_slicing()
    try:
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(images).latents, ref.encode(images).latents, **TOL)
    finally:
        ref.disable_slicing()
        ours.disable_slicing()


def test_loads_a_reference_saved_folder(pair, tmp_path):
    ref, _ = pair
    ref.save_pretrained(tmp_path)
    loaded = AutoencoderTiny.from_pretrained(tmp_path).eval()
    _assert_same_weights(ref, loaded)
    assert loaded.config.block_out_channels == [8, 8, 8] and loaded.config.latent_magnitude == 2
    images = _images(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).sample, ref(images).sample, **TOL)


def test_reference_loads_our_folder(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    _assert_same_weights(ours, RefAutoencoderTiny.from_pretrained(tmp_path))
