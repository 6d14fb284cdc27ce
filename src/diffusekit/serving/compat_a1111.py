"""The AUTOMATIC1111 ``/sdapi/v1`` subset on the same queue.

A1111 clients send the whole request schema with its defaults: every field is accepted at its
default; a value other than the default for a feature diffusekit lacks is a 422 naming the field.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import APIRouter, Body, Request

from ..cli_metadata import A1111_SAMPLERS
from .models import FieldError, ServedModel
from .requests import JobRequest, choose_model, field_names, make_request
from .service import run_sync

router = APIRouter(prefix="/sdapi/v1")

#: A1111 request fields diffusekit maps onto a job.
MAPPED = ("prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "seed", "sampler_name",
          "sampler_index", "scheduler", "batch_size", "n_iter", "denoising_strength", "init_images", "mask")
_EMPTY = (None, "", [], {}, False, 0, -1)
#: Fields of A1111's schema diffusekit has no feature for: the values that mean "off".
UNSUPPORTED_AT = {
    "styles": _EMPTY, "subseed": _EMPTY, "subseed_strength": _EMPTY, "seed_resize_from_h": _EMPTY,
    "seed_resize_from_w": _EMPTY, "restore_faces": _EMPTY, "tiling": _EMPTY, "do_not_save_samples": (None, False, True),
    "do_not_save_grid": (None, False, True), "eta": (None, 0, 0.0), "s_min_uncond": _EMPTY, "s_churn": _EMPTY,
    "s_tmax": (None, 0, 0.0), "s_tmin": _EMPTY, "s_noise": (None, 1, 1.0), "override_settings": _EMPTY,
    "override_settings_restore_afterwards": (None, True, False), "refiner_checkpoint": _EMPTY,
    "refiner_switch_at": _EMPTY, "disable_extra_networks": _EMPTY, "firstpass_image": _EMPTY, "comments": _EMPTY,
    "enable_hr": _EMPTY, "firstphase_width": _EMPTY, "firstphase_height": _EMPTY, "hr_scale": (None, 2, 2.0),
    "hr_upscaler": _EMPTY, "hr_second_pass_steps": _EMPTY, "hr_resize_x": _EMPTY, "hr_resize_y": _EMPTY,
    "hr_checkpoint_name": _EMPTY, "hr_sampler_name": _EMPTY, "hr_scheduler": _EMPTY, "hr_prompt": _EMPTY,
    "hr_negative_prompt": _EMPTY, "hr_cfg": (None, 1, 1.0), "hr_distilled_cfg": (None, 3.5),
    "force_task_id": _EMPTY, "script_name": _EMPTY, "script_args": _EMPTY, "send_images": (None, True),
    "save_images": _EMPTY, "alwayson_scripts": _EMPTY, "infotext": _EMPTY, "distilled_cfg_scale": (None, 3.5),
    "resize_mode": _EMPTY, "image_cfg_scale": _EMPTY, "mask_blur_x": (None, 4), "mask_blur_y": (None, 4),
    "mask_blur": (None, 4), "mask_round": (None, True), "inpainting_fill": _EMPTY, "inpaint_full_res": (None, True),
    "inpaint_full_res_padding": _EMPTY, "inpainting_mask_invert": _EMPTY, "initial_noise_multiplier": (None, 1, 1.0),
    "latent_mask": _EMPTY, "include_init_images": _EMPTY, "model": _EMPTY,
}
#: Native field names -> A1111's, for error messages.
A1111_NAMES = {"guidance_scale": "cfg_scale", "n": "batch_size", "class_label": "prompt", "image": "init_images",
               "mask_image": "mask", "strength": "denoising_strength", "scheduler": "sampler_name"}
#: A1111's default size: to a model that makes one size only it means "the model's size".
A1111_DEFAULT_SIZE = 512


def _is_default(value: Any, allowed: tuple) -> bool:
    return any(value == a and type(value) is not bool or value is a for a in allowed)


def check_fields(body: dict[str, Any]) -> None:
    """FieldError for a field A1111 does not have, or an unsupported feature switched on."""
    for name, value in body.items():
        if name in MAPPED:
            continue
        if name not in UNSUPPORTED_AT:
            raise FieldError(name, "not a field of the A1111 API")
        if not _is_default(value, UNSUPPORTED_AT[name]):
            raise FieldError(name, f"{value!r}: diffusekit does not support this A1111 feature; leave it at "
                                   "its default")


def sampler_name(body: dict[str, Any]) -> str | None:
    """``"DPM++ 2M"`` (+ ``scheduler: "Karras"``) -> ``"DPM++ 2M Karras"``; None for the model's own."""
    name = body.get("sampler_name") or body.get("sampler_index")
    schedule = (body.get("scheduler") or "automatic").lower()
    if schedule not in ("automatic", "karras"):
        raise FieldError("scheduler", f"{body['scheduler']!r}: only Automatic and Karras are supported")
    if name and schedule == "karras" and not name.lower().endswith("karras"):
        name = f"{name} Karras"
    return name


