"""compose.yaml is valid Compose, and its services are wired to each other and to the settings.

The file is checked against the Compose specification's JSON schema (``compose-spec.json`` as
the ``check-jsonschema`` package ships it) as written, and as Compose sees it after
interpolation, both with no variables set and with ``deploy/compose/production.env``.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from opea_grpc import telemetry
from opea_grpc.cli import BUILTIN_SERVICES
from opea_grpc.config import ClientConfig, ServerConfig, load
from tests.deploy.compose import (
    COMPOSE_FILE,
    PRODUCTION_ENV,
    ROOT,
    InterpolationError,
    Project,
    env_file,
    interpolate,
    raw,
)
from tests.deploy.settings import unknown_variables

SERVICES = ("embedding", "retrieval", "rerank", "chat")
ENVIRONMENTS = {"defaults": {}, "production": env_file(PRODUCTION_ENV)}


def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def values(project: Project, service: str) -> dict[str, str]:
    """A service's environment; variables left to the shell (none here) are left out."""
    return {k: v for k, v in project.environment(service).items() if v is not None}


def errors(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


@pytest.fixture(params=sorted(ENVIRONMENTS))
def project(request: pytest.FixtureRequest) -> Project:
    return Project.load(COMPOSE_FILE, ENVIRONMENTS[request.param])


def test_compose_yaml_is_valid_compose(validator: jsonschema.protocols.Validator) -> None:
    assert errors(validator, raw()) == []
    for env in ENVIRONMENTS.values():
        assert errors(validator, Project.load(COMPOSE_FILE, env).document) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "gateway", "depends_on", "chat", "condition"), "service_ready"),
        (("services", "embedding", "healthcheck", "intervall"), "10s"),
        (("services", "retrieval", "volumes"), "retrieval-data:/data"),
        (("services", "chat", "enviroment"), {"OPEA_PORT": "50054"}),
    ],
)
def test_the_schema_catches_mistakes(
    validator: jsonschema.protocols.Validator, path: tuple[str, ...], value: object
) -> None:
    """The validation above has teeth: small mistakes in the same file are errors."""
    document = copy.deepcopy(raw())
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert errors(validator, document) != []


def test_every_variable_has_a_default() -> None:
    Project.load(COMPOSE_FILE, {})  # strict: an unset variable without a default is an error
    with pytest.raises(InterpolationError):
        interpolate("${NOT_SET}", {})
    assert interpolate("${A:-x} ${B-y} $$HOME ${C:+z}", {"B": "", "C": "1"}) == "x  $HOME z"


def test_each_service_runs_the_one_image_by_command(project: Project) -> None:
    built = project.built()
    assert sorted(built) == sorted([*SERVICES, "gateway"])
    assert set(built) <= set(project.enabled())
    for name in built:
        spec = project.services[name]
        assert spec["command"] == ["opea-grpc", "serve", name]
        assert name in BUILTIN_SERVICES
        assert spec["image"] == project.services["gateway"]["image"]
        assert spec["build"]["context"] == "."
        assert (ROOT / spec["build"]["context"] / "Dockerfile").is_file()
        assert "profiles" not in spec


def test_healthchecks_ask_the_grpc_health_service(project: Project) -> None:
    for name in project.built():
        port = values(project, name)["OPEA_PORT"]
        check = project.services[name]["healthcheck"]
        assert check["test"] == ["CMD", "opea-grpc", "health", f"127.0.0.1:{port}"]
        assert {"interval", "timeout", "retries", "start_period"} <= check.keys()


def test_the_gateway_reaches_every_replica_by_dns(project: Project) -> None:
    env = values(project, "gateway")
    gateway = project.services["gateway"]
    for name in SERVICES:
        port = values(project, name)["OPEA_PORT"]
        assert env[f"OPEA_GATEWAY_{name.upper()}"] == f"dns:///{name}:{port}"
        assert gateway["depends_on"][name] == {"condition": "service_healthy"}
        assert port in map(str, project.services[name]["expose"])
        assert "ports" not in project.services[name], "published ports would stop --scale"
    client = load(ClientConfig, env, prefix="OPEA_CLIENT_")
    assert client.round_robin
    assert client.health_check
    rest = env["OPEA_GATEWAY_REST_PORT"]
    published = [str(p).rsplit(":", 1)[-1] for p in gateway["ports"]]
    assert sorted(published) == sorted([rest, env["OPEA_PORT"]])


