"""What the gesco gRPC servers share: the server itself, its health, and how a call is served.

`build_server` makes a server with the metrics interceptor, the standard health service
(NOT_SERVING until told otherwise) and reflection, bound to its address. `served_call` opens and
closes every call the same way: the request id from the `x-request-id` metadata tags every log
line of the call, one line reports its outcome, and a `CallRejected` (or an InvalidRequestError,
the client's mistake: INVALID_ARGUMENT) ends it with its status and trailing metadata; anything
else is the server's fault, INTERNAL, and logged with its traceback. `require_api_key` checks a
client's API key in the `x-api-key` metadata. `served_call_async` does what `served_call` does for
a grpc.aio handler.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.limits import InvalidRequestError
from shared.wire import grpc_security
from shared.wire.logging_setup import clean_request_id, request_context
from shared.wire.monitoring import ServiceMetrics
from shared.wire.transport import REQUEST_ID_METADATA_KEY, RETRY_AFTER_METADATA_KEY

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# The metadata key of a client's API key (the REST APIs' X-API-Key header).
API_KEY_METADATA_KEY = "x-api-key"


class CallRejected(Exception):
    """Ends a call with `code`, `details` and, when given, a retry-after trailer."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: int | str | None = None) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = () if retry_after_s is None else ((RETRY_AFTER_METADATA_KEY, str(retry_after_s)),)


@dataclass
class Call:
    """One call being served: its request id, and the fields its outcome line carries."""

    request_id: str | None
    fields: dict[str, object] = field(default_factory=dict)


@contextlib.contextmanager
def served_call(context: grpc.ServicerContext, log: logging.Logger, method: str, server: str) -> Iterator[Call]:
    """Serve one call of `method` on `server` (a name for error details): log its outcome with
    the call's fields and end it with the status of what the block raised (OK if nothing)."""
    started = time.perf_counter()
    call = Call(clean_request_id(dict(context.invocation_metadata()).get(REQUEST_ID_METADATA_KEY)))
    with request_context(call.request_id):
        error = None
        try:
            yield call
        except Exception as raised:  # noqa: BLE001 - turned into the call's status by _outcome
            error = raised
        code, details, trailing = _outcome(error, call, log, method, server, started)
        if code is not grpc.StatusCode.OK:
            if trailing:
                context.set_trailing_metadata(trailing)
            context.abort(code, details)


@contextlib.asynccontextmanager
async def served_call_async(context: grpc.aio.ServicerContext, log: logging.Logger, method: str,
                            server: str) -> AsyncIterator[Call]:
    """`served_call` for a grpc.aio handler: the same outcome line and statuses; a call its client
    cancelled (or let expire) is logged as CANCELLED and left to end."""
    started = time.perf_counter()
    call = Call(clean_request_id(dict(context.invocation_metadata() or ()).get(REQUEST_ID_METADATA_KEY)))
    with request_context(call.request_id):
        error = None
        try:
            yield call
        except asyncio.CancelledError:
            _log_outcome(log, method, call, grpc.StatusCode.CANCELLED, "the call ended", started)
            raise
        except Exception as raised:  # noqa: BLE001 - turned into the call's status by _outcome
            error = raised
        code, details, trailing = _outcome(error, call, log, method, server, started)
        if code is not grpc.StatusCode.OK:
            if trailing:
                context.set_trailing_metadata(trailing)
            await context.abort(code, details)


def _outcome(error: Exception | None, call: Call, log: logging.Logger, method: str, server: str,
             started: float) -> tuple[grpc.StatusCode, str, tuple]:
    """The status of a call that raised `error` (None: OK), after logging its outcome line."""
    code, details, trailing = grpc.StatusCode.OK, "", ()
    if isinstance(error, CallRejected):
        code, details, trailing = error.code, error.details, error.trailing
    elif isinstance(error, InvalidRequestError):
        code, details = grpc.StatusCode.INVALID_ARGUMENT, str(error)
    elif error is not None:
        log.error(f"{method} failed", exc_info=error)
        code, details = grpc.StatusCode.INTERNAL, f"internal error in {server}"
    _log_outcome(log, method, call, code, details, started)
    return code, details, trailing


def _log_outcome(log: logging.Logger, method: str, call: Call, code: grpc.StatusCode, details: str,
                 started: float) -> None:
    log.info(method, extra={**call.fields, "code": code.name, "details": details[:300],
                            "duration_ms": round((time.perf_counter() - started) * 1000, 2)})


def require_api_key(context: grpc.ServicerContext, api_key: str) -> None:
    """CallRejected (UNAUTHENTICATED) unless the call carries `api_key` (when one is set) in its
    API_KEY_METADATA_KEY metadata, once; compared in constant time."""
    if not api_key:
        return
    given = [value for key, value in context.invocation_metadata() if key == API_KEY_METADATA_KEY]
    if len(given) != 1 or not secrets.compare_digest(given[0].encode(), api_key.encode()):
        raise CallRejected(grpc.StatusCode.UNAUTHENTICATED,
                           f"{API_KEY_METADATA_KEY}: a valid API key is required in the {API_KEY_METADATA_KEY} metadata")


def caller_gone(context: grpc.ServicerContext) -> bool:
    """The call was cancelled or its deadline has passed."""
    remaining = context.time_remaining()
    return not context.is_active() or (remaining is not None and remaining <= 0)


class Health:
    """The standard health service of a server of `service_name`, NOT_SERVING until it is set."""

    def __init__(self, service_name: str) -> None:
        self.service_name = service_name
        self.servicer = health.HealthServicer()
        self.set_serving(False)

    def set_serving(self, serving: bool) -> None:
        """Say SERVING (or NOT_SERVING) for the server as a whole and for its service."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", self.service_name):
            self.servicer.set(name, status)


def build_server(
    service_name: str,
    add_servicer: Callable[[grpc.Server], None],
    address: str,
    credentials: grpc.ServerCredentials | None,
    max_workers: int,
    metrics: ServiceMetrics,
    options: Sequence[tuple[str, Any]] = (),
) -> tuple[grpc.Server, Health]:
    """A server of `service_name` (added by `add_servicer`) with metrics, health and reflection,
    bound to `address` (TLS when credentials are given) and ready to start; `options` are gRPC
    channel arguments (a larger grpc.max_receive_message_length...)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=[metrics.grpc_interceptor()], options=options)
    add_servicer(server)
    server_health = Health(service_name)
    health_pb2_grpc.add_HealthServicer_to_server(server_health.servicer, server)
    reflection.enable_server_reflection((service_name, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    grpc_security.add_port(server, address, credentials)
    return server, server_health
