"""The page explains itself and never contradicts the API, in a real chromium against a real server:
the API docs render with the network cut off, every block of the slider shows the budget's counts
(the minimum of one patch per stage included), nothing stale survives a new image, the result
scrolls into view on a phone, and the curl line and heatmap download match what was sent."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_support import EXAMPLES
from PIL import Image
from test_page import expect, open_page, walk_blocks


def png(size: tuple[int, int], colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def offline(page: Any, service_url: str) -> list[str]:
    """Abort every request that does not go to the service; returns the list of what was tried. (ReDoc's
    sidebar logo from its CDN never gets here: the page's Content-Security-Policy stops it first.)"""
    tried: list[str] = []

    def route(r: Any) -> None:
        if r.request.url.startswith(service_url):
            r.continue_()
        else:
            tried.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return tried


def operations(service_url: str) -> list[tuple[str, str]]:
    spec = httpx.get(f"{service_url}/openapi.json", timeout=10).json()
    return [(method, path) for path, item in spec["paths"].items() for method in item]


def test_swagger_ui_renders_every_operation_offline(browser: Any, service_url: str) -> None:
    page = browser.new_page()
    tried = offline(page, service_url)
    page.goto(f"{service_url}/docs")
    ops = operations(service_url)
    expect(page.locator(".opblock")).to_have_count(len(ops), timeout=20_000)
    shown = {(m.lower(), p) for m, p in zip(page.locator(".opblock-summary-method").all_text_contents(),
                                            page.locator(".opblock-summary-path").all_text_contents())}
    assert shown == {(m, p.replace("\u200b", "")) for m, p in ops} or len(shown) == len(ops)
    assert tried == [], f"the docs page tried to reach {tried}"
    page.close()


def test_redoc_renders_every_operation_offline(browser: Any, service_url: str) -> None:
    page = browser.new_page()
    tried = offline(page, service_url)
    page.goto(f"{service_url}/redoc")
    ops = operations(service_url)
    expect(page.locator("[data-section-id^='operation/']")).to_have_count(len(ops), timeout=30_000)
    assert tried == [], f"the ReDoc page tried to reach {tried}"
    page.close()


def set_keep_rate(page: Any, rate: float) -> None:
    """Untick "model default" and move the keep-rate slider there with the keyboard."""
    if page.locator("#default-rate").is_checked():
        page.locator("#default-rate").click()
    slider = page.locator("#rate")
    slider.focus()
    page.keyboard.press("Home")  # 0.05
    for _ in range(round((rate - 0.05) / 0.05)):
        page.keyboard.press("ArrowRight")
    assert page.locator("#rate-out").text_content() == f"{rate:.2f}"


def api_budget(service_url: str, name: str, data: bytes, **fields: str) -> dict[str, Any]:
    r = httpx.post(f"{service_url}/classify", files={"file": (name, data, "image/png")}, data=fields, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("name", "data", "rate"), [
    ("low-keep.png", None, 0.1),                       # an example at a low keep rate
    ("panorama.png", png((4000, 16)), None),           # the 4000x16 panorama
    ("pixel.png", png((1, 1)), None),                  # one pixel
])
def test_every_block_shows_the_budgets_counts(browser: Any, service_url: str, tmp_path: Path, name: str,
                                              data: bytes | None, rate: float | None) -> None:
    page = open_page(browser, service_url, 1200)
    if data is None:
        data = httpx.get(f"{service_url}/v1/examples/{EXAMPLES[1]['file']}", timeout=10).content
    if rate is not None:
        set_keep_rate(page, rate)
    page.set_input_files("#file", files=[{"name": name, "mimeType": "image/png", "buffer": data}])
    expect(page.locator("#status")).to_contain_text(f"{name}: ", timeout=15_000)
    expected = api_budget(service_url, name, data, **({"keep_rate": f"{rate:.2f}"} if rate else {}))
    model = httpx.get(f"{service_url}/v1/models", timeout=10).json()
    starts, counts = model["schedule"]["stage_starts"], expected["budget"]["patch_counts"]
    n = expected["lifespans"]["rows"] * expected["lifespans"]["cols"]
    want = [n if b < starts[0] else counts[max(i for i, s in enumerate(starts) if s <= b)]
            for b in range(model["schedule"]["depth"])]
    seen = walk_blocks(page)
    assert [alive for alive, _ in seen] == want
    assert min(want) >= 1
    for block in range(len(want)):  # the text says the same number, and the batch never ran fewer
        page.locator("#block").fill(str(block))
        text = page.locator("#alive").text_content()
        assert (f"{want[block]} of {n} patches" in text) or (want[block] == n and f"all {n} patches" in text), text
        assert int(page.locator("#alive").get_attribute("data-ran")) >= want[block]
    # The budget's rows say the same counts.
    rows = page.locator("#budget .row .val").all_text_contents()
    assert [f"{c} of {n} patches kept" in row for c, row in zip(counts, rows[1:])] == [True] * len(counts)
    assert "blocks 0–0" not in page.locator("#budget").text_content()
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    assert page.errors == []
    page.close()


def classify_example(page: Any, index: int) -> None:
    name = EXAMPLES[index]["file"]
    page.locator(f"#examples button[data-file='{name}']").click()
    expect(page.locator("#status")).to_contain_text(f"{name}: ", timeout=15_000)


def test_a_new_image_resets_the_hover_text_and_the_block_slider(browser: Any, service_url: str) -> None:
    page = open_page(browser, service_url, 1200)
    hint = page.locator("#patch-info").text_content()
    classify_example(page, 0)
    box = page.locator("#heatmap").bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    expect(page.locator("#patch-info")).to_contain_text("Patch row 1, column 1")
    page.locator("#block").focus()
    page.keyboard.press("End")
    assert page.locator("#block-out").text_content() != "0"
    classify_example(page, 1)
    assert page.locator("#block-out").text_content() == "0" and page.locator("#block").input_value() == "0"
    assert page.locator("#patch-info").text_content() == hint
    assert page.errors == []
    page.close()


def test_the_disabled_slider_shows_the_models_default(browser: Any, service_url: str) -> None:
    default = httpx.get(f"{service_url}/v1/models", timeout=10).json()["schedule"]["keep_rate"]
    page = open_page(browser, service_url, 1200)
    assert page.locator("#rate-out").text_content() == f"{default:.2f}"
    set_keep_rate(page, 0.3)
    page.locator("#default-rate").click()  # back to the model's default
    assert page.locator("#rate").is_disabled()
    assert page.locator("#rate-out").text_content() == f"{default:.2f}"
    assert float(page.locator("#rate").input_value()) == pytest.approx(default)
    page.close()


def test_on_a_phone_the_result_scrolls_into_view(browser: Any, service_url: str) -> None:
    page = open_page(browser, service_url, 375, 700)
    classify_example(page, 0)
    expect(page.locator("#heatmap")).to_be_in_viewport(timeout=5_000)
    assert page.evaluate("window.scrollY") > 0
    page.close()


def test_the_page_says_what_the_model_is_and_gives_curl_and_the_heatmap(browser: Any, service_url: str,
                                                                      tmp_path: Path) -> None:
    info = httpx.get(f"{service_url}/v1/models", timeout=10).json()
    page = open_page(browser, service_url, 1200)
    assert info["description"] in page.locator("#model-description").text_content()
    assert all(c in page.locator("#model-classes").text_content() for c in info["classes"])
    assert page.locator("#method summary").is_visible()
    for word in ("keep rate", "life", "budget"):
        assert word in page.locator("#method").text_content().lower()

    set_keep_rate(page, 0.5)
    classify_example(page, 0)
    name = EXAMPLES[0]["file"]
    curl = page.locator("#curl").text_content().splitlines()
    assert curl == [f"curl -s -o '{name}' '{service_url}/v1/examples/{name}'",
                    f"curl -s -F file=@'{name}' -F keep_rate=0.5 '{service_url}/classify' | python3 -m json.tool"]
    assert page.locator("#bar-legend").is_visible()

    with page.expect_download() as download:
        page.locator("#download").click()
    saved = tmp_path / "heatmap.png"
    download.value.save_as(saved)
    assert download.value.suggested_filename == "simple-lifespans-block0.png"
    with Image.open(saved) as im:
        width = page.evaluate("document.getElementById('heatmap').width")
        assert im.format == "PNG" and im.size[0] == width
    assert page.errors == []
    page.close()
