"""IP-Adapter (plain and plus) on the SD and SDXL pipelines against the reference: tiny random
pipelines the reference saves, a tiny random adapter file in the reference's layout with a CLIP
vision image encoder beside it, loaded by both libraries with ``load_ip_adapter``."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor

import diffusekit
from diffusekit.loaders.ip_adapter import attach_ip_adapters, build_ip_adapters, detach_ip_adapters, split_parts
from ip_adapter_files import ip_adapter_state, save_ip_adapter, tiny_image_encoder
from sd_components import SCHEDULER_CONFIG as SD_SCHEDULER
from sd_components import UNET_CONFIG as SD_UNET
from sd_components import VAE_CONFIG, tiny_text_encoder, tiny_tokenizer
from sdxl_pipeline_parts import SCHEDULER_CONFIG as XL_SCHEDULER
from sdxl_pipeline_parts import UNET_CONFIG as XL_UNET
from sdxl_pipeline_parts import text_encoders

TOL = 1e-4
WEIGHT = "ip-adapter.safetensors"
TASKS = {"sd": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
         "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")}


def _image(seed=0, size=(40, 48)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8"))


def _mask() -> Image.Image:
    values = np.zeros((32, 32), dtype="uint8")
    values[4:20, 8:24] = 255
    return Image.fromarray(values)


def _save_sd(folder, tokenizer, **extra):
    torch.manual_seed(0)
    unet, vae = diffusers.UNet2DConditionModel(**SD_UNET), diffusers.AutoencoderKL(**VAE_CONFIG)
    parts = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler.from_config(SD_SCHEDULER), **{**parts, **extra}).save_pretrained(folder)
    return unet


def _save_sdxl(folder, tokenizer):
    text_encoder, text_encoder_2 = text_encoders(tokenizer)
    torch.manual_seed(0)
    unet, vae = diffusers.UNet2DConditionModel(**XL_UNET), diffusers.AutoencoderKL(**VAE_CONFIG)
    diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=diffusers.EulerDiscreteScheduler(**XL_SCHEDULER), add_watermarker=False,
    ).save_pretrained(folder)
    return unet


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: (pipeline folder, {kind: adapter folder})}."""
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    result = {}
    for family, save in (("sd", _save_sd), ("sdxl", _save_sdxl)):
        folder = tmp_path_factory.mktemp(family)
        unet = save(folder, tokenizer)
        adapters = {kind: tmp_path_factory.mktemp(f"{family}_{kind}") for kind in ("plain", "plus")}
        for seed, (kind, adapter) in enumerate(adapters.items()):
            save_ip_adapter(adapter, unet, kind, seed=seed)
        result[family] = folder, adapters
    return result


def _load(lib, name, folder):
    extra = {"add_watermarker": False} if lib is diffusers and "XL" in name else {}
    pipe = getattr(lib, name).from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pair(folders, family, kind, task=0, scale=0.7):
    """(ours, reference) for ``TASKS[family][task]`` with the ``kind`` adapter loaded at ``scale``."""
    folder, adapters = folders[family]
    pipes = [_load(lib, TASKS[family][task], folder) for lib in (diffusekit, diffusers)]
    for pipe in pipes:
        pipe.load_ip_adapter(str(adapters[kind]), subfolder="", weight_name=WEIGHT)
        pipe.set_ip_adapter_scale(scale)
    return pipes


def _run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("prompt", "a cat")
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def _task_inputs(task: int) -> dict:
    return [{}, dict(image=_image(1, (32, 32)), strength=0.8),
            dict(image=_image(1, (32, 32)), mask_image=_mask(), strength=0.8)][task]


def _close(ours, ref) -> float:
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, diff
    return diff


