"""A grpc.aio server on an event loop of its own thread, started and stopped from synchronous code.

An asyncio server holds thousands of open streams (watches) on that one thread, where a
synchronous server needs a thread per stream. The services' lifespans and tests drive it as they
drive `grpc.Server`: `start()`, `stop(grace)` returning an event, and a health whose
`set_serving` may be called from any thread. Blocking work (a store on disk or in Redis, reading
a stream into memory) belongs on executors' threads, never on the loop: the server shuts down the
executors it is given when it stops.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.wire import grpc_security
from shared.wire.grpc_service import HEALTH_SERVICE_NAME
from shared.wire.monitoring import ServiceMetrics

T = TypeVar("T")
# How long a synchronous caller waits for the loop to do something short (start, a health change).
LOOP_CALL_TIMEOUT_S = 30.0


class LoopThread:
    """An event loop running in a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float | None = LOOP_CALL_TIMEOUT_S) -> T:
        """Run `coroutine` on the loop and return its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self.loop.is_running()

    def stop(self) -> None:
        """Cancel what still runs on the loop, then end it (from the loop; once)."""
        if self._stopping:
            return
        self._stopping = True
        for task in asyncio.all_tasks(self.loop):
            if task is not asyncio.current_task(self.loop):
                task.cancel()
        self.loop.call_soon(self.loop.stop)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            except BaseException:  # noqa: BLE001 - the process is ending this loop anyway
                pass
            self.loop.close()


class AioHealth:
    """`grpc_service.Health` for a grpc.aio server: NOT_SERVING until set, settable from any thread."""

    def __init__(self, service_name: str, loop_thread: LoopThread) -> None:
        self.service_name = service_name
        self.servicer = health.aio.HealthServicer()
        self._loop_thread = loop_thread

    def set_serving(self, serving: bool) -> None:
        if self._loop_thread.running:
            self._loop_thread.call(self._set(serving))

    async def _set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", self.service_name):
            await self.servicer.set(name, status)


class AioServer:
    """A grpc.aio server of `service_name` with metrics, health (NOT_SERVING) and reflection,
    bound to `address` (TLS with credentials) on a loop thread of its own, ready to start.

    `add_servicer(server, loop_thread)` adds the service (on the loop, so that what it creates
    belongs to it); `executors`, those its handlers run blocking work on, are shut down at the stop.
    """

    def __init__(
        self,
        service_name: str,
        add_servicer: Callable[[grpc.aio.Server, LoopThread], Awaitable[None] | None],
        address: str,
        credentials: grpc.ServerCredentials | None,
        metrics: ServiceMetrics,
        options: Sequence[tuple[str, Any]] = (),
        thread_name: str = "grpc-aio",
        executors: Sequence[Executor] = (),
    ) -> None:
        self._executors = tuple(executors)
        self.loop_thread = LoopThread(thread_name)
        self.health = AioHealth(service_name, self.loop_thread)
        self._stopped = threading.Event()
        try:
            self.server = self.loop_thread.call(self._build(service_name, add_servicer, address, credentials,
                                                            metrics, options))
        except BaseException:
            self._close()
            raise

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.loop_thread.loop

    async def _build(self, service_name, add_servicer, address, credentials, metrics, options) -> grpc.aio.Server:
        server = grpc.aio.server(interceptors=[metrics.aio_grpc_interceptor()], options=options)
        added = add_servicer(server, self.loop_thread)
        if added is not None:
            await added
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection((service_name, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        grpc_security.add_port(server, address, credentials)
        await self.health._set(False)
        return server

    def start(self) -> None:
        self.loop_thread.call(self.server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, give the ones in progress `grace` seconds, then end the loop; the
        event is set once all that is done (as grpc.Server.stop's)."""
        if self.loop_thread.running:
            future = asyncio.run_coroutine_threadsafe(self._stop(grace), self.loop)
            future.add_done_callback(lambda _: self._close())
        else:
            self._close()
        return self._stopped

    async def _stop(self, grace: float | None) -> None:
        try:
            await self.server.stop(grace)
        finally:
            self.loop_thread.stop()

    def _close(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)
        if self.loop_thread.running:
            try:
                self.loop.call_soon_threadsafe(self.loop_thread.stop)
            except RuntimeError:  # closed in between
                pass
        self._stopped.set()
