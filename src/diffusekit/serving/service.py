"""What every API family shares: submitting to the one queue, cancelling, waiting for a job's end."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .events import EventLog
from .jobs import FINISHED, BaseJobStore, JobStore
from .models import ServedModel
from .requests import JobRequest, Limits, check_request
from .worker import StepHook, Worker, job_view

#: How long a synchronous endpoint (OpenAI, A1111) waits for its job.
SYNC_TIMEOUT_S = 600.0


class NotFound(LookupError):
    """An unknown job id or image index."""


class Conflict(Exception):
    """The job cannot do that any more (it finished)."""


@dataclass
class Settings:
    """How the server runs (the ``serve`` options)."""

    data_dir: Path
    host: str = "127.0.0.1"
    api_key: str | None = None
    max_queue: int = 64
    limits: Limits = Limits()
    db: str | None = None  # a PostgreSQL URL; None: SQLite in data_dir
    keep_alive_s: float = 15.0


def open_store(db: str | None, data_dir: Path) -> BaseJobStore:
    """The job store of ``--db``: a PostgreSQL URL, or None for the SQLite file ``DATA_DIR/jobs.sqlite3``."""
    if db is None:
        return JobStore(data_dir / "jobs.sqlite3")
    from .jobs_postgres import PostgresJobStore  # psycopg only on this path

    return PostgresJobStore(db)


class Service:
    """The job store, the event log and the worker, for the API endpoints."""

    def __init__(self, settings: Settings, models: dict[str, ServedModel], step_hook: StepHook | None = None,
                 worker_class: Callable[..., Worker] = Worker) -> None:
        self.settings, self.models = settings, models
        self.store = open_store(settings.db, settings.data_dir)
        self.store.recover()
        self.events = EventLog()
        self.worker = worker_class(self.store, models, self.events, settings.data_dir, step_hook)

    def start(self) -> None:
        self.worker.start()

    def close(self) -> None:
        self.worker.stop()
        self.store.close()

    def submit(self, request: JobRequest) -> dict[str, Any]:
        """Check and commit a job (FieldError, QueueFull); ``{id, status, queue_position}``."""
        params, total = check_request(request, self.models, self.settings.limits, self.settings.data_dir / "inputs")
        job_id, position = self.store.add(params, total, self.settings.max_queue)
        self.events.publish(job_id, "queued", {"id": job_id, "queue_position": position})
        self.worker.notify()
        return {"id": job_id, "status": "queued", "queue_position": position}

    def job(self, job_id: str) -> dict[str, Any]:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        step = self.worker.progress(job_id) if job["status"] == "running" else None
        if step is not None:
            job["progress"]["step"] = step
        return job_view(job) | {"queue_position": self.store.position(job)}

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a pending job now, or ask the running one to stop at its next step."""
        job = self.job(job_id)
        if job["status"] in FINISHED:
            raise Conflict(f"job {job_id} has already {job['status']}")
        if self.store.cancel_pending(job_id):
            self.events.publish(job_id, "cancelled", job_view(self.store.get(job_id)))
        elif self.job(job_id)["status"] in FINISHED:
            raise Conflict(f"job {job_id} has already finished")
        else:
            self.worker.cancel_running(job_id)
        return self.job(job_id)

    def image_path(self, job_id: str, index: int) -> Path:
        images = self.job(job_id)["images"]
        if not 0 <= index < len(images):
            raise NotFound(f"job {job_id} has no image {index} (it has {len(images)})")
        return self.settings.data_dir / "images" / job_id / images[index]["file"]

    async def wait(self, job_id: str, timeout: float = SYNC_TIMEOUT_S) -> dict[str, Any]:
        """The job once it has finished (polling the store; a long job never blocks the event loop)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in FINISHED:
                return job
            await asyncio.sleep(0.02)
        raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f} s; GET /v1/jobs/{job_id} follows it")


class JobFailed(Exception):
    """A synchronous request's job ended without images (failed or cancelled)."""

    def __init__(self, job: dict[str, Any]) -> None:
        error = job["error"] or {"code": job["status"], "message": f"the job was {job['status']}"}
        super().__init__(f"job {job['id']} {job['status']}: {error['message']}")
        self.job, self.code = job, error["code"]


async def run_sync(service: Service, request: JobRequest) -> tuple[dict[str, Any], list[bytes]]:
    """Submit, wait, and return the finished job with its PNG files' bytes; JobFailed when it has none."""
    job = await service.wait(service.submit(request)["id"])
    if job["status"] != "succeeded":
        raise JobFailed(job)
    return job, [service.image_path(job["id"], i).read_bytes() for i in range(len(job["images"]))]
