"""Gaussian diffusion maths: schedules, q(x_t|x_0), the posterior, p(x_{t-1}|x_t) and the losses.

After Improved DDPM (Nichol & Dhariwal 2021): the network predicts the mean's parameter and a
value v in [-1, 1] that interpolates the log-variance between beta_t and the posterior variance.
The mean's parameter is epsilon, or the velocity sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans &
Ho 2022), which stays well conditioned at high noise: with epsilon, x_0 = (x_t - sqrt(1 - abar)
eps) / sqrt(abar) multiplies the network's error by up to 1 / sqrt(abar_T) ~ 160 on the linear
schedule, and an imperfect network's first sampling steps then fix wrong global colours. Training
uses the hybrid loss L_simple + lambda * L_vlb, with the variational term computed on a frozen
mean so that it only trains the variances. Everything here is a pure function of tensors; the
network is passed in and never sees the schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x_t, t) -> (B, 2C, H, W) network output: the mean's parameter, then the variance interpolation v."""

PREDICTIONS = ("epsilon", "velocity")


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear schedule, rescaled so any T spans the same noise range as T = 1000.

    Betas are capped below 1: a beta of 1 would leave no signal and make x_0 unrecoverable.
    """
    scale = 1000 / num_timesteps
    return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64), 0.999)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: alpha_bar(t) = cos^2(((t/T) + s) / (1 + s) * pi / 2)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta) for i in range(num_timesteps)],
        dtype=np.float64,
    )


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {schedule!r}: expected 'linear' or 'cosine'")


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "linear"
    num_timesteps: int = 1000
    vlb_weight: float = 0.001  # lambda of the hybrid loss
    # what the network's first C outputs are: "velocity" (the shipped models', the training default) or "epsilon"
    prediction: str = "velocity"


def to_device(values: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host values as a tensor on `device`, without waiting for it: onto a GPU through pinned
    memory and asynchronously, since a copy from pageable memory first waits for every kernel
    queued (a host sync at each sampling step). On the CPU the array itself, shared."""
    tensor = torch.from_numpy(values) if isinstance(values, np.ndarray) else values
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _extract(values: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather per-timestep constants for a batch and broadcast them over the image dims."""
    out = to_device(values, t.device)[t].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of 8-bit images in [-1, 1] under a Gaussian discretised into 256 bins."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusion:
    """A diffusion process over `betas`; respaced processes are GaussianDiffusion objects too."""

    def __init__(self, betas: np.ndarray, timestep_map: np.ndarray | None = None, vlb_weight: float = 0.001,
                 prediction: str = DiffusionConfig.prediction) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        self.betas = betas
        self.num_timesteps = len(betas)
        # The network was trained on the full chain; a respaced chain feeds it the original indices.
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        self.vlb_weight = vlb_weight
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: clip the log to the next value, as Improved DDPM
        # does (a one-step chain has no next value and falls back to beta_0).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "GaussianDiffusion":
        return cls(make_betas(config.schedule, config.num_timesteps), vlb_weight=config.vlb_weight,
                   prediction=config.prediction)

    def respaced(self, use_timesteps: list[int] | np.ndarray) -> "GaussianDiffusion":
        """The process restricted to `use_timesteps` (ascending), with betas that keep alpha_bar."""
        use = np.unique(np.asarray(use_timesteps, dtype=np.int64))
        if len(use) == 0 or use[0] < 0 or use[-1] >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in [0, {self.num_timesteps})")
        alpha_bar = self.alphas_cumprod[use]
        betas = 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])
        return GaussianDiffusion(betas, timestep_map=self.timestep_map[use], vlb_weight=self.vlb_weight,
                                 prediction=self.prediction)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as the network knows them (the original chain's indices)."""
        return to_device(self.timestep_map, t.device)[t]

    # --- forward process -------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t.ndim) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        return (mean, _extract(self.posterior_variance, t, x_t.ndim),
                _extract(self.posterior_log_variance_clipped, t, x_t.ndim))

    def predict_start_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_eps_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x_start)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    def velocity(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the velocity target."""
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * noise
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * x_start)

    def start_and_eps(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) implied by the network's mean output under this process's parametrisation."""
        if self.prediction == "epsilon":
            return self.predict_start_from_eps(x_t, t, prediction), prediction
        a = _extract(self.sqrt_alphas_cumprod, t, x_t.ndim)
        s = _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        return a * x_t - s * prediction, s * x_t + a * prediction

    # --- reverse process -------------------------------------------------------------------------
    def learned_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Interpolate log-variance between the posterior's (v = -1) and beta_t (v = 1)."""
        min_log = _extract(self.posterior_log_variance_clipped, t, v.ndim)
        max_log = _extract(np.log(self.betas), t, v.ndim)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip: bool = True) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a network output (mean parameter, v) already computed for (x_t, t)."""
        prediction, v = output.chunk(2, dim=1)
        log_variance = self.learned_log_variance(v, t)
        x_start, eps = self.start_and_eps(prediction, x_t, t)
        if clip:
            x_start = x_start.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x_start, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": x_start, "eps": eps}

    # --- training --------------------------------------------------------------------------------
    def vlb_terms(self, output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_t of the variational bound in bits per dimension (decoder NLL at t = 0)."""
        true_mean, _, true_log_variance = self.q_posterior(x_start, x_t, t)
        pred = self.p_mean_variance(output, x_t, t, clip=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, pred["mean"], pred["log_variance"])) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, pred["mean"], 0.5 * pred["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Hybrid loss per example: MSE on the mean parameter + lambda * T * L_t (the VLB estimate).

        L_vlb = sum_t L_t is estimated by T * L_t for a uniform t, so the variational term gets
        weight lambda * T (= 1 for lambda = 0.001, T = 1000). It sees a detached mean, so it
        trains the variance output alone and cannot disturb the mean.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        output = model_fn(x_t, self.model_timesteps(t))
        prediction, v = output.chunk(2, dim=1)
        target = noise if self.prediction == "epsilon" else self.velocity(x_start, t, noise)
        mse = _mean_flat((target - prediction) ** 2)
        frozen = torch.cat([prediction.detach(), v], dim=1)
        vb = self.vlb_terms(frozen, x_start, x_t, t) * (self.vlb_weight * self.num_timesteps)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
