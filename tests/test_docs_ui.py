"""Swagger UI and ReDoc from the packaged distribution: local assets only, API key scheme declared.

The pages' behaviour in a browser ("Try it out" against a running sender) is checked in
tests/test_web_page.py, where the services run.
"""
from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared.wire.docs_ui import ASSETS_PATH, mount_local_docs

URL = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|url: ?'([^']+)'""")


def make_app(**kwargs) -> FastAPI:
    app = FastAPI(title="demo", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/things")
    def things() -> dict[str, str]:
        return {}

    mount_local_docs(app, **kwargs)
    return app


@pytest.fixture
def client() -> TestClient:
    return TestClient(make_app())


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_load_every_asset_from_the_app_itself(client, page) -> None:
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "http://" not in response.text and "https://" not in response.text
    urls = [next(group for group in match if group) for match in URL.findall(response.text)]
    assert "/openapi.json" in urls
    assets = [url for url in urls if url != "/openapi.json"]
    assert assets and all(url.startswith(f"{ASSETS_PATH}/") for url in assets), assets
    for url in assets:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url


def test_swagger_ui_is_the_real_bundle_without_the_online_validator(client) -> None:
    page = client.get("/docs").text
    assert "SwaggerUIBundle(" in page and '"validatorUrl": null' in page
    bundle = client.get(f"{ASSETS_PATH}/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert len(bundle.content) > 500_000  # the full swagger-ui-dist bundle, not a placeholder
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_docs_routes_stay_out_of_the_schema(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/healthz", "/v1/things"}
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


def test_an_api_key_header_is_declared_except_on_open_paths() -> None:
    client = TestClient(make_app(api_key_header="X-API-Key", open_paths={"/healthz", "/missing"}))
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schema["security"] == [{"ApiKey": []}]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/v1/things"]["post"]
    assert client.get("/openapi.json").json() == schema  # declared once, however often it is served


@pytest.mark.parametrize("kwargs", [{"docs_url": "/docs"}, {"redoc_url": "/redoc"}, {"openapi_url": None}])
def test_apps_with_cdn_pages_or_no_schema_are_refused(kwargs) -> None:
    app = FastAPI(**{"docs_url": None, "redoc_url": None, **kwargs})
    with pytest.raises(ValueError):
        mount_local_docs(app)


def test_the_senders_key_guard_leaves_the_docs_pages_and_their_assets_open() -> None:
    from sender_service.auth import OPEN_PATHS, OPEN_PREFIXES, ApiKeyGuard

    app = make_app(api_key_header="X-API-Key")
    app.add_middleware(ApiKeyGuard, api_key="secret", open_paths=OPEN_PATHS, open_prefixes=OPEN_PREFIXES)
    client = TestClient(app)
    for path in ("/docs", "/redoc", f"{ASSETS_PATH}/swagger-ui-bundle.js", f"{ASSETS_PATH}/redoc.standalone.js",
                 "/docs/oauth2-redirect", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.post("/v1/things").status_code == 401
    assert client.post("/v1/things", headers={"X-API-Key": "secret"}).status_code == 200


def test_the_redoc_bundle_loads_nothing_from_a_cdn(client) -> None:
    bundle = client.get(f"{ASSETS_PATH}/redoc.standalone.js")
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("text/javascript")
    assert b"cdn." not in bundle.content and len(bundle.content) > 500_000
