"""One worker thread per device: runs the pending jobs in order, reports each step, stops a cancelled
job at its next step, and keeps serving when one job fails."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from .events import EventLog
from .jobs import BaseJobStore
from .models import ServedModel, generate_options, job_pipeline

logger = logging.getLogger("diffusekit.serve")
#: Longest wait for new work before the worker looks at the store again.
IDLE_WAIT_S = 0.5
#: ``hook(job, step)`` runs after each step (tests use it); None in normal use.
StepHook = Callable[[dict, int], None]


class JobCancelled(Exception):
    """Raised from the step callback to stop a cancelled job."""


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the API shows it."""
    return {key: job[key] for key in ("id", "status", "progress", "params", "images", "error", "created",
                                      "started", "finished")}


class JobClaims:
    """Claims the pending jobs of ``store`` in order, for the threads of a worker; ``notify`` wakes them."""

    def __init__(self, store: BaseJobStore) -> None:
        self.store = store
        self._wake = threading.Condition()
        self._stop = False

    def notify(self) -> None:
        """New work is in the store."""
        with self._wake:
            self._wake.notify_all()

    def _end_claims(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()

    def _claims(self) -> Iterator[dict[str, Any]]:
        """Each job this thread claims (marked running), until the worker stops."""
        while not self._stop:
            job = self.store.start_next()
            if job is not None:
                yield job
                continue
            with self._wake:
                if not self._stop:
                    self._wake.wait(IDLE_WAIT_S)


class Worker(JobClaims):
    """Runs jobs of ``store`` on ``models`` in a thread; images go to ``data_dir/images/ID``."""

    def __init__(self, store: BaseJobStore, models: dict[str, ServedModel], events: EventLog, data_dir: Path,
                 step_hook: StepHook | None = None) -> None:
        super().__init__(store)
        self.models, self.events, self.data_dir = models, events, data_dir
        self.step_hook = step_hook
        self.running: str | None = None
        self.step = 0  # of the running job
        self._cancelled: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="diffusekit-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._end_claims()
        self._thread.join(timeout)

    def cancel_running(self, job_id: str) -> None:
        """Ask a running job to stop at its next step."""
        self._cancelled.add(job_id)

    def _loop(self) -> None:
        for job in self._claims():
            self.running, self.step = job["id"], 0
            try:
                self._run(job)
            finally:
                self.running = None

    def _run(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        self.events.publish(job_id, "started", job_view(job))
        try:
            images = self._generate(job)
        except JobCancelled:
            self._end(job_id, "cancelled")
        except Exception as err:  # one job fails alone; the server keeps serving
            logger.warning("job %s failed: %s", job_id, err)
            self._end(job_id, "failed", error=error_of(err))
        else:
            self._end(job_id, "succeeded", images=images)

    def _end(self, job_id: str, status: str, **result) -> None:
        self.store.finish(job_id, status, self.step, **result)
        self.events.publish(job_id, status, job_view(self.store.get(job_id)))

    def _generate(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        return generate_job(self.models, job, self.data_dir, self._callback(job))

    def progress(self, job_id: str) -> int | None:
        """The steps the job has run, while this worker runs it; else None."""
        return self.step if self.running == job_id else None

    def _callback(self, job: dict[str, Any]) -> Callable:
        job_id, total = job["id"], job["progress"]["total"]

        def on_step(pipe, step: int, t, tensors: dict) -> None:
            if job_id in self._cancelled:
                raise JobCancelled(job_id)
            done = min(step + 1, total)
            self.step = done
            self.events.publish(job_id, "progress", {"step": done, "total": total})
            if self.step_hook is not None:
                self.step_hook(job, done)

        return on_step


def generate_job(models: dict[str, ServedModel], job: dict[str, Any], data_dir: Path,
                 on_step: Callable | None = None) -> list[dict[str, Any]]:
    """Make a job's images in ``data_dir/images/ID`` (its inputs read from ``data_dir/inputs``), calling
    ``on_step`` after each step; the job's image entries."""
    from ..cli_generate import generate_files

    params = job["params"]
    model = models[params["model"]]
    out = data_dir / "images" / job["id"]
    shutil.rmtree(out, ignore_errors=True)  # what a run the process died in left behind
    files = {name: data_dir / "inputs" / f"{params[name]}.png" for name in ("image", "mask_image") if name in params}
    options = generate_options(model, params, out, files)
    pipe = job_pipeline(model, options)
    extra = {"callback_on_step_end": on_step} if on_step and "callback_on_step_end" in model.accepted else {}
    loaded = model.use_loras(params.get("loras", []))
    paths = generate_files(pipe, options, loaded, **extra)
    return [{"url": f"/v1/jobs/{job['id']}/images/{i}", "seed": params["seed"] + i, "file": path.name}
            for i, path in enumerate(paths)]


def error_of(err: Exception) -> dict[str, str]:
    if isinstance(err, (ValueError, OSError)):
        code = "invalid_input"
    elif "out of memory" in str(err).lower():
        code = "out_of_memory"
    else:
        code = "internal_error"
    return {"code": code, "message": f"{type(err).__name__}: {err}"}
