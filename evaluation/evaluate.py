"""Reproduce the paper's tables on CamVid: our link, its ablations and classical baselines.

    python -m evaluation.evaluate --split val --snrs 1,5,10,15,20,30,100 \\
        --methods ours,no_fds,no_noisy,no_both,analog,digital,real \\
        --model models/diffusion-camvid.pt --ablation-model models/diffusion-camvid-clean.pt \\
        --segmenter models/segmenter-camvid.pt --sampler ddim --steps 10 --guidance 2 --seed 0 \\
        --out docs/results

Every image is evaluated at --image-height x --image-width, by default the sender's map size
(--map-height x --map-width, 96x128): the original image and the ground-truth label map are the
dataset's, resized there; the label map that is sent is that map resized to the map size (nearest
neighbour), as the sender takes its map at its map size. Ours and the ablations go through the
receiver's pipeline: codec, channel and FDS (`shared.semantic.link`), `generator.generate`, then with
--upscaler the receiver's upscaling stage (`shared.semantic.upscaler`, given the received maps at the
size they were sent); the image is then resized to the evaluated size for the metrics. The analog
and digital baselines send the image at the evaluated size. Channel noise and sampling seeds derive
from --seed and the image index only, so every method sees the same channel realisation for an
image and SNR, and a run is reproducible. Writes results.json, plots/*.png and grid*.png under
--out and the report there as results.md, or at --report (see `evaluation.report`).
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch

from evaluation import report
from evaluation.baselines import DigitalPlan, analog_transmit, digital_transmit, jpeg_encode, plan_digital
from evaluation.cache import ConfigCache, file_stamp
from evaluation.checks import load_notes
from evaluation.image_quality import (
    SegmenterProbe,
    TorchScriptInception,
    TorchScriptLpips,
    frechet_distance,
    pooled_miou,
    psnr,
    segmentation_scores,
    ssim,
    summarize,
)
from evaluation.schema import ABLATIONS, DEFINITION_TEXT, METHODS, Method
from gesco.options import DEFAULT_GUIDANCE, DISTILLATION_TEACHER
from shared.limits import SamplingOptions
from shared.paths import REPO_ROOT
from shared.semantic.channels import ChannelConfig, ChannelOutput, SnrDefinition, apply_channel
from shared.semantic.checkpoints import load_checkpoint
from shared.semantic.codec import CodecConfig, encode_label_map
from shared.semantic.data import CAMVID_INFO, camvid, default_data_root
from shared.semantic.device import select_device
from shared.semantic.diffusion.generator import CHECKPOINT_KIND, SemanticImageGenerator, to_uint8_images
from shared.semantic.diffusion.adapters import adapted_generators
from shared.semantic.diffusion.distilled import load_student
from shared.semantic.diffusion.samplers import DistilledSampler
from shared.semantic.fds import DEFAULT_FDS_VARIANT, FdsVariant
from shared.semantic import rate_quality
from shared.semantic.link import ReceivedViews, received_views, resize_maps
from shared.semantic.segmenter import Segmenter
from shared.semantic.upscaler import Upscaler
from shared.wire.imageio import resize_image  # as the receiver sizes its output

DEFAULT_SNRS = (1.0, 5.0, 10.0, 15.0, 20.0, 30.0, 100.0)
DEFINITION_IDS = {SnrDefinition.PAPER_PSNR: 1, SnrDefinition.AVERAGE_POWER: 2}
GREY = 128
NA = "n/a"


@dataclass(frozen=True)
class EvaluationConfig:
    """Everything a run's numbers depend on, with the command line's defaults.

    The command line builds it from its flags; scripts (scripts/benchmarks/sampler_sweep.py) build it
    directly. Definitions may be given by name; `ablation_snrs=None` means the same SNRs as `snrs`.
    """

    split: str = "val"
    data_root: str | None = None
    snrs: tuple[float, ...] = DEFAULT_SNRS
    methods: tuple[str, ...] = tuple(METHODS)
    definitions: tuple[SnrDefinition, ...] = (SnrDefinition.PAPER_PSNR, SnrDefinition.AVERAGE_POWER)
    ablation_definitions: tuple[SnrDefinition, ...] = (SnrDefinition.PAPER_PSNR,)
    ablation_snrs: tuple[float, ...] | None = None
    model: str = "models/diffusion-camvid.pt"
    ablation_model: str = "models/diffusion-camvid-clean.pt"
    segmenter: str = "models/segmenter-camvid.pt"
    lpips: str | None = None
    inception: str | None = None
    # The base generator's own sampling (DDIM 10), which the reports score; the distilled student
    # has its report (scripts/models/distillation_report.py).
    sampler: str = DISTILLATION_TEACHER[0]
    steps: int = DISTILLATION_TEACHER[1]
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    limit: int = 0
    map_height: int = 96
    map_width: int = 128
    # The evaluated resolution, at least the map size; 0: the map size's.
    image_height: int = 0
    image_width: int = 0
    # The receiver's upscaling stage after the generator (its checkpoint); "": none, the generated
    # image is resized bicubically to the evaluated size.
    upscaler: str = ""
    # Ours' maps sent downsampled by this factor, generated as the services do: through the
    # condition adapter of the factor beside `model` where there is one (the distilled sampler: the
    # factor's student).
    downsample_factor: int = 1
    # The FDS variant of the methods with FDS (shared/semantic/fds.py): the receiver's by default;
    # "paper" is eq. 2 as published.
    fds_variant: FdsVariant = DEFAULT_FDS_VARIANT
    batch_size: int = 8
    ldpc_iterations: int = 20
    cliff_snrs: tuple[float, ...] = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0)
    cliff_images: int = 10
    grid_image: int = 0
    device: str = "auto"
    threads: int = 0
    cache_dir: str | None = "runs/evaluation-cache"

    def __post_init__(self) -> None:
        """Rejects what no run could do before hours of work; definitions become SnrDefinition."""
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}: choose from {list(METHODS)}")
        if not self.snrs:
            raise ValueError("snrs is empty")
        for name in ("definitions", "ablation_definitions"):
            object.__setattr__(self, name, tuple(SnrDefinition(d) for d in getattr(self, name)))
        object.__setattr__(self, "fds_variant", FdsVariant(self.fds_variant))
        if self.ablation_snrs is None:
            object.__setattr__(self, "ablation_snrs", self.snrs)
        sampling = self.sampling  # a LimitError (a ValueError naming the field) out of the limits
        if not sampling.sampler or not sampling.steps:
            raise ValueError("sampler and steps must be given (not the receiver's defaults): the results record them")
        (height, width), (map_height, map_width) = self.image_size, self.map_size
        if height < map_height or width < map_width:
            raise ValueError(f"the evaluated size {height}x{width} (image height and width) is below the map size "
                             f"{map_height}x{map_width}: the evaluated images are the map size or larger")
        if self.upscaler and not Path(self.upscaler).is_file():
            raise ValueError(f"upscaler {self.upscaler} not found")

    @property
    def map_size(self) -> tuple[int, int]:
        """The size of the label map the sender takes (before any downsampling)."""
        return self.map_height, self.map_width

    @property
    def image_size(self) -> tuple[int, int]:
        """The evaluated resolution: image height and width, each 0 for the map's."""
        return self.image_height or self.map_height, self.image_width or self.map_width

    @property
    def sampling(self) -> SamplingOptions:
        """What `generator.generate` takes: sampler, steps and guidance."""
        return SamplingOptions(sampler=self.sampler, steps=self.steps, guidance=self.guidance)

    def model_path(self, key: str) -> str:
        """The checkpoint of a method's `model` key ("model" or "ablation_model")."""
        return {"model": self.model, "ablation_model": self.ablation_model}[key]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _parser() -> argparse.ArgumentParser:
    """One flag a config field (defaults from EvaluationConfig), then what to write and where."""
    d = EvaluationConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default=d.split, choices=("train", "val", "test"))
    p.add_argument("--data-root", default=d.data_root, help="CamVid root (default: $GESCO_DATA_ROOT or ../shared/data/camvid)")
    p.add_argument("--snrs", type=_floats, default=d.snrs, help="comma-separated SNRs in dB")
    p.add_argument("--methods", type=_names, default=d.methods, help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--definitions", type=_names, default=tuple(x.value for x in d.definitions),
                   help="SNR definitions for ours and the baselines")
    p.add_argument("--ablation-definitions", type=_names, default=tuple(x.value for x in d.ablation_definitions),
                   help="SNR definitions for the ablations (Table 5 uses the paper's PSNR)")
    p.add_argument("--ablation-snrs", type=_floats, default=None,
                   help="SNRs for the ablations (default: --snrs; Table 5 needs only 10)")
    p.add_argument("--model", default=d.model, help="noisy-trained generator")
    p.add_argument("--ablation-model", default=d.ablation_model, help="generator trained on clean maps")
    p.add_argument("--segmenter", default=d.segmenter)
    p.add_argument("--lpips", default=d.lpips, help="TorchScript LPIPS network (NVIDIA vgg16.pt); without it LPIPS is n/a")
    p.add_argument("--inception", default=d.inception,
                   help="TorchScript Inception (NVIDIA inception-2015-12-05.pt); without it FID is n/a")
    p.add_argument("--sampler", default=d.sampler)
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"default: the base generator's, {d.sampler} {d.steps} (docs/sampler-sweep.md)")
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--limit", type=int, default=d.limit, help="evaluate N images evenly spread over the split (0: all)")
    add_resolution_arguments(p, d, "ours' and the ablations' generated images")
    p.add_argument("--downsample-factor", type=int, default=d.downsample_factor,
                   help="ours' maps sent downsampled by this factor (through its condition adapter, as served)")
    p.add_argument("--fds-variant", default=d.fds_variant.value, choices=[v.value for v in FdsVariant],
                   help="the FDS of the methods with FDS (default: the receiver's; paper: eq. 2 as published)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images generated together")
    p.add_argument("--ldpc-iterations", type=int, default=d.ldpc_iterations)
    p.add_argument("--cliff-snrs", type=_floats, default=d.cliff_snrs,
                   help="extra SNRs for the digital link's decode-failure curve only (empty string: none)")
    p.add_argument("--cliff-images", type=int, default=d.cliff_images, help="images of the extra cliff SNRs (0: all)")
    p.add_argument("--grid-image", type=int, default=d.grid_image,
                   help="position, among the evaluated images, of the grid's scene")
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--cache-dir", default=d.cache_dir,
                   help="finished configurations are kept here and reused by a rerun with the same settings")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--report", default=None, help="write the Markdown report here (links relative to it) instead of results.md under --out")
    p.add_argument("--notes", default=None,
                   help="TOML with a summary and the explanation of each acceptance check (evaluation.checks.load_notes)")
    return p


