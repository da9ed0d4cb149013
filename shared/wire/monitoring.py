"""Prometheus metrics of one service process: a registry, the families the services record, and
the ASGI middleware and gRPC server interceptor that count every request.

Each process (each app, in tests) owns its registry, so two apps in one process never share
counts. Label values are bounded: REST requests are labelled by route template ("unmatched" for
any path no route serves), gRPC calls by registered method name.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from fastapi.routing import iter_route_contexts
from starlette.responses import Response
from starlette.routing import BaseRoute, Match

# Seconds; sampling on a CPU takes minutes, a health check microseconds.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
UNMATCHED_ROUTE = "unmatched"


class ServiceMetrics:
    """The metric families of one service; `queue=True` adds queue depth and batch size."""

    def __init__(self, queue: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # resident memory, CPU time, open fds
        self.http_requests = Counter(
            "gesco_http_requests", "REST requests by route template, method and status code",
            ["route", "method", "status"], registry=self.registry,
        )
        self.http_duration = Histogram(
            "gesco_http_request_duration_seconds", "REST request latency by route template and method",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.grpc_requests = Counter(
            "gesco_grpc_requests", "gRPC calls served, by method and status code",
            ["method", "code"], registry=self.registry,
        )
        self.grpc_duration = Histogram(
            "gesco_grpc_request_duration_seconds", "gRPC call latency by method",
            ["method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.stage_duration = Histogram(
            "gesco_stage_duration_seconds", "time one request or job spent in a pipeline stage",
            ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth: Gauge | None = None
        self.batch_size: Histogram | None = None
        if queue:
            self.queue_depth = Gauge(
                "gesco_queue_depth", "jobs waiting in the queue (not yet running)", registry=self.registry
            )
            self.batch_size = Histogram(
                "gesco_batch_size", "jobs sampled together in one batch",
                buckets=BATCH_SIZE_BUCKETS, registry=self.registry,
            )

    def track_thread_cpu(self, names: Sequence[str]) -> None:
        """gesco_thread_cpu_seconds{thread=name}: the CPU time of each named thread of this process
        (Linux), read at each scrape; NaN while no such thread runs. What an event loop serving
        many streams costs beside the thread that samples, say."""
        gauge = Gauge("gesco_thread_cpu_seconds", "CPU time of a named thread of the process",
                      ["thread"], registry=self.registry)
        for name in names:
            gauge.labels(thread=name).set_function(lambda name=name: thread_cpu_seconds(name))

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_duration.labels(stage=stage).observe(seconds)

    @contextlib.contextmanager
    def time_stage(self, stage: str) -> Iterator[None]:
        """Observe the time spent in the block as `stage` (also when it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe_stage(stage, time.perf_counter() - started)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def response(self) -> Response:
        """GET /metrics of a REST app."""
        return Response(self.exposition(), media_type=CONTENT_TYPE_LATEST)

    def grpc_interceptor(self) -> grpc.ServerInterceptor:
        return GrpcMetricsInterceptor(self)

    def aio_grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        return AioGrpcMetricsInterceptor(self)


class HttpMetricsMiddleware:
    """ASGI middleware counting every HTTP response by route template, method and status.

    Add it last (outermost), so responses of the other middlewares (413, 401) are counted too.
    """

    def __init__(self, app, metrics: ServiceMetrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_template(self.routes, scope)
        started = time.perf_counter()
        status = 500  # an exception that escapes every handler ends as a 500

        async def send_with_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            method = scope["method"]
            self.metrics.http_requests.labels(route=route, method=method, status=str(status)).inc()
            self.metrics.http_duration.labels(route=route, method=method).observe(time.perf_counter() - started)


def route_template(routes: list[BaseRoute], scope) -> str:
    """The path template of the route serving `scope` ("/v1/transmissions/{transmission_id}"),
    looking into the routers an app includes."""
    partial = None
    for route in iter_route_contexts(routes):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return getattr(route, "path", UNMATCHED_ROUTE)
        if match is Match.PARTIAL and partial is None:
            partial = getattr(route, "path", UNMATCHED_ROUTE)
    return partial or UNMATCHED_ROUTE


def observed_handler(handler: grpc.RpcMethodHandler, method: str, unary: Callable, streaming: Callable):
    """`handler` with its behaviour wrapped by `unary(behavior, method)` or `streaming(behavior,
    method)`, whichever its kind of call takes (the metrics interceptors, sync and aio, share it)."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary, method), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream, method), handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(
        streaming(handler.stream_stream, method), handler.request_deserializer, handler.response_serializer)


class GrpcMetricsInterceptor(grpc.ServerInterceptor):
    """Counts every call of a registered method by its final status code, and times it."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return observed_handler(handler, handler_call_details.method, self._unary, self._streaming)

    def _unary(self, behavior: Callable, method: str) -> Callable:
        def observed(request, context):
            started = time.perf_counter()
            failed = True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                self._record(method, context, failed, started)

        return observed

    def _streaming(self, behavior: Callable, method: str) -> Callable:
        def observed(request, context):
            started = time.perf_counter()
            failed = True
            try:
                yield from behavior(request, context)
                failed = False
            finally:
                self._record(method, context, failed, started)

        return observed

    def _record(self, method: str, context, failed: bool, started: float) -> None:
        code = _final_code(context, failed)
        self.metrics.grpc_requests.labels(method=method, code=code.name).inc()
        self.metrics.grpc_duration.labels(method=method).observe(time.perf_counter() - started)


class AioGrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """GrpcMetricsInterceptor for a grpc.aio server, whose handlers are coroutines and async
    generators; a call whose client went away (its handler cancelled) counts as CANCELLED."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return observed_handler(handler, handler_call_details.method, self._unary, self._streaming)

    def _unary(self, behavior: Callable, method: str) -> Callable:
        async def observed(request, context):
            started, outcome = time.perf_counter(), "failed"
            try:
                response = await behavior(request, context)
                outcome = "ok"
                return response
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                self._record(method, context, outcome, started)

        return observed

    def _streaming(self, behavior: Callable, method: str) -> Callable:
        if not inspect.isasyncgenfunction(behavior):  # a handler that writes with context.write
            return self._unary(behavior, method)

        async def observed(request, context):
            started, outcome = time.perf_counter(), "failed"
            try:
                async for response in behavior(request, context):
                    yield response
                outcome = "ok"
            except (asyncio.CancelledError, GeneratorExit):
                outcome = "cancelled"
                raise
            finally:
                self._record(method, context, outcome, started)

        return observed

    def _record(self, method: str, context, outcome: str, started: float) -> None:
        code = context.code()
        if not isinstance(code, grpc.StatusCode):
            code = {"ok": grpc.StatusCode.OK, "cancelled": grpc.StatusCode.CANCELLED}.get(outcome,
                                                                                    grpc.StatusCode.UNKNOWN)
        self.metrics.grpc_requests.labels(method=method, code=code.name).inc()
        self.metrics.grpc_duration.labels(method=method).observe(time.perf_counter() - started)


def thread_cpu_seconds(name: str) -> float:
    """CPU seconds of the live thread called `name`; NaN if there is none (or no such clock)."""
    for thread in threading.enumerate():
        if thread.name == name and thread.ident is not None:
            try:
                return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, AttributeError):  # it ended meanwhile, or not Linux
                return math.nan
    return math.nan


def _final_code(context, failed: bool) -> grpc.StatusCode:
    """The status a handler ended with: the code it set or aborted with, else OK, CANCELLED or
    UNKNOWN."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if not failed:
        return grpc.StatusCode.OK
    # A handler that failed on a call its client cancelled or let expire.
    return grpc.StatusCode.UNKNOWN if context.is_active() else grpc.StatusCode.CANCELLED


def start_metrics_server(metrics: ServiceMetrics, host: str, port: int) -> tuple[int, Callable[[], None]]:
    """Serve GET /metrics on host:port (0: any free port) in a daemon thread (for a gRPC-only
    service); return the port it listens on, and stop."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return server.server_port, stop

