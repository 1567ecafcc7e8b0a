"""One /metrics for a service of several processes (prometheus_client's multiprocess mode).

Real processes share one directory: two API processes and a model process write what they write in
``serve``, and one API process's /metrics (its ``Metrics.exposition``) must show the whole service:
counters and histograms summed, gauges without a ``pid`` label, a dead API process's requests in
flight dropped and its counts kept, a dead model process's live gauges gone. The children come
from a forkserver that has imported ``service.metrics`` once (see ``metrics_procs``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any

import metrics_procs
import pytest
from metrics_procs import Child
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics, multiprocess_dir

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards" / "patchlife.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def named(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in samples if n == name]


@pytest.fixture(scope="module")
def ctx() -> ForkServerContext:
    return metrics_procs.forkserver()


def run_api(ctx: ForkServerContext, directory: Path, requests: int, in_flight: int) -> Child:
    return Child(ctx, metrics_procs.api_process, directory, requests, in_flight)


@pytest.fixture(scope="module")
def story(ctx: ForkServerContext, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Scrapes of API process A at each step: all up; the model sick; API process B gone; the model gone."""
    directory = tmp_path_factory.mktemp("metrics-mp")
    a, b = run_api(ctx, directory, 3, 1), run_api(ctx, directory, 4, 2)
    model = Child(ctx, metrics_procs.model_process, directory)
    children = [a, b, model]
    try:
        for child in children:
            child.ready()
        scrapes = {"all": a.ask("scrape")}
        scrapes["all_from_b"] = b.ask("scrape")
        stats = a.ask("stats")
        route_body, route_type = a.ask("route")
        model.ask("sicken")
        scrapes["sick"] = a.ask("scrape")
        b.stop(directory)
        scrapes["api_dead"] = a.ask("scrape")
        model.stop(directory)
        scrapes["model_dead"] = a.ask("scrape")
        a.stop(directory)
        yield {k: parse(v) for k, v in scrapes.items()} | {"raw": scrapes["all"], "stats": stats,
                                                         "route": parse(route_body), "route_type": route_type}
    finally:
        for child in children:
            if child.proc.is_alive():
                child.proc.kill()


def test_counters_and_histograms_sum_over_processes(story: dict[str, Any]) -> None:
    s = story["all"]
    http = {"route": "/classify", "method": "POST", "status": "200"}
    assert value(s, "patchlife_http_request_duration_seconds_count", **http) == 7  # 3 + 4
    assert value(s, "patchlife_http_request_duration_seconds_bucket", **http, le="0.025") == 7
    assert value(s, "patchlife_http_request_duration_seconds_bucket", **http, le="0.01") == 0
    assert value(s, "patchlife_image_decode_seconds_sum") == pytest.approx(7 * 0.003)
    assert value(s, "patchlife_rejected_requests_total", reason="bad_image") == 2
    assert value(s, "patchlife_rejected_requests_total", reason="overloaded") == 0  # created at 0 by all
    assert value(s, "patchlife_batches_total", phase="tail", bucket="0.3") == 1  # the model process's
    assert value(s, "patchlife_model_compute_seconds_count", phase="head") == 1
    assert value(s, "patchlife_image_flops_sum") == 2e9
    assert value(s, "patchlife_decode_fallbacks_total", reason="refused") == 1
    assert value(s, "patchlife_decode_fallbacks_total", reason="not_jpeg") == 0
    assert story["all_from_b"] == s  # any API process shows the same service
    assert story["route"] == s and story["route_type"].startswith("text/plain; version=0.0.4")  # GET /metrics


def test_gauges_show_one_value_without_pid(story: dict[str, Any]) -> None:
    s = story["all"]
    assert not [key for key in s if "pid" in dict(key[1])]
    assert value(s, "patchlife_http_requests_in_flight") == 3  # 1 + 2: summed over the live processes
    assert value(s, "patchlife_queue_depth", unit="images") == 5  # the model's, not hidden by the APIs' zeros
    assert value(s, "patchlife_queue_depth", unit="tokens") == 700
    assert named(s, "patchlife_build_info") == [{"version": "1.2.3", "model": "tiny", "device": "cpu",
                                                 "dtype": "float32"}]
    assert value(s, "patchlife_model_healthy") == 1
    assert value(s, "patchlife_cost_model_fixed_seconds", phase="head") == pytest.approx(0.01)
    assert value(s, "patchlife_cost_model_unit_seconds", phase="tail") == pytest.approx(1e-5)
    assert value(s, "patchlife_cuda_graphs_captured") == metrics_procs.GRAPHS["captured"]
    assert value(s, "patchlife_eager_fallbacks") == metrics_procs.GRAPHS["eager_fallbacks"]
    assert value(s, "patchlife_device_memory_allocated_bytes", device="cpu") == 0
    assert value(s, "patchlife_device_memory_reserved_bytes", device="cpu") == 0
    assert value(s, "patchlife_last_inference_timestamp_seconds") == metrics_procs.LAST_INFERENCE


