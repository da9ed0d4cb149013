"""The sender's gRPC API, gesco.v1.Sender/Transmit: one image in, the transmission's id, record and
URLs out, as POST /v1/transmissions answers them.

`python -m sender_service` serves it beside the REST API on GESCO_SENDER_GRPC_PORT, with the
standard health service (SERVING once the segmenter has loaded, as /readyz), reflection, the
gRPC metrics of the REST API's /metrics, optional TLS (GESCO_SENDER_GRPC_TLS_*) and the sender's
optional API key, carried in the `x-api-key` metadata. A call takes the REST route's path
(`transmissions.send_transmission`): its coroutine runs on the REST server's event loop, where the
channel simulator's asyncio client lives, while the gRPC worker thread waits for it. A caller that
goes away before the answer cancels it there, with the channel call and its hops: nobody would
learn the transmission's id. Errors are gRPC status codes whose details start with the request
field to blame (`snr_db: Input should be less than or equal to 100`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any

import grpc
from google.protobuf import json_format

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from sender_service.transmissions import (
    SenderState,
    TransmissionAccepted,
    TransmissionError,
    parse_parameters,
    send_transmission,
)
from shared.wire import transport
from shared.wire.grpc_service import CallRejected, Health, build_server, require_api_key, served_call
from shared.wire.logging_setup import request_context

log = logging.getLogger("sender_service.grpc")

SENDER_SERVICE_NAME = gesco_pb2.DESCRIPTOR.services_by_name["Sender"].full_name
GRPC_WORKERS = 8
# Room for the fields around the image in a request.
REQUEST_OVERHEAD_BYTES = 64 * 1024
# TransmitRequest fields that are the REST form's fields of the same name; `image` is its file.
PARAMETER_FIELDS = tuple(field.name for field in gesco_pb2.TransmitRequest.DESCRIPTOR.fields if field.name != "image")
# The REST names of the request fields whose gRPC names differ.
_GRPC_FIELD_NAMES = {"file": "image"}


class SenderServicer(gesco_pb2_grpc.SenderServicer):
    def __init__(self, state: SenderState, loop: asyncio.AbstractEventLoop, api_key: str) -> None:
        self._state = state
        self._loop = loop
        self._api_key = api_key

    def Transmit(self, request: gesco_pb2.TransmitRequest, context: grpc.ServicerContext) -> gesco_pb2.TransmitResponse:
        with served_call(context, log, "transmit", "the sender") as call:
            require_api_key(context, self._api_key)
            transmission_id = transport.new_transmission_id()
            call.fields["transmission_id"] = transmission_id
            with request_context(transmission_id):
                try:
                    accepted = self._send(request, transmission_id, context)
                except TransmissionError as error:
                    raise CallRejected(error.code, _details(error), error.retry_after_s) from None
            call.fields["queue_position"] = accepted.queue_position
        return json_format.ParseDict(accepted.model_dump(mode="json"), gesco_pb2.TransmitResponse(),
                                     ignore_unknown_fields=True)

    def _send(self, request: gesco_pb2.TransmitRequest, transmission_id: str,
              context: grpc.ServicerContext) -> TransmissionAccepted:
        """Run the REST route's path on the event loop and wait for it; cancelled with the call."""
        parameters = parse_parameters(request_parameters(request))
        future = asyncio.run_coroutine_threadsafe(
            send_transmission(self._state, request.image, parameters, transmission_id), self._loop)
        context.add_callback(future.cancel)  # the call ended: a no-op once the answer is in
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise CallRejected(grpc.StatusCode.CANCELLED, "the caller went away; the transmission was cancelled") from None


def request_parameters(request: gesco_pb2.TransmitRequest) -> dict[str, Any]:
    """The parameters a request sets, by their REST form names (unset ones take the form's defaults)."""
    return {name: getattr(request, name) for name in PARAMETER_FIELDS if request.HasField(name)}


def _details(error: TransmissionError) -> str:
    """The error's message, after the request field to blame when there is one."""
    if error.field is None:
        return error.message
    return f"{_GRPC_FIELD_NAMES.get(error.field, error.field)}: {error.message}"


def build_grpc_api(state: SenderState, loop: asyncio.AbstractEventLoop,
                   credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, Health]:
    """The Sender service with health (NOT_SERVING for now) and reflection, bound to the sender's
    host and gRPC port, taking requests as large as the REST API's uploads."""
    settings = state.settings
    servicer = SenderServicer(state, loop, settings.api_key.get_secret_value())
    return build_server(
        SENDER_SERVICE_NAME,
        lambda server: gesco_pb2_grpc.add_SenderServicer_to_server(servicer, server),
        f"{settings.host}:{settings.grpc_port}",
        credentials,
        GRPC_WORKERS,
        state.metrics,
        options=(("grpc.max_receive_message_length", settings.max_upload_bytes + REQUEST_OVERHEAD_BYTES),),
    )


def serve_when_ready(state: SenderState, health: Health) -> None:
    """Say SERVING once the segmenter has loaded (in a thread: loading takes seconds); a segmenter
    that failed to load leaves the health NOT_SERVING, as /readyz stays 503."""

    def wait() -> None:
        if state.segmenter.wait():
            health.set_serving(True)

    threading.Thread(target=wait, name="grpc-health", daemon=True).start()
