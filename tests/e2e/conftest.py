"""Fixtures of the browser tests: a tiny checkpoint with example images, a real ``patchlife serve``
on a free loopback port, and Debian's chromium driven by Playwright (never Playwright's own browser).

Without chromium or Playwright the tests skip and say why (a failure when PATCHLIFE_REQUIRE_BROWSER=1).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from e2e_support import CLASSES, EXAMPLES, Service, example_image, run_service
from ops_support import wait_http_ok

HERE = Path(__file__).resolve().parent


def _skip(reason: str) -> NoReturn:
    reason += ": the browser tests did NOT run. `make chromium` installs Debian's chromium (as root); " \
              "playwright comes with the dev extra (`pip install -e '.[dev]'`)."
    if os.environ.get("PATCHLIFE_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's chromium binary, once it is known that Playwright imports too (else a skip)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        _skip(f"playwright cannot be imported ({exc})")
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    _skip("no chromium binary on PATH")


@pytest.fixture(scope="module")
def example_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vit_nano_patch8_32 (4x4 patches, 6 blocks, pruning from block 2), calibrated, with examples."""
    from tiny_models import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", list(CLASSES), "e2e-tiny")
    folder = path / "examples"
    folder.mkdir()
    for i, entry in enumerate(EXAMPLES):
        example_image(seed=i).save(folder / entry["file"])
    (folder / "examples.json").write_text(json.dumps(EXAMPLES))
    return path


@pytest.fixture(scope="module")
def service(chromium_path: str, example_checkpoint: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``patchlife serve`` started on a free loopback port (not yet waited for), stopped at the end.
    (Takes ``chromium_path`` so that nothing starts when the browser tests are skipped.)"""
    with run_service(example_checkpoint, tmp_path_factory.mktemp("service") / "serve.log") as service:
        yield service


@pytest.fixture(scope="module")
def browser(chromium_path: str, service: Service) -> Iterator[Any]:
    """A headless chromium (Debian's binary) under Playwright's sync API. Module-scoped: while
    Playwright's sync API is open, its event loop counts as running in this thread, which breaks
    later tests that call ``asyncio.run``. (Takes ``service`` so that the server starts up while
    the browser does.)"""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # Root (as in CI and containers) needs --no-sandbox; /dev/shm is small in containers.
        browser = pw.chromium.launch(executable_path=chromium_path, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def service_url(service: Service) -> str:
    """The service's base URL once /readyz answers 200."""
    wait_http_ok(f"{service.url}/readyz", service.proc, service.log, timeout_s=90)
    return service.url
