"""Samplers as small interchangeable objects with one interface (after diffusers' schedulers).

Each sampler turns a trained network into images, one step at a time: `start` puts images at the
noisiest end of its chain, `step` moves every row of a `Chain` one step on from the network's
output. The rows of a chain may stand at different steps, so requests that arrive at different
times can share every forward (continuous batching, shared/semantic/diffusion/stepper.py);
`sample(diffusion, model_fn, shape, generators, steps, step_callback)` runs a whole chain with the
same step. One torch.Generator per image makes every image depend on its own seed only, so an
image is the same whether it is sampled alone or with others. The optional step callback hears of
every step before it runs; an exception it raises stops the sampling there (a server uses that to
drop work nobody waits for any more).

Each sampler class declares its name in its class statement, which registers it in SAMPLERS with
the default steps gesco/options.py gives that name (the torch-free list the sender and the command
line offer); `resolve` turns a request's SamplingOptions into the sampler and steps that run, so
every caller gets the same defaults (DEFAULT_SAMPLER, DDIM over 10 steps).
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from gesco.options import DEFAULT_SAMPLER, DISTILLATION_TEACHER, SAMPLER_DEFAULT_STEPS, SAMPLER_STEP_LIMITS
from shared.limits import MIN_STEPS, LimitError, SamplingOptions
from shared.semantic.diffusion.gaussian_diffusion import GaussianDiffusion, ModelFn, to_device


def spaced_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """`steps` timesteps evenly spread over [0, T-1], always including the noisiest one."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {steps}")
    return np.unique(np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(np.int64))


