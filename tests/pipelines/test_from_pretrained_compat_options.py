"""from_pretrained options as the reference reads them: dtype / torch_dtype (per component), variant, device_map."""

import pytest
import torch

from diffusekit import StableDiffusionPipeline


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory):
    """A tiny SD folder saved plainly and one saved as the fp16 variant."""
    plain, variant = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("variant")
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    pipe.save_pretrained(plain)
    pipe.save_pretrained(variant, variant="fp16")
    return plain, variant


def _dtypes(pipe) -> dict:
    return {name: c.dtype for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def test_dtype_is_an_alias_of_torch_dtype(saved):
    assert set(_dtypes(StableDiffusionPipeline.from_pretrained(saved[0], dtype=torch.float16)).values()) == {
        torch.float16}
    with pytest.raises(ValueError, match="got dtype=torch.float16 and torch_dtype=torch.bfloat16"):
        StableDiffusionPipeline.from_pretrained(saved[0], dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be a torch.dtype or a dict"):
        StableDiffusionPipeline.from_pretrained(saved[0], dtype="fp16")


def test_dtype_dict_per_component_with_default(saved):
    pipe = StableDiffusionPipeline.from_pretrained(saved[0], dtype={"unet": torch.bfloat16, "default": torch.float16})
    assert _dtypes(pipe) == {"unet": torch.bfloat16, "vae": torch.float16, "text_encoder": torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(saved[0], torch_dtype={"vae": torch.float16})
    assert _dtypes(pipe) == {"unet": torch.float32, "vae": torch.float16, "text_encoder": torch.float32}


def test_variant_loads_every_component_and_a_missing_variant_is_an_error(saved, parts):
    pipe = StableDiffusionPipeline.from_pretrained(saved[1], variant="fp16")
    loaded, original = pipe.text_encoder.state_dict(), parts["text_encoder"].state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)
    assert any(".fp16." in p.name for p in (saved[1] / "text_encoder").iterdir())
    with pytest.raises(ValueError, match="You are trying to load the model files of the `variant=fp16`"):
        StableDiffusionPipeline.from_pretrained(saved[0], variant="fp16")


def test_device_map_places_components(saved):
    pipe = StableDiffusionPipeline.from_pretrained(saved[0], device_map="cpu", low_cpu_mem_usage=True)
    assert set(pipe.hf_device_map.values()) == {torch.device("cpu")} and pipe.device == torch.device("cpu")
    if not torch.cuda.is_available():
        pipe = StableDiffusionPipeline.from_pretrained(saved[0], device_map="balanced")
        assert set(pipe.hf_device_map.values()) == {torch.device("cpu")}
    with pytest.raises(ValueError, match="device_map must be one of"):
        StableDiffusionPipeline.from_pretrained(saved[0], device_map="everywhere")
