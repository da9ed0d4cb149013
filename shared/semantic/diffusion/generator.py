"""The receiver's image generator: a semantic U-Net, its diffusion process and the samplers.

Loading it is the one place that turns a checkpoint file into something that makes images; the
services, evaluation and benchmarks all go through it.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from shared.limits import LimitError, SamplingOptions
from shared.semantic.checkpoints import load_checkpoint
from shared.semantic.device import select_device
from shared.semantic.diffusion.forward_buckets import BucketedForward
from shared.semantic.diffusion.gaussian_diffusion import DiffusionConfig, GaussianDiffusion, to_device
from shared.semantic.diffusion.quantization import INT8, int8_skeleton
from shared.semantic.diffusion.samplers import (DEFAULT_SAMPLER, SAMPLERS, DistilledSampler, GuidedModel,
                                                StepCallback, resolve, teacher_options)
from shared.semantic.diffusion.unet import SemanticUNet, UNetConfig

CHECKPOINT_KIND = "semantic-diffusion"


@dataclass(frozen=True)
class SemanticDiffusionConfig:
    """Everything needed to rebuild a trained model: the network and its noise process."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SemanticDiffusionConfig":
        unet = {k: tuple(v) if isinstance(v, list) else v for k, v in data["unet"].items()}
        # a checkpoint written before `prediction` was recorded predicts epsilon
        return cls(unet=UNetConfig(**unet), diffusion=DiffusionConfig(**{"prediction": "epsilon", **data["diffusion"]}))


