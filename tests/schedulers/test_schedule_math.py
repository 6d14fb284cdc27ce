"""The shared conversions of ``schedule_math``: one x0/noise conversion for every view, one sigma_to_t
for numpy and torch, one training-table set-up."""

import numpy as np
import pytest
import torch

from diffusekit.configuration import FrozenDict
from diffusekit.schedulers import schedule_math as sm
from diffusekit.schedulers.multistep_math import predict_data, predict_noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_views_agree_on_x0_and_noise(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    sigma = torch.tensor(0.7)
    alpha_t, sigma_t = sm.alpha_sigma(sigma)
    vp = alpha_t * x0 + sigma_t * noise
    exact = {"epsilon": noise, "sample": x0, "v_prediction": alpha_t * noise - sigma_t * x0}[prediction_type]
    torch.testing.assert_close(sm.x0_from_output(exact, vp, alpha_t, sigma_t, prediction_type), x0)
    torch.testing.assert_close(sm.noise_from_output(exact, vp, alpha_t, sigma_t, prediction_type), noise)
    torch.testing.assert_close(predict_data(exact, vp, sigma, prediction_type), x0)
    torch.testing.assert_close(predict_noise(exact, vp, sigma, prediction_type), noise)
    torch.testing.assert_close(sm.to_denoised(exact, vp / alpha_t, sigma, prediction_type), x0)
    alpha_prod = alpha_t**2
    torch.testing.assert_close(sm.x0_from_alpha(exact, vp, alpha_prod, prediction_type), x0)
    torch.testing.assert_close(sm.eps_from_alpha(exact, vp, alpha_prod, prediction_type), noise)


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="'flow'"):
        sm.x0_from_output(torch.ones(1), torch.ones(1), 1.0, 0.5, "flow")
    with pytest.raises(ValueError, match="cannot give a noise prediction"):
        predict_noise(torch.ones(1), torch.ones(1), torch.tensor(0.5), "flow_prediction")


def test_sigma_to_t_numpy_and_torch():
    log_sigmas = np.log(np.linspace(0.03, 14.6, 1000))
    sigmas = np.array([14.6, 3.0, 0.5, 0.03, 1e-12])
    t = sm.sigma_to_t(sigmas, log_sigmas)
    assert isinstance(t, np.ndarray) and t.dtype == np.float64 and t.shape == (5,)
    assert t[0] == 999 and t[3] == 0 and t[4] == 0 and 0 < t[2] < t[1] < 999
    assert np.ndim(sm.sigma_to_t(np.float64(3.0), log_sigmas)) == 0
    t32 = sm.sigma_to_t(torch.tensor(sigmas, dtype=torch.float32), torch.tensor(log_sigmas, dtype=torch.float32))
    assert t32.dtype == torch.float32
    np.testing.assert_allclose(t32.numpy(), t, rtol=1e-4)


def test_training_tables_floor_only_for_the_sigma_view():
    config = FrozenDict(beta_schedule="linear", num_train_timesteps=10, beta_start=1e-4, beta_end=0.02,
                        trained_betas=None, rescale_betas_zero_snr=True)
    betas, alphas, cumprod = sm.training_tables(config)
    assert cumprod[-1] == 0 and torch.equal(alphas, 1 - betas)
    assert sm.training_tables(config, finite_last_sigma=True)[2][-1] == 2**-24
