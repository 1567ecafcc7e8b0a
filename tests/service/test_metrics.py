"""Prometheus metrics: every contract name, conventions (promtool), zero-initialised series, the
worker hooks, HTTP latency by route template, and device memory read at scrape time."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from service_support import encode, photo

from service.metrics import REJECT_REASONS, Metrics
from service.protocol import ImageResult
from service.runtime.metrics_hooks import PrometheusHooks

CONTRACT = {
    "patchlife_http_request_duration_seconds": "histogram", "patchlife_http_requests_in_flight": "gauge",
    "patchlife_image_decode_seconds": "histogram", "patchlife_model_compute_seconds": "histogram",
    "patchlife_rejected_requests": "counter", "patchlife_image_kept_tokens": "histogram",
    "patchlife_image_budget_ratio": "histogram", "patchlife_image_flops": "histogram",
    "patchlife_build_info": "gauge", "patchlife_device_memory_allocated_bytes": "gauge",
    "patchlife_device_memory_reserved_bytes": "gauge", "patchlife_queue_wait_seconds": "histogram",
    "patchlife_batch_size": "histogram", "patchlife_batch_tokens": "histogram",
    "patchlife_needed_tokens": "counter", "patchlife_computed_tokens": "counter",
    "patchlife_batches": "counter", "patchlife_queue_depth": "gauge",
    "patchlife_model_failures": "counter", "patchlife_model_healthy": "gauge",
    "patchlife_decode_fallbacks": "counter",
}


def scrape(client: TestClient) -> str:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text


def test_every_contract_metric_with_its_type(client: TestClient) -> None:
    client.post("/classify", files={"file": ("a.png", encode(photo(), "PNG"), "image/png")})
    families = {f.name: f.type for f in text_string_to_metric_families(scrape(client))}
    for name, kind in CONTRACT.items():
        assert families.get(name) == kind, name
    assert not [n for n, t in families.items() if t == "summary"]


def test_labelled_series_start_at_zero() -> None:
    m = Metrics()
    text = m.exposition().decode()
    for reason in REJECT_REASONS:
        assert f'patchlife_rejected_requests_total{{reason="{reason}"}} 0.0' in text
    for reason in ("out_of_memory", "batch_error", "worker_died"):
        assert f'patchlife_model_failures_total{{reason="{reason}"}} 0.0' in text
    for reason in ("not_jpeg", "refused", "error"):
        assert f'patchlife_decode_fallbacks_total{{reason="{reason}"}} 0.0' in text
    for phase in ("head", "tail"):
        assert f'patchlife_model_compute_seconds_count{{phase="{phase}"}} 0.0' in text
        assert f'patchlife_batch_size_count{{phase="{phase}"}} 0.0' in text
    assert 'patchlife_queue_depth{unit="images"} 0.0' in text and 'patchlife_queue_depth{unit="tokens"} 0.0' in text
    assert "_created" not in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_check_metrics_passes(client: TestClient) -> None:
    client.post("/classify", files={"file": ("a.png", encode(photo(), "PNG"), "image/png")})
    client.get("/nowhere")
    proc = subprocess.run(["promtool", "check", "metrics"], input=scrape(client).encode(), capture_output=True,
                          timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_request_feeds_decode_batches_budget_and_http(client: TestClient, metric: Callable[..., float]) -> None:
    def batches_tail() -> float:
        text = scrape(client)
        return sum(float(v) for v in re.findall(r'patchlife_batches_total\{bucket="[01]\.\d",phase="tail"\} (\S+)',
                                                text))

    before = {n: metric(client, n) for n in ("patchlife_image_decode_seconds_count",
                                             "patchlife_image_kept_tokens_count",
                                             "patchlife_image_budget_ratio_count")}
    head = metric(client, "patchlife_model_compute_seconds_count", {"phase": "head"})
    tails = batches_tail()
    http = {"route": "/classify", "method": "POST", "status": "200"}
    http_before = metric(client, "patchlife_http_request_duration_seconds_count", http)
    images = [encode(photo(seed=s), "PNG") for s in range(3)]
    r = client.post("/classify", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)])
    assert r.status_code == 200
    for name, value in before.items():
        assert metric(client, name) == value + 3, name
    assert metric(client, "patchlife_model_compute_seconds_count", {"phase": "head"}) > head
    assert batches_tail() > tails
    assert metric(client, "patchlife_http_request_duration_seconds_count", http) == http_before + 1
    assert metric(client, "patchlife_http_requests_in_flight") == 0
    assert metric(client, "patchlife_computed_tokens_total") >= metric(client, "patchlife_needed_tokens_total") > 0
    assert metric(client, "patchlife_queue_depth", {"unit": "images"}) == 0


def test_unmatched_paths_do_not_become_labels(client: TestClient) -> None:
    client.get("/secret/path/12345")
    text = scrape(client)
    assert "/secret/path" not in text
    assert 'route="unmatched"' in text and 'status="404"' in text


def test_build_info_and_device_memory(client: TestClient, metric: Callable[..., float]) -> None:
    text = scrape(client)
    assert re.search(r'patchlife_build_info\{device="cpu",dtype="float32",model="nano-test",version="[^"]+"\} 1\.0',
                     text)
    assert metric(client, "patchlife_device_memory_allocated_bytes", {"device": "cpu"}) == 0
    assert 'patchlife_device_memory_reserved_bytes{device="cpu"} 0.0' in text


def test_device_memory_collector_reads_at_scrape_time() -> None:
    m = Metrics()
    assert "patchlife_device_memory_allocated_bytes{" not in m.exposition().decode()  # no engine yet
    m.watch_device(torch.device("cpu"))
    assert 'patchlife_device_memory_allocated_bytes{device="cpu"} 0.0' in m.exposition().decode()


def test_prometheus_hooks() -> None:
    m = Metrics()
    hooks = PrometheusHooks(m, dense_gflops=4.0, num_patches=196)
    hooks.on_queue_depth(7, 1200)
    hooks.on_batch("tail", 3, 900, "48-40-32", [0.001, 0.002, 0.003], 0.05)
    hooks.on_batch("head", 2, 400, None, [0.0, 0.01], 0.02)
    hooks.on_waste(800, 900)
    hooks.on_reject("overloaded")
    hooks.on_image_done(ImageResult(torch.zeros(5), torch.zeros(2, 2), (3, 2, 1), (8, 8, 8), 2.0, 0.7, 1.0, 2.0))
    v = m.registry.get_sample_value
    assert v("patchlife_queue_depth", {"unit": "images"}) == 7
    assert v("patchlife_queue_depth", {"unit": "tokens"}) == 1200
    assert v("patchlife_batches_total", {"phase": "tail", "bucket": "0.3"}) == 1  # 48/196 rounded up
    assert v("patchlife_batches_total", {"phase": "head", "bucket": "none"}) == 1
    assert v("patchlife_queue_wait_seconds_count", {"phase": "tail"}) == 3
    assert v("patchlife_batch_tokens_sum", {"phase": "tail"}) == 900
    assert v("patchlife_batch_size_sum", {"phase": "head"}) == 2
    assert v("patchlife_model_compute_seconds_sum", {"phase": "tail"}) == pytest.approx(0.05)
    assert v("patchlife_needed_tokens_total") == 800 and v("patchlife_computed_tokens_total") == 900
    assert v("patchlife_rejected_requests_total", {"reason": "overloaded"}) == 1
    assert v("patchlife_image_kept_tokens_sum") == 8 and v("patchlife_image_flops_sum") == 2e9
    assert v("patchlife_image_budget_ratio_sum") == pytest.approx(0.5)
    hooks.on_model_failure("out_of_memory")
    assert v("patchlife_model_failures_total", {"reason": "out_of_memory"}) == 1


def test_decode_fallbacks_by_known_reason() -> None:
    m = Metrics()
    m.decode_fallback("not_jpeg")
    m.decode_fallback("not_jpeg")
    m.decode_fallback("refused")
    v = m.registry.get_sample_value
    assert v("patchlife_decode_fallbacks_total", {"reason": "not_jpeg"}) == 2
    assert v("patchlife_decode_fallbacks_total", {"reason": "refused"}) == 1
    assert v("patchlife_decode_fallbacks_total", {"reason": "error"}) == 0
    with pytest.raises(ValueError):  # labels stay bounded
        m.decode_fallback("/tmp/upload.jpg")


def test_tail_bucket_label_is_bounded() -> None:
    hooks = PrometheusHooks(Metrics(), dense_gflops=4.0, num_patches=196)
    labels = {hooks.bucket_label(f"{n}-{n // 2}") for n in range(0, 400)}
    assert labels == {f"{i / 10:.1f}" for i in range(1, 11)}  # 10 values whatever the counts
    assert hooks.bucket_label("196-100") == "1.0" and hooks.bucket_label("20-10") == "0.2"
    assert hooks.bucket_label(None) == "none"


def test_latency_buckets_resolve_sub_millisecond() -> None:
    m = Metrics()
    m.compute_seconds.labels("tail").observe(0.0002)
    bucket = "patchlife_model_compute_seconds_bucket"
    assert m.registry.get_sample_value(bucket, {"phase": "tail", "le": "0.00025"}) == 1
    assert m.registry.get_sample_value(bucket, {"phase": "tail", "le": "0.0001"}) == 0


@pytest.mark.parametrize("values", [[0.0002, 0.0002, 0.003, 7.0, 1e9, -1.0, 0.0001, 0.00025], [], [0.5]])
def test_observe_many_records_what_observing_one_by_one_does(values: list[float]) -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from service.metrics import LATENCY_BUCKETS, observe_many

    def exposition(record: Callable[[Histogram], None]) -> str:
        registry = CollectorRegistry()
        h = Histogram("h_seconds", "h", ["phase"], registry=registry, buckets=LATENCY_BUCKETS)
        record(h.labels("tail"))
        return "\n".join(line for line in generate_latest(registry).decode().splitlines() if "_created" not in line)

    def one_by_one(h: Histogram) -> None:
        for v in values:
            h.observe(v)

    child = Histogram("c_seconds", "c", ["phase"], registry=CollectorRegistry()).labels("x")
    assert all(hasattr(child, n) for n in ("_upper_bounds", "_buckets", "_sum"))  # not the fallback
    assert exposition(lambda h: observe_many(h, values)) == exposition(one_by_one)