def add_resolution_arguments(p: argparse.ArgumentParser, d: Any, generated: str) -> None:
    """The map size, the evaluated resolution and the upscaling stage, with the defaults of `d`
    (a config); `generated` says which images the stage runs on."""
    p.add_argument("--map-height", type=int, default=d.map_height, help="the sender's map height")
    p.add_argument("--map-width", type=int, default=d.map_width)
    p.add_argument("--image-height", type=int, default=d.image_height,
                   help="evaluated resolution, at least the map's: images and ground truth are loaded there (0: the map's)")
    p.add_argument("--image-width", type=int, default=d.image_width)
    p.add_argument("--upscaler", default=d.upscaler,
                   help=f"checkpoint of the receiver's upscaling stage, run on {generated} "
                        "(default: none, they are resized bicubically)")


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (SeedSequence needs them non-negative)."""
    state = np.random.SeedSequence([int(p) + 2**31 for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _snr_code(snr_db: float) -> int:
    return int(round(snr_db * 1000))


def snr_key(snr_db: float) -> str:
    return f"{snr_db:g}"


def evenly_spread(total: int, limit: int) -> list[int]:
    """`limit` indices spread over [0, total) (CamVid val is a few sequences; the first N would be one)."""
    if limit <= 0 or limit >= total:
        return list(range(total))
    return sorted(set(np.linspace(0, total - 1, limit).round().astype(int).tolist()))


def _relative(path: str | os.PathLike[str] | None) -> str | None:
    """Paths as recorded in the report: relative to the repository when possible."""
    if path is None:
        return None
    return os.path.relpath(Path(path).resolve(), REPO_ROOT)


def _portable(argv: list[str]) -> list[str]:
    """The command as recorded: absolute paths made relative to the repository."""
    out = []
    for token in argv:
        flag, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
        if value.startswith("/"):
            value = _relative(value) or value
        out.append(f"{flag}{eq}{value}")
    return out


Config = TypeVar("Config")


def recorded_command(module: str, argv: list[str] | None) -> str:
    """The command line as the results record it, paths relative to the repository."""
    return f"python -m {module} " + shlex.join(_portable(sys.argv[1:] if argv is None else argv))


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, config_class: type[Config]) -> Config:
    """The config of the parsed flags, one flag a field (--no-cache: no cache directory); a value the
    config refuses is a usage error."""
    values = {f.name: getattr(args, f.name) for f in fields(config_class)}
    if args.no_cache:
        values["cache_dir"] = None
    try:
        return config_class(**values)
    except ValueError as error:
        parser.error(str(error))


def _load_generator(path: str, num_classes: int, device: str) -> tuple[SemanticImageGenerator | None, str | None]:
    if not Path(path).is_file():
        return None, f"checkpoint {_relative(path)} not found"
    try:
        generator = SemanticImageGenerator.load(path, device)
    except Exception as error:  # noqa: BLE001 - reported in the results as the reason
        return None, f"checkpoint {_relative(path)} could not be loaded: {error}"
    if generator.info.num_classes != num_classes:
        return None, f"checkpoint {_relative(path)} has {generator.info.num_classes} classes, the data {num_classes}"
    return generator, None


class Evaluation:
    """Holds the data, the networks and the per-image channel plans of one run."""

    def __init__(self, config: EvaluationConfig) -> None:
        self.config = config
        self.device = select_device(config.device)
        self.info = CAMVID_INFO
        root = Path(config.data_root).expanduser() if config.data_root else default_data_root()
        self.data_root = root
        self.size, self.map_size = config.image_size, config.map_size  # evaluated, sent
        dataset = camvid(root, config.split, size=self.size)
        self.split_size = len(dataset)
        self.indices = evenly_spread(len(dataset), config.limit)
        self.names = [dataset.pairs[i][0].name for i in self.indices]
        self.images = dataset.images[self.indices]
        self.labels = dataset.labels[self.indices]  # the ground truth every metric compares with
        self.map_labels = self.labels if self.map_size == self.size else np.stack([
            cv2.resize(label, self.map_size[::-1], interpolation=cv2.INTER_NEAREST) for label in self.labels])
        self.codec = CodecConfig(num_classes=self.info.num_classes, downsample_factor=config.downsample_factor)
        self.encoded = [encode_label_map(label, self.codec) for label in self.map_labels]
        self.probe = SegmenterProbe(Segmenter.from_checkpoint(config.segmenter, self.device))
        self.lpips = TorchScriptLpips(config.lpips, self.device) if config.lpips else None
        self.inception = TorchScriptInception(config.inception, self.device) if config.inception else None
        self.generators: dict[str, SemanticImageGenerator] = {}
        self.unavailable: dict[str, str] = {}
        needed = {METHODS[m].model for m in config.methods if METHODS[m].model}
        for key in sorted(needed):
            generator, reason = _load_generator(config.model_path(key), self.info.num_classes, config.device)
            if generator is None:
                self.unavailable[key] = reason or "unavailable"
            else:
                self.generators[key] = generator
        self.students: dict[str, SemanticImageGenerator] = {}  # the distilled sampler's, by model key
        self.adapted: dict[str, SemanticImageGenerator] = {}  # the generator at downsample_factor, by model key
        self._check_sampling(config)
        self.upscaler = Upscaler.from_checkpoint(config.upscaler, self.device) if config.upscaler else None
        self._check_upscaler()
        self.real_labels, self.real_features = self.probe(self.images)
        self.real_inception = self.inception(self.images) if self.inception else None
        self.plans: list[DigitalPlan] | None = None

    def generator(self, key: str, sampler: str | None = None) -> SemanticImageGenerator:
        """The model a method samples with: the loaded one (for `model` at a downsample factor, with
        that factor's adapter where there is one), or for the distilled sampler the factor's student
        beside it (shared/semantic/diffusion/distilled.py); ValueError when there is none."""
        generator = self.generators[key]
        factor = self.config.downsample_factor if key == "model" else 1
        if factor > 1 and key not in self.adapted:
            self.adapted[key] = adapted_generators(generator).get(factor, generator)
        teacher = self.adapted.get(key, generator)
        if (sampler or self.config.sampler) != DistilledSampler.name:
            return teacher
        if key not in self.students:
            student = load_student(teacher, factor)
            if student is None:
                raise ValueError(f"the {DistilledSampler.name} sampler needs a student for downsample factor {factor} "
                                 f"beside {generator.info.checkpoint}")
            self.students[key] = student
        return self.students[key]

    def _check_sampling(self, config: EvaluationConfig) -> None:
        """Every loaded model can run this sampler and steps (an unknown sampler fails here, not mid-run)."""
        for key in self.generators:
            self.generator(key, config.sampler).resolve(config.sampling)

    def _check_upscaler(self) -> None:
        """The stage takes every loaded model's images and classes (a mismatch fails here, not mid-run)."""
        if self.upscaler is None:
            return
        stage = self.upscaler.config
        for key, generator in self.generators.items():
            info = generator.info
            if (stage.in_height, stage.in_width, stage.num_classes) != (info.image_height, info.image_width,
                                                                         info.num_classes):
                raise ValueError(f"upscaler {_relative(self.config.upscaler)} takes {stage.in_height}x{stage.in_width} "
                                 f"images of {stage.num_classes} classes; {key} {_relative(self.config.model_path(key))} "
                                 f"makes {info.image_height}x{info.image_width} of {info.num_classes}")

    def use_sampling(self, sampler: str, steps: int) -> None:
        """Generate with another sampler from now on (the sampler sweep), checked as at the start."""
        config = replace(self.config, sampler=sampler, steps=steps)
        self._check_sampling(config)
        self.config = config

    # --- channel uses ----------------------------------------------------------------------------
    @property
    def source_values(self) -> int:
        """Real values of the source image at the evaluated size: the bandwidth ratio's denominator."""
        return rate_quality.source_values(*self.size)

    def semantic_uses(self, i: int) -> int:
        return math.ceil(self.encoded[i].header.num_symbols / 2)

    def digital_plans(self) -> list[DigitalPlan]:
        """One plan per image, within the channel uses of the semantic link for that image."""
        if self.plans is None:
            self.plans = [plan_digital(image, self.semantic_uses(i)) for i, image in enumerate(self.images)]
        return self.plans

    def channel(self, definition: SnrDefinition, snr_db: float) -> ChannelConfig:
        return ChannelConfig(snr_db=snr_db, snr_definition=definition)

    def channel_seed(self, position: int, definition: SnrDefinition, snr_db: float) -> int:
        return _seed(self.config.seed, 2, DEFINITION_IDS[definition], _snr_code(snr_db), self.indices[position])

    def sampling_seed(self, position: int) -> int:
        return _seed(self.config.seed, 1, self.indices[position])

    def receive(self, position: int, definition: SnrDefinition, snr_db: float,
                use_fds: bool = True) -> tuple[ChannelOutput, ReceivedViews]:
        """An image's maps through the channel, as the receiver has them: at the size they were sent."""
        encoded = self.encoded[position]
        output = apply_channel(encoded.symbols, self.channel(definition, snr_db),
                               seed=self.channel_seed(position, definition, snr_db), map_scale=encoded.header.scale)
        return output, received_views(output.symbols, encoded.header, use_fds, self.config.fds_variant)

    # --- transmissions -----------------------------------------------------------------------------
    def semantic(self, method: Method, definition: SnrDefinition, snr_db: float) -> tuple[np.ndarray, dict[str, Any]]:
        generator = self.generator(method.model)
        height, width = generator.info.image_height, generator.info.image_width
        sampling = self.config.sampling
        outputs, measured, map_accuracy = [], [], []
        for start in range(0, len(self.images), self.config.batch_size):
            positions = range(start, min(start + self.config.batch_size, len(self.images)))
            received, conditions = [], []
            for i in positions:
                output, views = self.receive(i, definition, snr_db, use_fds=bool(method.fds))
                condition = resize_maps(views.fds_maps, (height, width))  # the FDS maps, or the raw ones without
                received.append(views.fds_maps)
                conditions.append(condition)
                measured.append(output.measured_snr_db)
                sent = cv2.resize(self.map_labels[i], (width, height), interpolation=cv2.INTER_NEAREST)
                map_accuracy.append(float((condition.argmax(0) == sent).mean()))
            generated = generator.generate(torch.from_numpy(np.stack(conditions)), sampling,
                                           [self.sampling_seed(i) for i in positions])
            outputs.extend(resize_image(image, *self.size) for image in self.upscale(generated, received))
        uses = [self.semantic_uses(i) for i in range(len(self.images))]
        extra = {"channel_uses": uses, "measured_snr_db": measured, "condition_pixel_accuracy": map_accuracy}
        return np.stack(outputs), extra

    def upscale(self, generated: np.ndarray, received: list[np.ndarray]) -> np.ndarray:
        """The generated images through the upscaling stage, given the received maps as the receiver
        gives them (receiver_service.model_host.finish_image); unchanged without a stage."""
        if self.upscaler is None:
            return generated
        images = torch.from_numpy(generated).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return to_uint8_images(self.upscaler(images, torch.from_numpy(np.stack(received)).float()))

    def analog(self, definition: SnrDefinition, snr_db: float) -> tuple[np.ndarray, dict[str, Any]]:
        channel = self.channel(definition, snr_db)
        results = [analog_transmit(image, channel, self.channel_seed(i, definition, snr_db))
                   for i, image in enumerate(self.images)]
        extra = {"channel_uses": [r.channel_uses for r in results], "measured_snr_db": [r.measured_snr_db for r in results]}
        return np.stack([r.image for r in results]), extra

    def digital(self, definition: SnrDefinition, snr_db: float, positions: list[int] | None = None
                ) -> tuple[np.ndarray, dict[str, Any]]:
        """Decoded JPEGs; a failure leaves a mid-grey image and is listed in `failed`."""
        plans = self.digital_plans()
        channel = self.channel(definition, snr_db)
        positions = list(range(len(self.images))) if positions is None else positions
        images, failures, uses, measured, failed_blocks = [], [], [], [], []
        for i in positions:
            result = digital_transmit(plans[i], self.images[i].shape, channel, self.channel_seed(i, definition, snr_db),
                                      map_scale=self.encoded[i].header.scale, max_iterations=self.config.ldpc_iterations)
            images.append(result.image if result.image is not None else np.full_like(self.images[i], GREY))
            failures.append(result.failure)
            uses.append(result.channel_uses)
            measured.append(result.measured_snr_db)
            failed_blocks.append(result.failed_blocks)
        extra = {
            "channel_uses": uses, "measured_snr_db": measured, "failed_code_blocks": failed_blocks,
            "decode_failures": sum(f is not None for f in failures),
            "failed_images": [self.names[i] for i, f in zip(positions, failures) if f is not None],
            "failure_kinds": {kind: failures.count(kind) for kind in ("crc", "jpeg") if kind in failures},
        }
        return np.stack(images), extra

    # --- metrics ---------------------------------------------------------------------------------
    def score(self, received: np.ndarray) -> dict[str, Any]:
        labels, features = self.probe(received)
        ious, accuracies, pooled = segmentation_scores(labels, self.labels, self.info.num_classes, self.info.ignore_index)
        per_image = {"miou": ious, "pixel_accuracy": accuracies, "ssim": ssim(received, self.images),
                     "psnr": psnr(received, self.images)}
        if self.lpips is not None:
            per_image["lpips"] = self.lpips(received, self.images)
        scores: dict[str, Any] = {name: summarize(values) for name, values in per_image.items()}
        if self.lpips is None:
            scores["lpips"] = NA
        scores["pooled_miou"] = float(pooled_miou(pooled, self.info.ignore_index))
        scores["frechet_segmenter_distance"] = frechet_distance(features, self.real_features)
        scores["fid"] = frechet_distance(self.inception(received), self.real_inception) if self.inception else NA
        scores["per_image"] = {name: [float(v) for v in values] for name, values in per_image.items()}
        return scores

    def score_real(self) -> dict[str, Any]:
        ious, accuracies, pooled = segmentation_scores(self.real_labels, self.labels, self.info.num_classes,
                                                       self.info.ignore_index)
        return {
            "miou": summarize(ious), "pixel_accuracy": summarize(accuracies),
            "pooled_miou": float(pooled_miou(pooled, self.info.ignore_index)),
            "per_image": {"miou": ious.tolist(), "pixel_accuracy": accuracies.tolist()},
            "note": "the original image itself: image metrics are trivial (SSIM 1, PSNR inf, distances 0)",
        }

    def bits(self) -> dict[str, Any]:
        """Bits and channel uses per image of every transmission, at the evaluated resolution."""
        plans = self.digital_plans()
        per_image = {
            "present_classes": [len(e.header.present_class_ids) for e in self.encoded],
            "ours_payload_bits": [e.header.payload_bits for e in self.encoded],
            "ours_channel_uses": [self.semantic_uses(i) for i in range(len(self.images))],
            "analog_channel_uses": [math.ceil(image.size / 2) for image in self.images],
            "raw_rgb_bits": [image.size * 8 for image in self.images],
            "jpeg_q75_bits": [len(jpeg_encode(image, 75)) * 8 for image in self.images],
            "label_map_png_bits": [len(cv2.imencode(".png", labels.astype(np.uint8),
                                                    [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]) * 8 for labels in self.map_labels],
            "digital_jpeg_quality": [p.jpeg_quality for p in plans],
            "digital_mcs": [p.mcs.name for p in plans],
            "digital_jpeg_bits": [p.jpeg_bits for p in plans],
            "digital_coded_bits": [p.coded_bits for p in plans],
            "digital_channel_uses": [p.channel_uses for p in plans],
            "digital_over_budget": [p.over_budget for p in plans],
        }
        ratio = np.asarray(per_image["ours_payload_bits"], float) / np.asarray(per_image["jpeg_q75_bits"], float)
        per_image["ours_over_jpeg_q75"] = ratio.tolist()
        for name in ("ours", "analog", "digital"):
            uses = np.asarray(per_image[f"{name}_channel_uses"], float)
            per_image[f"{name}_bandwidth_ratio"] = (uses / self.source_values).tolist()
        summary = {k: summarize(v) for k, v in per_image.items() if k not in ("digital_mcs", "digital_over_budget")}
        summary["digital_over_budget"] = int(sum(per_image["digital_over_budget"]))
        summary["digital_mcs_counts"] = {name: per_image["digital_mcs"].count(name) for name in sorted(set(per_image["digital_mcs"]))}
        return {"summary": summary, "per_image": per_image}


    def condition_statistics(self, definitions: list[SnrDefinition], snrs_db: list[float]) -> dict[str, Any]:
        """The receiver's present-class maps where the sent map is 0 and where it is 1, raw and after
        FDS: mean and standard deviation over all those pixels of all images, on the channel
        realisations the methods see. This is how each model's input differs from a clean map."""
        out: dict[str, Any] = {}
        for definition in definitions:
            per_snr: dict[str, Any] = {}
            for snr_db in snrs_db:
                sums = {key: np.zeros(3) for key in ("raw_on_0", "raw_on_1", "fds_on_0", "fds_on_1")}
                for i, encoded in enumerate(self.encoded):
                    _, views = self.receive(i, definition, snr_db)
                    ids = list(encoded.header.present_class_ids)
                    sent = self.map_labels[i][None] == np.asarray(ids)[:, None, None]
                    for name, maps in (("raw", views.noisy_maps[ids]), ("fds", views.fds_maps[ids])):
                        for bit, mask in (("0", ~sent), ("1", sent)):
                            values = maps[mask].astype(np.float64)
                            sums[f"{name}_on_{bit}"] += (values.size, values.sum(), np.square(values).sum())
                per_snr[snr_key(snr_db)] = {
                    key: {"mean": float(total / count), "std": math.sqrt(max(squares / count - (total / count) ** 2, 0.0))}
                    for key, (count, total, squares) in sums.items()
                }
            out[definition.value] = per_snr
        return out


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(config: EvaluationConfig, command: str) -> dict[str, Any]:
    """Every configuration of `config`, scored; `command` is recorded as what produced them."""
    started = time.monotonic()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    ev = Evaluation(config)
    _log(f"evaluating {len(ev.indices)} of {ev.split_size} {config.split} images at {ev.size[0]}x{ev.size[1]} "
         f"(maps {ev.map_size[0]}x{ev.map_size[1]}; generated images by {config.upscaler or 'bicubic'})")
    snrs = sorted(set(config.snrs))
    grid_position = min(max(config.grid_image, 0), len(ev.indices) - 1)
    methods_info: dict[str, Any] = {}
    for name in config.methods:
        method = METHODS[name]
        status = "ok"
        if method.model and method.model in ev.unavailable:
            status = f"not run: {ev.unavailable[method.model]}"
        methods_info[name] = {"label": method.label, "kind": method.kind, "status": status, "fds": method.fds,
                              "noisy_training": method.noisy_training, "definitions": []}
    results: dict[str, Any] = {}
    grid: dict[str, Any] = {"scene": ev.names[grid_position], "original": ev.images[grid_position],
                            "labels": ev.map_labels[grid_position], "segmented": ev.real_labels[grid_position],
                            "images": {}}
    timings: dict[str, float] = {}
    cache = ConfigCache(None if config.cache_dir is None else Path(config.cache_dir), {
        "split": config.split, "data_root": str(ev.data_root.resolve()), "names": ev.names, "indices": ev.indices,
        "size": list(ev.size), "seed": config.seed, "sampler": config.sampler, "steps": config.steps,
        "guidance": config.guidance, "ldpc_iterations": config.ldpc_iterations,
        "segmenter": file_stamp(config.segmenter), "lpips": file_stamp(config.lpips),
        "inception": file_stamp(config.inception),
        # Only where the map size differs from the evaluated one: caches of runs before the option still match.
        **({"map_size": list(ev.map_size)} if ev.map_size != ev.size else {}),
    })
    for definition in config.definitions:
        per_definition: dict[str, Any] = {}
        for name in config.methods:
            method = METHODS[name]
            if methods_info[name]["status"] != "ok":
                continue
            if name in ABLATIONS and definition not in config.ablation_definitions:
                continue
            methods_info[name]["definitions"].append(definition.value)
            if method.kind == "real":
                per_definition[name] = {"no channel": ev.score_real()}
                continue
            per_snr: dict[str, Any] = {}
            for snr_db in sorted(set(config.ablation_snrs)) if name in ABLATIONS else snrs:
                key = {"method": name, "definition": definition.value, "snr": snr_key(snr_db),
                       "model": file_stamp(config.model_path(method.model)) if method.model else None}
                if method.kind == "semantic" and config.upscaler:  # the baselines' images do not depend on it
                    key["upscaler"] = file_stamp(config.upscaler)
                if method.fds and config.fds_variant is not FdsVariant.PAPER:  # runs before the option used eq. 2
                    key["fds_variant"] = config.fds_variant.value
                cached = cache.load(key)
                if cached is not None:
                    scores, grid_image = cached
                    _log(f"[{definition.value}] {name} @ {snr_db:g} dB: from the cache")
                else:
                    scores, grid_image = _configuration(ev, method, definition, snr_db, grid_position)
                    cache.save(key, scores, grid_image)
                per_snr[snr_key(snr_db)] = with_bandwidth_ratio(scores, ev.source_values)
                timings[name] = timings.get(name, 0.0) + scores["seconds_per_image"] * len(ev.indices)
                grid["images"].setdefault(definition.value, {}).setdefault(name, {})[snr_key(snr_db)] = grid_image
            per_definition[name] = per_snr
        results[definition.value] = per_definition
    cliff = _cliff(ev, config, snrs) if methods_info.get("digital") and config.cliff_snrs else None
    wall = time.monotonic() - started
    return {
        "settings": _settings(ev, config, snrs, command, wall, timings) | {"configurations_from_cache": cache.hits},
        "snr_definitions": DEFINITION_TEXT,
        "methods": methods_info,
        "results": results,
        "bits": ev.bits(),
        "conditions": ev.condition_statistics(
            [d for d in config.definitions if d in config.ablation_definitions], sorted(set(config.ablation_snrs)))
        if any(METHODS[name].kind == "semantic" for name in config.methods) else None,
        "digital_cliff": cliff,
        "grid": grid,
    }


def _configuration(ev: Evaluation, method: Method, definition: SnrDefinition, snr_db: float,
                   grid_position: int) -> tuple[dict[str, Any], np.ndarray]:
    """Transmit every image once at one SNR and score what arrives; also the grid scene's image."""
    started = time.monotonic()
    if method.kind == "semantic":
        received, extra = ev.semantic(method, definition, snr_db)
    elif method.kind == "analog":
        received, extra = ev.analog(definition, snr_db)
    else:
        received, extra = ev.digital(definition, snr_db)
    seconds = time.monotonic() - started
    scores = ev.score(received)
    for key in ("channel_uses", "measured_snr_db", "condition_pixel_accuracy"):
        if key in extra:
            scores[key] = summarize(extra.pop(key))
    scores.update(extra)
    scores["seconds_per_image"] = seconds / len(received)
    _log(f"[{definition.value}] {method.name} @ {snr_db:g} dB: mIoU {scores['miou']['mean']:.3f}, "
         f"{scores['seconds_per_image']:.2f} s/image")
    return scores, received[grid_position]


def with_bandwidth_ratio(scores: dict[str, Any], source_values: int) -> dict[str, Any]:
    """`scores` with the bandwidth ratio beside its channel uses (complex uses per source value).

    Derived here rather than stored, so configurations cached before the ratio existed get it too.
    """
    uses = scores.get("channel_uses")
    if not isinstance(uses, dict):
        return scores
    ratio = {key: value / source_values if key in ("mean", "std") else value for key, value in uses.items()}
    return scores | {"bandwidth_ratio": ratio}


def _cliff(ev: Evaluation, config: EvaluationConfig, snrs: list[float]) -> dict[str, Any] | None:
    """Decode-failure rate of the digital link at extra SNRs, on a subset (no generation involved)."""
    extra_snrs = sorted(set(config.cliff_snrs) - set(snrs))
    if not extra_snrs:
        return None
    positions = evenly_spread(len(ev.images), config.cliff_images)
    out: dict[str, Any] = {"images": len(positions), "curves": {}}
    for definition in config.definitions:
        curve = {}
        for snr_db in extra_snrs:
            _, extra = ev.digital(definition, snr_db, positions)
            curve[snr_key(snr_db)] = extra["decode_failures"] / len(positions)
        out["curves"][definition.value] = curve
        _log(f"[{definition.value}] digital cliff: {curve}")
    return out


def _settings(ev: Evaluation, config: EvaluationConfig, snrs: list[float], command: str, wall: float,
              timings: dict[str, float]) -> dict[str, Any]:
    models = {}
    for key in ("model", "ablation_model"):
        generator = ev.generator(key) if key in ev.generators else None
        models[key] = {"path": _relative(config.model_path(key)), "info": None, "noisy_training": None,
                       "unavailable": ev.unavailable.get(key)}
        if generator is not None:
            models[key]["info"] = generator.info.as_dict() | {"checkpoint": _relative(generator.info.checkpoint)}
            meta = load_checkpoint(config.model_path(key), CHECKPOINT_KIND)["meta"]
            models[key]["noisy_training"] = meta.get("noisy_training")
    segmenter = ev.probe.segmenter
    return {
        "command": command,
        "wall_time_s": round(wall, 1),
        "seconds_by_method": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
        "device": str(ev.device),
        "dataset": "CamVid", "split": config.split, "data_root": _relative(ev.data_root),
        "images": len(ev.indices), "split_images": ev.split_size, "image_names": ev.names,
        "evaluated_resolution": list(ev.size), "map_size": list(ev.map_size),
        "generator_resolution": {k: [g.info.image_height, g.info.image_width] for k, g in ev.generators.items()},
        "upscaler": None if ev.upscaler is None else {
            "path": _relative(config.upscaler), "name": ev.upscaler.model_name,
            "output_resolution": [ev.upscaler.config.out_height, ev.upscaler.config.out_width]},
        "snrs_db": snrs, "ablation_snrs_db": sorted(set(config.ablation_snrs)),
        "definitions": [d.value for d in config.definitions],
        "ablation_definitions": [d.value for d in config.ablation_definitions],
        "sampler": config.sampler, "steps": config.steps, "guidance": config.guidance, "seed": config.seed,
        "fds_variant": config.fds_variant.value, "batch_size": config.batch_size, "ldpc_iterations": config.ldpc_iterations,
        "models": models,
        "segmenter": {"path": _relative(config.segmenter), "trained": segmenter.trained,
                      "input_size": [segmenter.config.input_height, segmenter.config.input_width],
                      "val_miou": segmenter.meta.get("val_miou_void_excluded")},
        "lpips": _relative(config.lpips) or NA, "inception": _relative(config.inception) or NA,
        "num_classes": ev.info.num_classes, "ignore_index": ev.info.ignore_index,
    }


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    config = config_from_args(parser, args, EvaluationConfig)
    notes = load_notes(Path(args.notes)) if args.notes else None  # a bad file fails before hours of work
    command = recorded_command("evaluation.evaluate", argv)
    results = run(config, command)
    paths = report.write_all(results, Path(args.out), Path(args.report) if args.report else None, notes)
    _log(f"wrote {', '.join(str(p) for p in paths)} in {results['settings']['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
