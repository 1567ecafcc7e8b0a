"""Memory of decoding, measured.

    python scripts/decode_memory.py           # served: 3 concurrent requests of 5 x 40-megapixel 16-bit TIFFs
    python scripts/decode_memory.py --modes   # peak bytes per pixel of one decode, by Pillow mode and format

The served run starts ``patchlife serve`` (embedded model, CPU) as a child, sends one ordinary request,
takes its RSS as idle, then samples RSS every 10 ms while the three requests run and prints the peak
over idle (the target of issue 25: within 1.0 GB). ``--modes`` decodes one 10-megapixel image per mode
in a fresh process each and prints the rise of its peak RSS (VmHWM) per pixel: the figures behind
``BYTES_PER_PIXEL`` in service/frontend/decode_gate.py. Figures depend on the machine's allocator and load;
run both on the machine being sized.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = [("RGB", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP"), ("RGBA", "PNG"), ("LA", "PNG"), ("L", "PNG"),
         ("P", "GIF"), ("1", "PNG"), ("CMYK", "TIFF"), ("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"),
         ("F", "TIFF")]


def _status(key: str) -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def make_image(mode: str, width: int, height: int) -> Image.Image:
    """A compressible image of ``mode``: one gradient row repeated (files stay small, decodes stay full)."""
    row = np.floor(np.linspace(0, 16, width, endpoint=False)).astype(np.float32) / 16  # 16 flat bands
    if mode == "F":
        return Image.fromarray(np.tile(row, (height, 1)))
    if mode in ("I;16", "I"):
        dtype = np.uint16 if mode == "I;16" else np.int32
        return Image.fromarray(np.tile((row * 60_000).astype(dtype), (height, 1)))
    grey = Image.fromarray(np.tile((row * 255).astype(np.uint8), (height, 1)))
    return grey.convert(mode) if mode != "P" else grey.convert("P", palette=Image.Palette.ADAPTIVE)


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"compression": "tiff_deflate"} if fmt == "TIFF" else {}))
    return buf.getvalue()


def one_mode(mode: str, fmt: str, width: int = 4000, height: int = 2500) -> None:
    """In this (fresh) process: decode one image and print its peak bytes per pixel."""
    from service.decode import decode_image

    data = encode(make_image(mode, width, height), fmt)
    Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    decode_image(data, 50_000_000)
    per_pixel = (_status("VmHWM") - base) / (width * height)
    print(f"| {mode} | {fmt} | {len(data) / 1e6:.1f} | {per_pixel:.1f} |")


def modes() -> None:
    print("| mode | format | file MB | peak bytes per pixel |\n|---|---|---|---|", flush=True)
    for mode, fmt in MODES:
        subprocess.run([sys.executable, __file__, "--one", mode, fmt], check=True)


def served(requests: int, images: int, width: int, height: int) -> None:
    import httpx

    from bench.child import serve_child

    tiff = encode(make_image("I;16", width, height), "TIFF")
    small = encode(make_image("RGB", 64, 48), "PNG")
    env = {"PATCHLIFE_DEVICE": "cpu", "PATCHLIFE_WARMUP_BATCHES": "1", "PATCHLIFE_DEADLINE_MS": "120000",
           "PATCHLIFE_DECODE_WAIT_MS": "120000"}
    with serve_child(env, ["--log-level", "warning"], cwd=str(REPO)) as child:
        with httpx.Client(base_url=child.url, timeout=60) as client:
            assert client.post("/classify", files={"file": ("a.png", small, "image/png")}).status_code == 200
        pid = child.proc.pid
        idle = _rss(pid)
        peak, stop = idle, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _rss(pid))
                time.sleep(0.01)

        def one(_: int) -> int:
            files = [("files", (f"{i}.tif", tiff, "image/tiff")) for i in range(images)]
            with httpx.Client(base_url=child.url, timeout=300) as client:
                return client.post("/classify", files=files).status_code

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(requests) as pool:
            statuses = list(pool.map(one, range(requests)))
        seconds = time.monotonic() - t0
        stop.set()
        sampler.join()
    print(f"{requests} concurrent requests of {images} x {width}x{height} ({width * height / 1e6:.0f} MP) 16-bit "
          f"TIFFs ({len(tiff) / 1e6:.2f} MB each): statuses {statuses} in {seconds:.1f} s; idle RSS "
          f"{idle / 2**30:.2f} GiB, peak +{(peak - idle) / 1e9:.2f} GB over idle")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", action="store_true", help="bytes per pixel by mode instead of the served run")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "FORMAT"), help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=(8000, 5000), metavar=("W", "H"))
    args = parser.parse_args()
    if args.one:
        one_mode(*args.one)
    elif args.modes:
        modes()
    else:
        served(args.requests, args.images, *args.size)


if __name__ == "__main__":
    main()
