"""The rate-quality frontier: mIoU against bandwidth ratio and SNR for every representation.

    python -m evaluation.rate_quality --split val --limit 16 --snrs 1,5,10,20 --sampler ddim --steps 10 \\
        --threads 1 --out docs/rate-quality --report docs/rate-quality.md \\
        --table models/rate-quality-table.json --notes docs/rate-quality-notes.toml

Every representation goes through the same channel simulator (`shared.semantic.channels`) at
several rates, and every received scene is scored by the project's segmenter (mIoU, void
excluded) against the ground-truth label map, at the evaluated resolution: --image-height x
--image-width, by default the sender's map size (--map-height x --map-width, 96x128). As in
`evaluation.evaluate`, the label map that is sent is the ground truth resized to the map size
(nearest neighbour), and the image baselines send the image at the evaluated size, whose values
are the bandwidth ratio's denominator. A generated 48x64 scene reaches the evaluated size through
the receiver's upscaling stage (--upscaler, `shared.semantic.upscaler`), given the maps that
representation's receiver has (ours: the received FDS maps at the map size, as the receiver's
views; separated: the decoded label map's at the size it was sent; learned: the decoder's class
probabilities), else bicubically:

* `ours`: the present-class maps as analog symbols, area-downsampled by each of --factors, then
  the receiver's pipeline (`shared.semantic.link`: inverse codec, FDS) and the
  noisy-trained generator, which conditions on 48x64 whatever arrives; `ours_jpeg` the same with
  JPEG-compressed maps. As the services serve them: at a factor with a condition adapter beside
  --model (`shared.semantic.diffusion.adapters`, <stem>.f<factor>.adapter.pt) through that adapter,
  else through the base generator. What fine-tuning bought: the adapted factors are also scored
  with the base generator alone (`without_adapters` in the results); --no-adapters turns them off.
* `separated`: the label map coded losslessly and sent over 5G LDPC + QAM (`evaluation.separated`),
  decoded, then the same generator; a lost transmission is a mid-grey image. The scheme is adapted
  to the SNR; `separated_fixed` keeps the scheme for --design-snr at every SNR (the cliff).
* `digital` / `digital_fixed`: the JPEG image the same way; `analog`: the pixels, resized or
  repeated to fit (`evaluation.baselines.analog_transmit_at_ratio`).
* `learned`: the learned map encoder (`shared.semantic.map_jscc`) of each --learned checkpoint.

The budget-driven representations run at each of --ratios (complex channel uses per source value);
the fixed-scheme ones at --fixed-ratios over --snrs and --cliff-snrs. Channel and sampling seeds
depend on --seed and the image only, as in `evaluation.evaluate`, whose data and networks this
reuses. Finished configurations are cached (--cache-dir) under a key that names every file they
depend on (an adapter and the upscaling stage too) and the map size, so an interrupted run
resumes. Writes results.json and the figures under --out, the report (--report) and the sender's
table (--table, `evaluation.rate_quality_report`).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evaluation import rate_quality_report
from evaluation.baselines import analog_transmit_at_ratio
from evaluation.cache import ConfigCache, file_stamp
from evaluation.checks import load_notes
from evaluation.evaluate import (
    GREY,
    add_resolution_arguments,
    Evaluation,
    EvaluationConfig,
    _floats,
    _log,
    _names,
    _relative,
    config_from_args,
    recorded_command,
    snr_key,
    with_bandwidth_ratio,
)
from evaluation.image_quality import summarize
from evaluation.separated import SchemeProbe, decode_jpeg_option, jpeg_options
from gesco.options import DEFAULT_GUIDANCE, DISTILLATION_TEACHER
from shared.semantic import rate_quality
from shared.semantic.channels import ChannelConfig, SnrDefinition, apply_channel
from shared.semantic.codec import CodecConfig, Compression, encode_label_map, one_hot
from shared.semantic.diffusion.adapters import adapted_generators
from shared.semantic.digital_link import (
    MCS_TABLE,
    Mcs,
    SourceOption,
    decode_labels,
    fit,
    label_options,
    majority_downsample,
)
from shared.semantic.ldpc import transmit_bytes
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.semantic.fds import DEFAULT_FDS_VARIANT
from shared.semantic.link import received_views, resize_maps
from shared.semantic.map_jscc import load_map_jscc
from shared.wire.imageio import resize_image

DEFAULT_RATIOS = "2,1,1/2,1/4,1/8,1/12,1/16,1/24,1/32,1/48,1/64,1/128"


@dataclass(frozen=True)
class Representation:
    """One row family of the comparison. `sendable`: the services send it, so the budget may pick it."""

    name: str
    label: str
    kind: str  # "semantic" (a generated scene) or "image" (the image itself)
    sendable: bool = False


REPRESENTATIONS: dict[str, Representation] = {
    r.name: r
    for r in (
        Representation("ours", "ours: present-class maps as analog symbols, area-downsampled", "semantic", True),
        Representation("ours_jpeg", "ours with JPEG-compressed maps", "semantic", True),
        Representation("separated", "separated semantic: label map (LZMA) + 5G LDPC + QAM, scheme for the SNR",
                       "semantic", True),
        Representation("separated_fixed", "separated semantic, scheme fixed for the design SNR", "semantic"),
        Representation("learned", "learned map encoder (deep JSCC over the one-hot maps)", "semantic", True),
        Representation("digital", "JPEG image + 5G LDPC + QAM, scheme for the SNR", "image"),
        Representation("digital_fixed", "JPEG image + 5G LDPC + QAM, scheme fixed for the design SNR", "image"),
        Representation("analog", "analog image: pixels as symbols, resized or repeated to fit", "image"),
    )
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _ratios(text: str) -> tuple[float, ...]:
    return tuple(rate_quality.parse_ratio(v) for v in text.split(",") if v.strip())


@dataclass(frozen=True)
class RateQualityConfig:
    """Everything the numbers depend on, with the command line's defaults."""

    split: str = "val"
    data_root: str | None = None
    limit: int = 16
    snrs: tuple[float, ...] = (1.0, 5.0, 10.0, 20.0)
    definition: SnrDefinition = SnrDefinition.AVERAGE_POWER
    representations: tuple[str, ...] = tuple(REPRESENTATIONS)
    factors: tuple[int, ...] = (1, 2, 4, 8, 16)
    jpeg_factors: tuple[int, ...] = (1, 2, 4, 8)
    map_jpeg_quality: int = 75
    ratios: tuple[float, ...] = _ratios(DEFAULT_RATIOS)
    fixed_ratios: tuple[float, ...] = (1 / 4, 1 / 12, 1 / 48)
    design_snr: float = 10.0
    cliff_snrs: tuple[float, ...] = (-2.0, 0.0, 2.0, 4.0, 6.0, 8.0)
    learned: tuple[str, ...] = ("models/map-jscc-1-24.pt", "models/map-jscc-1-48.pt")
    model: str = "models/diffusion-camvid.pt"
    adapters: bool = True  # ours through the condition adapter of its factor beside `model`, where one exists
    segmenter: str = "models/segmenter-camvid.pt"
    # The base generator's own sampling (DDIM 10), which the reports score; the distilled student
    # has its report (scripts/models/distillation_report.py).
    sampler: str = DISTILLATION_TEACHER[0]
    steps: int = DISTILLATION_TEACHER[1]
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    map_height: int = 96
    map_width: int = 128
    # The evaluated resolution (0: the map size's) and the receiver's upscaling stage ("": none,
    # bicubic), as in `evaluation.evaluate`.
    image_height: int = EvaluationConfig.image_height
    image_width: int = EvaluationConfig.image_width
    upscaler: str = EvaluationConfig.upscaler
    batch_size: int = 8
    ldpc_iterations: int = 20
    device: str = "auto"
    threads: int = 0
    cache_dir: str | None = "runs/rate-quality-cache"

    def __post_init__(self) -> None:
        object.__setattr__(self, "definition", SnrDefinition(self.definition))
        unknown = sorted(set(self.representations) - set(REPRESENTATIONS))
        if unknown:
            raise ValueError(f"unknown representations {unknown}: choose from {list(REPRESENTATIONS)}")
        for name in ("snrs", "factors", "ratios"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty")
        if any(f < 1 for f in self.factors + self.jpeg_factors):
            raise ValueError("downsampling factors must be >= 1")
        self.evaluation_config()  # the sampling and SNR limits, checked before any data loads

    def evaluation_config(self) -> EvaluationConfig:
        """The evaluation whose data, segmenter and generator this run uses."""
        return EvaluationConfig(
            split=self.split, data_root=self.data_root, snrs=self.snrs, methods=("ours",),
            definitions=(self.definition,), ablation_definitions=(), model=self.model, segmenter=self.segmenter,
            sampler=self.sampler, steps=self.steps, guidance=self.guidance, seed=self.seed, limit=self.limit,
            map_height=self.map_height, map_width=self.map_width, image_height=self.image_height,
            image_width=self.image_width, upscaler=self.upscaler, batch_size=self.batch_size,
            ldpc_iterations=self.ldpc_iterations, device=self.device, threads=self.threads, cache_dir=None)


def _parser() -> argparse.ArgumentParser:
    d = RateQualityConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default=d.split, choices=("train", "val", "test"))
    p.add_argument("--data-root", default=d.data_root)
    p.add_argument("--limit", type=int, default=d.limit, help="images evenly spread over the split (0: all)")
    p.add_argument("--snrs", type=_floats, default=d.snrs, help="comma-separated SNRs in dB")
    p.add_argument("--definition", default=d.definition.value, choices=[x.value for x in SnrDefinition],
                   help="the SNR definition (default: the average power of the JSCC literature)")
    p.add_argument("--representations", type=_names, default=d.representations,
                   help=f"comma-separated, from {','.join(REPRESENTATIONS)}")
    p.add_argument("--factors", type=_ints, default=d.factors, help="ours' downsampling factors")
    p.add_argument("--jpeg-factors", type=_ints, default=d.jpeg_factors, help="factors of ours with JPEG maps")
    p.add_argument("--map-jpeg-quality", type=int, default=d.map_jpeg_quality)
    p.add_argument("--ratios", type=_ratios, default=d.ratios,
                   help="bandwidth ratios of the budget-driven representations (fractions allowed)")
    p.add_argument("--fixed-ratios", type=_ratios, default=d.fixed_ratios,
                   help="ratios of the fixed-scheme links and of the mIoU-against-SNR plots")
    p.add_argument("--design-snr", type=float, default=d.design_snr, help="the SNR the fixed schemes are chosen for")
    p.add_argument("--cliff-snrs", type=_floats, default=d.cliff_snrs,
                   help="extra SNRs of the fixed-scheme links (no generation for lost images)")
    p.add_argument("--learned", type=_names, default=d.learned, help="learned map encoder checkpoints")
    p.add_argument("--model", default=d.model)
    p.add_argument("--no-adapters", dest="adapters", action="store_false",
                   help="ours through the base generator at every factor, ignoring the condition adapters beside "
                        "--model")
    p.add_argument("--segmenter", default=d.segmenter)
    p.add_argument("--sampler", default=d.sampler)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--seed", type=int, default=d.seed)
    add_resolution_arguments(p, d, "every generated scene with the maps its receiver has")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--ldpc-iterations", type=int, default=d.ldpc_iterations)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default)")
    p.add_argument("--cache-dir", default=d.cache_dir)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", default="docs/rate-quality")
    p.add_argument("--report", default=None, help="write the Markdown report here instead of rate-quality.md under --out")
    p.add_argument("--table", default=None, help="write the sender's rate-quality table here (JSON)")
    p.add_argument("--notes", default=None, help="TOML with a summary and the explanation of each target check")
    return p


