"""compose/ deploys what the tests run: the same ``roundlog`` commands, and an Apache Kafka
cluster of the tested version with the tested broker settings (``kafka_cluster``).

compose.yaml is read with PyYAML's ``safe_load``, which resolves its anchors and ``<<`` merge
keys as ``docker compose`` does. PyYAML reads YAML 1.1 and compose YAML 1.2: the two differ only
on plain scalars such as ``on``, ``no`` or ``0755``, hence every environment value is quoted
where it would not read as a string (``test_every_environment_value_is_a_string``).
"""

from __future__ import annotations

import re
import shlex
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from roundlog import cli
from roundlog.bus import TOPIC_MAX_MESSAGE_BYTES
from roundlog.config import Settings
from roundlog.kafka_cluster import KAFKA_VERSION, broker_settings, new_cluster_id

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
ROLES = ("coordinator", "aggregator", "projector")
KAFKA_NODES = ("kafka-1", "kafka-2", "kafka-3")
ROUNDLOG_SERVICES = ("init", *ROLES)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


#: What `docker compose` substitutes for the ``${NAME:?...}`` variables (keys made per deployment).
VARIABLES = {"ROUNDLOG_OPERATOR_KEY": "0a" * 32, "ROUNDLOG_ROLES_KEY": "0b" * 32}


def interpolate(text: str) -> str:
    """A value as compose hands it over: required variables substituted, ``$$`` turned into ``$``."""
    return re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: VARIABLES[m[1]], text).replace("$$", "$")


def interpolated(environment: dict[str, str]) -> dict[str, str]:
    return {name: interpolate(text) for name, text in environment.items()}


def parse(argv: list[str]) -> object:
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"not a roundlog command: roundlog {shlex.join(argv)}")


def test_every_environment_value_is_a_string(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for variable, value in service.get("environment", {}).items():
            assert isinstance(value, str), f"{name}: quote {variable}"


# --- roundlog: the same commands and settings the tests run ----------------------------------


def test_the_services_with_a_command_are_init_and_the_roles(services: dict[str, dict[str, Any]]) -> None:
    assert {name for name, service in services.items() if "command" in service} == set(ROUNDLOG_SERVICES)


@pytest.mark.parametrize("role", ROLES)
def test_role_service_serves_its_role(services: dict[str, dict[str, Any]], role: str) -> None:
    service = services[role]
    assert "entrypoint" not in service  # the image's ENTRYPOINT, `roundlog`, runs the command
    args = parse(service["command"])
    assert getattr(args, "handler", None) is cli.serve
    assert getattr(args, "role", None) == [role]


def test_init_migrates_the_database_then_creates_the_topics(services: dict[str, dict[str, Any]]) -> None:
    init = services["init"]
    assert init["entrypoint"] == ["/bin/sh", "-ec"]
    (script,) = init["command"]
    script = interpolate(script)
    argvs = [shlex.split(part) for part in script.split("&&")]
    assert [argv[0] for argv in argvs] == ["roundlog"] * len(argvs), script
    handlers = [getattr(parse(argv[1:]), "handler", None) for argv in argvs]
    assert handlers == [cli.db_upgrade, cli.topics_create, cli.keys_register]
    register = parse(argvs[2][1:])
    assert register.key_id == "$ROUNDLOG_ROLES_KEY"  # type: ignore[attr-defined]
    assert register.role == ["coordinator", "aggregator"]  # type: ignore[attr-defined]
    # signed by the operator key, whose id every service names
    environment = interpolated(init["environment"])
    assert environment["ROUNDLOG_KEY_FILE"] == "/run/secrets/operator-key"
    assert "operator-key" in init["secrets"]


@pytest.mark.parametrize("service", ROUNDLOG_SERVICES)
def test_every_service_folds_signed_events_under_one_operator_key(
    services: dict[str, dict[str, Any]], service: str
) -> None:
    settings = Settings.from_env(interpolated(services[service]["environment"]))
    assert settings.auth and settings.operator_key == VARIABLES["ROUNDLOG_OPERATOR_KEY"]


@pytest.mark.parametrize("role", ROLES)
def test_each_role_signs_with_the_roles_key_it_is_given(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], role: str
) -> None:
    settings = Settings.from_env(interpolated(services[role]["environment"]))
    assert settings.key_file == "/run/secrets/roles-key" and "roles-key" in services[role]["secrets"]
    assert compose["secrets"]["roles-key"]["file"] == "./keys/roles.pem"


