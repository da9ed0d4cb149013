"""Serving a REST app with uvicorn so that SIGTERM and SIGINT end the process with status 0.

uvicorn turns the signal into a graceful shutdown (the app's lifespan runs its cleanup), then
raises the signal again for the handler that was installed before it. With Python's default
handlers the process would then die of SIGTERM (status -15, which launchers and orchestrators
report as a kill) or end in a KeyboardInterrupt traceback; a no-op handler lets `serve` return.
"""
from __future__ import annotations

import signal

import uvicorn
from fastapi import FastAPI


def serve(app: FastAPI, host: str, port: int, graceful_shutdown_s: float) -> None:
    """Serve `app` until SIGTERM or SIGINT, then return once it has shut down."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_config=None,
                timeout_graceful_shutdown=int(graceful_shutdown_s) or None)
