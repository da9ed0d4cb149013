"""Generation worker: a bounded job queue and one thread that turns received symbols into images.

Entry points (gRPC, REST) never run the model: `submit` validates and queues. The worker thread
batches in one of two ways (GESCO_RECEIVER_BATCHING). `request`: it takes jobs in batches
(`next_batch`, dynamic batching as in Triton's dynamic batcher) and hands each batch to
`run_batch`, which decodes the maps (shared.semantic.link) and samples the generator once for the
whole batch. `continuous`: jobs join and leave one running batch at every sampling step
(receiver_service/step_scheduler.py). Either way a finished job's PNGs are encoded and stored by a
small thread pool while the sampling thread goes on (`encode_workers`; 0 encodes in line). The
model is loaded in the background (`load_model`) so the process answers health checks while it
loads. `cancel` drops a job nobody waits for any more: a queued one leaves the queue at once; a
running one leaves a continuous batch at the next step, and a request batch whose jobs are all
cancelled stops sampling at the next step. Maps sent downsampled are generated through the
condition adapter for their factor when the checkpoint has one beside it
(shared/semantic/diffusion/adapters.py); jobs of different generators never share a network call.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from gesco.v1 import gesco_pb2
from receiver_service import views
from receiver_service.settings import ReceiverSettings
from receiver_service.store import DuplicateTransmissionError, JobStatus, StoreUnavailableError
from receiver_service.store_factory import JobStore
from shared.semantic import codec, link
from shared.wire import transport
from shared.limits import LimitError, SamplingOptions
from shared.semantic.diffusion.adapters import adapted_generators
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.wire.imageio import encode_png, resize_image
from shared.wire.logging_setup import request_context
from shared.wire.monitoring import ServiceMetrics
from shared.wire.records import TransmissionRecord

log = logging.getLogger("receiver_service.worker")

# Until a job has been timed, a full queue asks clients to come back after this long.
INITIAL_JOB_SECONDS = 5.0
# An idle worker applies the store's age limit this often (creating a job applies it too).
EVICT_INTERVAL_S = 60.0


class NotReadyError(Exception):
    """The model is not loaded (yet, or it failed to load)."""


class QueueFullError(Exception):
    """Every queue slot is taken; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the receiver's queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class BatchCancelled(Exception):
    """Every job of the batch being sampled was cancelled: stop sampling."""


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
    enqueued_at: float = field(default_factory=time.monotonic)
    # Why the job was cancelled (set once, by `GenerationWorker.cancel`); None while it is wanted.
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
    # Sampled but not encoded yet (`encode_result` turns them into the artifacts).
    image: np.ndarray | None = None
    received: link.ReceivedViews | None = None


def prepare_job(job: Job) -> tuple[link.ReceivedViews, np.ndarray]:
    """The job's received maps (noisy and FDS-denoised) and the condition its generator gets, at its
    resolution: FDS maps only when the job asks. ValueError when the maps do not decode."""
    info = job.generator.info
    received = link.received_views(job.symbols, job.semantic, use_fds=True)  # the debug views always show FDS
    maps = received.fds_maps if job.use_fds else received.noisy_maps
    return received, link.resize_maps(maps, (info.image_height, info.image_width))


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
    result.timings_ms["png"] = _elapsed_ms(started)
    result.image = result.received = None


def sampling_request(header: gesco_pb2.TransmissionHeader, settings: ReceiverSettings) -> gesco_pb2.SamplingRequest:
    """The header's SamplingRequest; for a header without one, the receiver's defaults throughout
    (its guidance, seed 0, FDS on)."""
    if header.HasField("sampling"):
        return header.sampling
    return gesco_pb2.SamplingRequest(guidance=settings.default_guidance, seed=0, use_fds=True)


def resolve_sampling(
    request: gesco_pb2.SamplingRequest, generator: SemanticImageGenerator, settings: ReceiverSettings
) -> SamplingOptions:
    """The sampler, steps and guidance a request runs with: an empty sampler or 0 steps take the
    receiver's settings, then the sampler registry's (capped by the model's chain). ValueError names
    the field."""
    try:
        return generator.resolve(SamplingOptions(
            sampler=request.sampler or settings.default_sampler,
            steps=request.steps or settings.default_steps,
            guidance=request.guidance,
        ))
    except LimitError as error:
        raise ValueError(f"sampling.{error}") from None


def output_size(settings: ReceiverSettings, generator: SemanticImageGenerator) -> tuple[int, int]:
    """(height, width) of the stored image: the settings, 0 meaning the model's resolution."""
    return (settings.output_height or generator.info.image_height,
            settings.output_width or generator.info.image_width)


