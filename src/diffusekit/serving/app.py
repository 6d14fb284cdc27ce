"""The FastAPI application: the native job API, the compatibility layers and the web page."""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib import resources
from typing import Callable

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .compat_a1111 import router as a1111_router
from .compat_openai import router as openai_router
from .events import stream
from .jobs import STATUSES, QueueFull
from .models import FieldError, ServedModel
from .requests import JobRequest
from .security import Guard, error_body
from .service import Conflict, JobFailed, NotFound, Service, Settings
from .worker import StepHook, Worker, job_view


def create_app(settings: Settings, models: dict[str, ServedModel], step_hook: StepHook | None = None,
               worker_class: Callable[..., Worker] = Worker):
    """The ASGI app (guarded) serving ``models``; the worker (``worker_class``: how jobs run) runs while
    the app does."""
    service = Service(settings, models, step_hook, worker_class)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="diffusekit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _add_error_handlers(app)
    _add_job_routes(app)
    app.include_router(openai_router)
    app.include_router(a1111_router)
    _add_page(app)
    return Guard(app, settings.host, settings.api_key, settings.limits.max_body_bytes)


def _error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, field), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        location = [str(part) for part in first["loc"][1:]]
        field = ".".join(location) if location and first["type"] != "json_invalid" else "body"
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        return _error(422, "invalid_field", f"{field}: {message}", field)

    @app.exception_handler(FieldError)
    async def bad_field(request: Request, err: FieldError) -> JSONResponse:
        return _error(err.status, "invalid_field", str(err), err.field)

    @app.exception_handler(QueueFull)
    async def full(request: Request, err: QueueFull) -> JSONResponse:
        return _error(429, "queue_full", str(err))

    @app.exception_handler(NotFound)
    async def missing(request: Request, err: NotFound) -> JSONResponse:
        return _error(404, "not_found", str(err))

    @app.exception_handler(Conflict)
    async def conflict(request: Request, err: Conflict) -> JSONResponse:
        return _error(409, "conflict", str(err))

    @app.exception_handler(TimeoutError)
    async def timeout(request: Request, err: TimeoutError) -> JSONResponse:
        return _error(504, "timeout", str(err))

    @app.exception_handler(JobFailed)
    async def failed(request: Request, err: JobFailed) -> JSONResponse:
        status = 409 if err.job["status"] == "cancelled" else 500
        return _error(status, err.code, str(err))

    @app.exception_handler(HTTPException)
    async def http(request: Request, err: HTTPException) -> JSONResponse:
        field, sep, _ = str(err.detail).partition(":")
        return _error(err.status_code, "http_error", str(err.detail), field if sep and " " not in field else None)


def _service(request: Request) -> Service:
    return request.app.state.service


def _add_job_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> dict:
        return {"status": "ok", "jobs": _service(request).store.counts()}

    @app.post("/v1/jobs", status_code=202)
    async def submit(body: JobRequest, request: Request) -> dict:
        return _service(request).submit(body)

    @app.get("/v1/jobs")
    async def list_jobs(request: Request, status: str | None = None, limit: int = Query(50, ge=1, le=500)) -> dict:
        if status is not None and status not in STATUSES:
            raise FieldError("status", f"{status!r} is not one of {', '.join(STATUSES)}")
        return {"jobs": [job_view(job) for job in _service(request).store.list(status, limit)]}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> dict:
        return _service(request).job(job_id)

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel(job_id: str, request: Request) -> dict:
        return _service(request).cancel(job_id)

    @app.get("/v1/jobs/{job_id}/images/{index}")
    async def image(job_id: str, index: int, request: Request) -> FileResponse:
        return FileResponse(_service(request).image_path(job_id, index), media_type="image/png")

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, request: Request, last_event_id: str | None = Header(None)) -> StreamingResponse:
        service = _service(request)
        job = service.store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        if not last_event_id or not last_event_id.isdigit():
            last_event_id = "0"
        service.events.replay_from_store(job, job_view)
        body = stream(service.events, job_id, int(last_event_id), service.settings.keep_alive_s,
                      request.is_disconnected)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        return {"models": [model.describe() for model in _service(request).models.values()]}

    @app.get("/v1/schedulers")
    async def schedulers() -> dict:
        from ..schedulers.names import SAMPLER_NAMES

        return {"schedulers": [{"name": name, "class": entry.class_name, "description": entry.description}
                               for name, entry in SAMPLER_NAMES.items()]}


def _add_page(app: FastAPI) -> None:
    static = resources.files("diffusekit.serving").joinpath("static")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return static.joinpath("index.html").read_text(encoding="utf-8")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
