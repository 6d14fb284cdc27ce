"""One worker thread per device: runs the pending jobs in order, reports each step, stops a cancelled
job at its next step, and keeps serving when one job fails."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

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


class Worker:
    """Runs jobs of ``store`` on ``models`` in a thread; images go to ``data_dir/images/ID``."""

    def __init__(self, store: BaseJobStore, models: dict[str, ServedModel], events: EventLog, data_dir: Path,
                 step_hook: StepHook | None = None) -> None:
        self.store, self.models, self.events, self.data_dir = store, models, events, data_dir
        self.step_hook = step_hook
        self.running: str | None = None
        self.step = 0  # of the running job
        self._cancelled: set[str] = set()
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="diffusekit-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout)

    def notify(self) -> None:
        """New work is in the store."""
        with self._wake:
            self._wake.notify_all()

    def cancel_running(self, job_id: str) -> None:
        """Ask a running job to stop at its next step."""
        self._cancelled.add(job_id)

    def _loop(self) -> None:
        while not self._stop:
            job = self.store.start_next()
            if job is None:
                with self._wake:
                    if not self._stop:
                        self._wake.wait(IDLE_WAIT_S)
                continue
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
            self._end(job_id, "failed", error=_error_of(err))
        else:
            self._end(job_id, "succeeded", images=images)

    def _end(self, job_id: str, status: str, **result) -> None:
        self.store.finish(job_id, status, self.step, **result)
        self.events.publish(job_id, status, job_view(self.store.get(job_id)))

    def _generate(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        from ..cli_generate import generate_files

        params = job["params"]
        model = self.models[params["model"]]
        out = self.data_dir / "images" / job["id"]
        shutil.rmtree(out, ignore_errors=True)  # what a run the process died in left behind
        files = {name: self.data_dir / "inputs" / f"{params[name]}.png" for name in ("image", "mask_image")
                 if name in params}
        options = generate_options(model, params, out, files)
        pipe = job_pipeline(model, options)
        extra = {"callback_on_step_end": self._callback(job)} if "callback_on_step_end" in model.accepted else {}
        loaded = model.use_loras(params.get("loras", []))
        paths = generate_files(pipe, options, loaded, **extra)
        return [{"url": f"/v1/jobs/{job['id']}/images/{i}", "seed": params["seed"] + i, "file": path.name}
                for i, path in enumerate(paths)]

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


def _error_of(err: Exception) -> dict[str, str]:
    if isinstance(err, (ValueError, OSError)):
        code = "invalid_input"
    elif "out of memory" in str(err).lower():
        code = "out_of_memory"
    else:
        code = "internal_error"
    return {"code": code, "message": f"{type(err).__name__}: {err}"}
