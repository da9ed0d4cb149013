"""A received transmission as the receiver's core sees it: a job to sample and what sampling made.

The frontends (grpc_server.py) build a `Job` and its status record from the wire message, so
nothing past them reads protobuf; the queue, the schedulers and the model host pass jobs on.
A shared store keeps each job's inputs (`encode_job_input`, compressed; not protobuf) so that any
replica can redo the job from the start (`decode_job_input`) when the one that took it dies.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from receiver_service.store import JobStatus
from shared.limits import SamplingOptions
from shared.semantic import codec, link
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.semantic.links import LinkFraming
from shared.wire.records import TransmissionRecord


class NotReadyError(Exception):
    """The model is not loaded (yet, or it failed to load)."""


class LinkDecodeError(ValueError):
    """The link's code says the scene did not arrive (the digital link's CRC failed): the job ends
    with this as its outcome, and no image is made from a wrong map."""


def decode_failure(error: ValueError) -> str:
    """The status error of a job whose received symbols did not decode."""
    return str(error) if isinstance(error, LinkDecodeError) else f"decoding the received maps failed: {error}"


class QueueFullError(Exception):
    """Every queue slot is taken; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the receiver's queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)  # jobs are compared by identity: a job is one request, whatever it holds
class Job:
    """One queued transmission: decoded header, received symbols and how to sample them."""

    transmission_id: str
    request_id: str
    semantic: codec.SemanticHeader
    symbols: np.ndarray
    # Resolved (no defaults left): jobs with equal options and generator share one generate() call.
    sampling: SamplingOptions
    seed: int
    use_fds: bool
    # The base generator, its condition adapter for the transmission's downsample factor, or that
    # factor's distilled student (ModelHost.plan).
    generator: SemanticImageGenerator
    # The link and its framing; the digital link's noise std per real symbol (the demapper's, from
    # the channel's report); the learned link's decoder (a MapJscc).
    framing: LinkFraming = field(default_factory=LinkFraming)
    noise_std: float | None = None
    map_decoder: Any = None
    enqueued_at: float = field(default_factory=time.monotonic)
    # Why the job was cancelled (set once, by the queue's `cancel`); None while it is wanted.
    cancel_reason: str | None = None
    # The shared store's fencing token of this replica's hold on the job (0 in the disk store):
    # raised each time the job is handed to another replica, so a late result is dropped.
    epoch: int = 0

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None


@dataclass
class JobResult:
    """What sampling produced for one job: its PNGs (or the image and views to encode them from)
    and stage timings, or the error."""

    artifacts: dict[str, bytes] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    # Sampled but not encoded yet (the model host's `finish_image` turns them into the artifacts).
    image: np.ndarray | None = None
    received: link.ReceivedViews | None = None


def job_record(job: Job, transmission: TransmissionRecord, size: tuple[int, int], now: float) -> dict[str, Any]:
    """The status record of a newly queued job: its progress, then the transmission's record
    (its model: the generator that will sample it, with the adapter it applies)."""
    return {
        "id": job.transmission_id,
        "status": JobStatus.QUEUED.value,
        "error": None,
        "request_id": job.request_id,
        "created_at": now,
        "started_at": None,
        "finished_at": None,
        "timings_ms": {},
        **transmission.model_dump(mode="json"),
        "output": {"height": size[0], "width": size[1]},
        "model": job.generator.info.as_dict(),
    }


INPUT_VERSION = 1
_INPUT_PREFIX = struct.Struct(">BI")  # version, length of the JSON part


def encode_job_input(job: Job) -> bytes:
    """What a replica needs to redo `job` from the start: its header, sampling, seed and the
    received symbols (float32, zlib-compressed); the generator is found again by the factor and
    the sampler (the distilled one runs on the factor's student)."""
    meta = json.dumps({
        "request_id": job.request_id,
        "semantic": dataclasses.asdict(job.semantic),
        "sampling": dataclasses.asdict(job.sampling),
        "seed": job.seed,
        "use_fds": job.use_fds,
        "shape": list(job.symbols.shape),
    }).encode()
    symbols = np.ascontiguousarray(job.symbols, dtype="<f4").tobytes()
    return _INPUT_PREFIX.pack(INPUT_VERSION, len(meta)) + meta + zlib.compress(symbols, 1)


def decode_job_input(transmission_id: str, data: bytes, epoch: int,
                     generator_for: Callable[[int, str], SemanticImageGenerator]) -> Job:
    """The job `encode_job_input` stored, held at `epoch`, on the generator `generator_for(downsample
    factor, sampler)` gives; ValueError if the data is not one or no such generator is loaded."""
    try:
        version, length = _INPUT_PREFIX.unpack_from(data)
        if version != INPUT_VERSION:
            raise ValueError(f"job input version {version}, expected {INPUT_VERSION}")
        start = _INPUT_PREFIX.size
        meta = json.loads(data[start:start + length])
        semantic_fields = meta["semantic"]
        semantic = codec.SemanticHeader(**{**semantic_fields,
                                          "present_class_ids": tuple(semantic_fields["present_class_ids"]),
                                          "compression": codec.Compression(semantic_fields["compression"])})
        symbols = np.frombuffer(zlib.decompress(data[start + length:]), dtype="<f4").reshape(meta["shape"])
    except (struct.error, KeyError, TypeError, zlib.error, json.JSONDecodeError) as error:
        raise ValueError(f"unreadable job input: {type(error).__name__}: {error}") from None
    sampling = SamplingOptions(**meta["sampling"])
    return Job(transmission_id, str(meta["request_id"]), semantic, symbols.astype(np.float32), sampling,
               seed=int(meta["seed"]), use_fds=bool(meta["use_fds"]),
               generator=generator_for(semantic.downsample_factor, sampling.sampler), epoch=epoch)


def elapsed_ms(started: float) -> float:
    """Milliseconds since `started` (a perf_counter reading), as the timings record them."""
    return round((time.perf_counter() - started) * 1000.0, 2)
