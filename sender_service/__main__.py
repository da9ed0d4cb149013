"""`python -m sender_service`: serve the sender's REST API on GESCO_SENDER_HOST:GESCO_SENDER_PORT."""
from __future__ import annotations

import uvicorn

from sender_service.app import create_app
from sender_service.settings import SenderSettings
from shared.logging_setup import configure_logging


def main() -> None:
    settings = SenderSettings()
    configure_logging("sender", settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