def _size(body: dict[str, Any], model: ServedModel) -> dict[str, int]:
    fixed = model.fixed_size
    return {name: body[name] for name in ("width", "height")
            if body.get(name) is not None and not (fixed and body[name] == A1111_DEFAULT_SIZE)}


def _first_image(body: dict[str, Any], name: str) -> str | None:
    images = body.get(name)
    if isinstance(images, list):
        if len(images) > 1:
            raise FieldError(name, "one image only")
        return images[0] if images else None
    return images


def job_request(body: dict[str, Any], models: dict[str, ServedModel], img2img: bool, sampler: str | None) -> JobRequest:
    """The native request for a checked A1111 body (``sampler``: from :func:`sampler_name`)."""
    model = choose_model(models, None)
    batch = int(body.get("batch_size") or 1) * int(body.get("n_iter") or 1)
    fields: dict[str, Any] = {"model": model.name, "n": batch, "steps": body.get("steps"),
                              "guidance_scale": body.get("cfg_scale"), "seed": body.get("seed"),
                              "scheduler": sampler, **_size(body, model)}
    if model.classes is not None:  # the digits model: the prompt is the class
        if body.get("negative_prompt"):
            raise FieldError("negative_prompt", f"model {model.name!r} is class-conditional: no negative prompt")
        fields["class_label"] = body.get("prompt") or None
    else:
        fields.update(prompt=body.get("prompt"), negative_prompt=body.get("negative_prompt") or None)
    if img2img:
        fields.update(image=_first_image(body, "init_images"), mask_image=body.get("mask"),
                      strength=body.get("denoising_strength", 0.75))
    elif body.get("denoising_strength") not in (None, 0, 0.0, 0.75):
        raise FieldError("denoising_strength", "only img2img takes it (enable_hr is not supported)")
    return make_request({k: v for k, v in fields.items() if v is not None})


async def _generate(body: dict[str, Any], request: Request, img2img: bool) -> dict[str, Any]:
    service = request.app.state.service
    check_fields(body)
    sampler = sampler_name(body)
    with field_names(A1111_NAMES):
        native = job_request(body, service.models, img2img, sampler)
        job, images = await run_sync(service, native)
    seeds = [image["seed"] for image in job["images"]]
    info = {"seed": seeds[0], "all_seeds": seeds, "prompt": body.get("prompt", ""), "steps": job["progress"]["total"],
            "job_id": job["id"], "sampler_name": native.scheduler}
    return {"images": [base64.b64encode(png).decode() for png in images], "parameters": body, "info": json.dumps(info)}


@router.post("/txt2img")
async def txt2img(request: Request, body: dict[str, Any] = Body(...)) -> dict:
    return await _generate(body, request, img2img=False)


@router.post("/img2img")
async def img2img(request: Request, body: dict[str, Any] = Body(...)) -> dict:
    return await _generate(body, request, img2img=True)


@router.get("/progress")
async def progress(request: Request) -> dict:
    service = request.app.state.service
    running = service.worker.running
    job = service.job(running) if running else None
    if job is not None and job["status"] != "running":  # it has just ended
        job, running = None, None
    step, total = (job["progress"]["step"], job["progress"]["total"]) if job else (0, 0)
    counts = service.store.counts()
    return {"progress": step / total if total else 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
            "state": {"skipped": False, "interrupted": False, "job": running or "",
                      "job_count": counts.get("queued", 0) + counts.get("running", 0), "sampling_step": step,
                      "sampling_steps": total}}


@router.post("/interrupt")
async def interrupt(request: Request) -> dict:
    """Stop the running job at its next step (as A1111's button does)."""
    service = request.app.state.service
    if service.worker.running:
        service.worker.cancel_running(service.worker.running)
    return {}


@router.get("/samplers")
async def samplers() -> list[dict]:
    from ..schedulers.names import SAMPLER_NAMES

    return [{"name": A1111_SAMPLERS.get(name, name), "aliases": [name], "options": {}} for name in SAMPLER_NAMES]


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict]:
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
            for name in request.app.state.service.models]