def job_record(
    header: gesco_pb2.TransmissionHeader,
    request: gesco_pb2.SamplingRequest,
    sampling: SamplingOptions,
    generator: SemanticImageGenerator,
    size: tuple[int, int],
    request_id: str,
    now: float,
) -> dict[str, Any]:
    """The status.json record of a newly queued job: its progress, then the transmission's record
    (its model: the generator that will sample it, with the adapter it applies)."""
    return {
        "id": header.transmission_id,
        "status": JobStatus.QUEUED.value,
        "error": None,
        "request_id": request_id,
        "created_at": now,
        "started_at": None,
        "finished_at": None,
        "timings_ms": {},
        **TransmissionRecord.from_header(header, request, sampling).model_dump(mode="json"),
        "output": {"height": size[0], "width": size[1]},
        "model": generator.info.as_dict(),
    }


def run_batch(
    jobs: Sequence[Job],
    size: tuple[int, int],
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    encode: bool = True,
) -> list[JobResult]:
    """Decode, sample and (when `encode`) encode a batch of jobs that share sampler, steps,
    guidance and generator; without `encode` each result keeps its image and views for `encode_result`.

    A job whose maps fail to decode fails alone; a sampling error fails the whole batch.
    `should_stop` is asked before every sampling step; once it says yes, sampling stops there and
    every job gets an error instead of an image. `on_step(step, total)` hears of each step
    (1-based) as it starts.
    """
    results = [JobResult() for _ in jobs]
    prepared: list[tuple[int, link.ReceivedViews, np.ndarray]] = []
    for index, job in enumerate(jobs):
        started = time.perf_counter()
        try:
            received, condition = prepare_job(job)
        except ValueError as error:
            results[index].error = f"decoding the received maps failed: {error}"
            continue
        results[index].timings_ms["decode_fds"] = _elapsed_ms(started)
        prepared.append((index, received, condition))
    if not prepared:
        return results

    def stop_if_asked(step: int, total: int) -> None:
        if on_step is not None:
            on_step(step + 1, total)
        if should_stop is not None and should_stop():
            raise BatchCancelled(f"sampling stopped before step {step + 1} of {total}")

    started = time.perf_counter()
    try:
        images = jobs[prepared[0][0]].generator.generate(
            torch.from_numpy(np.stack([condition for _, _, condition in prepared])),
            jobs[prepared[0][0]].sampling,
            seeds=[jobs[index].seed for index, _, _ in prepared],
            step_callback=stop_if_asked,
        )
    except BatchCancelled as stopped:
        log.info("every job of the batch was cancelled", extra={"detail": str(stopped)})
        for index, _, _ in prepared:
            results[index].error = f"cancelled: {stopped}"
        return results
    except Exception as error:  # noqa: BLE001 - the job records any sampling failure
        log.exception("sampling failed")
        for index, _, _ in prepared:
            results[index].error = f"sampling failed: {error}"
        return results
    sample_ms = _elapsed_ms(started)
    for (index, received, _), image in zip(prepared, images):
        result = results[index]
        result.timings_ms["sample"] = sample_ms
        result.image, result.received = image, received
        if encode:
            encode_result(result, size)
    return results


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


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 2)