def test_the_heartbeat_carries_health_across(story: dict[str, Any]) -> None:
    assert value(story["sick"], "patchlife_model_healthy") == 0  # watch_health's callback, read by sample()


def test_a_dead_api_process_keeps_its_counts_and_drops_its_live_gauges(story: dict[str, Any]) -> None:
    before, after = story["sick"], story["api_dead"]
    assert value(after, "patchlife_http_requests_in_flight") == 1  # B's two are gone with B
    for name, labels in [("patchlife_http_request_duration_seconds_count",
                          {"route": "/classify", "method": "POST", "status": "200"}),
                         ("patchlife_rejected_requests_total", {"reason": "bad_image"}),
                         ("patchlife_image_decode_seconds_count", {})]:
        assert value(after, name, **labels) == value(before, name, **labels), name  # never backwards
    assert value(after, "patchlife_queue_depth", unit="images") == 5


def test_a_dead_model_process_leaves_no_stale_state(story: dict[str, Any]) -> None:
    s = story["model_dead"]
    assert value(s, "patchlife_model_healthy") == 0  # only the API processes' zeros are left
    assert named(s, "patchlife_build_info") == []
    assert value(s, "patchlife_queue_depth", unit="images") == 0
    assert value(s, "patchlife_cuda_graphs_captured") == 0
    assert value(s, "patchlife_batches_total", phase="tail", bucket="0.3") == 1  # its counts stay
    assert value(s, "patchlife_last_inference_timestamp_seconds") == metrics_procs.LAST_INFERENCE  # a fact


def test_triton_statistics_count_the_whole_service(story: dict[str, Any]) -> None:
    """/v2/models/{name}/stats reads the aggregate: the model process's images, both API processes' requests."""
    stats = story["stats"]
    assert stats["inference_count"] == 1 and stats["execution_count"] == 1
    assert stats["inference_stats"]["success"]["count"] == 7
    assert stats["last_inference"] == int(metrics_procs.LAST_INFERENCE * 1000)


def test_every_dashboard_metric_is_in_the_aggregate(story: dict[str, Any]) -> None:
    def exprs(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            yield from (t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            yield from exprs(panel.get("panels", []))

    panels = json.loads(DASHBOARD.read_text())["panels"]
    wanted = {n for e in exprs(panels) for n in re.findall(r"\b(patchlife_[a-z_]+)", e)}
    assert len(wanted) > 20
    exported = {name for name, _ in story["all"]}
    assert not wanted - exported


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_aggregate_passes_promtool(story: dict[str, Any]) -> None:
    proc = subprocess.run(["promtool", "check", "metrics"], input=story["raw"].encode(), capture_output=True,
                          timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_switching_on_once_and_back(ctx: ForkServerContext, tmp_path: Path) -> None:
    directory = tmp_path / "mp"
    theirs: Connection
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=metrics_procs.switching, args=(directory, theirs), daemon=True)
    proc.start()
    assert mine.poll(60)
    out = mine.recv()
    proc.join(30)
    assert out["before"] is None and out["on"] == directory.resolve() and out["same_class"]
    assert out["files"] and "counter_999999.db" not in out["files"]  # the stale file went, its own stayed
    assert not out["moved"]
    assert out["after"] is None and not out["exists"] and out["in_process"]


def test_in_process_mode_is_unchanged() -> None:
    """Without the switch (this test process): no directory, the own registry, device memory at scrape time."""
    assert multiprocess_dir() is None
    m = Metrics()
    assert m.shared_dir is None and m.memory_gauges is None
    assert m.exposition() == generate_latest(m.registry)
    m.sample()  # nothing to sample in-process
    m.set_graphs({"captured": 2, "capture_seconds": 0.5, "capture_bytes": 8, "eager_fallbacks": 1})
    assert m.registry.get_sample_value("patchlife_cuda_graphs_captured") == 2
