"""FLUX control against the reference on tiny random parts it saves: FluxControlNetModel (plain and
union), FluxControlNetPipeline with one and two nets, FluxControlPipeline, and the control LoRAs
that widen the transformer's ``x_embedder``."""

import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit
from diffusekit.pipelines.flux_common import latent_image_ids
from flux_components import TRANSFORMER_CONFIG
from test_flux import flux_folder  # noqa: F401  (the saved tiny reference FluxPipeline)

TOL = 1e-4
SHORT = dict(max_sequence_length=16, num_inference_steps=2, height=32, width=32, output_type="np")


def _image(seed: int, size=(40, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _close(ours, ref, tol=TOL):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tol, np.abs(ours - ref).max()


def _run(pipe, seed=0, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(seed), **{**SHORT, **kwargs}).images


def _reference_controlnet(seed: int, **config) -> diffusers.FluxControlNetModel:
    """A reference ControlNet with random (not zero) residual maps."""
    torch.manual_seed(seed)
    net = diffusers.FluxControlNetModel(**{**TRANSFORMER_CONFIG, **config})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return net.eval()


def _pair(ref_net, folder):
    ref_net.save_pretrained(folder)
    return diffusekit.FluxControlNetModel.from_pretrained(folder), ref_net


@pytest.fixture(scope="module")
def base(flux_folder):  # noqa: F811
    ours, ref = diffusekit.FluxPipeline.from_pretrained(flux_folder), diffusers.FluxPipeline.from_pretrained(flux_folder)
    return ours.components, ref.components


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    return [_pair(_reference_controlnet(seed), tmp_path_factory.mktemp(f"net{seed}")) for seed in (1, 2)]


def _pipes(base, pairs):
    """(ours, reference) FluxControlNetPipeline on the base parts with the nets of ``pairs`` (a list: Multi)."""
    made = []
    for lib, components, nets in ((diffusekit, base[0], [p[0] for p in pairs]), (diffusers, base[1], [p[1] for p in pairs])):
        pipe = lib.FluxControlNetPipeline(**components, controlnet=nets[0] if len(nets) == 1 else nets)
        pipe.set_progress_bar_config(disable=True)
        made.append(pipe)
    return made


# -- the model ------------------------------------------------------------------------------------


def _net_inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 24, 16, generator=g), controlnet_cond=torch.randn(batch, 24, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.rand(batch, generator=g),
                img_ids=latent_image_ids(4, 6), txt_ids=torch.zeros(5, 3), guidance=torch.full((batch,), 3.5))


@pytest.mark.parametrize("num_mode", [None, 3])
def test_controlnet_model_matches_reference_and_saves_for_it(num_mode, tmp_path):
    config = {**TRANSFORMER_CONFIG, "num_layers": 2, "num_mode": num_mode}
    torch.manual_seed(0)
    fresh_ref = diffusers.FluxControlNetModel(**config)
    torch.manual_seed(0)
    fresh = diffusekit.FluxControlNetModel(**config)
    assert list(fresh.state_dict()) == list(fresh_ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), fresh_ref.state_dict().values()))
    assert not fresh.controlnet_x_embedder.weight.any() and not fresh.controlnet_blocks[0].weight.any()

    ours, ref = _pair(_reference_controlnet(3, num_layers=2, num_mode=num_mode), tmp_path / "ref")
    inputs = {**_net_inputs(), "conditioning_scale": 0.7}
    if num_mode:
        inputs["controlnet_mode"] = torch.tensor([[1], [2]])
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)
        out = ours(**inputs)
    assert len(out.controlnet_block_samples) == 2 and len(out.controlnet_single_block_samples) == 1
    for a, b in zip(out.controlnet_block_samples + out.controlnet_single_block_samples, expected[0] + expected[1]):
        _close(a, b, 1e-5)
    if num_mode:
        with pytest.raises(ValueError, match="controlnet_mode is required"):
            ours(**{**inputs, "controlnet_mode": None})

    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["_class_name"] == "FluxControlNetModel"
    reloaded = diffusers.FluxControlNetModel.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        again = reloaded(**inputs, return_dict=False)
    for a, b in zip(again[0] + again[1], expected[0] + expected[1]):
        assert torch.equal(a, b)


