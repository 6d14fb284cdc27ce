"""Parity of AutoencoderKL and VQModel with the reference (tiny random models, float32 CPU)."""

import time

import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL
from diffusers import VQModel as RefVQModel
from safetensors.torch import load_file, save_file

from diffusekit.models.autoencoder_kl import AutoencoderKL
from diffusekit.models.vq_model import VQModel

TOL = dict(atol=1e-5, rtol=1e-5)
KL_CONFIG = dict(
    block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, norm_num_groups=4,
    layers_per_block=1, sample_size=16,
)
FLUX_CONFIG = dict(
    KL_CONFIG, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True,
)
VQ_CONFIG = dict(
    block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=3, norm_num_groups=4,
    layers_per_block=1, num_vq_embeddings=16, sample_size=16,
)
SD_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)


def _pair(ref_cls, our_cls, config, folder, **load_kwargs):
    torch.manual_seed(0)
    ref = ref_cls(**config).eval()
    ref.save_pretrained(folder)
    return ref, our_cls.from_pretrained(folder, **load_kwargs)


@pytest.fixture(scope="module")
def kl_pair(tmp_path_factory):
    return _pair(RefAutoencoderKL, AutoencoderKL, KL_CONFIG, tmp_path_factory.mktemp("kl"))


def _images(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_kl_encode_decode_forward(kl_pair):
    ref, ours = kl_pair
    x = _images(2, 3, 16, 16)
    ref_dist, our_dist = ref.encode(x).latent_dist, ours.encode(x).latent_dist
    for name in ("mean", "std", "var", "logvar"):
        torch.testing.assert_close(getattr(our_dist, name), getattr(ref_dist, name), **TOL)
    torch.testing.assert_close(our_dist.mode(), ref_dist.mode(), **TOL)
    torch.testing.assert_close(our_dist.kl(), ref_dist.kl(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(our_dist.kl(ref_dist), ref_dist.kl(ref_dist), rtol=1e-5, atol=1e-4)
    zeros = torch.zeros_like(ref_dist.mean)
    torch.testing.assert_close(our_dist.nll(zeros), ref_dist.nll(zeros), rtol=1e-5, atol=1e-4)
    # seeded posterior samples: one generator, and a list of generators (one per batch item)
    for make_gen in (lambda: torch.Generator().manual_seed(7),
                     lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]):
        torch.testing.assert_close(our_dist.sample(make_gen()), ref_dist.sample(make_gen()), **TOL)

    z = _images(2, 4, 8, 8, seed=2)
    expected = ref.decode(z).sample
    got = ours.decode(z).sample
    assert got.shape == (2, 3, 16, 16)
    torch.testing.assert_close(got, expected, **TOL)
    assert torch.equal(ours.decode(z, return_dict=False)[0], got)

    torch.testing.assert_close(ours(x).sample, ref(x).sample, **TOL)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    torch.testing.assert_close(ours(x, sample_posterior=True, generator=gen()).sample,
                               ref(x, sample_posterior=True, generator=gen()).sample, **TOL)


@torch.no_grad()
def test_kl_slicing_equals_unsliced(kl_pair):
    _, ours = kl_pair
    x, z = _images(3, 3, 16, 16), _images(3, 4, 8, 8, seed=2)
    whole_enc, whole_dec = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    ours.enable_slicing()
    try:
        sliced_enc, sliced_dec = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    finally:
        ours.disable_slicing()
    torch.testing.assert_close(sliced_enc, whole_enc, **TOL)  # batch size changes conv kernels' rounding only
    torch.testing.assert_close(sliced_dec, whole_dec, **TOL)


# Tiled vs untiled on the tiny random VAE (16-pixel tiles, 40x40 input; measured): mean |diff| 0.058
# for encode and 0.137 for decode, on outputs of mean magnitude 0.25 and 0.22; correlation 0.96 and
# 0.81. Tiles see less context (GroupNorm statistics, mid-block attention, borders), so only the
# blending keeps them close. A tile misplaced by 6 pixels drops the decode correlation to 0.24.
TILED_GAP = {"encode": (0.1, 0.93), "decode": (0.2, 0.75)}  # (max mean |diff|, min correlation)


def _corr(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@torch.no_grad()
def test_kl_tiling_matches_reference_tiling(kl_pair):
    ref, ours = kl_pair
    x, z = _images(1, 3, 40, 40, seed=4), _images(1, 4, 20, 20, seed=5)
    untiled_enc, untiled_dec = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    for model in (ref, ours):
        model.enable_tiling()
    try:
        ref_enc, our_enc = ref.encode(x).latent_dist, ours.encode(x).latent_dist
        ref_dec, our_dec = ref.decode(z).sample, ours.decode(z).sample
    finally:
        for model in (ref, ours):
            model.disable_tiling()
    torch.testing.assert_close(our_enc.mean, ref_enc.mean, **TOL)
    torch.testing.assert_close(our_enc.std, ref_enc.std, **TOL)
    torch.testing.assert_close(our_dec, ref_dec, **TOL)
    assert our_dec.shape == untiled_dec.shape == (1, 3, 40, 40)
    assert our_enc.mean.shape == untiled_enc.shape == (1, 4, 20, 20)
    for name, tiled, untiled in (("encode", our_enc.mean, untiled_enc), ("decode", our_dec, untiled_dec)):
        max_gap, min_corr = TILED_GAP[name]
        assert (tiled - untiled).abs().mean() < max_gap, name
        assert _corr(tiled, untiled) > min_corr, name
    # public tiled_* entry points agree with the automatic path
    torch.testing.assert_close(ours.tiled_decode(z).sample, our_dec, atol=0, rtol=0)
    torch.testing.assert_close(ours.tiled_encode(x).latent_dist.mean, our_enc.mean, atol=0, rtol=0)


@torch.no_grad()
def test_flux_config(tmp_path):
    ref, ours = _pair(RefAutoencoderKL, AutoencoderKL, FLUX_CONFIG, tmp_path)
    assert ours.quant_conv is None and ours.post_quant_conv is None
    assert ours.config.shift_factor == pytest.approx(0.1159)
    assert ours.config.scaling_factor == pytest.approx(0.3611)
    x, z = _images(1, 3, 16, 16), _images(1, 16, 8, 8, seed=2)
    ref_dist, our_dist = ref.encode(x).latent_dist, ours.encode(x).latent_dist
    assert our_dist.mean.shape == (1, 16, 8, 8)
    torch.testing.assert_close(our_dist.mean, ref_dist.mean, **TOL)
    torch.testing.assert_close(our_dist.sample(torch.Generator().manual_seed(0)),
                               ref_dist.sample(torch.Generator().manual_seed(0)), **TOL)
    torch.testing.assert_close(ours.decode(z).sample, ref.decode(z).sample, **TOL)


@torch.no_grad()
def test_our_save_loads_in_reference(tmp_path):
    torch.manual_seed(0)
    ours = AutoencoderKL(**KL_CONFIG).eval()
    ours.save_pretrained(tmp_path / "kl")
    ref = RefAutoencoderKL.from_pretrained(tmp_path / "kl").eval()
    x = _images(1, 3, 16, 16)
    torch.testing.assert_close(ours(x).sample, ref(x).sample, **TOL)

    torch.manual_seed(0)
    vq = VQModel(**VQ_CONFIG).eval()
    vq.save_pretrained(tmp_path / "vq")
    ref_vq = RefVQModel.from_pretrained(tmp_path / "vq").eval()
    torch.testing.assert_close(vq(x).sample, ref_vq(x).sample, **TOL)


@pytest.fixture(scope="module")
def vq_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vq")
    return (folder, *_pair(RefVQModel, VQModel, VQ_CONFIG, folder))


@torch.no_grad()
def test_vq_encode_quantize_decode(vq_folder):
    _, ref, ours = vq_folder
    x = _images(2, 3, 16, 16)
    h_ref, h = ref.encode(x).latents, ours.encode(x).latents
    torch.testing.assert_close(h, h_ref, **TOL)

    q_ref, loss_ref, (_, _, idx_ref) = ref.quantize(h_ref)
    q, loss, (_, _, idx) = ours.quantize(h_ref)
    assert torch.equal(idx, idx_ref)
    assert idx.unique().numel() > 1
    torch.testing.assert_close(q, q_ref, **TOL)
    torch.testing.assert_close(loss, loss_ref, **TOL)

    dec_ref, dec = ref.decode(h_ref), ours.decode(h_ref)
    torch.testing.assert_close(dec.sample, dec_ref.sample, **TOL)
    torch.testing.assert_close(dec.commit_loss, dec_ref.commit_loss, **TOL)
    unq_ref, unq = ref.decode(h_ref, force_not_quantize=True), ours.decode(h_ref, force_not_quantize=True)
    torch.testing.assert_close(unq.sample, unq_ref.sample, **TOL)
    assert torch.equal(unq.commit_loss, torch.zeros(2))
    sample, commit = ours(x, return_dict=False)
    torch.testing.assert_close(sample, ref(x).sample, **TOL)
    torch.testing.assert_close(commit, loss_ref, **TOL)


@torch.no_grad()
def test_vq_legacy_loss_and_codebook_lookup(vq_folder):
    tmp_path, ref, ours = vq_folder
    h = _images(1, 3, 4, 4, seed=3) * 0.05
    try:
        for legacy in (True, False):
            ref.quantize.legacy = ours.quantize.legacy = legacy
            torch.testing.assert_close(ours.quantize(h)[1], ref.quantize(h)[1], **TOL)
    finally:
        ours.quantize.legacy = ref.quantize.legacy = True

    ref_lookup = RefVQModel.from_pretrained(tmp_path, lookup_from_codebook=True).eval()
    our_lookup = VQModel.from_pretrained(tmp_path, lookup_from_codebook=True)
    indices = torch.tensor([0, 3, 5, 15] * 4)
    shape = (1, 4, 4, 3)
    expected = ref_lookup.decode(indices, force_not_quantize=True, shape=shape).sample
    torch.testing.assert_close(our_lookup.decode(indices, force_not_quantize=True, shape=shape).sample,
                               expected, **TOL)
    codes = ours.quantize.get_codebook_entry(indices, shape)
    torch.testing.assert_close(codes, ref.quantize.get_codebook_entry(indices, shape), atol=0, rtol=0)


@torch.no_grad()
def test_legacy_attention_keys_load(tmp_path):
    """Checkpoints from before diffusers 0.14 name the VAE attention query/key/value/proj_attn."""
    ref, _ = _pair(RefVQModel, VQModel, VQ_CONFIG, tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for key, value in load_file(path).items():
        for new, old in renames.items():
            key = key.replace(new, old)
        state[key] = value
    assert any(".proj_attn." in key for key in state)
    save_file(state, path)
    ours = VQModel.from_pretrained(tmp_path)
    x = _images(1, 3, 16, 16)
    torch.testing.assert_close(ours(x).sample, ref(x).sample, **TOL)


def test_unsupported_options():
    with pytest.raises(ValueError, match="norm_type"):
        VQModel(**{**VQ_CONFIG, "norm_type": "spatial"})
    with pytest.raises(ValueError, match="up_block_types"):
        AutoencoderKL(**{**KL_CONFIG, "up_block_types": ("UpDecoderBlock2D",)})
    with pytest.raises(NotImplementedError, match="tiling"):
        VQModel(**VQ_CONFIG).enable_tiling()


@pytest.mark.slow
@torch.no_grad()
def test_full_size_sd_vae_decode(tmp_path, all_threads):
    ref, ours = _pair(RefAutoencoderKL, AutoencoderKL, SD_CONFIG, tmp_path)
    z = _images(1, 4, 64, 64, seed=9)
    start = time.perf_counter()
    got = ours.decode(z).sample
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    expected = ref.decode(z).sample
    ref_s = time.perf_counter() - start
    gap = (got - expected).abs().max().item() / expected.abs().max().item()
    print(f"SD VAE decode 1x4x64x64 -> {tuple(got.shape)}: ours {ours_s:.1f}s, reference {ref_s:.1f}s, "
          f"max |diff| / max |ref| = {gap:.1e}")
    assert got.shape == (1, 3, 512, 512)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
