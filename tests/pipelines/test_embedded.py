"""The embedded digits model and ClassConditionalPipeline: loading, classes, saving, the reference."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffusekit
from diffusekit.embedded import embedded_model_path, generate_demo_grid, load_embedded_pipeline
from diffusekit.pipelines.class_conditional import ClassConditionalPipeline
from diffusekit.schedulers.names import SAMPLER_NAMES, scheduler_from_name

_CLEANLINESS = Path(__file__).resolve().parents[2] / "benchmarks" / "digits_cleanliness.py"


def _load_cleanliness():
    spec = importlib.util.spec_from_file_location("digits_cleanliness", _CLEANLINESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cleanliness = _load_cleanliness()


@pytest.fixture(scope="module")
def pipeline():
    return load_embedded_pipeline()


@pytest.fixture(scope="module")
def digit_classifier():
    """Logistic regression on scikit-learn's 8x8 digits (values scaled to [0, 1])."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.linear_model import LogisticRegression

    digits = sklearn_datasets.load_digits()
    return LogisticRegression(max_iter=2000).fit(digits.images.reshape(-1, 64) / 16.0, digits.target)


@pytest.fixture(scope="module")
def speckle_ceiling():
    """The highest high-frequency energy of the real (resized) digits; load_digits ships inside sklearn."""
    pytest.importorskip("sklearn.datasets")
    return cleanliness.real_digit_ceiling(16)


def classify(classifier, images: np.ndarray) -> np.ndarray:
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(images).permute(0, 3, 1, 2).float(), 8)
    return classifier.predict(pooled.reshape(len(images), 64).numpy())


def test_embedded_model_loads_from_the_installed_package(pipeline):
    path = embedded_model_path()
    assert path.parent.parent == Path(diffusekit.__file__).parent  # diffusekit/assets/digits
    assert isinstance(pipeline, ClassConditionalPipeline)
    assert pipeline.num_classes == 10 and pipeline.null_class == 10
    weights = sum(p.stat().st_size for p in path.rglob("*.safetensors"))
    assert weights <= 10 * 1024 * 1024


def test_embedded_model_draws_the_requested_digits(pipeline, digit_classifier):
    labels = list(range(10)) * 2
    generator = torch.Generator().manual_seed(0)
    images = pipeline(class_labels=labels, num_inference_steps=20, guidance_scale=3.0, generator=generator,
                      output_type="np").images
    assert images.shape == (20, 16, 16, 1) and images.min() >= 0 and images.max() <= 1
    accuracy = (classify(digit_classifier, images) == np.array(labels)).mean()
    assert accuracy >= 0.7, accuracy


def test_same_seed_same_digits_and_labels_are_checked(pipeline):
    first = pipeline(class_labels=[3], num_inference_steps=5, generator=torch.Generator().manual_seed(1),
                     output_type="pt").images
    again = pipeline(class_labels=3, num_inference_steps=5, generator=torch.Generator().manual_seed(1),
                     output_type="pt").images
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    with pytest.raises(ValueError, match="0..9"):
        pipeline(class_labels=[10], num_inference_steps=2)
    with pytest.raises(ValueError, match="empty"):
        pipeline(class_labels=[], num_inference_steps=2)


def test_guidance_scale_one_is_the_plain_conditional_loop(pipeline):
    generator = torch.Generator().manual_seed(2)
    guided = pipeline(class_labels=[7], guidance_scale=1.0, num_inference_steps=4, generator=generator,
                      output_type="pt").images
    sample = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(2))
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(4)
    with torch.no_grad():
        for t in scheduler.timesteps:
            sample = scheduler.step(pipeline.unet(sample, t, class_labels=torch.tensor([7])).sample, t, sample).prev_sample
    torch.testing.assert_close(guided, (sample / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_save_and_reload_gives_the_same_pipeline_and_digits(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path)
    index = (tmp_path / "model_index.json").read_text()
    assert '"_class_name": "DDIMPipeline"' in index and '"_diffusekit_class_name": "ClassConditionalPipeline"' in index
    reloaded = diffusekit.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(reloaded) is ClassConditionalPipeline
    options = dict(class_labels=[0, 4, 9], num_inference_steps=5, output_type="pt")
    torch.testing.assert_close(reloaded(generator=torch.Generator().manual_seed(3), **options).images,
                               pipeline(generator=torch.Generator().manual_seed(3), **options).images,
                               rtol=0, atol=0)


def test_a_unet_without_classes_is_refused(pipeline):
    unconditional = diffusekit.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                           down_block_types=("DownBlock2D", "DownBlock2D"),
                                           up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    with pytest.raises(ValueError, match="num_class_embeds"):
        ClassConditionalPipeline(unet=unconditional, scheduler=pipeline.scheduler)


def test_demo_grid_has_every_digit(tmp_path):
    path = generate_demo_grid(tmp_path, per_class=2, num_inference_steps=4)
    from PIL import Image

    assert "grid" in path.name and path.is_file()
    assert Image.open(path).size == (2 * 16 * 4 + 2, 10 * 16 * 4 + 9 * 2)  # 4x enlarged, 2-pixel gaps


@pytest.mark.parametrize("name", sorted(SAMPLER_NAMES))
def test_every_sampler_name_draws_clean_digits(pipeline, speckle_ceiling, name):
    original = pipeline.scheduler
    pipeline.scheduler = scheduler_from_name(name, original.config)
    try:
        images = pipeline(class_labels=[0, 3, 5, 8], guidance_scale=3.0,
                          num_inference_steps=cleanliness.sampler_steps(name),
                          generator=torch.Generator().manual_seed(1), output_type="np").images
    finally:
        pipeline.scheduler = original
    energy = cleanliness.high_frequency_energy(images)
    assert images.shape == (4, 16, 16, 1) and np.isfinite(images).all()
    assert not cleanliness.speckled(images, speckle_ceiling).any(), (energy, speckle_ceiling)
    assert 0.05 < images.mean() < 0.6  # a digit on a dark ground, not pure noise (mean 0.5) or blank


def test_the_speckle_measure_flags_noise_and_passes_real_digits(speckle_ceiling):
    real = (load_digits_16() + 1) / 2
    noisy = (real[:8] + torch.randn(real[:8].shape, generator=torch.Generator().manual_seed(0)) * 0.3).clamp(0, 1)
    assert not cleanliness.speckled(real, speckle_ceiling).any()
    assert cleanliness.speckled(noisy, speckle_ceiling).all()
    with pytest.raises(ValueError, match="grey"):
        cleanliness.high_frequency_energy(np.zeros((2, 16, 16, 3)))


def load_digits_16() -> torch.Tensor:
    from diffusekit.training.data import load_sklearn_digits

    return load_sklearn_digits(16).images


def test_schedulers_on_other_parametrisations_need_the_training_schedule(pipeline):
    other = ClassConditionalPipeline(unet=pipeline.unet, scheduler=diffusekit.EDMEulerScheduler())
    with pytest.raises(ValueError, match="training noise schedule"):
        other(class_labels=[1], num_inference_steps=2)
