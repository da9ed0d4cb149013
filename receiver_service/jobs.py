"""A received transmission as the receiver's core sees it: a job to sample and what sampling made.

The frontends (grpc_server.py) build a `Job` and its status record from the wire message, so
nothing past them reads protobuf; the queue, the schedulers and the model host pass jobs on.
"""
from __future__ import annotations

import time
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
    # The base generator, or its condition adapter for the transmission's downsample factor.
    generator: SemanticImageGenerator
    # The link and its framing; the digital link's noise std per real symbol (the demapper's, from
    # the channel's report); the learned link's decoder (a MapJscc).
    framing: LinkFraming = field(default_factory=LinkFraming)
    noise_std: float | None = None
    map_decoder: Any = None
    enqueued_at: float = field(default_factory=time.monotonic)
    # Why the job was cancelled (set once, by the queue's `cancel`); None while it is wanted.
    cancel_reason: str | None = None

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


def elapsed_ms(started: float) -> float:
    """Milliseconds since `started` (a perf_counter reading), as the timings record them."""
    return round((time.perf_counter() - started) * 1000.0, 2)
