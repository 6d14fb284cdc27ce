"""Re-entrant pipelines: threads sharing one pipeline get exactly the images of the same calls run alone.

Four threads share one pipeline of each kind, each with its own seed, prompt and guidance scale (and,
for Stable Diffusion, one thread with its own LoRA scale); a barrier before each of the three rounds
makes the calls overlap.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from diffusekit import (
    DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffusekit.embedded import load_embedded_pipeline
from flux_components import tiny_flux_pipeline
from lora_files import lora_tensors, peft_layout
from sd_components import SCHEDULER_CONFIG

THREADS, ROUNDS = 4, 3
PROMPTS = ["the cat", "a dog", "the cat and dog", "a red sky"]


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((32, 32, 3)).astype(np.float32)


def _mask() -> np.ndarray:
    mask = np.zeros((32, 32, 1), dtype=np.float32)
    mask[8:24, 8:24] = 1.0
    return mask


def _sd_options(thread: int) -> dict:
    """Per thread: prompt, guidance scale, and on thread 1 a LoRA call scale of 0.5."""
    options = dict(prompt=PROMPTS[thread], guidance_scale=1.5 + thread, num_inference_steps=3, output_type="pt")
    if thread == 1:
        options["cross_attention_kwargs"] = {"scale": 0.5}
    return options


@pytest.fixture(scope="module")
def sd_pipe(parts, tmp_path_factory):
    """The tiny SD pipeline with a LoRA on the UNet and the text encoder."""
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline(**{**parts, "scheduler": DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG)},
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    save_file(peft_layout(lora_tensors(pipe, seed=3)), str(path))
    pipe.load_lora_weights(str(path), adapter_name="style")
    return pipe


def _sd_kind(pipe, cls, scheduler_cls, inputs):
    other = cls(**{**pipe.components, "scheduler": scheduler_cls.from_config(SCHEDULER_CONFIG)},
                requires_safety_checker=False)
    other.set_progress_bar_config(disable=True)
    return other, lambda thread: {**_sd_options(thread), **inputs(thread)}


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("clip_tokenizer"))


def _case(kind: str, request):
    """``(pipeline, options(thread) -> call kwargs)`` for one kind of pipeline."""
    if kind == "flux":
        return request.getfixturevalue("flux_pipe"), lambda thread: dict(
            prompt=PROMPTS[thread], guidance_scale=2.0 + thread, num_inference_steps=2, height=32, width=32,
            max_sequence_length=16, output_type="pt")
    if kind == "digits":
        return load_embedded_pipeline(), lambda thread: dict(
            class_labels=[thread, 9 - thread], guidance_scale=1.5 + thread, num_inference_steps=3, output_type="pt")
    sd = request.getfixturevalue("sd_pipe")
    if kind == "txt2img":
        return sd, _sd_options
    if kind == "img2img":
        return _sd_kind(sd, StableDiffusionImg2ImgPipeline, EulerDiscreteScheduler,
                        lambda thread: dict(image=_image(thread), strength=0.7, num_inference_steps=4))
    return _sd_kind(sd, StableDiffusionInpaintPipeline, EulerDiscreteScheduler,
                    lambda thread: dict(image=_image(thread), mask_image=_mask(), strength=0.8))


def _call(pipe, options, thread: int, round_: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * thread + round_)
    return pipe(generator=generator, **options(thread)).images


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint", "flux", "digits"])
def test_threads_sharing_a_pipeline_get_the_images_of_solo_calls(kind, request):
    pipe, options = _case(kind, request)
    alone = {(thread, round_): _call(pipe, options, thread, round_)
             for round_ in range(ROUNDS) for thread in range(THREADS)}
    together, errors = {}, []
    barrier = threading.Barrier(THREADS)

    def work(thread: int) -> None:
        try:
            for round_ in range(ROUNDS):
                barrier.wait()
                together[thread, round_] = _call(pipe, options, thread, round_)
        except BaseException as error:  # reported below, with the thread that raised it
            errors.append((thread, repr(error)))
            barrier.abort()

    workers = [threading.Thread(target=work, args=(thread,)) for thread in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    wrong = [key for key in alone if not torch.equal(alone[key], together[key])]
    assert wrong == []
    assert not torch.equal(alone[0, 0], alone[1, 0])  # the calls really differ


def test_callbacks_see_and_change_only_their_own_call(sd_pipe):
    """Two overlapping calls: each callback reads its call's properties; ``_interrupt`` stops only its call."""
    seen: dict[int, list] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def callback(thread: int):
        def on_step(pipe, step, t, tensors):
            barrier.wait(timeout=5)  # both calls are at the same step (a second step of call 0 would break it)
            seen[thread].append((pipe.guidance_scale, pipe.num_timesteps, pipe.do_classifier_free_guidance,
                                 pipe.cross_attention_kwargs))
            if thread == 0:
                pipe._interrupt = True
            return {}
        return on_step

    errors = []

    def work(thread: int) -> None:
        steps = 3 if thread == 0 else 1
        try:
            _call(sd_pipe, lambda _: {**_sd_options(thread), "callback_on_step_end": callback(thread),
                                      "num_inference_steps": steps}, thread, 0)
        except BaseException as error:
            errors.append(repr(error))

    workers = [threading.Thread(target=work, args=(thread,)) for thread in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert seen == {0: [(1.5, 3, True, None)], 1: [(2.5, 1, True, {"scale": 0.5})]}
    with pytest.raises(AttributeError, match="read-only"):
        sd_pipe.guidance_scale = 3.0


def test_after_a_call_its_thread_reads_what_the_call_ended_with(sd_pipe):
    def raise_guidance(pipe, step, t, tensors):
        pipe._guidance_scale += 1.0
        return {}

    _call(sd_pipe, lambda _: {**_sd_options(0), "callback_on_step_end": raise_guidance, "num_inference_steps": 2}, 0, 0)
    assert (sd_pipe.guidance_scale, sd_pipe.num_timesteps) == (3.5, 2)
    other: list = []
    thread = threading.Thread(target=lambda: other.append(_finished_guidance(sd_pipe)))
    thread.start()
    thread.join()
    assert other == ["no call running"]  # another thread never sees this thread's calls
    with pytest.raises(AttributeError, match="no call running"):
        sd_pipe._interrupt = True  # writing needs a running call


def _finished_guidance(pipe):
    try:
        return pipe.guidance_scale
    except AttributeError as error:
        return "no call running" if "no call running" in str(error) else repr(error)


def test_a_callback_may_change_the_guidance_scale_of_its_call(sd_pipe):
    """The reference's CFG cut-off idiom: ``pipe._guidance_scale = 0`` plus the conditional half of the embeddings."""
    def cut_off(pipe, step, t, tensors):
        if step == 0:
            pipe._guidance_scale = 0.0
            return {"prompt_embeds": tensors["prompt_embeds"].chunk(2)[1]}
        assert not pipe.do_classifier_free_guidance
        return {}

    options = {**_sd_options(0), "callback_on_step_end": cut_off,
               "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
    images = _call(sd_pipe, lambda _: options, 0, 0)
    assert images.shape == (1, 3, 32, 32) and not torch.equal(images, _call(sd_pipe, _sd_options, 0, 0))
