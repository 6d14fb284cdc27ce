"""OpenAI-style ``POST /v1/images/generations`` on the same queue (synchronous)."""

from __future__ import annotations

import base64
import re
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from .models import FieldError
from .requests import JobRequest, choose_model, field_names, make_request
from .service import run_sync

router = APIRouter()


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["url", "b64_json"] = "url"
    quality: Literal["standard", "auto"] | None = None
    style: Literal["vivid"] | None = None
    user: str | None = None


def _job_request(body: ImageGenerationRequest, models: dict) -> JobRequest:
    """The native request: a class-conditional model reads the prompt as a class number or name."""
    model = choose_model(models, body.model)
    fields = {"model": model.name, "n": body.n}
    if body.size is not None:
        match = re.fullmatch(r"(\d+)x(\d+)", body.size)
        if not match:
            raise FieldError("size", f"{body.size!r} is not WIDTHxHEIGHT, e.g. 512x512")
        fields["width"], fields["height"] = int(match[1]), int(match[2])
    fields["class_label" if model.classes is not None else "prompt"] = body.prompt
    return make_request(fields)


@router.post("/v1/images/generations")
async def generations(body: ImageGenerationRequest, request: Request) -> dict:
    service = request.app.state.service
    with field_names({"width": "size", "height": "size", "class_label": "prompt"}):
        job, images = await run_sync(service, _job_request(body, service.models))
    if body.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(png).decode()} for png in images]
    else:
        data = [{"url": str(request.base_url).rstrip("/") + image["url"]} for image in job["images"]]
    return {"created": int(time.time()), "data": data}
