"""``diffusekit train --task vae | text-to-image | lora``: short runs that save loadable folders."""

import json
import subprocess
import sys

import pytest
import torch

from diffusekit import AutoencoderKL, StableDiffusionPipeline
from diffusekit.tokenization import CLIPTokenizer, write_word_tokenizer
from diffusekit.training import TrainConfig
from diffusekit.training.text_to_image import load_captioned, train_lora, train_text_to_image, train_vae

TINY = dict(data="shapes", dataset_size=24, resolution=32, batch_size=4, sample_every=0, progress=False,
            vae_block_out_channels=(8, 16), block_out_channels=(16, 32), text_width=32, text_layers=1,
            prediction_type="v_prediction", beta_schedule="linear")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    vae = train_vae(TrainConfig(task="vae", steps=10, out=root / "vae", **TINY))
    model = train_text_to_image(TrainConfig(task="text-to-image", steps=10, out=root / "model", vae=vae, **TINY))
    return root, vae, model


def test_vae_run_saves_an_autoencoder_with_a_measured_scaling_factor(trained):
    _, vae_folder, _ = trained
    vae = AutoencoderKL.from_pretrained(vae_folder)
    assert vae.config.scaling_factor not in (1.0, 0.18215) and vae.config.scaling_factor > 0
    log = [json.loads(line) for line in (vae_folder / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11)) and all("mse" in r for r in log)


def test_text_to_image_run_saves_a_stable_diffusion_pipeline(trained):
    _, _, folder = trained
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == 32
    assert len(pipe.tokenizer.tokenize("a purple triangle at the bottom right on a gray background")) == 11
    image = pipe("a red circle at the top on a white background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_text_to_image_runs_are_reproducible(trained, tmp_path):
    _, vae, folder = trained
    again = train_text_to_image(TrainConfig(task="text-to-image", steps=10, out=tmp_path / "again", vae=vae, **TINY))
    first = StableDiffusionPipeline.from_pretrained(folder).unet.state_dict()
    second = StableDiffusionPipeline.from_pretrained(again).unet.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_lora_run_changes_the_images_and_unloads(trained, tmp_path):
    _, _, folder = trained
    lora = train_lora(TrainConfig(task="lora", steps=3, out=tmp_path / "lora", base=folder,
                                  **{**TINY, "data": "shapes-outlined"}))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return pipe("a blue square in the center on a black background", num_inference_steps=2,
                    generator=torch.Generator().manual_seed(1), output_type="np").images

    plain = draw()
    pipe.load_lora_weights(lora)
    assert abs(draw() - plain).max() > 0
    pipe.unload_lora_weights()
    assert abs(draw() - plain).max() == 0


def test_missing_vae_and_base_are_named(tmp_path):
    with pytest.raises(ValueError, match="--vae"):
        train_text_to_image(TrainConfig(task="text-to-image", steps=1, out=tmp_path / "a", **TINY))
    with pytest.raises(ValueError, match="--base"):
        train_lora(TrainConfig(task="lora", steps=1, out=tmp_path / "b", **TINY))
    with pytest.raises(ValueError, match="task must be one of"):
        TrainConfig(task="gan").check()


def test_caption_folder_needs_a_caption_per_image(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a red square\n")
    with pytest.raises(ValueError, match="b.png has no caption file b.txt"):
        load_captioned(TrainConfig(data=str(tmp_path), resolution=8))
    (tmp_path / "b.txt").write_text("another red square")
    data = load_captioned(TrainConfig(data=str(tmp_path), resolution=8))
    assert data.captions == ["a red square", "another red square"] and data.images.dtype == torch.uint8


def test_word_tokenizer_has_one_token_per_word_and_loads_in_transformers(tmp_path):
    import transformers

    words = ["circle", "triangle", "red", "green", "background", "at", "the"]
    write_word_tokenizer(tmp_path, words, model_max_length=16)
    ours, theirs = CLIPTokenizer.from_pretrained(tmp_path), transformers.CLIPTokenizer.from_pretrained(tmp_path)
    text = "the red circle at the green triangle background; unknown words split"
    assert ours.tokenize("the red circle") == ["the</w>", "red</w>", "circle</w>"]
    assert ours(text, padding="max_length", max_length=16, truncation=True).input_ids == \
        theirs(text, padding="max_length", max_length=16, truncation=True).input_ids


def test_train_command_line_runs_the_vae_task(tmp_path):
    out = tmp_path / "vae"
    result = subprocess.run([sys.executable, "-m", "diffusekit", "train", "--task", "vae", "--data", "shapes",
                             "--dataset-size", "8", "--resolution", "32", "--steps", "2", "--batch-size", "4",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
