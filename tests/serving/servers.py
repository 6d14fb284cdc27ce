"""Real uvicorn servers on free loopback ports, for the serving tests: in a thread, or in a process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx

TIMEOUT_S = 60.0
LAUNCHER = Path(__file__).with_name("launch_server.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer /health within {timeout} s")


@contextlib.contextmanager
def thread_server(app) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn in a thread; its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(TIMEOUT_S)


def wait_job(client: httpx.Client, job_id: str, done=("succeeded", "failed", "cancelled"),
             timeout: float = TIMEOUT_S) -> dict:
    """Poll a job until its status is one of ``done``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in done:
            return job
        time.sleep(0.02)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")


@contextlib.contextmanager
def process_server(data_dir: Path, crash_seed: int | None = None,
                   healthy: bool = True) -> Iterator[tuple[str, subprocess.Popen]]:
    """``diffusekit serve`` on the digits model in a subprocess (the launcher adds the test crash hook);
    ``healthy``: wait until it answers (not for a server expected to die while starting its queue)."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if crash_seed is not None:
        env["DIFFUSEKIT_TEST_CRASH_SEED"] = str(crash_seed)
    process = subprocess.Popen([sys.executable, str(LAUNCHER), "--port", str(port), "--data-dir", str(data_dir),
                                "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        if healthy:
            wait_healthy(url, process)
        yield url, process
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """Terminate a server process (killed if it does not exit in time) and close its stderr pipe."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(TIMEOUT_S)
    process.stderr.close()
