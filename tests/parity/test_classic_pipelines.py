"""Latent diffusion (unconditional and text-to-image), score-SDE VE, Karras VE and Dance Diffusion
against the reference, on tiny pipelines the reference builds and saves; plus LDMBertModel."""

import json
import math
import shutil

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel as RefLDMBert
from transformers import BertTokenizer

import diffusekit

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "painting", "of", "squirrel", "cat", "eating", "burger"]
PROMPTS = ["a painting of a cat", "squirrel eating a burger"]


def _unet(**extra):
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), **extra,
    )


def _vqvae(blocks):
    return diffusers.VQModel(
        block_out_channels=(8,) * blocks, norm_num_groups=4, layers_per_block=1,
        latent_channels=3 if blocks == 2 else 4, num_vq_embeddings=32, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
    )


def _reference_pipelines(tmp):
    """name -> reference pipeline, built with fixed seeds."""
    torch.manual_seed(0)
    ldm = diffusers.LDMPipeline(vqvae=_vqvae(2), unet=_unet(), scheduler=diffusers.DDIMScheduler())

    (tmp / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    bert = RefLDMBert(LDMBertConfig(vocab_size=len(WORDS), d_model=32, encoder_layers=2, encoder_ffn_dim=37,
                                    encoder_attention_heads=2, head_dim=16)).eval()
    cond_unet = diffusers.UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
    )
    tokenizer = BertTokenizer(str(tmp / "vocab.txt"))
    text2img = diffusers.LDMTextToImagePipeline(vqvae=_vqvae(4), bert=bert, tokenizer=tokenizer, unet=cond_unet,
                                                scheduler=diffusers.DDIMScheduler())

    ncsnpp = diffusers.UNet2DModel(  # NCSN++: fourier noise-level embedding, skip (FIR) blocks
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
        norm_num_groups=None, time_embedding_type="fourier", flip_sin_to_cos=True, act_fn="silu", norm_eps=1e-6,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        mid_block_scale_factor=math.sqrt(2.0), downsample_padding=1,
    )
    sde_ve = diffusers.ScoreSdeVePipeline(unet=ncsnpp, scheduler=diffusers.ScoreSdeVeScheduler(
        sigma_max=0.5, snr=0.1, correct_steps=2))
    karras = diffusers.KarrasVePipeline(unet=_unet(), scheduler=diffusers.KarrasVeScheduler(sigma_max=0.5))

    unet_1d = diffusers.UNet1DModel(
        block_out_channels=(32, 32, 64), extra_in_channels=16, time_embedding_dim=16, sample_size=64,
        sample_rate=16_000, in_channels=2, out_channels=2, flip_sin_to_cos=True, use_timestep_embedding=False,
        time_embedding_type="fourier", mid_block_type="UNetMidBlock1D",
        down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
        up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
    )
    dance = diffusers.DanceDiffusionPipeline(unet=unet_1d, scheduler=diffusers.IPNDMScheduler())
    return {"ldm": ldm, "text2img": text2img, "sde_ve": sde_ve, "karras": karras, "dance": dance}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (reference pipeline, the folder it saved)."""
    tmp = tmp_path_factory.mktemp("classic")
    out = {}
    for name, pipe in _reference_pipelines(tmp).items():
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(tmp / name)
        out[name] = (pipe, tmp / name)
    return out


def _ours(saved, name):
    pipe = diffusekit.DiffusionPipeline.from_pretrained(saved[name][1])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seed(seed=7):
    return torch.Generator().manual_seed(seed)


def test_ldm_matches_reference(saved):
    ours, ref = _ours(saved, "ldm"), saved["ldm"][0]
    assert type(ours).__name__ == "LDMPipeline" and type(ours.vqvae).__name__ == "VQModel"
    a = ours(batch_size=2, generator=_seed(), num_inference_steps=4, output_type="np").images
    b = ref(batch_size=2, generator=_seed(), num_inference_steps=4, output_type="np").images
    assert a.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_ldm_text2img_matches_reference(saved, guidance_scale):
    ours, ref = _ours(saved, "text2img"), saved["text2img"][0]
    assert type(ours.bert).__name__ == "LDMBertModel" and type(ours.tokenizer).__name__.startswith("BertTokenizer")
    run = dict(num_inference_steps=3, guidance_scale=guidance_scale, output_type="np")
    a = ours(PROMPTS, generator=_seed(), **run).images
    b = ref(PROMPTS, generator=_seed(), **run).images
    assert a.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(a, b, atol=1e-4)
    if guidance_scale != 1.0:
        unguided = ours(PROMPTS, generator=_seed(), **{**run, "guidance_scale": 1.0}).images
        assert np.abs(a - unguided).max() > 1e-3


def test_ldm_text2img_with_kl_vae_and_pndm_matches_reference(saved, tmp_path):
    """The CompVis text-to-image checkpoint pairs LDM-BERT with an AutoencoderKL as its "vqvae"."""
    torch.manual_seed(1)
    kl = diffusers.AutoencoderKL(
        block_out_channels=(8,) * 4, norm_num_groups=4, layers_per_block=1, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    parts = saved["text2img"][0].components
    ref = diffusers.LDMTextToImagePipeline(vqvae=kl, bert=parts["bert"], tokenizer=parts["tokenizer"],
                                           unet=parts["unet"], scheduler=diffusers.PNDMScheduler(skip_prk_steps=True))
    ref.save_pretrained(tmp_path)
    ours = diffusekit.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(ours.vqvae).__name__ == "AutoencoderKL"
    images = []
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(PROMPTS, generator=_seed(), num_inference_steps=3, guidance_scale=3.0,
                           output_type="np").images)
    np.testing.assert_allclose(images[0], images[1], atol=1e-4)


def _eta_runs(pipe, *args, **kw):
    """Two runs with the same generator seed but different global RNG states."""
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(pipe(*args, generator=_seed(), eta=1.0, output_type="np", **kw).images)
    return runs


def test_ldm_eta_noise_follows_the_generator(saved):
    """The reference draws the DDIM noise of eta > 0 from the global RNG; ours from the generator."""
    ours, ref = _ours(saved, "ldm"), saved["ldm"][0]
    a, b = _eta_runs(ours, num_inference_steps=3)
    np.testing.assert_array_equal(a, b)
    eta0 = ours(generator=_seed(), num_inference_steps=3, output_type="np").images
    assert np.abs(a - eta0).max() > 1e-3
    ref_a, ref_b = _eta_runs(ref, num_inference_steps=3)
    assert np.abs(ref_a - ref_b).max() > 1e-3  # the reference fault this fixes


def test_ldm_text2img_eta_reproduces(saved):
    a, b = _eta_runs(_ours(saved, "text2img"), PROMPTS[:1], num_inference_steps=2)
    np.testing.assert_array_equal(a, b)


def test_score_sde_ve_matches_reference(saved):
    ours, ref = _ours(saved, "sde_ve"), saved["sde_ve"][0]
    assert ours.scheduler.config.correct_steps == 2 and ours.unet.config.time_embedding_type == "fourier"
    a = ours(batch_size=2, generator=_seed(), num_inference_steps=3, output_type="np").images
    b = ref(batch_size=2, generator=_seed(), num_inference_steps=3, output_type="np").images
    assert ((a > 0) & (a < 1)).mean() > 0.25  # not a clamped blank
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_karras_ve_loads_the_reference_folder_and_matches(saved):
    ref, folder = saved["karras"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["deprecated", "KarrasVeScheduler"]  # the reference cannot load this itself
    with pytest.raises(AttributeError):
        diffusers.DiffusionPipeline.from_pretrained(folder)
    ours = _ours(saved, "karras")
    assert type(ours.scheduler).__name__ == "KarrasVeScheduler" and ours.scheduler.config.sigma_max == 0.5
    a = ours(batch_size=2, generator=_seed(), num_inference_steps=4, output_type="np").images
    b = ref(batch_size=2, generator=_seed(), num_inference_steps=4, output_type="np").images
    assert ((a > 0) & (a < 1)).mean() > 0.25
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_dance_diffusion_matches_reference(saved):
    ours, ref = _ours(saved, "dance"), saved["dance"][0]
    kw = dict(batch_size=2, num_inference_steps=4, audio_length_in_s=56 / 16_000)  # padded to 64, cut to 56
    a = ours(generator=_seed(), **kw).audios
    b = ref(generator=_seed(), **kw).audios
    assert isinstance(a, np.ndarray) and a.shape == (2, 2, 56)
    np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="too short"):
        ours(audio_length_in_s=8 / 16_000)


@pytest.mark.parametrize("name", ["text2img", "karras"])
def test_saved_here_loads_in_reference(saved, tmp_path, name):
    ours = _ours(saved, name)
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    if name == "text2img":
        assert index["bert"] == ["latent_diffusion", "LDMBertModel"]
        assert {p.name for p in (tmp_path / "bert").iterdir()} == {"config.json", "model.safetensors"}
    else:
        assert index["scheduler"] == ["diffusers", "KarrasVeScheduler"]
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    args = (PROMPTS,) if name == "text2img" else ()
    a = ours(*args, generator=_seed(), num_inference_steps=2, output_type="np").images
    b = again(*args, generator=_seed(), num_inference_steps=2, output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_ldm_bert_matches_reference_with_mask_and_hidden_states(saved):
    ref = saved["text2img"][0].bert
    ours = diffusekit.LDMBertModel.from_pretrained(saved["text2img"][1] / "bert")
    ids = torch.randint(0, len(WORDS), (2, 77), generator=_seed())
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_hidden_states=True)
        b = ref(ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
    torch.testing.assert_close(a[0], b.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(torch.zeros(1, 78, dtype=torch.long))


def test_ldm_bert_reads_legacy_pickle_and_dtype(saved, tmp_path):
    """Older saves of the reference (the CompVis repo's) hold pytorch_model.bin."""
    bert_folder = saved["text2img"][1] / "bert"
    shutil.copy(bert_folder / "config.json", tmp_path / "config.json")
    torch.save(saved["text2img"][0].bert.state_dict(), tmp_path / "pytorch_model.bin")
    ours = diffusekit.LDMBertModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert ours.dtype == torch.float16 and ours.config.d_model == 32
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        diffusekit.LDMBertModel.from_pretrained(tmp_path, use_safetensors=True)