def per_image_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A standard normal draw of `shape` (batch first), each image from its own generator, drawn
    where its generator lives (a CUDA generator draws on the GPU) and stacked on `device`."""
    return to_device(torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generators]), device)


def guided_forward(network: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                   t: torch.Tensor, condition: torch.Tensor, guidance: np.ndarray) -> torch.Tensor:
    """Classifier-free guidance with a scale per row, in one network call.

    eps = eps(x|y) + s (eps(x|y) - eps(x|0)) for the rows with s > 0: the call holds every row
    conditioned, then the guided rows again with an all-zero condition. A row with s = 0 gets its
    conditional output exactly. The same extrapolation applies to a velocity output (linear in eps
    for a fixed x_t); the variance output is taken from the conditional pass.
    """
    guided = np.flatnonzero(guidance > 0)
    if len(guided) == 0:
        return network(x, t, condition)
    if len(guided) == len(x):
        free_x, free_t = x, t
    else:
        rows = to_device(guided, x.device)
        free_x, free_t = x[rows], t[rows]
    both = network(torch.cat([x, free_x]), torch.cat([t, free_t]),
                   torch.cat([condition, condition.new_zeros((len(guided), *condition.shape[1:]))]))
    conditional, unconditional = both[: len(x)], both[len(x):]
    mean_c, v_c = conditional.chunk(2, dim=1)
    mean_u, _ = unconditional.chunk(2, dim=1)
    if len(guided) < len(x):  # unguided rows: s = 0 times a zero difference leaves mean_c as it is
        mean_u = mean_c.clone().index_copy_(0, rows, mean_u)
    scale = to_device(guidance.astype(np.float64), x.device).float().view(-1, *([1] * (x.ndim - 1)))
    return torch.cat([mean_c + scale * (mean_c - mean_u), v_c], dim=1)


class GuidedModel:
    """Classifier-free guidance at one scale for every image (`guided_forward`); with s = 0 only
    the conditional pass runs, so the result is exactly the conditional prediction."""

    def __init__(self, network: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 condition: torch.Tensor, guidance: float) -> None:
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        self.network = network
        self.condition = condition
        self.guidance = guidance
        self.device = condition.device

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_forward(self.network, x, t, self.condition, np.full(len(x), self.guidance))


# Called as step_callback(step, total) before each of the `total` steps (step counts from 0).
StepCallback = Callable[[int, int], None]

# Every Sampler subclass, by the name its class statement declares.
SAMPLERS: dict[str, type[Sampler]] = {}


@dataclass
class Chain:
    """Images on one sampler's chain, each row at its own place: what a sampler's step reads and
    writes.

    All rows share the (respaced) `process`, but `positions[r]` is row r's own index in it,
    counting down to 0 (noisiest first), and -1 once its last step has run: `x[r]` then holds its
    image in [-1, 1]. Rows may join (`join`) and leave (`take`) between steps, which is how
    continuous batching keeps requests that started at different times in one forward. Positions
    live on the host, so deciding which rows draw noise or finish never waits for the device.
    `memory` holds a sampler's per-row history (DPM-Solver++: the previous x_0 and step).
    """

    process: GaussianDiffusion
    x: torch.Tensor
    positions: np.ndarray
    generators: list[torch.Generator]
    memory: dict[str, torch.Tensor | np.ndarray] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Steps of the whole chain."""
        return self.process.num_timesteps

    @property
    def steps_done(self) -> np.ndarray:
        """Steps each row has run."""
        return self.total - 1 - self.positions

    @property
    def finished(self) -> np.ndarray:
        return self.positions < 0

    def model_timesteps(self) -> torch.Tensor:
        """The rows' timesteps as the network knows them (the full chain's indices)."""
        return to_device(self.process.timestep_map[self.positions], self.x.device)

    def rows(self, values: np.ndarray) -> torch.Tensor:
        """A float per row (computed in float64 on the host) as a (B, 1, ..., 1) tensor beside x."""
        column = to_device(np.asarray(values, dtype=np.float64), self.x.device).float()
        return column.view(-1, *([1] * (self.x.ndim - 1)))

    def where(self, marked: np.ndarray, chosen: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """`chosen`'s rows where `marked` is set, `other`'s elsewhere (both shaped like x)."""
        return torch.where(to_device(marked, self.x.device).view(-1, *([1] * (self.x.ndim - 1))), chosen, other)

    def noise(self, wanted: np.ndarray) -> torch.Tensor:
        """Standard normal draws for the rows `wanted` marks, each from its own generator; zeros
        elsewhere, and the other rows' generators untouched."""
        if wanted.all():
            return per_image_noise(self.generators, tuple(self.x.shape), self.x.device)
        noise = torch.zeros_like(self.x)
        picked = np.flatnonzero(wanted)
        if len(picked):
            draws = per_image_noise([self.generators[r] for r in picked], tuple(self.x.shape), self.x.device)
            noise.index_copy_(0, to_device(picked, self.x.device), draws)
        return noise

    def take(self, rows: Sequence[int]) -> Chain:
        """A chain of the given rows only (in that order)."""
        index = np.asarray(rows, dtype=np.int64)
        on_device = to_device(index, self.x.device)
        return Chain(self.process, self.x[on_device], self.positions[index], [self.generators[r] for r in index],
                     {name: value[on_device] if isinstance(value, torch.Tensor) else value[index]
                      for name, value in self.memory.items()})

    @staticmethod
    def join(chains: Sequence[Chain]) -> Chain:
        """The rows of chains on the same process, in order, as one chain."""
        first = chains[0]
        if len(chains) == 1:
            return first
        if any(chain.process is not first.process for chain in chains):
            raise ValueError("only chains on the same process can join")
        return Chain(first.process, torch.cat([chain.x for chain in chains]),
                     np.concatenate([chain.positions for chain in chains]),
                     [g for chain in chains for g in chain.generators],
                     {name: torch.cat([chain.memory[name] for chain in chains]) if isinstance(value, torch.Tensor)
                      else np.concatenate([chain.memory[name] for chain in chains])
                      for name, value in first.memory.items()})


class Sampler(abc.ABC):
    """A way of sampling images, registered under the name its subclass declares, with the default
    number of steps gesco.options.SAMPLER_DEFAULT_STEPS gives it: `class DDIMSampler(Sampler, name="ddim")`.

    A sampler is a step function: `process` is the chain it walks for a number of steps, `start`
    puts images at its noisiest end, `step` moves every row of a `Chain` one step on from the
    network's output at the rows' own timesteps. `sample` runs a whole chain with that step.
    """

    name: ClassVar[str]
    default_steps: ClassVar[int]
    step_limit: ClassVar[int | None]  # the most steps it runs (gesco.options.SAMPLER_STEP_LIMITS), None: the chain's

    def __init_subclass__(cls, *, name: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name in SAMPLERS:
            raise ValueError(f"a sampler named {name!r} is registered already: {SAMPLERS[name].__name__}")
        if name not in SAMPLER_DEFAULT_STEPS:
            raise ValueError(f"the sampler {name!r} has no default steps in gesco.options.SAMPLER_DEFAULT_STEPS")
        cls.name, cls.default_steps = name, SAMPLER_DEFAULT_STEPS[name]
        cls.step_limit = SAMPLER_STEP_LIMITS.get(name)
        SAMPLERS[name] = cls

    def process(self, diffusion: GaussianDiffusion, steps: int) -> GaussianDiffusion:
        """The chain this sampler walks in `steps` steps: `steps` timesteps spread evenly in time."""
        return diffusion.respaced(spaced_timesteps(diffusion.num_timesteps, steps))

    def start(self, process: GaussianDiffusion, shape: tuple[int, ...], generators: list[torch.Generator],
              device: torch.device) -> Chain:
        """Images of `shape` at the chain's noisiest end: per-image noise on `device`."""
        return Chain(process, per_image_noise(generators, shape, device),
                     np.full(shape[0], process.num_timesteps - 1, dtype=np.int64), generators,
                     self.initial_memory(shape, device))

    def initial_memory(self, shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor | np.ndarray]:
        """The per-row history a chain starts with (none for a one-step method)."""
        return {}

    def step(self, chain: Chain, output: torch.Tensor) -> None:
        """Move every row of `chain` one step on, given the network's output at (chain.x, the rows'
        timesteps); a row whose last step this was then holds its image, clamped to [-1, 1]."""
        if chain.finished.any():
            raise ValueError("a chain's finished rows must leave it before the next step")
        x = self.next_x(chain, output, to_device(chain.positions, chain.x.device))
        last = chain.positions == 0
        if last.all():
            x = x.clamp(-1, 1)
        elif last.any():
            x = chain.where(last, x.clamp(-1, 1), x)
        chain.x = x
        chain.positions = chain.positions - 1

    @abc.abstractmethod
    def next_x(self, chain: Chain, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Every row's x one step on (its result, unclamped, for a row at position 0); `t` holds
        the rows' positions on the device. Updates `chain.memory` in place."""

    def sample(self, diffusion: GaussianDiffusion, model_fn: ModelFn, shape: tuple[int, ...],
               generators: list[torch.Generator], steps: int,
               step_callback: StepCallback | None = None) -> torch.Tensor:
        """Images in [-1, 1] of `shape`: the whole chain, one `step` after the other.

        `step_callback(step, total)` hears of each step before it runs; what it raises stops there."""
        chain = self.start(self.process(diffusion, steps), shape, generators, _device_of(model_fn))
        for step in range(chain.total):
            if step_callback is not None:
                step_callback(step, chain.total)
            self.step(chain, model_fn(chain.x, chain.model_timesteps()))
        return chain.x


@dataclass(frozen=True)
class DDPMSampler(Sampler, name="ddpm"):  # a respaced chain; 1000 runs the full one
    """Ancestral sampling with the learned variances, over the full chain or a respaced subset."""

    def process(self, diffusion: GaussianDiffusion, steps: int) -> GaussianDiffusion:
        return diffusion if steps == diffusion.num_timesteps else super().process(diffusion, steps)

    def next_x(self, chain: Chain, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = chain.process.p_mean_variance(output, chain.x, t)
        noisy = chain.positions > 0
        if not noisy.any():
            return out["mean"]
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * chain.noise(noisy)


@dataclass(frozen=True)
class DDIMSampler(Sampler, name="ddim"):
    """DDIM (Song et al. 2021) on any number of steps; eta = 0 is deterministic, 1 is DDPM-like."""

    eta: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"DDIM eta must lie in [0, 1], got {self.eta}")

    def next_x(self, chain: Chain, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        process, i = chain.process, chain.positions
        x_start = process.p_mean_variance(output, chain.x, t)["pred_xstart"]
        # Re-derive epsilon from the clipped x_0 so both stay consistent.
        eps = process.predict_eps_from_start(chain.x, t, x_start)
        alpha_bar, alpha_bar_prev = process.alphas_cumprod[i], process.alphas_cumprod_prev[i]
        sigma = self.eta * np.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * np.sqrt(1 - alpha_bar / alpha_bar_prev)
        x = (x_start * chain.rows(np.sqrt(alpha_bar_prev))
             + chain.rows(np.sqrt(np.maximum(1 - alpha_bar_prev - sigma**2, 0.0))) * eps)
        noisy = (i > 0) & (sigma > 0)
        if noisy.any():
            x = x + chain.rows(sigma) * chain.noise(noisy)
        return x


def student_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """The timesteps (ascending) a distilled student samples in `steps` steps: every
    (teacher steps / steps)-th of its teacher's, from the noisiest on, so each is a point of the
    teacher's trajectory the student was trained at (1 step: T-1; 2: T-1 and the middle one)."""
    teacher_steps = DISTILLATION_TEACHER[1]
    if steps < 1 or teacher_steps % steps:
        raise ValueError(f"a student of a {teacher_steps}-step teacher runs a divisor of {teacher_steps} steps, not {steps}")
    noisiest_first = spaced_timesteps(num_timesteps, teacher_steps)[::-1]
    return np.sort(noisiest_first[:: teacher_steps // steps])


@dataclass(frozen=True)
class DistilledSampler(DDIMSampler, name="distilled"):
    """DDIM on a distilled student (shared/semantic/diffusion/distilled.py) over a subset of its
    teacher's timesteps (`student_timesteps`); only a student generator runs it."""

    def process(self, diffusion: GaussianDiffusion, steps: int) -> GaussianDiffusion:
        return diffusion.respaced(student_timesteps(diffusion.num_timesteps, steps))


def log_snr_timesteps(alphas_cumprod: np.ndarray, steps: int) -> np.ndarray:
    """`steps` distinct timesteps (ascending) as evenly spread in log-SNR as the chain allows.

    Uniform time crowds the steps where little happens and leaves one large log-SNR jump at the
    clean end, where a few-step solver loses most; uniform log-SNR spreads that jump out.
    """
    num_timesteps = len(alphas_cumprod)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {steps}")
    log_snr = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)  # falls strictly with t
    picked, upper = [], num_timesteps - 1
    for k, target in enumerate(np.linspace(log_snr[-1], log_snr[0], steps)):
        # Nearest to the target among the indices that still leave room for the remaining steps.
        candidates = np.arange(steps - 1 - k, upper + 1)
        index = int(candidates[np.argmin(np.abs(log_snr[candidates] - target))])
        picked.append(index)
        upper = index - 1
    return np.array(picked[::-1], dtype=np.int64)


@dataclass(frozen=True)
class DPMSolverPP2MSampler(Sampler, name="dpmpp2m"):
    """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the probability-flow
    ODE in data prediction, so few steps still reach the images that DDPM needs hundreds for.

    With lambda = log(alpha / sigma) and h = lambda_next - lambda_now, one step is
    x_next = (sigma_next / sigma_now) x + alpha_next (1 - e^-h) D, where D extrapolates the last two
    clipped x_0 predictions linearly in lambda (D = x_0 on the first step). Predicting x_0 and
    clipping it to [-1, 1] keeps guided sampling stable, which epsilon-based solvers are not. As in
    DDIM, the last model call (at t = 0) returns its x_0.

    Timesteps are uniform in log-SNR by default (`spacing="time"`: `spaced_timesteps`). The authors
    suggest log-SNR for low-resolution images such as ours; on a Gaussian toy whose exact ODE
    solution is known it is about ten times closer at 10 steps (tests/test_diffusion.py).
    """

    spacing: str = "log_snr"

    def __post_init__(self) -> None:
        if self.spacing not in ("log_snr", "time"):
            raise ValueError(f"unknown spacing {self.spacing!r}: expected 'log_snr' or 'time'")

    def process(self, diffusion: GaussianDiffusion, steps: int) -> GaussianDiffusion:
        timesteps = (log_snr_timesteps(diffusion.alphas_cumprod, steps) if self.spacing == "log_snr"
                     else spaced_timesteps(diffusion.num_timesteps, steps))
        return diffusion.respaced(timesteps)

    def initial_memory(self, shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor | np.ndarray]:
        # The previous step's x_0 and h; NaN h: no previous step yet (D = x_0).
        return {"previous_x_start": torch.zeros(shape, device=device), "previous_h": np.full(shape[0], np.nan)}

    def next_x(self, chain: Chain, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        process, i = chain.process, chain.positions
        x_start = process.p_mean_variance(output, chain.x, t)["pred_xstart"]
        last = i == 0
        if last.all():  # the last model call (t = 0) returns its x_0, as DDIM does
            return x_start
        alpha = np.sqrt(process.alphas_cumprod)
        sigma = np.sqrt(1.0 - process.alphas_cumprod)
        log_snr = np.log(alpha) - np.log(sigma)
        before = np.maximum(i - 1, 0)
        h = np.where(last, np.nan, log_snr[before] - log_snr[i])
        previous_h = chain.memory["previous_h"]
        # D = (1 + r) x_0 - r x_0' with r = h / (2 h'), and r = 0 (D = x_0 exactly) on a first step.
        ratio = np.divide(0.5 * h, previous_h, out=np.zeros_like(h), where=~np.isnan(previous_h) & ~last)
        direction = chain.rows(1 + ratio) * x_start - chain.rows(ratio) * chain.memory["previous_x_start"]
        x = (chain.rows(np.where(last, 1.0, sigma[before] / sigma[i])) * chain.x
             + chain.rows(np.where(last, 0.0, alpha[before] * -np.expm1(-np.nan_to_num(h)))) * direction)
        chain.memory.update(previous_x_start=x_start, previous_h=h)
        if last.any():
            x = chain.where(last, x_start, x)
        return x


def _device_of(model_fn: ModelFn) -> torch.device:
    """The model function's device (GuidedModel says it), else its network's; CPU for a model
    function without parameters (e.g. a closed form)."""
    device = getattr(model_fn, "device", None)
    if isinstance(device, torch.device):
        return device
    network = getattr(model_fn, "network", model_fn)
    parameter = next(network.parameters(), None) if isinstance(network, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def teacher_options(options: SamplingOptions) -> SamplingOptions:
    """What runs for the distilled sampler where no student serves `options` (as the request gave
    them): the trajectory a student imitates (DISTILLATION_TEACHER) at the request's guidance. A
    request that named no sampler asked for the default, not for the student: it keeps its steps."""
    sampler, steps = DISTILLATION_TEACHER
    return dataclasses.replace(options, sampler=sampler, steps=steps if options.sampler else (options.steps or steps))


def default_sampler(steps: int = 0) -> str:
    """The sampler of a request that names none: DEFAULT_SAMPLER, unless the request asks for more
    steps than that sampler runs; then the sampler of the trajectory a student imitates, at those steps."""
    limit = SAMPLERS[DEFAULT_SAMPLER].step_limit
    return DISTILLATION_TEACHER[0] if limit and steps > limit else DEFAULT_SAMPLER


def resolve(options: SamplingOptions, max_steps: int) -> SamplingOptions:
    """`options` with its defaults filled in (default_sampler, then that sampler's default steps,
    at most `max_steps`) and checked against the registry and a chain of `max_steps`; LimitError
    names the field."""
    name = options.sampler or default_sampler(options.steps)
    if name not in SAMPLERS:
        raise LimitError("sampler", f"must be one of {sorted(SAMPLERS)}, got {name!r}")
    limit = min(max_steps, SAMPLERS[name].step_limit or max_steps)
    steps = options.steps or min(SAMPLERS[name].default_steps, limit)
    if steps > limit:
        raise LimitError("steps", f"must be in {MIN_STEPS}..{limit} for the {name} sampler on this model, got {steps}")
    return dataclasses.replace(options, sampler=name, steps=steps)