class RateQualityRun:
    """One run: the evaluation's data and networks, the cache and the representations' transmissions."""

    def __init__(self, config: RateQualityConfig) -> None:
        self.config = config
        self.ev = Evaluation(config.evaluation_config())
        self.generator = self.ev.generators.get("model")
        if self.generator is None:
            raise ValueError(f"the generator is needed: {self.ev.unavailable.get('model')}")
        self.adapted = adapted_generators(self.generator) if config.adapters else {}  # factor -> generator
        self.definition = config.definition
        self.num_classes = self.ev.info.num_classes
        self.height, self.width = self.ev.size  # evaluated: the images, the scores, the image baselines
        self.map_height, self.map_width = self.ev.map_size  # sent: the label map, ours' maps
        # What a generated scene depends on beyond its configuration: the upscaling stage, if any, and
        # the receiver's FDS (runs before it was named in the key used eq. 2 as published).
        self.stage = ({"upscaler": file_stamp(config.upscaler)} if config.upscaler else {}) | {
            "fds_variant": DEFAULT_FDS_VARIANT.value}
        self.probe = SchemeProbe(config.seed, max_iterations=config.ldpc_iterations)
        self.schemes: dict[str, str | None] = {}  # average-power SNR -> the scheme link adaptation picks
        # Two caches: what arrived (every image; it does not depend on the segmenter) and its scores.
        # A new segmenter then rescores without sending or generating anything again.
        directory = None if config.cache_dir is None else Path(config.cache_dir)
        received = {
            "kind": "rate-quality", "split": config.split, "data_root": str(self.ev.data_root.resolve()),
            "names": self.ev.names, "size": list(self.ev.size), "seed": config.seed, "sampler": config.sampler,
            "steps": config.steps, "guidance": config.guidance, "ldpc_iterations": config.ldpc_iterations,
            "model": file_stamp(config.model),
            # Only where the map size differs from the evaluated one: caches of runs before the option still match.
            **({"map_size": list(self.ev.map_size)} if self.ev.map_size != self.ev.size else {}),
        }
        self.received = ConfigCache(None if directory is None else directory / "received", received)
        self.cache = ConfigCache(None if directory is None else directory / "scores",
                                 received | {"segmenter": file_stamp(config.segmenter)})
        self.grid_position = 0
        self.grid: dict[str, Any] = {}  # representation -> rate -> SNR -> the grid scene as received
        self._label_options: list[list[SourceOption]] | None = None
        self._jpeg_options: list[list[SourceOption]] | None = None

    # --- shared steps ------------------------------------------------------------------------------
    def channel(self, snr_db: float) -> ChannelConfig:
        return ChannelConfig(snr_db=snr_db, snr_definition=self.definition)

    def seed(self, i: int, snr_db: float) -> int:
        return self.ev.channel_seed(i, self.definition, snr_db)

    def image_scale(self, i: int) -> float:
        """The paper's PSNR of the image transmissions refers to ours' maps of that image (as evaluate)."""
        return self.ev.encoded[i].header.scale

    def average_power_snr(self, i: int, snr_db: float) -> float:
        return rate_quality.average_power_snr_db(snr_db, self.definition.value, self.image_scale(i))

    def scheme(self, i: int, snr_db: float) -> Mcs | None:
        """The scheme link adaptation picks for image i at `snr_db` (`SchemeProbe`, cached per SNR)."""
        snr = round(self.average_power_snr(i, snr_db), 2)
        text = snr_key(snr)
        if text not in self.schemes:
            key = {"method": "scheme_probe", "definition": "average_power", "snr": text}
            cached = self.received.load(key)
            if cached is not None:
                self.schemes[text] = cached[0]["scheme"]
            else:
                probed = self.probe(snr)
                self.schemes[text] = None if probed is None else probed.name
                self.received.save(key, {"scheme": self.schemes[text]}, np.zeros(1))
        return next((m for m in MCS_TABLE if m.name == self.schemes[text]), None)

    def generate(self, conditions: list[np.ndarray], maps: list[np.ndarray],
                 generator: SemanticImageGenerator | None = None) -> np.ndarray:
        """Images at the evaluated size for one condition per image, sampled with each image's seed, by
        `generator` (an adapted one) or the base generator; then through the upscaling stage with
        `maps`, what the receiver gives it (one per image, at the size they arrived), where there is
        a stage; then resized to the evaluated size (bicubic when enlarging)."""
        generator = generator or self.generator
        outputs = []
        for start in range(0, len(conditions), self.config.batch_size):
            positions = range(start, min(start + self.config.batch_size, len(conditions)))
            batch = torch.from_numpy(np.stack([conditions[i] for i in positions]))
            generated = generator.generate(batch, self.ev.config.sampling, [self.ev.sampling_seed(i) for i in positions])
            generated = self.ev.upscale(generated, [maps[i] for i in positions])
            outputs.extend(resize_image(image, self.height, self.width) for image in generated)
        return np.stack(outputs)

    @property
    def out_size(self) -> tuple[int, int]:
        return self.generator.info.image_height, self.generator.info.image_width

    def configuration(self, representation: str, rate: str, snr_db: float, transmit: Callable[[], Any],
                      stamp: Any = None, grid: bool = True) -> dict[str, Any]:
        """Scores of one (representation, rate, SNR): from the cache, or scored from the cached received
        images, or transmitted, scored and cached. `stamp` adds what else the result depends on; `grid`:
        its scene is the one the grid shows (not for an ablation)."""
        key = {"method": f"{representation}_{rate.replace('/', 'over')}", "definition": self.definition.value,
               "snr": snr_key(snr_db), "stamp": stamp}
        if REPRESENTATIONS[representation].kind == "semantic":  # the image baselines' do not depend on the stage
            key |= self.stage
        cached = self.cache.load(key)
        if cached is not None:
            scores, grid_image = cached
        else:
            sent = self.received.load(key)
            if sent is not None:
                extra, images = sent
            else:
                started = time.monotonic()
                images, extra = transmit()
                extra["seconds_per_image"] = (time.monotonic() - started) / len(images)
                self.received.save(key, extra, images)
            scores = self.ev.score(images)
            for name in ("channel_uses", "payload_bits", "measured_snr_db"):
                if name in extra:
                    scores[name] = summarize(extra.pop(name))
            scores.update(extra)
            grid_image = images[self.grid_position]
            self.cache.save(key, scores, grid_image)
            _log(f"{representation} {rate} @ {key['snr']} dB: mIoU {scores['miou']['mean']:.3f}, "
                 f"{scores['seconds_per_image']:.2f} s/image" + (" (received images from the cache)" if sent else ""))
        if grid:
            self.grid.setdefault(representation, {}).setdefault(rate, {})[key["snr"]] = grid_image
        return with_bandwidth_ratio(scores, self.ev.source_values)

    # --- ours ---------------------------------------------------------------------------------------
    def ours(self, factor: int, compression: Compression, snr_db: float, generator: SemanticImageGenerator
             ) -> tuple[np.ndarray, dict[str, Any]]:
        codec = CodecConfig(num_classes=self.num_classes, downsample_factor=factor, compression=compression,
                            jpeg_quality=self.config.map_jpeg_quality)
        conditions, maps, uses, bits, measured = [], [], [], [], []
        for i, labels in enumerate(self.ev.map_labels):
            # shared.semantic.link.simulate_link's steps, keeping the received maps for the stage.
            encoded = encode_label_map(labels, codec)
            received = apply_channel(encoded.symbols, self.channel(snr_db), seed=self.seed(i, snr_db),
                                     map_scale=encoded.header.scale)
            views = received_views(received.symbols, encoded.header)
            conditions.append(resize_maps(views.fds_maps, self.out_size))
            maps.append(views.fds_maps)  # the receiver's views: at the map size (enlarged from factor f)
            uses.append(received.channel_uses)
            bits.append(encoded.header.payload_bits)
            measured.append(received.measured_snr_db)
        return self.generate(conditions, maps, generator), {"channel_uses": uses, "payload_bits": bits,
                                                            "measured_snr_db": measured}

    def adapter_info(self, factor: int) -> dict[str, Any] | None:
        """The adapter ours uses at `factor` (its file and steps), or None for the base generator."""
        adapted = self.adapted.get(factor)
        if adapted is None:
            return None
        steps, base_steps = adapted.info.training_steps, self.generator.info.training_steps
        return {"path": _relative(adapted.info.adapter), "steps": steps,
                "fine_tuning_steps": steps - base_steps if steps is not None and base_steps is not None else None}

    def without_adapters(self, info: dict[str, Any], snrs: list[float]) -> dict[str, Any]:
        """Ours' adapted rates once more through the base generator alone, at every SNR: what the
        adapters bought (the same cache entries as a run with --no-adapters)."""
        out: dict[str, Any] = {}
        for name in ("ours", "ours_jpeg"):
            for rate, rate_info in info.get(name, {}).get("rates", {}).items():
                if rate_info["adapter"] is None:
                    continue
                factor, compression = rate_info["downsample_factor"], Compression(rate_info["compression"])
                out.setdefault(name, {})[rate] = {
                    snr_key(snr): self.configuration(
                        name, rate, snr, lambda s=snr, f=factor, c=compression: self.ours(f, c, s, self.generator),
                        grid=False)
                    for snr in snrs}
        return out

    # --- separated links ----------------------------------------------------------------------------
    def label_options(self) -> list[list[SourceOption]]:
        if self._label_options is None:
            self._label_options = [label_options(labels, self.num_classes) for labels in self.ev.map_labels]
        return self._label_options

    def jpeg_options(self) -> list[list[SourceOption]]:
        if self._jpeg_options is None:
            self._jpeg_options = [jpeg_options(image) for image in self.ev.images]
        return self._jpeg_options

    def label_scenes(self, factor: int) -> np.ndarray:
        """The generated images of the exact label maps at `factor`: what a decoded separated link gives
        (the receiver codes the decoded map as one-hot maps, FDS, as `receiver_service.model_host` does)."""
        key = {"method": f"separated_scenes_f{factor}", "definition": "none", "snr": "clean"} | self.stage
        cached = self.received.load(key)
        if cached is not None:
            return cached[1]
        conditions, maps = [], []
        for labels in self.ev.map_labels:
            small = majority_downsample(labels, factor, self.num_classes)
            encoded = encode_label_map(small, CodecConfig(num_classes=self.num_classes))
            views = received_views(encoded.symbols, encoded.header)
            conditions.append(resize_maps(views.fds_maps, self.out_size))
            maps.append(views.fds_maps)  # at the size the label map was sent: the map size over `factor`
        images = self.generate(conditions, maps)
        self.received.save(key, {"factor": factor}, images)
        _log(f"separated: scenes of the label maps at factor {factor} generated")
        return images

    def separated(self, semantic: bool, budget_ratio: float, snr_db: float, design_snr: float | None
                  ) -> tuple[np.ndarray, dict[str, Any]]:
        """The label map (semantic) or the JPEG image over LDPC + QAM within the budget; the scheme is
        the one for `design_snr` when given, else for `snr_db`."""
        budget = math.floor(budget_ratio * self.ev.source_values + 1e-9)
        options = self.label_options() if semantic else self.jpeg_options()
        images, uses, bits, measured, schemes, sources = [], [], [], [], [], []
        failures = not_sent = 0
        for i, image in enumerate(self.ev.images):
            mcs = self.scheme(i, snr_db if design_snr is None else design_snr)
            chosen = fit(options[i], mcs, budget) if mcs is not None else None
            if chosen is None:
                not_sent += 1
                images.append(np.full_like(image, GREY))
                uses.append(0)
                bits.append(0)
                schemes.append("none fits" if mcs is not None else "no scheme works")
                sources.append("not sent")
                continue
            option, layout = chosen
            sent = transmit_bytes(option.data, layout, self.channel(snr_db), self.seed(i, snr_db),
                                  map_scale=self.image_scale(i), max_iterations=self.config.ldpc_iterations)
            received = None
            if sent.data is not None and semantic:
                decoded = decode_labels(sent.data, (self.map_height // option.factor, self.map_width // option.factor))
                received = None if decoded is None else self.label_scenes(option.factor)[i]
            elif sent.data is not None:
                received = decode_jpeg_option(sent.data, option, self.height, self.width)
            failures += received is None
            images.append(np.full_like(image, GREY) if received is None else received)
            uses.append(sent.channel_uses)
            bits.append(option.bits)
            measured.append(sent.measured_snr_db)
            schemes.append(layout.mcs.name)
            sources.append(option.name)
        extra = {"channel_uses": uses, "payload_bits": bits, "decode_failures": failures, "not_sent": not_sent,
                 "schemes": _counts(schemes), "sources": _counts(sources),
                 "lost": (failures + not_sent) / len(images)}
        if measured:
            extra["measured_snr_db"] = measured
        return np.stack(images), extra

    # --- analog and learned -------------------------------------------------------------------------
    def analog(self, ratio: float, snr_db: float) -> tuple[np.ndarray, dict[str, Any]]:
        results = [analog_transmit_at_ratio(image, ratio, self.channel(snr_db), self.seed(i, snr_db))
                   for i, image in enumerate(self.ev.images)]
        return np.stack([r.image for r in results]), {
            "channel_uses": [r.channel_uses for r in results], "payload_bits": [r.payload_bits for r in results],
            "measured_snr_db": [r.measured_snr_db for r in results]}

    def learned(self, model: torch.nn.Module, snr_db: float) -> tuple[np.ndarray, dict[str, Any]]:
        conditions, uses, measured = [], [], []
        for i, labels in enumerate(self.ev.map_labels):
            maps = torch.from_numpy(one_hot(labels, self.num_classes))[None]
            with torch.inference_mode():
                symbols = model.encode(maps)[0].numpy()
            received = apply_channel(symbols, self.channel(snr_db), seed=self.seed(i, snr_db),
                                     map_scale=self.image_scale(i))
            conditions.append(model.condition(torch.from_numpy(received.symbols)[None])[0].numpy())
            uses.append(received.channel_uses)
            measured.append(received.measured_snr_db)
        # The receiver gives the stage the decoder's class probabilities (receiver_service.model_host).
        return self.generate(conditions, conditions), {"channel_uses": uses, "measured_snr_db": measured}

    # --- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        config = self.config
        snrs = sorted(set(config.snrs))
        info: dict[str, Any] = {}
        results: dict[str, Any] = {}
        for name in config.representations:
            representation = REPRESENTATIONS[name]
            rates: dict[str, Any] = {}
            per_rate: dict[str, Any] = {}
            problems = []
            for rate, rate_info, rate_snrs, transmit, stamp in self._plan(name, snrs):
                if isinstance(transmit, str):
                    problems.append(transmit)
                    continue
                rates[rate] = rate_info
                per_rate[rate] = {snr_key(snr): self.configuration(name, rate, snr, lambda s=snr: transmit(s), stamp)
                                  for snr in rate_snrs}
            info[name] = {"label": representation.label, "kind": representation.kind,
                          "sendable": representation.sendable, "problems": problems,
                          "status": "ok" if rates else "; ".join(problems) or "no rate to run", "rates": rates}
            results[name] = per_rate
        if any(n in config.representations for n in ("separated", "digital")):
            for snr in snrs:
                self.scheme(0, snr)
        if any(n in config.representations for n in ("separated_fixed", "digital_fixed")):
            self.scheme(0, config.design_snr)
        order = [name for name in REPRESENTATIONS if name in info]  # the report's order, whatever ran first
        return {"representations": {name: info[name] for name in order},
                "results": {name: results[name] for name in order},
                "without_adapters": self.without_adapters(info, snrs), "link_adaptation": dict(self.schemes),
                "sizes": self.sizes(), "grid": self.grid}

    def _plan(self, name: str, snrs: list[float]):
        """(rate key, rate info, SNRs, transmit(snr), stamp) of each rate of a representation; a str instead
        of transmit when the representation cannot run (why); the stamp of a file the results depend on
        (a learned encoder's checkpoint or ours' adapter: retrained, it gives other results)."""
        config = self.config
        if name in ("ours", "ours_jpeg"):
            compression = Compression.JPEG if name == "ours_jpeg" else Compression.NONE
            for factor in config.jpeg_factors if name == "ours_jpeg" else config.factors:
                if self.map_height % factor or self.map_width % factor:
                    continue
                generator = self.adapted.get(factor, self.generator)
                yield (f"f{factor}", {"downsample_factor": factor, "compression": compression.value,
                                      "jpeg_quality": config.map_jpeg_quality, "budget_ratio": None,
                                      "adapter": self.adapter_info(factor)}, snrs,
                       lambda snr, f=factor, c=compression, g=generator: self.ours(f, c, snr, g),
                       file_stamp(generator.info.adapter))
        elif name in ("separated", "digital"):
            for ratio in config.ratios:
                yield (rate_quality.ratio_text(ratio), {"budget_ratio": ratio}, snrs,
                       lambda snr, r=ratio: self.separated(name == "separated", r, snr, None), None)
        elif name in ("separated_fixed", "digital_fixed"):
            every = sorted(set(snrs) | set(config.cliff_snrs))
            for ratio in config.fixed_ratios:
                yield (rate_quality.ratio_text(ratio), {"budget_ratio": ratio, "design_snr_db": config.design_snr}, every,
                       lambda snr, r=ratio: self.separated(name == "separated_fixed", r, snr, config.design_snr),
                       None)
        elif name == "analog":
            for ratio in config.ratios:
                yield (rate_quality.ratio_text(ratio), {"budget_ratio": ratio}, snrs,
                       lambda snr, r=ratio: self.analog(r, snr), None)
        elif name == "learned":
            for path in config.learned:
                try:
                    model, meta = load_map_jscc(path, _relative(path))
                except (FileNotFoundError, ValueError) as error:
                    yield path, None, snrs, f"not run: {error}", None
                    continue
                if (model.config.map_height, model.config.map_width) != (self.map_height, self.map_width) \
                        or (model.config.out_height, model.config.out_width) != self.out_size:
                    yield path, None, snrs, (f"not run: {_relative(path)} codes {model.config.map_height}x"
                                             f"{model.config.map_width} maps for a {model.config.out_height}x"
                                             f"{model.config.out_width} generator"), None
                    continue
                ratio = rate_quality.channel_uses(model.config.num_symbols) / self.ev.source_values
                yield (rate_quality.ratio_text(ratio), {"budget_ratio": None, "ratio": ratio, "checkpoint": _relative(path),
                                          "trained_snr_db": meta.get("snr_db_range"), "steps": meta.get("steps")},
                       snrs, lambda snr, m=model: self.learned(m, snr), file_stamp(path))

    def sizes(self) -> dict[str, Any]:
        """Bits of every source option per image: the label map's lossless codes and the JPEGs."""
        per_image: list[list[SourceOption]] = []
        if any(n in self.config.representations for n in ("separated", "separated_fixed")):
            per_image += self.label_options()
        if any(n in self.config.representations for n in ("digital", "digital_fixed")):
            per_image += self.jpeg_options()
        out: dict[str, list[int]] = {}
        for options in per_image:
            for option in options:
                out.setdefault(option.name, []).append(option.bits)
        return {name: summarize(bits) for name, bits in out.items()}


def _counts(values: list[str]) -> dict[str, int]:
    return {value: values.count(value) for value in sorted(set(values))}


def run(config: RateQualityConfig, command: str) -> dict[str, Any]:
    started = time.monotonic()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    runner = RateQualityRun(config)
    ev = runner.ev
    _log(f"rate-quality: {len(ev.indices)} of {ev.split_size} {config.split} images at {ev.size[0]}x{ev.size[1]} "
         f"(maps {ev.map_size[0]}x{ev.map_size[1]}; generated scenes by {config.upscaler or 'bicubic'}), "
         f"{config.definition.value} SNRs {list(config.snrs)}")
    results = runner.run()
    results["settings"] = {
        "command": command, "wall_time_s": round(time.monotonic() - started, 1),
        "configurations_from_cache": runner.cache.hits,
        "recorded_compute_s": round(sum(entry["seconds_per_image"] * len(ev.indices)
                                        for part in ("results", "without_adapters")
                                        for per_rate in results[part].values()
                                        for per_snr in per_rate.values() for entry in per_snr.values()), 1),
        "torch_threads": torch.get_num_threads(),
        "device": str(ev.device), "split": config.split, "images": len(ev.indices), "split_images": ev.split_size,
        "image_names": ev.names, "evaluated_resolution": list(ev.size), "map_size": list(ev.map_size),
        "source_values": ev.source_values, "generator_resolution": list(runner.out_size),
        "upscaler": None if ev.upscaler is None else {
            "path": _relative(config.upscaler), "name": ev.upscaler.model_name,
            "output_resolution": [ev.upscaler.config.out_height, ev.upscaler.config.out_width]},
        "snrs_db": sorted(set(config.snrs)),
        "definition": config.definition.value, "ratios": [rate_quality.ratio_text(r) for r in config.ratios],
        "fixed_ratios": [rate_quality.ratio_text(r) for r in config.fixed_ratios], "design_snr_db": config.design_snr,
        "cliff_snrs_db": sorted(set(config.cliff_snrs)), "sampler": config.sampler, "steps": config.steps,
        "guidance": config.guidance, "seed": config.seed, "map_jpeg_quality": config.map_jpeg_quality,
        "model": {"path": _relative(config.model), "info": runner.generator.info.as_dict()
                  | {"checkpoint": _relative(runner.generator.info.checkpoint)}},
        "segmenter": {"path": _relative(config.segmenter),
                      "val_miou": ev.probe.segmenter.meta.get("val_miou_void_excluded")},
        "real_miou": ev.score_real()["miou"],
        "present_classes": summarize([len(e.header.present_class_ids) for e in ev.encoded]),
        "adapters": config.adapters,
        "fine_tuned_per_factor": {rate: rate_info["adapter"] for name in ("ours", "ours_jpeg")
                                  for rate, rate_info in results["representations"].get(name, {"rates": {}})["rates"]
                                  .items() if rate_info["adapter"] is not None},
    }
    results["grid_scene"] = ev.names[runner.grid_position]
    results["grid_original"] = ev.images[runner.grid_position]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    config = config_from_args(parser, args, RateQualityConfig)
    notes = load_notes(Path(args.notes)) if args.notes else None
    command = recorded_command("evaluation.rate_quality", argv)
    results = run(config, command)
    paths = rate_quality_report.write_all(results, Path(args.out), Path(args.report) if args.report else None,
                                          Path(args.table) if args.table else None, notes)
    _log(f"wrote {', '.join(str(p) for p in paths)} in {results['settings']['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
