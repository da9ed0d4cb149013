"""The sender's optional API key (GESCO_SENDER_API_KEY): which paths stay open without it.

The guard itself is shared with the receiver (shared/wire/api_key.py).
"""
from __future__ import annotations

from shared.wire.api_key import API_KEY_HEADER, ApiKeyGuard

__all__ = ["API_KEY_HEADER", "OPEN_PATHS", "OPEN_PREFIXES", "ApiKeyGuard"]

# Probes, scrapers, the docs pages and the web page work without the key (the schema, the
# options the page builds its form from and the page reveal no secret; the page asks for the key
# and sends it with its API calls).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json", "/", "/v1/options"})
# Static assets of the docs pages and the web page.
OPEN_PREFIXES = ("/docs/", "/static/")