@dataclass(frozen=True)
class GeneratorInfo:
    """What the status of every transmission reports about the model that produced it."""

    name: str
    trained: bool
    image_height: int
    image_width: int
    num_classes: int
    checkpoint: str | None
    parameters: int
    training_steps: int | None = None
    quantization: str | None = None  # e.g. "int8-static-conv"; None: fp32 weights
    adapter: str | None = None  # the condition adapter applied to the base weights (adapters.py)
    # A distilled student (distilled.py): the guidance scale its teacher's trajectories had, built in.
    distilled_guidance: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SemanticImageGenerator:
    """Generates RGB images from K-channel semantic maps with any registered sampler."""

    def __init__(self, network: SemanticUNet, config: SemanticDiffusionConfig, info: GeneratorInfo, device: torch.device) -> None:
        self.network = network.to(device).eval()
        self.config = config
        self.info = info
        self.device = device
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)
        # Set by `use_buckets`: the network called at fixed batch sizes (CUDA graphs on a GPU).
        self.buckets: BucketedForward | None = None
        # Draw the noise on the model's device (see `generators`); off: on the CPU.
        self.noise_on_device = False

    @classmethod
    def load(cls, checkpoint_path: str | Path | None, device: str = "auto",
             untrained_config: SemanticDiffusionConfig | None = None, seed: int = 0) -> "SemanticImageGenerator":
        """Load a trained checkpoint, or build a random model when there is none (labelled untrained)."""
        torch_device = select_device(device)
        if checkpoint_path is not None and Path(checkpoint_path).is_file():
            payload = load_checkpoint(checkpoint_path, CHECKPOINT_KIND)
            config = SemanticDiffusionConfig.from_dict(payload["config"])
            network = SemanticUNet(config.unet)
            meta = payload["meta"]
            info = _info(network, config, name=meta.get("name", Path(checkpoint_path).stem), trained=True,
                         checkpoint=str(checkpoint_path), training_steps=meta.get("step"),
                         quantization=meta.get("quantization"),
                         distilled_guidance=meta.get("distillation", {}).get("guidance"))
            network = _quantized_skeleton(network, info.quantization, torch_device)
            network.load_state_dict(payload["state_dict"])
        else:
            config = untrained_config or SemanticDiffusionConfig()
            torch.manual_seed(seed)
            network = SemanticUNet(config.unet)
            info = _info(network, config, name="untrained-random-init", trained=False, checkpoint=None, training_steps=0)
        return cls(network, config, info, torch_device)

    def use_channels_last(self) -> None:
        """Store the convolution weights channels_last (NHWC); the activations follow them.

        oneDNN's convolutions, 74% of a forward on the CPU, skip their layout reorders: 6-9% faster
        in fp32, 2-6% on top of int8 (docs/benchmarks.md). Same images up to float rounding.
        """
        self.network = self.network.to(memory_format=torch.channels_last)

    def compile(self, warm_up_batches: Sequence[int] = (1, 2)) -> None:
        """torch.compile the network and run it once per batch in `warm_up_batches`, so requests
        never wait for a compilation: batch 1 gets its own graph, the second size makes the batch
        dimension dynamic for every size after it. Takes minutes on a small CPU."""
        if self.info.quantization is not None:
            raise ValueError(f"torch.compile is for fp32 models; this one is {self.info.quantization}")
        self.network = torch.compile(self.network)
        cfg = self.config.unet
        with torch.inference_mode():
            for batch in warm_up_batches:
                self.network(torch.zeros(batch, cfg.in_channels, cfg.image_height, cfg.image_width, device=self.device),
                             torch.zeros(batch, dtype=torch.long, device=self.device),
                             torch.zeros(batch, cfg.num_classes, cfg.image_height, cfg.image_width, device=self.device))

    def trace(self) -> None:
        """Run the network as a TorchScript trace (traced at batch 2; any batch runs it).

        Why: the eager network takes the interpreter lock back after each of its few hundred
        operations, so any busy Python thread of the process (a receiver's gRPC event loop writing
        to a thousand watches) stalls sampling for as long as it runs; a traced forward is one call
        that takes the lock only to start and to return (scripts/benchmarks/benchmark_interpreter_lock.py).
        The same outputs; conditions at the model's resolution only (the trace keeps the shapes of
        its SPADE layers), which check_conditions guarantees. torch.jit is deprecated, but its
        successor, torch.export, runs its modules operation by operation in Python."""
        if self.info.quantization is not None:
            raise ValueError(f"tracing is for fp32 models; this one is {self.info.quantization}")
        cfg = self.config.unet
        example = (torch.zeros(2, cfg.in_channels, cfg.image_height, cfg.image_width, device=self.device),
                   torch.zeros(2, dtype=torch.long, device=self.device),
                   torch.zeros(2, cfg.num_classes, cfg.image_height, cfg.image_width, device=self.device))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            self.network = torch.jit.trace(self.network, example, check_trace=False)

    def use_buckets(self, buckets: Sequence[int], cuda_graphs: bool = False) -> dict[int, float]:
        """Call the network at these batch sizes only (a call's rows padded up to the next one),
        each replayed as a CUDA graph when `cuda_graphs` (CUDA only); every bucket is warmed up
        (captured) now, after channels_last and compilation. Returns the seconds each took."""
        cfg = self.config.unet
        self.buckets = BucketedForward(self.network, buckets, (cfg.in_channels, cfg.image_height, cfg.image_width),
                                       (cfg.num_classes, cfg.image_height, cfg.image_width), self.device, cuda_graphs)
        return self.buckets.warm_up()

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """One network call: through the buckets when `use_buckets` set them, else directly."""
        return self.network(x, t, condition) if self.buckets is None else self.buckets(x, t, condition)

    def generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        """One seeded generator per image. On the CPU by default, so a seed gives the same image
        on every device (up to float rounding); with `noise_on_device` on the model's device,
        which spares a host-to-device copy per draw but gives other images than the CPU's."""
        device = self.device if self.noise_on_device else torch.device("cpu")
        return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]

    def check_conditions(self, conditions: torch.Tensor) -> None:
        """ValueError unless `conditions` is a finite (B, K, H, W) batch at the model's resolution."""
        cfg = self.config.unet
        expected = (cfg.num_classes, cfg.image_height, cfg.image_width)
        if conditions.ndim != 4 or tuple(conditions.shape[1:]) != expected:
            raise ValueError(f"conditions must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(conditions.shape)}")
        if not torch.isfinite(conditions).all():
            raise ValueError("conditions contain NaN or infinite values")

    @property
    def is_student(self) -> bool:
        """A distilled student: it runs the distilled sampler only, its guidance built in."""
        return self.info.distilled_guidance is not None

    def resolve(self, sampling: SamplingOptions) -> SamplingOptions:
        """The sampler and steps `generate` runs for `sampling` (its defaults filled in); LimitError
        (a ValueError naming the field) for a sampler, steps or guidance this model cannot run.

        The distilled sampler runs on a student and a student runs nothing else; a student's
        guidance is the one it learned (the request must ask for that scale). A request without a
        sampler gets the default, which on a model that is no student is the sampler a student
        imitates, at the request's steps (samplers.teacher_options)."""
        if self.is_student:
            sampling = dataclasses.replace(sampling, sampler=sampling.sampler or DistilledSampler.name)
            if sampling.sampler != DistilledSampler.name:
                raise LimitError("sampler", f"{self.info.name} is a distilled student: it runs the "
                                            f"{DistilledSampler.name!r} sampler only, not {sampling.sampler!r}")
            if sampling.guidance != self.info.distilled_guidance:
                raise LimitError("guidance", f"the {DistilledSampler.name} sampler has guidance "
                                             f"{self.info.distilled_guidance:g} built in, got {sampling.guidance:g}")
        elif not sampling.sampler and DEFAULT_SAMPLER == DistilledSampler.name:
            sampling = teacher_options(sampling)
        elif sampling.sampler == DistilledSampler.name:
            raise LimitError("sampler", f"{DistilledSampler.name!r} runs on a distilled student of "
                                        f"{self.info.name}, and none is loaded")
        return resolve(sampling, self.diffusion.num_timesteps)

    def network_guidance(self, sampling: SamplingOptions) -> float:
        """The guidance scale of the network calls: 0 for a student (its guidance is in its weights)."""
        return 0.0 if self.is_student else sampling.guidance

    @torch.inference_mode()
    def generate(self, conditions: torch.Tensor, sampling: SamplingOptions, seeds: Sequence[int],
                 step_callback: StepCallback | None = None) -> np.ndarray:
        """Images (B, H, W, 3) uint8 for conditions (B, K, H, W) at the model's resolution.

        `step_callback(step, total)` runs before each sampling step; what it raises stops sampling.
        """
        self.check_conditions(conditions)
        if len(seeds) != conditions.shape[0]:
            raise ValueError(f"need one seed per image: {conditions.shape[0]} images, {len(seeds)} seeds")
        sampling = self.resolve(sampling)
        model_fn = GuidedModel(self.forward, self.device_condition(conditions), self.network_guidance(sampling))
        cfg = self.config.unet
        shape = (conditions.shape[0], cfg.in_channels, cfg.image_height, cfg.image_width)
        sampler = SAMPLERS[sampling.sampler]()
        images = sampler.sample(self.diffusion, model_fn, shape, self.generators(seeds), sampling.steps, step_callback)
        return to_uint8_images(images)

    def device_condition(self, conditions: torch.Tensor) -> torch.Tensor:
        """Conditions as the network takes them: float32 on its device, contiguous.

        A copy made here is an inference tensor like every other network input, so a compiled
        network sees one kind of tensor and does not recompile for unguided requests. A GPU gets
        it without a host sync (`to_device`)."""
        copy = conditions.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        return to_device(copy, self.device)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (B, 3, H, W) as uint8 (B, H, W, 3) on the host."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _info(network: SemanticUNet, config: SemanticDiffusionConfig, name: str, trained: bool,
          checkpoint: str | None, training_steps: int | None, quantization: str | None = None,
          distilled_guidance: float | None = None) -> GeneratorInfo:
    return GeneratorInfo(
        name=name, trained=trained, image_height=config.unet.image_height, image_width=config.unet.image_width,
        num_classes=config.unet.num_classes, checkpoint=checkpoint,
        parameters=sum(p.numel() for p in network.parameters()), training_steps=training_steps,
        quantization=quantization, distilled_guidance=distilled_guidance,
    )


def _quantized_skeleton(network: SemanticUNet, quantization: str | None, device: torch.device) -> torch.nn.Module:
    """The module a checkpoint's weights load into: the U-Net itself, or its int8 form."""
    if quantization is None:
        return network
    if quantization != INT8:
        raise ValueError(f"unknown quantization {quantization!r} in the checkpoint: expected {INT8!r}")
    if device.type != "cpu":
        raise ValueError(f"an {INT8} checkpoint runs on the CPU only, not on {device}")
    return int8_skeleton(network)
