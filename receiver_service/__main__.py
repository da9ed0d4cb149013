"""`python -m receiver_service`: REST on http_port (uvicorn, main thread), gRPC on grpc_port.

uvicorn turns SIGTERM/SIGINT into the app's lifespan shutdown, which stops the gRPC server and
the worker, so one signal shuts the whole process down cleanly.
"""
from __future__ import annotations

import logging
import os
import signal

import uvicorn

from receiver_service.app import create_app
from receiver_service.settings import ReceiverSettings
from shared.logging_setup import configure_logging


def main() -> None:
    settings = ReceiverSettings()
    configure_logging("receiver_service", settings.log_level)
    # After its graceful shutdown uvicorn re-raises the signal to the handler that was installed
    # before it; a no-op one lets main() return, so a clean shutdown exits with status 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.http_port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
    )
    if app.state.worker.busy:
        # Sampling cannot be interrupted, and torch aborts the process when the interpreter
        # finalises under a thread still computing. Leave now: the job stays "running" on disk
        # and the next start marks it failed.
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    main()