def test_from_transformer_copies_the_trunk():
    torch.manual_seed(0)
    ref_transformer = diffusers.FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, "num_layers": 2})
    transformer = diffusekit.FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, "num_layers": 2})
    transformer.load_checked_state_dict(ref_transformer.state_dict())
    options = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2)
    torch.manual_seed(1)
    ref = diffusers.FluxControlNetModel.from_transformer(ref_transformer, **options)
    torch.manual_seed(1)
    ours = diffusekit.FluxControlNetModel.from_transformer(transformer, **options)
    assert ours.config.num_layers == 1 and ours.config.in_channels == 16 and ours.config.guidance_embeds
    for (key, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), key
    torch.testing.assert_close(ours.transformer_blocks[0].attn.to_q.weight, transformer.transformer_blocks[0].attn.to_q.weight)
    with pytest.raises(ValueError, match="conditioning_embedding_channels"):
        diffusekit.FluxControlNetModel(**TRANSFORMER_CONFIG, conditioning_embedding_channels=16)


# -- FluxControlNetPipeline -----------------------------------------------------------------------


def test_one_controlnet_scale_and_guidance_window(base, nets):
    ours, ref = _pipes(base, nets[:1])
    kwargs = dict(prompt="a red cat", control_image=_image(0), controlnet_conditioning_scale=0.7, guidance_scale=3.5)
    out = _run(ours, **kwargs)
    assert out.shape == (1, 32, 32, 3)
    _close(out, _run(ref, **kwargs))
    assert not np.allclose(out, _run(ours, **{**kwargs, "controlnet_conditioning_scale": 0.0}), atol=1e-3)
    window = dict(kwargs, control_guidance_start=0.5, control_guidance_end=1.0, num_inference_steps=3)
    _close(_run(ours, **window), _run(ref, **window))
    off = dict(kwargs, controlnet_conditioning_scale=0.0)
    np.testing.assert_allclose(_run(ours, **off), _run(ours, **{**kwargs, "control_guidance_end": 0.4}), atol=1e-6)


def test_one_controlnet_batch_true_cfg_and_tensor_image(base, nets):
    ours, ref = _pipes(base, nets[:1])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (4, 5, 6, 7)]  # noqa: E731
    kwargs = dict(prompt=["a cat", "the dog"], control_image=_image(1, (48, 32)), num_images_per_prompt=2,
                  negative_prompt=["ugly", "blurry"], true_cfg_scale=2.0, controlnet_conditioning_scale=[1.3],
                  **{**SHORT, "height": 48, "width": 32})
    out = ours(generator=gens(), **kwargs).images
    assert out.shape == (4, 48, 32, 3)
    _close(out, ref(generator=gens(), **kwargs).images)
    tensor = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1  # taken as it is
    kwargs = dict(prompt="a blue sky", control_image=tensor)
    out = _run(ours, **kwargs)
    assert out.shape == (1, 32, 48, 3)  # the control image's size
    _close(out, _run(ref, **kwargs))


def test_two_controlnets(base, nets):
    ours, ref = _pipes(base, nets)
    assert isinstance(ours.controlnet, diffusekit.FluxMultiControlNetModel)
    kwargs = dict(prompt="a photo of a cat", control_image=[_image(2), _image(3)],
                  controlnet_conditioning_scale=[0.5, 1.2], control_guidance_start=[0.0, 0.5],
                  control_guidance_end=[0.5, 1.0], num_inference_steps=4)
    out = _run(ours, **kwargs)
    _close(out, _run(ref, **kwargs))
    one = _run(_pipes(base, nets[:1])[0], prompt="a photo of a cat", control_image=_image(2),
               controlnet_conditioning_scale=0.5, control_guidance_end=0.5, num_inference_steps=4)
    assert not np.allclose(out, one, atol=1e-3)
    with pytest.raises(ValueError, match="control_mode holds 1"):
        ours(prompt="a", control_image=[_image(2), _image(3)], control_mode=[0], **SHORT)
    with pytest.raises(ValueError, match="must be a list"):
        ours(prompt="a", control_image=_image(2), **SHORT)
    with pytest.raises(ValueError, match="save each of its nets"):
        ours.controlnet.save_pretrained("unused")


