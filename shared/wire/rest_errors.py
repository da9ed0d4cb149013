"""The one error body of both REST APIs: `{"error": {"field": ..., "message": ...}}`.

`field` names the form field, query or path parameter or header to blame (null when none is);
some errors add keys beside them (`grpc_code`, `id`, `status`, `errors`). `add_error_handlers`
gives every failure this shape: a request that fails validation (422, naming the first bad field
and listing all under `errors`), an `ApiError` a route raises, Starlette's HTTP errors (404 for
an unknown path...), a body over `BodySizeLimit` (413) and anything unexpected (500).
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# Set in the ASGI scope by BodySizeLimit when a streamed body passes the limit: (message, field).
BODY_TOO_LARGE_SCOPE_KEY = "gesco.body_too_large"
_LOCATION_KINDS = ("body", "query", "path", "header", "cookie")


def error_response(
    status_code: int,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The API's error body with `status_code`."""
    return JSONResponse({"error": {"field": field, "message": message, **extra}}, status_code=status_code,
                        headers=headers)


class ApiError(Exception):
    """Raised by a route to answer with the error body."""

    def __init__(self, status_code: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.field = field
        self.headers = headers
        self.extra = extra

    def response(self) -> JSONResponse:
        return error_response(self.status_code, self.message, self.field, self.headers, **self.extra)


def validation_error(field: str, message: str) -> RequestValidationError:
    """A 422 naming `field`, for a check that FastAPI's declarations cannot express."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message}])


class BodySizeLimit:
    """Cap the request body at `max_body_size` bytes with a 413 saying `message` about `field`.

    A declared Content-Length over the limit is refused before anything is read; a streamed body
    is cut off once it passes the limit (the form parser's error then becomes the same 413).
    """

    def __init__(self, app, max_body_size: int, message: str, field: str | None = None) -> None:
        self.app = app
        self.max_body_size = max_body_size
        self.message = message
        self.field = field

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_size:
            await error_response(413, self.message, self.field)(scope, receive, send)
            return
        received = 0

        async def receive_with_limit():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_size:
                    scope[BODY_TOO_LARGE_SCOPE_KEY] = (self.message, self.field)
                    raise BodyTooLargeError
            return message

        await self.app(scope, receive_with_limit, send)


class BodyTooLargeError(Exception):
    """Raised into the form parser when a streamed body passes the limit."""


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` with the error body."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field_name(error.get("loc", ())), "message": error.get("msg", "invalid")}
                  for error in exc.errors()]
        first = errors[0] if errors else {"field": None, "message": "invalid request"}
        return error_response(422, first["message"], field=first["field"], errors=errors)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        too_large = request.scope.get(BODY_TOO_LARGE_SCOPE_KEY)
        if too_large:
            return error_response(413, *too_large)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")


def _field_name(location: tuple | list) -> str | None:
    names = [str(part) for part in location if part not in _LOCATION_KINDS]
    return names[0] if names else None
