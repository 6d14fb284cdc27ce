"""ControlNet (model and the three SD 1.5 pipelines) against the reference, on tiny random parts the
reference saves: one and two nets, guess mode, guidance windows, per-net scales."""

import time

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit
from diffusekit.models.modeling import skip_init
from sd_components import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_text_encoder, tiny_tokenizer

TOL = 1e-4
NET_CONFIG = dict(block_out_channels=(4, 8), layers_per_block=1, cross_attention_dim=32, norm_num_groups=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=2,
                  conditioning_embedding_out_channels=(4, 8))  # one stride-2 conv: the tiny VAE's factor 2
NAMES = {"text": "StableDiffusionControlNetPipeline", "img2img": "StableDiffusionControlNetImg2ImgPipeline",
         "inpaint": "StableDiffusionControlNetInpaintPipeline"}


def reference_net(seed: int, **overrides) -> "diffusers.ControlNetModel":
    """A reference ControlNet whose zero-initialised convs got random values too (fresh nets add nothing)."""
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel(**{**NET_CONFIG, **overrides})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net.eval()


def _image(seed: int, size=(32, 32)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask(size=32) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[6:22, 8:26] = 255
    return Image.fromarray(mask)


def _save_reference(folder, nets, in_channels=4, tmp_factory=None):
    tokenizer = tiny_tokenizer(tmp_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": in_channels})
    vae = diffusers.AutoencoderKL(**VAE_CONFIG)
    parts = dict(vae=vae, text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet,
                 controlnet=nets if len(nets) > 1 else nets[0],
                 scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    cls = NAMES["inpaint"] if in_channels == 9 else NAMES["text"]
    getattr(diffusers, cls)(**parts).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Reference-saved folders: one net, two nets (MultiControlNetModel), and a 9-channel inpainting UNet."""
    one = _save_reference(tmp_path_factory.mktemp("one"), [reference_net(1)], tmp_factory=tmp_path_factory)
    two = _save_reference(tmp_path_factory.mktemp("two"), [reference_net(1), reference_net(2)],
                          tmp_factory=tmp_path_factory)
    nine = _save_reference(tmp_path_factory.mktemp("nine"), [reference_net(3)], in_channels=9,
                           tmp_factory=tmp_path_factory)
    return {"one": one, "two": two, "nine": nine}


_CACHE = {}


def _pair(folder, kind):
    key = (str(folder), kind)
    if key not in _CACHE:
        pipes = []
        for lib in (diffusekit, diffusers):
            pipe = getattr(lib, NAMES[kind]).from_pretrained(folder)
            pipe.set_progress_bar_config(disable=True)
            pipes.append(pipe)
        _CACHE[key] = tuple(pipes)
    return _CACHE[key]


def _both(pair, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("num_inference_steps", 3)
    outs = [pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images for pipe in pair]
    a, b = (np.asarray(o) for o in outs)
    assert a.shape == b.shape
    diff = float(np.abs(a - b).max())
    assert diff <= TOL, diff
    return a


def test_folders_load_as_our_classes(folders):
    ours, _ = _pair(folders["two"], "text")
    assert isinstance(ours.controlnet, diffusekit.MultiControlNetModel) and len(ours.controlnet.nets) == 2
    assert isinstance(ours.controlnet.nets[1], diffusekit.ControlNetModel)
    generic = diffusekit.DiffusionPipeline.from_pretrained(folders["one"])
    assert type(generic).__name__ == "StableDiffusionControlNetPipeline"


@pytest.mark.parametrize("options", [
    dict(),
    dict(guess_mode=True, guidance_scale=4.0),
    dict(control_guidance_start=0.3, control_guidance_end=0.7, controlnet_conditioning_scale=0.6),
    dict(guidance_scale=1.0, height=24, width=40),
    dict(prompt=["the cat", "a dog"], num_images_per_prompt=2),
])
def test_text_to_image_one_net(folders, options):
    pair = _pair(folders["one"], "text")
    out = _both(pair, **{"prompt": "the cat", "image": _image(0), **options})
    assert out.shape[1:3] == ((24, 40) if "height" in options else (32, 32))


@pytest.mark.parametrize("options", [
    dict(controlnet_conditioning_scale=[0.5, 1.5]),
    dict(guess_mode=True, control_guidance_start=[0.0, 0.4], control_guidance_end=[0.6, 1.0]),
])
def test_text_to_image_two_nets(folders, options):
    pair = _pair(folders["two"], "text")
    _both(pair, prompt="a dog", image=[_image(0), _image(1)], negative_prompt="cat", **options)


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "UniPCMultistepScheduler"])
def test_text_to_image_other_schedulers(folders, scheduler, tmp_path):
    ours, ref = (getattr(lib, NAMES["text"]).from_pretrained(folders["one"]) for lib in (diffusekit, diffusers))
    for pipe, lib in ((ours, diffusekit), (ref, diffusers)):
        pipe.scheduler = getattr(lib, scheduler).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    for guess_mode in (False, True):
        _both((ours, ref), prompt="the cat", image=_image(4), guess_mode=guess_mode)


def test_text_to_image_two_nets_per_prompt_images(folders):
    pair = _pair(folders["two"], "text")
    images = [[_image(0), _image(1)], [_image(2), _image(3)]]
    _both(pair, prompt=["the cat", "a dog"], image=images)


@pytest.mark.parametrize("folder, options", [
    ("one", dict()),
    ("one", dict(guess_mode=True, controlnet_conditioning_scale=1.0, strength=0.5)),
    ("two", dict(controlnet_conditioning_scale=[0.3, 0.9], control_guidance_end=0.5)),
])
def test_image_to_image(folders, folder, options):
    pair = _pair(folders[folder], "img2img")
    control = [_image(1), _image(2)] if folder == "two" else _image(1)
    _both(pair, prompt="the cat", image=_image(5), control_image=control, num_inference_steps=4, **options)


@pytest.mark.parametrize("folder, options", [
    ("one", dict()),
    ("one", dict(strength=0.7, guess_mode=True)),
    ("two", dict(controlnet_conditioning_scale=[1.0, 0.4], control_guidance_start=[0.0, 0.5])),
    ("nine", dict()),
    ("nine", dict(padding_mask_crop=2, output_type="pil")),
])
def test_inpaint(folders, folder, options):
    pair = _pair(folders[folder], "inpaint")
    control = [_image(1), _image(2)] if folder == "two" else _image(1)
    image = _image(7, (36, 36)) if "padding_mask_crop" in options else _image(7)
    mask = _mask(36) if "padding_mask_crop" in options else _mask()
    _both(pair, prompt="a dog", image=image, mask_image=mask, control_image=control, num_inference_steps=4,
          **options)


def test_control_image_callback(folders):
    pair = _pair(folders["one"], "text")
    seen = []

    def brighten(pipe, step, t, tensors):
        seen.append(sorted(tensors))
        return {"image": tensors["image"] * 0.5}

    _both(pair, prompt="the cat", image=_image(0), callback_on_step_end=brighten,
          callback_on_step_end_tensor_inputs=["latents", "image"])
    assert seen[0] == ["image", "latents"]


def test_argument_errors(folders):
    ours, _ = _pair(folders["two"], "text")
    with pytest.raises(ValueError, match="list of 2 numbers"):
        ours(prompt="a", image=[_image(0), _image(1)], controlnet_conditioning_scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="list of 2 images"):
        ours(prompt="a", image=_image(0), num_inference_steps=1)
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        ours(prompt="a", image=[_image(0), _image(1)], control_guidance_start=0.8, control_guidance_end=0.2)
    one, _ = _pair(folders["one"], "text")
    with pytest.raises(ValueError, match="holds 3 images but there are 2 prompts"):
        one(prompt=["a", "b"], image=[_image(0)] * 3, num_inference_steps=1)


def test_our_saved_controlnet_loads_in_the_reference(folders, tmp_path):
    ours = diffusekit.ControlNetModel.from_pretrained(folders["one"] / "controlnet")
    ours.save_pretrained(tmp_path / "cn")
    ref = diffusers.ControlNetModel.from_pretrained(tmp_path / "cn")
    generator = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor(500),
            torch.randn(2, 7, 32, generator=generator), torch.rand(2, 3, 32, 32, generator=generator))
    with torch.no_grad():
        a = ours(*args, conditioning_scale=0.7, return_dict=False)
        b = ref(*args, conditioning_scale=0.7, return_dict=False)
    assert max(float((x - y).abs().max()) for x, y in zip(a[0] + [a[1]], list(b[0]) + [b[1]])) <= TOL
    pipe, _ = _pair(folders["two"], "text")
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = diffusers.StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.controlnet, diffusers.MultiControlNetModel) and len(loaded.controlnet.nets) == 2


def test_sdxl_style_net_matches_reference():
    """addition_embed_type text_time (SDXL ControlNets): same residuals as the reference."""
    overrides = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=8 + 6 * 4, transformer_layers_per_block=(1, 2),
                     use_linear_projection=True)
    ref = reference_net(4, **overrides)
    ours = diffusekit.ControlNetModel(**{**NET_CONFIG, **overrides})
    ours.load_state_dict(ref.state_dict())
    generator = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 20]),
            torch.randn(2, 5, 32, generator=generator), torch.rand(2, 3, 16, 16, generator=generator))
    added = dict(text_embeds=torch.randn(2, 8, generator=generator), time_ids=torch.rand(2, 6, generator=generator))
    for guess_mode in (False, True):
        with torch.no_grad():
            a = ours(*args, added_cond_kwargs=added, guess_mode=guess_mode, return_dict=False)
            b = ref(*args, added_cond_kwargs=added, guess_mode=guess_mode, return_dict=False)
        assert max(float((x - y).abs().max()) for x, y in zip(a[0] + [a[1]], list(b[0]) + [b[1]])) <= TOL


@pytest.mark.slow
def test_full_size_sd15_controlnet_residuals(all_threads):
    """The shipped SD 1.5 ControlNet config with seeded random weights (the zero convs too): one call,
    CPU, 64x64 latents, 1e-4 relative to each residual's largest value."""
    config = diffusekit.ControlNetModel.load_config(_shipped_config())
    torch.manual_seed(0)
    ref = diffusers.ControlNetModel.from_config(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    with skip_init(device="meta"):
        ours = diffusekit.ControlNetModel.from_config(config)
    ours.load_checked_state_dict(dict(ref.state_dict()))
    ours.eval()
    generator = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 4, 64, 64, generator=generator), torch.tensor(500),
            torch.randn(1, 77, 768, generator=generator), torch.rand(1, 3, 512, 512, generator=generator))
    with torch.no_grad():
        start = time.perf_counter()
        a = ours(*args, return_dict=False)
        seconds = time.perf_counter() - start
        b = ref(*args, return_dict=False)
    relative = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a[0] + [a[1]], list(b[0]) + [b[1]]))
    assert relative <= TOL
    print(f"full-size SD1.5 ControlNet: ours {seconds:.1f}s per call, max relative difference {relative:.2e}")


