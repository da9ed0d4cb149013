"""Optional API key of the sender's REST API, checked before any request body is read.

With GESCO_SENDER_API_KEY set, every request except the health, metrics and docs endpoints must
carry it in the `X-API-Key` header; others get the API's JSON error with 401. The key is compared
in constant time and never logged or echoed.
"""
from __future__ import annotations

import secrets

from shared.wire.rest_errors import error_response

API_KEY_HEADER = "X-API-Key"
# Probes, scrapers, the docs pages and the web page work without the key (the schema and the
# page reveal no secret; the page asks for the key and sends it with its API calls).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json", "/"})
# Static assets of the docs pages and the web page.
OPEN_PREFIXES = ("/docs/", "/static/")


class ApiKeyGuard:
    """ASGI middleware: 401 for a missing or wrong key on any path outside OPEN_PATHS."""

    def __init__(self, app, api_key: str) -> None:
        if not api_key:
            raise ValueError("an empty API key would let every request through; do not add the guard")
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or _open(scope["path"]) or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(401, f"a valid API key is required in the {API_KEY_HEADER} header",
                                  field=API_KEY_HEADER,
                                  headers={"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'})
        await response(scope, receive, send)

    def _authorised(self, scope) -> bool:
        name = API_KEY_HEADER.lower().encode()
        given = [value for key, value in scope["headers"] if key == name]
        return len(given) == 1 and secrets.compare_digest(given[0], self._key)


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