def test_image_runs_roundlog_as_a_non_root_user() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["roundlog"\]$', dockerfile, re.MULTILINE)
    assert re.search(r"^USER (?!root)\S+$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)


@pytest.mark.parametrize("role", ROLES)
def test_role_is_healthy_while_its_metrics_port_answers(
    services: dict[str, dict[str, Any]], role: str
) -> None:
    service = services[role]
    port = service["environment"]["ROUNDLOG_METRICS_PORT"]
    assert port in service["ports"]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(service["healthcheck"]["test"])


@pytest.mark.parametrize("service", ROUNDLOG_SERVICES)
def test_roundlog_reaches_every_kafka_node_with_idempotent_producers(
    services: dict[str, dict[str, Any]], service: str
) -> None:
    environment = services[service]["environment"]
    advertised = {node_properties(services, node)["advertised.listeners"] for node in KAFKA_NODES}
    bootstrap = environment.get("ROUNDLOG_KAFKA_BOOTSTRAP", "").split(",")
    assert {f"PLAINTEXT://{address}" for address in bootstrap} == advertised
    assert len(bootstrap) == len(KAFKA_NODES), bootstrap
    assert environment.get("ROUNDLOG_KAFKA_IDEMPOTENCE") == "true"
    assert Settings.from_env(interpolated(environment)).kafka_idempotence is True


# --- The Kafka cluster: what compose deploys is what the tests run ----------------------------

#: Variables of the apache/kafka image that are no broker property (its kafka-propertiesSpec.json).
_IMAGE_VARIABLES = frozenset(
    {
        "KAFKA_VERSION",
        "KAFKA_HEAP_OPT",
        "KAFKA_LOG4J_OPTS",
        "KAFKA_OPTS",
        "KAFKA_JMX_OPTS",
        "KAFKA_JVM_PERFORMANCE_OPTS",
        "KAFKA_GC_LOG_OPTS",
        "KAFKA_LOG4J_ROOT_LOGLEVEL",
        "KAFKA_LOG4J_LOGGERS",
        "KAFKA_TOOLS_LOG4J_LOGLEVEL",
    }
)


def broker_properties(environment: dict[str, Any]) -> dict[str, Any]:
    """server.properties as the apache/kafka image writes it from a container's environment:
    ``KAFKA_`` dropped, ``_`` → ``.``, ``__`` → ``_``, ``___`` → ``-``, lower case."""
    runs = {1: ".", 2: "_", 3: "-"}
    return {
        re.sub("_+", lambda run: runs[len(run[0])], name.removeprefix("KAFKA_")).lower(): value
        for name, value in environment.items()
        if name.startswith("KAFKA_") and name not in _IMAGE_VARIABLES
    }


def node_properties(services: dict[str, dict[str, Any]], node: str) -> dict[str, Any]:
    return broker_properties(services[node]["environment"])


def test_the_kafka_services_are_the_three_nodes(services: dict[str, dict[str, Any]]) -> None:
    kafka = {
        name
        for name, service in services.items()
        if str(service.get("image", "")).startswith("apache/kafka:")
    }
    assert kafka == set(KAFKA_NODES)


@pytest.mark.parametrize("node", KAFKA_NODES)
def test_kafka_node_runs_the_tested_kafka_version(services: dict[str, dict[str, Any]], node: str) -> None:
    assert services[node]["image"] == f"apache/kafka:{KAFKA_VERSION}"


@pytest.mark.parametrize("node", KAFKA_NODES)
def test_kafka_node_has_the_tested_broker_settings(services: dict[str, dict[str, Any]], node: str) -> None:
    expected = broker_settings(len(KAFKA_NODES))
    properties = node_properties(services, node)
    assert {key: properties.get(key) for key in expected} == expected


@pytest.mark.parametrize("node", KAFKA_NODES)
def test_kafka_node_takes_roundlogs_largest_records_and_creates_no_topic_itself(
    services: dict[str, dict[str, Any]], node: str
) -> None:
    properties = node_properties(services, node)
    for setting in ("message.max.bytes", "replica.fetch.max.bytes"):
        assert int(properties[setting]) >= TOPIC_MAX_MESSAGE_BYTES, setting
    assert properties["auto.create.topics.enable"] == "false"


def test_kafka_nodes_form_one_kraft_quorum_of_three(services: dict[str, dict[str, Any]]) -> None:
    properties = {node: node_properties(services, node) for node in KAFKA_NODES}
    ids = {node: properties[node].get("node.id") for node in KAFKA_NODES}
    assert len(set(ids.values())) == len(KAFKA_NODES), ids
    expected_voters = {f"{ids[node]}@{node}:9093" for node in KAFKA_NODES}
    for node in KAFKA_NODES:
        voters = properties[node].get("controller.quorum.voters", "")
        assert set(voters.split(",")) == expected_voters, node
        assert properties[node].get("process.roles") == "broker,controller", node
        assert "CONTROLLER://:9093" in properties[node].get("listeners", "").split(","), node
        assert properties[node].get("advertised.listeners") == f"PLAINTEXT://{node}:9092", node
    cluster_ids = {services[node]["environment"].get("CLUSTER_ID") for node in KAFKA_NODES}
    assert len(cluster_ids) == 1 and None not in cluster_ids, cluster_ids


def test_each_kafka_node_keeps_its_log_in_a_volume_of_its_own(compose: dict[str, Any]) -> None:
    sources = []
    for node in KAFKA_NODES:
        log_dir = node_properties(compose["services"], node).get("log.dirs")
        mounts = {
            target: source
            for source, target, *_ in (volume.split(":") for volume in compose["services"][node]["volumes"])
        }
        assert log_dir in mounts, node
        sources.append(mounts[log_dir])
    assert len(set(sources)) == len(KAFKA_NODES), sources
    assert set(sources) <= set(compose["volumes"]), sources


@pytest.mark.parametrize("node", KAFKA_NODES)
def test_init_waits_for_kafka_node_to_be_healthy(services: dict[str, dict[str, Any]], node: str) -> None:
    health = services[node].get("healthcheck", {}).get("test", [])
    assert any("localhost:9092" in str(part) for part in health), health
    assert services["init"]["depends_on"].get(node) == {"condition": "service_healthy"}


def test_a_new_cluster_id_never_starts_with_a_dash() -> None:
    """The storage tool reads ``-t -Abc…`` as two options; a UUID whose first six bits are 62 spells
    '-' first in URL-safe base64, so that draw is thrown away for the next one."""
    dash_first = uuid.UUID(bytes=bytes([0b11111000]) + bytes(15))
    plain = uuid.UUID(bytes=bytes(range(16)))
    draws = iter([dash_first, dash_first, plain])
    assert new_cluster_id(lambda: next(draws)) == "AAECAwQFBgcICQoLDA0ODw"
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", new_cluster_id()) for _ in range(1000))
