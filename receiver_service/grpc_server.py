"""gRPC Receiver.Receive: assemble the stream, queue the job, acknowledge with its queue position.

Health says NOT_SERVING until the model is loaded, so a load balancer (or the channel's caller)
never routes a transmission to a receiver that cannot generate it.
"""
from __future__ import annotations

import logging

import grpc

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from receiver_service.settings import ReceiverSettings
from receiver_service.store import DuplicateTransmissionError, StoreUnavailableError
from receiver_service.worker import GenerationWorker, NotReadyError, QueueFullError
from shared.wire import grpc_security, load_balancing, transport
from shared.wire.grpc_service import Call, CallRejected, Health, build_server, caller_gone, served_call
from shared.wire.monitoring import ServiceMetrics

log = logging.getLogger("receiver_service.grpc")

RECEIVER_SERVICE_NAME = gesco_pb2.DESCRIPTOR.services_by_name["Receiver"].full_name
CALLER_GONE_REASON = "the caller went away before the job was acknowledged"


class ReceiverServicer(gesco_pb2_grpc.ReceiverServicer):
    def __init__(self, worker: GenerationWorker, max_symbols: int) -> None:
        self._worker = worker
        self._max_symbols = max_symbols

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
            except StoreUnavailableError as error:  # the detail names Redis's address: logged only
                log.warning("job store unavailable", extra={"error": str(error)})
                raise CallRejected(grpc.StatusCode.UNAVAILABLE, "the receiver's job store is unavailable") from None
        return ack

    def _receive(self, request_iterator, context: grpc.ServicerContext, call: Call) -> gesco_pb2.TransmissionAck:
        if not self._worker.ready:
            raise NotReadyError(self._worker.load_error or "the model is still loading")
        self._worker.check_capacity()
        try:
            header, symbols = transport.assemble_frames(request_iterator, self._max_symbols)
        except (grpc.RpcError, ValueError):  # the stream breaks off when the call ends
            if caller_gone(context):
                raise _caller_gone("the caller went away while streaming") from None
            raise
        call.fields.update(transmission_id=header.transmission_id, num_symbols=int(symbols.size))
        if caller_gone(context):  # no one would learn the job's id: do not queue it
            raise _caller_gone("the caller went away before the job was queued")
        position = self._worker.submit(header, symbols, call.request_id or header.transmission_id)
        call.fields["queue_position"] = position
        if caller_gone(context):  # it left while the job was queued: nobody will fetch it
            self._worker.cancel(header.transmission_id, CALLER_GONE_REASON)
            raise _caller_gone("the caller went away as the job was queued; it was cancelled")
        return gesco_pb2.TransmissionAck(
            transmission_id=header.transmission_id,
            queue_position=position,
            channel_report=header.channel_report,
        )


def _caller_gone(details: str) -> CallRejected:
    return CallRejected(grpc.StatusCode.CANCELLED, details)


def build_grpc_server(
    settings: ReceiverSettings, worker: GenerationWorker, metrics: ServiceMetrics | None = None
) -> tuple[grpc.Server, Health]:
    """The Receiver service with health (NOT_SERVING for now) and reflection, bound to its port."""
    credentials = grpc_security.server_credentials(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file, prefix="GESCO_RECEIVER_TLS_"
    )
    servicer = ReceiverServicer(worker, settings.max_symbols)
    return build_server(
        RECEIVER_SERVICE_NAME,
        lambda server: gesco_pb2_grpc.add_ReceiverServicer_to_server(servicer, server),
        f"{settings.host}:{settings.grpc_port}",
        credentials,
        settings.max_grpc_workers,
        metrics or ServiceMetrics(),
        # Clients balancing over the replicas reconnect now and then, and so find new replicas.
        load_balancing.server_options(),
    )
