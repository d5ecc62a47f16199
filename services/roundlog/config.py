"""Settings from the environment: the one switch between the embedded stack and real servers.

Every process (CLI, roles, tests) reads the same ``ROUNDLOG_*`` variables, so a
stack started by ``roundlog up`` in one shell is usable from another by exporting
the two lines it prints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka.helpers import create_ssl_context

from roundlog.domain.validation import KEY_ID

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
#: What Kafka allows in a ``group.instance.id`` (the same rule as for topic names).
INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")


class ConfigError(ValueError):
    """A ``ROUNDLOG_*`` variable is missing or malformed."""


def sqlalchemy_url(url: str) -> str:
    """Give a libpq-style URL the psycopg 3 driver, since SQLAlchemy's default would be psycopg2."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def _check_bootstrap(bootstrap: str) -> None:
    """Server addresses must parse, so a malformed one is refused in one line, not deep in a client."""
    from aiokafka.conn import collect_hosts

    try:
        collect_hosts(bootstrap)
    except ValueError:
        raise ConfigError(
            f"ROUNDLOG_KAFKA_BOOTSTRAP must be host:port[,host:port], not {bootstrap!r}"
        ) from None


def _check_database_url(database_url: str) -> None:
    import sqlalchemy as sa

    try:
        url = sa.make_url(database_url)
    except sa.exc.ArgumentError:
        url = None
    if url is None or url.drivername != "postgresql+psycopg":
        shown = "" if url is None else f", not {url.render_as_string()!r}"
        raise ConfigError(
            "ROUNDLOG_DATABASE_URL must be a PostgreSQL URL, postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
            + shown
        )


