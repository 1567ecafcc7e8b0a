"""The lifespan heatmap: render_heatmap/model_view as pure functions, and POST /explain."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import encode, photo

from service.frontend.explain import BAR_PANEL, MARGIN, OVERLAY_ALPHA, colormap, model_view, render_heatmap

K, L = 4, 12


def render(lives: np.ndarray, grey: int = 128) -> Image.Image:
    png = render_heatmap(Image.new("RGB", (300, 300), (grey,) * 3), lives, K, L)
    return Image.open(io.BytesIO(png))


def test_colormap_endpoints_and_order() -> None:
    ends = colormap(np.array([0.0, 1.0]))
    assert tuple(ends[0]) == (68, 1, 84) and tuple(ends[1]) == (253, 231, 37)
    brightness = colormap(np.linspace(0, 1, 50)).astype(int).sum(axis=1)
    assert brightness[-1] > brightness[0] and colormap(np.array([-3.0, 9.0])).tolist() == ends.tolist()


def test_patches_are_coloured_by_life() -> None:
    lives = np.array([[K, L], [L, (K + L) / 2]], np.float32)  # 2x2 grid
    im = render(lives)
    assert im.format == "PNG" and im.mode == "RGB"
    side = im.size[1] - 2 * MARGIN
    assert im.size[0] == side + BAR_PANEL + MARGIN
    cell = side // 2
    for (r, c), t in {(0, 0): 0.0, (0, 1): 1.0, (1, 1): 0.5}.items():
        expect = (1 - OVERLAY_ALPHA) * 128 + OVERLAY_ALPHA * colormap(np.array(t)).astype(float)
        got = im.getpixel((MARGIN + c * cell + cell // 2, MARGIN + r * cell + cell // 2))
        assert np.allclose(got, expect, atol=2), (r, c, got, expect)


def test_colour_bar_runs_from_l_at_top_to_k_at_bottom() -> None:
    im = render(np.full((3, 3), 8.0, np.float32))
    side = im.size[1] - 2 * MARGIN
    x = MARGIN + side + 14 + 10
    assert np.allclose(im.getpixel((x, MARGIN + 1)), colormap(np.array(1.0)), atol=6)
    assert np.allclose(im.getpixel((x, MARGIN + side - 2)), colormap(np.array(0.0)), atol=6)
    labels = np.asarray(im.crop((x + 12, MARGIN, im.size[0], MARGIN + side)).convert("L"))
    assert (labels < 100).sum() > 50  # layer numbers are drawn next to the bar


def test_non_square_grid_and_bad_arguments() -> None:
    im = render(np.full((2, 5), 6.0, np.float32))
    assert im.size[0] - BAR_PANEL - MARGIN > im.size[1] - 2 * MARGIN
    with pytest.raises(ValueError):
        render_heatmap(Image.new("RGB", (8, 8)), np.zeros(4), K, L)
    with pytest.raises(ValueError):
        render_heatmap(Image.new("RGB", (8, 8)), np.zeros((2, 2)), L, K)


def test_model_view_is_timm_centre_crop() -> None:
    im = Image.new("RGB", (640, 480))
    view = model_view(im, (3, 224, 224), 0.9)  # shorter side 480 -> 248, crop 224: 480 * 224 / 248
    assert view.size == (434, 434)
    marked = Image.new("RGB", (100, 50), (0, 0, 0))
    marked.paste((255, 0, 0), (49, 24, 51, 26))
    centre = model_view(marked, (3, 32, 32), 1.0)
    assert centre.size == (50, 50) and centre.getpixel((25, 25)) == (255, 0, 0)


def test_explain_returns_png_by_default(client: TestClient) -> None:
    r = client.post("/explain", files={"file": ("a.jpg", encode(photo((80, 60)), "JPEG"), "image/jpeg")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "PNG" and im.size[0] > im.size[1] > 100


@pytest.mark.parametrize("how", ["query", "accept"])
def test_explain_json(client: TestClient, how: str) -> None:
    kw = {"params": {"format": "json"}} if how == "query" else {"headers": {"Accept": "application/json"}}
    data = encode(photo((50, 50), 3), "PNG")
    r = client.post("/explain", files={"file": ("a.png", data, "image/png")}, **kw)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["lifespans"]["rows"] == 4 and len(body["labels"]) == 5 and body["budget"]["gflops"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(body["png_base64"]))).format == "PNG"
    same = client.post("/classify", files={"file": ("a.png", data, "image/png")}).json()["results"][0]
    assert same["lifespans"] == body["lifespans"]


def test_explain_accepts_json_body(client: TestClient) -> None:
    b64 = base64.b64encode(encode(photo((30, 30)), "PNG")).decode()
    r = client.post("/explain", json={"images": [b64], "keep_rate": 0.5}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
