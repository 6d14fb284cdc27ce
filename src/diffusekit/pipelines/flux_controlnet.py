"""FluxControlNetPipeline: FLUX.1 text-to-image steered by one or several ControlNets."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..models.controlnet_flux import FluxMultiControlNetModel
from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .controlnet_common import conditioning_scales, controlnet_keep, guidance_windows
from .flux import FluxPipeline
from .flux_control import FluxControlImageMixin
from .prompt_encoding import prompt_batch_size
from .timesteps import progress_due


class FluxControlNetPipeline(FluxControlImageMixin, FluxPipeline):
    """FLUX.1 with ControlNet residuals. Components as :class:`~diffusekit.pipelines.flux_common.FluxBase`
    plus ``controlnet``: a :class:`~diffusekit.models.controlnet_flux.FluxControlNetModel`, or a list of
    them / a :class:`~diffusekit.models.controlnet_flux.FluxMultiControlNetModel`."""

    _callback_tensor_inputs = ("latents", "prompt_embeds", "control_image")

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer, controlnet,
                 image_encoder=None, feature_extractor=None) -> None:
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                         image_encoder, feature_extractor)
        if isinstance(controlnet, (list, tuple)):
            controlnet = FluxMultiControlNetModel(controlnet)
        self.register_modules(controlnet=controlnet)

    @property
    def _multi(self) -> bool:
        return isinstance(self.controlnet, FluxMultiControlNetModel)

    def _control_inputs(self, control_image, control_mode, width: int, height: int, batch: int,
                        num_images_per_prompt: int, device, generator: Generator):
        """``(packed control latents, mode tensors, height, width)``, one entry per condition (the image
        size becomes the control image's, as in the reference)."""
        images = control_image if self._multi else [control_image]
        if self._multi and not isinstance(control_image, (list, tuple)):
            raise ValueError("control_image must be a list (one entry per ControlNet) with several ControlNets")
        modes = control_mode if isinstance(control_mode, (list, tuple)) else [control_mode] * len(images)
        if not self._multi and not (control_mode is None or isinstance(control_mode, int)):
            raise ValueError(f"control_mode must be an int or None with one ControlNet, got {control_mode!r}")
        if len(modes) != len(images):
            raise ValueError(f"control_mode holds {len(modes)} modes but control_image holds {len(images)} images")
        latents = []
        for image in images:
            image = self.prepare_image(image, width, height, batch, num_images_per_prompt, device, self.vae.dtype)
            height, width = image.shape[-2:]
            latents.append(self.encode_control_image(image, generator))
        if self._multi:  # the reference's "no mode" in Multi lists
            modes = [-1 if mode is None else mode for mode in modes]
        mode_tensors = [None if mode is None else torch.tensor(mode, device=device, dtype=torch.long).expand(batch)
                        for mode in modes]
        return latents, mode_tensors, height, width

    def _residuals(self, state, latents, timestep, control, modes, scales, prompt_embeds, pooled_prompt_embeds,
                   text_ids, image_ids, guidance_scale: float) -> dict[str, Any]:
        """The transformer's ControlNet keyword arguments for one step."""
        net = self.controlnet.nets[0] if self._multi else self.controlnet
        guidance = None
        if net.config.guidance_embeds:  # the ControlNet's own config decides, as in the reference
            guidance = torch.full([1], guidance_scale, device=latents.device, dtype=torch.float32).expand(len(latents))
        if self._multi:
            cond, mode, scale = control, modes, scales
        else:
            cond, mode, scale = control[0], None if modes[0] is None else modes[0][:, None], scales[0]
        blocks, singles = self.controlnet(
            hidden_states=latents, controlnet_cond=cond, controlnet_mode=mode, conditioning_scale=scale,
            timestep=timestep / 1000, guidance=guidance, pooled_projections=pooled_prompt_embeds,
            encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids,
            joint_attention_kwargs=state.joint_attention_kwargs, return_dict=False)
        return dict(controlnet_block_samples=blocks, controlnet_single_block_samples=singles,
                    controlnet_blocks_repeat=False)

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        control_image=None,
        control_mode: int | list[int | None] | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
    ):
        """Generate images for ``prompt`` following ``control_image`` (one per ControlNet, in a list with
        several; PIL images and arrays are resized to ``height`` x ``width``, tensors in [-1, 1] taken as
        they are; the output has the control image's size).

        - ``controlnet_conditioning_scale``: residual scale (a list: one per ControlNet);
        - ``control_guidance_start`` / ``control_guidance_end``: the share of the steps where each
          ControlNet acts (numbers or lists);
        - ``control_mode``: the mode index of a union ControlNet (a list with several conditions).

        Other arguments as :meth:`FluxPipeline.__call__`.
        """
        check_call_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             true_cfg_scale=true_cfg_scale, num_images_per_prompt=num_images_per_prompt)
        height, width = self.default_height_width(height, width)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs, max_sequence_length, output_type)
        count = len(control_image) if self._multi and isinstance(control_image, (list, tuple)) else 1
        starts, ends = guidance_windows(control_guidance_start, control_guidance_end, count)
        scales = conditioning_scales(controlnet_conditioning_scale if self._multi else
                                     _first(controlnet_conditioning_scale), count)
        state = self._begin_call(guidance_scale, joint_attention_kwargs, callback_on_step_end,
                                 callback_on_step_end_tensor_inputs)
        batch_size = prompt_batch_size(prompt, prompt_embeds)
        batch = batch_size * num_images_per_prompt
        device = self._execution_device

        # 1. text, then the control latents (drawn before the noise, as the reference)
        prompt_embeds, pooled_prompt_embeds, text_ids, negative = self.call_prompt_embeds(
            state, prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, batch_size, device,
            num_images_per_prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
            negative_pooled_prompt_embeds, max_sequence_length)
        control, modes, height, width = self._control_inputs(control_image, control_mode, width, height, batch,
                                                             num_images_per_prompt, device, generator)

        # 2. packed noise and the shifted schedule
        latents, image_ids = self.prepare_latents(batch, self.transformer.config.in_channels // 4, height, width,
                                                  prompt_embeds.dtype, device, generator, latents)
        scheduler = state.scheduler
        timesteps, num_inference_steps, warmup = self.shifted_schedule(state, num_inference_steps, sigmas,
                                                                       latents.shape[1], device)
        guidance = self.guidance_vector(guidance_scale, latents.shape[0], device)

        # 3. denoising loop: ControlNet residuals, then the transformer
        keep = controlnet_keep(len(timesteps), starts, ends)
        scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                state.current_timestep = t
                state.denoiser_kwargs = self._residuals(
                    state, latents, t.expand(latents.shape[0]).to(latents.dtype), control, modes,
                    [s * k for s, k in zip(scales, keep[i])], prompt_embeds, pooled_prompt_embeds, text_ids, image_ids,
                    guidance_scale)
                velocity = self.guided_velocity(state, latents, t, guidance, prompt_embeds, pooled_prompt_embeds,
                                                text_ids, image_ids, negative, true_cfg_scale)
                latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
                if state.callback is not None:
                    tensors = self.step_callback(state, i, t, dict(latents=latents, prompt_embeds=prompt_embeds,
                                                                   control_image=_one_or_list(control, self._multi)))
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                    control = _as_list(tensors["control_image"], self._multi)
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()
        state.current_timestep = None
        state.denoiser_kwargs = {}

        # 4. decode
        images = self.latents_to_output(latents, height, width, output_type)
        return self._finish_call(images, return_dict)


def _first(value: float | Sequence[float]) -> float:
    """One ControlNet takes the first of a list of scales (as the reference)."""
    return value[0] if isinstance(value, (list, tuple)) else value


def _one_or_list(control: list[torch.Tensor], multi: bool):
    return control if multi else control[0]


def _as_list(control, multi: bool) -> list[torch.Tensor]:
    return list(control) if multi else [control]