def database_url_from_env(environ: Mapping[str, str] | None = None) -> str:
    """``ROUNDLOG_DATABASE_URL`` alone, checked: all that the commands which only touch the tables
    (``db``, ``ui``) need, so they run where no broker is configured."""
    env = os.environ if environ is None else environ
    raw = env.get("ROUNDLOG_DATABASE_URL")
    if not raw:
        raise ConfigError(
            "ROUNDLOG_DATABASE_URL not set: export the line `roundlog up` prints, "
            "or point it at a PostgreSQL database"
        )
    database_url = sqlalchemy_url(raw)
    _check_database_url(database_url)
    return database_url


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Where the broker and the database are, and how roundlog names and sizes its topics."""

    kafka_bootstrap: str
    database_url: str
    topic_prefix: str = "roundlog"
    partitions: int = 6
    #: consumer-group session timeout: how soon a crashed member's partitions move on (and, on
    #: Tansu, about twice the wait of a first join). Apache Kafka accepts 6000..1800000 by default.
    group_session_timeout_ms: int = 10_000
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = field(default=None, repr=False)
    kafka_ssl_cafile: str | None = None
    #: this process's static group membership id (``group.instance.id``, each role appends its
    #: name): a restarted process with the same id takes its partitions back without waiting
    #: for the session timeout. Unique per process; None (the default) joins dynamically.
    instance_id: str | None = None
    #: producers are idempotent (no duplicate from a retried send, e.g. after a leader change).
    #: Apache Kafka supports it; Tansu has no InitProducerId, hence off unless asked for.
    kafka_idempotence: bool = False
    #: every event must be signed by a registered key (``ROUNDLOG_AUTH=signed``); off, nothing is checked
    auth: bool = False
    #: the deployment's operator public key (64 hex digits): the one key that registers the others
    operator_key: str | None = None
    #: this process's signing key (a PEM file from ``roundlog keys create``)
    key_file: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``ROUNDLOG_*`` variables; both server addresses are required."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(name) or None

        missing = [n for n in ("ROUNDLOG_KAFKA_BOOTSTRAP", "ROUNDLOG_DATABASE_URL") if not get(n)]
        if missing:
            raise ConfigError(
                f"{' and '.join(missing)} not set: export the lines `roundlog up` prints, "
                "or point them at a Kafka broker and a PostgreSQL database"
            )
        partitions_text = get("ROUNDLOG_PARTITIONS") or "6"
        try:
            partitions = int(partitions_text)
        except ValueError:
            raise ConfigError(f"ROUNDLOG_PARTITIONS must be an integer, not {partitions_text!r}") from None
        if partitions < 1:
            raise ConfigError(f"ROUNDLOG_PARTITIONS must be >= 1, not {partitions}")
        timeout_text = get("ROUNDLOG_GROUP_SESSION_TIMEOUT_MS") or "10000"
        if not timeout_text.isdigit() or int(timeout_text) < 100:
            raise ConfigError(
                f"ROUNDLOG_GROUP_SESSION_TIMEOUT_MS must be an integer >= 100, not {timeout_text!r}"
            )
        protocol = (get("ROUNDLOG_KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").upper()
        if protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(
                f"ROUNDLOG_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                f"not {protocol!r}"
            )
        database_url = database_url_from_env(env)
        _check_bootstrap(env["ROUNDLOG_KAFKA_BOOTSTRAP"])
        instance_id = get("ROUNDLOG_INSTANCE_ID")
        if instance_id is not None and not INSTANCE_ID.fullmatch(instance_id):
            raise ConfigError(
                "ROUNDLOG_INSTANCE_ID must be 1-200 letters, digits, '.', '_' or '-' "
                f"(e.g. the pod name), not {instance_id!r}"
            )
        idempotence_text = (get("ROUNDLOG_KAFKA_IDEMPOTENCE") or "false").lower()
        if idempotence_text not in ("true", "false"):
            raise ConfigError(f"ROUNDLOG_KAFKA_IDEMPOTENCE must be true or false, not {idempotence_text!r}")
        auth_text = (get("ROUNDLOG_AUTH") or "off").lower()
        if auth_text not in ("off", "signed"):
            raise ConfigError(f"ROUNDLOG_AUTH must be off or signed, not {auth_text!r}")
        operator_key = get("ROUNDLOG_OPERATOR_KEY")
        if operator_key is not None and not KEY_ID.fullmatch(operator_key):
            raise ConfigError(
                "ROUNDLOG_OPERATOR_KEY must be the operator's public key id, 64 lowercase hex digits "
                f"(`roundlog keys create` prints it), not {operator_key[:80]!r}"
            )
        if auth_text == "signed" and operator_key is None:
            raise ConfigError(
                "ROUNDLOG_AUTH=signed needs ROUNDLOG_OPERATOR_KEY, the key that registers the others"
            )
        return cls(
            kafka_bootstrap=env["ROUNDLOG_KAFKA_BOOTSTRAP"],
            database_url=database_url,
            topic_prefix=get("ROUNDLOG_TOPIC_PREFIX") or "roundlog",
            partitions=partitions,
            group_session_timeout_ms=int(timeout_text),
            kafka_security_protocol=protocol,
            kafka_sasl_mechanism=get("ROUNDLOG_KAFKA_SASL_MECHANISM"),
            kafka_sasl_username=get("ROUNDLOG_KAFKA_SASL_USERNAME"),
            kafka_sasl_password=get("ROUNDLOG_KAFKA_SASL_PASSWORD"),
            kafka_ssl_cafile=get("ROUNDLOG_KAFKA_SSL_CAFILE"),
            instance_id=instance_id,
            kafka_idempotence=idempotence_text == "true",
            auth=auth_text == "signed",
            operator_key=operator_key,
            key_file=get("ROUNDLOG_KEY_FILE"),
        )

    def env(self) -> dict[str, str]:
        """The variables that reproduce these settings in another process (e.g. a role subprocess)."""
        values = {
            "ROUNDLOG_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "ROUNDLOG_DATABASE_URL": self.database_url,
            "ROUNDLOG_TOPIC_PREFIX": self.topic_prefix,
            "ROUNDLOG_PARTITIONS": str(self.partitions),
            "ROUNDLOG_GROUP_SESSION_TIMEOUT_MS": str(self.group_session_timeout_ms),
            "ROUNDLOG_KAFKA_SECURITY_PROTOCOL": self.kafka_security_protocol,
            "ROUNDLOG_KAFKA_SASL_MECHANISM": self.kafka_sasl_mechanism,
            "ROUNDLOG_KAFKA_SASL_USERNAME": self.kafka_sasl_username,
            "ROUNDLOG_KAFKA_SASL_PASSWORD": self.kafka_sasl_password,
            "ROUNDLOG_KAFKA_SSL_CAFILE": self.kafka_ssl_cafile,
            "ROUNDLOG_INSTANCE_ID": self.instance_id,
            "ROUNDLOG_KAFKA_IDEMPOTENCE": "true" if self.kafka_idempotence else None,
            "ROUNDLOG_AUTH": "signed" if self.auth else None,
            "ROUNDLOG_OPERATOR_KEY": self.operator_key,
            "ROUNDLOG_KEY_FILE": self.key_file,
        }
        return {name: value for name, value in values.items() if value is not None}

    def kafka_client_kwargs(self) -> dict[str, Any]:
        """Connection keyword arguments shared by aiokafka's producer, consumer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol.startswith("SASL_"):
            kwargs["sasl_mechanism"] = self.kafka_sasl_mechanism or "PLAIN"
            kwargs["sasl_plain_username"] = self.kafka_sasl_username
            kwargs["sasl_plain_password"] = self.kafka_sasl_password
        if self.kafka_security_protocol.endswith("SSL"):
            kwargs["ssl_context"] = create_ssl_context(cafile=self.kafka_ssl_cafile)
        return kwargs