@pytest.mark.parametrize("kind", ["plain", "plus"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_txt2img_matches_reference(folders, family, kind):
    ours, ref = _pair(folders, family, kind)
    assert type(ours.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert ours.feature_extractor.crop_size == ref.feature_extractor.crop_size
    kwargs = dict(ip_adapter_image=_image(), num_images_per_prompt=2)
    _close(_run(ours, **kwargs), _run(ref, **kwargs))


@pytest.mark.parametrize("task", [1, 2], ids=["img2img", "inpaint"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_img2img_and_inpaint_match_reference(folders, family, task):
    ours, ref = _pair(folders, family, "plus" if task == 2 else "plain", task)
    kwargs = dict(ip_adapter_image=_image(), **_task_inputs(task))
    _close(_run(ours, **kwargs), _run(ref, **kwargs))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_image_embeds_path(folders, family):
    """Embeddings prepared once (negative half first) give the image path's result, in both libraries."""
    ours, ref = _pair(folders, family, "plus")
    embeds = ours.prepare_ip_adapter_image_embeds(_image(), None, torch.device("cpu"), 1, True)
    ref_embeds = ref.prepare_ip_adapter_image_embeds(_image(), None, torch.device("cpu"), 1, True)
    assert [e.shape for e in embeds] == [e.shape for e in ref_embeds]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(embeds, ref_embeds))
    from_image = _run(ours, ip_adapter_image=_image())
    from_embeds = _run(ours, ip_adapter_image_embeds=embeds)
    np.testing.assert_array_equal(from_embeds, from_image)
    _close(from_embeds, _run(ref, ip_adapter_image_embeds=embeds))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_scale_zero_and_unload_equal_the_pipeline_without_adapter(folders, family):
    folder, adapters = folders[family]
    pipe = _load(diffusekit, TASKS[family][0], folder)
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    before = _run(pipe)
    pipe.load_ip_adapter(str(adapters["plain"]), subfolder="", weight_name=WEIGHT)
    assert pipe.unet.config.encoder_hid_dim_type == "ip_image_proj"
    assert len(pipe.unet.state_dict()) > len(state)
    pipe.set_ip_adapter_scale(0.0)
    np.testing.assert_array_equal(_run(pipe, ip_adapter_image=_image()), before)
    pipe.set_ip_adapter_scale(1.0)
    assert np.abs(_run(pipe, ip_adapter_image=_image()) - before).max() > 1e-2
    pipe.unload_ip_adapter()
    np.testing.assert_array_equal(_run(pipe), before)
    after = pipe.unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors
    assert pipe.unet.encoder_hid_proj is None and pipe.unet.config.encoder_hid_dim_type is None
    assert pipe.image_encoder is None and pipe.config.image_encoder == [None, None]
    assert (pipe.feature_extractor is None) == (family == "sdxl")  # the reference keeps it beside a safety checker slot


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_per_block_scale_matches_reference(folders, family):
    ours, ref = _pair(folders, family, "plain")
    scale = {"down": {"block_1": [0.5]}, "up": {"block_0": [0.0, 1.0]}}
    for pipe in (ours, ref):
        pipe.set_ip_adapter_scale(scale)
    scales = [{k: v.scale for k, v in p.unet.attn_processors.items() if hasattr(v, "to_k_ip")} for p in (ours, ref)]
    assert scales[0] == scales[1]
    assert sorted({s[0] for s in scales[0].values()}) == [0.0, 0.5, 1.0]
    _close(_run(ours, ip_adapter_image=_image()), _run(ref, ip_adapter_image=_image()))


def test_pickle_file_and_model_index_image_encoder(folders, tmp_path):
    """A ``.bin`` adapter (nested dicts, read with weights_only) into a pipeline whose model_index.json
    names an image encoder and feature extractor (loaded from the folder, not from beside the adapter)."""
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    extra = dict(image_encoder=tiny_image_encoder(3), feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    unet = _save_sd(tmp_path / "sd", tokenizer, **extra)
    adapter = save_ip_adapter(tmp_path / "adapter", unet, "plus", seed=5, encoder=False)
    flat = load_file(adapter)
    nested = {part: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    torch.save(nested, tmp_path / "adapter" / "ip-adapter.bin")
    ours = diffusekit.DiffusionPipeline.from_pretrained(tmp_path / "sd")
    ref = _load(diffusers, "StableDiffusionPipeline", tmp_path / "sd")
    ours.set_progress_bar_config(disable=True)
    assert type(ours.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    for pipe in (ours, ref):
        pipe.load_ip_adapter(str(tmp_path / "adapter"), subfolder="", weight_name="ip-adapter.bin")
    _close(_run(ours, ip_adapter_image=_image()), _run(ref, ip_adapter_image=_image()))


def test_sdxl_step_callback_keeps_the_image_prompt(folders):
    """A step callback that replaces the added conditioning (add_text_embeds, add_time_ids) keeps image_embeds."""
    ours, _ = _pair(folders, "sdxl", "plain")
    seen = []

    def callback(pipe, step, t, tensors):
        seen.append(step)
        return {k: v.clone() for k, v in tensors.items()}

    with_callback = _run(ours, ip_adapter_image=_image(), callback_on_step_end=callback,
                         callback_on_step_end_tensor_inputs=["latents", "add_text_embeds", "add_time_ids"])
    assert seen == [0, 1]
    np.testing.assert_array_equal(with_callback, _run(ours, ip_adapter_image=_image()))


def test_unet_with_a_text_projection(tmp_path):
    """A UNet with ``encoder_hid_dim`` (text_proj): the text projection runs before the IP pair, unload restores it."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**SD_UNET, encoder_hid_dim=16)
    ref.save_pretrained(tmp_path)
    ours = diffusekit.UNet2DConditionModel.from_pretrained(tmp_path)
    text_proj = ours.encoder_hid_proj
    gen = torch.Generator().manual_seed(1)
    sample, states = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    image_embeds = [torch.randn(2, 1, 16, generator=gen)]
    before = ours(sample, 10, states).sample
    parts = split_parts(ip_adapter_state(ref, "plain", seed=2), "test state")
    ref._load_ip_adapter_weights([parts])
    attach_ip_adapters(ours, *build_ip_adapters(ours, [parts], ["test state"]))
    with torch.no_grad():
        got = ours(sample, 10, states, added_cond_kwargs={"image_embeds": image_embeds}).sample
        want = ref(sample, 10, states, added_cond_kwargs={"image_embeds": image_embeds}).sample
    _close(got.numpy(), want.numpy())
    detach_ip_adapters(ours)
    assert ours.encoder_hid_proj is text_proj and ours.config.encoder_hid_dim_type == "text_proj"
    assert not hasattr(ours, "text_encoder_hid_proj")
    assert torch.equal(ours(sample, 10, states).sample, before)


@pytest.mark.parametrize("mask_size", [(32, 32), (32, 48)], ids=["same-aspect", "other-aspect"])
def test_ip_adapter_masks_match_reference(folders, mask_size):
    """``cross_attention_kwargs={"ip_adapter_masks": [...]}``: the image prompt acts on the masked half only
    (a mask of another aspect ratio is padded to the queries, with the reference's warning)."""
    ours, ref = _pair(folders, "sd", "plain")
    mask = torch.zeros(1, 1, *mask_size)
    mask[..., : mask_size[1] // 2] = 1
    kwargs = dict(ip_adapter_image=_image(), cross_attention_kwargs={"ip_adapter_masks": [mask]})
    if mask_size[0] == mask_size[1]:
        masked = _run(ours, **kwargs)
    else:
        with pytest.warns(UserWarning, match="aspect ratio"):
            masked = _run(ours, **kwargs)
    _close(masked, _run(ref, **kwargs))
    assert np.abs(masked - _run(ours, ip_adapter_image=_image())).max() > 1e-3
