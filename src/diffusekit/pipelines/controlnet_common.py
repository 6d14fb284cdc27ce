"""What the ControlNet pipelines share (SD and SDXL): the nets, their per-net arguments, the
control images, which steps each net runs (``control_guidance_start`` / ``end``), and the
residuals of one step.

A call builds one :class:`ControlNetCall` (:func:`prepare_controlnet_call`) and, at every step,
puts :meth:`ControlNetCall.residuals` into ``state.denoiser_kwargs``; nothing is kept on the
pipeline or the nets.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any, Sequence

import torch

from ..models.controlnet import MultiControlNetModel
from .image_processing import preprocess_images

__all__ = [
    "ControlNetCall", "as_controlnet", "check_controlnet_arguments", "conditioning_scales", "controlnet_keep",
    "controlnet_nets", "guidance_windows", "prepare_control_image", "prepare_control_images",
    "prepare_controlnet_call", "resolve_guess_mode",
]

#: The UNet keywords the residuals go under (keys of ``state.denoiser_kwargs``).
DOWN_RESIDUALS = "down_block_additional_residuals"
MID_RESIDUAL = "mid_block_additional_residual"


def as_controlnet(controlnet: Any) -> Any:
    """A list or tuple of nets becomes a :class:`MultiControlNetModel` (as the reference's pipelines do)."""
    if isinstance(controlnet, (list, tuple)):
        return MultiControlNetModel(controlnet)
    return controlnet


def controlnet_nets(controlnet: Any) -> list:
    """The nets of a single ControlNet (a list of one) or of a :class:`MultiControlNetModel`."""
    return list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]


def _is_multi(controlnet: Any) -> bool:
    return isinstance(controlnet, MultiControlNetModel)


def conditioning_scales(scale: float | Sequence[float], count: int) -> list[float]:
    """``controlnet_conditioning_scale`` as one float per net (a number applies to every net)."""
    if isinstance(scale, Real):
        return [float(scale)] * count
    if isinstance(scale, (list, tuple)) and len(scale) == count and all(isinstance(s, Real) for s in scale):
        return [float(s) for s in scale]
    raise ValueError(f"controlnet_conditioning_scale must be a number or a list of {count} numbers "
                     f"(one per ControlNet), got {scale!r}")


def guidance_windows(start: float | Sequence[float], end: float | Sequence[float],
                     count: int) -> tuple[list[float], list[float]]:
    """``control_guidance_start`` / ``end`` as one value per net, checked: 0 <= start < end <= 1."""
    if not isinstance(start, (list, tuple)) and not isinstance(end, (list, tuple)):
        start, end = [start] * count, [end] * count
    elif not isinstance(start, (list, tuple)):
        start = [start] * len(end)
    elif not isinstance(end, (list, tuple)):
        end = [end] * len(start)
    start, end = list(start), list(end)
    if len(start) != len(end):
        raise ValueError(f"control_guidance_start has {len(start)} entries but control_guidance_end has {len(end)}")
    if len(start) != count:
        raise ValueError(f"control_guidance_start / control_guidance_end have {len(start)} entries but there are "
                         f"{count} ControlNets")
    for s, e in zip(start, end):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"control_guidance_start {s} and control_guidance_end {e} must satisfy "
                             "0 <= start < end <= 1")
    return start, end


def controlnet_keep(num_steps: int, start: Sequence[float], end: Sequence[float]) -> list[list[float]]:
    """Per step, per net: 1.0 when the step lies in the net's ``[start, end]`` share of the loop, else 0.0."""
    return [[0.0 if i / num_steps < s or (i + 1) / num_steps > e else 1.0 for s, e in zip(start, end)]
            for i in range(num_steps)]


def _image_batch(image: Any) -> int:
    """How many images a control-image argument holds (a list's length, a 4-d batch's first size, else 1)."""
    if isinstance(image, list):
        return len(image)
    if getattr(image, "ndim", None) == 4:  # a tensor (N, C, H, W) or an array (N, H, W, C)
        return image.shape[0]
    return 1


def prepare_control_image(image: Any, width: int | None, height: int | None, batch_size: int,
                          num_images_per_prompt: int, device, dtype: torch.dtype,
                          do_classifier_free_guidance: bool = False, guess_mode: bool = False,
                          crops_coords: tuple[int, int, int, int] | None = None, resize_mode: str = "default",
                          prompt_batch: int | None = None, vae_scale_factor: int = 8) -> torch.Tensor:
    """One net's conditioning image(s) as a tensor in [0, 1] ``(batch_size [x2], C, H, W)``.

    The image is resized to ``height`` x ``width`` (default: its own size, rounded down to a
    multiple of ``vae_scale_factor``), RGB, not normalised. One image is repeated to
    ``batch_size``; a batch (which must match ``prompt_batch``, the number of prompts) is
    repeated per prompt. With guidance and not ``guess_mode`` the batch is doubled (the
    unconditional half sees it too).
    """
    count = _image_batch(image)
    if count != 1 and prompt_batch is not None and count != prompt_batch:
        raise ValueError(f"the control image batch holds {count} images but there are {prompt_batch} prompts; "
                         "pass one image or one per prompt")
    pixels = preprocess_images(image, height, width, multiple=vae_scale_factor, latent_channels=4, normalize=False,
                               resize_mode=resize_mode, crops_coords=crops_coords).to(torch.float32)
    repeat_by = batch_size if pixels.shape[0] == 1 else num_images_per_prompt
    pixels = pixels.repeat_interleave(repeat_by, dim=0).to(device=device, dtype=dtype)
    if do_classifier_free_guidance and not guess_mode:
        pixels = torch.cat([pixels] * 2)
    return pixels


