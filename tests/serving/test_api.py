"""The HTTP API against a real uvicorn on a free loopback port: every endpoint, status and limit."""

import base64
import io
import json
import threading

import httpx
import pytest
from PIL import Image

from diffusekit.cli import main
from diffusekit.serving.app import create_app
from diffusekit.serving.requests import Limits
from diffusekit.serving.service import Settings
from servers import thread_server, wait_job

LIMITS = Limits(max_body_bytes=4096, max_n=4, max_steps=50, max_pixels=64 * 64, max_prompt_chars=50)
BLOCKED_SEEDS = (900, 901, 902, 903)
FAILING_SEED = 904


class Gate:
    """A step hook holding jobs of the blocked seeds at their first step until released."""

    def __init__(self):
        self.events = {seed: threading.Event() for seed in BLOCKED_SEEDS}
        self.reached = {seed: threading.Event() for seed in BLOCKED_SEEDS}

    def __call__(self, job, step):
        seed = job["params"]["seed"]
        if seed == FAILING_SEED:
            raise RuntimeError("the pipeline broke")
        if seed in self.events:
            self.reached[seed].set()
            assert self.events[seed].wait(30), "the test never released the job"

    def release(self, seed):
        self.events[seed].set()


@pytest.fixture(scope="module")
def gate():
    return Gate()


@pytest.fixture(scope="module")
def server(digits_models, gate, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("serve"), limits=LIMITS, max_queue=3, keep_alive_s=0.3)
    app = create_app(settings, digits_models, step_hook=gate)
    with thread_server(app) as url:
        yield url
    for event in gate.events.values():
        event.set()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


def submit(client, **fields):
    response = client.post("/v1/jobs", json={"steps": 3, "class_label": 1, **fields})
    assert response.status_code == 202, response.text
    return response.json()


def events_of(client, job_id, last_id=None):
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    text = client.get(f"/v1/jobs/{job_id}/events", headers=headers).text
    blocks = [b for b in text.split("\n\n") if b.strip()]
    parsed = []
    for block in blocks:
        fields = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))
        if fields:
            parsed.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return parsed


def test_health_models_schedulers(client):
    assert client.get("/health").json()["status"] == "ok"
    (model,) = client.get("/v1/models").json()["models"]
    assert model["name"] == "digits" and model["classes"] == [str(i) for i in range(10)]
    assert (model["width"], model["height"], model["takes_prompt"]) == (16, 16, False)
    names = {s["name"] for s in client.get("/v1/schedulers").json()["schedulers"]}
    assert {"euler_a", "dpmpp_2m_karras", "ddim"} <= names


def test_job_runs_and_its_events_come_in_order(client):
    accepted = submit(client, steps=4, seed=5)
    assert accepted["status"] == "queued" and accepted["queue_position"] == 0
    job = wait_job(client, accepted["id"])
    assert job["status"] == "succeeded" and job["progress"] == {"step": 4, "total": 4}
    assert job["params"] == {"model": "digits", "class_label": 1, "steps": 4, "seed": 5, "n": 1}
    assert job["started"] >= job["created"] and job["finished"] >= job["started"]
    events = events_of(client, job["id"])
    assert [e[1] for e in events] == ["queued", "started"] + ["progress"] * 4 + ["succeeded"]
    assert [e[0] for e in events] == list(range(1, 8))
    assert [e[2]["step"] for e in events if e[1] == "progress"] == [1, 2, 3, 4]
    assert events[-1][2]["images"] == job["images"]
    assert [e[0] for e in events_of(client, job["id"], last_id=5)] == [6, 7]  # Last-Event-ID resumes
    png = client.get(job["images"][0]["url"])
    assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).size == (16, 16)


def test_images_equal_the_command_lines(client, tmp_path):
    job = wait_job(client, submit(client, class_label=3, steps=3, seed=11, n=2, scheduler="Euler a",
                                  guidance_scale=2.5)["id"])
    status = main(["generate", "--class-label", "3", "--steps", "3", "--seed", "11", "--batch", "2",
                   "--scheduler", "euler_a", "--guidance", "2.5", "--out", str(tmp_path)])
    assert status == 0
    for i, image in enumerate(job["images"]):
        served = Image.open(io.BytesIO(client.get(image["url"]).content))
        local = Image.open(tmp_path / f"11-{i}.png")
        assert image["seed"] == 11 + i
        assert served.tobytes() == local.tobytes()
        assert json.loads(served.text["diffusekit"]) == json.loads(local.text["diffusekit"])
        assert served.text["parameters"] == local.text["parameters"]


def test_a_failing_job_fails_alone(client):
    failed = wait_job(client, submit(client, seed=FAILING_SEED)["id"])
    assert failed["status"] == "failed" and failed["images"] == []
    assert failed["error"] == {"code": "internal_error", "message": "RuntimeError: the pipeline broke"}
    assert [e[1] for e in events_of(client, failed["id"])][-1] == "failed"
    assert wait_job(client, submit(client, seed=8)["id"])["status"] == "succeeded"


