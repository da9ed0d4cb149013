"""gRPC Receiver: Receive from the channel, GetTransmission and WatchTransmission for clients.

Receive assembles the stream, turns its header into a job and its status record (this frontend is
the only part of the receiver that reads protobuf), queues the job and acknowledges with its queue
position. Health says
NOT_SERVING until the model is loaded, so a load balancer (or the channel's caller) never routes a
transmission to a receiver that cannot generate it.

GetTransmission and WatchTransmission answer the status the REST API answers (status.py), as
messages with the same field names, and the PNG; with GESCO_RECEIVER_API_KEY set they need it in
the `x-api-key` metadata, as the REST API needs its header. A watch sends the status at once, then
each change of status or sampling step, and ends with the finished status and, when done, the
image. A client that cancels its watch stops the watch only: the job goes on.

The service runs on a grpc.aio server (shared/wire/aio_server.py), on an event loop of its own
thread: a watch is a coroutine waiting for what the job pushes (watch_hub.py), not a thread
polling the store, so a receiver serves thousands (at most max_watches, RESOURCE_EXHAUSTED
beyond). Receive reads its stream and writes the store on a thread of the server's executor
(max_grpc_workers of them), as GetTransmission reads the store.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from gesco.options import Link
from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from receiver_service.jobs import Job, NotReadyError, QueueFullError, job_record
from receiver_service.settings import ReceiverSettings
from receiver_service.status import public_status
from receiver_service.store import (
    STORE_RETRY_AFTER_S,
    DuplicateTransmissionError,
    JobStatus,
    StoreUnavailableError,
    UnknownTransmissionError,
)
from receiver_service.watch_hub import WatchHub
from receiver_service.worker import GenerationWorker
from shared.limits import InvalidRequestError, LimitError, SamplingOptions
from shared.semantic import channels, codec
from shared.semantic.links import LinkFraming
from shared.wire import grpc_security, load_balancing, transport
from shared.wire.aio_server import AioHealth, AioServer, LoopThread
from shared.wire.grpc_service import (
    Call,
    CallRejected,
    caller_gone,
    require_api_key,
    served_call,
    served_call_async,
)
from shared.wire.monitoring import ServiceMetrics
from shared.wire.records import TransmissionRecord

log = logging.getLogger("receiver_service.grpc")

RECEIVER_SERVICE_NAME = gesco_pb2.DESCRIPTOR.services_by_name["Receiver"].full_name
CALLER_GONE_REASON = "the caller went away before the job was acknowledged"
# The thread of the server's event loop (every watch is served there), and the worker's that
# samples: gesco_thread_cpu_seconds tells what each costs.
GRPC_THREAD_NAME = "receiver-grpc"
SAMPLING_THREAD_NAME = "generation-worker"
# A full watch capacity asks clients to come back after this long.
WATCH_RETRY_AFTER_S = 5
# Threads that read the store for the watches (one read per watched transmission and change).
WATCH_READ_THREADS = 2
# How often a thread reading a Receive stream looks whether its caller has gone.
STREAM_CHECK_S = 0.25


class ReceiverServicer(gesco_pb2_grpc.ReceiverServicer):
    """The Receiver service. `Receive` blocks (a thread of the executor runs it, see
    `_ServedOnLoop`); GetTransmission and WatchTransmission are coroutines of the server's loop."""

    def __init__(self, worker: GenerationWorker, max_symbols: int, hub: WatchHub | None = None,
                 executor: futures.Executor | None = None) -> None:
        self._worker = worker
        self._max_symbols = max_symbols
        self._settings = worker.settings
        self._hub = hub or WatchHub()
        self._executor = executor
        self._open_watches = 0

    def Receive(self, request_iterator, context: grpc.ServicerContext) -> gesco_pb2.TransmissionAck:
        with served_call(context, log, "receive", "the receiver") as call:
            try:
                ack = self._receive(request_iterator, context, call)
            except NotReadyError as error:
                raise CallRejected(grpc.StatusCode.UNAVAILABLE, f"receiver not ready: {error}") from None
            except DuplicateTransmissionError as error:
                raise CallRejected(grpc.StatusCode.ALREADY_EXISTS, f"transmission {error} was already received") from None
            except QueueFullError as error:
                raise CallRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), error.retry_after_s) from None
            except StoreUnavailableError as error:
                raise _store_unavailable(error) from None
        return ack

    async def GetTransmission(self, request: gesco_pb2.GetTransmissionRequest,
                              context: grpc.aio.ServicerContext) -> gesco_pb2.GetTransmissionResponse:
        async with served_call_async(context, log, "get_transmission", "the receiver") as call:
            require_api_key(context, self._settings.api_key.get_secret_value())
            call.fields["transmission_id"] = request.transmission_id[:64]
            status = await self._blocking(self.status, request.transmission_id)
            done = request.include_image and status["status"] == JobStatus.DONE.value
            image = await self._blocking(self.image, status["id"]) if done else b""
        return gesco_pb2.GetTransmissionResponse(status=status_message(status), image_png=image)

    async def WatchTransmission(self, request: gesco_pb2.WatchTransmissionRequest,
                                context: grpc.aio.ServicerContext) -> None:
        """Writes the hub's messages, serialized once per transmission (see `add_receiver`)."""
        async with served_call_async(context, log, "watch_transmission", "the receiver") as call:
            require_api_key(context, self._settings.api_key.get_secret_value())
            transmission_id = request.transmission_id
            call.fields["transmission_id"] = transmission_id[:64]
            _validated(transmission_id)
            if self._open_watches >= self._settings.max_watches:
                raise CallRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{self._settings.max_watches} watches are open, the most this receiver serves; "
                                   f"retry after {WATCH_RETRY_AFTER_S} s", WATCH_RETRY_AFTER_S)
            self._open_watches += 1
            messages = 0
            try:
                async for message in self._hub.watch(transmission_id):
                    await context.write(message)
                    messages += 1
                call.fields["messages"] = messages
            except asyncio.CancelledError:
                call.fields.update(messages=messages, ended="the call ended before the transmission finished")
                raise
            finally:
                self._open_watches -= 1

    @property
    def open_watches(self) -> int:
        return self._open_watches

    def status(self, transmission_id: str) -> dict[str, Any]:
        """The public status, as GET /v1/transmissions/{id} answers it (blocking); NOT_FOUND,
        INVALID_ARGUMENT (a malformed id) or UNAVAILABLE otherwise."""
        _validated(transmission_id)
        try:
            record = self._worker.store.get(transmission_id)
            return public_status(record, self._settings.public_url, self._worker, self._worker.store)
        except UnknownTransmissionError:
            raise CallRejected(grpc.StatusCode.NOT_FOUND,
                               f"transmission_id: no transmission {transmission_id} (unknown or evicted)") from None
        except StoreUnavailableError as error:
            raise _store_unavailable(error) from None

    def image(self, transmission_id: str) -> bytes:
        """The generated PNG of a done transmission; nothing for any other (blocking)."""
        try:
            return self._worker.store.read_artifact(transmission_id, "image") or b""
        except UnknownTransmissionError:  # evicted since its status was read
            raise CallRejected(grpc.StatusCode.NOT_FOUND,
                               f"transmission_id: no transmission {transmission_id} (evicted)") from None
        except StoreUnavailableError as error:
            raise _store_unavailable(error) from None

    async def _blocking(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _receive(self, request_iterator, context: grpc.ServicerContext, call: Call) -> gesco_pb2.TransmissionAck:
        if not self._worker.ready:
            raise NotReadyError(self._worker.load_error or "the model is still loading")
        self._worker.queue.check_capacity()
        try:
            header, symbols = transport.assemble_frames(request_iterator, self._max_symbols)
        except (grpc.RpcError, ValueError):  # the stream breaks off when the call ends
            if caller_gone(context):
                raise _caller_gone("the caller went away while streaming") from None
            raise
        call.fields.update(transmission_id=header.transmission_id, num_symbols=int(symbols.size))
        if caller_gone(context):  # no one would learn the job's id: do not queue it
            raise _caller_gone("the caller went away before the job was queued")
        position = queue_transmission(self._worker, header, symbols, call.request_id or header.transmission_id)
        call.fields["queue_position"] = position
        if caller_gone(context):  # it left while the job was queued: nobody will fetch it
            self._worker.cancel(header.transmission_id, CALLER_GONE_REASON)
            raise _caller_gone("the caller went away as the job was queued; it was cancelled")
        return gesco_pb2.TransmissionAck(
            transmission_id=header.transmission_id,
            queue_position=position,
            channel_report=header.channel_report,
        )


class _ServedOnLoop:
    """The servicer as the grpc.aio server calls it: Receive on a thread of the executor, with a
    blocking view of its stream and context (`_ThreadContext`); the rest as they are."""

    def __init__(self, servicer: ReceiverServicer, executor: futures.Executor) -> None:
        self._servicer = servicer
        self._executor = executor
        self.GetTransmission = servicer.GetTransmission
        self.WatchTransmission = servicer.WatchTransmission

    async def Receive(self, request_iterator, context: grpc.aio.ServicerContext) -> gesco_pb2.TransmissionAck:
        loop = asyncio.get_running_loop()
        blocking = _ThreadContext(context, request_iterator, loop)
        try:
            return await loop.run_in_executor(self._executor, self._servicer.Receive, blocking.frames(), blocking)
        except _Aborted as aborted:
            if aborted.trailing:
                context.set_trailing_metadata(aborted.trailing)
            await context.abort(aborted.code, aborted.details)
        except asyncio.CancelledError:  # the caller went away: the thread finds out and ends the call
            blocking.gone.set()
            raise


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class _StreamBroken(grpc.RpcError):
    """The request stream ended with an error (the call was cancelled or ran out of time)."""


class _ThreadContext:
    """What the blocking Receive needs of a grpc.ServicerContext, for a grpc.aio call served on
    another thread: its metadata and deadline, whether it is still on, trailers and abort (raised
    as _Aborted, and done by `_ServedOnLoop` on the loop), and its frames read from the loop."""

    def __init__(self, context: grpc.aio.ServicerContext, request_iterator, loop: asyncio.AbstractEventLoop) -> None:
        self._metadata = tuple(context.invocation_metadata() or ())
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        self._request_iterator = request_iterator
        self._requests = None  # its async iterator, made on the first read
        self._loop = loop
        self._trailing: tuple = ()
        self.gone = threading.Event()

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return not self.gone.is_set()

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = tuple(metadata)

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Aborted(code, details, self._trailing)

    def frames(self) -> Iterator[gesco_pb2.Frame]:
        """The request stream, read frame by frame on the loop; _StreamBroken once the call has ended."""
        while True:
            pending = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
            while True:
                try:
                    frame = pending.result(timeout=STREAM_CHECK_S)
                    break
                except futures.TimeoutError:
                    if caller_gone(self):
                        pending.cancel()
                        raise _StreamBroken() from None
                except Exception as error:  # noqa: BLE001 - the stream broke off (the call ended)
                    raise _StreamBroken() from error
            if frame is None:
                return
            yield frame

    async def _next(self) -> gesco_pb2.Frame | None:
        if self._requests is None:
            self._requests = self._request_iterator.__aiter__()
        try:
            return await self._requests.__anext__()
        except StopAsyncIteration:
            return None


def sampling_request(header: gesco_pb2.TransmissionHeader, settings: ReceiverSettings) -> gesco_pb2.SamplingRequest:
    """The header's SamplingRequest; for a header without one, the receiver's defaults throughout
    (its guidance, seed 0, FDS on)."""
    if header.HasField("sampling"):
        return header.sampling
    return gesco_pb2.SamplingRequest(guidance=settings.default_guidance, seed=0, use_fds=True)


def job_from_header(
    header: gesco_pb2.TransmissionHeader, symbols: np.ndarray, request_id: str, worker: GenerationWorker
) -> tuple[Job, dict[str, Any]]:
    """The job a received transmission asks for, validated against the model, and its status record.

    An empty sampler or 0 steps take the receiver's settings, then the sampler registry's (capped by
    the model's chain). Raises NotReadyError, or InvalidRequestError naming the field.
    """
    settings, host = worker.settings, worker.host
    base = host.base()
    semantic = transport.semantic_header_from_proto(header.semantic)
    if semantic.num_classes != base.info.num_classes:
        raise InvalidRequestError(f"semantic.num_classes {semantic.num_classes} does not match the model's "
                         f"{base.info.num_classes} classes")
    request = sampling_request(header, settings)
    framing = transport.link_framing_from_proto(header.semantic)
    # Condition adapters were fine-tuned on the maps link's conditions: the other links use the base
    # (or its student), as for maps sent at full resolution.
    adapter_factor = semantic.downsample_factor if framing.link is Link.MAPS else 1
    try:
        generator, sampling = host.plan(SamplingOptions(sampler=request.sampler or settings.default_sampler,
                                                        steps=request.steps or settings.default_steps,
                                                        guidance=request.guidance), adapter_factor)
    except LimitError as error:
        raise InvalidRequestError(f"sampling.{error}") from None
    noise_std, map_decoder = None, None
    if framing.link is Link.DIGITAL:
        noise_std = _demapper_noise_std(header, framing, semantic)
    elif framing.link is Link.LEARNED:
        try:
            map_decoder = host.map_decoder(framing.learned_model or "")
        except KeyError:
            raise InvalidRequestError(f"semantic.learned.model: this receiver has no map decoder "
                                      f"{framing.learned_model!r}; it has {sorted(host.map_decoders)}") from None
        if semantic.num_symbols != map_decoder.config.num_symbols:
            raise InvalidRequestError(f"semantic.num_symbols must be the {map_decoder.config.num_symbols} real symbols "
                                      f"of {framing.learned_model}, got {semantic.num_symbols}")
    job = Job(header.transmission_id, request_id, semantic, symbols, sampling, seed=request.seed,
              use_fds=request.use_fds, generator=generator, framing=framing, noise_std=noise_std,
              map_decoder=map_decoder)
    transmission = TransmissionRecord.from_header(header, request, sampling)
    return job, job_record(job, transmission, host.output_size(), time.time())


def _demapper_noise_std(header: gesco_pb2.TransmissionHeader, framing: LinkFraming,
                        semantic: codec.SemanticHeader) -> float:
    """The noise std per real symbol the channel added, from its report: what the digital link's
    demapper weighs the received symbols by. InvalidRequestError when the header has no report."""
    if not header.HasField("channel_report"):
        raise InvalidRequestError("channel_report: the digital link needs the channel's report to demap")
    report = header.channel_report
    config = channels.ChannelConfig(snr_db=report.requested_snr_db,
                                    snr_definition=transport.snr_definition_from_proto(report.snr_definition))
    assert framing.digital is not None
    return channels.noise_std_per_real_symbol(config, framing.digital.symbol_power, semantic.scale)


def queue_transmission(worker: GenerationWorker, header: gesco_pb2.TransmissionHeader, symbols: np.ndarray,
                       request_id: str) -> int:
    """Validate a received transmission and queue it; return the jobs ahead of it.
    Raises NotReadyError, InvalidRequestError, DuplicateTransmissionError, QueueFullError."""
    job, record = job_from_header(header, symbols, request_id, worker)
    return worker.submit(job, record)


def status_message(status: dict[str, Any]) -> gesco_pb2.TransmissionStatus:
    """The REST API's status JSON as its message (the fields have the same names)."""
    return json_format.ParseDict(status, gesco_pb2.TransmissionStatus(), ignore_unknown_fields=True)


def _caller_gone(details: str) -> CallRejected:
    return CallRejected(grpc.StatusCode.CANCELLED, details)


def _store_unavailable(error: StoreUnavailableError) -> CallRejected:
    log.warning("job store unavailable", extra={"error": str(error)})  # it names Redis's address: logged only
    return CallRejected(grpc.StatusCode.UNAVAILABLE, "the receiver's job store is unavailable",
                        STORE_RETRY_AFTER_S)


def build_grpc_server(
    settings: ReceiverSettings, worker: GenerationWorker, metrics: ServiceMetrics | None = None,
    hub: WatchHub | None = None,
) -> tuple[AioServer, AioHealth]:
    """The Receiver service with health (NOT_SERVING for now) and reflection, bound to its port, on
    a grpc.aio server of its own loop thread; max_grpc_workers threads for Receive and
    GetTransmission. Watches follow `hub` (a new one if none is given), which the worker's steps
    feed; the caller feeds it the store's finishes (app.py), or a watch learns of its job's end
    when its topic re-reads the store."""
    credentials = grpc_security.server_credentials(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file, prefix="GESCO_RECEIVER_TLS_"
    )
    hub = hub or WatchHub()
    worker.queue.add_progress_listener(hub.notify_progress)
    watch_reads = futures.ThreadPoolExecutor(WATCH_READ_THREADS, thread_name_prefix="watch-reads")
    executor = futures.ThreadPoolExecutor(settings.max_grpc_workers, thread_name_prefix="grpc-receive")

    def add_servicer(server: grpc.aio.Server, loop_thread: LoopThread) -> None:
        servicer = ReceiverServicer(worker, settings.max_symbols, hub, executor)
        hub.bind(loop_thread.loop, watch_reads, servicer.status, servicer.image, watch_message)
        add_receiver(_ServedOnLoop(servicer, executor), server)

    metrics = metrics or ServiceMetrics()
    server = AioServer(
        RECEIVER_SERVICE_NAME, add_servicer, f"{settings.host}:{settings.grpc_port}", credentials,
        metrics,
        # Clients balancing over the replicas reconnect now and then, and so find new replicas.
        load_balancing.server_options(),
        thread_name=GRPC_THREAD_NAME,
        executors=(executor, watch_reads),
    )
    metrics.track_thread_cpu((GRPC_THREAD_NAME, SAMPLING_THREAD_NAME))
    return server, server.health


def watch_message(status: dict[str, Any], image: bytes) -> bytes:
    """What a watch sends: the status and, once done, the image; serialized, once for all the
    watchers of the transmission."""
    return gesco_pb2.WatchTransmissionResponse(status=status_message(status), image_png=image).SerializeToString()


def add_receiver(servicer: Any, server: grpc.aio.Server) -> None:
    """gesco_pb2_grpc.add_ReceiverServicer_to_server, except that WatchTransmission writes messages
    already serialized (watch_message)."""
    handlers = {
        "Receive": grpc.stream_unary_rpc_method_handler(
            servicer.Receive, request_deserializer=gesco_pb2.Frame.FromString,
            response_serializer=gesco_pb2.TransmissionAck.SerializeToString),
        "GetTransmission": grpc.unary_unary_rpc_method_handler(
            servicer.GetTransmission, request_deserializer=gesco_pb2.GetTransmissionRequest.FromString,
            response_serializer=gesco_pb2.GetTransmissionResponse.SerializeToString),
        "WatchTransmission": grpc.unary_stream_rpc_method_handler(
            servicer.WatchTransmission, request_deserializer=gesco_pb2.WatchTransmissionRequest.FromString,
            response_serializer=None),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RECEIVER_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(RECEIVER_SERVICE_NAME, handlers)


def _validated(transmission_id: str) -> str:
    try:
        return transport.validate_transmission_id(transmission_id)
    except ValueError as error:
        raise CallRejected(grpc.StatusCode.INVALID_ARGUMENT, f"transmission_id: {error}") from None
