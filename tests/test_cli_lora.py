"""``diffusekit generate --lora PATH[:SCALE] --embedding PATH`` on a tiny Stable Diffusion folder:
the same images as the Python API with the same adapters, scales and seed."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusekit import StableDiffusionPipeline
from diffusekit.cli import main
from lora_files import kohya_layout, lora_tensors, peft_layout
from sd_components import save_tiny_sd_folder

PROMPT = "the cat and dog"
STEPS, GUIDANCE, SIZE, SEED = 2, 3.0, 32, 7


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = save_tiny_sd_folder(tmp_path_factory.mktemp("sd"), tmp_path_factory.mktemp("tokenizer"))
    return folder


@pytest.fixture(scope="module")
def files(sd_folder, tmp_path_factory):
    """A peft-layout LoRA, a kohya-layout LoRA (a "." in its name) and a diffusers-format embedding."""
    folder = tmp_path_factory.mktemp("adapters")
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    paths = {"peft": folder / "peft_style.safetensors", "kohya": folder / "kohya.v2.safetensors",
             "embedding": folder / "learned_embeds.safetensors"}
    save_file(peft_layout(lora_tensors(pipe, seed=1)), str(paths["peft"]))
    save_file(kohya_layout(lora_tensors(pipe, seed=2, rank=3), alpha=1.5), str(paths["kohya"]))
    save_file({"<toy>": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))}, str(paths["embedding"]))
    return paths


def _cli(sd_folder, out, capsys, *options, prompt=PROMPT) -> np.ndarray:
    args = ["generate", str(sd_folder), "--prompt", prompt, "--steps", str(STEPS), "--guidance", str(GUIDANCE),
            "--height", str(SIZE), "--width", str(SIZE), "--seed", str(SEED), "--out", str(out), *map(str, options)]
    assert main(args) == 0
    (path,) = capsys.readouterr().out.split()
    return np.asarray(Image.open(path))


def _api(sd_folder, loras=(), embedding=None, prompt=PROMPT) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora{i}")
    if loras:
        pipe.set_adapters([f"lora{i}" for i in range(len(loras))], [scale for _, scale in loras])
    if embedding is not None:
        pipe.load_textual_inversion(embedding)
    image = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image)


def _differ(a: np.ndarray, b: np.ndarray) -> bool:
    return np.abs(a.astype(int) - b.astype(int)).max() > 2


def test_loras_with_scales_match_the_python_api(sd_folder, files, tmp_path, capsys):
    base = _cli(sd_folder, tmp_path, capsys)
    assert np.array_equal(base, _api(sd_folder))

    peft = _cli(sd_folder, tmp_path, capsys, "--lora", files["peft"])  # no scale: 1
    assert _differ(peft, base)
    assert np.array_equal(peft, _api(sd_folder, [(files["peft"], 1.0)]))

    half = _cli(sd_folder, tmp_path, capsys, "--lora", f"{files['peft']}:0.5")
    assert _differ(half, peft) and _differ(half, base)
    assert np.array_equal(half, _api(sd_folder, [(files["peft"], 0.5)]))

    # two LoRAs: both are active, each with its own scale (not only the last one)
    both = _cli(sd_folder, tmp_path, capsys, "--lora", f"{files['peft']}:0.7", "--lora", f"{files['kohya']}:0.4")
    assert np.array_equal(both, _api(sd_folder, [(files["peft"], 0.7), (files["kohya"], 0.4)]))
    assert _differ(both, _api(sd_folder, [(files["kohya"], 0.4)]))
    assert _differ(both, _api(sd_folder, [(files["peft"], 0.7)]))


def test_embedding_and_lora_match_the_python_api(sd_folder, files, tmp_path, capsys):
    prompt = "a <toy> cat"
    plain = _cli(sd_folder, tmp_path, capsys, prompt=prompt)
    with_embedding = _cli(sd_folder, tmp_path, capsys, "--embedding", files["embedding"], prompt=prompt)
    assert _differ(with_embedding, plain)
    assert np.array_equal(with_embedding, _api(sd_folder, embedding=files["embedding"], prompt=prompt))

    both = _cli(sd_folder, tmp_path, capsys, "--embedding", files["embedding"], "--lora", f"{files['kohya']}:0.8",
                prompt=prompt)
    assert _differ(both, with_embedding)
    assert np.array_equal(both, _api(sd_folder, [(files["kohya"], 0.8)], files["embedding"], prompt=prompt))


def test_unknown_lora_keys_give_an_error_naming_them(sd_folder, files, tmp_path, capsys):
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    state = peft_layout(lora_tensors(pipe, seed=4))
    state["unet.no_such_block.to_q.lora_A.weight"] = torch.zeros(2, 8)
    state["unet.no_such_block.to_q.lora_B.weight"] = torch.zeros(8, 2)
    save_file(state, str(tmp_path / "bad.safetensors"))
    common = ["generate", str(sd_folder), "--prompt", PROMPT, "--steps", "1", "--out", str(tmp_path / "out")]

    def error(*options: str) -> str:
        assert main([*common, *options]) == 2
        return capsys.readouterr().err

    assert re.fullmatch(r"error: --lora .*bad\.safetensors:0\.5: .*unet\.no_such_block\.to_q\.lora_A\.weight.*\n",
                        error("--lora", f"{tmp_path / 'bad.safetensors'}:0.5"), re.S)
    missing = tmp_path / "missing.safetensors"
    assert error("--lora", str(missing)) == f"error: --lora {missing}: no such file or folder\n"
    assert re.match(r"error: --embedding .*peft_style\.safetensors.*textual inversion", error("--embedding", str(files["peft"])))
    assert not (tmp_path / "out").exists()  # nothing generated
