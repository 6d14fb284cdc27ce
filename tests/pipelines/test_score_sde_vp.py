"""ScoreSdeVpPipeline: sampling a 2-D Gaussian mixture with its exact noise predictor recovers the
mixture; saving and loading keeps the pipeline."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import diffusekit
from diffusekit.configuration import register_to_config
from diffusekit.models.modeling import ModelMixin
from diffusekit.utils import BaseOutput

WEIGHTS = [0.35, 0.65]
MEANS = [[-0.6, 0.5], [0.5, -0.4]]
VARIANCES = [[0.04, 0.09], [0.0625, 0.01]]  # diagonal covariances


@dataclass
class _Output(BaseOutput):
    sample: torch.Tensor


class ExactMixtureNoise(ModelMixin):
    """The exact epsilon-predictor of a diagonal Gaussian mixture diffused by the VP SDE.

    At time t the data is x_t = m(t) x_0 + s(t) z, so each component becomes
    N(m mu_k, m^2 var_k + s^2); the prediction is -s(t) * grad log p_t(x_t). It takes the pipeline's
    timestep label t * (num_train_timesteps - 1) and samples shaped (batch, 2, 1, 1).
    """

    @register_to_config
    def __init__(self, weights=WEIGHTS, means=MEANS, variances=VARIANCES, beta_min: float = 0.1,
                 beta_max: float = 20.0, num_train_timesteps: int = 2000, in_channels: int = 2, sample_size: int = 1):
        super().__init__()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> _Output:
        c = self.config
        t = (timestep / (c.num_train_timesteps - 1)).to(torch.float64)[:, None, None]  # (B, 1, 1)
        log_mean = -0.25 * t**2 * (c.beta_max - c.beta_min) - 0.5 * t * c.beta_min
        mean_coeff, noise_var = torch.exp(log_mean), 1 - torch.exp(2 * log_mean)
        x = sample.reshape(-1, 1, 2).to(torch.float64)  # (B, 1, 2)
        mu = torch.tensor(c.means, dtype=torch.float64)[None] * mean_coeff  # (B, K, 2)
        var = torch.tensor(c.variances, dtype=torch.float64)[None] * mean_coeff**2 + noise_var
        log_density = (-0.5 * ((x - mu) ** 2 / var + torch.log(2 * math.pi * var))).sum(-1)
        log_density = log_density + torch.log(torch.tensor(c.weights, dtype=torch.float64))
        responsibility = torch.softmax(log_density, dim=-1)[..., None]  # (B, K, 1)
        score = (responsibility * (mu - x) / var).sum(1)  # (B, 2)
        eps = -noise_var[:, 0].sqrt() * score
        return _Output(sample=eps.to(sample.dtype).reshape(sample.shape))


def test_sampling_recovers_the_gaussian_mixture():
    scheduler = diffusekit.ScoreSdeVpScheduler()
    pipe = diffusekit.ScoreSdeVpPipeline(unet=ExactMixtureNoise(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=4000, num_inference_steps=250, generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    points = out.reshape(-1, 2).double().numpy()
    means, variances = np.array(MEANS), np.array(VARIANCES)
    # the components are > 6 std apart along x, so the nearest mean assigns points reliably
    label = np.argmin(((points[:, None, :] - means[None]) ** 2 / variances[None]).sum(-1), axis=1)
    for k in range(2):
        members = points[label == k]
        # tolerances: about 4 standard errors of 4000 samples (the 250-step Euler-Maruyama bias is smaller)
        assert abs(len(members) / len(points) - WEIGHTS[k]) < 0.04
        np.testing.assert_allclose(members.mean(0), means[k], atol=0.03)
        np.testing.assert_allclose(members.var(0), variances[k], rtol=0.15)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    unet = diffusekit.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    pipe = diffusekit.ScoreSdeVpPipeline(unet=unet, scheduler=diffusekit.ScoreSdeVpScheduler(num_train_timesteps=1000))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ScoreSdeVpPipeline" and index["scheduler"] == ["diffusers", "ScoreSdeVpScheduler"]
    again = diffusekit.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(again) is diffusekit.ScoreSdeVpPipeline and again.scheduler.config.num_train_timesteps == 1000
    images = []
    for p in (pipe, again):
        p.set_progress_bar_config(disable=True)
        images.append(p(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(1),
                        output_type="np").images)
    assert images[0].shape == (2, 8, 8, 3)
    np.testing.assert_allclose(images[0], images[1], atol=1e-6)
    with pytest.raises(ValueError, match="output_type"):
        again(num_inference_steps=1, output_type="jpeg")
