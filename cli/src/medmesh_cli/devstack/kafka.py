"""A real Apache Kafka broker for the local stack and the end-to-end tests.

The broker jars are resolved by Maven from deploy/kafka/pom.xml into ~/.cache/medmesh (outside
the repository) once; the broker then runs as one KRaft node (broker and controller) on loopback
with a small heap, because on a two-core machine it shares the CPU with Triton and four services.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medmesh_cli.devstack.maven import copy_dependencies
from medmesh_cli.devstack.paths import cache_dir, repo_root
from medmesh_cli.devstack.process import ManagedProcess, wait_until
from medmesh_cli.devstack.tls import TlsFiles


def kafka_version() -> str:
    """The Kafka version pinned in deploy/kafka/pom.xml."""
    pom = (repo_root() / "deploy" / "kafka" / "pom.xml").read_text()
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    if match is None:
        raise RuntimeError("deploy/kafka/pom.xml has no <kafka.version>")
    return match.group(1)


def _jars_folder() -> Path:
    return cache_dir() / f"kafka-{kafka_version()}" / "lib"


def kafka_jars_cached() -> bool:
    """Whether the pinned version's broker jars are already resolved (no Maven run needed)."""
    return (_jars_folder() / ".complete").exists()


def ensure_kafka_jars() -> Path:
    """The folder of broker jars, resolving them with Maven on first use."""
    version = kafka_version()
    lib = _jars_folder()
    marker = lib / ".complete"
    if marker.exists():
        return lib
    if shutil.which("mvn") is None:
        raise RuntimeError(
            "Kafka: 'mvn' (Apache Maven) is not on PATH; it is needed once to fetch the broker jars"
        )
    copy_dependencies("mvn", repo_root() / "deploy" / "kafka" / "pom.xml", lib, "Kafka")
    marker.write_text(version)
    return lib


