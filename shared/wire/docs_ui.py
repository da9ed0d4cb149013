"""Swagger UI and ReDoc served from a packaged distribution, so no service loads them from a CDN.

`mount_local_docs(app)` serves Swagger UI at GET /docs (with "Try it out") and ReDoc at GET
/redoc. Their JavaScript and CSS come from the `fastapi-offline` wheel (a pinned copy of
swagger-ui-dist and the ReDoc standalone bundle) and are served by the app itself under
/docs/assets/. Create the app with `docs_url=None, redoc_url=None` so FastAPI's CDN-backed pages
are never registered.

With `api_key_header` the schema declares that header as an API key, so Swagger UI's "Authorize"
button sends it with every "Try it out" request.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
# Everything the pages load lives under this prefix; the API key guard leaves it open.
DOCS_PREFIX = "/docs"
ASSETS_PATH = f"{DOCS_PREFIX}/assets"
REDOC_PATH = "/redoc"
REDOC_REMOTE_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
API_KEY_SCHEME = "ApiKey"
# Swagger UI would send the schema to an online validator for its badge: never.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None, "displayRequestDuration": True, "persistAuthorization": True}


def mount_local_docs(
    app: FastAPI, api_key_header: str | None = None, open_paths: Iterable[str] = ()
) -> None:
    """Serve Swagger UI at /docs, ReDoc at /redoc and their assets, all hidden from the schema.

    `api_key_header`: the header every operation needs, except those at `open_paths`.
    """
    if app.openapi_url is None:
        raise ValueError("the app has no openapi_url; there is nothing to document")
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("create the app with docs_url=None, redoc_url=None (their pages use a CDN)")
    missing = [name for name in ASSETS_FILES if not (ASSETS_DIR / name).is_file()]
    if missing:
        raise RuntimeError(f"the fastapi-offline distribution lacks {missing}; reinstall it")
    if api_key_header:
        _declare_api_key(app, api_key_header, frozenset(open_paths))
    openapi_url = app.openapi_url
    oauth2_redirect_url = f"{DOCS_PREFIX}/oauth2-redirect"
    redoc_bundle = redoc_bundle_without_remote_logo()

    @app.get(f"{ASSETS_PATH}/redoc.standalone.js", include_in_schema=False)
    def redoc_js() -> Response:  # before the mount, which would serve the file as it is
        return Response(redoc_bundle, media_type="text/javascript")

    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get(DOCS_PREFIX, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=oauth2_redirect_url,
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_PATH, include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )


def redoc_bundle_without_remote_logo() -> bytes:
    """The ReDoc bundle, its one remote image (Redocly's logo in the sidebar footer, from their
    CDN) pointed at an empty data URL: the image fails at once and hides itself, as it does
    offline, and the page makes no outside request."""
    bundle = (ASSETS_DIR / "redoc.standalone.js").read_bytes()
    if REDOC_REMOTE_LOGO not in bundle:
        raise RuntimeError("the ReDoc bundle changed: check it for remote URLs and update REDOC_REMOTE_LOGO")
    return bundle.replace(REDOC_REMOTE_LOGO, b"data:,")


def _declare_api_key(app: FastAPI, header: str, open_paths: frozenset[str]) -> None:
    """Add the header as an apiKey security scheme that every operation outside `open_paths` needs."""
    build_schema = app.openapi

    def openapi_with_key() -> dict:
        schema = build_schema()  # FastAPI caches it: the scheme is added once
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        if API_KEY_SCHEME not in schemes:
            schemes[API_KEY_SCHEME] = {"type": "apiKey", "in": "header", "name": header}
            schema["security"] = [{API_KEY_SCHEME: []}]
            for path in open_paths & schema.get("paths", {}).keys():
                for operation in schema["paths"][path].values():
                    operation["security"] = []
        return schema

    app.openapi = openapi_with_key  # type: ignore[method-assign]