def _shipped_config():
    from diffusekit.loaders.single_file_model import CONFIG_ROOT

    return CONFIG_ROOT / "controlnet_sd1" / "config.json"


def test_original_layout_file_loads_alike_in_both(tmp_path):
    """The test helper's original-layout file is what the reference's single-file loader reads, and ours
    loads it equal to the folder (the original hint block has 4 levels, as the reference's loader expects)."""
    from safetensors.torch import save_file

    from controlnet_files import original_controlnet_state

    folder = tmp_path / "controlnet"
    reference_net(5, conditioning_embedding_out_channels=(4, 4, 8, 8)).save_pretrained(folder)
    net = diffusekit.ControlNetModel.from_pretrained(folder)
    path = tmp_path / "control_tiny.safetensors"
    save_file(original_controlnet_state(net.state_dict(), dict(net.config), prefix="control_model."), str(path))
    ours = diffusekit.ControlNetModel.from_single_file(path, config=folder)
    ref = diffusers.ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True)
    expected = diffusers.ControlNetModel.from_pretrained(folder).state_dict()
    for key, tensor in expected.items():
        assert torch.equal(ours.state_dict()[key], tensor), key
        assert torch.equal(ref.state_dict()[key], tensor), key


def test_from_unet_same_seed_same_weights():
    """from_unet (how ControlNets are trained) draws the hint block's weights as the reference does."""
    nets = []
    for lib in (diffusers, diffusekit):
        torch.manual_seed(0)
        unet = lib.UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(1)
        nets.append(lib.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8)).state_dict())
    assert list(nets[0]) == list(nets[1])
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])


def test_attention_slicing_and_concurrent_calls(folders):
    """Slicing leaves the result unchanged; two calls at once on one pipeline keep their own residuals."""
    from concurrent.futures import ThreadPoolExecutor

    ours, ref = _pair(folders["two"], "text")
    kwargs = dict(prompt="a dog", num_inference_steps=3, output_type="np")
    calls = [dict(image=[_image(0), _image(1)], controlnet_conditioning_scale=[0.5, 1.0]),
             dict(image=[_image(2), _image(3)], guess_mode=True, control_guidance_end=0.5)]
    expected = [ref(generator=torch.Generator().manual_seed(0), **kwargs, **c).images for c in calls]
    ours.enable_attention_slicing("max")
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(lambda c=c: ours(generator=torch.Generator().manual_seed(0), **kwargs, **c).images)
                       for c in calls]
            results = [f.result() for f in futures]
    finally:
        ours.disable_attention_slicing()
    for got, want in zip(results, expected):
        assert float(np.abs(got - want).max()) <= TOL
