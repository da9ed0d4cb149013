"""gRPC Channel.Transmit: assemble the stream, corrupt the symbols, forward them to a receiver.

The receivers may be several replicas: the channel to them balances the calls with gRPC's
round_robin and health checking (shared/wire/load_balancing.py), and a replica whose queue is full
hands the transmission on to the next.

The handler only parses, calls shared.semantic.channels and maps errors to statuses; the receiver's answer
(its ack, or its error with any `retry-after` trailer) goes back to the caller unchanged in meaning.
"""
from __future__ import annotations

import logging

import grpc

from channel_sim.settings import ChannelSettings
from gesco.options import ChannelModel, names
from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from shared.limits import InvalidRequestError
from shared.semantic import channels
from shared.wire import grpc_security, transport
from shared.wire.grpc_service import CallRejected, Health, build_server, caller_gone, served_call
from shared.wire.load_balancing import balancing_options, grpc_target
from shared.wire.monitoring import ServiceMetrics

log = logging.getLogger("channel_sim")

CHANNEL_SERVICE_NAME = gesco_pb2.DESCRIPTOR.services_by_name["Channel"].full_name
RECEIVER_SERVICE_NAME = gesco_pb2.DESCRIPTOR.services_by_name["Receiver"].full_name

# Receiver errors whose code already says the right thing to the sender.
_PASSED_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.CANCELLED,
}


def channel_config_from_proto(request: gesco_pb2.ChannelRequest) -> channels.ChannelConfig:
    """The channel condition a header asks for; InvalidRequestError names the bad field."""
    try:
        model = ChannelModel(request.model)
    except ValueError:
        raise InvalidRequestError(f"channel.model must be one of {list(names(ChannelModel))}, "
                                  f"got {request.model[:40]!r}") from None
    try:
        return channels.ChannelConfig(
            model=model,
            snr_db=request.snr_db,
            snr_definition=transport.snr_definition_from_proto(request.snr_definition),
            equalize=request.equalize,
            rician_k_db=request.rician_k_db,
        )
    except InvalidRequestError as error:
        raise InvalidRequestError(f"channel: {error}") from None


class ChannelServicer(gesco_pb2_grpc.ChannelServicer):
    def __init__(
        self, settings: ChannelSettings, receiver: gesco_pb2_grpc.ReceiverStub, metrics: ServiceMetrics
    ) -> None:
        self._settings = settings
        self._receiver = receiver
        self._metrics = metrics

    def Transmit(self, request_iterator, context: grpc.ServicerContext) -> gesco_pb2.TransmissionAck:
        with served_call(context, log, "transmit", "the channel simulator") as call:
            try:
                with self._metrics.time_stage("assemble"):
                    header, symbols = transport.assemble_frames(request_iterator, self._settings.max_symbols)
            except (grpc.RpcError, ValueError):  # the stream breaks off when the call ends
                if caller_gone(context):
                    raise CallRejected(grpc.StatusCode.CANCELLED, "the caller went away while streaming") from None
                raise
            call.fields.update(transmission_id=header.transmission_id, num_symbols=int(symbols.size))
            config = channel_config_from_proto(header.channel)
            call.fields.update(model=config.model.value, snr_db=config.snr_db,
                               snr_definition=config.snr_definition.value)
            with self._metrics.time_stage("channel"):
                output = channels.apply_channel(symbols, config, seed=header.channel.seed,
                                                map_scale=header.semantic.scale)
            report = gesco_pb2.ChannelReport(
                model=config.model.value,
                requested_snr_db=config.snr_db,
                measured_snr_db=output.measured_snr_db,
                snr_definition=header.channel.snr_definition,
                channel_uses=output.channel_uses,
            )
            header.channel_report.CopyFrom(report)
            call.fields.update(measured_snr_db=round(output.measured_snr_db, 3), channel_uses=output.channel_uses)
            with self._metrics.time_stage("forward"):
                ack = self._forward(header, output.symbols, call.request_id or header.transmission_id, context,
                                    call.fields)
            ack.channel_report.CopyFrom(report)
        return ack

    def _forward(self, header, symbols, request_id: str, context, fields: dict[str, object]) -> gesco_pb2.TransmissionAck:
        """Forward to the receivers (round_robin: each call goes to the next healthy replica); one
        whose queue is full (RESOURCE_EXHAUSTED) passes the transmission on to the next, up to
        forward_attempts receivers, and the last one's answer (with its retry-after) is the caller's."""
        attempt = 1
        while True:
            fields["forward_attempts"] = attempt
            try:
                return self._forward_once(header, symbols, request_id, context)
            except grpc.RpcError as error:
                full = error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                if not full or attempt == self._settings.forward_attempts or caller_gone(context):
                    raise receiver_error(error) from None
                log.info("a receiver's queue is full: offering the transmission to the next one",
                         extra={"attempt": attempt, "details": (error.details() or "")[:300]})
            attempt += 1

    def _forward_once(self, header, symbols, request_id: str, context) -> gesco_pb2.TransmissionAck:
        """One call to a receiver; its RpcError is raised as it is."""
        remaining = context.time_remaining()
        timeout = self._settings.forward_timeout_s if remaining is None else min(remaining, self._settings.forward_timeout_s)
        if timeout <= 0:
            raise CallRejected(grpc.StatusCode.DEADLINE_EXCEEDED, "no time left to forward to the receiver")
        call = self._receiver.Receive.future(
            transport.symbol_frames(header, symbols),
            metadata=((transport.REQUEST_ID_METADATA_KEY, request_id),),
            timeout=timeout,
        )
        # The caller cancelling (or its deadline passing) cancels the forward: nothing is left
        # streaming to the receiver for a caller that is gone.
        if not context.add_callback(call.cancel):
            call.cancel()
        try:
            return call.result()
        except grpc.FutureCancelledError:
            raise CallRejected(grpc.StatusCode.CANCELLED, "the caller went away; the forward was cancelled") from None



