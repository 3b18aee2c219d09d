"""Static checks of the deployment files (issue 8): no Docker engine or cluster is needed.

compose.yaml is validated against the Compose Specification's schema (deploy/schemas), every
Kubernetes manifest of every overlay against Kubernetes' schemas (kubernetes-validate), and the
names that must agree (topics, ports, MEDMESH_ variables, model versions, consumer groups) are
derived from the code: the topic contract, the model specs and the services' settings classes.

The overlays are rendered by a small Kustomize subset below (resources, namespace, labels, JSON 6902
patches), so the checks run without kubectl; where ``kustomize`` or ``kubectl`` is installed, a test
checks that the real Kustomize renders exactly the same objects.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, get_args
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from pydantic import BaseModel, SecretStr
from pydantic_settings import BaseSettings

from medmesh_cli.devstack.kustomize import KUSTOMIZE_VERSION, install_command, kustomize_binary
from medmesh_cli.devstack.model_repository import main as render_main
from medmesh_cli.devstack.stack import PORT_VARIABLES
from medmesh_console.settings import ConsoleSettings
from medmesh_contracts.modelspec import load_specs
from medmesh_contracts.topics import STATIC_TOPICS, all_topics, model_task_topic
from medmesh_inference.settings import WorkerSettings
from medmesh_ingest.settings import IngestSettings
from medmesh_reporting.settings import ReportingSettings
from medmesh_router.settings import RouterSettings
from medmesh_runtime.settings import ServiceSettings
from tests.modules import load_file

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MODEL_REPOSITORY = ROOT / "deploy" / "triton" / "models"
# The module that renders a Triton model repository (compose's gpu profile, the models image).
RENDER_MODULE = "medmesh_cli.devstack.model_repository"
# protobuf and tritonclient ship no type information: loaded untyped.
text_format: Any = importlib.import_module("google.protobuf.text_format")
model_config_pb2: Any = importlib.import_module("tritonclient.grpc.model_config_pb2")
OVERLAYS = ("small", "large")
# The Kubernetes version the manifests must be valid for (the oldest one we support).
K8S_VERSION = "1.30"
MEDMESH_IMAGE = "medmesh:dev"

Doc = dict[str, Any]

# Each service: its module (the container command), its settings class and its port field.
SERVICES: dict[str, tuple[type[ServiceSettings], str]] = {
    "medmesh_ingest": (IngestSettings, "ingest_port"),
    "medmesh_router": (RouterSettings, "router_port"),
    "medmesh_inference": (WorkerSettings, "worker_port"),
    "medmesh_reporting": (ReportingSettings, "reporting_port"),
    "medmesh_console": (ConsoleSettings, "console_port"),
}
SETTINGS_CLASSES: tuple[type[BaseSettings], ...] = (
    ServiceSettings,
    *tuple(cls for cls, _ in SERVICES.values()),
)
# Environment variables of medmesh containers that are not medmesh settings: OpenSSL's trust store
# (the Strimzi cluster CA in the large overlay).
FOREIGN_ENV = frozenset({"SSL_CERT_FILE"})


# --- what the code says ------------------------------------------------------------------------


def env_name(field: str) -> str:
    """The environment variable of a settings field (every class uses the MEDMESH_ prefix)."""
    return f"MEDMESH_{field.upper()}"


@cache
def settings_env_names() -> frozenset[str]:
    """Every MEDMESH_ variable some settings class reads."""
    names = set()
    for cls in SETTINGS_CLASSES:
        assert cls.model_config.get("env_prefix") == "MEDMESH_", cls
        names |= {env_name(f) for f in cls.model_fields}
    return frozenset(names)


def _holds_secret(annotation: Any) -> bool:
    """Whether a type is or contains SecretStr (in unions, containers and nested models)."""
    if annotation is SecretStr:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return any(_holds_secret(f.annotation) for f in annotation.model_fields.values())
    return any(_holds_secret(arg) for arg in get_args(annotation))


@cache
def secret_env_names() -> frozenset[str]:
    """Settings that are secrets: fields holding a SecretStr, and the Kafka SASL credentials."""
    names = {"MEDMESH_KAFKA_SASL_USERNAME", "MEDMESH_KAFKA_SASL_PASSWORD"}
    for cls in SETTINGS_CLASSES:
        for field, info in cls.model_fields.items():
            if _holds_secret(info.annotation):
                names.add(env_name(field))
    return frozenset(names)


@cache
def model_versions() -> tuple[tuple[str, int], ...]:
    """Every (model, version) deployed by the specs in deploy/models."""
    specs = load_specs(ROOT / "deploy" / "models")
    return tuple((s.name, v.version) for s in specs.values() for v in s.versions)


def worker_name(model: str, version: int) -> str:
    """The compose service / Kubernetes workload of one model version's workers."""
    return f"worker-{model}-v{version}"


# --- .env.example --------------------------------------------------------------------------------


@cache
def env_example() -> dict[str, str]:
    """The variables .env.example sets (not the commented ones)."""
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"not NAME=value: {line!r}"
            values[name.strip()] = value
    return values


