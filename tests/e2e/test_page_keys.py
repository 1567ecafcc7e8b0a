"""The web page against a server whose groups need a key (docs/api.md#access-keys): the first 401
opens the page's "API key" field, a key entered there is kept in the browser and sent with every
request the page makes (the model, an example's classification, the live strip's /metrics), and
the curl line names the key's variable, never the key. Runs where the other browser tests run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import EXAMPLES, Service, run_service

KEY = "page-key-0123456789"


@pytest.fixture(scope="module")
def service(chromium_path: str, example_checkpoint: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """As conftest's ``service``, with one key for every group (the page sends one key)."""
    keys = {f"PATCHLIFE_API_KEY_{group}": KEY for group in ("INFERENCE", "METADATA", "METRICS")}
    with run_service(example_checkpoint, tmp_path_factory.mktemp("service-keys") / "serve.log", keys) as service:
        yield service


def test_the_key_field_opens_on_401_and_the_page_then_works(browser: Any, service_url: str, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(service_url)
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)
    assert page.locator("#key-box").get_attribute("open") is not None  # /v1/models answered 401
    assert "PATCHLIFE_API_KEY_METADATA" in page.locator("#error .message").text_content()
    assert "401" in page.locator("#error .code").text_content()

    page.fill("#api-key", KEY)
    page.locator("#key-form button[type=submit]").click()
    page.wait_for_selector("#examples-box:not([hidden])", timeout=15_000)  # model and examples loaded
    assert page.locator("#model-facts").text_content().startswith("Model e2e-tiny")
    assert page.locator("#error").is_hidden() and page.locator("#key-box").get_attribute("open") is None
    assert page.evaluate("localStorage.getItem('patchlife.apiKey')") == KEY
    assert page.locator("#api-key").input_value() == ""  # not left in the field

    page.locator(f"#examples button[data-file='{EXAMPLES[0]['file']}']").click()
    page.wait_for_selector("#answer:not([hidden])", timeout=15_000)
    curl = page.locator("#curl").text_content()
    assert 'Authorization: Bearer $PATCHLIFE_API_KEY_INFERENCE' in curl and KEY not in curl
    page.wait_for_selector("#live:not([hidden])", timeout=10_000)  # /metrics with the key
    page.screenshot(path=str(tmp_path / "page-keys.png"), full_page=True)

    page.reload()  # the key stays in this browser
    page.wait_for_selector("#examples-box:not([hidden])", timeout=15_000)
    page.locator("#key-box summary").click()
    page.locator("#forget-key").click()
    assert page.evaluate("localStorage.getItem('patchlife.apiKey')") is None
    assert errors == []
    page.close()
