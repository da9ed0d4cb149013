"""The model host: the generators a receiver serves, and what turns a sampled image into PNGs.

It loads the checkpoint and the condition adapters beside it (one generator per downsample
factor, shared/semantic/diffusion/adapters.py), applies the inference settings (channels_last,
torch.compile, batch buckets and CUDA graphs), prepares a job's condition (decoding and FDS,
shared.semantic.link), and after sampling runs the image stages (`ImageStage`, today the
upscaler of shared/semantic/upscaler.py: each takes the image so far and the received FDS maps)
and encodes the results. It knows no queue and no protocol: the schedulers call it.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from gesco.options import Link
from receiver_service import views
from receiver_service.jobs import Job, JobResult, LinkDecodeError, NotReadyError, elapsed_ms
from receiver_service.settings import ReceiverSettings
from shared.limits import LimitError, SamplingOptions
from shared.semantic import codec, ldpc, link
from shared.semantic.diffusion.adapters import adapted_generators
from shared.semantic.diffusion.distilled import load_students
from shared.semantic.diffusion.generator import SemanticImageGenerator, to_uint8_images
from shared.semantic.diffusion.samplers import DistilledSampler, resolve, teacher_options
from shared.semantic.digital_link import decode_labels
from shared.semantic.links import MAP_ENCODER_PATTERN
from shared.semantic.map_jscc import MapJscc, load_map_jscc
from shared.semantic.upscaler import ImageStage, Upscaler
from shared.wire.imageio import encode_png, resize_image

log = logging.getLogger("receiver_service.model_host")


def forward_buckets(settings: ReceiverSettings, device: torch.device) -> tuple[list[int], bool]:
    """The batch buckets and whether to capture them as CUDA graphs, for a model on `device`.

    CUDA graphs are for CUDA only: elsewhere the setting is ignored (with a warning), so a GPU
    preset still starts on a CPU. Graphs without buckets of their own get one per power of two up
    to a full guided batch (2 x max_batch_size rows)."""
    cuda_graphs = settings.cuda_graphs and device.type == "cuda"
    if settings.cuda_graphs and not cuda_graphs:
        log.warning("cuda_graphs needs a CUDA device: off", extra={"device": str(device)})
    buckets = list(settings.batch_buckets)
    if cuda_graphs and not buckets:
        buckets = [2**k for k in range((2 * settings.max_batch_size - 1).bit_length() + 1)]
    return buckets, cuda_graphs


def prepare_job(job: Job) -> tuple[link.ReceivedViews, np.ndarray]:
    """The job's received maps (noisy and FDS-denoised) and the condition its generator gets, at its
    resolution: FDS maps only when the job asks. ValueError when the maps do not decode
    (LinkDecodeError when the digital link's CRC says the label map was lost)."""
    info = job.generator.info
    if job.framing.link is Link.LEARNED:
        # The decoder's class probabilities are the condition: soft maps FDS was not made for.
        device = next(job.map_decoder.parameters()).device
        probabilities = job.map_decoder.condition(torch.from_numpy(job.symbols)[None].to(device))[0].cpu().numpy()
        received = link.ReceivedViews(noisy_maps=probabilities, fds_maps=probabilities)
        return received, link.resize_maps(probabilities, (info.image_height, info.image_width))
    symbols, semantic = job.symbols, job.semantic
    if job.framing.link is Link.DIGITAL:
        symbols, semantic = _decode_digital(job)
    received = link.received_views(symbols, semantic, use_fds=True)  # the debug views always show FDS
    maps = received.fds_maps if job.use_fds else received.noisy_maps
    return received, link.resize_maps(maps, (info.image_height, info.image_width))


def _decode_digital(job: Job) -> tuple[np.ndarray, codec.SemanticHeader]:
    """Demap, LDPC-decode and CRC-check the digital link's symbols, decode the label map and code it as
    the maps link's one-hot maps (what the generator is conditioned on, as the evaluation scores it)."""
    framing, semantic = job.framing.digital, job.semantic
    assert framing is not None and job.noise_std is not None
    decoded = ldpc.decode_symbols(job.symbols, framing.layout, framing.payload_bytes, job.noise_std)
    if decoded.data is None:
        raise LinkDecodeError(
            f"crc_failed: the digital link's CRC failed ({decoded.failed_blocks} of {decoded.num_blocks} LDPC code "
            f"blocks, {framing.scheme}): the label map was lost and no image was generated")
    labels = decode_labels(decoded.data, (semantic.map_height, semantic.map_width))
    if labels is None or labels.max(initial=0) >= semantic.num_classes:
        raise LinkDecodeError("label_map_undecodable: the digital link's payload passed its CRC but is not a "
                              f"{semantic.map_height}x{semantic.map_width} label map; no image was generated")
    encoded = codec.encode_label_map(labels, codec.CodecConfig(num_classes=semantic.num_classes))
    return encoded.symbols, encoded.header


def encode_result(result: JobResult, size: tuple[int, int]) -> None:
    """Encode a sampled result's image (resized to `size`) and received views as its PNGs."""
    assert result.image is not None and result.received is not None
    started = time.perf_counter()
    received = result.received
    result.artifacts = {
        "image": encode_png(resize_image(result.image, *size)),
        "maps_received": views.maps_png(received.noisy_maps),
        "maps_fds": views.maps_png(received.fds_maps),
        "fds_labels": views.labels_png(received.fds_maps),
        "received_labels": views.labels_png(received.noisy_maps),
    }
    result.timings_ms["png"] = elapsed_ms(started)
    result.image = result.received = None


class ModelHost:
    """Loads the generators (in a thread: `load` blocks) and serves them to the schedulers."""

    def __init__(self, settings: ReceiverSettings) -> None:
        self.settings = settings
        # The stage after sampling, loaded with the generator when the settings ask for it.
        self.upscaler: Upscaler | None = None
        self.generator: SemanticImageGenerator | None = None
        # The base generator with a condition adapter, by downsample factor (loaded with it).
        self.adapted: dict[int, SemanticImageGenerator] = {}
        # The distilled students by downsample factor (loaded with the base), which the distilled
        # sampler runs on: each learned the base's trajectories (with that factor's adapter).
        self.students: dict[int, SemanticImageGenerator] = {}
        # The learned link's map decoders by name, for the generator's classes and resolution.
        self.map_decoders: dict[str, MapJscc] = {}
        self.load_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.generator is not None

    def load(self) -> bool:
        """Load the generator and its adapters; False (with `load_error` set) when that fails."""
        settings = self.settings
        try:
            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            checkpoint = settings.checkpoint
            generator = SemanticImageGenerator.load(str(checkpoint) if checkpoint.is_file() else None,
                                                    device=settings.device)
            try:
                resolve(SamplingOptions(sampler=settings.default_sampler, steps=settings.default_steps, guidance=0.0),
                        generator.diffusion.num_timesteps)
            except LimitError as error:
                raise ValueError(f"the default {error}") from None
            adapted = adapted_generators(generator) if settings.adapters else {}
            students = load_students(generator, adapted) if settings.distilled else {}
            buckets, cuda_graphs = [], False
            if settings.batch_buckets or settings.cuda_graphs:
                buckets, cuda_graphs = forward_buckets(settings, generator.device)
            for each in (generator, *adapted.values(), *students.values()):
                self._prepare(each, buckets, cuda_graphs)
            upscaler = self._load_upscaler(generator)
            map_decoders = self._load_map_decoders(generator)
        except Exception as error:  # noqa: BLE001 - reported by /readyz, logged here
            self.load_error = f"{type(error).__name__}: {error}"
            log.exception("loading the model failed")
            return False
        if not checkpoint.is_file():
            log.warning("checkpoint not found: serving an untrained model", extra={"checkpoint": str(checkpoint)})
        log.info("model loaded", extra={"model": generator.info.as_dict(), "batching": settings.batching,
                                        "adapters": {f: g.info.adapter for f, g in adapted.items()},
                                        "students": {f: s.info.checkpoint for f, s in students.items()},
                                        "buckets": list(buckets), "cuda_graphs": cuda_graphs,
                                        "upscaler": upscaler.model_name if upscaler else None})
        self.adapted = adapted
        self.students = students
        self.upscaler = upscaler
        self.map_decoders = map_decoders
        self.generator = generator
        return True

    def _load_map_decoders(self, generator: SemanticImageGenerator) -> dict[str, MapJscc]:
        """The map encoders' decoders in map_encoders_dir that feed this generator (others are skipped,
        with a warning): the learned link can only name one of these."""
        decoders = {}
        info = generator.info
        for path in sorted(self.settings.map_encoders_dir.glob(MAP_ENCODER_PATTERN)):
            model, _ = load_map_jscc(path)
            config = model.config
            if (config.num_classes, config.out_height, config.out_width) != (info.num_classes, info.image_height,
                                                                              info.image_width):
                log.warning("map encoder skipped: it decodes for another generator", extra={"map_encoder": str(path)})
                continue
            decoders[path.stem] = model.to(generator.device)
        return decoders

    def map_decoder(self, name: str) -> MapJscc:
        """The learned link's decoder called `name`; KeyError when this receiver has none of that name."""
        return self.map_decoders[name]

    def _load_upscaler(self, generator: SemanticImageGenerator) -> Upscaler | None:
        """The upscaler when the `upscale` setting asks for it and its checkpoint is there; a file
        for another generator's images or classes fails the load, naming the file."""
        path = self.settings.upscaler
        if not self.settings.upscale:
            return None
        if not path.is_file():
            log.warning("upscaler checkpoint not found: images stay at the generator's resolution",
                        extra={"upscaler": str(path)})
            return None
        upscaler = Upscaler.from_checkpoint(path, generator.device)
        info, config = generator.info, upscaler.config
        if (config.in_height, config.in_width, config.num_classes) != (info.image_height, info.image_width,
                                                                        info.num_classes):
            raise ValueError(f"{path} upscales {config.in_height}x{config.in_width} images of {config.num_classes} "
                             f"classes; the generator makes {info.image_height}x{info.image_width} of {info.num_classes}")
        return upscaler

    def _prepare(self, generator: SemanticImageGenerator, buckets: list[int], cuda_graphs: bool) -> None:
        """Apply the settings' inference options to one generator (the base or an adapted one)."""
        if self.settings.channels_last:
            generator.use_channels_last()
        if self.settings.torch_compile and buckets:
            generator.compile(warm_up_batches=())  # warmed up at each bucket below instead
        elif self.settings.torch_compile:
            generator.compile()
        elif self.settings.trace_network and generator.info.quantization is None:
            generator.trace()
        if buckets:
            generator.use_buckets(buckets, cuda_graphs)
        generator.noise_on_device = self.settings.noise_on_device

    def base(self) -> SemanticImageGenerator:
        """The base generator; NotReadyError until it has loaded."""
        if self.generator is None:
            raise NotReadyError(self.load_error or "the model is still loading")
        return self.generator

    def generator_for(self, downsample_factor: int, sampler: str = "") -> SemanticImageGenerator:
        """The generator for maps sent at `downsample_factor`: its condition adapter, else the base;
        for a job `plan` gave the distilled sampler (one rebuilt from its stored inputs), that
        factor's student. ValueError when this process has no such student."""
        if sampler == DistilledSampler.name:
            student = self.students.get(downsample_factor)
            if student is None:
                raise ValueError(f"the job runs on the distilled student for downsample factor {downsample_factor}, "
                                 "which this receiver has not loaded")
            return student
        return self.adapted.get(downsample_factor, self.base())

    def plan(self, options: SamplingOptions, downsample_factor: int) -> tuple[SemanticImageGenerator, SamplingOptions]:
        """The generator a job runs on and its sampling, resolved; LimitError naming the field.

        The distilled sampler runs on the student of the job's downsample factor when there is one
        and the job asks for the guidance it learned. Otherwise (no student for that factor, another
        guidance) the job runs the trajectory a student imitates, DDIM over 10 steps on the base or
        its adapter (a job that named no sampler: DDIM at the steps it asked for), and its status says
        so: its sampler, steps and model are those that ran."""
        base = self.base()
        resolved = resolve(options, base.diffusion.num_timesteps)  # the sampler's own limits, for every route
        if resolved.sampler == DistilledSampler.name:
            student = self.students.get(downsample_factor)
            if student is not None and resolved.guidance == student.info.distilled_guidance:
                return student, student.resolve(resolved)
            resolved = teacher_options(options)
        generator = self.generator_for(downsample_factor)
        return generator, generator.resolve(resolved)

    def output_size(self) -> tuple[int, int]:
        """(height, width) of the stored image: the settings, 0 meaning the last stage's resolution
        (the upscaler's, else the model's)."""
        info = self.base().info
        height, width = info.image_height, info.image_width
        if self.upscaler is not None:
            height, width = self.upscaler.config.out_height, self.upscaler.config.out_width
        return (self.settings.output_height or height, self.settings.output_width or width)

    @property
    def stages(self) -> tuple[ImageStage, ...]:
        """The stages after sampling, in order."""
        return (self.upscaler,) if self.upscaler is not None else ()

    def stage_records(self, generator: SemanticImageGenerator, timings_ms: dict[str, float]) -> list[dict[str, Any]]:
        """What made a finished image, in order: the sampler's generator, then each stage after it,
        with its model and milliseconds (the status's `stages`)."""
        records = [{"name": "sample", "model": generator.info.name, "ms": timings_ms.get("sample", 0.0)}]
        records += [{"name": stage.name, "model": stage.model_name, "ms": timings_ms.get(stage.name, 0.0)}
                    for stage in self.stages]
        return records

    def finish_image(self, result: JobResult) -> None:
        """Run the stages after sampling on a sampled result (the image with the received FDS maps),
        then encode its PNGs."""
        assert result.image is not None and result.received is not None
        if self.stages:
            image = torch.from_numpy(result.image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            maps = torch.from_numpy(result.received.fds_maps)[None].float()
            for stage in self.stages:
                started = time.perf_counter()
                image = stage(image, maps)
                result.timings_ms[stage.name] = elapsed_ms(started)
            result.image = to_uint8_images(image)[0]
        encode_result(result, self.output_size())
