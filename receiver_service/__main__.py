"""`python -m receiver_service`: REST on http_port (uvicorn, main thread), gRPC on grpc_port.

uvicorn turns SIGTERM/SIGINT into the app's lifespan shutdown, which stops the gRPC server and
the worker, so one signal shuts the whole process down cleanly.
"""
from __future__ import annotations

import logging
import os

from receiver_service.app import create_app
from receiver_service.settings import ReceiverSettings
from shared.wire.logging_setup import configure_logging
from shared.wire.rest_server import serve


def main() -> None:
    settings = ReceiverSettings()
    configure_logging("receiver_service", settings.log_level)
    app = create_app(settings)
    serve(app, settings.host, settings.http_port, settings.shutdown_grace_s)  # returns on SIGTERM/SIGINT
    if app.state.receiver.worker.busy:
        # A batch is still sampling, and torch aborts the process when the interpreter finalises
        # under a thread still computing. Leave now: on disk the job stays "running" and the
        # next start marks it failed; a shared store has already handed it to another replica.
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    main()