def test_union_controlnet_modes(base, tmp_path):
    union = _pair(_reference_controlnet(4, num_mode=4), tmp_path)
    ours, ref = _pipes(base, [union])
    kwargs = dict(prompt="a red cat", control_image=_image(4), control_mode=2)
    out = _run(ours, **kwargs)
    _close(out, _run(ref, **kwargs))
    assert not np.allclose(out, _run(ours, **{**kwargs, "control_mode": 1}), atol=1e-3)
    with pytest.raises(ValueError, match="control_mode must be an int"):
        ours(prompt="a", control_image=_image(4), control_mode=[1], **SHORT)
    multi_ours, multi_ref = (type(p)(**{**p.components, "controlnet": [p.controlnet]}) for p in (ours, ref))
    for pipe in (multi_ours, multi_ref):  # one union net, two conditions
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red cat", control_image=[_image(4), _image(5)], control_mode=[2, 0],
                  controlnet_conditioning_scale=[0.6, 0.9], control_guidance_start=[0.0, 0.0],
                  control_guidance_end=[1.0, 1.0])
    _close(_run(multi_ours, **kwargs), _run(multi_ref, **kwargs))


def test_model_index_loading_both_ways(base, nets, tmp_path):
    ours, ref = _pipes(base, nets[:1])
    ref.save_pretrained(tmp_path / "ref")
    loaded = diffusekit.DiffusionPipeline.from_pretrained(tmp_path / "ref")
    assert type(loaded) is diffusekit.FluxControlNetPipeline
    assert type(loaded.controlnet) is diffusekit.FluxControlNetModel
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="the cat", control_image=_image(6))
    expected = _run(ref, **kwargs)
    _close(_run(loaded, **kwargs), expected)
    ours.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["controlnet"] == ["diffusers", "FluxControlNetModel"]
    again = diffusers.FluxControlNetPipeline.from_pretrained(tmp_path / "ours")
    again.set_progress_bar_config(disable=True)
    _close(_run(again, **kwargs), expected)


# -- FluxControlPipeline and control LoRAs --------------------------------------------------------


def _control_pipes(base, ref_transformer):
    transformer = diffusekit.FluxTransformer2DModel.from_config(dict(ref_transformer.config))
    transformer.load_checked_state_dict(ref_transformer.state_dict())
    made = []
    for lib, components, model in ((diffusekit, base[0], transformer), (diffusers, base[1], ref_transformer)):
        pipe = lib.FluxControlPipeline(**{k: v for k, v in components.items()
                                          if k not in ("transformer", "image_encoder", "feature_extractor")},
                                       transformer=model)
        pipe.set_progress_bar_config(disable=True)
        made.append(pipe)
    return made


def test_control_pipeline_concatenates_control_latents(base):
    torch.manual_seed(5)
    ref_transformer = diffusers.FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, "in_channels": 32, "out_channels": 16})
    ours, ref = _control_pipes(base, ref_transformer)
    kwargs = dict(prompt="a red cat", control_image=_image(7), guidance_scale=4.0)
    out = _run(ours, **kwargs)
    assert out.shape == (1, 32, 32, 3)
    _close(out, _run(ref, **kwargs))
    assert not np.allclose(out, _run(ours, **{**kwargs, "control_image": _image(8)}), atol=1e-3)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    kwargs = dict(prompt="the dog", control_image=_image(9, (32, 48)), num_images_per_prompt=2,
                  **{**SHORT, "height": 32, "width": 48})
    _close(ours(generator=gens(), **kwargs).images, ref(generator=gens(), **kwargs).images)
    with pytest.raises(ValueError, match="control_image is required"):
        ours(prompt="a", **SHORT)


