"""Optional API key of a REST API (the sender's and the receiver's), checked before any request
body is read.

With a key set, every request outside the service's open paths must carry it in the `X-API-Key`
header; others get the API's JSON error with 401. The key is compared in constant time and never
logged or echoed.
"""
from __future__ import annotations

import secrets
from collections.abc import Iterable

from shared.wire.rest_errors import error_response

API_KEY_HEADER = "X-API-Key"


class ApiKeyGuard:
    """ASGI middleware: 401 for a missing or wrong key on any path but `open_paths` and those
    starting with one of `open_prefixes`."""

    def __init__(self, app, api_key: str, open_paths: Iterable[str] = (), open_prefixes: Iterable[str] = ()) -> None:
        if not api_key:
            raise ValueError("an empty API key would let every request through; do not add the guard")
        self.app = app
        self._key = api_key.encode()
        self._open_paths = frozenset(open_paths)
        self._open_prefixes = tuple(open_prefixes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self._open(scope["path"]) or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(401, f"a valid API key is required in the {API_KEY_HEADER} header",
                                  field=API_KEY_HEADER,
                                  headers={"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'})
        await response(scope, receive, send)

    def _open(self, path: str) -> bool:
        return path in self._open_paths or path.startswith(self._open_prefixes)

    def _authorised(self, scope) -> bool:
        name = API_KEY_HEADER.lower().encode()
        given = [value for key, value in scope["headers"] if key == name]
        return len(given) == 1 and secrets.compare_digest(given[0], self._key)
