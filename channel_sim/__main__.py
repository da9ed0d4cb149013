"""`python -m channel_sim`: serve Channel.Transmit until SIGTERM or SIGINT."""
from __future__ import annotations

import logging
import signal
import threading

from channel_sim.server import build_channel_server
from channel_sim.settings import ChannelSettings
from shared.wire.logging_setup import configure_logging
from shared.wire.monitoring import ServiceMetrics, start_metrics_server

log = logging.getLogger("channel_sim")


def main() -> None:
    settings = ChannelSettings()
    configure_logging("channel_sim", settings.log_level)
    metrics = ServiceMetrics()
    server, receiver_channel, health = build_channel_server(settings, metrics)
    metrics_port, stop_metrics = start_metrics_server(metrics, settings.host, settings.metrics_port)
    log.info("metrics listening", extra={"address": f"{settings.host}:{metrics_port}"})
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    health.set_serving(True)
    log.info("listening", extra={"address": f"{settings.host}:{settings.port}",
                                 "receiver_address": settings.receiver_address})
    stop.wait()
    log.info("shutting down", extra={"grace_s": settings.shutdown_grace_s})
    health.set_serving(False)
    server.stop(settings.shutdown_grace_s).wait()
    receiver_channel.close()
    stop_metrics()


if __name__ == "__main__":
    main()
