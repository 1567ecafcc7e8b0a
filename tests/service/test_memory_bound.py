"""Decoding memory on a real ``patchlife serve``: huge flat PNGs (36 MP each, about 120 kB as PNG) cost
the server memory only while they decode, bounded by PATCHLIFE_MAX_DECODE_PIXELS, and a request
asking for more than PATCHLIFE_MAX_REQUEST_PIXELS is refused from the headers alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from service_support import encode, photo, serve_process, tree_rss_bytes

SIDE = 6000  # 36 MP, under the default 40 MP image limit
GIB = 1024**3


@pytest.fixture(scope="module")
def flat_png() -> bytes:
    return encode(Image.new("RGB", (SIDE, SIDE), (120, 60, 200)), "PNG", compress_level=1)


def concurrent_posts(base: str, body_images: list[bytes], requests: int) -> list[int]:
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(body_images)]

    def one(_: int) -> int:
        with httpx.Client(base_url=base, timeout=120) as client:
            return client.post("/classify", files=files).status_code

    with ThreadPoolExecutor(requests) as pool:
        return list(pool.map(one, range(requests)))


class PeakRss:
    """Samples VmRSS of the server's processes every 10 ms in a thread (VmHWM would include the
    start-up peak); with API processes, the decoding happens in them."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_bytes(self.pid))


@pytest.mark.timeout(120)
def test_four_requests_of_huge_flat_pngs_keep_the_server_within_its_memory_bound(
        checkpoint_dir: Path, flat_png: bytes) -> None:
    with serve_process(checkpoint_dir) as (proc, base):
        with httpx.Client(base_url=base, timeout=30) as client:  # one ordinary request first
            assert client.post("/classify", files={"file": ("a.png", encode(photo(), "PNG"), "image/png")}
                               ).status_code == 200
        idle = tree_rss_bytes(proc.pid)

        t0 = time.monotonic()
        with PeakRss(proc.pid) as over_budget:  # 32 x 36 MP = 1.15 G pixels a request: 413 from the headers
            statuses = concurrent_posts(base, [flat_png] * 32, 4)
        refused_s = time.monotonic() - t0
        assert statuses == [413] * 4

        t0 = time.monotonic()
        with PeakRss(proc.pid) as decoding:  # 4 x 36 MP a request: decoded, two images at a time at most
            decoded = concurrent_posts(base, [flat_png] * 4, 4)
        decoded_s = time.monotonic() - t0
        assert set(decoded) <= {200, 413, 503} and 200 in decoded

    print(f"\nidle RSS {idle / GIB:.2f} GiB; 4 x 32 x 36 MP: {statuses} in {refused_s:.1f} s, peak "
          f"+{(over_budget.peak - idle) / GIB:.2f} GiB; 4 x 4 x 36 MP: {decoded} in {decoded_s:.1f} s, "
          f"peak +{(decoding.peak - idle) / GIB:.2f} GiB")
    assert over_budget.peak - idle < 1.5 * GIB
    assert decoding.peak - idle < 1.5 * GIB
