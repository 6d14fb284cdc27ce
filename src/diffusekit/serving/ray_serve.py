"""``diffusekit serve --ray``: the same HTTP API on Ray Serve, the pipelines in several replicas.

Two deployments:

- ``Pipelines``: ``--num-replicas`` replicas (one GPU each with ``--device cuda``, half a logical CPU
  each on CPU), each holding the loaded models. A replica runs one job at a time with the in-process
  worker's code (:func:`~diffusekit.serving.worker.generate_job`) and streams its steps back, then
  its PNG files' bytes; it never touches the job store or the data folder.
- ``Api``: one replica serving the existing FastAPI app (``serve.ingress``), with the job store, the
  event log and a :class:`RayDispatcher` in place of the worker thread. The dispatcher claims jobs
  from the store in submission order, one per free pipeline replica, publishes their steps, stores
  their images and records their end.

So submission, limits, the event stream, cancel, restart rules and the images are those of the
in-process server: the state the API answers from (store, events, progress) lives in one process,
and only the denoising moves to the replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from .events import EventLog
from .jobs import BaseJobStore
from .models import ServedModel
from .worker import JobCancelled, JobClaims, StepHook, error_of, generate_job, job_view

logger = logging.getLogger("diffusekit.serve")
#: Logical CPUs a CPU pipeline replica and the API replica ask Ray for.
CPU_REPLICA_CPUS = 0.5
APP_NAME = "diffusekit"
#: Ray Serve's own logs: warnings only, no access log (the API's errors answer for themselves).
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


class PipelineReplica:
    """A replica holding the loaded models; :meth:`run` makes one job's images, streaming its steps."""

    def __init__(self, specs: list[str], loras: list[str], device: str, threads: int | None) -> None:
        from ..cli_system import check_device, set_threads
        from .models import load_models

        set_threads(threads)
        # Ray shows each GPU replica its own GPU only, as cuda:0.
        self.models = load_models(specs, check_device("cuda" if device.startswith("cuda") else device), loras)

    async def run(self, job: dict[str, Any], inputs: dict[str, bytes]):
        """Yield ``{"step": n}`` after each step, then the end: ``{"status": "succeeded", "images",
        "files": {name: PNG bytes}}``, ``{"status": "failed", "error"}`` or ``{"status": "cancelled"}``
        (when the caller cancels the request, the job stops at its next step)."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        total = job["progress"]["total"]

        def on_step(pipe, step: int, t, tensors: dict) -> None:
            if stop.is_set():
                raise JobCancelled(job["id"])
            loop.call_soon_threadsafe(items.put_nowait, {"step": min(step + 1, total)})

        running = loop.run_in_executor(None, self._job_end, job, inputs, on_step)
        running.add_done_callback(lambda done: items.put_nowait(_end_of(done)))
        try:
            while True:
                item = await items.get()
                yield item
                if "status" in item:
                    return
        except asyncio.CancelledError:
            stop.set()
            await asyncio.shield(running)  # one job at a time: the next waits for this one's last step
            raise

    def _job_end(self, job: dict[str, Any], inputs: dict[str, bytes], on_step) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="diffusekit-job-") as folder:
            data_dir = Path(folder)
            (data_dir / "inputs").mkdir()
            for name, data in inputs.items():
                (data_dir / "inputs" / f"{job['params'][name]}.png").write_bytes(data)
            try:
                images = generate_job(self.models, job, data_dir, on_step)
            except JobCancelled:
                return {"status": "cancelled"}
            except Exception as err:  # one job fails alone
                logger.warning("job %s failed: %s", job["id"], err)
                return {"status": "failed", "error": error_of(err)}
            out = data_dir / "images" / job["id"]
            return {"status": "succeeded", "images": images,
                    "files": {image["file"]: (out / image["file"]).read_bytes() for image in images}}


def _end_of(done: asyncio.Future) -> dict[str, Any]:
    """A finished job thread's end item (an error outside the pipeline call fails the job too)."""
    error = done.exception()
    return done.result() if error is None else {"status": "failed", "error": error_of(error)}


