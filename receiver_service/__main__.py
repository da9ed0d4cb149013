"""`python -m receiver_service`: REST on http_port (uvicorn, main thread), gRPC on grpc_port.

uvicorn turns SIGTERM/SIGINT into the app's lifespan shutdown, which stops the gRPC server and
the worker, so one signal shuts the whole process down cleanly.
"""
from __future__ import annotations

import uvicorn

from receiver_service.app import create_app
from receiver_service.settings import ReceiverSettings
from shared.logging_setup import configure_logging


def main() -> None:
    settings = ReceiverSettings()
    configure_logging("receiver_service", settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.http_port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
    )


if __name__ == "__main__":
    main()