def _control_lora(seed: int, in_features: int) -> dict[str, torch.Tensor]:
    """A control LoRA for the tiny transformer: x_embedder widened to ``in_features``, a q LoRA and a norm."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    return {"transformer.x_embedder.lora_A.weight": rand(4, in_features),
            "transformer.x_embedder.lora_B.weight": rand(32, 4),
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rand(4, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rand(32, 4),
            "transformer.single_transformer_blocks.0.attn.norm_k.weight": 1 + rand(16)}


@pytest.fixture
def lora_pipes(base, flux_folder):  # noqa: F811
    """Control pipelines on fresh copies of the plain (in_channels 16) transformer."""
    return _control_pipes(base, diffusers.FluxTransformer2DModel.from_pretrained(flux_folder / "transformer"))


def test_control_lora_widens_x_embedder_and_unloads(lora_pipes, base):
    ours, ref = lora_pipes
    with pytest.raises(ValueError, match="in_channels 32 .*got 16; .* load a control LoRA"):
        ours(prompt="a", control_image=_image(10), **SHORT)
    plain = diffusekit.FluxPipeline(**{**base[0], "transformer": ours.transformer})
    plain.set_progress_bar_config(disable=True)
    before = _run(plain, prompt="a cat")
    original = ours.transformer.x_embedder.weight
    lora = _control_lora(0, 32)
    for pipe in (ours, ref):
        pipe.load_lora_weights(dict(lora), adapter_name="canny")
        assert pipe.transformer.config.in_channels == 32 and pipe.transformer.x_embedder.weight.shape == (32, 32)
    torch.testing.assert_close(ours.transformer.x_embedder.weight[:, :16], original, rtol=0, atol=0)
    assert not ours.transformer.x_embedder.weight[:, 16:].any()
    kwargs = dict(prompt="a red cat", control_image=_image(10))
    _close(_run(ours, **kwargs), _run(ref, **kwargs))

    regular = {k: v for k, v in _control_lora(1, 16).items() if "norm" not in k}
    for pipe in (ours, ref):  # a FLUX.1 LoRA after the control LoRA: its x_embedder lora_A is zero-padded
        pipe.load_lora_weights(regular, adapter_name="style")
        pipe.set_adapters(["canny", "style"], [1.0, 0.8])
    _close(_run(ours, **kwargs), _run(ref, **kwargs))

    ours.unload_lora_weights()
    ref.unload_lora_weights()
    assert ours.transformer.config.in_channels == 32  # still wide without reset_to_overwritten_params
    _close(_run(ours, **kwargs), _run(ref, **kwargs))
    ours.unload_lora_weights(reset_to_overwritten_params=True)
    assert ours.transformer.x_embedder.weight is original and ours.transformer.config.in_channels == 16
    np.testing.assert_array_equal(_run(plain, prompt="a cat"), before)


def test_control_lora_adapters_set_fuse_and_unfuse(lora_pipes):
    ours, ref = lora_pipes
    kwargs = dict(prompt="a red cat", control_image=_image(11))
    regular = {k: v for k, v in _control_lora(1, 16).items() if "norm" not in k}
    for pipe in (ours, ref):
        pipe.load_lora_weights(_control_lora(0, 32), adapter_name="canny")
        pipe.load_lora_weights(dict(regular), adapter_name="style")
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["style"]
    _close(_run(ours, **kwargs), _run(ref, **kwargs))
    for pipe in (ours, ref):
        pipe.set_adapters(["canny", "style"], [1.0, 0.8])
    unfused = _run(ours, **kwargs)
    _close(unfused, _run(ref, **kwargs))
    for pipe in (ours, ref):
        pipe.fuse_lora(lora_scale=1.0, adapter_names=["canny", "style"])
    _close(_run(ours, **kwargs), unfused)
    _close(_run(ours, **kwargs), _run(ref, **kwargs))
    for pipe in (ours, ref):
        pipe.unfuse_lora()
    _close(_run(ours, **kwargs), unfused, 1e-6)


def test_control_pipeline_model_index_both_ways(base, tmp_path):
    torch.manual_seed(6)
    ref_transformer = diffusers.FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, "in_channels": 32, "out_channels": 16})
    ours, ref = _control_pipes(base, ref_transformer)
    ref.save_pretrained(tmp_path / "ref")
    loaded = diffusekit.DiffusionPipeline.from_pretrained(tmp_path / "ref")
    assert type(loaded) is diffusekit.FluxControlPipeline
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", control_image=_image(11))
    expected = _run(ref, **kwargs)
    _close(_run(loaded, **kwargs), expected)
    ours.save_pretrained(tmp_path / "ours")
    again = diffusers.FluxControlPipeline.from_pretrained(tmp_path / "ours")
    again.set_progress_bar_config(disable=True)
    _close(_run(again, **kwargs), expected)


def test_controlnet_callback_and_calls_from_threads(base, nets):
    from concurrent.futures import ThreadPoolExecutor

    ours, ref = _pipes(base, nets[:1])
    seen = []

    def fade_control(pipe, step, t, tensors):
        seen.append(sorted(tensors))
        return {"control_image": tensors["control_image"] * 0.5}

    kwargs = dict(prompt="a cat", control_image=_image(12), callback_on_step_end=fade_control,
                  callback_on_step_end_tensor_inputs=["latents", "control_image"], num_inference_steps=3)
    _close(_run(ours, **kwargs), _run(ref, **kwargs))
    assert seen[0] == ["control_image", "latents"]

    calls = [dict(prompt="a cat", control_image=_image(13), controlnet_conditioning_scale=s) for s in (0.3, 1.5)]
    alone = [_run(ours, **c) for c in calls]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda c: _run(ours, **c), calls))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
