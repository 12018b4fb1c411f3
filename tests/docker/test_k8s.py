"""docker/k8s: every overlay renders with `kubectl kustomize` (offline) and every object validates against the
Kubernetes schemas (the `kubernetes-validate` package, strict: no unknown fields); the guard's own rules on top.

Custom resources (the Prometheus Operator's ServiceMonitor, KServe's InferenceService) are not in those schemas,
and their published CRDs cannot be fetched here (no network): their schema validation is skipped for that reason,
and the fields their CRDs require, and this deployment relies on, are checked by hand below.
"""

import hashlib
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.conftest import MODELS, ROOT

K8S = ROOT / "docker" / "k8s"
OVERLAYS = ("base", "overlays/queue-wait", "overlays/prometheus-operator", "overlays/kserve")
KUBERNETES = "1.32.0"  # the oldest version still supported upstream when this was written; strict schemas
CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("serving.kserve.io/v1beta1", "InferenceService")}
BUNDLE_DIGEST = hashlib.sha256((MODELS / "manifest.json").read_bytes()).hexdigest()


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: install kubectl >= 1.21 (kustomize v4+ syntax; Debian's 1.20 is too old)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates(overlay: str) -> None:
    import kubernetes_validate

    objects = render(overlay)
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM:
            continue  # no schema here (module doc); checked field by field below
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)  # raises on any schema error


def image_entry() -> tuple[list[str], list[str]]:
    """(ENTRYPOINT, CMD) of the service image's final stage, as the Dockerfile parser reads them."""
    import dockerfile

    entry: list[str] = []
    cmd: list[str] = []
    for c in dockerfile.parse_file(str(ROOT / "docker" / "service.Dockerfile")):
        if c.cmd == "FROM":
            entry, cmd = [], []  # a new stage
        elif c.cmd == "ENTRYPOINT":
            entry = list(c.value)
        elif c.cmd == "CMD":
            cmd = list(c.value)
    return entry, cmd


def runs(container: dict[str, Any]) -> list[str]:
    """What Kubernetes runs in the container: `command` replaces the image's ENTRYPOINT, `args` its CMD."""
    entry, cmd = image_entry()
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    return [*entry, *container.get("args", cmd)]


def container_rules(container: dict[str, Any], pod: dict[str, Any], pod_security: dict[str, Any]) -> None:
    """What every guard container must do, in a Deployment or a KServe predictor."""
    # the image's own command: `args` alone replace its CMD and, with no ENTRYPOINT, would run a program `serve`
    assert runs(container) == ["backdoor-guard", "serve"], runs(container)
    # a pause before SIGTERM, while the endpoint's removal spreads, and time after it for requests in flight
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    shutdown = int({e["name"]: e.get("value") for e in container["env"]}["GUARD_SHUTDOWN_TIMEOUT_S"])
    assert pause >= 5 and pod["terminationGracePeriodSeconds"] > pause + shutdown
    assert any(e["name"] == "GUARD_API_KEY" and e["valueFrom"]["secretKeyRef"]["optional"] for e in container["env"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert env["GUARD_ORT_THREADS"] == limits["cpu"] == requests["cpu"]  # threads match the cores it gets
    assert env["GUARD_BUNDLE_SHA256"] == BUNDLE_DIGEST, "pin the shipped bundle's current root digest"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == 10001  # the image's user
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # the only writable path


def test_the_deployment_is_locked_down_pinned_and_probed() -> None:
    objects = render("base")
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container_rules(container, pod, pod["securityContext"])
    assert pod["automountServiceAccountToken"] is False
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it; an apply would fight it
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    service, pdb, hpa = (
        one(objects, "Service"),
        one(objects, "PodDisruptionBudget"),
        one(objects, "HorizontalPodAutoscaler"),
    )
    assert service["spec"]["selector"] == labels and pdb["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]  # a drain never takes the last replica


def test_the_queue_wait_autoscaler_uses_the_adapters_metric_of_the_services_histogram() -> None:
    hpa = one(render("overlays/queue-wait"), "HorizontalPodAutoscaler")
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    rules = yaml.safe_load((K8S / "overlays" / "queue-wait" / "prometheus-adapter-rules.yaml").read_text())
    (rule,) = rules["rules"]["custom"]
    assert pods["metric"]["name"] == rule["name"]["as"]
    histogram = re.search(r"^(\w+)_count", rule["name"]["matches"].lstrip("^")).group(1)  # type: ignore[union-attr]
    assert f'"{histogram}"' in (ROOT / "service" / "metrics.py").read_text()  # a metric the guard exports


def test_the_service_monitor_scrapes_the_services_port() -> None:
    objects = render("overlays/prometheus-operator")
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    # the CRD requires spec.selector and spec.endpoints; each endpoint names a Service port
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(service["metadata"]["labels"].items())
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"] and "http" in ports
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_the_kserve_predictor_is_the_same_locked_down_guard() -> None:
    (service,) = render("overlays/kserve")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = service["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # what KServe requires of a custom predictor's container
    container_rules(container, predictor, predictor["securityContext"])
    assert container["ports"][0]["containerPort"] == 8000 and predictor["minReplicas"] >= 2
