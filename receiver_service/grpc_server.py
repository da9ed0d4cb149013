"""gRPC Receiver: Receive from the channel, GetTransmission and WatchTransmission for clients.

Receive assembles the stream, turns its header into a job and its status record (this frontend is
the only part of the receiver that reads protobuf), queues the job and acknowledges with its queue
position. Health says
NOT_SERVING until the model is loaded, so a load balancer (or the channel's caller) never routes a
transmission to a receiver that cannot generate it.

GetTransmission and WatchTransmission answer the status the REST API answers (status.py), as
messages with the same field names, and the PNG; with GESCO_RECEIVER_API_KEY set they need it in
the `x-api-key` metadata, as the REST API needs its header. A watch polls the store every
WATCH_POLL_S and sends each change of status or sampling step; it ends with the finished status
and, when done, the image. It holds a gRPC worker thread while it lasts, so watches get threads of
their own (at most max_watches at once, RESOURCE_EXHAUSTED beyond) and never take those Receive
needs. A client that cancels its watch stops the watch only: the job goes on.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from receiver_service.jobs import Job, NotReadyError, QueueFullError, job_record
from receiver_service.settings import ReceiverSettings
from receiver_service.status import public_status
from receiver_service.store import (
    FINISHED,
    DuplicateTransmissionError,
    JobStatus,
    StoreUnavailableError,
    UnknownTransmissionError,
)
from receiver_service.worker import GenerationWorker
from shared.limits import InvalidRequestError, LimitError, SamplingOptions
from shared.wire import grpc_security, load_balancing, transport
from shared.wire.grpc_service import (
    Call,
    CallRejected,
    Health,
    build_server,
    caller_gone,
    require_api_key,
    served_call,
)
from shared.wire.monitoring import ServiceMetrics
from shared.wire.records import TransmissionRecord

log = logging.getLogger("receiver_service.grpc")

RECEIVER_SERVICE_NAME = gesco_pb2.DESCRIPTOR.services_by_name["Receiver"].full_name
CALLER_GONE_REASON = "the caller went away before the job was acknowledged"
# How often a watch reads the status: about every sampling step of the shipped model on a CPU.
WATCH_POLL_S = 0.1
# A full watch capacity asks clients to come back after this long.
WATCH_RETRY_AFTER_S = 5


class ReceiverServicer(gesco_pb2_grpc.ReceiverServicer):
    def __init__(self, worker: GenerationWorker, max_symbols: int) -> None:
        self._worker = worker
        self._max_symbols = max_symbols
        self._settings = worker.settings
        self._watch_slots = threading.BoundedSemaphore(worker.settings.max_watches)

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

    def GetTransmission(self, request: gesco_pb2.GetTransmissionRequest,
                        context: grpc.ServicerContext) -> gesco_pb2.GetTransmissionResponse:
        with served_call(context, log, "get_transmission", "the receiver") as call:
            require_api_key(context, self._settings.api_key.get_secret_value())
            call.fields["transmission_id"] = request.transmission_id[:64]
            status = self._status(request.transmission_id)
            image = self._image(status) if request.include_image else b""
        return gesco_pb2.GetTransmissionResponse(status=status_message(status), image_png=image)

    def WatchTransmission(self, request: gesco_pb2.WatchTransmissionRequest,
                          context: grpc.ServicerContext) -> Iterator[gesco_pb2.WatchTransmissionResponse]:
        with served_call(context, log, "watch_transmission", "the receiver") as call:
            require_api_key(context, self._settings.api_key.get_secret_value())
            call.fields["transmission_id"] = request.transmission_id[:64]
            if not self._watch_slots.acquire(blocking=False):
                raise CallRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{self._settings.max_watches} watches are open, the most this receiver serves; "
                                   f"retry after {WATCH_RETRY_AFTER_S} s", WATCH_RETRY_AFTER_S)
            try:
                yield from self._watch(request.transmission_id, context, call)
            finally:
                self._watch_slots.release()

    def _watch(self, transmission_id: str, context: grpc.ServicerContext,
               call: Call) -> Iterator[gesco_pb2.WatchTransmissionResponse]:
        """The status at once, then each change of status or sampling step, until it has finished
        (the last message, with the image when done) or the call ends."""
        ended = threading.Event()
        context.add_callback(ended.set)  # cancelled by the client, past its deadline, server stopping
        sent, messages = None, 0
        while True:
            status = self._status(transmission_id)
            finished = status["status"] in FINISHED
            seen = (status["status"], status["progress"])
            if seen != sent or finished:
                image = self._image(status) if finished else b""
                yield gesco_pb2.WatchTransmissionResponse(status=status_message(status), image_png=image)
                sent, messages = seen, messages + 1
            if finished:
                call.fields.update(messages=messages, status=status["status"])
                return
            if ended.wait(WATCH_POLL_S):
                call.fields.update(messages=messages, ended="the call ended before the transmission finished")
                return

    def _status(self, transmission_id: str) -> dict[str, Any]:
        """The public status, as GET /v1/transmissions/{id} answers it; NOT_FOUND, INVALID_ARGUMENT
        (a malformed id) or UNAVAILABLE otherwise."""
        try:
            transport.validate_transmission_id(transmission_id)
        except ValueError as error:
            raise CallRejected(grpc.StatusCode.INVALID_ARGUMENT, f"transmission_id: {error}") from None
        try:
            record = self._worker.store.get(transmission_id)
            return public_status(record, self._settings.public_url, self._worker, self._worker.store)
        except UnknownTransmissionError:
            raise CallRejected(grpc.StatusCode.NOT_FOUND,
                               f"transmission_id: no transmission {transmission_id} (unknown or evicted)") from None
        except StoreUnavailableError as error:
            raise _store_unavailable(error) from None

    def _image(self, status: dict[str, Any]) -> bytes:
        """The generated PNG of a done transmission; nothing for any other."""
        if status["status"] != JobStatus.DONE.value:
            return b""
        try:
            return self._worker.store.read_artifact(status["id"], "image") or b""
        except UnknownTransmissionError:  # evicted since its status was read
            raise CallRejected(grpc.StatusCode.NOT_FOUND,
                               f"transmission_id: no transmission {status['id']} (evicted)") from None
        except StoreUnavailableError as error:
            raise _store_unavailable(error) from None

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
    try:
        sampling = base.resolve(SamplingOptions(sampler=request.sampler or settings.default_sampler,
                                                steps=request.steps or settings.default_steps,
                                                guidance=request.guidance))
    except LimitError as error:
        raise InvalidRequestError(f"sampling.{error}") from None
    job = Job(header.transmission_id, request_id, semantic, symbols, sampling, seed=request.seed,
              use_fds=request.use_fds, generator=host.generator_for(semantic.downsample_factor))
    transmission = TransmissionRecord.from_header(header, request, sampling)
    return job, job_record(job, transmission, host.output_size(), time.time())


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
    return CallRejected(grpc.StatusCode.UNAVAILABLE, "the receiver's job store is unavailable")


def build_grpc_server(
    settings: ReceiverSettings, worker: GenerationWorker, metrics: ServiceMetrics | None = None
) -> tuple[grpc.Server, Health]:
    """The Receiver service with health (NOT_SERVING for now) and reflection, bound to its port;
    max_grpc_workers threads for Receive and GetTransmission, max_watches more for watches."""
    credentials = grpc_security.server_credentials(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file, prefix="GESCO_RECEIVER_TLS_"
    )
    servicer = ReceiverServicer(worker, settings.max_symbols)
    return build_server(
        RECEIVER_SERVICE_NAME,
        lambda server: gesco_pb2_grpc.add_ReceiverServicer_to_server(servicer, server),
        f"{settings.host}:{settings.grpc_port}",
        credentials,
        settings.max_grpc_workers + settings.max_watches,
        metrics or ServiceMetrics(),
        # Clients balancing over the replicas reconnect now and then, and so find new replicas.
        load_balancing.server_options(),
    )
