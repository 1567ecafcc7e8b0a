"""A real Prometheus scrapes the real service, and every query of the Grafana dashboard returns data.

Prometheus (Debian's ``prometheus`` package; the test skips loudly without it) runs on a free
loopback port with the repository's own config, re-targeted at the service and scraping every
second. Traffic (good and bad requests) flows while the test polls each dashboard expression
through Prometheus' HTTP API until it returns a finite value; the first scrape lands about 5-6 s
after start, so the test polls with a deadline instead of sleeping.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from ops_support import (
    PROMETHEUS_YML,
    Query,
    has_finite_value,
    instant_query,
    prometheus_config,
    require_tool,
    start_prometheus,
    stop_process,
)

pytestmark = pytest.mark.timeout(180)

WINDOW = "10s"  # stands in for $__rate_interval: ten 1 s scrapes, so rate() has points to work with
DATA_TIMEOUT_S = 60.0


def jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A small noisy photo; its noise level varies with ``seed``."""
    from PIL import Image

    img = Image.effect_noise(size, 20 + 15 * (seed % 5)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def send_traffic(url: str, stop: threading.Event, problems: list[str]) -> None:
    """Good and bad requests in a loop until ``stop``; wrong status codes go to ``problems``."""
    cases: list[tuple[str, dict[str, Any], set[int]]] = [
        ("/classify", {"files": [("files", ("a.jpg", jpeg(1), "image/jpeg")),
                                 ("files", ("b.jpg", jpeg(2), "image/jpeg"))]}, {200}),
        ("/explain", {"files": {"file": ("c.jpg", jpeg(3), "image/jpeg")}}, {200}),
        ("/classify", {"files": {"file": ("bad.jpg", b"not an image at all", "image/jpeg")}}, {400, 415}),
        ("/classify", {"content": b"hello", "headers": {"content-type": "text/plain"}}, {415}),
        ("/classify", {"files": {"file": ("d.jpg", jpeg(4), "image/jpeg")}, "data": {"top_k": "0"}}, {422}),
    ]
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            for path, kwargs, expected in cases:
                try:
                    status = client.post(path, **kwargs).status_code
                except httpx.HTTPError as exc:
                    problems.append(f"POST {path}: {exc!r}")
                    continue
                if status not in expected:
                    problems.append(f"POST {path} -> {status}, expected one of {sorted(expected)}")
            stop.wait(0.2)


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return require_tool("prometheus")  # before the service fixture: no service started just to skip


@pytest.fixture(scope="module")
def prometheus_url(prometheus_binary: str, service_url: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = prometheus_config(yaml.safe_load(PROMETHEUS_YML.read_text()), target=service_url.split("//")[1])
    proc, url = start_prometheus(prometheus_binary, config, tmp_path_factory.mktemp("prometheus"))
    try:
        yield url
    finally:
        stop_process(proc)


def poll_until_data(prometheus_url: str, queries: list[Query], timeout_s: float) -> dict[str, Any]:
    """Evaluate every query until each returns a finite sample; returns the last results of those that
    never did (empty when all did)."""
    pending = {q.name: q for q in queries}
    last: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for name, q in list(pending.items()):
            last[name] = instant_query(prometheus_url, q.promql(WINDOW))
            if has_finite_value(last[name]):
                del pending[name]
        if pending:
            time.sleep(0.5)
    return {name: (pending[name].raw, last.get(name)) for name in pending}


def test_every_dashboard_query_returns_data(queries: list[Query], service_url: str,
                                            prometheus_url: str) -> None:
    stop, problems = threading.Event(), []
    traffic = threading.Thread(target=send_traffic, args=(service_url, stop, problems), daemon=True)
    t0 = time.monotonic()
    traffic.start()
    try:
        missing = poll_until_data(prometheus_url, queries, DATA_TIMEOUT_S)
        up = instant_query(prometheus_url, 'up{job="patchlife"}')
        requests = instant_query(prometheus_url,
                                 "sum by (route, status) (patchlife_http_request_duration_seconds_count)")
        rejected = instant_query(prometheus_url, "patchlife_rejected_requests_total > 0")
    finally:
        stop.set()
        traffic.join(35)
    print(f"{len(queries) - len(missing)}/{len(queries)} dashboard queries returned data within "
          f"{time.monotonic() - t0:.1f} s")
    assert not problems, "unexpected answers while sending traffic:\n" + "\n".join(sorted(set(problems)))
    assert not missing, (f"no data after {DATA_TIMEOUT_S:.0f} s for:\n"
                         + "\n".join(f"{n}: {raw}\n  last result: {res}" for n, (raw, res) in missing.items()))
    assert [float(r["value"][1]) for r in up] == [1.0]
    seen = {(r["metric"].get("route"), r["metric"].get("status")) for r in requests}
    assert {("/classify", "200"), ("/explain", "200"), ("/classify", "415"), ("/classify", "422")} <= seen, seen
    assert {r["metric"]["reason"] for r in rejected} >= {"unsupported_media_type", "invalid_request"}