def env_example_named() -> set[str]:
    """Every MEDMESH_ variable .env.example names, set or in a `# MEDMESH_X=` comment."""
    return set(re.findall(r"^#? ?(MEDMESH_[A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))


# --- compose.yaml --------------------------------------------------------------------------------


@cache
def compose() -> Doc:
    """compose.yaml as YAML (merge keys resolved)."""
    doc: Doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return doc


def compose_medmesh_services() -> dict[str, Doc]:
    """The compose services that run a medmesh service module, by name."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if svc.get("command", [])[:2] == ["python", "-m"] and svc["command"][2] in SERVICES
    }


# --- Kubernetes: a Kustomize subset ------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches"}
CLUSTER_SCOPED = {"Namespace"}


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def apply_json_patch(doc: Doc, ops: list[Doc]) -> None:
    """Apply RFC 6902 add / replace / remove operations in place."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            if op["op"] == "add":
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            elif op["op"] == "replace":
                node[int(last)] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                del node[int(last)]
            else:
                raise AssertionError(f"unsupported op {op['op']}")
        elif op["op"] in ("add", "replace"):
            assert op["op"] == "add" or last in node, f"replace of a missing {op['path']}"
            node[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[last]
        else:
            raise AssertionError(f"unsupported op {op['op']}")


def _targets(doc: Doc, target: Doc) -> bool:
    if "kind" in target and doc["kind"] != target["kind"]:
        return False
    if "name" in target and not re.fullmatch(target["name"], doc["metadata"]["name"]):
        return False
    if "labelSelector" in target:
        labels = doc["metadata"].get("labels", {})
        for term in target["labelSelector"].split(","):
            key, _, value = term.partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def render(directory: Path) -> list[Doc]:
    """Render a kustomization the way `kustomize build` does, for the features used here."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(k) <= KUSTOMIZATION_KEYS, f"renderer lacks {set(k) - KUSTOMIZATION_KEYS}"
    docs: list[Doc] = []
    for resource in k.get("resources", []):
        path = directory / resource
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in k.get("patches", []):
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        targets = [d for d in docs if _targets(d, patch["target"])]
        assert targets, f"patch target matches nothing: {patch['target']}"
        for doc in targets:
            apply_json_patch(doc, yaml.safe_load(text))
    for doc in docs:
        if "namespace" in k and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = k["namespace"]
        for label in k.get("labels", []):
            assert not label.get("includeSelectors")
            assert not label.get("includeTemplates")
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    return docs


@cache
def _rendered(overlay: str) -> tuple[str, ...]:
    return tuple(json.dumps(d, sort_keys=True) for d in render(K8S / "overlays" / overlay))


def rendered(overlay: str) -> list[Doc]:
    """A fresh copy of an overlay's rendered objects."""
    return [json.loads(d) for d in _rendered(overlay)]


def by_kind(docs: list[Doc], *kinds: str) -> dict[str, Doc]:
    """The objects of the given kinds, by name."""
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in kinds}


def workloads(docs: list[Doc]) -> dict[str, Doc]:
    """Deployments, StatefulSets and Jobs by name."""
    return by_kind(docs, "Deployment", "StatefulSet", "Job")


def medmesh_containers(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(workload name, container) for every container running the medmesh image."""
    for name, w in workloads(docs).items():
        for c in w["spec"]["template"]["spec"]["containers"]:
            if c["image"] == MEDMESH_IMAGE:
                yield name, c


def container_module(container: Doc) -> str | None:
    """The medmesh service module a container runs (None for other commands)."""
    command = container.get("command", [])
    return command[2] if command[:2] == ["python", "-m"] and command[2] in SERVICES else None


def configmap(docs: list[Doc]) -> dict[str, str]:
    """The data of the medmesh-config ConfigMap."""
    data: dict[str, str] = by_kind(docs, "ConfigMap")["medmesh-config"]["data"]
    return data


def load_generator() -> ModuleType:
    """deploy/k8s/generate.py as a module."""
    return load_file(K8S / "generate.py", "medmesh_k8s_generate")


# --- Compose -------------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    """compose.yaml validates against the Compose Specification's JSON Schema."""
    schema = json.loads((ROOT / "deploy" / "schemas" / "compose-spec.json").read_text())
    errors = [
        f"{e.json_path}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(compose())
    ]
    assert errors == []


def test_compose_schema_check_rejects_a_misspelt_key() -> None:
    """The Compose schema check is not vacuous: a misspelt service key fails it."""
    schema = json.loads((ROOT / "deploy" / "schemas" / "compose-spec.json").read_text())
    broken = copy.deepcopy(compose())
    broken["services"]["router"]["healtcheck"] = broken["services"]["router"]["healthcheck"]
    assert not jsonschema.Draft202012Validator(schema).is_valid(broken)


def test_compose_runs_one_worker_service_per_model_version() -> None:
    """compose.yaml has exactly one worker service per model version of the specs, set to it."""
    workers = {
        n: s
        for n, s in compose_medmesh_services().items()
        if s["command"][2] == "medmesh_inference"
    }
    assert set(workers) == {worker_name(m, v) for m, v in model_versions()}
    for model, version in model_versions():
        env = workers[worker_name(model, version)]["environment"]
        assert env == {"MEDMESH_WORKER_MODEL": model, "MEDMESH_WORKER_MODEL_VERSION": str(version)}
        # --scale needs no fixed container name and no published host port.
        assert "container_name" not in workers[worker_name(model, version)]
        assert "ports" not in workers[worker_name(model, version)]


def test_compose_services_have_healthchecks_limits_and_healthy_dependencies() -> None:
    """Each medmesh service: the env file, a health check, a memory limit, healthy dependencies."""
    services = compose_medmesh_services()
    assert {s["command"][2] for s in services.values()} == set(SERVICES)
    for name, svc in services.items():
        assert svc["env_file"][0] == {"path": ".env.example"}, name
        assert svc["healthcheck"]["test"], name
        assert svc["deploy"]["resources"]["limits"]["memory"], name
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy", name
        assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully", name
        if svc["command"][2] == "medmesh_inference":
            for triton in ("triton", "triton-cpu"):
                assert svc["depends_on"][triton]["condition"] == "service_healthy", name
        assert set(svc.get("environment", {})) <= settings_env_names(), name
    for infra in ("kafka", "triton", "triton-cpu"):
        assert compose()["services"][infra]["healthcheck"]["test"]
        assert compose()["services"][infra]["deploy"]["resources"]["limits"]["memory"]


def test_every_service_medmesh_up_runs_is_checked_here() -> None:
    """The services these checks cover are every service module the local stack runs: a new
    service (as the console was) fails here until compose, Kubernetes and the health check
    carry it."""
    assert set(SERVICES) == set(PORT_VARIABLES)


def test_compose_publishes_ingest_and_the_console_on_their_configured_ports() -> None:
    """The published ports: ingest's FHIR endpoint on MEDMESH_INGEST_PORT inside, and the console
    on MEDMESH_CONSOLE_PORT inside, on the host's loopback only."""
    published = {n: s["ports"] for n, s in compose()["services"].items() if "ports" in s}
    assert published == {
        "ingest": [f"8080:{env_example()['MEDMESH_INGEST_PORT']}"],
        "console": [f"127.0.0.1:8190:{env_example()['MEDMESH_CONSOLE_PORT']}"],
    }


def test_compose_console_reads_the_router_of_compose() -> None:
    """The console's MEDMESH_ROUTER_URL is the compose router service on MEDMESH_ROUTER_PORT, and
    the console starts once that router is healthy."""
    url = urlsplit(env_example()["MEDMESH_ROUTER_URL"])
    assert (url.hostname, url.port) == ("router", int(env_example()["MEDMESH_ROUTER_PORT"]))
    assert "router" in compose()["services"]
    assert compose()["services"]["console"]["depends_on"]["router"] == {
        "condition": "service_healthy"
    }


def test_compose_triton_reserves_the_gpu_and_has_a_cpu_profile() -> None:
    """Triton mounts the model repository; the gpu profile reserves GPUs, the cpu profile runs without."""
    services = compose()["services"]
    gpu, cpu = services["triton"], services["triton-cpu"]
    assert gpu["profiles"] == ["gpu"]
    assert cpu["profiles"] == ["cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "reservations" not in cpu["deploy"]["resources"]
    # The gpu profile serves the repository rendered for its GPUs (see the test below).
    assert gpu["volumes"] == ["triton-models:/models:ro"]
    assert cpu["volumes"] == ["./deploy/triton/models:/models:ro"]
    for triton in (gpu, cpu):
        assert "--model-repository=/models" in triton["command"]
        assert triton["networks"]["default"]["aliases"] == ["triton"]
    assert (ROOT / "deploy" / "triton" / "models").is_dir()
    assert env_example()["MEDMESH_TRITON_GRPC_URL"] == "triton:8001"


def render_command_args(command: list[str], source: Path, target: Path) -> list[str]:
    """The arguments of a ``python -m medmesh_cli.devstack.model_repository`` command line, with
    its source and target folders replaced by ``source`` and ``target``."""
    start = command.index(RENDER_MODULE) + 1
    args = []
    for arg in command[start:]:
        if arg.startswith("--source="):
            args.append(f"--source={source}")
        elif arg.startswith("--target="):
            args.append(f"--target={target}")
        else:
            args.append(arg)
    return args


def option(args: list[str], name: str) -> str:
    """The value of ``--name=value`` in a command line."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, args)
    return values[0]


def assert_rendered_for_gpus(target: Path, gpus: int) -> None:
    """Every model of a rendered repository: one KIND_GPU instance on each of ``gpus`` GPUs, and
    its platform or backend as committed (ONNX stays ONNX for NVIDIA's container)."""
    models = sorted(p.parent.name for p in MODEL_REPOSITORY.glob("*/config.pbtxt"))
    assert sorted(p.parent.name for p in target.glob("*/config.pbtxt")) == models
    gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    for model in models:
        config = text_format.Parse(
            (target / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        source = text_format.Parse(
            (MODEL_REPOSITORY / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        groups = [(g.kind, g.count, list(g.gpus)) for g in config.instance_group]
        assert groups == [(gpu, 1, [i]) for i in range(gpus)], model
        assert (config.platform, config.backend) == (source.platform, source.backend), model


def test_compose_gpu_profile_renders_kind_gpu_instances_for_triton(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gpu profile's triton-models job renders the repository with the launcher's code for
    the host's GPUs (run here with 2) into the volume Triton serves, before Triton starts."""
    services = compose()["services"]
    job, triton = services["triton-models"], services["triton"]
    assert job["profiles"] == triton["profiles"] == ["gpu"]
    assert job["image"] == MEDMESH_IMAGE
    assert job["restart"] == "no"
    # An entrypoint, not a service's `python -m medmesh_...` command: this job is no service.
    assert job["entrypoint"] == ["python", "-m", RENDER_MODULE]
    command = job["entrypoint"] + job["command"]
    assert option(command, "gpus") == "auto"
    assert option(command, "onnx") == "native"
    # short syntax SOURCE:TARGET[:MODE], by TARGET
    volumes = {v.split(":")[1]: v.split(":")[0] for v in job["volumes"]}
    assert volumes[option(command, "source")] == "./deploy/triton/models"
    assert volumes[option(command, "target")] == "triton-models"
    assert "triton-models" in compose()["volumes"]
    assert triton["depends_on"]["triton-models"] == {"condition": "service_completed_successfully"}
    devices = job["deploy"]["resources"]["reservations"]["devices"]
    assert devices == triton["deploy"]["resources"]["reservations"]["devices"]
    # The Docker image's folder the volume is mounted on belongs to the image's non-root user.
    assert re.search(r"install -d -o medmesh -g medmesh /app/triton-models\b", dockerfile())
    assert option(command, "target") == "/app/triton-models"
    monkeypatch.setenv("MEDMESH_GPU_COUNT", "2")
    target = tmp_path / "models"
    assert render_main(render_command_args(command, MODEL_REPOSITORY, target)) == 0
    assert_rendered_for_gpus(target, 2)


def test_triton_loads_every_model_at_start_under_explicit_control() -> None:
    """compose's and Kubernetes' Triton: explicit model control, every model loaded at start
    (new versions are loaded through the repository API, as their comments say)."""
    commands = [compose()["x-triton"]["command"]]
    commands += [
        by_kind(rendered(overlay), "Deployment")["triton"]["spec"]["template"]["spec"][
            "containers"
        ][0]["args"]
        for overlay in OVERLAYS
    ]
    for command in commands:
        assert "--model-control-mode=explicit" in command
        assert "--load-model=*" in command
        assert not [
            a for a in command if a.startswith("--model-control-mode=") and "explicit" not in a
        ]
    assert "/v2/repository/models/<name>/load" in (ROOT / "compose.yaml").read_text()
    assert "/v2/repository/models/<name>/load" in (K8S / "base" / "triton.yaml").read_text()


def test_compose_topic_job_creates_topics_from_the_contract_and_specs() -> None:
    """The topics job builds its list with all_topics and load_specs: it spells no topic name."""
    job = compose()["services"]["topics"]
    script = "\n".join(job["command"])
    assert "all_topics" in script
    assert "load_specs" in script
    assert "create_topics" in script
    assert "medmesh." not in script.replace("medmesh_", "")
    assert job["restart"] == "no"


# --- .env.example --------------------------------------------------------------------------------


def test_env_example_sets_only_variables_some_settings_class_reads() -> None:
    """Every variable set in .env.example is a field of a settings class."""
    assert set(env_example()) - settings_env_names() == set()


def test_env_example_names_every_setting() -> None:
    """Every settings field is named in .env.example (set, or commented when per-process/optional)."""
    assert settings_env_names() - env_example_named() == set()


def test_env_example_sets_no_empty_values() -> None:
    """No variable is set to an empty value: pydantic-settings reads '' as a value, not as unset."""
    assert [name for name, value in env_example().items() if value == ""] == []


def test_env_example_names_every_topic_of_the_contract() -> None:
    """.env.example lists every static topic and the per-model-version task topic pattern."""
    text = (ROOT / ".env.example").read_text()
    for spec in STATIC_TOPICS:
        assert re.search(rf"^# {re.escape(spec.name)}\b", text, re.M), spec.name
    assert model_task_topic("name", 1).replace("name", "<name>").replace("v1", "v<N>") in text


def test_env_example_ports_are_the_settings_defaults() -> None:
    """The ports in .env.example are the settings' defaults, so `medmesh up` and containers agree."""
    for cls, port_field in SERVICES.values():
        default = cls.model_fields[port_field].default
        assert env_example()[env_name(port_field)] == str(default), port_field


# --- Kubernetes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_manifests_are_valid_against_kubernetes_schemas(overlay: str) -> None:
    """Every built-in object of the rendered overlay validates against Kubernetes' strict schemas."""
    errors = []
    for doc in rendered(overlay):
        if "." in doc["apiVersion"].split("/")[0] and not doc["apiVersion"].startswith(
            ("apps/", "batch/", "policy/", "networking.k8s.io/")
        ):
            continue  # custom resources: see the structural test below
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")
    assert errors == []


def test_k8s_schema_check_rejects_a_misspelt_field() -> None:
    """The Kubernetes schema check is not vacuous: a misspelt container field fails it."""
    deployment = copy.deepcopy(by_kind(rendered("small"), "Deployment")["router"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_custom_resources_have_the_structure_their_operators_need() -> None:
    """Strimzi and KEDA objects (no schema package exists for them): required fields and types."""
    docs = rendered("large")
    kinds = {d["kind"] for d in docs if "strimzi" in d["apiVersion"] or "keda" in d["apiVersion"]}
    assert kinds == {"KafkaTopic", "KafkaUser", "ScaledObject", "TriggerAuthentication"}
    for topic in by_kind(docs, "KafkaTopic").values():
        assert topic["apiVersion"] == "kafka.strimzi.io/v1"
        assert topic["metadata"]["labels"]["strimzi.io/cluster"]
        spec = topic["spec"]
        assert isinstance(spec["topicName"], str)
        assert isinstance(spec["partitions"], int)
        assert isinstance(spec["replicas"], int)
        assert all(isinstance(v, str) for v in spec["config"].values())
    for user in by_kind(docs, "KafkaUser").values():
        assert user["apiVersion"] == "kafka.strimzi.io/v1"
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
    auths = by_kind(docs, "TriggerAuthentication")
    for scaled in by_kind(docs, "ScaledObject").values():
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled["spec"]
        target = spec["scaleTargetRef"]
        workload = by_kind(docs, target.get("kind", "Deployment"))[target["name"]]
        assert workload["spec"]["replicas"] <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert "kafka" in {t["type"] for t in spec["triggers"]}
        for trigger in spec["triggers"]:
            assert trigger["type"] in ("kafka", "cpu")
            if trigger["type"] == "kafka":
                assert trigger["authenticationRef"]["name"] in auths
            else:
                assert trigger["metricType"] == "Utilization"
                # A CPU trigger needs the pods' CPU requests to compute utilisation.
                [container] = workload["spec"]["template"]["spec"]["containers"]
                assert container["resources"]["requests"]["cpu"]
            assert all(isinstance(v, str) for v in trigger["metadata"].values())
    scaled_stages = {
        s["spec"]["scaleTargetRef"]["name"] for s in by_kind(docs, "ScaledObject").values()
    }
    assert {"ingest", "reporting"} <= scaled_stages
    assert "router" not in scaled_stages
    for auth in auths.values():
        assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} >= {"username", "password"}


def _real_kustomize(directory: Path) -> list[Doc]:
    """The objects the project's pinned kustomize renders (make deps builds it)."""
    binary = kustomize_binary()
    if not binary.is_file():
        pytest.fail(
            f"kustomize {KUSTOMIZE_VERSION} is not at {binary}: run {install_command()}",
            pytrace=False,
        )
    command = [str(binary), "build", str(directory)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_real_kustomize(overlay: str) -> None:
    """The pinned kustomize renders the same objects as this test's renderer."""
    real = _real_kustomize(K8S / "overlays" / overlay)

    def key(d: Doc) -> str:
        return f"{d['kind']}/{d['metadata']['name']}"

    assert sorted(real, key=key) == sorted(rendered(overlay), key=key)


def test_generated_manifests_are_up_to_date() -> None:
    """The worker Deployments, KafkaTopics and ScaledObjects equal what deploy/k8s/generate.py writes."""
    stale = [
        str(path.relative_to(ROOT))
        for path, text in load_generator().outputs().items()
        if path.read_text() != text
    ]
    assert stale == [], "run: .venv/bin/python deploy/k8s/generate.py"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_runs_one_worker_deployment_per_model_version(overlay: str) -> None:
    """One worker Deployment per model version of the specs, set to that model and version."""
    docs = rendered(overlay)
    workers = {
        n: c for n, c in medmesh_containers(docs) if container_module(c) == "medmesh_inference"
    }
    assert set(workers) == {worker_name(m, v) for m, v in model_versions()}
    for model, version in model_versions():
        env = {e["name"]: e.get("value") for e in workers[worker_name(model, version)]["env"]}
        assert env["MEDMESH_WORKER_MODEL"] == model
        assert env["MEDMESH_WORKER_MODEL_VERSION"] == str(version)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_env_names_are_settings_fields(overlay: str) -> None:
    """Every variable a medmesh container gets (env, ConfigMap) is a settings field."""
    docs = rendered(overlay)
    names = set(configmap(docs))
    for _, container in medmesh_containers(docs):
        names |= {e["name"] for e in container.get("env", [])}
    assert names - settings_env_names() - FOREIGN_ENV == set()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_configmap_agrees_with_env_example(overlay: str) -> None:
    """The ConfigMap sets the non-secret variables of .env.example, with the same ports and groups."""
    data = configmap(rendered(overlay))
    assert set(data) == set(env_example()) - secret_env_names()
    assert [k for k, v in data.items() if v == ""] == []
    site_specific = {
        "MEDMESH_KAFKA_BOOTSTRAP_SERVERS",
        "MEDMESH_KAFKA_SECURITY_PROTOCOL",
        "MEDMESH_PACS_URLS",
    }
    for name in set(data) - site_specific:
        assert data[name] == env_example()[name], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_secrets_come_only_from_secrets(overlay: str) -> None:
    """Secret settings are never in the ConfigMap, always from a Secret; medmesh-secrets keys exist."""
    docs = rendered(overlay)
    assert set(configmap(docs)) & secret_env_names() == set()
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    kubernetes_validate.validate(example, K8S_VERSION, strict=True)
    for name, container in medmesh_containers(docs):
        for env in container.get("env", []):
            if env["name"] in secret_env_names():
                ref = env["valueFrom"]["secretKeyRef"]
                if ref["name"] == "medmesh-secrets":
                    assert ref["key"] in example["stringData"], (name, ref)
    ingest = dict(medmesh_containers(docs))["ingest"]
    pseudonym = next(e for e in ingest["env"] if e["name"] == "MEDMESH_PSEUDONYM_KEY")
    assert pseudonym["valueFrom"]["secretKeyRef"] == {
        "name": "medmesh-secrets",
        "key": "MEDMESH_PSEUDONYM_KEY",
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_services_listen_and_probe_on_their_configured_port(overlay: str) -> None:
    """Each service container exposes its MEDMESH_<SERVICE>_PORT and probes /healthz and /readyz there."""
    docs = rendered(overlay)
    data = configmap(docs)
    seen = set()
    for name, container in medmesh_containers(docs):
        module = container_module(container)
        if module is None:
            continue
        seen.add(module)
        port = int(data[env_name(SERVICES[module][1])])
        assert container["ports"] == [{"name": "http", "containerPort": port}], name
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        resources = container["resources"]
        assert set(resources["requests"]) >= {"cpu", "memory"}, name
        assert resources["limits"]["memory"], name
    assert seen == set(SERVICES)
    for service in by_kind(docs, "Service").values():
        workload = workloads(docs).get(service["spec"]["selector"]["app.kubernetes.io/name"])
        assert workload is not None, service["metadata"]["name"]


def _selects(policy: Doc, labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy's podSelector selects pods with ``labels``."""
    selector = policy["spec"]["podSelector"]
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _pod_labels(docs: list[Doc], name: str) -> dict[str, str]:
    labels: dict[str, str] = workloads(docs)[name]["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_console_talks_only_to_kafka_and_the_router(overlay: str) -> None:
    """The console's NetworkPolicies: ingress on its port only; egress to DNS, the Kafka ports
    and the router's HTTP port only, which the router admits from the console; its tokens come
    from the Secret and MEDMESH_ROUTER_URL names the router Service's http port."""
    docs = rendered(overlay)
    data = configmap(docs)
    console_labels = _pod_labels(docs, "console")
    policies = [p for p in by_kind(docs, "NetworkPolicy").values() if _selects(p, console_labels)]
    ingress = [rule for p in policies for rule in p["spec"].get("ingress", [])]
    assert ingress, "nothing may reach the console"
    console_port = int(data["MEDMESH_CONSOLE_PORT"])
    # Besides its pages: Prometheus' scrape ports (metrics-from-monitoring, every pod).
    for rule in ingress:
        assert {port["port"] for port in rule["ports"]} <= {console_port, 9100, 8002}, rule
    router_port = int(data["MEDMESH_ROUTER_PORT"])
    egress_ports = set()
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            ports = {port["port"] for port in rule["ports"]}
            egress_ports |= ports
            if router_port in ports:
                assert rule["to"] == [
                    {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "router"}}}
                ], rule
    assert egress_ports == {53, 9092, 9093, router_port}
    router_labels = _pod_labels(docs, "router")
    admitted = [
        rule
        for p in by_kind(docs, "NetworkPolicy").values()
        if _selects(p, router_labels)
        for rule in p["spec"].get("ingress", [])
        if router_port in {port["port"] for port in rule["ports"]}
    ]
    assert admitted, "the router admits nobody on its HTTP port"
    for rule in admitted:
        for source in rule["from"]:
            assert _selects({"spec": {"podSelector": source["podSelector"]}}, console_labels)
    url = urlsplit(data["MEDMESH_ROUTER_URL"])
    service = by_kind(docs, "Service")[str(url.hostname)]
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "router"}
    assert {"name": "http", "port": url.port, "targetPort": "http"} in service["spec"]["ports"]
    container = dict(medmesh_containers(docs))["console"]
    tokens = next(e for e in container["env"] if e["name"] == "MEDMESH_CONSOLE_TOKENS")
    assert tokens["valueFrom"]["secretKeyRef"] == {
        "name": "medmesh-secrets",
        "key": "MEDMESH_CONSOLE_TOKENS",
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_workloads_have_disruption_budgets_and_deny_by_default(overlay: str) -> None:
    """Every long-running workload has a PodDisruptionBudget; NetworkPolicies start from deny-all."""
    docs = rendered(overlay)
    budgets = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for d in by_kind(docs, "PodDisruptionBudget").values()
    }
    long_running = {n for n, w in workloads(docs).items() if w["kind"] != "Job" and n != "kafka"}
    assert long_running - budgets == set()
    deny = by_kind(docs, "NetworkPolicy")["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_triton_runs_on_gpu_nodes(overlay: str) -> None:
    """Triton asks for nvidia.com/gpu, selects GPU nodes and tolerates their taint."""
    triton = by_kind(rendered(overlay), "Deployment")["triton"]["spec"]["template"]["spec"]
    container = triton["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in triton[
        "tolerations"
    ]
    assert "--model-repository=/models" in container["args"]
    assert container["image"] == compose()["x-triton"]["image"]


def dockerfile() -> str:
    """The Dockerfile, with continued lines joined."""
    return (ROOT / "Dockerfile").read_text().replace("\\\n", " ")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_triton_serves_a_repository_rendered_for_its_gpu(overlay: str, tmp_path: Path) -> None:
    """Triton's pods get the models image's repository, which the Dockerfile renders with the
    launcher's code for as many GPUs as each pod is given: KIND_GPU instances (run here)."""
    spec = by_kind(rendered(overlay), "Deployment")["triton"]["spec"]["template"]["spec"]
    gpus = spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    (init,) = spec["initContainers"]
    assert init["image"] == "medmesh-models:dev"
    assert init["command"] == ["cp", "-R", "/models/.", "/repository/"]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == {"models": "/repository"}
    assert mounts["models"] == "/models"
    text = dockerfile()
    (run,) = [
        line for line in text.splitlines() if RENDER_MODULE in line and line.startswith("RUN")
    ]
    command = run.split()[1:]
    assert option(command, "gpus") == str(gpus)
    assert option(command, "onnx") == "native"
    assert f"COPY --from=build {option(command, 'target')} /models" in text
    assert option(command, "source") == "deploy/triton/models"
    target = tmp_path / "models"
    assert render_main(render_command_args(command, MODEL_REPOSITORY, target)) == 0
    assert_rendered_for_gpus(target, int(gpus))


def test_k8s_small_topic_job_creates_topics_from_the_contract() -> None:
    """The small overlay's topics Job runs the same contract-driven script as compose's topics job."""
    job = by_kind(rendered("small"), "Job")["medmesh-topics"]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command == compose()["services"]["topics"]["command"]


def test_k8s_large_kafka_topics_match_the_contract() -> None:
    """The large overlay's KafkaTopics are exactly the contract's topics, with its settings."""
    topics = {
        t["spec"]["topicName"]: t["spec"] for t in by_kind(rendered("large"), "KafkaTopic").values()
    }
    contract = {s.name: s for s in all_topics(list(model_versions()))}
    assert set(topics) == set(contract)
    for name, spec in contract.items():
        assert topics[name]["config"].items() >= spec.config.items(), name
        if spec.partitions == 1:
            assert topics[name]["partitions"] == 1, name
        else:
            assert topics[name]["partitions"] >= spec.partitions, name


def test_k8s_large_scales_each_worker_group_on_its_lag() -> None:
    """One ScaledObject per model version (its worker group and task topic) and one each for
    ingest and reporting (their groups and input topics), at most one pod per partition."""
    docs = rendered("large")
    scaled = by_kind(docs, "ScaledObject")
    partitions = {
        t["spec"]["topicName"]: t["spec"]["partitions"]
        for t in by_kind(docs, "KafkaTopic").values()
    }
    assert set(scaled) == {worker_name(m, v) for m, v in model_versions()} | {
        "ingest",
        "reporting",
    }
    for name, group, topic in (
        ("ingest", IngestSettings.model_fields["ingest_group_id"].default, "medmesh.fhir.inbound"),
        (
            "reporting",
            ReportingSettings.model_fields["reporting_group_id"].default,
            "medmesh.inference.results",
        ),
    ):
        spec = scaled[name]["spec"]
        [lag] = [t for t in spec["triggers"] if t["type"] == "kafka"]
        assert (lag["metadata"]["consumerGroup"], lag["metadata"]["topic"]) == (group, topic)
        assert spec["maxReplicaCount"] <= partitions[topic]
    for model, version in model_versions():
        spec = scaled[worker_name(model, version)]["spec"]
        settings = WorkerSettings(worker_model=model, worker_model_version=version)
        (trigger,) = spec["triggers"]
        assert trigger["metadata"]["consumerGroup"] == settings.group_id
        assert trigger["metadata"]["topic"] == model_task_topic(model, version)
        assert spec["maxReplicaCount"] <= partitions[model_task_topic(model, version)]


def test_k8s_large_talks_to_kafka_over_sasl_ssl_with_scram() -> None:
    """The large overlay: SASL_SSL with SCRAM, the KafkaUser's password and the cluster CA everywhere."""
    docs = rendered("large")
    data = configmap(docs)
    assert data["MEDMESH_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert data["MEDMESH_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    users = by_kind(docs, "KafkaUser")
    assert set(users) == {"medmesh-services", "medmesh-console"}
    for name, container in medmesh_containers(docs):
        if container_module(container) is None:
            continue
        user = (
            "medmesh-console"
            if container_module(container) == "medmesh_console"
            else ("medmesh-services")
        )
        env = {e["name"]: e for e in container["env"]}
        password = env["MEDMESH_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert password == {"name": user, "key": "password"}, name
        if user == "medmesh-console":
            username = env["MEDMESH_KAFKA_SASL_USERNAME"]["valueFrom"]["secretKeyRef"]
            assert username == {
                "name": "medmesh-secrets",
                "key": "MEDMESH_CONSOLE_KAFKA_SASL_USERNAME",
            }
        assert env["SSL_CERT_FILE"]["value"].startswith("/etc/medmesh/kafka-ca/"), name


def test_k8s_large_console_kafka_user_only_reads() -> None:
    """The console's KafkaUser may describe and read medmesh's topics and describe its groups;
    no write, create, alter, delete, group read (join/commit) or transactional id."""
    console = by_kind(rendered("large"), "KafkaUser")["medmesh-console"]
    acls = console["spec"]["authorization"]["acls"]
    granted = {(a["resource"]["type"], op) for a in acls for op in a["operations"]}
    assert granted == {
        ("topic", "Describe"),
        ("topic", "Read"),
        ("topic", "DescribeConfigs"),
        ("group", "Describe"),
        ("cluster", "Describe"),
    }


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_final_stage_is_pinned_non_root_and_has_a_healthcheck() -> None:
    """Multi-stage; the final stage: pinned base, no build tools, a non-root user, a health check."""
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) >= 2
    for stage in stages:
        image = stage.split()[0]
        assert re.search(r":\d[\w.-]*$", image) or "@sha256:" in image, image
    final = stages[-1]
    assert final.split()[2] == "runtime"
    user = re.findall(r"^USER (\S+)", final, re.M)
    assert user
    assert user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*CMD", final, re.M | re.S)
    for tool in ("uv ", "apt-get", "pip install", "gcc", "build-essential"):
        assert tool not in final.replace("/uv ", ""), tool
    # The health check reads the same settings classes as the services.
    for module, (cls, port_field) in SERVICES.items():
        assert f'"{module}": ("{cls.__name__}", "{port_field}")' in final


def _build_context_includes(path: str) -> bool:
    """Whether .dockerignore sends ``path`` to the builder (its patterns in order, the last
    match deciding, as Docker reads them; the allowlist uses plain paths and ``**/`` suffixes)."""
    included = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        name = pattern.removeprefix("**/").replace(".", r"\.").replace("*", ".*")
        by_name = pattern.startswith("**/") and re.fullmatch(name, path.rsplit("/", 1)[-1])
        if pattern in ("*", path) or path.startswith(pattern + "/") or by_name:
            included = keep
    return included


def test_the_build_context_is_what_the_dockerfile_copies_and_nothing_secret() -> None:
    """.dockerignore sends every path the Dockerfile copies from the context, and not .env, var/,
    .venv, .git, tests or bytecode."""
    sources = [
        source
        for args in re.findall(r"^COPY (?!--from)(?!<<)(.+)$", dockerfile(), re.M)
        for source in args.split()[:-1]
    ]
    assert "contracts" in sources
    assert [s for s in sources if not _build_context_includes(s.rstrip("/"))] == []
    for private in (".env", "services/ingest/.env", "var", ".venv", ".git", "tests", ".tools"):
        assert not _build_context_includes(private), private
    assert not _build_context_includes("services/ingest/src/medmesh_ingest/__pycache__")


def test_k8s_observability_carries_the_dashboards_and_alert_rules() -> None:
    """deploy/k8s/observability renders a valid ConfigMap holding every Grafana dashboard (for
    the dashboard sidecar) and a PrometheusRule holding every alert of deploy/observability."""
    docs = render(K8S / "observability")
    config_map = by_kind(docs, "ConfigMap")["medmesh-grafana-dashboards"]
    kubernetes_validate.validate(config_map, K8S_VERSION, strict=True)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    grafana = ROOT / "deploy" / "observability" / "grafana"
    assert config_map["data"] == {p.name: p.read_text() for p in grafana.glob("*.json")}
    rule = by_kind(docs, "PrometheusRule")["medmesh"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "medmesh"
    alerts = yaml.safe_load((ROOT / "deploy" / "observability" / "alerts.yml").read_text())
    assert rule["spec"] == alerts
