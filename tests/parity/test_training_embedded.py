"""Training targets and the embedded model against the reference."""

import diffusers
import pytest
import torch

from diffusekit.embedded import embedded_model_path, load_embedded_pipeline
from diffusekit.training import TrainConfig
from diffusekit.training.loop import build_noise_scheduler, training_targets


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_targets_match_the_reference(schedule, prediction_type):
    config = TrainConfig(beta_schedule=schedule, prediction_type=prediction_type)
    ours = build_noise_scheduler(config)
    reference = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule,
                                        prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 10, 500, 999])
    noisy, target = training_targets(ours, clean, noise, timesteps, prediction_type)
    expected_target = noise if prediction_type == "epsilon" else reference.get_velocity(clean, noise, timesteps)
    torch.testing.assert_close(noisy, reference.add_noise(clean, noise, timesteps), rtol=0, atol=1e-6)
    torch.testing.assert_close(target, expected_target, rtol=0, atol=1e-6)


def test_the_reference_loads_the_embedded_folder():
    reference = diffusers.DiffusionPipeline.from_pretrained(embedded_model_path())
    ours = load_embedded_pipeline()
    assert type(reference).__name__ == "DDIMPipeline"
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    t, labels = torch.tensor([900, 20]), torch.tensor([2, 10])
    with torch.no_grad():
        torch.testing.assert_close(reference.unet(x, t, class_labels=labels).sample,
                                   ours.unet(x, t, class_labels=labels).sample, rtol=1e-4, atol=1e-4)


def test_the_reference_runs_the_embedded_shapes_model_alike():
    """The shipped text-to-image model: diffusers' StableDiffusionPipeline loads the folder (its
    transformers text encoder and tokenizer included) and draws the same image for the same seed."""
    folder = embedded_model_path("shapes")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    ours = load_embedded_pipeline("shapes")
    reference.set_progress_bar_config(disable=True)
    prompt = "a yellow triangle at the bottom right and a blue circle at the top on a gray background"
    kwargs = dict(num_inference_steps=10, output_type="np")
    expected = reference(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images
    actual = ours(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images
    assert type(reference.text_encoder).__module__.startswith("transformers")
    assert abs(expected - actual).max() < 1e-4