def receiver_error(error: grpc.RpcError) -> CallRejected:
    """The status to give the sender for a failed call to the receiver."""
    code = error.code()
    details = error.details() or ""
    retry_after = next((value for key, value in (error.trailing_metadata() or ())
                        if key == transport.RETRY_AFTER_METADATA_KEY), None)
    if code is grpc.StatusCode.UNAVAILABLE:  # e.g. its job store is down: with when to come back
        return CallRejected(code, f"receiver unavailable: {details}" if details else "receiver unavailable",
                            retry_after)
    if code in _PASSED_THROUGH:
        return CallRejected(code, details or f"receiver: {code.name}", retry_after)
    return CallRejected(grpc.StatusCode.INTERNAL, f"receiver failed with {code.name}: {details}")


def build_channel_server(
    settings: ChannelSettings, metrics: ServiceMetrics | None = None
) -> tuple[grpc.Server, grpc.Channel, Health]:
    """A server bound to settings.host:port, ready to start, and its channel to the receiver."""
    metrics = metrics or ServiceMetrics()
    receiver_credentials = grpc_security.channel_credentials(
        settings.receiver_tls_ca_file, settings.receiver_tls_cert_file, settings.receiver_tls_key_file,
        prefix="GESCO_CHANNEL_RECEIVER_TLS_",
    )
    server_credentials = grpc_security.server_credentials(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file, prefix="GESCO_CHANNEL_TLS_"
    )
    receiver_channel = grpc_security.open_channel(
        grpc_target(settings.receiver_address, "GESCO_CHANNEL_RECEIVER_ADDRESS"), receiver_credentials,
        options=(*transport.CLIENT_CHANNEL_OPTIONS, *balancing_options(RECEIVER_SERVICE_NAME)),
    )
    servicer = ChannelServicer(settings, gesco_pb2_grpc.ReceiverStub(receiver_channel), metrics)
    server, health = build_server(
        CHANNEL_SERVICE_NAME,
        lambda grpc_server: gesco_pb2_grpc.add_ChannelServicer_to_server(servicer, grpc_server),
        f"{settings.host}:{settings.port}",
        server_credentials,
        settings.max_workers,
        metrics,
    )
    return server, receiver_channel, health
