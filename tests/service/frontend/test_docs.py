"""/docs and /redoc load only this server's files (the Swagger UI and ReDoc bundles of the
fastapi-offline package), so the API docs work with no network. The browser half is in tests/e2e."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.frontend.routes.docs import ASSETS, ASSETS_URL

ABSOLUTE_URL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""")


@pytest.mark.parametrize(("page", "scripts"), [("/docs", ["swagger-ui-bundle.js"]),
                                                ("/redoc", ["redoc.standalone.js"])])
def test_docs_pages_reference_only_local_assets(client: TestClient, page: str, scripts: list[str]) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not ABSOLUTE_URL.search(r.text), "the page loads something from another host"
    assert "fonts.googleapis" not in r.text and "cdn.jsdelivr" not in r.text
    for name in scripts:
        assert f'{ASSETS_URL}/{name}' in r.text
    assert "/openapi.json" in r.text


def test_docs_assets_are_served_from_the_package(client: TestClient) -> None:
    assert ASSETS is not None, "fastapi-offline is a runtime dependency: pip install -e ."
    for name, kind in [("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css"),
                       ("redoc.standalone.js", "text/javascript"), ("favicon.png", "image/png")]:
        r = client.get(f"{ASSETS_URL}/{name}")
        assert r.status_code == 200 and r.headers["content-type"].split(";")[0] == kind
        assert r.content == (ASSETS / name).read_bytes()


@pytest.mark.parametrize("name", ["nope.js", "..%2F__init__.py", "%2e%2e%2fcore.py", "LICENSE"])
def test_other_asset_names_are_404_json(client: TestClient, name: str) -> None:
    r = client.get(f"{ASSETS_URL}/{name}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_the_swagger_validator_badge_is_off(client: TestClient) -> None:
    assert '"validatorUrl": null' in client.get("/docs").text