# The local stack's JVM: serial GC and the C1 compiler only, small and quick to start beside
# Triton and the services on two cores.
DEV_JVM: tuple[str, ...] = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
# Kafka's own launcher defaults (kafka-run-class.sh: G1, full tiered compilation), for
# benchmarks whose broker CPU per message should be a deployment's, not the dev stack's.
PRODUCTION_JVM: tuple[str, ...] = (
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@dataclass(frozen=True)
class KafkaConfig:
    """Where the broker listens and keeps its data."""

    data_dir: Path
    port: int = 9092
    controller_port: int = 9093
    host: str = "127.0.0.1"
    heap: str = "512m"
    partitions: int = 3
    jvm_options: tuple[str, ...] = DEV_JVM
    # An optional SASL_SSL listener (SCRAM-SHA-512 over TLS) beside PLAINTEXT, for tests of
    # clients with a deployment's security; off unless a port is given. The broker's own
    # traffic (controller, inter-broker) stays PLAINTEXT on loopback.
    sasl_ssl_port: int | None = None
    # SCRAM-SHA-512 users (name -> password), created when the storage is formatted.
    sasl_users: Mapping[str, str] = field(default_factory=dict)
    # An optional SSL listener that requires a client certificate signed by the CA of ``tls``
    # (mutual TLS: the certificate's subject DN is the client's principal); off unless a port
    # is given.
    ssl_port: int | None = None
    # The TLS listeners' certificate and key, and the CA client certificates must chain to
    # (devstack.tls.generate_tls).
    tls: TlsFiles | None = None

    def __post_init__(self) -> None:
        if self.sasl_ssl_port is not None and (self.tls is None or not self.sasl_users):
            raise ValueError("a SASL_SSL listener needs tls files and at least one sasl user")
        if self.ssl_port is not None and self.tls is None:
            raise ValueError("an SSL listener needs tls files")

    @property
    def bootstrap(self) -> str:
        """The bootstrap address clients use."""
        return f"{self.host}:{self.port}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        """The bootstrap address of the SASL_SSL listener."""
        if self.sasl_ssl_port is None:
            raise RuntimeError("this broker has no SASL_SSL listener")
        return f"{self.host}:{self.sasl_ssl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        """The bootstrap address of the mutual-TLS (SSL) listener."""
        if self.ssl_port is None:
            raise RuntimeError("this broker has no SSL listener")
        return f"{self.host}:{self.ssl_port}"

    @property
    def tls_listener(self) -> bool:
        """Whether the broker has a TLS listener (and so needs a keystore)."""
        return self.sasl_ssl_port is not None or self.ssl_port is not None


def keystore_pem(tls: TlsFiles) -> str:
    """The listener's PEM keystore: the private key (PKCS#8) followed by its certificate."""
    return tls.server_key.read_text() + tls.server_cert.read_text()


def _sasl_ssl_properties(config: KafkaConfig, keystore: Path) -> list[str]:
    """The SASL_SSL listener's settings (KIP-651 PEM keystore, KRaft SCRAM from KIP-900)."""
    prefix = "listener.name.sasl_ssl"
    return [
        f"{prefix}.sasl.enabled.mechanisms=SCRAM-SHA-512",
        f"{prefix}.scram-sha-512.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        f"{prefix}.ssl.keystore.type=PEM",
        f"{prefix}.ssl.keystore.location={keystore}",
        # No client certificate asked for: SCRAM authenticates the client.
        f"{prefix}.ssl.client.auth=none",
    ]


def _mtls_properties(keystore: Path, truststore: Path) -> list[str]:
    """The SSL listener's settings: a client certificate the truststore's CA signed is required
    (PEM keystore and truststore, KIP-651)."""
    prefix = "listener.name.ssl"
    return [
        f"{prefix}.ssl.keystore.type=PEM",
        f"{prefix}.ssl.keystore.location={keystore}",
        f"{prefix}.ssl.truststore.type=PEM",
        f"{prefix}.ssl.truststore.location={truststore}",
        f"{prefix}.ssl.client.auth=required",
    ]


def server_properties(config: KafkaConfig, log_dir: Path, keystore: Path | None = None) -> str:
    """The broker's server.properties: one combined KRaft node, replication factor 1, with the
    SASL_SSL and SSL (mutual TLS) listeners the config asks for (``keystore``: their PEM
    keystore file)."""
    listeners = [
        f"PLAINTEXT://{config.host}:{config.port}",
        f"CONTROLLER://{config.host}:{config.controller_port}",
    ]
    advertised = [f"PLAINTEXT://{config.host}:{config.port}"]
    protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
    extra: list[str] = []
    if config.sasl_ssl_port is not None:
        if keystore is None:
            raise ValueError("the SASL_SSL listener needs its keystore file")
        listeners.append(f"SASL_SSL://{config.sasl_ssl_bootstrap}")
        advertised.append(f"SASL_SSL://{config.sasl_ssl_bootstrap}")
        protocols.append("SASL_SSL:SASL_SSL")
        extra = _sasl_ssl_properties(config, keystore)
    if config.ssl_port is not None:
        if keystore is None or config.tls is None:
            raise ValueError("the SSL listener needs its keystore file and the CA")
        listeners.append(f"SSL://{config.ssl_bootstrap}")
        advertised.append(f"SSL://{config.ssl_bootstrap}")
        protocols.append("SSL:SSL")
        extra += _mtls_properties(keystore, config.tls.ca_cert)
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers={config.host}:{config.controller_port}",
            f"listeners={','.join(listeners)}",
            f"advertised.listeners={','.join(advertised)}",
            "controller.listener.names=CONTROLLER",
            f"listener.security.protocol.map={','.join(protocols)}",
            "inter.broker.listener.name=PLAINTEXT",
            *extra,
            f"log.dirs={log_dir}",
            f"num.partitions={config.partitions}",
            # medmesh creates its topics from the contract; auto-creation would hide typos.
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            # One node: a new consumer group need not wait for more members to join.
            "group.initial.rebalance.delay.ms=0",
            "",
        ]
    )


