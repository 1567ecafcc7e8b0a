"""Error messages a person understands, with the machine-readable code unchanged: the file's own
name, the pixel limit in words, a multi-page TIFF said to be one."""

from __future__ import annotations

import io
import struct

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import encode, photo, png_bomb

from service.decode import tiff_pages
from service.frontend.upload import shown_filename

GOOD = encode(photo((40, 40)), "PNG")


def multipage_tiff(pages: int = 3, unreadable_first: bool = False) -> bytes:
    """A TIFF of ``pages`` pages; ``unreadable_first``: its first page's compression is an unknown code."""
    frames = [Image.new("RGB", (40, 30), (60 * i, 0, 0)) for i in range(pages)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    data = bytearray(buf.getvalue())
    if unreadable_first:
        ifd = struct.unpack("<I", data[4:8])[0]
        for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
            entry = ifd + 2 + 12 * i
            if struct.unpack("<H", data[entry:entry + 2])[0] == 259:  # Compression
                data[entry + 8:entry + 10] = struct.pack("<H", 60000)
    return bytes(data)


def post(client: TestClient, name: str, data: bytes, mime: str = "image/png") -> dict[str, str]:
    r = client.post("/classify", files={"file": (name, data, mime)})
    assert 400 <= r.status_code < 500, r.text
    return {"status": str(r.status_code), **r.json()["error"]}


def test_the_message_names_the_file_not_the_form_field(client: TestClient) -> None:
    error = post(client, "holiday photo.png", b"not an image at all")
    assert error["code"] == "bad_image"
    assert error["message"].startswith("holiday photo.png: not a supported image")
    assert "file[0]" not in error["message"]


def test_without_a_file_name_the_part_is_named_by_its_place(client: TestClient) -> None:
    r = client.post("/classify", content=b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n"
                    b"Content-Type: image/png\r\n\r\njunk\r\n--b--\r\n",
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("file[0]: ")


def test_a_decompression_bomb_is_larger_than_the_limit_in_words(client: TestClient) -> None:
    limit = client.app.state.frontend.settings.max_image_pixels  # type: ignore[attr-defined]
    for data in (png_bomb(), png_bomb(limit // 1000 + 1, 1001)):  # Pillow's own bomb check; ours
        error = post(client, "bomb.png", data)
        assert error["status"] == "413" and error["code"] == "image_too_many_pixels"
        assert f"larger than the {limit:,}-pixel limit" in error["message"]
        assert "decompression bomb" not in error["message"] and "DOS" not in error["message"]


def test_a_multipage_tiff_that_cannot_be_read_says_so(client: TestClient) -> None:
    error = post(client, "scan.tif", multipage_tiff(unreadable_first=True), "image/tiff")
    assert error["code"] == "bad_image"
    assert error["message"].startswith("scan.tif: multi-page TIFF is not supported")


def test_a_readable_multipage_tiff_is_still_classified_by_its_first_page(client: TestClient) -> None:
    r = client.post("/classify", files={"file": ("scan.tif", multipage_tiff(), "image/tiff")})
    assert r.status_code == 200, r.text


def test_a_single_page_tiff_that_cannot_be_read_is_not_called_multipage(client: TestClient) -> None:
    error = post(client, "one.tif", multipage_tiff(pages=1, unreadable_first=True), "image/tiff")
    assert error["code"] == "bad_image" and "multi-page" not in error["message"]


@pytest.mark.parametrize(("data", "pages"), [(multipage_tiff(3), 2), (multipage_tiff(1), 1), (GOOD, 0),
                                             (b"II*\x00\xff\xff\xff\x7f", 0), (b"MM\x00*", 0)])
def test_tiff_pages_from_offsets(data: bytes, pages: int) -> None:
    assert tiff_pages(data) == pages


@pytest.mark.parametrize(("raw", "shown"), [(b"cat.png", "cat.png"), (b"C:\\Users\\me\\cat.png", "cat.png"),
                                            (b"a/b/c.jpg", "c.jpg"), (b"\x1b[31mred.png", "[31mred.png"),
                                            (b"", None), (None, None), (b"x" * 200, "x" * 79 + "…")])
def test_shown_filename(raw: bytes | None, shown: str | None) -> None:
    assert shown_filename(raw) == shown