class GenerationWorker:
    """Owns the model, the bounded queue and the worker thread; the services call `submit`."""

    def __init__(
        self, settings: ReceiverSettings, store: JobStore, metrics: ServiceMetrics | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.generator: SemanticImageGenerator | None = None
        # The base generator with a condition adapter, by downsample factor (loaded with it).
        self.adapted: dict[int, SemanticImageGenerator] = {}
        self.load_error: str | None = None
        # Guards the two collections below; notified when a job arrives or the worker stops.
        self._changed = threading.Condition()
        # Queued jobs, oldest first. A batch takes the oldest and later compatible ones; the
        # others stay in order, so the next batch starts with the oldest left (FIFO, no starvation).
        self._waiting: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}  # queued or running, by transmission id
        # (step, steps) of the jobs being sampled, by transmission id: the status shows progress.
        self._progress: dict[str, tuple[int, int]] = {}
        self._job_seconds = INITIAL_JOB_SECONDS
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        # Encodes and stores finished jobs off the sampling thread (None: in line); made with the model.
        self._encoder: ThreadPoolExecutor | None = None
        self._encoding: set[Future] = set()
        self._last_evicted = time.monotonic()

    @property
    def ready(self) -> bool:
        return self.generator is not None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting behind the batch being generated (including those left for a later batch)."""
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        """The worker thread is alive (after `stop`: still inside a batch)."""
        return self._thread.is_alive()

    def load_model(self) -> None:
        """Load the generator (blocking; run it in a thread) and start the worker thread."""
        try:
            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)
            checkpoint = self.settings.checkpoint
            generator = SemanticImageGenerator.load(
                str(checkpoint) if checkpoint.is_file() else None, device=self.settings.device
            )
            try:
                generator.resolve(SamplingOptions(sampler=self.settings.default_sampler,
                                                  steps=self.settings.default_steps, guidance=0.0))
            except LimitError as error:
                raise ValueError(f"the default {error}") from None
            adapted = adapted_generators(generator) if self.settings.adapters else {}
            buckets, cuda_graphs = [], False
            if self.settings.batch_buckets or self.settings.cuda_graphs:
                buckets, cuda_graphs = forward_buckets(self.settings, generator.device)
            for each in (generator, *adapted.values()):
                self._prepare(each, buckets, cuda_graphs)
        except Exception as error:  # noqa: BLE001 - reported by /readyz, logged here
            self.load_error = f"{type(error).__name__}: {error}"
            log.exception("loading the model failed")
            return
        if not checkpoint.is_file():
            log.warning("checkpoint not found: serving an untrained model", extra={"checkpoint": str(checkpoint)})
        if self.settings.queue_size < self.settings.max_batch_size:
            log.warning("the queue is smaller than the batch: batches stay smaller than max_batch_size",
                        extra={"queue_size": self.settings.queue_size, "max_batch_size": self.settings.max_batch_size})
        log.info("model loaded", extra={"model": generator.info.as_dict(), "batching": self.settings.batching,
                                        "adapters": {f: g.info.adapter for f, g in adapted.items()},
                                        "buckets": list(buckets), "cuda_graphs": cuda_graphs})
        if self.settings.encode_workers:
            self._encoder = ThreadPoolExecutor(self.settings.encode_workers, thread_name_prefix="png-encoder")
        self.adapted = adapted
        self.generator = generator
        if not self._stop.is_set():
            self._thread.start()

    def _prepare(self, generator: SemanticImageGenerator, buckets: list[int], cuda_graphs: bool) -> None:
        """Apply the settings' inference options to one generator (the base or an adapted one)."""
        if self.settings.channels_last:
            generator.use_channels_last()
        if self.settings.torch_compile and buckets:
            generator.compile(warm_up_batches=())  # warmed up at each bucket below instead
        elif self.settings.torch_compile:
            generator.compile()
        if buckets:
            generator.use_buckets(buckets, cuda_graphs)
        generator.noise_on_device = self.settings.noise_on_device

    def generator_for(self, downsample_factor: int) -> SemanticImageGenerator:
        """The generator for maps sent at `downsample_factor`: its condition adapter, else the base."""
        assert self.generator is not None
        return self.adapted.get(downsample_factor, self.generator)

    def check_capacity(self) -> None:
        """Raise QueueFullError now, so a full receiver need not read a stream it will refuse."""
        if self.queue_depth >= self.settings.queue_size:
            raise QueueFullError(self.retry_after_s())

    def retry_after_s(self) -> int:
        """Seconds until a queue slot is likely free: the recent time per job, at least 1."""
        return max(1, math.ceil(self._job_seconds))

    def submit(self, header: gesco_pb2.TransmissionHeader, symbols: np.ndarray, request_id: str) -> int:
        """Validate a received transmission against the model and queue it; return jobs ahead.

        Raises NotReadyError, ValueError (bad request), DuplicateTransmissionError, QueueFullError.
        """
        generator = self.generator
        if generator is None or self._stop.is_set():
            raise NotReadyError(self.load_error or "the model is still loading")
        semantic = transport.semantic_header_from_proto(header.semantic)
        if semantic.num_classes != generator.info.num_classes:
            raise ValueError(
                f"semantic.num_classes {semantic.num_classes} does not match the model's "
                f"{generator.info.num_classes} classes"
            )
        request = sampling_request(header, self.settings)
        sampling = resolve_sampling(request, generator, self.settings)
        size = output_size(self.settings, generator)
        job = Job(header.transmission_id, request_id, semantic, symbols, sampling, seed=request.seed,
                  use_fds=request.use_fds, generator=self.generator_for(semantic.downsample_factor))
        with self._changed:
            if self.store.contains(job.transmission_id):
                raise DuplicateTransmissionError(job.transmission_id)
            if self.queue_depth >= self.settings.queue_size:
                raise QueueFullError(self.retry_after_s())
            self.store.create(job_record(header, request, sampling, job.generator, size, request_id, time.time()))
            ahead = len(self._jobs)
            self._waiting.append(job)
            self._jobs[job.transmission_id] = job
            self._changed.notify_all()
        return ahead

    def progress(self, transmission_id: str) -> tuple[int, int] | None:
        """(step, steps) of a job this process is sampling now, else None."""
        return self._progress.get(transmission_id)

    def set_progress(self, jobs: Sequence[Job], step: int, steps: int) -> None:
        """Jobs that have started sampling step `step` (1-based) of `steps`."""
        for job in jobs:
            self._progress[job.transmission_id] = (step, steps)
        self.store.set_progress([job.transmission_id for job in jobs], step, steps)  # for the other replicas

    def held_ids(self) -> set[str]:
        """The ids of the jobs held in memory (queued or running): the shared store fails a job
        of this replica that is unfinished there but no longer held here."""
        with self._changed:
            return set(self._jobs)

    def cancel(self, transmission_id: str, reason: str) -> None:
        """Cancel a queued or running job (a finished or unknown one is left alone).

        A queued job leaves the queue and is marked cancelled at once. A running one is marked when
        it leaves its batch: a continuous batch drops it at the next step; a request batch stops
        sampling at the next step if every job of the batch is cancelled.
        """
        with self._changed:
            job = self._jobs.get(transmission_id)
            if job is None or job.cancelled:
                return
            job.cancel_reason = reason
            queued = job in self._waiting
            if queued:
                self._waiting.remove(job)
                del self._jobs[transmission_id]
                self.store.update(transmission_id, status=JobStatus.CANCELLED.value, error=reason,
                                  finished_at=time.time())
        with request_context(job.request_id):
            log.info("job cancelled" if queued else "job cancellation requested",
                     extra={"transmission_id": transmission_id, "reason": reason})

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, timeout: float) -> None:
        """Take no more jobs and wait up to `timeout` s for the ones in progress (and their PNGs).

        Jobs still queued or running stay so on disk; the next start marks them failed.
        """
        deadline = time.monotonic() + timeout
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._encoder is not None:
            with self._changed:
                encoding = set(self._encoding)
            wait(encoding, timeout=max(0.0, deadline - time.monotonic()))
            self._encoder.shutdown(wait=False)

    def take_waiting(self, limit: int, block: bool) -> list[Job]:
        """Up to `limit` queued jobs, oldest first, whatever their sampling options (continuous
        batching); when `block` and none is queued, wait a moment for one."""
        with self._changed:
            if block and not self._waiting and not self._stop.is_set():
                self._changed.wait(timeout=0.2)
            return [self._waiting.popleft() for _ in range(min(limit, len(self._waiting)))]

    def idle(self) -> None:
        """Nothing to sample: apply the store's age limit now and then."""
        if time.monotonic() - self._last_evicted > EVICT_INTERVAL_S:
            self.store.evict()
            self._last_evicted = time.monotonic()

    def next_batch(self) -> list[Job]:
        """The oldest job and up to max_batch_size - 1 later ones with its sampling options and
        generator (empty when idle).

        As Triton's dynamic batcher: compatible jobs may join until max_queue_delay_ms after the
        oldest job arrived, so under load (jobs queued while the last batch ran) nobody waits, and
        alone a job waits at most that delay. A full batch leaves at once. Jobs of other settings
        are held back, in order, to open the next batches.
        """
        with self._changed:
            if not self._waiting:
                self._changed.wait(timeout=0.2)
                if not self._waiting:
                    return []
            first = self._waiting.popleft()
            batch, limit = [first], self.settings.max_batch_size
            deadline = first.enqueued_at + self.settings.max_queue_delay_ms / 1000.0
            while True:
                for job in [job for job in self._waiting
                            if job.sampling == first.sampling and job.generator is first.generator]:
                    if len(batch) == limit:
                        break
                    self._waiting.remove(job)
                    batch.append(job)
                remaining = deadline - time.monotonic()
                if len(batch) == limit or remaining <= 0 or self._stop.is_set():
                    return batch
                self._changed.wait(remaining)

    def _run(self) -> None:
        if self.settings.batching == "continuous":
            from receiver_service.step_scheduler import StepScheduler  # it imports this module

            StepScheduler(self).run()
            return
        while not self._stop.is_set():
            batch = self.next_batch()
            if not batch:
                self.idle()
                continue
            try:
                self._process(batch)
            except Exception:  # noqa: BLE001 - e.g. a full disk; keep serving the next jobs
                log.exception("processing a batch failed")
                for job in batch:
                    self._release(job)

    def begin(self, job: Job, started: float) -> None:
        """Mark a job running: its queue wait ends at `started` (monotonic)."""
        with request_context(job.request_id):
            self.store.update(job.transmission_id, status=JobStatus.RUNNING.value, started_at=time.time(),
                              timings_ms={"queue_wait": round((started - job.enqueued_at) * 1000.0, 2)})
            log.info("job started", extra={"transmission_id": job.transmission_id, **asdict(job.sampling),
                                           "seed": job.seed, "use_fds": job.use_fds})

    def complete(self, job: Job, result: JobResult, started: float) -> None:
        """Encode (if sampled), store and finish a job, on the encoder threads when there are
        some; the job is released (no longer held) once it is finished."""
        if self._encoder is None:
            self._complete(job, result, started)
            return
        with self._changed:
            try:
                future = self._encoder.submit(self._complete, job, result, started)
            except RuntimeError:  # `stop` shut the encoders down while this batch ran: finish here
                future = None
            else:
                self._encoding.add(future)
        if future is None:
            self._complete(job, result, started)
        else:
            future.add_done_callback(self._encoded)

    def _encoded(self, future: Future) -> None:
        with self._changed:
            self._encoding.discard(future)

    def _complete(self, job: Job, result: JobResult, started: float) -> None:
        try:
            with request_context(job.request_id):
                if result.image is not None and not job.cancelled:
                    try:
                        encode_result(result, output_size(self.settings, self.generator))
                    except Exception as error:  # noqa: BLE001 - the job records the failure
                        log.exception("encoding the images failed")
                        result.error = f"encoding the images failed: {error}"
                self._finish(job, result, started)
                self._observe(job, result, started)
        except Exception:  # noqa: BLE001 - e.g. a full disk; keep serving the next jobs
            log.exception("finishing a job failed")
        finally:
            self._release(job)

    def _release(self, job: Job) -> None:
        with self._changed:
            self._jobs.pop(job.transmission_id, None)
            self._progress.pop(job.transmission_id, None)

    def job_done(self, seconds: float) -> None:
        """One more job took `seconds` of the sampler's time: what `retry_after_s` tells clients."""
        self._job_seconds = 0.7 * self._job_seconds + 0.3 * seconds

    def _process(self, batch: list[Job]) -> None:
        """Sample the batch's wanted jobs; jobs cancelled while it formed are only marked so."""
        assert self.generator is not None
        started = time.monotonic()
        wanted = [job for job in batch if not job.cancelled]
        for job in wanted:
            self.begin(job, started)
        results: list[JobResult] = []
        if wanted:
            try:
                results = run_batch(wanted, output_size(self.settings, self.generator),
                                    should_stop=lambda: all(job.cancelled for job in wanted),
                                    on_step=lambda step, total: self.set_progress(wanted, step, total),
                                    encode=self._encoder is None)
            except Exception as error:  # noqa: BLE001 - never lose a job to an unexpected error
                log.exception("generation failed")
                results = [JobResult(error=f"{type(error).__name__}: {error}") for _ in wanted]
        if wanted and self.metrics is not None and self.metrics.batch_size is not None:
            self.metrics.batch_size.observe(len(wanted))
        outcomes = dict(zip(map(id, wanted), results))
        for job in batch:
            self.complete(job, outcomes.get(id(job), JobResult()), started)
        if wanted:
            self.job_done((time.monotonic() - started) / len(wanted))

    def _finish(self, job: Job, result: JobResult, started: float) -> None:
        """Store the job's images and final status; a cancelled job keeps no images."""
        timings = {**result.timings_ms, "total": round((time.monotonic() - started) * 1000.0, 2)}
        if job.cancelled:
            status, error = JobStatus.CANCELLED, job.cancel_reason
        else:
            try:
                for name, data in result.artifacts.items():
                    self.store.write_artifact(job.transmission_id, name, data)
            except (OSError, StoreUnavailableError) as store_error:
                result.error = f"storing the results failed: {store_error}"
            status, error = (JobStatus.FAILED if result.error else JobStatus.DONE), result.error
        self.store.update(job.transmission_id, status=status.value, error=error,
                          finished_at=time.time(), timings_ms=timings)
        log.info("job finished", extra={"transmission_id": job.transmission_id, "status": status.value,
                                        "error": error, "timings_ms": timings})

    def _observe(self, job: Job, result: JobResult, started: float) -> None:
        """A finished job's stage latencies (a batch's sampling time counts per job)."""
        if self.metrics is None or not result.timings_ms:  # never started: nothing to observe
            return
        self.metrics.observe_stage("queue_wait", max(0.0, started - job.enqueued_at))
        for stage, milliseconds in result.timings_ms.items():
            self.metrics.observe_stage(stage, milliseconds / 1000.0)
