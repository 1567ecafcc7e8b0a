"""The web page in a real headless chromium against a real ``patchlife serve``: an example image is
classified, the labels and the lifespan heatmap appear, the block slider shrinks the alive set, and
API errors show with the API's own message. Screenshots are saved under the test's tmp_path."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_support import EXAMPLES, MAX_REQUEST_BYTES, MAX_UPLOAD_BYTES

CANVAS_DIGEST = """() => {
  const c = document.getElementById('heatmap');
  return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data).join(',');
}"""


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect  # importable once the browser fixture is

    return playwright_expect(locator)


def api_answer(service_url: str, name: str, **fields: str) -> dict[str, Any]:
    """What the public API answers for the example ``name`` (the page must show the same)."""
    image = httpx.get(f"{service_url}/v1/examples/{name}", timeout=10).content
    response = httpx.post(f"{service_url}/classify", files={"file": (name, image, "image/png")}, data=fields,
                          timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]  # type: ignore[no-any-return]


def canvas_digest(page: Any) -> str:
    return hashlib.sha256(page.evaluate(CANVAS_DIGEST).encode()).hexdigest()


def open_page(browser: Any, url: str, width: int, height: int = 900) -> Any:
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.errors = errors
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)
    return page


def walk_blocks(page: Any) -> list[tuple[int, str]]:
    """(alive count, canvas digest) at every block, moving the block slider with the keyboard."""
    slider = page.locator("#block")
    slider.focus()
    page.keyboard.press("Home")
    seen = []
    for block in range(int(slider.get_attribute("max")) + 1):
        assert page.locator("#block-out").text_content() == str(block)
        seen.append((int(page.locator("#alive").get_attribute("data-alive")), canvas_digest(page)))
        page.keyboard.press("ArrowRight")
    return seen


def test_example_labels_heatmap_and_block_slider(browser: Any, service_url: str, tmp_path: Path) -> None:
    page = open_page(browser, service_url, 1200)
    name = EXAMPLES[1]["file"]
    page.locator(f"#examples button[data-file='{name}']").click()
    page.wait_for_selector("#answer:not([hidden])", timeout=15_000)
    expected = api_answer(service_url, name)
    assert page.locator("#labels li .name").all_text_contents() == [lb["label"] for lb in expected["labels"]]
    assert page.locator("#heatmap").is_visible() and page.locator("#life-empty").is_hidden()

    # A lower keep rate, set with the keyboard: the page asks again and shows the new budget.
    page.locator("#default-rate").focus()
    page.keyboard.press("Space")
    page.locator("#rate").focus()
    for _ in range(4):
        page.keyboard.press("ArrowLeft")  # 0.70 -> 0.50
    expect(page.locator("#budget")).to_contain_text("keep rate 0.50", timeout=15_000)
    expected = api_answer(service_url, name, keep_rate="0.5")
    assert page.locator("#labels li .name").all_text_contents() == [lb["label"] for lb in expected["labels"]]

    # Blocks before the life module run every patch; each stage the budget's count for it.
    model = httpx.get(f"{service_url}/v1/models", timeout=10).json()
    starts, counts = model["schedule"]["stage_starts"], expected["budget"]["patch_counts"]
    n = expected["lifespans"]["rows"] * expected["lifespans"]["cols"]
    seen = walk_blocks(page)
    want = [n if b < starts[0] else counts[max(i for i, s in enumerate(starts) if s <= b)] for b in range(len(seen))]
    assert [alive for alive, _ in seen] == want
    assert want[-1] < n, "the test image should lose patches at keep rate 0.5"
    assert seen[-1][1] != seen[0][1]  # the heatmap dims the pruned patches
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    # Budget bars: the dense blocks, one row per stage, GFLOPs; timings shown.
    assert page.locator("#budget .row").count() == len(counts) + 2
    assert page.locator("#timings dt").all_text_contents()[:3] == ["decode", "queue", "compute"]
    assert page.errors == []
    page.close()


@pytest.mark.parametrize(("name", "mime", "body"), [
    ("notes.txt", "text/plain", b"not an image at all"),                 # 415, declared type
    ("broken.png", "image/png", b"\x89PNG\r\n\x1a\n but then garbage"),  # 400, the bytes
    ("big.png", "image/png", b"\x89PNG" + b"\0" * (MAX_UPLOAD_BYTES + 10)),  # 413, while streaming
    ("huge.png", "image/png", b"\x89PNG" + b"\0" * (MAX_REQUEST_BYTES + 10)),  # 413, from Content-Length
])
def test_errors_show_the_api_message(browser: Any, service_url: str, tmp_path: Path, name: str, mime: str,
                                     body: bytes) -> None:
    expected = httpx.post(f"{service_url}/classify", files={"file": (name, body, mime)}, timeout=30).json()["error"]
    page = open_page(browser, service_url, 1200)
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": body}])
    page.wait_for_selector("#error:not([hidden])", timeout=15_000)
    # The same message, but for the body's size (the browser's multipart boundary is longer).
    body_size = re.compile(r"body is \d+ bytes")
    assert body_size.sub("", page.locator("#error .message").text_content()) == body_size.sub("", expected["message"])
    assert expected["code"] in page.locator("#error .code").text_content()
    assert page.locator("#answer").is_hidden() and page.locator("#heatmap").is_hidden()
    page.screenshot(path=str(tmp_path / "error.png"))
    page.close()


DROP_FILE = """async (url) => {
  const blob = await (await fetch(url)).blob();
  const data = new DataTransfer();
  data.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
  const zone = document.getElementById('drop');
  for (const type of ['dragenter', 'dragover', 'drop']) {
    zone.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
  }
}"""


def test_narrow_viewport_fits_and_takes_a_dropped_file(browser: Any, service_url: str, tmp_path: Path) -> None:
    """375 px wide (a phone): a file dropped on the drop zone is classified, nothing scrolls
    sideways, the heatmap fits the screen, and the live strip shows the queue."""
    page = open_page(browser, service_url, 375, 800)
    page.evaluate(DROP_FILE, f"/v1/examples/{EXAMPLES[0]['file']}")
    page.wait_for_selector("#life-body:not([hidden])", timeout=15_000)
    assert page.locator("#status").text_content().startswith("dropped.png: ")
    expected = api_answer(service_url, EXAMPLES[0]["file"])
    assert page.locator("#labels li .name").all_text_contents() == [lb["label"] for lb in expected["labels"]]
    assert page.locator("#live-queue").text_content().isdigit()
    expect(page.locator("#heatmap")).to_be_in_viewport(timeout=5_000)  # scrolled to the result
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    box = page.locator("#heatmap").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375
    page.screenshot(path=str(tmp_path / "page-375.png"), full_page=True)
    page.close()


def test_a_scaled_answer_is_shown_as_such(browser: Any, service_url: str) -> None:
    """The page's result panel says when accuracy scaling ran an image below the rate asked for. The
    test server has no latency objective, so the route hands the page a real answer marked scaled."""
    import json

    def scaled(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        budget = body["results"][0]["budget"]
        budget.update(scaled=True, requested_keep_rate=0.7, keep_rate=0.3)
        route.fulfill(response=response, body=json.dumps(body), headers={**response.headers,
                                                                            "content-type": "application/json"})

    page = open_page(browser, service_url, 1200)
    page.route(re.compile(r".*/classify(\?.*)?$"), scaled)
    page.locator(f"#examples button[data-file='{EXAMPLES[0]['file']}']").click()
    page.wait_for_selector("#answer:not([hidden])", timeout=15_000)
    note = page.locator("#budget .scaled")
    expect(note).to_contain_text("Scaled under load", timeout=15_000)
    expect(note).to_contain_text("keep rate 0.30 instead of 0.70")
    page.unroute(re.compile(r".*/classify(\?.*)?$"))
    page.locator(f"#examples button[data-file='{EXAMPLES[1]['file']}']").click()
    expect(page.locator("#budget .scaled")).to_have_count(0, timeout=15_000)  # an unscaled answer: no note
    assert page.errors == []
    page.close()
