"""Continuous batching of diffusion sampling: images join and leave a running batch between steps.

Request-level batching samples a batch from its first step to its last, so a request that arrives
meanwhile waits for the whole batch. Here every image walks its own sampler chain (its sampler,
steps, guidance and seed), and each `step` runs ONE guided network call for all the images held,
whatever step each has reached (StreamDiffusion's Stream Batch; LLM servers' continuous batching).
A new image joins at the next step; a finished one leaves at once.

The images of one sampler and step count share a `Chain` and advance together with that
sampler's own `step`, so the maths is the samplers' and a row's result does not depend on who it
was batched with: each image draws its noise from its own generator, and the network treats every
row on its own, so an image equals the one `SemanticImageGenerator.generate` makes alone with the
same seed up to float rounding (tests/test_continuous_batching.py).
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

from shared.limits import SamplingOptions
from shared.semantic.diffusion.gaussian_diffusion import GaussianDiffusion, to_device
from shared.semantic.diffusion.generator import SemanticImageGenerator, to_uint8_images
from shared.semantic.diffusion.samplers import SAMPLERS, Chain, Sampler, guided_forward


@dataclass
class _Group:
    """The images of one (sampler, steps): one chain, with each row's key, condition and guidance."""

    sampler: Sampler
    chain: Chain
    keys: list[Hashable]
    conditions: torch.Tensor
    guidance: np.ndarray

    def join(self, other: _Group) -> None:
        self.chain = Chain.join([self.chain, other.chain])
        self.keys += other.keys
        self.conditions = torch.cat([self.conditions, other.conditions])
        self.guidance = np.concatenate([self.guidance, other.guidance])

    def keep(self, rows: list[int]) -> None:
        self.chain = self.chain.take(rows)
        self.keys = [self.keys[r] for r in rows]
        self.conditions = self.conditions[to_device(np.asarray(rows, dtype=np.int64), self.conditions.device)]
        self.guidance = self.guidance[rows]


class StepBatch:
    """Images of one generator sampled together, one guided forward per `step`, each on its own chain."""

    def __init__(self, generator: SemanticImageGenerator) -> None:
        self.generator = generator
        self._groups: dict[tuple[str, int], _Group] = {}
        self._processes: dict[tuple[str, int], GaussianDiffusion] = {}

    def __len__(self) -> int:
        return sum(len(group.keys) for group in self._groups.values())

    def __contains__(self, key: Hashable) -> bool:
        return any(key in group.keys for group in self._groups.values())

    @torch.inference_mode()
    def add(self, key: Hashable, condition: torch.Tensor, sampling: SamplingOptions, seed: int) -> None:
        """Put an image (condition (K, H, W)) at the start of its chain; it runs from the next step.

        ValueError for a bad condition or a key held already; LimitError for sampling options
        the model cannot run."""
        if key in self:
            raise ValueError(f"{key!r} is in the batch already")
        generator = self.generator
        generator.check_conditions(condition[None])
        sampling = generator.resolve(sampling)
        group_key = (sampling.sampler, sampling.steps)
        sampler = SAMPLERS[sampling.sampler]()
        # One process object per (sampler, steps): chains join only on the very same process.
        if group_key not in self._processes:
            self._processes[group_key] = sampler.process(generator.diffusion, sampling.steps)
        process = self._processes[group_key]
        cfg = generator.config.unet
        chain = sampler.start(process, (1, cfg.in_channels, cfg.image_height, cfg.image_width),
                              generator.generators([seed]), generator.device)
        newcomer = _Group(sampler, chain, [key], generator.device_condition(condition[None]),
                          np.array([generator.network_guidance(sampling)]))
        if group_key in self._groups:
            self._groups[group_key].join(newcomer)
        else:
            self._groups[group_key] = newcomer

    def remove(self, key: Hashable) -> bool:
        """Drop an image at this step boundary (e.g. cancelled); False when it is not held."""
        for group_key, group in self._groups.items():
            if key in group.keys:
                self._keep(group_key, [row for row, held in enumerate(group.keys) if held != key])
                return True
        return False

    def progress(self, key: Hashable) -> tuple[int, int]:
        """(steps run, steps of its chain) of a held image."""
        for group in self._groups.values():
            if key in group.keys:
                return int(group.chain.steps_done[group.keys.index(key)]), group.chain.total
        raise KeyError(key)

    def progress_all(self) -> dict[Hashable, tuple[int, int]]:
        """`progress` of every image held, in one pass."""
        return {key: (int(done), group.chain.total) for group in self._groups.values()
                for key, done in zip(group.keys, group.chain.steps_done)}

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, np.ndarray]]:
        """One guided network call for every image held, then one step of each image's chain;
        returns the images that finished, as (key, (H, W, 3) uint8), and lets them go."""
        groups = list(self._groups.items())
        if not groups:
            return []
        output = guided_forward(
            self.generator.forward,
            torch.cat([group.chain.x for _, group in groups]),
            torch.cat([group.chain.model_timesteps() for _, group in groups]),
            torch.cat([group.conditions for _, group in groups]),
            np.concatenate([group.guidance for _, group in groups]),
        )
        finished: list[tuple[Hashable, np.ndarray]] = []
        first = 0
        for group_key, group in groups:
            rows = len(group.keys)
            group.sampler.step(group.chain, output[first:first + rows])
            first += rows
            done = group.chain.finished
            if done.any():
                done_rows = np.flatnonzero(done)
                images = to_uint8_images(group.chain.x[to_device(done_rows, group.chain.x.device)])
                finished += zip([group.keys[r] for r in done_rows], images)
                self._keep(group_key, [int(r) for r in np.flatnonzero(~done)])
        return finished

    def _keep(self, group_key: tuple[str, int], rows: list[int]) -> None:
        if rows:
            self._groups[group_key].keep(rows)
        else:
            del self._groups[group_key]
