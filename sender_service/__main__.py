"""`python -m sender_service`: serve the sender's REST API on GESCO_SENDER_HOST:GESCO_SENDER_PORT
and its gRPC API on GESCO_SENDER_GRPC_PORT until SIGTERM or SIGINT, then exit with status 0."""
from __future__ import annotations

from sender_service.app import create_app
from sender_service.settings import SenderSettings
from shared.wire.logging_setup import configure_logging
from shared.wire.rest_server import serve

# In-flight requests get this long to finish once a shutdown signal arrives.
SHUTDOWN_GRACE_S = 5.0


def main() -> None:
    settings = SenderSettings()
    configure_logging("sender", settings.log_level)
    serve(create_app(settings, grpc_api=True), settings.host, settings.port, SHUTDOWN_GRACE_S)


if __name__ == "__main__":
    main()