def prepare_control_images(controlnet: Any, image: Any, *, per_prompt_lists: bool = False,
                           **options: Any) -> torch.Tensor | list[torch.Tensor]:
    """:func:`prepare_control_image` for a single net (a tensor) or each net of a Multi-ControlNet
    (a list: ``image`` holds one entry per net). ``per_prompt_lists``: the text-to-image pipelines
    also take ``[[net0, net1, ...] per prompt]`` and regroup it per net."""
    if image is None:
        raise ValueError("a control image is required (image / control_image)")
    nets = controlnet_nets(controlnet)
    options.setdefault("dtype", nets[0].dtype)
    if not _is_multi(controlnet):
        return prepare_control_image(image, **options)
    if per_prompt_lists and isinstance(image, list) and image and isinstance(image[0], list):
        image = [list(group) for group in zip(*image)]
    if not isinstance(image, (list, tuple)) or len(image) != len(nets):
        found = len(image) if isinstance(image, (list, tuple)) else 1
        raise ValueError(f"with {len(nets)} ControlNets the control image must be a list of {len(nets)} images "
                         f"(one per net), got {found}")
    return [prepare_control_image(one, **options) for one in image]


@dataclass
class ControlNetCall:
    """One call's ControlNet settings: the nets' images, scales, per-step keep factors and guess mode."""

    controlnet: Any
    images: torch.Tensor | list[torch.Tensor]
    scales: list[float]
    keep: list[list[float]]
    guess_mode: bool

    def step_scale(self, step: int) -> float | list[float]:
        """The conditioning scale(s) of loop step ``step`` (0 outside a net's guidance window)."""
        scales = [scale * keep for scale, keep in zip(self.scales, self.keep[step])]
        return scales if _is_multi(self.controlnet) else scales[0]

    def residuals(self, scheduler, step: int, latents: torch.Tensor, t, prompt_embeds: torch.Tensor,
                  guided: bool, added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The UNet keywords of step ``step``: the (summed) down and mid residuals.

        The nets see the scheduler-scaled latents (doubled with guidance) and ``prompt_embeds``
        (negative half first with guidance). In guess mode with guidance they see only the
        conditional half (latents, embeddings, ``added_cond_kwargs``), and the unconditional half
        of the residuals is zero.
        """
        cond_only = self.guess_mode and guided
        model_input = torch.cat([latents] * 2) if guided and not cond_only else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if cond_only:
            prompt_embeds = prompt_embeds.chunk(2)[1]
            if added_cond_kwargs is not None:
                added_cond_kwargs = {k: v.chunk(2)[1] for k, v in added_cond_kwargs.items()}
        extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
        down, mid = self.controlnet(model_input, t, encoder_hidden_states=prompt_embeds, controlnet_cond=self.images,
                                    conditioning_scale=self.step_scale(step), guess_mode=self.guess_mode,
                                    return_dict=False, **extra)
        if cond_only:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {DOWN_RESIDUALS: down, MID_RESIDUAL: mid}


def prepare_controlnet_call(controlnet: Any, images: torch.Tensor | list[torch.Tensor], num_steps: int,
                            conditioning_scale: float | Sequence[float], guess_mode: bool,
                            control_guidance_start: float | Sequence[float],
                            control_guidance_end: float | Sequence[float]) -> ControlNetCall:
    """The :class:`ControlNetCall` of a loop of ``num_steps`` steps (``guess_mode`` is forced on for
    nets with ``global_pool_conditions``, as in the reference)."""
    count = len(controlnet_nets(controlnet))
    start, end = guidance_windows(control_guidance_start, control_guidance_end, count)
    return ControlNetCall(controlnet=controlnet, images=images, scales=conditioning_scales(conditioning_scale, count),
                          keep=controlnet_keep(num_steps, start, end),
                          guess_mode=resolve_guess_mode(controlnet, guess_mode))


def resolve_guess_mode(controlnet: Any, guess_mode: bool) -> bool:
    """``guess_mode``, or True when the (first) net pools its conditions (``global_pool_conditions``)."""
    return bool(guess_mode or controlnet_nets(controlnet)[0].config.global_pool_conditions)


def check_controlnet_arguments(controlnet: Any, conditioning_scale: float | Sequence[float],
                               control_guidance_start: float | Sequence[float],
                               control_guidance_end: float | Sequence[float]) -> None:
    """The checks of :func:`prepare_controlnet_call`, run before any work (ValueError naming the argument)."""
    count = len(controlnet_nets(controlnet))
    conditioning_scales(conditioning_scale, count)
    guidance_windows(control_guidance_start, control_guidance_end, count)
