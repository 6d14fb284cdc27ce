"""VQ-Diffusion (Gu et al., 2022): discrete diffusion over codebook indices with a mask class. Each
class keeps its value (alpha), turns into any other (beta) or into the mask (gamma); a step samples
x_{t-1} from the posterior q(x_{t-1} | x_t, x0) under the model's log p(x0 | x_t)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..configuration import register_to_config
from ..utils import BaseOutput
from .scheduling_utils import SchedulerMixin


@dataclass
class VQDiffusionSchedulerOutput(BaseOutput):
    """``prev_sample``: the codebook indices at the previous timestep."""

    prev_sample: torch.LongTensor


def index_to_log_onehot(x: torch.LongTensor, num_classes: int) -> torch.Tensor:
    """log of the one-hot encoding of ``x`` (batch, pixels) as (batch, classes, pixels), zeros as log 1e-30."""
    onehot = F.one_hot(x, num_classes).permute(0, 2, 1)
    return torch.log(onehot.float().clamp(min=1e-30))


def gumbel_noised(logits: torch.Tensor, generator=None) -> torch.Tensor:
    """Logits plus Gumbel noise: their argmax is a sample of the categorical distribution."""
    uniform = torch.rand(logits.shape, device=logits.device, generator=generator)
    return -torch.log(-torch.log(uniform + 1e-30) + 1e-30) + logits


def alpha_schedules(num_steps: int, alpha_cum_start: float = 0.99999, alpha_cum_end: float = 0.000009):
    """(a_t, cumulative a_t) of the keep-the-class probability, linear in the cumulative one."""
    att = np.arange(0, num_steps) / (num_steps - 1) * (alpha_cum_end - alpha_cum_start) + alpha_cum_start
    att = np.concatenate(([1], att))
    return att[1:] / att[:-1], np.concatenate((att[1:], [1]))


def gamma_schedules(num_steps: int, gamma_cum_start: float = 0.000009, gamma_cum_end: float = 0.99999):
    """(c_t, cumulative c_t) of the become-the-mask probability, linear in the cumulative one."""
    ctt = np.arange(0, num_steps) / (num_steps - 1) * (gamma_cum_end - gamma_cum_start) + gamma_cum_start
    ctt = np.concatenate(([0], ctt))
    one_minus = 1 - ctt
    return 1 - one_minus[1:] / one_minus[:-1], np.concatenate((ctt[1:], [0]))


def _log_table(values: np.ndarray) -> torch.Tensor:
    return torch.log(torch.tensor(values.astype("float64"))).float()


class VQDiffusionScheduler(SchedulerMixin):
    """Discrete (mask-and-replace) diffusion over ``num_vec_classes`` classes, the last one the mask."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_vec_classes: int,
        num_train_timesteps: int = 100,
        alpha_cum_start: float = 0.99999,
        alpha_cum_end: float = 0.000009,
        gamma_cum_start: float = 0.000009,
        gamma_cum_end: float = 0.99999,
    ):
        self.num_embed = num_vec_classes
        self.mask_class = num_vec_classes - 1
        at, att = alpha_schedules(num_train_timesteps, alpha_cum_start, alpha_cum_end)
        ct, ctt = gamma_schedules(num_train_timesteps, gamma_cum_start, gamma_cum_end)
        others = num_vec_classes - 1
        self.log_at, self.log_bt, self.log_ct = (_log_table(v) for v in (at, (1 - at - ct) / others, ct))
        self.log_cumprod_at, self.log_cumprod_bt, self.log_cumprod_ct = (
            _log_table(v) for v in (att, (1 - att - ctt) / others, ctt))
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Timesteps ``num_inference_steps - 1`` down to 0 (each step one training step)."""
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.arange(num_inference_steps - 1, -1, -1).to(device)
        for name in ("log_at", "log_bt", "log_ct", "log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct"):
            setattr(self, name, getattr(self, name).to(device))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.LongTensor, generator=None,
             return_dict: bool = True) -> VQDiffusionSchedulerOutput | tuple:
        """Sample x_{t-1} from the posterior (at t = 0, from the model's log p(x0) itself)."""
        log_p = model_output if timestep == 0 else self.q_posterior(model_output, sample, timestep)
        prev_sample = gumbel_noised(log_p, generator).argmax(dim=1)
        if not return_dict:
            return (prev_sample,)
        return VQDiffusionSchedulerOutput(prev_sample=prev_sample)

    def q_posterior(self, log_p_x_0: torch.Tensor, x_t: torch.LongTensor, t) -> torch.Tensor:
        """log p(x_{t-1} | x_t): the model's x0 distribution pushed through the transitions (unnormalised)."""
        log_onehot_x_t = index_to_log_onehot(x_t, self.num_embed)
        cumulative = self.log_Q_t_transitioning_to_known_class(t=t, x_t=x_t, log_onehot_x_t=log_onehot_x_t,
                                                               cumulative=True)
        one_step = self.log_Q_t_transitioning_to_known_class(t=t, x_t=x_t, log_onehot_x_t=log_onehot_x_t,
                                                             cumulative=False)
        q = log_p_x_0 - cumulative
        log_norm = torch.logsumexp(q, dim=1, keepdim=True)
        return self.apply_cumulative_transitions(q - log_norm, t - 1) + one_step + log_norm

    def log_Q_t_transitioning_to_known_class(self, *, t, x_t: torch.LongTensor, log_onehot_x_t: torch.Tensor,
                                             cumulative: bool) -> torch.Tensor:
        """log q(x_t | x_{t-1} = k) (or | x_0 = k when ``cumulative``) for every non-mask class k;
        one step also gets the row of the mask class."""
        tables = (self.log_cumprod_at, self.log_cumprod_bt, self.log_cumprod_ct) if cumulative \
            else (self.log_at, self.log_bt, self.log_ct)
        a, b, c = (table[t] for table in tables)
        log_q = (log_onehot_x_t[:, :-1, :] + a).logaddexp(b)
        masked = (x_t == self.mask_class).unsqueeze(1).expand(-1, self.num_embed - 1, -1)
        log_q = torch.where(masked, c.to(log_q.dtype), log_q)
        if cumulative:
            return log_q
        return torch.cat((log_q, log_onehot_x_t[:, -1:, :]), dim=1)

    def apply_cumulative_transitions(self, q: torch.Tensor, t) -> torch.Tensor:
        """Push a log distribution over the non-mask classes through t + 1 steps of the transitions."""
        a, b, c = self.log_cumprod_at[t], self.log_cumprod_bt[t], self.log_cumprod_ct[t]
        return torch.cat(((q + a).logaddexp(b), c.expand(q.shape[0], 1, q.shape[2])), dim=1)