class RayDispatcher(JobClaims):
    """The worker of the ``Api`` replica: ``slots`` threads, each claiming the next pending job from the
    store and running it on a pipeline replica through ``handle`` (same interface as ``Worker``)."""

    def __init__(self, store: BaseJobStore, models: dict[str, ServedModel], events: EventLog, data_dir: Path,
                 step_hook: StepHook | None = None, *, handle, slots: int) -> None:
        super().__init__(store)
        self.events, self.data_dir, self.handle = events, data_dir, handle
        self._steps: dict[str, int] = {}  # running job -> steps done (insertion order: oldest first)
        self._responses: dict[str, Any] = {}
        self._cancelled: set[str] = set()
        self._threads = [threading.Thread(target=self._loop, name=f"diffusekit-dispatch-{i}", daemon=True)
                         for i in range(slots)]

    @property
    def running(self) -> str | None:
        """The oldest running job (what A1111's progress shows)."""
        running = list(self._steps)  # one step under the GIL: the dispatch threads change it
        return running[0] if running else None

    def progress(self, job_id: str) -> int | None:
        return self._steps.get(job_id)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._end_claims()
        for response in list(self._responses.values()):
            response.cancel()
        for thread in self._threads:
            thread.join(timeout)

    def cancel_running(self, job_id: str) -> None:
        self._cancelled.add(job_id)
        response = self._responses.get(job_id)
        if response is not None:
            response.cancel()

    def _loop(self) -> None:
        for job in self._claims():
            self._steps[job["id"]] = 0
            try:
                self._run(job)
            finally:
                self._steps.pop(job["id"], None)
                self._responses.pop(job["id"], None)
                self._cancelled.discard(job["id"])

    def _run(self, job: dict[str, Any]) -> None:
        job_id, params = job["id"], job["params"]
        self.events.publish(job_id, "started", job_view(job))
        end: dict[str, Any] = {"status": "failed", "error": {"code": "internal_error",
                                                             "message": "the pipeline replica sent no result"}}
        try:
            if job_id in self._cancelled:
                raise JobCancelled(job_id)
            inputs = {name: (self.data_dir / "inputs" / f"{params[name]}.png").read_bytes()
                      for name in ("image", "mask_image") if name in params}
            response = self.handle.options(stream=True).run.remote(job, inputs)
            self._responses[job_id] = response
            for item in response:
                if "step" in item:
                    self._steps[job_id] = item["step"]
                    self.events.publish(job_id, "progress", {"step": item["step"], "total": job["progress"]["total"]})
                else:
                    end = item
        except Exception as err:  # cancelled (through Ray), an input gone, or the replica died
            end = {"status": "cancelled"} if job_id in self._cancelled else {"status": "failed", "error": error_of(err)}
        self._finish(job_id, end)

    def _finish(self, job_id: str, end: dict[str, Any]) -> None:
        from ..configuration import atomic_write

        out = self.data_dir / "images" / job_id
        shutil.rmtree(out, ignore_errors=True)  # what a run the process died in left behind
        if end["status"] == "succeeded":
            out.mkdir(parents=True)
            for name, data in end["files"].items():
                atomic_write(out / name, lambda f, data=data: f.write(data))
        self.store.finish(job_id, end["status"], self._steps.get(job_id, 0), images=end.get("images"),
                          error=end.get("error"))
        self.events.publish(job_id, end["status"], job_view(self.store.get(job_id)))


class ApiReplica:
    """The ``Api`` replica: the existing app, its jobs run by a dispatcher over the pipeline replicas."""

    def __init__(self, args: argparse.Namespace, handle, slots: int) -> None:
        from ..cli_system import set_threads
        from .server import build

        set_threads(args.threads)
        worker = functools.partial(RayDispatcher, handle=handle, slots=slots)
        # The models here only answer what requests may ask (names, sizes, classes): loaded on CPU.
        self._app, _ = build(args, worker_class=worker, device="cpu")

    def __serve_build_asgi_app__(self):
        return self._app


def replica_count(args: argparse.Namespace) -> int:
    """``--num-replicas``, else the cluster's GPUs (``--device cuda``) or 1."""
    import ray

    if args.num_replicas is not None:
        return args.num_replicas
    if not args.device.startswith("cuda"):
        return 1
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise ValueError("--device cuda --ray: the Ray cluster has no GPUs")
    return gpus


def deploy(args: argparse.Namespace) -> str:
    """Start Ray Serve on ``--host``/``--port`` and deploy the two deployments; the base URL."""
    from ray import serve

    from .server import settings_from

    replicas = replica_count(args)
    resources = {"num_gpus": 1} if args.device.startswith("cuda") else {"num_cpus": CPU_REPLICA_CPUS}
    pipelines = serve.deployment(PipelineReplica, name="Pipelines", num_replicas=replicas, max_ongoing_requests=1,
                                 ray_actor_options=resources, logging_config=SERVE_LOGGING)
    # The store and the images stay on the head node (where `diffusekit serve --ray` runs).
    api = serve.deployment(serve.ingress()(ApiReplica), name="Api", num_replicas=1, ray_actor_options={
        "num_cpus": CPU_REPLICA_CPUS, "resources": {"node:__internal_head__": 0.001}}, logging_config=SERVE_LOGGING)
    app_args = copy.copy(args)  # the replica may run elsewhere: the data folder as this machine resolves it
    app_args.data_dir = str(settings_from(args).data_dir.resolve())
    serve.start(proxy_location="HeadOnly", http_options={"host": args.host, "port": args.port},
                logging_config=SERVE_LOGGING)
    serve.run(api.bind(app_args, pipelines.bind(args.models, args.lora or [], args.device, args.threads), replicas),
              name=APP_NAME, route_prefix="/")
    return f"http://{args.host}:{args.port}"


def command_serve_ray(args: argparse.Namespace) -> int:
    """``diffusekit serve --ray``: deploy, then serve until interrupted (Ctrl-C: status 0, as without Ray)."""
    import time

    from ..batch_ray import import_ray, init_ray
    from .server import settings_from

    settings = settings_from(args)  # option errors before Ray starts
    if args.num_replicas is not None and args.num_replicas < 1:
        raise ValueError(f"--num-replicas must be at least 1, got {args.num_replicas}")
    ray = import_ray("serve")
    started = init_ray(args.ray_address)
    try:
        url = deploy(args)
        print(f"serving on {url}/ with Ray Serve (jobs in {settings.data_dir})", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        from ray import serve

        serve.shutdown()
        if started:
            ray.shutdown()
