"""Helpers of the ops checks: the dashboard's PromQL, exported metric names, external processes.

Imported by name (``tests/ops`` is on pytest's ``pythonpath``, see pyproject.toml), because pytest's importlib
mode does not let test modules import each other or the conftest.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.child import free_port, stop  # noqa: F401 - free_port re-exported for the ops and e2e tests

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "patchlife.json"
PROMETHEUS_YML = REPO / "docker" / "prometheus" / "prometheus.yml"
DATASOURCE_UID = "patchlife-prometheus"
DASHBOARD_UID = "patchlife-overview"
N_IMAGES = 20  # synthetic images the v2 client checks send (tests/ops/conftest.py's ``pngs``, ``pixels``)

# Grafana's interval variables, in both spellings ($__x and ${__x}); any other "$" is an error.
_GRAFANA_VARS = re.compile(r"\$(?:\{(__rate_interval|__interval|__range)\}|(__rate_interval|__interval|__range)\b)")
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "atan2", "inf", "nan"}


@dataclass(frozen=True)
class Query:
    """One PromQL target of one dashboard panel, as Grafana stores it (with its variables)."""

    panel_id: int
    panel_title: str
    ref_id: str
    raw: str

    @property
    def name(self) -> str:
        return f"panel {self.panel_id} {self.panel_title!r} target {self.ref_id}"

    def promql(self, window: str) -> str:
        """The expression with Grafana's interval variables replaced by ``window`` (e.g. ``1m``)."""
        return _GRAFANA_VARS.sub(window, self.raw)

    def metric_names(self) -> set[str]:
        """Metric names the expression selects: identifiers left once strings, label matchers,
        range/offset brackets, grouping clauses and function calls are taken out."""
        expr = _STRING.sub('""', self.promql("1m"))
        expr = re.sub(r"\{[^}]*\}", " ", expr)
        expr = re.sub(r"\[[^\]]*\]", " ", expr)
        expr = _GROUPING.sub(" ", expr)
        return {m for m in _IDENT.findall(expr) if m.lower() not in _KEYWORDS}


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    return [Query(int(p["id"]), str(p.get("title", "")), str(t.get("refId", "")), str(t["expr"]))
            for p in iter_panels(dashboard["panels"]) for t in p.get("targets", []) if t.get("expr")]


def exported_series_names(exposition: str) -> set[str]:
    """Series names a /metrics page exports, from its samples and from its ``# TYPE`` lines (so a
    labelled histogram that saw no observation yet still counts with its _bucket/_sum/_count)."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "summary": ("", "_sum", "_count")}
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names |= {s.name for s in family.samples}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    """True when a Prometheus instant-vector result holds at least one finite sample."""
    return any(math.isfinite(float(r["value"][1])) for r in result)


def require_tool(name: str) -> str:
    """Path of an external tool, or a loud skip (a failure when PATCHLIFE_REQUIRE_PROMETHEUS=1)."""
    path = shutil.which(name)
    if path is None:
        reason = (f"{name} is not installed: these checks did NOT run. Install Debian's `prometheus` "
                  "package (`make prometheus` does it as root) to run them.")
        if os.environ.get("PATCHLIFE_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    stop(proc, grace_s)


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the process log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_process(proc)
    pytest.fail(f"{url} not ready after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def prometheus_config(original: dict[str, Any], target: str, scrape: str = "1s") -> dict[str, Any]:
    """The repo's Prometheus config re-targeted at ``host:port``: its ``patchlife`` job only (metrics
    path and labels as written), scraping every ``scrape``."""
    jobs = [j for j in original.get("scrape_configs", []) if j.get("job_name") == "patchlife"]
    assert jobs, "docker/prometheus/prometheus.yml has no scrape job named 'patchlife'"
    job = {**jobs[0], "scrape_interval": scrape, "scrape_timeout": scrape,
           "static_configs": [{**jobs[0]["static_configs"][0], "targets": [target]}]}
    glob = {**original.get("global", {}), "scrape_interval": scrape, "scrape_timeout": scrape,
            "evaluation_interval": scrape}
    return {**original, "global": glob, "scrape_configs": [job]}


def start_prometheus(binary: str, config: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A real Prometheus on a free loopback port with its storage in ``workdir``; waits for /-/ready."""
    import yaml

    port = free_port()
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={workdir / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(f"{url}/-/ready", proc, log, timeout_s=30)
    return proc, url


def instant_query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    """``/api/v1/query`` result vector; raises on a query error (a bad expression is a failure)."""
    body = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()
    if body.get("status") != "success":
        raise AssertionError(f"Prometheus rejected {expr!r}: {body.get('error')}")
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        return [{"metric": {}, "value": result}]
    return list(result)
