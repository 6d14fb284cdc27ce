"""IP-Adapter loading and call checks on diffusekit's tiny SD pipeline: where files and image encoders
are found, errors naming the file / key / argument (leaving the pipeline unchanged), several adapters,
per-call image prompts under threads, and model_index.json entries for the image encoder."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor

from diffusekit import DiffusionPipeline, StableDiffusionPipeline
from diffusekit.loaders.ip_adapter import loaded_ip_adapters
from diffusekit.weights import WeightsError
from ip_adapter_files import ip_adapter_state, save_ip_adapter, tiny_image_encoder
from sd_components import save_tiny_sd_folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return save_tiny_sd_folder(root / "pipe", root / "tokenizer")


@pytest.fixture
def pipe(sd_folder):
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def adapter(sd_folder, tmp_path_factory):
    unet = StableDiffusionPipeline.from_pretrained(sd_folder).unet
    return save_ip_adapter(tmp_path_factory.mktemp("adapter"), unet, "plain")


def _image(seed=0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(24, 24, 3) * 255).astype("uint8"))


def _run(pipe, **kwargs):
    return pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                **kwargs).images


def test_a_folder_or_a_file_is_found_with_the_image_encoder_beside_it(pipe, adapter, tmp_path):
    pipe.load_ip_adapter(adapter.parent)  # a local folder without weight_name: its only weights file
    assert loaded_ip_adapters(pipe.unet) == 1
    assert pipe.image_encoder.config.image_size == 32 and pipe.feature_extractor.crop_size["height"] == 32
    from_folder = _run(pipe, ip_adapter_image=_image())
    pipe.unload_ip_adapter()
    pipe.load_ip_adapter(adapter)
    np.testing.assert_array_equal(_run(pipe, ip_adapter_image=_image()), from_folder)
    pipe.load_ip_adapter(adapter)  # loading again replaces, it does not stack
    assert loaded_ip_adapters(pipe.unet) == 1
    twice = tmp_path / "twice"
    twice.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (twice / name).write_bytes(adapter.read_bytes())
    with pytest.raises(ValueError, match="several IP-Adapter files .*a.safetensors, b.safetensors.*weight_name"):
        pipe.load_ip_adapter(twice)


def test_without_image_encoder_only_embeddings_work(pipe, adapter, tmp_path):
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(adapter.read_bytes())
    with pytest.raises(FileNotFoundError, match="no image encoder folder 'image_encoder' beside"):
        pipe.load_ip_adapter(lone)
    assert loaded_ip_adapters(pipe.unet) == 0
    state = ip_adapter_state(pipe.unet)
    with pytest.raises(ValueError, match="cannot be loaded because .* is a state dict"):
        pipe.load_ip_adapter(state)
    pipe.load_ip_adapter(state, image_encoder_folder=None)
    assert pipe.image_encoder is None
    with pytest.raises(ValueError, match="ip_adapter_image needs an image_encoder"):
        _run(pipe, ip_adapter_image=_image())
    embeds = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(0))]  # negative half first
    assert _run(pipe, ip_adapter_image_embeds=embeds).shape == (1, 32, 32, 3)


def _drop(prefix):
    return lambda state: {k: v for k, v in state.items() if not k.startswith(prefix)}


def _add(key, value):
    return lambda state: {**state, key: value}


BAD_FILES = {
    "no image_proj": (_drop("image_proj."), "no image_proj entries"),
    "unknown key": (_add("unet.foo", torch.zeros(1)), "unexpected key 'unet.foo'"),
    "extra layer": (_add("ip_adapter.99.to_k_ip.weight", torch.zeros(8, 32)),
                    "ip_adapter.99.to_k_ip.weight matches no cross-attention layer .*another UNet"),
    "missing layer": (_drop("ip_adapter.5.to_v_ip"), r"ip_adapter.5.to_v_ip.weight is missing"),
    "wrong shape": (_add("ip_adapter.3.to_k_ip.weight", torch.zeros(8, 48)),
                    r"ip_adapter.3.to_k_ip.weight has shape \(8, 48\) but .* needs \(8, 32\)"),
    "faceid kind": (lambda s: {**_drop("image_proj.")(s), "image_proj.norm.weight": torch.ones(32),
                               "image_proj.proj.0.weight": torch.zeros(64, 16)}, "kind that is not supported"),
    "bad projection": (_add("image_proj.norm.weight", torch.ones(5)), "do not fit ImageProjection"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_name_file_and_key_and_change_nothing(pipe, adapter, tmp_path, case):
    change, message = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    save_file(change(ip_adapter_state(pipe.unet)), str(path))
    (tmp_path / "image_encoder").symlink_to(adapter.parent / "image_encoder")
    with pytest.raises(ValueError, match=message) as info:
        pipe.load_ip_adapter(path)
    assert "IP-Adapter state dict" in str(info.value) or str(path) in str(info.value)
    assert loaded_ip_adapters(pipe.unet) == 0 and pipe.image_encoder is None
    assert pipe.unet.config.encoder_hid_dim_type is None


def test_pickles_are_read_with_weights_only(pipe, tmp_path):
    torch.save({"image_proj": {"proj.weight": [1, 2]}, "ip_adapter": {}}, tmp_path / "list.bin")
    with pytest.raises(ValueError, match=r"list.bin: image_proj.proj.weight is a list, not a tensor"):
        pipe.load_ip_adapter(tmp_path / "list.bin", image_encoder_folder=None)
    torch.save({"image_proj": {"proj.weight": Image.new("RGB", (1, 1))}}, tmp_path / "object.bin")
    with pytest.raises(WeightsError, match="object.bin: refused or unreadable pickle"):
        pipe.load_ip_adapter(tmp_path / "object.bin", image_encoder_folder=None)


def test_call_arguments_are_checked(pipe, adapter):
    with pytest.raises(ValueError, match="need an IP-Adapter: call load_ip_adapter first"):
        _run(pipe, ip_adapter_image=_image())
    pipe.load_ip_adapter(adapter)
    cases = [
        (dict(), "has an IP-Adapter loaded: pass ip_adapter_image or ip_adapter_image_embeds"),
        (dict(ip_adapter_image=_image(), ip_adapter_image_embeds=[torch.zeros(2, 1, 16)]), "Provide either"),
        (dict(ip_adapter_image_embeds=torch.zeros(2, 1, 16)), "has to be of type `list`"),
        (dict(ip_adapter_image_embeds=[torch.zeros(2, 16)]), "list of 3D or 4D tensors but is 2D"),
        (dict(ip_adapter_image=[_image(), _image(1)]), "`ip_adapter_image` must have same length .* Got 2 entries"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            _run(pipe, **kwargs)


def test_two_adapters_with_a_scale_each(pipe, adapter, tmp_path):
    second = save_ip_adapter(tmp_path, pipe.unet, "plus", seed=1, encoder=False)
    pipe.load_ip_adapter(adapter)
    one = _run(pipe, ip_adapter_image=_image())
    pipe.load_ip_adapter([str(adapter.parent), str(tmp_path)], subfolder="",
                         weight_name=[adapter.name, second.name])
    assert loaded_ip_adapters(pipe.unet) == 2
    with pytest.raises(ValueError, match="Cannot assign 1 scale_configs to 2 IP-Adapter."):
        pipe.set_ip_adapter_scale(0.5)
    with pytest.raises(ValueError, match="down.*block_0"):
        pipe.set_ip_adapter_scale([{"down": {"block_0": 1.0}}, 0.0])  # block 0 has no attention
    pipe.set_ip_adapter_scale([1.0, 0.0])
    np.testing.assert_array_equal(_run(pipe, ip_adapter_image=[_image(), _image(1)]), one)


def test_concurrent_calls_keep_their_own_image_prompt(pipe, adapter):
    pipe.load_ip_adapter(adapter)
    images = [_image(seed) for seed in range(3)]
    serial = [_run(pipe, ip_adapter_image=image) for image in images]
    results = [None] * len(images)

    def work(i):
        results[i] = _run(pipe, ip_adapter_image=images[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)
    assert np.abs(serial[0] - serial[1]).max() > 0


def test_model_index_records_and_loads_the_image_encoder(pipe, tmp_path):
    components = dict(pipe.components, image_encoder=tiny_image_encoder(),
                      feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert index["feature_extractor"][0] == "transformers"  # CLIPImageProcessor[Pil]: transformers picks the backend
    assert index["feature_extractor"][1].startswith("CLIPImageProcessor")
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert torch.equal(loaded.image_encoder.visual_projection.weight,
                       components["image_encoder"].visual_projection.weight)
    assert type(loaded.feature_extractor).__name__.startswith("CLIPImageProcessor")
