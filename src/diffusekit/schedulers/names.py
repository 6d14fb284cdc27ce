"""Sampler names from other tools (A1111, ComfyUI, k-diffusion) mapped to diffusekit schedulers.

``scheduler_from_name("dpmpp_2m_karras", pipe.scheduler.config)`` builds the scheduler that such a
name means, from the config of the scheduler a pipeline shipped with (so the training betas stay).
"""

from __future__ import annotations

from typing import Any, NamedTuple

#: The schedulers that share the DDPM training config and can be swapped for one another.
KARRAS_DIFFUSION_SCHEDULERS: tuple[str, ...] = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
)


class SamplerName(NamedTuple):
    class_name: str
    overrides: dict[str, Any]
    description: str


_KARRAS = {"use_karras_sigmas": True}

#: Known names -> (scheduler class, config overrides, one-line description).
SAMPLER_NAMES: dict[str, SamplerName] = {
    "euler": SamplerName("EulerDiscreteScheduler", {}, "Euler ODE solver (k-diffusion sample_euler)"),
    "euler_karras": SamplerName("EulerDiscreteScheduler", _KARRAS, "Euler with Karras sigmas"),
    "euler_a": SamplerName("EulerAncestralDiscreteScheduler", {}, "Euler ancestral: Euler plus fresh noise each step"),
    "heun": SamplerName("HeunDiscreteScheduler", {}, "Heun's second-order ODE solver (two model calls per step)"),
    "heun_karras": SamplerName("HeunDiscreteScheduler", _KARRAS, "Heun with Karras sigmas"),
    "lms": SamplerName("LMSDiscreteScheduler", {}, "Linear multistep (k-diffusion sample_lms)"),
    "lms_karras": SamplerName("LMSDiscreteScheduler", _KARRAS, "Linear multistep with Karras sigmas"),
    "dpm2": SamplerName("KDPM2DiscreteScheduler", {}, "DPM-Solver-2 (k-diffusion sample_dpm_2)"),
    "dpm2_karras": SamplerName("KDPM2DiscreteScheduler", _KARRAS, "DPM2 with Karras sigmas"),
    "dpm2_a": SamplerName("KDPM2AncestralDiscreteScheduler", {}, "DPM2 ancestral (k-diffusion sample_dpm_2_ancestral)"),
    "dpm2_a_karras": SamplerName("KDPM2AncestralDiscreteScheduler", _KARRAS, "DPM2 ancestral with Karras sigmas"),
    "dpmpp_2m": SamplerName("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
                            "DPM-Solver++(2M): second-order multistep"),
    "dpmpp_2m_karras": SamplerName("DPMSolverMultistepScheduler",
                                   {"algorithm_type": "dpmsolver++", "solver_order": 2, **_KARRAS},
                                   "DPM-Solver++(2M) with Karras sigmas"),
    "dpmpp_2m_sde": SamplerName("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                                "DPM-Solver++(2M) SDE: multistep with noise"),
    "dpmpp_2m_sde_karras": SamplerName("DPMSolverMultistepScheduler",
                                       {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_KARRAS},
                                       "DPM-Solver++(2M) SDE with Karras sigmas"),
    "dpmpp_2s_a": SamplerName("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
                              "DPM-Solver++(2S) singlestep (closest match to k-diffusion 2S ancestral, without noise)"),
    "dpmpp_2s_a_karras": SamplerName("DPMSolverSinglestepScheduler",
                                     {"algorithm_type": "dpmsolver++", "solver_order": 2, **_KARRAS},
                                     "DPM-Solver++(2S) singlestep with Karras sigmas"),
    "dpmpp_3m": SamplerName("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3},
                            "DPM-Solver++(3M): third-order multistep"),
    "unipc": SamplerName("UniPCMultistepScheduler", {}, "UniPC predictor-corrector multistep"),
    "deis": SamplerName("DEISMultistepScheduler", {}, "DEIS exponential-integrator multistep"),
    "sa_solver_karras": SamplerName("SASolverScheduler", {"use_karras_sigmas": True},
                                    "SA-Solver: stochastic Adams predictor-corrector (ComfyUI sa_solver), Karras sigmas"),
    "ipndm": SamplerName("IPNDMScheduler", {}, "Improved pseudo numerical methods (fourth-order multistep)"),
    "ddim": SamplerName("DDIMScheduler", {}, "DDIM: deterministic implicit sampler (eta=0)"),
    "ddpm": SamplerName("DDPMScheduler", {}, "DDPM ancestral sampling of the trained Markov chain"),
    "pndm": SamplerName("PNDMScheduler", {}, "Pseudo numerical methods (PLMS), the original Stable Diffusion sampler"),
    "plms": SamplerName("PNDMScheduler", {"skip_prk_steps": True}, "PLMS: PNDM without Runge-Kutta warm-up"),
    "lcm": SamplerName("LCMScheduler", {}, "Latent consistency model sampler (few steps; LCM-distilled models only)"),
    "tcd": SamplerName("TCDScheduler", {}, "Trajectory consistency distillation sampler (few steps; TCD-distilled models only)"),
    "edm_euler": SamplerName("EDMEulerScheduler", {}, "Euler on the EDM (Karras 2022) preconditioned schedule"),
    "edm_dpmpp_2m": SamplerName("EDMDPMSolverMultistepScheduler", {},
                                "DPM-Solver++(2M) on the EDM preconditioned schedule"),
    "edm_dpmpp_2m_sde": SamplerName("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"},
                                    "DPM-Solver++(2M) SDE on the EDM preconditioned schedule"),
    "flow_euler": SamplerName("FlowMatchEulerDiscreteScheduler", {}, "Euler for flow-matching models (SD3, Flux)"),
    "flow_heun": SamplerName("FlowMatchHeunDiscreteScheduler", {}, "Heun for flow-matching models (two model calls per step)"),
    "flow_lcm": SamplerName("FlowMatchLCMScheduler", {}, "Consistency sampler for flow-matching models (distilled models only)"),
}


def normalize_name(name: str) -> str:
    """``"DPM++ 2M Karras"`` -> ``"dpmpp_2m_karras"``: the key a sampler name is looked up by."""
    return name.strip().lower().replace("-", "_").replace(" ", "_").replace("++", "pp")


def scheduler_from_name(name: str, config: dict):
    """Build the scheduler a sampler ``name`` stands for from an existing scheduler ``config``."""
    import diffusekit

    key = normalize_name(name)
    if key not in SAMPLER_NAMES:
        raise ValueError(f"unknown scheduler name {name!r}; valid names: {', '.join(sorted(SAMPLER_NAMES))}")
    entry = SAMPLER_NAMES[key]
    return getattr(diffusekit, entry.class_name).from_config(dict(config), **entry.overrides)
