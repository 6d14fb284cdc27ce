"""``diffusekit serve --ray`` on loopback: the same API on Ray Serve with two CPU pipeline replicas.
Jobs submitted over HTTP all complete with the in-process server's images, the event stream is the
same, and cancel stops a running job (embedded digits model, one local Ray instance)."""

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from diffusekit.batch_ray import init_ray  # noqa: E402
from diffusekit.cli import build_parser, main  # noqa: E402
from diffusekit.serving.app import create_app  # noqa: E402
from diffusekit.serving.ray_serve import deploy  # noqa: E402
from diffusekit.serving.service import Settings  # noqa: E402
from servers import free_port, thread_server, wait_healthy, wait_job  # noqa: E402

RAY_TIMEOUT_S = 180.0
JOBS = [{"class_label": label, "seed": 40 + label, "steps": 3} for label in range(4)] + [
    {"class_label": 5, "seed": 7, "steps": 2, "n": 2}]


@pytest.mark.parametrize("options, message", [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--num-replicas", "0"], "error: --num-replicas must be at least 1, got 0"),
])
def test_option_errors_before_ray_starts(tmp_path, capsys, options, message):
    assert main(["serve", "--ray", "--data-dir", str(tmp_path), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not ray.is_initialized()  # (runs before the module's Ray starts)


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    assert init_ray(None, local_cpus=2)
    args = build_parser().parse_args(["serve", "--threads", "1", "--ray", "--num-replicas", "2", "--port",
                                      str(free_port()), "--data-dir", str(tmp_path_factory.mktemp("ray-serve"))])
    try:
        url = deploy(args)
        wait_healthy(url, timeout=RAY_TIMEOUT_S)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local_server(digits_models, tmp_path_factory):
    with thread_server(create_app(Settings(data_dir=tmp_path_factory.mktemp("serve")), digits_models)) as url:
        yield url


def _run_jobs(url: str) -> list[tuple[dict, list[bytes]]]:
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = []
        for fields in JOBS:
            response = client.post("/v1/jobs", json=fields)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        jobs = [wait_job(client, job_id, timeout=RAY_TIMEOUT_S) for job_id in ids]
        return [(job, [client.get(image["url"]).content for image in job["images"]]) for job in jobs]


def test_jobs_complete_with_the_in_process_servers_images(ray_server, local_server):
    on_ray, local = _run_jobs(ray_server), _run_jobs(local_server)
    assert [job["status"] for job, _ in on_ray] == ["succeeded"] * len(JOBS)
    for (ray_job, ray_images), (job, images) in zip(on_ray, local):
        assert ray_job["params"] == job["params"]
        assert ray_job["progress"] == job["progress"]
        assert [(i["seed"], i["file"]) for i in ray_job["images"]] == [(i["seed"], i["file"]) for i in job["images"]]
        assert ray_images == images and all(data.startswith(b"\x89PNG") for data in images)


def test_event_stream_has_every_step_then_the_end(ray_server):
    with httpx.Client(base_url=ray_server, timeout=RAY_TIMEOUT_S) as client:
        job_id = client.post("/v1/jobs", json={"class_label": 2, "seed": 3, "steps": 3}).json()["id"]
        text = client.get(f"/v1/jobs/{job_id}/events").text
    events = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert events == ["queued", "started", "progress", "progress", "progress", "succeeded"]


def test_cancel_stops_a_running_job_on_its_replica(ray_server):
    with httpx.Client(base_url=ray_server, timeout=30) as client:
        job_id = client.post("/v1/jobs", json={"class_label": 1, "seed": 5, "steps": 150}).json()["id"]
        running = wait_job(client, job_id, done=("running", "succeeded", "failed"), timeout=RAY_TIMEOUT_S)
        assert running["status"] == "running"
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        job = wait_job(client, job_id, timeout=RAY_TIMEOUT_S)
        assert job["status"] == "cancelled" and job["images"] == []
        assert job["progress"]["step"] < 150
        # The replica is free again: the next job runs.
        after = client.post("/v1/jobs", json={"class_label": 1, "seed": 6, "steps": 2}).json()["id"]
        assert wait_job(client, after, timeout=RAY_TIMEOUT_S)["status"] == "succeeded"