def scram_arguments(config: KafkaConfig) -> list[str]:
    """``kafka-storage format`` arguments that create the config's SCRAM-SHA-512 users."""
    arguments: list[str] = []
    for name, password in sorted(config.sasl_users.items()):
        # The tool's own small grammar: a comma, bracket or quote would end the value early.
        if not re.fullmatch(r"[A-Za-z0-9_.@-]+", name) or not re.fullmatch(
            r"[A-Za-z0-9_.@!-]+", password
        ):
            raise ValueError(f"SASL user {name!r}: names and passwords of [A-Za-z0-9_.@!-] only")
        arguments.append(f"--add-scram=SCRAM-SHA-512=[name={name},password={password}]")
    return arguments


class KafkaServer:
    """One KRaft broker process with a freshly formatted data directory."""

    def __init__(self, config: KafkaConfig, echo: bool = False) -> None:
        self.config = config
        self.echo = echo
        self._process: ManagedProcess | None = None

    def _java_argv(self, lib: Path, main: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("Kafka: 'java' is not on PATH; the broker needs Java 17+")
        log4j = repo_root() / "deploy" / "kafka" / "log4j2.properties"
        return [
            java,
            f"-Xmx{self.config.heap}",
            "-Xms128m",
            *self.config.jvm_options,
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            f"{lib}/*",
            main,
            *args,
        ]

    def start(self, timeout_s: float = 90.0) -> None:
        """Format storage, start the broker and wait until it accepts connections."""
        if _port_open(self.config.host, self.config.port):
            raise RuntimeError(
                f"Kafka: port {self.config.port} is already in use; is another medmesh stack running?"
            )
        lib = ensure_kafka_jars()
        data = self.config.data_dir
        shutil.rmtree(data, ignore_errors=True)
        (data / "logs").mkdir(parents=True)
        props = data / "server.properties"
        keystore: Path | None = None
        if self.config.tls is not None and self.config.tls_listener:
            keystore = data / "tls-keystore.pem"
            keystore.write_text(keystore_pem(self.config.tls))
            keystore.chmod(0o600)
        props.write_text(server_properties(self.config, data / "logs", keystore))
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        fmt = subprocess.run(
            self._java_argv(
                lib,
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                # One argument: an id that starts with "-" (1 in 64) would read as an option.
                f"--cluster-id={cluster_id}",
                "-c",
                str(props),
                *scram_arguments(self.config),
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            # The SCRAM arguments hold the test users' passwords: the tool's output does not.
            raise RuntimeError(f"Kafka: storage format failed:\n{fmt.stdout}{fmt.stderr}")
        self.launch(timeout_s)

    def launch(self, timeout_s: float = 90.0) -> None:
        """Start the broker on its existing data directory and wait until it accepts clients."""
        lib = ensure_kafka_jars()
        data = self.config.data_dir
        props = data / "server.properties"
        log = data / "broker.log"
        if log.exists():
            # Readiness is read from this run's log only: keep earlier runs' logs beside it.
            log.rename(data / f"broker-{time.time_ns()}.log")
        env = dict(os.environ)
        env.pop("KAFKA_HEAP_OPTS", None)
        self._process = ManagedProcess(
            "kafka",
            self._java_argv(lib, "kafka.Kafka", str(props)),
            data / "broker.log",
            env=env,
            echo=self.echo,
        )
        self._process.start()
        process = self._process

        def ready() -> bool:
            if not process.running():
                raise RuntimeError(
                    f"Kafka: the broker exited with {process.returncode()}:\n{process.log_tail()}"
                )
            return _port_open(
                self.config.host, self.config.port
            ) and "Kafka Server started" in process.log_tail(200)

        try:
            wait_until("the Kafka broker to start", ready, timeout_s)
        except TimeoutError as exc:
            raise RuntimeError(f"Kafka: {exc}\n{process.log_tail()}") from exc

    def restart(self, down_s: float = 0.0, timeout_s: float = 90.0) -> None:
        """Stop the broker, stay down ``down_s`` seconds, start it again with its data intact."""
        self.stop()
        time.sleep(down_s)
        self.launch(timeout_s)

    @property
    def process(self) -> ManagedProcess:
        """The broker process (for fault-injection tests)."""
        if self._process is None:
            raise RuntimeError("Kafka is not started")
        return self._process

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the broker (controlled shutdown on SIGTERM; SIGKILL after ``grace_s``)."""
        if self._process is not None:
            self._process.stop(grace_s=grace_s)
