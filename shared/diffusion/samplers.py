"""Samplers as small interchangeable objects with one interface (after diffusers' schedulers).

Each sampler turns a trained network into images: `sample(diffusion, model_fn, shape, generators,
steps)`. One torch.Generator per image makes every image depend on its own seed only, so an
image is the same whether it is sampled alone or in a batch with others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from shared.diffusion.gaussian_diffusion import GaussianDiffusion, ModelFn


def spaced_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """`steps` timesteps evenly spread over [0, T-1], always including the noisiest one."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {steps}")
    return np.unique(np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(np.int64))


def per_image_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A standard normal draw of `shape` (batch first), each image from its own generator."""
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)


class GuidedModel:
    """Classifier-free guidance: eps = eps(x|y) + s (eps(x|y) - eps(x|0)), one batched forward.

    The variance output is taken from the conditional pass. With s = 0 only the conditional pass
    runs, so the result is exactly the conditional prediction.
    """

    def __init__(self, network: torch.nn.Module, condition: torch.Tensor, guidance: float) -> None:
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        self.network = network
        self.condition = condition
        self.guidance = guidance

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.guidance == 0:
            return self.network(x, t, self.condition)
        both = self.network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.condition, torch.zeros_like(self.condition)]))
        conditional, unconditional = both.chunk(2)
        eps_c, v_c = conditional.chunk(2, dim=1)
        eps_u, _ = unconditional.chunk(2, dim=1)
        return torch.cat([eps_c + self.guidance * (eps_c - eps_u), v_c], dim=1)


class Sampler(Protocol):
    name: str
    default_steps: int

    def sample(self, diffusion: GaussianDiffusion, model_fn: ModelFn, shape: tuple[int, ...],
               generators: list[torch.Generator], steps: int) -> torch.Tensor:
        """Return images in [-1, 1] of `shape`."""
        ...


def _timestep_batch(i: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch,), i, device=device, dtype=torch.long)


@dataclass(frozen=True)
class DDPMSampler:
    """Ancestral sampling with the learned variances, over the full chain or a respaced subset."""

    name: str = "ddpm"
    default_steps: int = 1000

    def sample(self, diffusion: GaussianDiffusion, model_fn: ModelFn, shape: tuple[int, ...],
               generators: list[torch.Generator], steps: int) -> torch.Tensor:
        process = diffusion if steps == diffusion.num_timesteps else diffusion.respaced(spaced_timesteps(diffusion.num_timesteps, steps))
        device = _device_of(model_fn)
        x = per_image_noise(generators, shape, device)
        for i in reversed(range(process.num_timesteps)):
            t = _timestep_batch(i, shape[0], device)
            out = process.p_mean_variance(model_fn(x, process.model_timesteps(t)), x, t)
            x = out["mean"]
            if i > 0:
                x = x + torch.exp(0.5 * out["log_variance"]) * per_image_noise(generators, shape, device)
        return x.clamp(-1, 1)


@dataclass(frozen=True)
class DDIMSampler:
    """DDIM (Song et al. 2021) on any number of steps; eta = 0 is deterministic, 1 is DDPM-like."""

    eta: float = 0.0
    name: str = "ddim"
    default_steps: int = 50

    def sample(self, diffusion: GaussianDiffusion, model_fn: ModelFn, shape: tuple[int, ...],
               generators: list[torch.Generator], steps: int) -> torch.Tensor:
        process = diffusion.respaced(spaced_timesteps(diffusion.num_timesteps, steps))
        device = _device_of(model_fn)
        x = per_image_noise(generators, shape, device)
        for i in reversed(range(process.num_timesteps)):
            t = _timestep_batch(i, shape[0], device)
            out = process.p_mean_variance(model_fn(x, process.model_timesteps(t)), x, t)
            x_start = out["pred_xstart"]
            # Re-derive epsilon from the clipped x_0 so both stay consistent.
            eps = process.predict_eps_from_start(x, t, x_start)
            alpha_bar = float(process.alphas_cumprod[i])
            alpha_bar_prev = float(process.alphas_cumprod_prev[i])
            sigma = self.eta * np.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * np.sqrt(1 - alpha_bar / alpha_bar_prev)
            x = x_start * np.sqrt(alpha_bar_prev) + np.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
            if i > 0 and sigma > 0:
                x = x + sigma * per_image_noise(generators, shape, device)
        return x.clamp(-1, 1)


def _device_of(model_fn: ModelFn) -> torch.device:
    network = getattr(model_fn, "network", model_fn)
    return next(network.parameters()).device


def make_sampler(name: str, eta: float = 0.0) -> Sampler:
    """The sampler registered under `name` ("ddpm" or "ddim")."""
    if name == "ddpm":
        return DDPMSampler()
    if name == "ddim":
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM eta must lie in [0, 1], got {eta}")
        return DDIMSampler(eta=eta)
    raise ValueError(f"unknown sampler {name!r}: expected one of {SAMPLER_NAMES}")


SAMPLER_NAMES: tuple[str, ...] = ("ddpm", "ddim")
