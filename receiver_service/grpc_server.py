"""gRPC Receiver.Receive: assemble the stream, queue the job, acknowledge with its queue position.

Health says NOT_SERVING until the model is loaded, so a load balancer (or the channel's caller)
never routes a transmission to a receiver that cannot generate it.
"""
from __future__ import annotations

import logging
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from receiver_service.settings import ReceiverSettings
from receiver_service.store import DuplicateTransmissionError
from receiver_service.worker import GenerationWorker, NotReadyError, QueueFullError
from shared.wire import grpc_security, transport
from shared.wire.logging_setup import clean_request_id, request_context
from shared.wire.monitoring import ServiceMetrics

log = logging.getLogger("receiver_service.grpc")

RECEIVER_SERVICE_NAME = gesco_pb2.DESCRIPTOR.services_by_name["Receiver"].full_name
CALLER_GONE_REASON = "the caller went away before the job was acknowledged"


class CallerGoneError(Exception):
    """The caller cancelled, or its deadline passed, before its job was acknowledged."""


class ReceiverServicer(gesco_pb2_grpc.ReceiverServicer):
    def __init__(self, worker: GenerationWorker, max_symbols: int) -> None:
        self._worker = worker
        self._max_symbols = max_symbols

    def Receive(self, request_iterator, context: grpc.ServicerContext) -> gesco_pb2.TransmissionAck:
        started = time.perf_counter()
        request_id = clean_request_id(dict(context.invocation_metadata()).get(transport.REQUEST_ID_METADATA_KEY))
        fields: dict[str, object] = {}
        with request_context(request_id):
            code, details, trailing = grpc.StatusCode.OK, "", ()
            try:
                if not self._worker.ready:
                    raise NotReadyError(self._worker.load_error or "the model is still loading")
                self._worker.check_capacity()
                try:
                    header, symbols = transport.assemble_frames(request_iterator, self._max_symbols)
                except (grpc.RpcError, ValueError):  # the stream breaks off when the call ends
                    if caller_gone(context):
                        raise CallerGoneError("the caller went away while streaming") from None
                    raise
                fields.update(transmission_id=header.transmission_id, num_symbols=int(symbols.size))
                if caller_gone(context):  # no one would learn the job's id: do not queue it
                    raise CallerGoneError("the caller went away before the job was queued")
                position = self._worker.submit(header, symbols, request_id or header.transmission_id)
                fields["queue_position"] = position
                if caller_gone(context):  # it left while the job was queued: nobody will fetch it
                    self._worker.cancel(header.transmission_id, CALLER_GONE_REASON)
                    raise CallerGoneError("the caller went away as the job was queued; it was cancelled")
            except NotReadyError as error:
                code, details = grpc.StatusCode.UNAVAILABLE, f"receiver not ready: {error}"
            except CallerGoneError as error:
                code, details = grpc.StatusCode.CANCELLED, str(error)
            except ValueError as error:
                code, details = grpc.StatusCode.INVALID_ARGUMENT, str(error)
            except DuplicateTransmissionError as error:
                code, details = grpc.StatusCode.ALREADY_EXISTS, f"transmission {error} was already received"
            except QueueFullError as error:
                code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
                trailing = ((transport.RETRY_AFTER_METADATA_KEY, str(error.retry_after_s)),)
            except Exception:  # noqa: BLE001 - logged with its traceback, reported as INTERNAL
                log.exception("receive failed")
                code, details = grpc.StatusCode.INTERNAL, "internal error in the receiver"
            log.info("receive", extra={**fields, "code": code.name, "details": details[:300],
                                       "duration_ms": round((time.perf_counter() - started) * 1000, 2)})
            if code is not grpc.StatusCode.OK:
                if trailing:
                    context.set_trailing_metadata(trailing)
                context.abort(code, details)
            return gesco_pb2.TransmissionAck(
                transmission_id=header.transmission_id,
                queue_position=position,
                channel_report=header.channel_report,
            )


def caller_gone(context: grpc.ServicerContext) -> bool:
    """The call was cancelled or its deadline has passed."""
    remaining = context.time_remaining()
    return not context.is_active() or (remaining is not None and remaining <= 0)


def build_grpc_server(
    settings: ReceiverSettings, worker: GenerationWorker, metrics: ServiceMetrics | None = None
) -> tuple[grpc.Server, health.HealthServicer]:
    """The Receiver service with health (NOT_SERVING for now) and reflection, bound to its port."""
    metrics = metrics or ServiceMetrics()
    credentials = grpc_security.server_credentials(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file, prefix="GESCO_RECEIVER_TLS_"
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_grpc_workers), interceptors=[metrics.grpc_interceptor()]
    )
    gesco_pb2_grpc.add_ReceiverServicer_to_server(ReceiverServicer(worker, settings.max_symbols), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    set_serving(health_servicer, False)
    reflection.enable_server_reflection(
        (RECEIVER_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    grpc_security.add_port(server, f"{settings.host}:{settings.grpc_port}", credentials)
    return server, health_servicer


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", RECEIVER_SERVICE_NAME):
        health_servicer.set(name, status)
