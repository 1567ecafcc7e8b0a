"""Helpers of the service tests: images of every supported kind, made in memory, and waiting for ready."""

from __future__ import annotations

import contextlib
import io
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from bench.child import ServeChild, serve_child
from bench.proctree import descendants, rss_bytes, scan

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["ant", "bee", "cat", "dog", "eel"]  # of the test checkpoint
RED, BLUE, GREEN, WHITE = (220, 20, 20), (20, 20, 220), (20, 200, 20), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def halves(size: tuple[int, int] = (40, 20), left: tuple[int, int, int] = RED,
           right: tuple[int, int, int] = BLUE) -> Image.Image:
    """Left half one colour, right half another (orientation checks)."""
    w, h = size
    im = Image.new("RGB", size, right)
    im.paste(left, (0, 0, w // 2, h))
    return im


def photo(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """A textured RGB image; different seeds give different model outputs."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin((x + seed * 7) / 5.0)], -1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def jpeg_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(halves(), "JPEG", quality=95, exif=exif.tobytes())


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_rgb16(width: int, height: int, rgb16: tuple[int, int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), filled with one colour."""
    row = b"\x00" + struct.pack(">HHH", *rgb16) * width
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(row * height))
            + png_chunk(b"IEND", b""))


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with next to no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def gif_two_frames() -> bytes:
    """Animated GIF: first frame red, second blue."""
    frames = [Image.new("RGB", (24, 24), RED), Image.new("RGB", (24, 24), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def rgba_half_transparent() -> bytes:
    """PNG RGBA: left half transparent (any colour underneath), right half opaque green."""
    im = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    im.paste((*GREEN, 255), (16, 0, 32, 16))
    return encode(im, "PNG")


def palette_with_transparency() -> bytes:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, *GREEN] + [0] * (256 * 3 - 6))
    im.paste(1, (8, 0, 16, 16))
    return encode(im, "PNG", transparency=0)


def gray16(value: int, size: tuple[int, int] = (20, 20)) -> bytes:
    return encode(Image.fromarray(np.full(size[::-1], value, np.uint16)), "PNG")


def all_kinds() -> dict[str, bytes]:
    """One sample of every kind the API must accept, by name."""
    p = photo()
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # red in CMYK
    return {
        "jpeg": encode(p, "JPEG", quality=90),
        "jpeg_progressive": encode(p, "JPEG", quality=90, progressive=True),
        "jpeg_cmyk": encode(cmyk, "JPEG", quality=95),
        "jpeg_gray": encode(p.convert("L"), "JPEG"),
        "jpeg_exif_rotated": jpeg_with_orientation(6),
        "png": encode(p, "PNG"),
        "png_palette": encode(p.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "png_palette_transparent": palette_with_transparency(),
        "png_16bit_gray": gray16(30_000),
        "png_16bit_rgb": png_rgb16(20, 10, (40_000, 20_000, 10_000)),
        "png_rgba": rgba_half_transparent(),
        "png_la": encode(p.convert("LA"), "PNG"),
        "png_1bit": encode(p.convert("1"), "PNG"),
        "gif_animated": gif_two_frames(),
        "bmp": encode(p, "BMP"),
        "tiff": encode(p, "TIFF"),
        "tiff_float": encode(Image.fromarray(np.full((10, 10), 0.5, np.float32)), "TIFF"),
        "tiff_cmyk": encode(cmyk, "TIFF"),
        "webp": encode(p, "WEBP", quality=80),
        "webp_lossless_alpha": encode(p.convert("RGBA"), "WEBP", lossless=True),
        "tiny_1x1": encode(Image.new("RGB", (1, 1), RED), "PNG"),
        "tall_2x3000": encode(Image.new("RGB", (2, 3000), BLUE), "PNG"),
        "wide_3000x1": encode(Image.new("RGB", (3000, 1), GREEN), "PNG"),
    }


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    """Poll /readyz: the app warms up in the background after its lifespan starts."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise TimeoutError("app did not become ready")


class _Log:
    """``proc.stderr.read()`` for a child whose output goes to a file: everything it wrote."""

    def __init__(self, child: ServeChild) -> None:
        self.child = child

    def read(self) -> bytes:
        return self.child.log().encode()


@contextlib.contextmanager
def serve_process(checkpoint: Path, env: dict[str, str] | None = None, timeout: float = 180.0,
                  log_level: str = "warning") -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``patchlife serve`` (:func:`bench.child.serve_child`) on the CPU with one warm-up batch; yields
    the process (``proc.stderr.read()`` gives its whole log) and its base URL."""
    full_env = {"PATCHLIFE_DEVICE": "cpu", "PATCHLIFE_WARMUP_BATCHES": "1", **(env or {})}
    args = ["--checkpoint", str(checkpoint), "--log-level", log_level]
    with serve_child(full_env, args, startup_s=timeout, cwd=str(REPO)) as child:
        child.proc.stderr = _Log(child)  # type: ignore[assignment]
        yield child.proc, child.url


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the API processes of a multi-process ``patchlife serve``), read by
    the load tools' own /proc reader (bench/proctree.py)."""
    return [s.pid for s in descendants(scan(), pid)] or [pid]


def tree_rss_bytes(pid: int) -> int:
    """VmRSS summed over the process and its descendants (pages shared between them count in each:
    a bound on growth, not an exact total)."""
    total = 0
    for p in process_tree(pid):
        try:
            total += rss_bytes(p)["VmRSS"]
        except (OSError, KeyError):
            pass  # exited meanwhile, or a zombie
    return total