@pytest.mark.parametrize("which", sorted(ENVIRONMENTS))
def test_settings_load_from_each_environment(which: str) -> None:
    """Every service's environment builds its settings, names only real settings, and picks
    the embedded backends by default and the production ones with production.env."""
    project = Project.load(COMPOSE_FILE, ENVIRONMENTS[which])
    production = which == "production"
    expected = {
        "embedding": "openai" if production else "minilm",
        "retrieval": "pgvector" if production else "local",
        "rerank": "openai" if production else "lexical",
        "chat": "openai" if production else "extractive",
    }
    for name in project.built():
        env = values(project, name)
        assert unknown_variables(name, env) == []
        module = importlib.import_module(BUILTIN_SERVICES[name])
        prefix = f"OPEA_{name.upper()}_"
        server = load(ServerConfig, env, prefix=("OPEA_", prefix))
        settings = load(module.Settings, env, prefix=prefix)
        assert server.host == "0.0.0.0"
        assert server.port == int(env["OPEA_PORT"])
        if name in expected:
            assert settings.backend == expected[name]
            assert server.metrics_port == 9464
        assert env["OTEL_SERVICE_NAME"] == f"opea-{name}"
        assert telemetry.exporters(env) == (("otlp",) if production else ())


def test_upstreams_are_services_of_the_production_profiles() -> None:
    """With production.env every URL a service calls names a running service's exposed port."""
    project = Project.load(COMPOSE_FILE, ENVIRONMENTS["production"])
    enabled = set(project.enabled())
    assert enabled == set(project.services), "production.env turns on every profile"
    called = []
    for name in project.built():
        env = values(project, name)
        for key in (
            "OPEA_EMBEDDING_BASE_URL",
            "OPEA_RERANK_BASE_URL",
            "OPEA_CHAT_BASE_URL",
            "OPEA_RETRIEVAL_DSN",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ):
            if key in env:
                url = urlsplit(env[key])
                assert url.hostname in enabled, f"{name}: {key}={env[key]}"
                exposed = map(str, project.services[url.hostname].get("expose", ()))
                assert str(url.port) in exposed, f"{name}: {key}={env[key]}"
                called.append(url.hostname)
    assert set(called) == {"tei-embedding", "tei-rerank", "vllm", "postgres", "otel-collector"}
    postgres = project.services["postgres"]["environment"]
    dsn = urlsplit(values(project, "retrieval")["OPEA_RETRIEVAL_DSN"])
    assert (dsn.username, dsn.password, dsn.path) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        "/" + postgres["POSTGRES_DB"],
    )
    models = {
        "vllm": values(project, "chat")["OPEA_CHAT_MODEL"],
        "tei-embedding": values(project, "embedding")["OPEA_EMBEDDING_MODEL"],
        "tei-rerank": values(project, "rerank")["OPEA_RERANK_MODEL"],
    }
    for upstream, model in models.items():
        assert model in project.services[upstream]["command"], upstream


def test_the_retrieval_index_lives_in_a_named_volume(project: Project) -> None:
    data_dir = values(project, "retrieval")["OPEA_RETRIEVAL_DATA_DIR"]
    mounts = [str(m).split(":") for m in project.services["retrieval"]["volumes"]]
    holding = [source for source, target, *_ in mounts if data_dir.startswith(target + "/")]
    assert holding, f"{data_dir} is on no volume"
    assert holding[0] in project.document["volumes"]


def test_config_files_of_the_profiles_exist_and_agree(project: Project) -> None:
    for name, spec in project.services.items():
        for mount in spec.get("volumes", ()):
            source = str(mount).split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).is_file(), f"{name} mounts {source}"

    prometheus = yaml.safe_load((ROOT / "deploy/compose/prometheus.yml").read_text())
    targets = {
        (name, sd["port"], job.get("metrics_path", "/metrics"))
        for job in prometheus["scrape_configs"]
        for sd in job["dns_sd_configs"]
        for name in sd["names"]
    }
    expected = {(name, 9464, "/metrics") for name in SERVICES}
    rest = int(values(project, "gateway")["OPEA_GATEWAY_REST_PORT"])
    expected.add(("gateway", rest, "/metrics"))
    assert targets == expected
    for name in SERVICES:
        assert values(project, name)["OPEA_METRICS_PORT"] == "9464"
        assert "9464" in map(str, project.services[name]["expose"])

    collector = project.services["otel-collector"]
    config_path = next(a.split("=", 1)[1] for a in collector["command"] if a.startswith("--config"))
    mounted = {str(m).split(":")[1]: str(m).split(":")[0] for m in collector["volumes"]}
    config = yaml.safe_load((ROOT / mounted[config_path]).read_text())
    receiving = int(config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":")[-1])
    sending = urlsplit(values(project, "gateway")["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert (sending.hostname, sending.port) == ("otel-collector", receiving)
    for exporter in config["service"]["pipelines"]["traces"]["exporters"]:
        host, port = config["exporters"][exporter]["endpoint"].split(":")
        assert host in project.services
        assert port in map(str, project.services[host]["expose"])
        assert set(project.services[host]["profiles"]) == set(collector["profiles"])


def test_the_readme_names_real_deployment_files() -> None:
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"(?<![\w/])((?:deploy|tests/deploy)/[\w./-]*[\w])", readme))
    assert "deploy/compose/production.env" in named
    assert [n for n in sorted(named) if not (ROOT / n).exists()] == []
    for overlay in ("local", "production"):
        assert f"kubectl apply -k deploy/k8s/overlays/{overlay}" in readme
