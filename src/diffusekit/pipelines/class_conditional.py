"""ClassConditionalPipeline: class-conditional generation with classifier-free guidance."""

from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..schedulers import schedule_math as sm
from ..utils import Generator
from .image_processing import postprocess_images
from .noise import image_shape, initial_noise
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput


def _edm_levels(scheduler, t: torch.Tensor):
    return torch.ones_like(t), torch.exp(4 * t)  # sample = x0 + sigma noise, timestep = log(sigma) / 4


def _flow_levels(scheduler, t: torch.Tensor):
    share = t / scheduler.config.num_train_timesteps  # sample = (1 - s) x0 + s noise, timestep = 1000 s
    return 1 - share, share


def _trigonometric_levels(scheduler, t: torch.Tensor):
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)  # timestep in (0, 1]


def _edm_network_output(scheduler, sample, x0, noise, signal, noise_scale):
    """The EDM network output F that the scheduler's preconditioning turns into ``x0`` (it is affine in F)."""
    offset = scheduler.precondition_outputs(sample, torch.zeros_like(sample), noise_scale)
    gain = scheduler.precondition_outputs(sample, torch.ones_like(sample), noise_scale) - offset
    return (x0 - offset) / gain


def _velocity(scheduler, sample, x0, noise, signal, noise_scale):
    return noise - x0


#: Schedulers whose timesteps are not the model's training timesteps: (signal, noise) scales of their
#: sample at a timestep, and the model output they take, made from the clean-image and noise estimates
#: (``output(scheduler, sample, x0, noise, signal, noise_scale)``).
_OTHER_PARAMETRISATIONS = {
    "EDMEulerScheduler": (_edm_levels, lambda scheduler, sample, x0, *_: x0),  # as pred_original_sample
    "EDMDPMSolverMultistepScheduler": (_edm_levels, _edm_network_output),
    "FlowMatchEulerDiscreteScheduler": (_flow_levels, _velocity),
    "FlowMatchHeunDiscreteScheduler": (_flow_levels, _velocity),
    "FlowMatchLCMScheduler": (_flow_levels, _velocity),
    # iPNDM takes the v-prediction on its own scale
    "IPNDMScheduler": (_trigonometric_levels,
                       lambda scheduler, sample, x0, noise, signal, noise_scale: signal * noise - noise_scale * x0),
}


