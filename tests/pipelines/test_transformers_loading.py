"""Pipeline folders load diffusekit's own CLIP text encoder and tokenizer (no transformers modeling
code), which give the images transformers' classes give; a transformers model passed in still works."""

import subprocess
import sys

import numpy as np
import torch
import transformers

from diffusekit import StableDiffusionPipeline
from diffusekit.models.clip_text import CLIPTextModel
from diffusekit.tokenization import CLIPTokenizer


def _image(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("the cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_folder_loads_own_classes_with_transformers_images(parts, tmp_path):
    reference = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    assert isinstance(reference.text_encoder, transformers.CLIPTextModel)
    reference.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.text_encoder) is CLIPTextModel and type(loaded.tokenizer) is CLIPTokenizer
    np.testing.assert_allclose(_image(loaded), _image(reference), rtol=0, atol=1e-6)
    given = StableDiffusionPipeline.from_pretrained(tmp_path, text_encoder=parts["text_encoder"],
                                                    tokenizer=parts["tokenizer"])
    assert given.text_encoder is parts["text_encoder"]
    np.testing.assert_array_equal(_image(given), _image(reference))
    half = StableDiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert half.text_encoder.dtype == torch.float16


def test_loading_a_pipeline_imports_no_transformers_modeling(parts, tmp_path):
    pipe = StableDiffusionPipeline(**{**parts, "feature_extractor": None}, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path)
    code = ("import sys; from diffusekit import StableDiffusionPipeline; "
            f"p = StableDiffusionPipeline.from_pretrained({str(tmp_path)!r}); "
            "print(sorted(m for m in sys.modules if m.startswith('transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
