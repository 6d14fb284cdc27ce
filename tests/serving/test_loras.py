"""LoRAs served by name (``diffusekit serve --lora NAME=FILE``): a job turns on its own with its
scales, and its image equals ``generate --lora FILE:SCALE``; other jobs run without them."""

import io

import httpx
import pytest
from PIL import Image
from safetensors.torch import save_file

from diffusekit import StableDiffusionPipeline
from diffusekit.cli import main
from diffusekit.serving.app import create_app
from diffusekit.serving.models import load_models
from diffusekit.serving.service import Settings
from lora_files import lora_tensors, peft_layout
from sd_components import save_tiny_sd_folder
from servers import thread_server, wait_job

JOB = dict(prompt="the cat", steps=2, guidance_scale=3.0, width=32, height=32, seed=5)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = save_tiny_sd_folder(tmp_path_factory.mktemp("sd"), tmp_path_factory.mktemp("tokenizer"))
    lora = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(peft_layout(lora_tensors(StableDiffusionPipeline.from_pretrained(folder), seed=1)), str(lora))
    models = load_models([f"sd={folder}", "digits=diffusekit:digits"], "cpu", [f"style={lora}"])
    settings = Settings(data_dir=tmp_path_factory.mktemp("serve"))
    with thread_server(create_app(settings, models)) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, folder, lora


def _served_image(client, **fields) -> bytes:
    answer = client.post("/v1/jobs", json={"model": "sd", **JOB, **fields})
    assert answer.status_code == 202, answer.text
    job = wait_job(client, answer.json()["id"])
    assert job["status"] == "succeeded", job
    return Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)).tobytes()


def _cli_image(folder, out, *options) -> bytes:
    assert main(["generate", str(folder), "--prompt", "the cat", "--steps", "2", "--guidance", "3", "--width", "32",
                 "--height", "32", "--seed", "5", "--out", str(out), *options]) == 0
    return Image.open(out / "5-0.png").tobytes()


def test_a_job_turns_on_its_loras_only(served, tmp_path):
    client, folder, lora = served
    with_lora = _served_image(client, loras=[{"name": "style", "scale": 0.7}])
    plain = _served_image(client)
    assert with_lora == _cli_image(folder, tmp_path / "a", "--lora", f"{lora}:0.7")
    assert plain == _cli_image(folder, tmp_path / "b")
    assert with_lora != plain
    listed = {m["name"]: m["loras"] for m in client.get("/v1/models").json()["models"]}
    assert listed == {"sd": ["style"], "digits": []}


@pytest.mark.parametrize("fields, field", [
    (dict(loras=[{"name": "nope"}]), "loras[0].name"),
    (dict(loras=[{"name": "style", "scale": 99}]), "loras[0].scale"),
    (dict(loras=[{"name": "style"}, {"name": "style"}]), "loras"),
    (dict(model="digits", prompt=None, width=None, height=None, loras=[{"name": "style"}]), "loras[0].name"),
])
def test_bad_loras_are_422_naming_the_field(served, fields, field):
    client = served[0]
    body = {k: v for k, v in {"model": "sd", **JOB, **fields}.items() if v is not None}
    answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == field
