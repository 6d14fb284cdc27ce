"""diffusekit: diffusion models, schedulers and pipelines in the diffusers on-disk format.

Public names are exported lazily, so ``import diffusekit`` loads only what a program uses.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module (relative to this package) that defines it.
_EXPORTS: dict[str, str] = {
    # configuration and loading
    "ConfigMixin": "configuration",
    "FrozenDict": "configuration",
    "register_to_config": "configuration",
    "ModelMixin": "models.modeling",
    "SchedulerMixin": "schedulers.scheduling_utils",
    "SchedulerOutput": "schedulers.scheduling_utils",
    "DiffusionPipeline": "pipelines.pipeline_utils",
    "ImagePipelineOutput": "pipelines.pipeline_utils",
    "AudioPipelineOutput": "pipelines.pipeline_utils",
    "randn_tensor": "utils",
    "VaeImageProcessor": "image_processor",
    # models
    "UNet2DModel": "models.unet_2d",
    "UNet2DConditionModel": "models.unet_2d_condition",
    "AutoencoderKL": "models.autoencoder_kl",
    "AutoencoderTiny": "models.autoencoder_tiny",
    "VQModel": "models.vq_model",
    "ConsistencyDecoderVAE": "models.consistency_decoder_vae",
    "UNet1DModel": "models.unet_1d",
    "FluxTransformer2DModel": "models.transformer_flux",
    "FluxControlNetModel": "models.controlnet_flux",
    "FluxMultiControlNetModel": "models.controlnet_flux",
    "ControlNetModel": "models.controlnet",
    "MultiControlNetModel": "models.controlnet",
    "LDMBertModel": "models.ldm_bert",
    "StableDiffusionSafetyChecker": "models.safety_checker",
    "AttnProcessor": "models.attention_processor",
    "AttnProcessor2_0": "models.attention_processor",
    "FirstBlockCacheConfig": "models.cache",
    "FasterCacheConfig": "models.cache",
    "DeepCacheConfig": "models.cache",
    "PyramidAttentionBroadcastConfig": "models.cache",
    "MagCacheConfig": "models.cache",
    "TaylorSeerCacheConfig": "models.cache",
    # schedulers
    "DDPMScheduler": "schedulers.ddpm",
    "DDIMScheduler": "schedulers.ddim",
    "PNDMScheduler": "schedulers.pndm",
    "LMSDiscreteScheduler": "schedulers.lms",
    "EulerDiscreteScheduler": "schedulers.euler",
    "EulerAncestralDiscreteScheduler": "schedulers.euler_ancestral",
    "HeunDiscreteScheduler": "schedulers.heun",
    "KDPM2DiscreteScheduler": "schedulers.kdpm2",
    "KDPM2AncestralDiscreteScheduler": "schedulers.kdpm2_ancestral",
    "DPMSolverMultistepScheduler": "schedulers.dpmsolver_multistep",
    "DPMSolverSinglestepScheduler": "schedulers.dpmsolver_singlestep",
    "DEISMultistepScheduler": "schedulers.deis",
    "UniPCMultistepScheduler": "schedulers.unipc",
    "LCMScheduler": "schedulers.lcm",
    "EDMEulerScheduler": "schedulers.edm_euler",
    "FlowMatchEulerDiscreteScheduler": "schedulers.flow_match_euler",
    "IPNDMScheduler": "schedulers.ipndm",
    "ScoreSdeVeScheduler": "schedulers.score_sde_ve",
    "ScoreSdeVpScheduler": "schedulers.score_sde_vp",
    "KarrasVeScheduler": "schedulers.karras_ve",
    "TCDScheduler": "schedulers.tcd",
    "DDIMInverseScheduler": "schedulers.ddim_inverse",
    "DPMSolverMultistepInverseScheduler": "schedulers.dpmsolver_multistep_inverse",
    "EDMDPMSolverMultistepScheduler": "schedulers.edm_dpmsolver_multistep",
    "FlowMatchHeunDiscreteScheduler": "schedulers.flow_match_heun",
    "FlowMatchLCMScheduler": "schedulers.flow_match_lcm",
    "DDIMParallelScheduler": "schedulers.ddim_parallel",
    "DDPMParallelScheduler": "schedulers.ddpm_parallel",
    "CMStochasticIterativeScheduler": "schedulers.consistency_models",
    "SASolverScheduler": "schedulers.sasolver",
    "UnCLIPScheduler": "schedulers.unclip",
    "RePaintScheduler": "schedulers.repaint",
    "VQDiffusionScheduler": "schedulers.vq_diffusion",
    "ConsistencyDecoderScheduler": "schedulers.scheduling_consistency_decoder",
    # pipelines
    "DDPMPipeline": "pipelines.ddpm",
    "DDIMPipeline": "pipelines.ddim",
    "PNDMPipeline": "pipelines.pndm",
    "ClassConditionalPipeline": "pipelines.class_conditional",
    "LDMPipeline": "pipelines.ldm",
    "LDMTextToImagePipeline": "pipelines.ldm_text2img",
    "ScoreSdeVePipeline": "pipelines.score_sde_ve",
    "ScoreSdeVpPipeline": "pipelines.score_sde_vp",
    "KarrasVePipeline": "pipelines.karras_ve",
    "DanceDiffusionPipeline": "pipelines.dance_diffusion",
    "StableDiffusionPipeline": "pipelines.stable_diffusion",
    "StableDiffusionImg2ImgPipeline": "pipelines.stable_diffusion_img2img",
    "StableDiffusionInpaintPipeline": "pipelines.stable_diffusion_inpaint",
    "StableDiffusionDepth2ImgPipeline": "pipelines.stable_diffusion_depth2img",
    "StableDiffusionXLPipeline": "pipelines.stable_diffusion_xl",
    "StableDiffusionXLImg2ImgPipeline": "pipelines.stable_diffusion_xl_img2img",
    "StableDiffusionXLInpaintPipeline": "pipelines.stable_diffusion_xl_inpaint",
    "StableDiffusionControlNetPipeline": "pipelines.stable_diffusion_controlnet",
    "StableDiffusionControlNetImg2ImgPipeline": "pipelines.stable_diffusion_controlnet_img2img",
    "StableDiffusionControlNetInpaintPipeline": "pipelines.stable_diffusion_controlnet_inpaint",
    "StableDiffusionXLControlNetPipeline": "pipelines.stable_diffusion_xl_controlnet",
    "StableDiffusionXLControlNetImg2ImgPipeline": "pipelines.stable_diffusion_xl_controlnet_img2img",
    "FluxPipeline": "pipelines.flux",
    "FluxImg2ImgPipeline": "pipelines.flux_img2img",
    "FluxControlNetPipeline": "pipelines.flux_controlnet",
    "FluxControlPipeline": "pipelines.flux_control",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
