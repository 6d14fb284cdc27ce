"""SIGKILL during a running job, restart on the same data dir: nothing lost, the same images, and a
job that kills the server twice ends failed instead of crash-looping it."""

import io
import signal
import time

import httpx
from PIL import Image

from diffusekit.cli import main
from servers import TIMEOUT_S, process_server, wait_job

CRASH_SEED = 666
STEPS = 40  # long enough to be killed while running


def wait_running(client, job_id):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["step"] >= 1:
            return
        time.sleep(0.01)
    raise TimeoutError(f"job {job_id} never ran")


def wait_exit(process):
    process.wait(TIMEOUT_S)
    return process.returncode


def test_jobs_survive_sigkill_and_a_crashing_job_fails_after_two_tries(tmp_path):
    data = tmp_path / "data"
    seeds = [1, 2, CRASH_SEED, 3]
    with process_server(data, crash_seed=CRASH_SEED) as (url, process):
        with httpx.Client(base_url=url, timeout=30) as client:
            ids = [client.post("/v1/jobs", json={"class_label": s % 10, "steps": STEPS, "seed": s}).json()["id"]
                   for s in seeds]
            wait_running(client, ids[0])
        process.send_signal(signal.SIGKILL)
        assert wait_exit(process) == -signal.SIGKILL
    with process_server(data, CRASH_SEED, healthy=False) as (url, process):  # 1 again, 2, then dies on 666
        assert wait_exit(process) == -signal.SIGKILL
    with process_server(data, CRASH_SEED, healthy=False) as (url, process):  # 666 again: dies a second time
        assert wait_exit(process) == -signal.SIGKILL
    with process_server(data, crash_seed=CRASH_SEED) as (url, process), \
            httpx.Client(base_url=url, timeout=30) as client:
        jobs = [wait_job(client, job_id) for job_id in ids]
        listed = client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]
        pngs = {job["id"]: client.get(job["images"][0]["url"]).content for job in jobs if job["images"]}
    assert sorted(j["id"] for j in listed) == sorted(ids)  # nothing lost, nothing doubled
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert jobs[2]["error"]["code"] == "interrupted" and "interrupted twice" in jobs[2]["error"]["message"]
    for seed, job in zip(seeds, jobs):
        if seed == CRASH_SEED:
            continue
        out = tmp_path / f"cli-{seed}"
        assert main(["generate", "--class-label", str(seed % 10), "--steps", str(STEPS), "--seed", str(seed),
                     "--out", str(out)]) == 0
        served = Image.open(io.BytesIO(pngs[job["id"]]))
        assert served.tobytes() == Image.open(out / f"{seed}-0.png").tobytes()
        assert len(job["images"]) == 1