def test_list_filters_and_unknown_ids(client):
    job = wait_job(client, submit(client, seed=6)["id"])
    listed = client.get("/v1/jobs", params={"status": "succeeded", "limit": 500}).json()["jobs"]
    assert job["id"] in [j["id"] for j in listed] and {j["status"] for j in listed} == {"succeeded"}
    assert len(client.get("/v1/jobs", params={"limit": 1}).json()["jobs"]) == 1
    bad = client.get("/v1/jobs", params={"status": "done"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "status"
    assert client.get("/v1/jobs", params={"limit": 0}).json()["error"]["field"] == "limit"
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/events", f"/v1/jobs/{job['id']}/images/1"):
        assert client.get(path).status_code == 404, path
    assert client.post("/v1/jobs/nope/cancel").status_code == 404


def test_cancel_a_queued_and_a_running_job(client, gate):
    running = submit(client, seed=900)
    assert gate.reached[900].wait(30)
    queued = submit(client, seed=7)
    assert queued["queue_position"] == 0
    assert client.get(f"/v1/jobs/{queued['id']}").json()["queue_position"] == 0
    assert client.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{running['id']}/cancel").status_code == 200
    gate.release(900)
    job = wait_job(client, running["id"])
    assert job["status"] == "cancelled" and job["progress"]["step"] == 1 and job["images"] == []
    assert [e[1] for e in events_of(client, running["id"])] == ["queued", "started", "progress", "cancelled"]
    never = client.get(f"/v1/jobs/{queued['id']}").json()
    assert never["status"] == "cancelled" and never["started"] is None
    again = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["error"]["message"]


def test_a_full_queue_answers_429(client, gate):
    blocker = submit(client, seed=901)
    assert gate.reached[901].wait(30)
    waiting = [submit(client, seed=20 + i) for i in range(3)]
    assert [w["queue_position"] for w in waiting] == [0, 1, 2]
    full = client.post("/v1/jobs", json={"class_label": 1, "steps": 1})
    assert full.status_code == 429 and "queue is full" in full.json()["error"]["message"]
    gate.release(901)
    for job in [blocker, *waiting]:
        assert wait_job(client, job["id"])["status"] == "succeeded"


def test_events_keep_alive_while_quiet(client, gate):
    job = submit(client, seed=902)
    assert gate.reached[902].wait(30)
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        lines = stream.iter_lines()
        seen = [next(lines) for _ in range(14)]  # queued, started, progress (3 lines + blank each), comment
        assert ": keep-alive" in seen
        gate.release(902)
        assert any(line == "event: succeeded" for line in lines)


@pytest.mark.parametrize("body, field", [
    ({"foo": 1}, "foo"),
    ({"prompt": "x" * 51}, "prompt"),
    ({"prompt": "a cat"}, "prompt"),
    ({"negative_prompt": "blur"}, "negative_prompt"),
    ({"image": "aGk="}, "image"),
    ({"steps": 0}, "steps"),
    ({"steps": 51}, "steps"),
    ({"n": 5}, "n"),
    ({"n": 0}, "n"),
    ({"width": 100, "height": 100}, "width"),
    ({"width": 32}, "width"),
    ({"height": 8}, "height"),
    ({"class_label": 10}, "class_label"),
    ({"class_label": "seven"}, "class_label"),
    ({"scheduler": "bogus"}, "scheduler"),
    ({"seed": 2**64}, "seed"),
    ({"guidance_scale": "high"}, "guidance_scale"),
    ({"model": "other"}, "model"),
    ({"model": "/etc/passwd"}, "model"),
    ({"loras": [{"name": "style", "scale": 1}]}, "loras[0].name"),
    ({"loras": [{"path": "/x"}]}, "loras.0.name"),
])
def test_bad_fields_are_422_naming_the_field(client, body, field):
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"].startswith(field)


def test_bad_bodies(client):
    broken = client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 422 and broken.json()["error"]["field"] == "body"
    big = client.post("/v1/jobs", json={"class_label": 1, "pad": "x" * 5000})
    assert big.status_code == 413 and big.json()["error"]["field"] == "body"

    def chunks():
        yield b'{"class_label": 1, "pad": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    chunked = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"]["field"] == "body"


def test_host_and_origin_checks(client, server):
    wrong_host = client.get("/v1/models", headers={"Host": "evil.example:7860"})
    assert wrong_host.status_code == 403 and wrong_host.json()["error"]["field"] == "Host"
    assert client.get("/v1/models", headers={"Host": "localhost:7860"}).status_code == 200
    posted = client.post("/v1/jobs", json={"class_label": 1}, headers={"Origin": "http://evil.example"})
    assert posted.status_code == 403 and posted.json()["error"]["field"] == "Origin"
    same = client.get("/v1/models", headers={"Origin": server})
    assert same.status_code == 200


def test_api_key(digits_models, tmp_path):
    app = create_app(Settings(data_dir=tmp_path, api_key="sesame"), digits_models)
    with thread_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sesame"}):
            denied = client.get("/v1/models", headers=headers)
            assert denied.status_code == 401 and denied.json()["error"]["field"] == "Authorization"
            assert client.post("/v1/jobs", json={"class_label": 1}, headers=headers).status_code == 401
        allowed = client.get("/v1/models", headers={"Authorization": "Bearer sesame"})
        assert allowed.status_code == 200


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and '<progress id="progress"' in page.text
    assert "EventSource" in client.get("/static/app.js").text or "getReader" in client.get("/static/app.js").text
    assert client.get("/static/app.css").headers["content-type"].startswith("text/css")


def test_openai_generations(client):
    answer = client.post("/v1/images/generations", json={"prompt": "7", "n": 2, "response_format": "b64_json",
                                                         "size": "16x16"})
    assert answer.status_code == 200, answer.text
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in answer.json()["data"]]
    assert [i.size for i in images] == [(16, 16)] * 2
    assert json.loads(images[0].text["diffusekit"])["class_label"] == 7
    (linked,) = client.post("/v1/images/generations", json={"prompt": "3"}).json()["data"]
    assert linked["url"].startswith("http://127.0.0.1:") and client.get(linked["url"]).status_code == 200
    for body, field in (({"prompt": "a cat"}, "prompt"), ({"prompt": "1", "size": "big"}, "size"),
                        ({"prompt": "1", "size": "32x32"}, "size"), ({"prompt": "1", "style": "natural"}, "style"),
                        ({"prompt": "1", "model": "dall-e-3"}, "model")):
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 422 and response.json()["error"]["field"] == field, (body, response.text)


A1111_DEFAULTS = {
    "prompt": "", "negative_prompt": "", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1,
    "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": False, "tiling": False,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": 0, "denoising_strength": 0,
    "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None, "refiner_switch_at": None,
    "disable_extra_networks": False, "comments": {}, "enable_hr": False, "firstphase_width": 0,
    "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_prompt": "",
    "hr_negative_prompt": "", "sampler_index": "Euler", "script_name": None, "script_args": [],
    "send_images": True, "save_images": False, "alwayson_scripts": {}, "scheduler": "Automatic",
}


def test_a1111_txt2img_takes_the_whole_default_schema(client):
    body = dict(A1111_DEFAULTS, prompt="4", steps=3, seed=42, batch_size=2, sampler_name="DPM++ 2M",
                scheduler="Karras")
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    info = json.loads(result["info"])
    assert info["all_seeds"] == [42, 43] and result["parameters"]["prompt"] == "4"
    image = Image.open(io.BytesIO(base64.b64decode(result["images"][0])))
    record = json.loads(image.text["diffusekit"])
    assert record["scheduler"]["name"] == "dpmpp_2m_karras" and record["class_label"] == 4
    assert "Sampler: DPM++ 2M Karras" in image.text["parameters"]


@pytest.mark.parametrize("change, field", [
    ({"enable_hr": True}, "enable_hr"), ({"restore_faces": True}, "restore_faces"), ({"tiling": True}, "tiling"),
    ({"styles": ["noir"]}, "styles"), ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings"),
    ({"alwayson_scripts": {"controlnet": {}}}, "alwayson_scripts"), ({"no_such_field": 1}, "no_such_field"),
    ({"sampler_name": "Magic"}, "sampler_name"), ({"scheduler": "Exponential"}, "scheduler"),
    ({"cfg_scale": "x"}, "cfg_scale"), ({"batch_size": 9}, "batch_size"), ({"steps": 99}, "steps"),
    ({"prompt": "cat"}, "prompt"), ({"width": 64, "height": 64}, "width"),
    ({"negative_prompt": "blurry"}, "negative_prompt"),
])
def test_a1111_unsupported_values_are_422_naming_the_field(client, change, field):
    answer = client.post("/sdapi/v1/txt2img", json={**A1111_DEFAULTS, "prompt": "1", "steps": 2, **change})
    assert answer.status_code == 422 and answer.json()["error"]["field"] == field, answer.text


def test_a1111_img2img_on_a_model_without_images(client):
    answer = client.post("/sdapi/v1/img2img", json={"prompt": "1", "steps": 2, "init_images": ["aGk="]})
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "init_images"


def test_a1111_listings_progress_and_interrupt(client, gate):
    samplers = {s["name"] for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= samplers
    assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["digits"]
    job = submit(client, seed=903, steps=5)
    assert gate.reached[903].wait(30)
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["state"]["sampling_step"] == 1 and progress["state"]["sampling_steps"] == 5
    assert progress["progress"] == pytest.approx(0.2)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    gate.release(903)
    assert wait_job(client, job["id"])["status"] == "cancelled"
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0.0


def test_serve_refuses_an_open_non_loopback_bind(capsys):
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", "/nonexistent"]) == 2
    assert "--api-key" in capsys.readouterr().err