class ClassConditionalPipeline(DiffusionPipeline):
    """A pixel-space UNet2DModel conditioned on class labels (``num_class_embeds``) and any scheduler.

    The UNet's last class index is the learned *null class* (the "no label" embedding seen during
    training when labels were dropped), so a model for ``n`` classes has ``num_class_embeds = n + 1``.
    Classifier-free guidance mixes the two predictions: ``uncond + scale * (cond - uncond)``.

    Saved folders name ``DDIMPipeline`` as their class (and this class under
    ``_diffusekit_class_name``), so the reference library can load them too.
    """

    _reference_class_name = "DDIMPipeline"

    def __init__(self, unet, scheduler) -> None:
        super().__init__()
        if getattr(unet.config, "num_class_embeds", None) is None or unet.config.num_class_embeds < 2:
            raise ValueError("ClassConditionalPipeline needs a UNet with num_class_embeds >= 2 "
                             "(the classes plus the null class)")
        self.register_modules(unet=unet, scheduler=scheduler)
        self._training_schedule = self._schedule_of(scheduler)

    @staticmethod
    def _schedule_of(scheduler) -> tuple[np.ndarray, str] | None:
        """(log sigmas of the training timesteps, prediction type), from a DDPM-family scheduler."""
        if getattr(scheduler, "alphas_cumprod", None) is None:
            return None
        sigmas = sm.sigmas_from_alphas_cumprod(scheduler.alphas_cumprod.double().cpu().numpy())
        return np.log(sigmas), scheduler.config.prediction_type

    @property
    def num_classes(self) -> int:
        """Number of real classes (the null class excluded)."""
        return self.unet.config.num_class_embeds - 1

    @property
    def null_class(self) -> int:
        return self.unet.config.num_class_embeds - 1

    def _labels(self, class_labels: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten().cpu()
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"class_labels must lie in 0..{self.num_classes - 1}, got {bad.tolist()}")
        return labels.to(self.device)

    def _predict(self, sample: torch.Tensor, t, labels: torch.Tensor, guidance_scale: float,
                 guidance_stop_timestep: float = 0.0) -> torch.Tensor:
        """The guided model output for ``sample`` at timestep ``t`` (unguided below ``guidance_stop_timestep``)."""
        if guidance_scale == 1.0 or float(t) < guidance_stop_timestep:
            return self.unet(sample, t, class_labels=labels).sample
        both = torch.cat([sample, sample])
        null = torch.full_like(labels, self.null_class)
        cond, uncond = self.unet(both, t, class_labels=torch.cat([labels, null])).sample.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _predict_other(self, scheduler, sample: torch.Tensor, t, labels: torch.Tensor, guidance_scale: float,
                       guidance_stop_timestep: float):
        """The model output a scheduler on another parametrisation (EDM, flow matching, iPNDM) takes.

        The sample is rescaled to the model's variance-preserving input, the timestep with the same
        signal-to-noise ratio is looked up in the training schedule, and the guided prediction is
        turned into the clean-image and noise estimates that the scheduler combines.
        """
        if self._training_schedule is None:
            raise ValueError(f"{type(scheduler).__name__} needs the model's training noise schedule: build the "
                             "pipeline with the scheduler it was trained with, then swap the scheduler")
        log_sigmas, prediction_type = self._training_schedule
        levels, output = _OTHER_PARAMETRISATIONS[type(scheduler).__name__]
        signal, noise_scale = (float(v) for v in levels(scheduler, torch.as_tensor(t, dtype=torch.float64)))
        model_input = sample / (signal**2 + noise_scale**2) ** 0.5
        # the noise level, kept inside the trained range (an epsilon model cannot say x0 at pure noise)
        sigma = float(np.clip(noise_scale / max(signal, 1e-30), *np.exp([log_sigmas.min(), log_sigmas.max()])))
        timestep = torch.tensor(float(sm.sigma_to_t(np.array([sigma]), log_sigmas)[0]), device=self.device)
        prediction = self._predict(model_input, timestep, labels, guidance_scale, guidance_stop_timestep)
        alpha_prod = 1 / (1 + sigma**2)
        x0 = sm.x0_from_alpha(prediction, model_input, alpha_prod, prediction_type)
        noise = sm.eps_from_alpha(prediction, model_input, alpha_prod, prediction_type)
        model_output = output(scheduler, sample, x0, noise, signal, noise_scale)
        return model_output, _step_options(scheduler, pred_original_sample=x0)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 50,
        generator: Generator = None,
        eta: float = 0.0,
        guidance_stop_timestep: float = 100.0,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
    ):
        """One image per entry of ``class_labels``. ``guidance_scale`` 1 turns guidance off, 0 is unconditional.
        ``callback_on_step_end(pipe, step, t, {"image": image})`` runs after each step and may return a
        replacement image (an exception it raises stops the call).

        Guidance stops below ``guidance_stop_timestep`` (a training timestep; 0 guides every step): at
        low noise the class is settled and guidance only amplifies pixel noise into speckle.
        """
        labels = self._labels(class_labels)
        shape = image_shape(self.unet, labels.shape[0])
        scheduler = self.scheduler.for_call()
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        scale = float(getattr(scheduler, "init_noise_sigma", 1.0))  # some schedulers set it in set_timesteps
        image = initial_noise(shape, generator, self.device, self.unet.dtype, latents=latents, scale=scale)
        step_options = _step_options(scheduler, generator=generator, eta=eta)
        other = type(scheduler).__name__ in _OTHER_PARAMETRISATIONS
        for step, t in enumerate(self.progress_bar(scheduler.timesteps)):
            if other:
                prediction, extra = self._predict_other(scheduler, image, t, labels, guidance_scale, guidance_stop_timestep)
            else:
                model_input = scheduler.scale_model_input(image, t)
                prediction = self._predict(model_input, t, labels, guidance_scale, guidance_stop_timestep)
                extra = {}
            image = scheduler.step(prediction, t, image, **step_options, **extra).prev_sample
            if callback_on_step_end is not None:
                image = (callback_on_step_end(self, step, t, {"image": image}) or {}).get("image", image)
        images = postprocess_images(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _step_options(scheduler, **options) -> dict:
    """Those of ``options`` that ``scheduler.step`` takes (not every scheduler takes a generator or eta)."""
    accepted = inspect.signature(scheduler.step).parameters
    return {name: value for name, value in options.items() if name in accepted}
